"""The nano R1 pipeline: from nothing to a reasoning model on a laptop CPU, every stage of the R1 recipe.

tokenizer (trained on synthetic arithmetic text) -> pretrain a tiny MLA + MoE + MTP model on that text -> cold-start
SFT on programmatic <think> traces -> GRPO on the task's verifiable reward -> pass@1 of SFT and GRPO on held-out
problems. Everything is generated in code; `make nano-r1` runs it and writes docs/nano-r1.json and plots.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sputnik.r1 import direct_reply
from sputnik.settings import option
from sputnik.tasks import Task, get_task
from sputnik.tasks.base import Problem

if TYPE_CHECKING:
    from sputnik.train.grpo import GRPOSummary


@dataclass
class NanoR1Config:
    """Sizes and steps of each stage (the defaults are the run docs/nano-r1.json records, its minutes included)."""

    out_dir: str = option("runs/nano-r1", "folder for every stage's output and summary.json")
    task: str = option("arithmetic:digits=1-3,test_digits=3", "the task: operands of 1-3 digits to train on, held-out "
                       "problems of 3-digit operands, the hardest size (any arithmetic spec works)")
    seed: int = option(0, "random seed")
    corpus_problems: int = option(6000, "train-split problems written as pretraining text (three documents each)")
    vocab_size: int = option(512, "tokenizer vocabulary")
    dim: int = option(128, "model width")
    n_layers: int = option(4, "transformer blocks")
    n_heads: int = option(4, "attention heads")
    pretrain_steps: int = option(2000, "pretraining steps")
    pretrain_lr: float = option(3e-3, "pretraining learning rate")
    sft_problems: int = option(400, "worked problems for SFT")
    sft_steps: int = option(80, "SFT steps: a short cold start (greedy 0.44 held-out; 150 steps gave 0.82 and left "
                                "GRPO little to add, 40 gave 0.14 and GRPO nothing to reinforce)")
    sft_lr: float = option(1e-3, "SFT learning rate")
    grpo_steps: int = option(60, "GRPO steps")
    grpo_lr: float = option(5e-5, "GRPO learning rate (from the 80-step cold start, 60 steps: 5e-5 took greedy "
                                  "0.44 -> 0.75, 2e-4 only -> 0.56)")
    max_completion_length: int = option(160, "tokens per GRPO rollout and per evaluated completion")
    eval_n: int = option(100, "held-out problems per evaluation")
    eval_k: int = option(2, "samples per problem for pass@1 and cons@k")
    report: str | None = option(None, "a JSON file whose nano-r1 entry gets the figures, e.g. docs/reasoning.json")
    direct: bool = option(True, "also run the direct-answer control from the same pretrained model: SFT on bare "
                                "answers, GRPO with the thinking closed in the prompt, the same steps")


def corpus(task: Task, problems: list[Problem], rng: random.Random) -> list[str]:
    """Pretraining documents: each train-split problem as a question with its result, its worked solution
    (tasks.traces), and a bare equation (held-out problems never appear)."""
    docs = []
    for p in problems:
        reasoning, answer = task.trace(p)
        equation = f"{p.meta['a']} {p.meta['op']} {p.meta['b']} = {p.answer}"
        docs += [f"{p.prompt} {equation}.", f"{p.prompt}\n{reasoning}\nThe answer is {answer}.", equation]
    rng.shuffle(docs)
    return docs


@dataclass
class NanoR1Summary:
    """What the pipeline measured (out_dir/summary.json); `figure()` is the part docs/nano-r1.json shows."""

    sft: dict[str, float]  # held-out figures of the SFT checkpoint (pass@1, pass@k, cons@k, greedy accuracy, ...)
    grpo: dict[str, float]  # the same for the GRPO checkpoint
    closed: dict[str, float]  # the GRPO checkpoint with its thinking closed in the prompt (empty: not run)
    direct: dict[str, float]  # the direct-answer control after its GRPO (empty: not run)
    minutes: float
    stage_minutes: dict[str, float]
    task: str
    params: int
    active_params: int
    pretrain_mfu: float
    grpo_reward: dict[str, float]  # GRPO's own greedy eval after training (empty: GRPO ran without one)
    config: dict[str, Any]  # the NanoR1Config

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def figure(self) -> dict[str, Any]:
        return {"sft": self.sft, "grpo": self.grpo, "closed": self.closed, "direct": self.direct,
                "minutes": self.minutes, "task": self.task,
                "eval_problems": self.config["eval_n"], "k": self.config["eval_k"]}


@contextmanager
def lap(name: str, minutes: dict[str, float]) -> Iterator[None]:
    """Time a stage into minutes[name] and print it."""
    t = time.perf_counter()
    yield
    minutes[name] = round((time.perf_counter() - t) / 60, 2)
    print(f"[nano-r1] {name}: {minutes[name]:.2f} min", flush=True)


def tokenizer_stage(cfg: NanoR1Config, task: Task, problems: list[Problem], docs: list[str], out: Path):
    """A BPE tokenizer trained on the same text the model will read (questions, columns, the suffix, the chat
    format), saved to out/tokenizer."""
    from sputnik.train.tokenizer import TokenizerConfig, save_tokenizer, train_tokenizer

    tok_cfg = TokenizerConfig(vocab_size=cfg.vocab_size, fetch_korean_sample=False)
    tok = train_tokenizer(docs + [p.prompt + task.chat_suffix for p in problems[:200]], tok_cfg)
    save_tokenizer(tok, out / "tokenizer", tok_cfg)
    return tok


def pretrain_stage(cfg: NanoR1Config, tok, docs: list[str], out: Path) -> dict[str, Any]:
    """A tiny MLA + MoE + MTP model pretrained on the synthetic text; returns train_pretrain's summary."""
    from sputnik.train.data import write_shards
    from sputnik.train.loop import TrainConfig
    from sputnik.train.pretrain import PretrainConfig, nano_config, train_pretrain

    write_shards((tok.encode(d) for d in docs), out / "shards", tok.vocab_size, tok.eos_id)
    model_cfg = nano_config(tok.vocab_size, "moe", cfg.dim, cfg.n_layers, cfg.n_heads, max_seq_len=512,
                            bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    return train_pretrain(model_cfg, PretrainConfig(data=str(out / "shards"), seq_len=128, batch_size=16,
                                                    micro_batch=16),
                          TrainConfig(out_dir=str(out / "pretrain"), max_steps=cfg.pretrain_steps, lr=cfg.pretrain_lr,
                                      schedule="cosine", warmup_steps=20, min_lr_ratio=0.1, weight_decay=0.1,
                                      seed=cfg.seed, plot_every=50), tokenizer=tok)


def sft_stage(cfg: NanoR1Config, task: Task, problems: list[Problem], pretrained: str, out: Path,
              direct: bool = False) -> Path:
    """Cold-start SFT of the pretrained model on programmatic <think> traces (direct: on bare answers after an
    empty thought, as a closed-thinking prompt asks for them); returns the last checkpoint."""
    from sputnik.checkpoint import load_pretrained
    from sputnik.train.loop import TrainConfig
    from sputnik.train.sft import SFTConfig, train_sft

    rows = []
    for p in problems[: cfg.sft_problems]:
        reasoning, answer = task.trace(p)
        reply = ({"content": direct_reply(answer)} if direct else
                 {"content": answer, "reasoning_content": reasoning})
        rows.append({"messages": [{"role": "user", "content": p.prompt + task.chat_suffix},
                                  {"role": "assistant", **reply}]})
    name = "sft-direct" if direct else "sft"
    data = out / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    model, tok = load_pretrained(pretrained)
    train_sft(model, tok, SFTConfig(data=str(data), seq_len=256, batch_size=16, micro_batch=16, seed=cfg.seed),
              TrainConfig(out_dir=str(out / name), max_steps=cfg.sft_steps, lr=cfg.sft_lr, warmup_steps=5,
                          seed=cfg.seed, plot_every=20))
    return out / name / "checkpoints" / f"step_{cfg.sft_steps:06d}"


def grpo_stage(cfg: NanoR1Config, sft_ckpt: Path, out: Path, think: str = "auto") -> tuple[GRPOSummary, Path]:
    """GRPO from the SFT checkpoint on format + accuracy (strict grading), or, with think="closed", on accuracy
    alone with the thinking closed in every prompt (the direct-answer control); returns its summary and last
    checkpoint."""
    from sputnik.train.grpo import GRPOConfig, train_grpo
    from sputnik.train.loop import TrainConfig

    name = "grpo-direct" if think == "closed" else "grpo"
    rewards = {"accuracy": 1.0} if think == "closed" else {"accuracy": 1.0, "format": 0.1}
    grpo = train_grpo(str(sft_ckpt), GRPOConfig(task=cfg.task, template="chat", think=think, prompts_per_step=8,
                                                 num_generations=8, max_completion_length=cfg.max_completion_length,
                                                 temperature=1.0, loss_type="dapo", epsilon_high=0.28,
                                                 rewards=rewards, micro_batch_size=32, eval_every=0, eval_n=0),
                      TrainConfig(out_dir=str(out / name), max_steps=cfg.grpo_steps, lr=cfg.grpo_lr,
                                  warmup_steps=3, seed=cfg.seed, plot_every=10))
    return grpo, out / name / "checkpoints" / f"step_{cfg.grpo_steps:06d}"


FIGURES = ("pass@1", "greedy_accuracy", "greedy_accuracy_lenient", "greedy_format_rate", "format_rate", "mean_length",
           "think_tokens", "greedy_think_tokens")


def eval_stage(cfg: NanoR1Config, ckpt: Path, out: Path, think: str = "auto") -> dict[str, float]:
    """pass@1 (mean over k samples at R1's T 0.6), pass@k, cons@k, greedy accuracy (strict grading), format, length
    and thinking tokens of a checkpoint on the held-out problems; the full report goes to out."""
    from sputnik.checkpoint import load_pretrained
    from sputnik.eval.run import EvalConfig, evaluate

    ev = EvalConfig(task=cfg.task, n=cfg.eval_n, k=cfg.eval_k, max_tokens=cfg.max_completion_length, seed=cfg.seed,
                    think=think)
    model, tok = load_pretrained(ckpt)
    s = evaluate(model, tok, ev, out_dir=out, progress=False).to_json()
    keys = (*FIGURES, f"pass@{cfg.eval_k}", f"cons@{cfg.eval_k}")
    return {k: s[k] for k in keys if s.get(k) is not None}


def run(cfg: NanoR1Config) -> NanoR1Summary:
    """Every stage in turn, in cfg.out_dir (emptied first); writes summary.json, nano-r1.json and a plot per
    training stage there."""
    import torch

    from sputnik.train.plots import plot_metrics

    start = time.perf_counter()
    out = Path(cfg.out_dir)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    rng = random.Random(cfg.seed)
    torch.manual_seed(cfg.seed)
    task = get_task(cfg.task)
    minutes: dict[str, float] = {}
    with lap("tokenizer", minutes):
        train_problems = task.problems("train", cfg.corpus_problems, seed=cfg.seed)
        docs = corpus(task, train_problems, rng)
        tok = tokenizer_stage(cfg, task, train_problems, docs, out)
    with lap("pretrain", minutes):
        pre = pretrain_stage(cfg, tok, docs, out)
    with lap("sft", minutes):
        sft_ckpt = sft_stage(cfg, task, train_problems, pre["checkpoint"], out)
    with lap("grpo", minutes):
        grpo, grpo_ckpt = grpo_stage(cfg, sft_ckpt, out)
    runs = [("sft", sft_ckpt, "auto"), ("grpo", grpo_ckpt, "auto"), ("closed", grpo_ckpt, "closed")]
    if cfg.direct:
        with lap("direct", minutes):  # the control: the same pretrained model and budget, answering directly
            direct_sft = sft_stage(cfg, task, train_problems, pre["checkpoint"], out, direct=True)
            _, direct_ckpt = grpo_stage(cfg, direct_sft, out, think="closed")
        runs.append(("direct", direct_ckpt, "closed"))
    with lap("eval", minutes):  # the same held-out problems for every checkpoint
        results = {name: eval_stage(cfg, ckpt, out / f"eval-{name}", think) for name, ckpt, think in runs}
    for stage in ("pretrain", "sft", "grpo", "sft-direct", "grpo-direct"):
        if (out / stage / "metrics.jsonl").exists():
            plot_metrics(out / stage / "metrics.jsonl", out / f"{stage}.png")
    summary = NanoR1Summary(sft=results["sft"], grpo=results["grpo"], closed=results["closed"],
                            direct=results.get("direct", {}),
                            minutes=round((time.perf_counter() - start) / 60, 2), stage_minutes=minutes,
                            task=cfg.task, params=pre["params"], active_params=pre["active_params"],
                            pretrain_mfu=pre["mfu"], grpo_reward=grpo.after, config=asdict(cfg))
    (out / "summary.json").write_text(json.dumps(summary.to_json(), indent=2) + "\n")
    (out / "nano-r1.json").write_text(json.dumps(summary.figure(), indent=2) + "\n")
    if cfg.report:
        from sputnik.train.reasoning import merge_report, nano_entry

        merge_report(Path(cfg.report), "nano-r1", nano_entry(summary))
    print(f"[nano-r1] pass@1 on {cfg.eval_n} held-out problems: SFT {summary.sft.get('pass@1', 0):.3f} -> "
          f"GRPO {summary.grpo.get('pass@1', 0):.3f} (thinking closed {summary.closed.get('pass@1', 0):.3f}, "
          f"direct-answer GRPO {summary.direct.get('pass@1', 0):.3f}) in {summary.minutes:.1f} min; "
          f"{out}/summary.json")
    return summary
