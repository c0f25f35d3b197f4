"""Multi-turn rollouts with tools over the engine's continuous batch.

A row that writes a tool call stops at the call's closing marker; its calls run in a thread pool (with a timeout)
while the other rows keep decoding; the results, written as the chat template writes tool messages, are appended
and the row is added again as a continuation of everything so far (the prefix cache holds its KV, so only the new
tokens are prefilled). A turn limit and a total token limit bound each rollout. Every token is tagged: the model's
own (sampled by the engine) or inserted (tool results and template glue), which the loss leaves out.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from sputnik.engine.cache import KVCache
from sputnik.engine.sampling import SamplingParams
from sputnik.r1 import THINK_CLOSE
from sputnik.tools import parser as tp
from sputnik.tools.env import Environment, ToolResult
from sputnik.tools.render import plan_of, tool_glue

if TYPE_CHECKING:
    from sputnik.engine.generate import Engine

CALL_STOPS = {"hermes": [tp.HERMES_CLOSE], "deepseek": [tp.DS_CALLS_END], "llama3": []}


@dataclass
class AgentConfig:
    """Limits of a multi-turn rollout."""

    max_turns: int = 4  # model turns, the last one included
    max_total_tokens: int = 512  # model and inserted tokens after the prompt
    tool_timeout_s: float = 10.0
    max_result_chars: int = 1000  # a longer tool result is cut (the model reads the cut)
    workers: int = 8
    family: str = "hermes"  # the tool-call format (sputnik.tools.parser.FAMILIES)


@dataclass
class MultiTurn:
    """One rollout: the tokens after the prompt, which of them the model sampled, and what its tools did."""

    prompt: list[int]
    tokens: list[int] = field(default_factory=list)
    own: list[int] = field(default_factory=list)  # 1: sampled by the model; 0: a tool result or template glue
    logprobs: list[float] = field(default_factory=list)  # the sampler's, 0.0 on inserted tokens
    turns: list[str] = field(default_factory=list)  # the model's text, turn by turn
    calls: int = 0
    tool_errors: int = 0
    malformed: int = 0  # turns that opened a call the parser could not read
    tool_tokens: int = 0  # inserted tokens
    finish_reason: str = "stop"  # stop | length (a turn or the total budget ran out) | turns (turn limit)

    @property
    def final_text(self) -> str:
        return self.turns[-1] if self.turns else ""

    def thought_closed_before(self) -> bool:
        """Did an earlier turn close the thought (so the last turn is graded as an answer)?"""
        return any(THINK_CLOSE in t for t in self.turns[:-1])


def parse_calls(text: str, family: str) -> tuple[list[dict], bool]:
    """The tool calls in one turn's text, and whether the turn tried a call that did not parse."""
    parser = tp.make_parser(family)
    parser.push(text)
    parser.finish()
    calls = parser.tool_calls()
    opened = {"hermes": tp.HERMES_OPEN, "deepseek": tp.DS_CALL_BEGIN, "llama3": tp.PYTHON_TAG}[family]
    return calls, opened in text and len(calls) < text.count(opened)


def _run_calls(env: Environment, calls: list[dict], limit: int) -> list[ToolResult]:
    out = []
    for c in calls:
        r = env.call(c)
        out.append(ToolResult(r.content[:limit], r.error))
    return out


@dataclass
class _Row:
    rollout: MultiTurn
    env: Environment | None
    seed_index: int
    turn: int = 0
    seq: Any = None  # the engine's sequence of the current turn
    future: Future | None = None
    started: float = 0.0
    pending: int = 0  # calls of the running turn


def run_rollouts(engine: Engine, prompts: list[list[int]], params: SamplingParams, envs: list[Environment | None],
                 glue: Callable[[list[str]], str], cfg: AgentConfig | None = None,
                 seed_indices: list[int] | None = None) -> list[MultiTurn]:
    """One multi-turn rollout per prompt (repeat a prompt for a group; seed_indices keep their streams apart).

    Rows that repeat the prompt of the row before them start as one request of n samples, as `generate` samples a
    group: the prompt is prefilled once, not once per row, and the first turn's streams are the first row's
    (seed_index, sample) ones."""
    cfg = cfg or AgentConfig()
    base = replace(params, n=1, stop=list(params.stop or []) + CALL_STOPS[cfg.family])
    rows = [_Row(MultiTurn(list(p)), env, seed_indices[i] if seed_indices else i)
            for i, (p, env) in enumerate(zip(prompts, envs))]
    with ThreadPoolExecutor(max(1, cfg.workers)) as pool:
        tag = object()
        for i, n in _runs(prompts):
            _start_turn(engine, rows, i, n, tag, base, cfg)
        waiting = set()
        while engine.has_work or waiting:
            if engine.has_work:
                for d in engine.step():  # other requests may share the engine: only this call's keys are ours
                    if d.finish_reason is not None and isinstance(d.prompt, tuple) and d.prompt[0] is tag:
                        i = d.prompt[1] + d.sample
                        if _end_turn(rows[i], cfg, pool):
                            waiting.add(i)
            else:
                time.sleep(0.002)  # only tools are running
            for i in sorted(waiting):
                row = rows[i]
                late = time.monotonic() - row.started > cfg.tool_timeout_s
                if row.future.done() or late:
                    waiting.discard(i)
                    results = (row.future.result() if row.future.done() else
                               [ToolResult("error: the tool timed out", True)] * row.pending)
                    if _insert_results(row, results, glue([r.content for r in results]), engine, cfg):
                        _start_turn(engine, rows, i, 1, tag, base, cfg)
    return [r.rollout for r in rows]


