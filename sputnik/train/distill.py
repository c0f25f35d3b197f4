"""Distillation (R1's last stage): a teacher's reasoning traces, rejection-sampled, taught to a student.

Traces come from a sputnik model through the engine, or from any OpenAI-compatible endpoint (its
`reasoning_content` folded back in as <think>…</think>). Every trace carries the verdict of every filter: the task's
verifier, the <think> format, the chain of thought's language; `rejection_sample` keeps those the config asks for
(at most k per problem) as SFT rows in the cold-start format `sputnik.train.sft` reads.

The student then learns the rows either as text (mode "sft": any tokenizer), or, when it shares the teacher's
tokenizer, by matching the teacher's whole next-token distribution on the completion tokens (mode "kl": forward
KL(teacher ‖ student), logit-level distillation).
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

from sputnik.checkpoint.registry import DEFAULT_MODEL
from sputnik.device import pick_device
from sputnik.engine import Engine, SamplingParams
from sputnik.engine.native import auto_cache_dtype
from sputnik.eval.run import EvalConfig, prompt_ids
from sputnik.model import build_doc_mask
from sputnik.r1 import TEMPERATURE, THINK_CLOSE, THINK_OPEN, TOP_P
from sputnik.rewards import SCRIPTS, format_reward, language_reward
from sputnik.seeds import mix
from sputnik.settings import option
from sputnik.tasks import TEMPLATES, Problem, Task, get_task
from sputnik.train.loop import TrainConfig, barrier, init_distributed
from sputnik.train.sft import IGNORE, SFTConfig, SFTObjective, fold_reasoning, train_sft

MODES = ("sft", "kl")


@dataclass
class DistillConfig:
    """Where traces come from, how they are sampled, and which of them the student learns from."""

    student: str = option(DEFAULT_MODEL, "the model to train", aliases=["--model", "-s"])
    mode: str = option("sft", "sft: learn the accepted traces' text; kl: match the teacher's logits (same tokenizer)",
                       choices=list(MODES))
    teacher: str | None = option(None, "a sputnik model: registry name, HF folder or .gguf (or give teacher_url)")
    teacher_url: str | None = option(None, "an OpenAI-compatible base URL, e.g. http://host:8000/v1")
    teacher_key: str | None = option(None, "its API key (default: $OPENAI_API_KEY)")
    teacher_model: str | None = option(None, "the model id at teacher_url (default: the first it lists)")
    task: str = option("arithmetic", "a task spec, as get_task reads it")
    split: str = option("train", "the task's split the problems come from", choices=["train", "test"])
    n_problems: int = option(100, "problems to sample traces for")
    samples_per_problem: int = option(4, "traces sampled per problem")
    temperature: float = option(TEMPERATURE, "sampling temperature of the teacher (R1's)")
    top_p: float = option(TOP_P, "nucleus sampling of the teacher (R1's)")
    max_tokens: int = option(1024, "tokens per trace")
    template: str = option("chat", "how a problem becomes a prompt", choices=list(TEMPLATES))
    system: str | None = option(None, "system message of the chat template")
    suffix: str | None = option(None, "text after the problem (default: the task's format instruction)")
    require_correct: bool = option(True, "the task's verifier must call the answer right")
    require_format: bool = option(True, "a non-empty <think>…</think> block, then an answer")
    language: str | None = option(None, "en or ko: the chain of thought must be written in it")
    min_language_score: float = option(0.95, "least share of the chain of thought's words in `language`")
    max_per_problem: int = option(0, "keep at most this many accepted traces per problem (0: all)")
    out_jsonl: str | None = option(None, "where the SFT rows go (default: out_dir/distill.jsonl)")
    kl_temperature: float = option(1.0, 'tau of mode "kl": both distributions softened by it, the loss times tau^2')
    seed: int = option(0, "random seed of the sampling")
    batch: int = option(64, "sequences per engine batch")
    concurrency: int = option(8, "requests in flight to teacher_url")
    device: str = option("auto", "where a local teacher (and the student) run: cpu, cuda, … (auto: cuda when there)")

    def __post_init__(self) -> None:
        if self.template not in TEMPLATES:
            raise ValueError(f"template must be one of {TEMPLATES}, got {self.template!r}")
        if self.language is not None and self.language not in SCRIPTS:
            raise ValueError(f"language must be one of {tuple(SCRIPTS)} or None, got {self.language!r}")
        if self.samples_per_problem < 1 or self.n_problems < 1:
            raise ValueError("n_problems and samples_per_problem must be >= 1")
        if self.kl_temperature <= 0:
            raise ValueError(f"kl_temperature must be > 0, got {self.kl_temperature}")


# ---------------------------------------------------------------- traces


def split_think(completion: str) -> tuple[str | None, str]:
    """(reasoning, answer) of "<think>reasoning</think>answer", both stripped.

    reasoning is None when the text does not open with <think>; a thought cut off before </think> has no answer."""
    text = completion.strip()
    if not text.startswith(THINK_OPEN):
        return None, text
    reasoning, closed, answer = text[len(THINK_OPEN):].partition(THINK_CLOSE)
    return reasoning.strip(), answer.strip() if closed else ""


def judge(task: Task, problem: Problem, completion: str) -> dict[str, Any]:
    """Every filter's verdict on one completion (the whole assistant text, <think> included).

    correct: the task's verifier (None when the gold answer cannot be verified); format: R1's <think> format;
    language: the chain of thought's share of words in each language we know, so any language can filter later."""
    # Not rewards.combine: it stops at an unverifiable gold answer, and these verdicts are wanted for every trace.
    return {
        "correct": task.correct(problem, completion),
        "format": format_reward(problem, completion, task) >= 1.0,
        "language": {lang: language_reward(problem, completion, task, language=lang) for lang in SCRIPTS},
    }


