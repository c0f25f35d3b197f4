"""Perplexity of a text under a model, in sliding windows (the measure of llama.cpp's `llama-perplexity` and of
transformers' guide): what quantizing or converting a model costs, on the user's own text.

Each window holds up to `context` tokens and ends `stride` tokens after the one before; it scores only the tokens
the window before did not, so every token after the first is scored once, with at least context - stride tokens
before it (all of them in the first window). Log-probs come from logprobs.scored_logprobs (the one log-prob
function): the model's own forward and head, block-format weights included.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from sputnik.settings import option
from sputnik.train.logprobs import scored_logprobs


@dataclass
class PerplexityConfig:
    """What `sputnik perplexity` scores and how."""

    file: Path = option(help="a UTF-8 text file to score")
    context: int = option(1024, "tokens per window (at most the model's context length)")
    stride: int = option(512, "tokens each window moves on (< context); a window scores only what the last did not")
    json: bool = option(False, "print one JSON object (perplexity, nll, tokens, windows) instead of a sentence")


@dataclass
class Perplexity:
    """The result: exp of the mean negative log-likelihood over the scored tokens."""

    ppl: float
    nll: float  # nats per scored token
    tokens: int  # tokens scored: all but the first
    windows: int
    context: int  # as run: capped at the model's length
    stride: int
    logprobs: list[float]  # log p of tokens 1..n-1, in order


def windows(n: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """(start, end, scored) of each window over n tokens: tokens [start, end) go in, the last `scored` are scored.
    The first window scores all it can (tokens 1..context-1), each later one the next `stride` tokens, with
    context - stride tokens before them."""
    out, done = [], 1  # the first token has nothing before it to predict it
    while done < n:
        end = min(context if done == 1 else done + stride, n)
        out.append((max(0, end - context), end, end - done))
        done = end
    return out


def perplexity(model, ids: list[int], context: int = 1024, stride: int = 512, progress: bool = False) -> Perplexity:
    """Sliding-window perplexity of ids (see the module docstring). A context beyond the model's length is capped
    at it, and then a stride that no longer fits at half of it (the defaults on a model shorter than 1,024 tokens)."""
    if len(ids) < 2:
        raise ValueError(f"perplexity needs at least 2 tokens, got {len(ids)}")
    if not 0 < stride < context:
        raise ValueError(f"stride must be in 1..context - 1 (context {context}), got {stride}")
    if context > model.cfg.max_seq_len:
        context = model.cfg.max_seq_len
        stride = stride if stride < context else max(1, context // 2)
    logps: list[float] = []
    spans = windows(len(ids), context, stride)
    for start, end, scored in tqdm(spans, desc="perplexity", unit="window", disable=not progress):
        logps += scored_logprobs(model, ids[start:end])[0][-scored:]
    nll = -math.fsum(logps) / len(logps)
    return Perplexity(math.exp(nll), nll, len(logps), len(spans), context, stride, logps)


def read_text(path: Path) -> str:
    """The file's text, or a ValueError naming the file and what is wrong with it."""
    if not path.is_file():
        raise FileNotFoundError(f"text file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not text.strip():
        raise ValueError(f"{path}: empty: nothing to score")
    return text