def tool_rollouts(engine: Engine, prompts: list[list[int]], params: SamplingParams, envs: list[Environment],
                  cfg: AgentConfig | None = None, chat: bool = True, system: str | None = None,
                  seed_indices: list[int] | None = None) -> list[MultiTurn]:
    """Multi-turn rollouts whose tool results are written as the model's chat template writes tool messages (chat
    prompts; `<tool_response>` blocks for plain ones), in the tool-call format its template implies: one path for
    GRPO and eval."""
    tok = engine.tokenizer
    plan = plan_of(envs[0].specs(), tok) if chat and tok.chat_template else None
    cfg = replace(cfg or AgentConfig(), family=plan.family if plan else "hermes")
    return run_rollouts(engine, prompts, params, envs,
                        lambda results: tool_glue(results, tok if plan else None, plan, system), cfg, seed_indices)


def _runs(prompts: list[list[int]]) -> list[tuple[int, int]]:
    """(first row, rows) of each run of equal consecutive prompts."""
    runs: list[tuple[int, int]] = []
    for i, p in enumerate(prompts):
        if runs and prompts[runs[-1][0]] == p:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((i, 1))
    return runs


def _start_turn(engine: Engine, rows: list[_Row], i: int, n: int, tag: object, base: SamplingParams,
                cfg: AgentConfig) -> None:
    """Add the next turn of rows i .. i+n-1 (n > 1: first turns of one prompt) as one request of n samples."""
    row = rows[i]
    ro = row.rollout
    left = cfg.max_total_tokens - len(ro.tokens)
    room = engine.model.cfg.max_seq_len - len(ro.prompt) - len(ro.tokens) - 1
    params = replace(base, n=n, max_tokens=max(1, min(base.max_tokens, left, room)))
    seqs = engine.add((tag, i, row.turn), ro.prompt + ro.tokens, params, seed_index=row.seed_index + 100_003 * row.turn)
    for j, seq in enumerate(seqs):
        rows[i + j].seq = seq


def _end_turn(row: _Row, cfg: AgentConfig, pool: ThreadPoolExecutor) -> bool:
    """Record the finished turn; True when it called tools (now running), False when the rollout is over."""
    ro, seq = row.rollout, row.seq
    ro.tokens += seq.token_ids
    ro.own += [1] * len(seq.token_ids)
    ro.logprobs += seq.logprobs
    text = engine_decode(seq)
    ro.turns.append(text)
    row.turn += 1
    calls, malformed = parse_calls(text, cfg.family) if row.env is not None else ([], False)
    ro.malformed += int(malformed)
    if seq.finish_reason == "length" or not calls:
        ro.finish_reason = seq.finish_reason if seq.finish_reason != "abort" else "stop"
        return False
    if row.turn >= cfg.max_turns:
        ro.finish_reason = "turns"
        return False
    ro.calls += len(calls)
    row.pending = len(calls)
    row.future = pool.submit(_run_calls, row.env, calls, cfg.max_result_chars)
    row.started = time.monotonic()
    return True


def engine_decode(seq) -> str:
    """A turn's whole text, the call's closing marker included (the engine cuts a stop string from seq.text)."""
    return seq.text + (seq.stop_reason if isinstance(seq.stop_reason, str) else "")


def _insert_results(row: _Row, results: list[ToolResult], text: str, engine: Engine, cfg: AgentConfig) -> bool:
    """Append the tool results; False when they leave no room for another turn."""
    ro = row.rollout
    ro.tool_errors += sum(r.error for r in results)
    ids = engine.tokenizer.encode(text, add_special_tokens=False)
    if ids and ro.own and ro.own[-1] and ro.tokens[-1] == ids[0] and ids[0] in engine.tokenizer.stop_ids:
        ids = ids[1:]  # a call the model ended with its own end-of-turn token (not a stop string): the glue's is spare
    room = min(cfg.max_total_tokens - len(ro.tokens), engine.model.cfg.max_seq_len - len(ro.prompt) - len(ro.tokens))
    if len(ids) + 1 >= room:
        ro.finish_reason = "length"
        return False
    ro.tokens += ids
    ro.own += [0] * len(ids)
    ro.logprobs += [0.0] * len(ids)
    ro.tool_tokens += len(ids)
    return True


# A row resumes after its tools from the prefix cache in whole prefill blocks (engine/generate.py); smaller blocks than
# a prompt's leave less of each resumed conversation to prefill again.
RESUME_BLOCK = 16


def chat_engine(model, tok, kv_dtype=None, compile: bool = False) -> Engine:
    """The engine of one conversation (`sputnik chat`): its KV kept in a prefix cache with room for the model's
    context, so a turn prefills what is new since the last (from the last whole prefill block), not the whole
    conversation again. The engine's 64-token blocks, not RESUME_BLOCK's 16: a turn's new ~200 tokens prefill faster
    in fewer, larger blocks than the smaller blocks' extra ~16 cached tokens a turn save (docs/benchmarks.md)."""
    from sputnik.engine.generate import Engine

    return Engine(model, tok, compile=compile, kv_dtype=kv_dtype,
                  prefix_cache_mb=prefix_cache_mb(model, 1, model.cfg.max_seq_len, kv_dtype))


def prefix_cache_mb(model, rows: int, tokens: int, kv_dtype=None) -> float:
    """A prefix cache (MB) that holds rows x tokens of the model's KV (in kv_dtype, default the model's): for a
    batch of rollouts every row's, prompt included (a row resumes after its tools from its KV there, and a smaller LRU
    evicts rows before they resume, so each miss prefills the whole rollout again); for `sputnik chat` one
    conversation."""
    cache = KVCache(model.cfg, 1, 1, kv_dtype or model.dtype, model.device)
    return rows * tokens * cache.nbytes_per_token() / 2**20