def _messages(task: Task, problem: Problem, cfg: DistillConfig) -> list[dict[str, str]]:
    """The prompt as chat messages: the SFT row's user turn, and what an endpoint is sent."""
    rendered = task.render(problem, cfg.template, None, cfg.system, cfg.suffix)
    if isinstance(rendered, str):  # r1-zero / plain: the whole text is the user's turn
        return [{"role": "user", "content": rendered}]
    return rendered


def _eval_cfg(cfg: DistillConfig) -> EvalConfig:
    return EvalConfig(task=cfg.task, template=cfg.template, system=cfg.system, suffix=cfg.suffix)


def load_teacher(cfg: DistillConfig, dtype: torch.dtype = torch.float32, quantize: str = "auto") -> Engine:
    """An engine over the local teacher model, loaded as chat and serve load it (quantize "auto": a GGUF teacher's
    blocks multiplied as they are on the CPU, the KV cache float16 under them). KL distillation passes "none": its
    teacher scores whole packed rows in `dtype`."""
    from sputnik.checkpoint import load_pretrained

    model, tok = load_pretrained(cfg.teacher, dtype=dtype, device=pick_device(cfg.device), quantize=quantize)
    return Engine(model, tok, max_batch=cfg.batch, kv_dtype=auto_cache_dtype(model))


