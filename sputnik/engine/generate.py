"""The engine: continuous batching over a slot KV cache, with streaming, stops and per-token log-probs.

Every sampled token in sputnik comes from here: eval, GRPO rollouts, teacher traces and the server.
"""

from __future__ import annotations

import sys
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from sputnik.device import trim_heap
from sputnik.engine.cache import KVCache, SlotCache, SlotView
from sputnik.engine.grammar import Grammars, apply_masks
from sputnik.engine.native import CACHES, native_decode, refreshed
from sputnik.engine.prefix import PrefixCache
from sputnik.engine.sampling import Sampler, SamplingParams
from sputnik.model import Cache, Transformer
from sputnik.r1 import THINK_CLOSE, THINK_OPEN, held_back
from sputnik.seeds import mix

if TYPE_CHECKING:
    from sputnik.tokenizer import StreamDecoder, Tokenizer

# Prompts are prefilled (and found in the prefix cache) in blocks of this many tokens at fixed offsets. Smaller blocks
# reuse more of a cached prefix; each block is a forward pass that reads every weight once, so much smaller ones
# make a dense model's prefill slower.
PREFILL_BLOCK = 64


@dataclass
class Completion:
    """One finished sample. token_ids hold generated ids only, a stop token included (its text is not)."""

    text: str
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str  # "stop" | "length" | "abort"
    prompt_tokens: int
    stop_reason: str | int | None = None  # the stop string or token id that ended it
    top_logprobs: list[list[tuple[int, float]]] | None = None  # per token, when the request asked for them


@dataclass
class Delta:
    """One streamed step of one sample: the new token and the text it completed (may be empty while held back)."""

    prompt: Hashable  # the prompt's index for generate/stream, the request key for add
    sample: int
    token_id: int
    logprob: float
    text: str
    finish_reason: str | None = None
    top_logprobs: list[tuple[int, float]] | None = None


@dataclass
class _Seq:
    prompt: Hashable
    sample: int
    prompt_ids: list[int]
    params: SamplingParams
    decoder: StreamDecoder | None
    stop_ids: set[int]
    seed: int | None = None
    max_new: int = 0
    admitted_at: float = 0.0  # time.monotonic() when its prefill began (queue time, for servers)
    cached_tokens: int = 0  # prompt tokens the prefix cache supplied (not recomputed)
    think: str = "start"  # under a thinking budget: "start" (undecided), "on" (inside <think>), "off"
    think_tokens: int = 0  # tokens written inside the thought so far
    forced: list[int] = field(default_factory=list)  # tokens the engine writes next, whatever the model says
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    text: str = ""
    emitted: int = 0  # characters of text already streamed
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    matcher: Any = None  # the grammar's state, for a constrained sample

    def completion(self) -> Completion:
        return Completion(self.text, self.token_ids, self.logprobs, self.finish_reason or "length",
                          len(self.prompt_ids), self.stop_reason, self.top_logprobs if self.params.logprobs else None)


def _row_seed(seed: int | None, index: int, sample: int) -> int | None:
    # Distinct, reproducible streams per (prompt index, sample); a lone request gets the same stream in any batch.
    return None if seed is None else mix(seed, index * 8191, sample, bits=62)


@dataclass
class _Request:
    key: Hashable
    ids: list[int]
    params: SamplingParams
    seqs: list[_Seq]


def next_logits(model: Transformer, tokens: Tensor, positions: Tensor, cache: Cache) -> Tensor:
    """Logits [B, vocab] of the token after each row's last one: the head runs on that position only."""
    return model.logits(model.hidden(tokens, positions, cache)[:, -1])


def is_sharded(model: Transformer) -> bool:
    """Is the model sharded with FSDP2? FSDP gathers its weights into buffers it reuses in training, which must not
    become inference tensors nor be re-pointed into fused weights. Asked of the modules, not the parameters: while
    FSDP holds the full weights (train.loop.gathered) the parameters are plain tensors in those buffers."""
    fsdp = sys.modules.get("torch.distributed.fsdp")  # a sharded model imported it; importing it costs ~50 MB
    return fsdp is not None and any(isinstance(m, fsdp.FSDPModule) for m in model.modules())


