"""The engine: batched generation over a static KV cache, with streaming, stops and per-token log-probs.

Every sampled token in sputnik comes from here: eval, GRPO rollouts, teacher traces and the server.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from sputnik.engine.cache import KVCache
from sputnik.engine.sampling import Sampler, SamplingParams
from sputnik.model import Transformer

if TYPE_CHECKING:
    from sputnik.tokenizer import StreamDecoder, Tokenizer


@dataclass
class Completion:
    """One finished sample. token_ids hold generated ids only, a stop token included (its text is not)."""

    text: str
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str  # "stop" | "length"
    prompt_tokens: int
    stop_reason: str | int | None = None  # the stop string or token id that ended it


@dataclass
class Delta:
    """One streamed step of one sample: the new token and the text it completed (may be empty while held back)."""

    prompt: int
    sample: int
    token_id: int
    logprob: float
    text: str
    finish_reason: str | None = None


@dataclass
class _Seq:
    prompt: int
    sample: int
    prompt_ids: list[int]
    params: SamplingParams
    decoder: StreamDecoder | None
    stop_ids: set[int]
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    text: str = ""
    emitted: int = 0  # characters of text already streamed
    finish_reason: str | None = None
    stop_reason: str | int | None = None

    def completion(self) -> Completion:
        return Completion(self.text, self.token_ids, self.logprobs, self.finish_reason or "length",
                          len(self.prompt_ids), self.stop_reason)


def _row_seed(seed: int | None, prompt: int, sample: int) -> int | None:
    # Distinct, reproducible streams per (prompt, sample); a lone request gets the same stream in any batch.
    return None if seed is None else (seed * 1_000_003 + prompt * 8191 + sample) % 2**62


def _held_back(text: str, stops: list[str]) -> int:
    """Length of the longest tail of text that could still grow into a stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