def _engine_samples(engine: Engine, task: Task, problems: list[Problem], cfg: DistillConfig,
                    progress: bool) -> list[list[tuple[str, str]]]:
    """(completion, finish reason) samples per problem; a completion whose prompt opened <think> gets it back."""
    prompts = [prompt_ids(task, p, engine.tokenizer, _eval_cfg(cfg)) for p in problems]
    per_batch = max(1, cfg.batch // cfg.samples_per_problem)
    out: list[list[tuple[str, str]]] = []
    bar = tqdm(total=len(problems), desc="teacher", unit="problem", disable=not progress)
    for s in range(0, len(problems), per_batch):
        chunk = prompts[s : s + per_batch]
        # A seed per batch: the engine's streams depend on the index within a batch, which repeats across batches.
        params = SamplingParams(max_tokens=cfg.max_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                                n=cfg.samples_per_problem, seed=mix(cfg.seed, s, bits=31))
        for (_, opened), comps in zip(chunk, engine.generate([ids for ids, _ in chunk], params)):
            # The student learns the whole assistant turn, so the <think> the template wrote goes back in front.
            out.append([(THINK_OPEN + "\n" + c.text.lstrip("\n") if opened else c.text, c.finish_reason)
                        for c in comps])
        bar.update(len(chunk))
    bar.close()
    return out


def _fold_message(message: Any) -> str:
    """An endpoint's message as one text: its reasoning field (reasoning_content, reasoning) as <think>…</think>
    before the content, as the SFT data format folds it."""
    fields = {**(message.model_extra or {}), "content": message.content or ""}
    return fold_reasoning(fields)["content"]


def _http_samples(messages: list[list[dict]], cfg: DistillConfig, progress: bool) -> list[list[tuple[str, str]]]:
    """(completion, finish reason) samples per prompt from an OpenAI-compatible endpoint, several prompts at once."""
    import openai

    key = cfg.teacher_key or os.environ.get("OPENAI_API_KEY") or "none"
    client = openai.OpenAI(base_url=cfg.teacher_url, api_key=key)
    model = cfg.teacher_model or client.models.list().data[0].id
    bar = tqdm(total=len(messages), desc="teacher", unit="problem", disable=not progress)

    def ask(index: int) -> list[tuple[str, str]]:
        got: list[tuple[str, str]] = []
        attempt = 0
        # Some endpoints return fewer choices than n (or ignore n): ask again for the rest.
        while len(got) < cfg.samples_per_problem:
            reply = client.chat.completions.create(
                model=model, messages=messages[index], n=cfg.samples_per_problem - len(got),
                temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_tokens,
                seed=mix(cfg.seed, index * 8191, attempt, bits=31))
            if not reply.choices:
                raise RuntimeError(f"{cfg.teacher_url}: a reply without choices for prompt {index}")
            got += [(_fold_message(c.message), c.finish_reason or "stop") for c in reply.choices]
            attempt += 1
        bar.update(1)
        return got[: cfg.samples_per_problem]

    with ThreadPoolExecutor(max(1, cfg.concurrency)) as pool:
        out = list(pool.map(ask, range(len(messages))))
    bar.close()
    return out


def generate_traces(cfg: DistillConfig, engine: Engine | None = None, progress: bool = True) -> list[dict]:
    """samples_per_problem traces for each of n_problems problems of the task, from the teacher.

    Each trace: problem_id, sample, prompt (chat messages), completion (the whole assistant text), reasoning,
    answer, gold, finish_reason and verdicts (see `judge`). `engine` may hold the local teacher already loaded."""
    if (cfg.teacher is None) == (cfg.teacher_url is None) and engine is None:
        raise ValueError("give exactly one teacher: a local model (teacher) or an endpoint (teacher_url)")
    task = get_task(cfg.task)
    problems = task.problems(cfg.split, cfg.n_problems, seed=cfg.seed)
    if not problems:
        raise ValueError(f"task {cfg.task!r} has no {cfg.split} problems")
    messages = [_messages(task, p, cfg) for p in problems]
    if engine is None and cfg.teacher_url is not None:
        samples = _http_samples(messages, cfg, progress)
    else:
        samples = _engine_samples(engine or load_teacher(cfg), task, problems, cfg, progress)
    traces = []
    for problem, prompt, comps in zip(problems, messages, samples):
        for j, (completion, finish) in enumerate(comps):
            reasoning, answer = split_think(completion)
            traces.append({"problem_id": problem.id, "sample": j, "prompt": prompt, "completion": completion,
                           "reasoning": reasoning, "answer": answer, "gold": problem.answer,
                           "finish_reason": finish, "verdicts": judge(task, problem, completion)})
    return traces


# ---------------------------------------------------------------- rejection sampling


def failed_filters(trace: dict, cfg: DistillConfig) -> list[str]:
    """The filters (of those cfg turns on) that reject the trace; [] when it is accepted."""
    verdicts = trace["verdicts"]
    failed = []
    if cfg.require_correct and verdicts["correct"] is not True:  # None (unverifiable) is no proof of right
        failed.append("correct")
    if cfg.require_format and not verdicts["format"]:
        failed.append("format")
    if cfg.language is not None and verdicts["language"][cfg.language] < cfg.min_language_score:
        failed.append("language")
    if not trace["answer"] and not trace["reasoning"]:  # nothing to learn, and load_chat_jsonl would refuse it
        failed.append("empty")
    return failed


def sft_row(trace: dict) -> dict:
    """The trace as a cold-start SFT row: the prompt, then the answer with its reasoning as reasoning_content."""
    reasoning, answer = trace["reasoning"], trace["answer"]
    if reasoning is not None and THINK_OPEN not in answer and THINK_CLOSE not in answer:
        assistant = {"role": "assistant", "content": answer, "reasoning_content": reasoning}
    else:  # no think block, or a malformed one (kept when require_format is off): the text as the teacher wrote it
        assistant = {"role": "assistant", "content": trace["completion"].strip()}
    return {"messages": [*trace["prompt"], assistant]}


def acceptance(traces: list[dict], cfg: DistillConfig) -> tuple[list[dict], dict[str, Any]]:
    """The accepted traces (in order, at most max_per_problem per problem) and the statistics by filter.

    A trace failing several filters counts under each; "max_per_problem" counts accepted traces over the cap."""
    rejected = {"correct": 0, "format": 0, "language": 0, "empty": 0, "max_per_problem": 0}
    kept, per_problem = [], Counter()
    for trace in traces:
        failed = failed_filters(trace, cfg)
        for name in failed:
            rejected[name] += 1
        if failed:
            continue
        if cfg.max_per_problem and per_problem[trace["problem_id"]] >= cfg.max_per_problem:
            rejected["max_per_problem"] += 1
            continue
        per_problem[trace["problem_id"]] += 1
        kept.append(trace)
    stats = {"traces": len(traces), "accepted": len(kept),
             "acceptance_rate": len(kept) / len(traces) if traces else 0.0,
             "problems": len({t["problem_id"] for t in traces}), "problems_accepted": len(per_problem),
             "rejected_by": rejected}
    return kept, stats


def format_stats(stats: dict[str, Any]) -> str:
    rejected = ", ".join(f"{k} {v}" for k, v in stats["rejected_by"].items() if v) or "none"
    return (f"distill: {stats['accepted']}/{stats['traces']} traces accepted ({stats['acceptance_rate']:.1%}), "
            f"{stats['problems_accepted']}/{stats['problems']} problems kept; rejected by: {rejected}")


def write_jsonl(rows: list[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def rejection_sample(traces: list[dict], cfg: DistillConfig) -> list[dict]:
    """The accepted traces as SFT rows, written to cfg.out_jsonl when set; prints the acceptance statistics
    (`acceptance` returns them)."""
    kept, stats = acceptance(traces, cfg)
    rows = [sft_row(t) for t in kept]
    if cfg.out_jsonl:
        write_jsonl(rows, cfg.out_jsonl)
    print(format_stats(stats))
    return rows


# ---------------------------------------------------------------- logit-level KL


def forward_kl(teacher_logits: Tensor, student_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """sum over rows of KL(softmax(teacher / tau) ‖ softmax(student / tau)) * tau^2, in fp32.

    The tau^2 keeps the gradient's scale independent of tau (Hinton et al. 2015)."""
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    return F.kl_div(s, t, reduction="sum", log_target=True) * temperature**2


def _kl_chunk(student: nn.Module, teacher: nn.Module, hs: Tensor, ht: Tensor, temperature: float) -> Tensor:
    with torch.no_grad():
        teacher_logits = teacher.lm_head(teacher.model.norm(ht))
    return forward_kl(teacher_logits, student.lm_head(student.model.norm(hs)), temperature)


def masked_kl_sum(student: nn.Module, teacher: nn.Module, hs: Tensor, ht: Tensor, targets: Tensor,
                  temperature: float = 1.0, chunk: int = 1024) -> Tensor:
    """Forward KL summed over the trained positions (targets != IGNORE), from both models' hidden states.

    Only those positions reach the heads, `chunk` at a time and recomputed in backward, so
    neither model's fp32 logits [tokens, vocab] exist at once (the checkpoint keeps hidden states, not logits)."""
    sel = targets != IGNORE
    hs_sel, ht_sel = hs[sel], ht[sel]
    total = hs.float().sum() * 0.0  # no targets: a zero that still reaches every parameter
    recompute = torch.is_grad_enabled() and hs.requires_grad
    for c in range(0, len(hs_sel), chunk):
        args = (student, teacher, hs_sel[c : c + chunk], ht_sel[c : c + chunk], temperature)
        total = total + (checkpoint(_kl_chunk, *args, use_reentrant=False) if recompute else _kl_chunk(*args))
    return total


def check_shared_vocab(teacher: nn.Module, teacher_tok, student: nn.Module, student_tok) -> None:
    """ValueError unless teacher and student give logits over the same token ids: KL compares them id by id."""
    hint = "logit-level KL needs one shared tokenizer; distill with mode='sft' (learning the traces' text) instead"
    t_size, s_size = teacher.cfg.vocab_size, student.cfg.vocab_size
    if t_size != s_size:
        raise ValueError(f"teacher and student vocabularies differ: the teacher's head has {t_size} logits, "
                         f"the student's {s_size}; {hint}")
    t_vocab = teacher_tok.backend.get_vocab(with_added_tokens=True)
    s_vocab = student_tok.backend.get_vocab(with_added_tokens=True)
    if t_vocab != s_vocab:
        t_ids, s_ids = {i: t for t, i in t_vocab.items()}, {i: t for t, i in s_vocab.items()}
        first = min(i for i in set(t_ids) | set(s_ids) if t_ids.get(i) != s_ids.get(i))
        raise ValueError(f"teacher and student vocabularies differ: {len(t_vocab)} vs {len(s_vocab)} tokens, and "
                         f"id {first} is {t_ids.get(first)!r} for the teacher but {s_ids.get(first)!r} for the "
                         f"student; {hint}")


class KLDistillObjective(SFTObjective):
    """SFT's packed rows and order, with the loss: forward KL(teacher ‖ student) summed over completion tokens / the
    step's global completion-token count. The teacher runs in eval mode under no_grad."""

    def __init__(self, student: nn.Module, teacher: nn.Module, tokenizer, cfg: SFTConfig, temperature: float = 1.0,
                 teacher_tokenizer=None):
        check_shared_vocab(teacher, teacher_tokenizer or tokenizer, student, tokenizer)
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        super().__init__(tokenizer, cfg)
        self.teacher, self.temperature = teacher.eval(), temperature
        for p in self.teacher.parameters():
            p.requires_grad_(False)

    def loss(self, model: nn.Module, micro: dict) -> tuple[Tensor, dict[str, float]]:
        device = next(model.parameters()).device
        if self.teacher.device != device:  # the trainer may have moved the student (torchrun on GPUs)
            self.teacher.to(device)
        tokens, positions, doc_ids, targets = (micro[k].to(device) for k in ("tokens", "positions", "doc_ids",
                                                                              "targets"))
        mask = build_doc_mask(doc_ids)
        with torch.no_grad():
            ht = self.teacher.hidden(tokens, positions, mask=mask)
        # (FSDP: the root keeps the final norm and head gathered after hidden(), for the loss; see loop._shard)
        hs = model.hidden(tokens, positions, mask=mask)
        kl = masked_kl_sum(model, self.teacher, hs, ht, targets, self.temperature)
        return kl / micro["num_items"], {}

    def state_dict(self) -> dict:
        return {**super().state_dict(), "temperature": self.temperature}


def train_kl(student: nn.Module, teacher: nn.Module, tokenizer, cfg: SFTConfig, train: TrainConfig,
             temperature: float = 1.0, teacher_tokenizer=None) -> dict[str, Any]:
    """Distil the teacher's distributions on cfg.data into the student: train_sft's run with the KL objective.

    Writes out_dir/metrics.jsonl, checkpoints/ and summary.json as train_sft does; returns the summary."""
    return train_sft(student, tokenizer, cfg, train,
                     objective_factory=lambda: KLDistillObjective(student, teacher, tokenizer, cfg, temperature,
                                                                  teacher_tokenizer),
                     extra={"kl_temperature": temperature})


# ---------------------------------------------------------------- the stage


def distill(cfg: DistillConfig, student_model_name: str, sft_cfg: SFTConfig, train_cfg: TrainConfig,
            mode: str = "sft", progress: bool = True) -> dict[str, Any]:
    """Teacher traces -> rejection sampling -> JSONL -> the student trained on it by SFT or by logit-level KL.

    Writes out_dir/traces.jsonl (every trace with its verdicts), cfg.out_jsonl (default out_dir/distill.jsonl),
    the training's metrics and checkpoints, and summary.json (acceptance statistics, final loss); returns it."""
    from sputnik.checkpoint import load_pretrained

    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if (cfg.teacher is None) == (cfg.teacher_url is None):
        raise ValueError("give exactly one teacher: a local model (teacher) or an endpoint (teacher_url)")
    if mode == "kl" and cfg.teacher is None:
        raise ValueError("mode 'kl' needs the teacher's logits: give a local teacher model, not only teacher_url")
    start = time.perf_counter()
    out = Path(train_cfg.out_dir)
    cfg = replace(cfg, out_jsonl=cfg.out_jsonl or str(out / "distill.jsonl"))
    device = pick_device(cfg.device)
    dtype = torch.bfloat16 if train_cfg.dtype == "bfloat16" else torch.float32
    student, student_tok = load_pretrained(student_model_name, device=device)
    engine = None
    if cfg.teacher is not None:
        engine = load_teacher(cfg, dtype, quantize="auto" if mode == "sft" else "none")
        if mode == "kl":  # before spending time on traces
            check_shared_vocab(engine.model, engine.tokenizer, student, student_tok)

    # Only rank 0 asks the teacher and writes the data; every rank then trains on the file.
    rank, _ = init_distributed()
    stats: dict[str, Any] = {}
    if rank == 0:
        traces = generate_traces(cfg, engine, progress=progress)
        write_jsonl(traces, out / "traces.jsonl")
        rows = rejection_sample(traces, cfg)
        stats = acceptance(traces, cfg)[1]
        if not rows:
            raise RuntimeError(f"no trace passed the filters ({format_stats(stats)}): sample more, or relax "
                               "require_correct / require_format / language")
    barrier()
    sft_cfg = replace(sft_cfg, data=cfg.out_jsonl)
    generation_minutes = (time.perf_counter() - start) / 60
    if mode == "sft":
        if engine is not None:
            del engine  # the teacher is not needed for SFT: free its memory before training
        trained = train_sft(student, student_tok, sft_cfg, train_cfg)
    else:
        trained = train_kl(student, engine.model, student_tok, sft_cfg, train_cfg, cfg.kl_temperature,
                           teacher_tokenizer=engine.tokenizer)
    final = trained.get("loss_last")
    summary = {"mode": mode, "teacher": cfg.teacher or cfg.teacher_url, "student": student_model_name,
               "task": cfg.task, "data": cfg.out_jsonl, "acceptance": stats, "final_loss": final,
               "loss_first": trained.get("loss_first"), "train": trained,
               "generation_minutes": round(generation_minutes, 2), "config": asdict(cfg)}
    summary["config"].pop("teacher_key", None)  # never write a secret to disk
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    return summary