def compiled_decode(model: Transformer) -> Callable[[Tensor, Tensor, list[Tensor]], Tensor]:
    """The decode step as one compiled graph (inductor, C++ wrapper): at batch 1 a step is a few hundred tiny ops
    around the matrix-vector products, and eager dispatch of those costs as much as a third of the step on a CPU.

    Shapes stay put between steps (every slot attended under a mask), so it compiles once for one row and once for
    several, and again only if the cache outgrows what was marked dynamic. The first steps pay the compile (much less
    from inductor's disk cache the second time); eager is the default for that reason."""

    def step(tokens: Tensor, positions: Tensor, buffers: list[Tensor]) -> Tensor:
        return next_logits(model, tokens, positions, SlotView(buffers, positions[:, 0], buffers[0].shape[-2]))

    return torch.compile(step, options={"cpp_wrapper": model.device.type == "cpu"})


@dataclass
class _Prefill:
    """Prompts being prefilled, each in its own one-row KVCache (no padding), block by block."""

    requests: list[_Request]
    caches: list[KVCache]
    logits: list[Tensor | None]  # each prompt's next-token logits, once its last block has run
    tokens: int = 0  # prompt tokens run so far (a cached prefix is not run)


class Engine:
    """Continuous batching: requests join the running batch at any step and leave it as they finish.

    Each step prefills up to prefill_chunk tokens of waiting prompts and decodes one token for every running sequence,
    so long prompts never stall running streams. A prompt is prefilled on its own, in blocks of prefill_block tokens
    at fixed offsets, and the prefix cache answers whole blocks: its KV and logits are the same bits whatever shares
    the step or the cache, which the quantized kernels need (their 8-bit activations turn the last bit of a
    reordered sum into a different sample). Running sequences live in a SlotCache, each row at its own length; n
    samples of a prompt share one prefill. `generate` and `stream` drive the same steps that a server drives with
    `add`, `step` and `abort`. kv_dtype: the caches' dtype (default: the model's; bfloat16 halves a float32 model's
    cache and the bytes each decode step reads from it).
    """

    def __init__(self, model: Transformer, tokenizer: Tokenizer | None = None, max_batch: int = 64,
                 prefill_chunk: int = 512, prefix_cache_mb: float = 0, compile: bool = False, native: bool = True,
                 prefill_block: int = PREFILL_BLOCK, kv_dtype: torch.dtype | None = None):
        self.model = model.eval()
        self.kv_dtype = kv_dtype or model.dtype
        self.sharded = is_sharded(model)
        if not self.sharded:
            model.fuse()  # q/k/v and gate/up as one matmul each, in every forward this engine runs
        self._compiled = compiled_decode(model) if compile else None
        # A Llama-family model on the CPU decodes in one native call per step where it can (engine/native.py)
        native = native and not compile and not self.sharded and self.kv_dtype in CACHES
        self._native = native_decode(model) if native else None
        self._marked: Tensor | None = None  # the cache buffer last marked dynamic for the compiler
        self.tokenizer = tokenizer
        self.max_batch, self.prefill_chunk, self.prefill_block = max_batch, prefill_chunk, prefill_block
        self.prefix_cache = PrefixCache(int(prefix_cache_mb * 2**20)) if prefix_cache_mb > 0 else None
        self._inbox: deque[tuple[str, Any]] = deque()  # add/abort from any thread; step() drains it
        self._waiting: deque[_Request] = deque()
        self._prefill: _Prefill | None = None
        self._running: list[_Seq] = []
        self._next: Tensor | None = None  # the token each running row feeds next
        self._cache = SlotCache(model.cfg, self.kv_dtype, model.device)
        self._sampler = Sampler([], [], model.cfg.vocab_size, model.device)
        self.stats = {"prefix_hit_tokens": 0, "prompt_tokens": 0}
        # What a thinking budget writes when it runs out: R1's layout around the closing tag.
        self._think_end = tokenizer.encode("\n" + THINK_CLOSE + "\n\n", add_special_tokens=False) if tokenizer else []
        self._grammars: Grammars | None = None

    @property
    def grammars(self) -> Grammars:
        """The grammar compiler for this engine's tokenizer (built at the first constrained request)."""
        if self._grammars is None:
            if self.tokenizer is None:
                raise ValueError("constrained decoding needs a tokenizer")
            self._grammars = Grammars(self.tokenizer, self.tokenizer.stop_ids)
        return self._grammars

    # ---- the request interface (thread-safe: add and abort only queue work for the stepping thread)
    def _ids(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("a text prompt needs a tokenizer")
            return self.tokenizer.encode(prompt, add_special_tokens=True)
        return [int(t) for t in prompt]

    def add(self, key: Hashable, prompt: str | Sequence[int], params: SamplingParams, seed_index: int = 0
            ) -> list[_Seq]:
        """Queue one request (n samples); its deltas carry prompt=key. The seed stream depends on (seed, seed_index,
        sample) only, so a seeded request samples the same whatever shares its batch."""
        ids = self._ids(prompt)
        if not ids:
            raise ValueError("empty prompt: give at least one token")
        if len(ids) >= self.model.cfg.max_seq_len:
            raise ValueError(f"prompt of {len(ids)} tokens does not fit the model's context of "
                             f"{self.model.cfg.max_seq_len}")
        from sputnik.tokenizer import StreamDecoder

        if params.thinking_token_budget is not None and self.tokenizer is None:
            raise ValueError("a thinking budget needs a tokenizer (it watches the text for </think>)")
        stop_ids = set(params.stop_token_ids)
        if not params.ignore_eos and self.tokenizer is not None:
            stop_ids |= set(self.tokenizer.stop_ids)
        seqs = [_Seq(key, j, ids, params, StreamDecoder(self.tokenizer) if self.tokenizer else None, stop_ids,
                     seed=_row_seed(params.seed, seed_index, j)) for j in range(params.n)]
        if params.constraint is not None:
            for seq in seqs:
                seq.matcher = self.grammars.matcher(params.constraint)
        self._inbox.append(("add", _Request(key, ids, params, seqs)))
        return seqs

    def abort(self, key: Hashable) -> None:
        """Stop a request wherever it is (queued, prefilling or running); its rows are freed at the next step."""
        self._inbox.append(("abort", key))

    @property
    def has_work(self) -> bool:
        return bool(self._inbox or self._waiting or self._prefill or self._running)

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_cache_rows(self) -> int:
        """KV cache rows holding a sequence: equals num_running unless a row leaked."""
        return self._cache.n

    @property
    def num_waiting(self) -> int:
        return len(self._waiting) + (sum(len(r.seqs) for r in self._prefill.requests) if self._prefill else 0)

    # ---- batch helpers
    def generate(self, prompts: Sequence[str | Sequence[int]], params: SamplingParams | None = None
                 ) -> list[list[Completion]]:
        """All completions: result[i][j] is sample j of prompt i."""
        params = params or SamplingParams()
        seqs = self._add_all(prompts, params)
        while self.has_work:
            self.step()
        return [[s.completion() for s in row] for row in seqs]

    def warm_up(self) -> None:
        """Run a lone row and then two rows for a few tokens: with compile=True this builds both graphs now (minutes
        on a small CPU the first time) rather than at the first requests."""
        for rows in (1, 2):
            self.generate([[1, 2, 3]] * rows, SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))

    def stream(self, prompts: Sequence[str | Sequence[int]], params: SamplingParams | None = None) -> Iterator[Delta]:
        """Deltas as tokens are chosen, across every prompt and sample; text never ends inside a UTF-8 character or a
        possible stop string."""
        self._add_all(prompts, params or SamplingParams())
        while self.has_work:
            yield from self.step()

    def _add_all(self, prompts, params: SamplingParams) -> list[list[_Seq]]:
        if self.has_work:
            raise RuntimeError("generate/stream need an idle engine (a server drives this one with add/step)")
        ids = [self._ids(p) for p in prompts]
        if any(len(p) == 0 for p in ids):
            raise ValueError("empty prompt: give at least one token")
        return [self.add(i, p, params, seed_index=i) for i, p in enumerate(ids)]

    # ---- one step
    def step(self, emit: Callable[[list[Delta]], None] | None = None) -> list[Delta]:
        """Admit waiting requests, prefill one chunk, decode one token for every running row; return the deltas.

        The prefill goes first and its first tokens are ready before the decode runs: given `emit`, each phase's
        deltas go there as soon as they exist (a new stream's first token does not wait for the batch's step)."""
        with torch.no_grad() if self.sharded else torch.inference_mode():  # (see is_sharded)
            return self._step(emit)

    def _step(self, emit: Callable[[list[Delta]], None] | None) -> list[Delta]:
        self._drain_inbox()
        self._admit()
        out: list[Delta] = []
        send = emit or out.extend
        joined = self._prefill_chunk()
        if joined is not None:
            seqs, kvs, logits, prefilled = joined
            sampler = Sampler([s.params for s in seqs], [s.seed for s in seqs], self.model.cfg.vocab_size,
                              self.model.device)
            sampler.start([s.prompt_ids for s in seqs])
            deltas, done, tok = self._sample(sampler, seqs, logits)
            send(deltas)
        if self._running:
            masks = self._masks(self._running)  # computed while the model runs
            deltas, done_running, self._next = self._sample(self._sampler, self._running, self._decode(), masks)
            if done_running:
                self._release(done_running)
            send(deltas)
        if joined is not None:  # the new rows join the batch for the next step
            keep = [r for r in range(len(seqs)) if r not in set(done)]
            if keep:
                idx = torch.tensor(keep, device=self.model.device)
                sampler.select(idx)
                for r in keep:
                    self._cache.add(kvs[r])
                self._sampler.extend(sampler)
                self._running += [seqs[r] for r in keep]
                tok = tok.index_select(0, idx)
                self._next = tok if self._next is None or not len(self._next) else torch.cat([self._next, tok])
            del joined, kvs  # the prompts' own caches, now copied into the batch's (the prefix cache keeps its own)
            if prefilled >= self.prefill_chunk and self.model.device.type == "cpu":
                # A long prompt's activations and caches free tens of MB that glibc keeps (~100 MB after 2,000 tokens
                # here); handing them back takes a few ms, against the prefill's seconds.
                trim_heap()
        return out

    def _masks(self, seqs: list[_Seq]):
        return self._grammars.masks([s.matcher for s in seqs]) if self._grammars is not None else None

    def _sample(self, sampler: Sampler, seqs: list[_Seq], logits: Tensor, masks=None
                ) -> tuple[list[Delta], list[int], Tensor]:
        """Choose each row's next token (within its grammar, for a constrained row; the forced one, for a row whose
        thinking budget ran out); return the deltas, the rows that finished, and the tokens."""
        masks = masks or self._masks(seqs)
        if masks is not None:
            logits = apply_masks(logits, masks.result())
        force = None
        if any(s.forced for s in seqs):
            force = torch.tensor([s.forced[0] if s.forced else -1 for s in seqs], device=logits.device)
        tok, logp = sampler(logits, force)
        top = None
        if sampler.top_logprobs:
            vals, idx = sampler.logp.topk(sampler.top_logprobs, -1)
            top = (vals.tolist(), idx.tolist())
        deltas, done = [], []
        for r, (seq, t, lp) in enumerate(zip(seqs, tok.tolist(), logp.tolist())):
            n_top = seq.params.logprobs
            alts = list(zip(top[1][r][:n_top], top[0][r][:n_top])) if top and n_top else None
            deltas.append(self._advance(seq, t, lp, last=len(seq.token_ids) + 1 >= seq.max_new, top=alts))
            if seq.finish_reason is not None:
                done.append(r)
        return deltas, done, tok

    def _drain_inbox(self) -> None:
        aborted = set()
        while self._inbox:
            kind, item = self._inbox.popleft()
            if kind == "add":
                self._waiting.append(item)
            else:
                aborted.add(item)
        if not aborted:
            return
        self._waiting = deque(r for r in self._waiting if r.key not in aborted)
        groups = [self._prefill.requests] if self._prefill else []
        for seq in [s for g in groups for r in g for s in r.seqs] + self._running:
            if seq.prompt in aborted and seq.finish_reason is None:
                seq.finish_reason = "abort"
        rows = [r for r, s in enumerate(self._running) if s.finish_reason == "abort"]
        if rows:
            self._release(rows, store=False)

    def _admit(self) -> None:
        """Start prefilling the next waiting prompts that fit (FIFO), each from its longest cached prefix."""
        if self._prefill is not None or not self._waiting:
            return
        if not self.sharded:  # weights moved or cast since the last prompts (a trainer may own them): fuse them again
            self.model.fuse()
            if self._native is not None:
                self._native = refreshed(self._native, self.model)
        free = self.max_batch - len(self._running)
        group: list[_Request] = []
        while self._waiting and free >= self._waiting[0].params.n:
            group.append(self._waiting.popleft())
            free -= group[-1].params.n
        if not group and not self._running:
            group = [self._waiting.popleft()]  # n > max_batch: run it alone rather than never
        if not group:
            return
        model, now, caches = self.model, time.monotonic(), []
        for req in group:
            cache = KVCache(model.cfg, 1, len(req.ids), self.kv_dtype, model.device)
            hit = self.prefix_cache and self.prefix_cache.lookup(req.ids, align=self.prefill_block)
            if hit:  # the KV of the longest cached prefix, in whole blocks
                cache.load_prefix(hit)
            caches.append(cache)
            for seq in req.seqs:
                seq.admitted_at, seq.cached_tokens = now, cache.length
            self.stats["prompt_tokens"] += len(req.ids)
            self.stats["prefix_hit_tokens"] += cache.length
        self._prefill = _Prefill(group, caches, [None] * len(group))

    def _prefill_chunk(self) -> tuple[list[_Seq], list[list[Tensor]], Tensor, int] | None:
        """Prefill up to prefill_chunk tokens (at least one block) of the current prompts; when every one is done,
        return their live sequences, each one's KV rows and next-token logits (n samples share a prefill), and the
        number of prompt tokens the prefill ran."""
        pf = self._prefill
        if pf is None:
            return None
        budget, block, device = self.prefill_chunk, self.prefill_block, self.model.device
        for i, (req, cache) in enumerate(zip(pf.requests, pf.caches)):
            while cache.length < len(req.ids) and budget > 0:
                s = cache.length
                e = min(len(req.ids), (s // block + 1) * block)
                tokens = torch.tensor([req.ids[s:e]], dtype=torch.long, device=device)
                h = self.model.hidden(tokens, torch.arange(s, e, device=device)[None], cache)
                if e == len(req.ids):  # the head runs on the last position only
                    pf.logits[i] = self.model.logits(h[:, -1])
                budget -= e - s
                pf.tokens += e - s
        if any(x is None for x in pf.logits):
            return None
        self._prefill = None
        rows, seqs, kvs = [], [], []
        for i, (req, cache) in enumerate(zip(pf.requests, pf.caches)):
            kv = cache.row(0)
            if self.prefix_cache is not None:
                self.prefix_cache.store(req.ids, kv)
            for seq in req.seqs:
                if seq.finish_reason is None:
                    seq.max_new = min(seq.params.max_tokens, self.model.cfg.max_seq_len - len(seq.prompt_ids))
                    if seq.params.thinking_token_budget is not None:
                        seq.think = "on" if seq.params.in_thinking else "start"
                        self._watch_thinking(seq)
                    rows.append(i)
                    seqs.append(seq)
                    kvs.append(kv)
        if not seqs:
            return None
        return seqs, kvs, torch.cat(pf.logits).index_select(0, torch.tensor(rows, device=device)), pf.tokens

    def _decode(self) -> Tensor:
        cache, tokens = self._cache, self._next[:, None]
        if self._native is not None:
            view = cache.view()
            logits = self._native(tokens, view.lens[:, None], view.first, view.second)
        elif self._compiled is None:
            view = cache.view()
            logits = next_logits(self.model, tokens, view.lens[:, None], view)
        else:
            view = cache.view(full=True)
            if view.buffers[0] is not self._marked:  # new buffers (the cache grew): their sizes may vary
                for t in view.buffers:
                    torch._dynamo.maybe_mark_dynamic(t, 0)
                    torch._dynamo.maybe_mark_dynamic(t, t.dim() - 2)  # (a negative dim is not understood)
                self._marked = view.buffers[0]
            torch._dynamo.maybe_mark_dynamic(tokens, 0)
            logits = self._compiled(tokens, view.lens[:, None], view.buffers)
        cache.advance(1)
        return logits

    def _release(self, rows: list[int], store: bool = True) -> None:
        """Free finished rows: keep a finished sequence's KV in the prefix cache (a chat's next turn starts with
        it), then move the last rows into the holes."""
        if store and self.prefix_cache is not None:
            for r in rows:
                seq = self._running[r]
                if seq.finish_reason != "abort":
                    # The last sampled token was never fed, so the cache covers prompt + tokens[:-1].
                    self.prefix_cache.store(seq.prompt_ids + seq.token_ids[:-1], self._cache.row(r))
        order = self._cache.remove(rows)
        self._running = [self._running[i] for i in order]
        idx = torch.tensor(order, dtype=torch.long, device=self.model.device)
        self._sampler.select(idx)
        if self._next is not None:
            self._next = self._next.index_select(0, idx)

    def _advance(self, seq: _Seq, token: int, logprob: float, last: bool,
                 top: list[tuple[int, float]] | None = None) -> Delta:
        """Append one token to a sequence; decide whether it has finished; return the text it can stream now."""
        seq.token_ids.append(token)
        seq.logprobs.append(logprob)
        if seq.forced:
            seq.forced.pop(0)
        if top is not None:
            seq.top_logprobs.append(top)
        if seq.matcher is not None and token not in seq.stop_ids and not seq.matcher.consume_token(token):
            raise RuntimeError(f"token {token} broke its row's grammar: {seq.matcher.get_error()}")
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
        if seq.finish_reason is None and seq.matcher is not None and seq.matcher.is_stopped():
            seq.finish_reason = "stop"  # the grammar is complete: only its end could follow
        if seq.finish_reason is None and last:
            seq.finish_reason = "length"
        if seq.params.thinking_token_budget is not None and seq.finish_reason is None:
            self._watch_thinking(seq, counted=1)
        if seq.finish_reason is None and seq.decoder is not None and seq.params.stop:
            upto = len(seq.text) - held_back(seq.text, seq.params.stop)
        else:
            if seq.finish_reason is not None and seq.decoder is not None and not isinstance(seq.stop_reason, str):
                seq.text += seq.decoder.flush()
            upto = len(seq.text)
        text, seq.emitted = seq.text[seq.emitted : upto], max(seq.emitted, upto)
        return Delta(seq.prompt, seq.sample, token, logprob, text, seq.finish_reason, top)

    def _watch_thinking(self, seq: _Seq, counted: int = 0) -> None:
        """Follow a budgeted sequence in and out of its thought (by its text, so any tokenization of the tags
        counts); once the thought has used the budget, queue the closing tag, which the next steps write."""
        head = seq.text.lstrip()
        if seq.think == "start":
            if head.startswith(THINK_OPEN):
                seq.think = "on"  # the model opened the thought itself: count from here
                counted = 0
            elif head and not THINK_OPEN.startswith(head):
                seq.think = "off"
        if seq.think != "on":
            return
        seq.think_tokens += counted
        opened = seq.text.find(THINK_OPEN)
        if THINK_CLOSE in seq.text[opened + len(THINK_OPEN) if opened >= 0 else 0:]:
            seq.think = "off"  # closed by the model, or by what was forced
        elif not seq.forced and seq.think_tokens >= seq.params.thinking_token_budget:
            seq.forced = list(self._think_end)
