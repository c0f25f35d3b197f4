"""Choosing the next token: penalties, temperature, top-k, top-p, min-p, and seeded per-sequence sampling."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from sputnik.engine.grammar import Constraint

# Top-p looks among this many most likely tokens, then this many, and sorts the whole vocabulary only when they hold
# too little mass: a full sort of 32 x 49k logits costs more than the rest of a small model's decoding step, and
# the 1024 most likely took 22 ms a step there, the 64 most likely 5.5 (the kept tokens, and so the draw, are the
# same whichever holds them).
TOP_P_CANDIDATES = (64, 1024)
GREEDY_BELOW = 1e-5  # temperatures under this sample greedily


@dataclass
class SamplingParams:
    """How to sample one request; temperature 0 means greedy. Names follow vLLM / the OpenAI API."""

    max_tokens: int = 256
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # HF's: divides positive logits of every token seen in prompt or output
    presence_penalty: float = 0.0  # OpenAI's: over output tokens
    frequency_penalty: float = 0.0
    n: int = 1
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int = 0  # how many most likely alternatives to report with each token (OpenAI's top_logprobs)
    # vLLM's thinking_token_budget: after this many tokens inside <think>, the engine writes </think> itself and the
    # answer follows (None: no budget). in_thinking: the prompt already opened <think> (R1's chat template).
    thinking_token_budget: int | None = None
    in_thinking: bool = False
    constraint: Constraint | None = None  # a grammar every sample's output must match (sputnik.engine.grammar)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        checks = [
            (self.max_tokens >= 1, "max_tokens must be >= 1"),
            (self.temperature >= 0, "temperature must be >= 0"),
            (self.top_k >= 0, "top_k must be >= 0"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (0 <= self.min_p <= 1, "min_p must be in [0, 1]"),
            (self.repetition_penalty > 0, "repetition_penalty must be > 0"),
            (-2 <= self.presence_penalty <= 2, "presence_penalty must be in [-2, 2]"),
            (-2 <= self.frequency_penalty <= 2, "frequency_penalty must be in [-2, 2]"),
            (self.n >= 1, "n must be >= 1"),
            (all(s for s in self.stop), "stop strings must not be empty"),
            (0 <= self.logprobs <= 20, "logprobs must be in [0, 20]"),
            (self.thinking_token_budget is None or self.thinking_token_budget >= 0,
             "thinking_token_budget must be >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def greedy(self) -> bool:
        # Below this, logits / temperature overflow to inf and the softmax to NaN: it is greedy in all but name.
        return self.temperature < GREEDY_BELOW


class Sampler:
    """Samples one token per row. Each row has its own parameters and its own RNG, so a seeded sequence gives the
    same tokens whatever else shares its batch."""

    def __init__(self, params: list[SamplingParams], seeds: list[int | None], vocab_size: int, device: torch.device):
        self.params, self.vocab_size, self.device = params, vocab_size, device
        self.generators = []
        for s in seeds:
            g = torch.Generator()
            g.manual_seed(s if s is not None else int(torch.randint(0, 2**62, (1,)).item()))
            self.generators.append(g)
        f = lambda xs: torch.tensor(xs, dtype=torch.float32, device=device)[:, None]  # noqa: E731
        self.temperature = f([1.0 if p.greedy else p.temperature for p in params])
        self.greedy = torch.tensor([p.greedy for p in params], dtype=torch.bool, device=device)
        self.top_k = torch.tensor([p.top_k for p in params], dtype=torch.long, device=device)
        self.top_p = f([p.top_p for p in params])
        self.min_p = f([p.min_p for p in params])
        self.rep = f([p.repetition_penalty for p in params])
        self.presence = f([p.presence_penalty for p in params])
        self.frequency = f([p.frequency_penalty for p in params])
        self.seen: Tensor | None = None  # [B, V] bool: in prompt or output (repetition penalty)
        self.counts: Tensor | None = None  # [B, V] output token counts (presence/frequency)
        self._flags()

    def _flags(self) -> None:
        self.all_greedy = bool(self.greedy.all())
        self.use_rep = bool((self.rep != 1).any())
        self.use_counts = bool((self.presence != 0).any() or (self.frequency != 0).any())
        self.top_logprobs = max((p.logprobs for p in self.params), default=0)

    def start(self, prompts: list[list[int]]) -> None:
        B, V = len(prompts), self.vocab_size
        if self.use_rep:
            self.seen = torch.zeros(B, V, dtype=torch.bool, device=self.device)
            for i, p in enumerate(prompts):
                self.seen[i, torch.tensor(p, dtype=torch.long, device=self.device)] = True
        if self.use_counts:
            self.counts = torch.zeros(B, V, dtype=torch.float32, device=self.device)

    _ROW_STATE = ("temperature", "greedy", "top_k", "top_p", "min_p", "rep", "presence", "frequency", "seen", "counts")

    def extend(self, other: "Sampler") -> None:
        """Append other's rows (sequences joining a running batch)."""
        B, B2 = len(self.params), len(other.params)
        self.params, self.generators = self.params + other.params, self.generators + other.generators
        for name, dtype in (("seen", torch.bool), ("counts", torch.float32)):
            a, b = getattr(self, name), getattr(other, name)
            if a is None and b is None:
                continue
            a = a if a is not None else torch.zeros(B, self.vocab_size, dtype=dtype, device=self.device)
            b = b if b is not None else torch.zeros(B2, self.vocab_size, dtype=dtype, device=self.device)
            setattr(self, name, torch.cat([a, b]))
        for name in self._ROW_STATE[:8]:
            setattr(self, name, torch.cat([getattr(self, name), getattr(other, name)]))
        self._flags()

    def select(self, rows: Tensor) -> None:
        """Keep these rows, in this order (the engine drops finished sequences or fans out samples)."""
        idx = rows.tolist()
        self.params = [self.params[i] for i in idx]
        self.generators = [self.generators[i] for i in idx]
        for name in self._ROW_STATE:
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t.index_select(0, rows))
        self._flags()

    def reseed(self, seeds: list[int | None]) -> None:
        for g, s in zip(self.generators, seeds):
            if s is not None:
                g.manual_seed(s)

    def __call__(self, logits: Tensor, force: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """logits [B, V] -> (tokens [B], log-probs [B] of the chosen tokens under logits / temperature).

        force [B] (-1: sample) overrides rows with a token the engine must write (a thinking budget's </think>);
        its log-prob is still the model's, and the penalties see it like any output token."""
        logits = logits.float()
        if self.use_rep:
            penalised = torch.where(logits > 0, logits / self.rep, logits * self.rep)
            logits = torch.where(self.seen, penalised, logits)
        if self.use_counts:
            logits = logits - self.frequency * self.counts - self.presence * (self.counts > 0).float()
        logp = torch.log_softmax(logits / self.temperature, -1)
        if self.all_greedy:
            tokens = logits.argmax(-1)
        else:
            tokens = torch.where(self.greedy, logits.argmax(-1), self._sample(logp))
        if force is not None:
            tokens = torch.where(force >= 0, force, tokens)
        self._observe(tokens)
        self.logp = logp  # the engine reads the most likely alternatives from here when a row asks for them
        return tokens, logp.gather(1, tokens[:, None])[:, 0]

    def _observe(self, tokens: Tensor) -> None:
        if self.seen is not None:
            self.seen.scatter_(1, tokens[:, None], True)
        if self.counts is not None:
            self.counts.scatter_add_(1, tokens[:, None], torch.ones_like(tokens[:, None], dtype=torch.float32))

    def _sample(self, logp: Tensor) -> Tensor:
        probs = logp.exp()
        if bool((self.min_p > 0).any()):
            probs = probs.masked_fill(probs < self.min_p * probs.amax(-1, keepdim=True), 0)
        filter_k, filter_p = bool((self.top_k > 0).any()), bool((self.top_p < 1).any())
        if not (filter_k or filter_p):
            return self._draw(probs)
        V = probs.shape[-1]
        max_k = int(self.top_k.max())
        if not filter_p:
            vals, idx = probs.topk(min(V, max_k), -1)
            return idx.gather(1, self._draw(self._top_k(vals))[:, None])[:, 0]
        has_k = self.top_k[:, None] > 0  # such rows' candidates are exact: K >= their top_k
        total = None
        for K in [min(V, max(max_k, n)) for n in TOP_P_CANDIDATES] + [V]:
            vals, idx = probs.topk(K, -1) if K < V else probs.sort(-1, descending=True)
            vals = self._top_k(vals)
            if total is None:
                total = torch.where(has_k, vals.sum(-1, keepdim=True), probs.sum(-1, keepdim=True))
            # Exact once the tokens top-p keeps all lie among the K candidates.
            if K == V or bool((vals.sum(-1, keepdim=True) >= self.top_p * total).all()):
                break
        before = (vals.cumsum(-1) - vals) / total  # share of the kept mass ranked above each token
        return idx.gather(1, self._draw(vals.masked_fill(before >= self.top_p, 0))[:, None])[:, 0]

    def _top_k(self, vals: Tensor) -> Tensor:
        """Zero candidates (sorted descending) ranked at or beyond each row's top_k."""
        rank = torch.arange(vals.shape[-1], device=vals.device)[None]
        return vals.masked_fill((self.top_k[:, None] > 0) & (rank >= self.top_k[:, None]), 0)

    def _draw(self, weights: Tensor) -> Tensor:
        """Inverse-CDF sampling from unnormalised weights [B, K]: one uniform number per row from the row's RNG."""
        u = torch.stack([torch.rand((), generator=g) for g in self.generators]).to(weights.device)
        cdf = weights.cumsum(-1)
        pick = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)[:, 0]
        return pick.clamp_(max=weights.shape[-1] - 1)
