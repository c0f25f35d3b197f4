"""Supervised fine-tuning (R1's cold start) as an objective of the shared train loop.

Chat JSONL is rendered with the model's chat template exactly as transformers renders it; the loss covers only the
assistant's tokens (its text and its end-of-turn token). Conversations are packed into rows of seq_len tokens, each
document attending only to itself (block-diagonal causal mask) with positions restarting at 0, so a packed document
trains exactly as it would alone.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import math
import random
import time
from array import array
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from sputnik.model import build_doc_mask
from sputnik.r1 import THINK_OPEN, THINK_TEMPLATE
from sputnik.seeds import mix
from sputnik.settings import option
from sputnik.train.logprobs import head_logprobs
from sputnik.train.loop import RankAware, TrainConfig, Trainer, init_distributed
from sputnik.train.plots import read_rows
REASONING_KEYS = ("reasoning_content", "reasoning", "thinking")
IGNORE = -100  # target of a position that is not trained


@dataclass
class SFTConfig:
    """SFT data, packing and batching; the optimizer and schedule live in TrainConfig."""

    data: str = option("", 'chat JSONL: one {"messages": [...]} per line')
    seq_len: int = option(512, "tokens per packed row; longer conversations are truncated")
    batch_size: int = option(8, "packed rows per step, over all ranks")
    micro_batch: int = option(4, "rows per forward/backward")
    seed: int = option(0, "data order (a fresh shuffle of the rows every epoch)")
    epochs: float = option(0.0, "> 0: max_steps = ceil(epochs * rows / batch_size), overriding max_steps")
    chat_template: str | None = option(None, "a chat template name or source (default: the tokenizer's own)")
    think_template: str = option(THINK_TEMPLATE, "how a reasoning field is folded into the assistant's content")


# ---------------------------------------------------------------- data


def _check_row(row: Any) -> list[dict]:
    """The messages of one JSONL row, or ValueError saying what is wrong with it."""
    if not isinstance(row, dict) or not isinstance(row.get("messages"), list) or not row["messages"]:
        raise ValueError('expected an object {"messages": [...]} with at least one message')
    messages = []
    for k, m in enumerate(row["messages"]):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ValueError(f"message {k} is not an object with a string 'role'")
        for key in ("content", *REASONING_KEYS):
            if m.get(key) is not None and not isinstance(m[key], str):
                raise ValueError(f"message {k}: '{key}' must be a string")
        reasoning = [key for key in REASONING_KEYS if m.get(key)]
        if reasoning and THINK_OPEN in (m.get("content") or ""):
            raise ValueError(f"message {k}: reasoning given twice ('{reasoning[0]}' and <think> in the content)")
        messages.append(dict(m))
    if not any(m["role"] == "assistant" and (m.get("content") or any(m.get(k) for k in REASONING_KEYS))
               for m in messages):
        raise ValueError("no assistant message with text: nothing to train on")
    return messages


def load_chat_jsonl(path: str | Path) -> list[list[dict]]:
    """Conversations from a JSONL file of {"messages": [{"role", "content", "reasoning_content"?}, ...]} rows.

    An assistant turn's reasoning may be a `reasoning_content` (or `reasoning`) field or inline <think>...</think> in
    its content. Blank lines are skipped; a bad row raises ValueError naming the file and line.
    """
    path = Path(path)
    conversations = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                conversations.append(_check_row(json.loads(line)))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}, line {n}: not valid JSON ({e.msg})") from None
            except ValueError as e:
                raise ValueError(f"{path}, line {n}: {e}") from None
    if not conversations:
        raise ValueError(f"{path}: no conversations")
    return conversations


def fold_reasoning(message: Mapping[str, Any], think_template: str = THINK_TEMPLATE) -> dict:
    """The message with any reasoning field moved into its content as the think template says.

    The reasoning keys are dropped, so a template that would render them itself cannot render them twice."""
    out = {k: v for k, v in message.items() if k not in REASONING_KEYS}
    content = message.get("content") or ""
    reasoning = next((message[k] for k in REASONING_KEYS if message.get(k)), None)
    if reasoning:
        content = think_template.format(reasoning=reasoning.strip(), answer=content.lstrip())
    out["content"] = content
    return out


def _changed_span(full: list[int], reduced: list[int]) -> tuple[int, int]:
    """[start, end) of `full` that differs from `reduced` (full with one piece of text removed).

    The common suffix may not reach into the common prefix, so when the removed text ends like its surroundings
    the ambiguity is settled towards the prefix."""
    n = min(len(full), len(reduced))
    start = 0
    while start < n and full[start] == reduced[start]:
        start += 1
    suffix = 0
    while suffix < n - start and full[-1 - suffix] == reduced[-1 - suffix]:
        suffix += 1
    return start, len(full) - suffix


def tokenize_chat(
    tokenizer,
    messages: Sequence[Mapping[str, Any]],
    think_template: str = THINK_TEMPLATE,
    chat_template: str | None = None,
) -> tuple[list[int], list[int]]:
    """Token ids of the whole conversation (rendered as transformers does) and a mask: 1 exactly on assistant tokens.

    Assistant spans are found without knowing the template's syntax: the conversation is rendered again with one
    assistant's content emptied, and the tokens that change are that assistant's text. This works for templates that
    rewrite history (R1's drops the reasoning of earlier turns) because both renders are of the whole conversation.
    The end-of-turn token is the first stop token among the tokens that close the turn when it ends the conversation.
    """
    msgs = [fold_reasoning(m, think_template) for m in messages]

    def render(ms: list[dict]) -> list[int]:
        return tokenizer.apply_chat_template(ms, add_generation_prompt=False, tokenize=True,
                                             chat_template=chat_template)

    ids = render(msgs)
    mask = [0] * len(ids)
    stops = tokenizer.stop_ids
    for i, m in enumerate(msgs):
        if m["role"] != "assistant" or not m["content"]:
            continue
        empty = {**m, "content": ""}
        start, end = _changed_span(ids, render(msgs[:i] + [empty] + msgs[i + 1 :]))
        if start >= end:  # the template does not show this text (nothing to learn from it)
            continue
        if i == len(msgs) - 1:
            closing = ids[end:]
        else:  # the turn's closing tokens as they are when it ends the conversation, before any later turn
            through = render(msgs[: i + 1])
            closing = through[_changed_span(through, render(msgs[:i] + [empty]))[1] :]
        k = next((j for j, t in enumerate(closing) if t in stops), None)
        if k is not None and ids[end : end + k + 1] == closing[: k + 1]:
            end += k + 1
        mask[start:end] = [1] * (end - start)
    return ids, mask


@dataclass
class PackedRow:
    """Whole documents packed into one training row (unpadded, at most seq_len tokens)."""

    tokens: list[int]
    mask: list[int]  # 1 = assistant token, trained as a target
    doc_ids: list[int]  # 0, 1, 2... one per document in the row
    positions: list[int]  # restart at 0 for every document
    truncated: int = 0  # documents cut to seq_len


def pack(examples: Sequence[tuple[list[int], list[int]]], seq_len: int) -> list[PackedRow]:
    """Greedy best-fit-decreasing packing of (ids, mask) examples into rows of at most seq_len tokens.

    Longer examples are cut to seq_len (counted in PackedRow.truncated); the result is deterministic."""
    order = sorted(range(len(examples)), key=lambda i: -min(len(examples[i][0]), seq_len))
    rows: list[PackedRow] = []
    free: list[tuple[int, int]] = []  # (space left, row index), sorted: the tightest row that fits is a bisect away
    for i in order:
        ids, mask = examples[i]
        n = min(len(ids), seq_len)
        if n == 0:
            continue
        j = bisect.bisect_left(free, (n, -1))
        if j < len(free):
            space, r = free.pop(j)
        else:
            space, r = seq_len, len(rows)
            rows.append(PackedRow([], [], [], []))
        row = rows[r]
        doc = row.doc_ids[-1] + 1 if row.doc_ids else 0
        row.tokens += ids[:n]
        row.mask += mask[:n]
        row.doc_ids += [doc] * n
        row.positions += list(range(n))
        row.truncated += len(ids) > seq_len
        if space > n:
            bisect.insort(free, (space - n, r))
    return rows


def collate(rows: Sequence[PackedRow], pad_id: int) -> dict[str, Tensor]:
    """Rows padded to the longest: tokens, positions, doc_ids (pads: -1) and targets (IGNORE where not trained).

    targets[t] is tokens[t + 1] when that token is an assistant token of the same document."""
    B, L = len(rows), max(len(r.tokens) for r in rows)
    tokens = torch.full((B, L), pad_id, dtype=torch.long)
    positions = torch.zeros(B, L, dtype=torch.long)
    doc_ids = torch.full((B, L), -1, dtype=torch.long)
    targets = torch.full((B, L), IGNORE, dtype=torch.long)
    for b, r in enumerate(rows):
        n = len(r.tokens)
        t, d = torch.tensor(r.tokens), torch.tensor(r.doc_ids)
        keep = torch.tensor(r.mask[1:], dtype=torch.bool) & (d[1:] == d[:-1])
        tokens[b, :n], positions[b, :n], doc_ids[b, :n] = t, torch.tensor(r.positions), d
        targets[b, : n - 1] = torch.where(keep, t[1:], IGNORE)
    return {"tokens": tokens, "positions": positions, "doc_ids": doc_ids, "targets": targets}


# ---------------------------------------------------------------- the objective


def masked_ce_sum(model: nn.Module, h: Tensor, targets: Tensor, chunk: int = 1024) -> Tensor:
    """Summed cross-entropy of the trained positions (targets != IGNORE) of hidden states h [B, T, dim].

    Only those positions go through the head (head_logprobs: chunked, [tokens, vocab] logits never at once)."""
    sel = targets != IGNORE
    # No targets: a zero that still reaches every parameter, so backward (and FSDP's collectives) runs as elsewhere.
    total = h.float().sum() * 0.0
    if bool(sel.any()):
        total = total - head_logprobs(model, h[sel], targets[sel], chunk=chunk)[0].sum()
    return total


class SFTObjective(RankAware):
    """Packed chat rows in a seeded order per epoch; loss = cross-entropy summed over assistant tokens / the step's
    global assistant-token count."""

    iterations = 1

    def __init__(self, tokenizer, cfg: SFTConfig):
        self.cfg, self.tok = cfg, tokenizer
        if not cfg.data:
            raise ValueError("no SFT data: set `data` (--data) to a chat JSONL file")
        conversations = load_chat_jsonl(cfg.data)
        examples = [tokenize_chat(tokenizer, m, cfg.think_template, cfg.chat_template) for m in conversations]
        self.rows = pack(examples, cfg.seq_len)
        if not self.rows:
            raise ValueError(f"{cfg.data}: the conversations render to no tokens")
        self.pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
        # Trained positions per row: an assistant token whose predecessor is in the same document.
        self.row_targets = [sum(1 for t in range(1, len(r.tokens)) if r.mask[t] and r.doc_ids[t] == r.doc_ids[t - 1])
                            for r in self.rows]
        packed = sum(len(r.tokens) for r in self.rows)
        self.stats = {"examples": len(examples), "rows": len(self.rows),
                      "truncated": sum(r.truncated for r in self.rows), "tokens": packed,
                      "assistant_tokens": sum(self.row_targets),
                      "packing_efficiency": packed / (len(self.rows) * cfg.seq_len)}
        # Identifies the packed data, so a resume onto other data fails loudly instead of silently differing.
        digest = hashlib.sha1()
        for r in self.rows:
            digest.update(array("q", r.tokens).tobytes() + array("b", r.mask).tobytes())
        self.fingerprint = digest.hexdigest()
        self._epoch, self._order = -1, list(range(len(self.rows)))
        self._step_metrics: dict[str, float] = {}

    def steps_for(self, epochs: float) -> int:
        return max(1, math.ceil(epochs * len(self.rows) / self.cfg.batch_size))

    def _index(self, g: int) -> int:
        """Index of the g-th row of the run: epoch e walks its own shuffle of the rows, a pure function of (seed, e),
        so the order needs no state to resume exactly."""
        epoch, k = divmod(g, len(self.rows))
        if epoch != self._epoch:
            self._order = list(range(len(self.rows)))
            random.Random(mix(self.cfg.seed, epoch)).shuffle(self._order)
            self._epoch = epoch
        return self._order[k]

    def step_indices(self, step: int) -> list[int]:
        """The row indices of a step, all ranks' together, in order."""
        B = self.cfg.batch_size
        return [self._index(step * B + j) for j in range(B)]

    def prepare(self, step: int, model: nn.Module) -> list[dict[str, Tensor]]:
        idx = self.step_indices(step)
        rows = [self.rows[i] for i in idx]
        # Global counts from the whole step (every rank knows every row), so no collective is needed.
        n_targets = sum(self.row_targets[i] for i in idx)
        mine = rows[self.rank :: self.world]
        micro = [collate(mine[s : s + self.cfg.micro_batch], self.pad_id)
                 for s in range(0, len(mine), self.cfg.micro_batch)]
        for m in micro:
            m["num_items"] = max(n_targets, 1)
        self._step_metrics = {
            "tokens": float(sum(len(r.tokens) for r in rows)),
            "assistant_tokens": float(n_targets),
            "truncated": float(sum(r.truncated for r in rows)),
            "epoch": (step + 1) * self.cfg.batch_size / len(self.rows),
        }
        return micro

    def loss(self, model: nn.Module, micro: dict) -> tuple[Tensor, dict[str, float]]:
        device = next(model.parameters()).device
        tokens, positions, doc_ids, targets = (micro[k].to(device) for k in ("tokens", "positions", "doc_ids",
                                                                              "targets"))
        # (FSDP: the root keeps the final norm and head gathered after hidden(), for the loss; see loop._shard)
        total = masked_ce_sum(model, model.hidden(tokens, positions, mask=build_doc_mask(doc_ids)), targets)
        return total / micro["num_items"], {}

    def metrics(self, step: int) -> dict[str, float]:
        return dict(self._step_metrics)

    def state_dict(self) -> dict:
        return {"seed": self.cfg.seed, "batch_size": self.cfg.batch_size, "fingerprint": self.fingerprint}

    def load_state_dict(self, state: dict) -> None:
        if state.get("fingerprint") != self.fingerprint:
            raise ValueError("the checkpoint was trained on other SFT data (or seq_len/template): "
                             "resume with the same settings, or use another out_dir")
        if (state.get("seed"), state.get("batch_size")) != (self.cfg.seed, self.cfg.batch_size):
            raise ValueError("the checkpoint used another seed or batch_size: its data order cannot continue")


# ---------------------------------------------------------------- the run


def train_sft(model: nn.Module, tokenizer, cfg: SFTConfig, train: TrainConfig,
              objective_factory: Callable[[], SFTObjective] | None = None,
              extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Fine-tune `model` on cfg.data with the shared loop (resuming from out_dir's checkpoints, if any).

    objective_factory swaps the loss over the same rows (distillation's KL); extra joins the summary.
    Writes out_dir/metrics.jsonl, metrics.png, checkpoints/ and summary.json; returns the summary."""
    start = time.perf_counter()
    rank, world = init_distributed()  # before the objective, which takes its share of every step by rank
    if cfg.batch_size % world:
        raise ValueError(f"batch_size {cfg.batch_size} must be a multiple of the {world} processes")
    objective = objective_factory() if objective_factory else SFTObjective(tokenizer, cfg)
    if cfg.epochs > 0:
        train = replace(train, max_steps=objective.steps_for(cfg.epochs))
    trainer = Trainer(model, train, objective, tokenizer=tokenizer)
    resumed = trainer.resume()
    trainer.run()
    out = Path(train.out_dir)
    rows = read_rows(out / "metrics.jsonl")
    losses = [r["loss"] for r in rows if "loss" in r]
    minutes = sum(r.get("seconds", 0.0) for r in rows if 0 < r.get("step", 0) <= resumed) / 60
    summary = {"data": cfg.data, **objective.stats, "steps": train.max_steps, "resumed_from": resumed,
               "epochs": train.max_steps * cfg.batch_size / len(objective.rows),
               "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
               "minutes": round(minutes + (time.perf_counter() - start) / 60, 2), **(extra or {})}
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