class Engine:
    """Generates for many prompts at once: left-padded ragged prefill (chunked), n samples sharing one prefill,
    finished rows dropped from the batch as they end."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer | None = None, max_batch: int = 64,
                 prefill_chunk: int = 512):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_batch, self.prefill_chunk = max_batch, prefill_chunk

    def _ids(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("a text prompt needs a tokenizer")
            return self.tokenizer.encode(prompt, add_special_tokens=True)
        return [int(t) for t in prompt]

    def generate(self, prompts: Sequence[str | Sequence[int]], params: SamplingParams | None = None
                 ) -> list[list[Completion]]:
        """All completions: result[i][j] is sample j of prompt i."""
        params = params or SamplingParams()
        finished: list[_Seq] = []
        for _ in self._run(prompts, params, finished):
            pass
        out: list[list[Completion]] = [[None] * params.n for _ in prompts]  # type: ignore[list-item]
        for seq in finished:
            out[seq.prompt][seq.sample] = seq.completion()
        return out

    def stream(self, prompts: Sequence[str | Sequence[int]], params: SamplingParams | None = None) -> Iterator[Delta]:
        """Deltas as tokens are chosen, across every prompt and sample; text never ends inside a UTF-8 character or a
        possible stop string."""
        return self._run(prompts, params or SamplingParams(), [])

    def _run(self, prompts, params: SamplingParams, finished: list[_Seq]) -> Iterator[Delta]:
        ids = [self._ids(p) for p in prompts]
        if any(len(p) == 0 for p in ids):
            raise ValueError("empty prompt: give at least one token")
        per_batch = max(1, self.max_batch // params.n)
        for start in range(0, len(ids), per_batch):
            yield from self._batch(ids[start : start + per_batch], start, params, finished)

    @torch.inference_mode()
    def _batch(self, prompts: list[list[int]], offset: int, params: SamplingParams, finished: list[_Seq]
               ) -> Iterator[Delta]:
        model, cfg, device = self.model, self.model.cfg, self.model.device
        P, n = len(prompts), params.n
        lens = [len(p) for p in prompts]
        L = max(lens)
        if L >= cfg.max_seq_len:
            raise ValueError(f"prompt of {L} tokens does not fit the model's context of {cfg.max_seq_len}")
        max_new = min(params.max_tokens, cfg.max_seq_len - L)
        if self.tokenizer is not None:
            from sputnik.tokenizer import StreamDecoder
        stop_ids = set(params.stop_token_ids)
        if not params.ignore_eos and self.tokenizer is not None:
            stop_ids |= set(self.tokenizer.stop_ids)
        seqs = [
            _Seq(offset + i, j, prompts[i], params, StreamDecoder(self.tokenizer) if self.tokenizer else None, stop_ids)
            for i in range(P) for j in range(n)
        ]

        # Prefill each prompt once, left-padded so every row writes the same cache slots.
        pad = torch.tensor([L - m for m in lens], device=device)
        tokens = torch.zeros(P, L, dtype=torch.long, device=device)
        for i, p in enumerate(prompts):
            tokens[i, L - len(p) :] = torch.tensor(p, dtype=torch.long)
        slots = torch.arange(L, device=device)[None]
        attn_mask = slots >= pad[:, None]
        positions = (slots - pad[:, None]).clamp(min=0)
        cache = KVCache(cfg, P, L + max_new, model.dtype, device)
        for s in range(0, L, self.prefill_chunk):
            e = min(L, s + self.prefill_chunk)
            logits = model(tokens[:, s:e], positions[:, s:e], cache, attn_mask[:, s:e], last_only=True)[:, -1]
        rows = torch.arange(P, device=device).repeat_interleave(n)
        if n > 1:
            cache.select(rows)
            logits = logits.index_select(0, rows)
        next_pos = torch.tensor(lens, device=device).index_select(0, rows)
        sampler = Sampler([params] * len(seqs), [_row_seed(params.seed, s.prompt, s.sample) for s in seqs],
                          cfg.vocab_size, device)
        sampler.start([s.prompt_ids for s in seqs])

        active: list[_Seq | None] = list(seqs)  # None: a finished row still riding in the batch
        for step in range(max_new):
            tok, logp = sampler(logits)
            for seq, t, lp in zip(active, tok.tolist(), logp.tolist()):
                if seq is not None:
                    yield self._advance(seq, t, lp, last=step == max_new - 1)
                    if seq.finish_reason is not None:
                        finished.append(seq)
            keep = [r for r, seq in enumerate(active) if seq is not None and seq.finish_reason is None]
            if not keep:
                return
            # Drop finished rows once enough have ended: the copy is cheaper than decoding them further.
            if len(keep) < len(active) and (4 * (len(active) - len(keep)) >= len(active) or len(keep) <= 2):
                idx = torch.tensor(keep, device=device)
                cache.select(idx)
                sampler.select(idx)
                tok, next_pos = tok.index_select(0, idx), next_pos.index_select(0, idx)
                active = [active[r] for r in keep]
            else:
                active = [seq if seq is not None and seq.finish_reason is None else None for seq in active]
            logits = model(tok[:, None], next_pos[:, None], cache)[:, -1]
            next_pos = next_pos + 1

    def _advance(self, seq: _Seq, token: int, logprob: float, last: bool) -> Delta:
        """Append one token to a sequence; decide whether it has finished; return the text it can stream now."""
        seq.token_ids.append(token)
        seq.logprobs.append(logprob)
        if token in seq.stop_ids:
            seq.finish_reason, seq.stop_reason = "stop", token
        elif seq.decoder is not None:
            seq.text += seq.decoder.push(token)
            stops = seq.params.stop
            if stops:
                window = seq.text[max(0, seq.emitted - max(map(len, stops))) :]
                base = len(seq.text) - len(window)
                hits = [(window.find(s), s) for s in stops if s in window]
                if hits:
                    pos, s = min(hits)
                    seq.text = seq.text[: base + pos]
                    seq.finish_reason, seq.stop_reason = "stop", s
        if seq.finish_reason is None and last:
            seq.finish_reason = "length"
        if seq.finish_reason is None and seq.decoder is not None and seq.params.stop:
            upto = len(seq.text) - _held_back(seq.text, seq.params.stop)
        else:
            if seq.finish_reason is not None and seq.decoder is not None and not isinstance(seq.stop_reason, str):
                seq.text += seq.decoder.flush()
            upto = len(seq.text)
        text, seq.emitted = seq.text[seq.emitted : upto], max(seq.emitted, upto)
        return Delta(seq.prompt, seq.sample, token, logprob, text, seq.finish_reason)
