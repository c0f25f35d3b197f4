"""The one train loop: pretraining, SFT, GRPO and distillation are Objectives it runs.

A step: `objective.prepare(step, model)` returns the step's micro-batches (GRPO samples its rollouts there), then
`objective.iterations` optimizer updates (GRPO's mu; 1 elsewhere) each run forward/backward over every micro-batch.
The objective normalises each micro-batch loss by the GLOBAL count (tokens, sequences) of the step, so the sum over
micro-batches and ranks is the step loss: the loop never divides, and the result does not depend on how the batch is
split into micro-batches or across processes. Hence gradients are SUMMED across ranks, never averaged.

Launched by torchrun (WORLD_SIZE > 1) the loop joins the process group (gloo on CPU, nccl on CUDA), starts every rank
from rank 0's weights, all-reduces gradients (sum), and only rank 0 writes checkpoints, metrics and plots. With
`TrainConfig.fsdp` parameters, gradients and optimizer state are sharded with FSDP2 instead.

Checkpoints are `out_dir/checkpoints/step_NNNNNN/`: an HF folder (servable as is) plus `trainer.pt` holding the
optimizer, the update count, every rank's RNG and objective state, so that a resumed run computes bit for bit what the
uninterrupted one would have. With frozen parameters (LoRA) the HF folder holds merged weights, and trainer.pt also
keeps the adapters raw; such a run resumes onto the same base model, rebuilt by the caller.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import random
import re
import shutil
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from sputnik.checkpoint import load_state, load_weights, save_model
from sputnik.settings import option

CKPT_RE = re.compile(r"step_(\d{6,})")


@dataclass
class TrainConfig:
    """Optimizer, schedule, precision, checkpointing and logging of a training run."""

    out_dir: str = option("runs/run", "folder for checkpoints, metrics.jsonl, metrics.png and summary.json")
    max_steps: int = option(100, "optimizer steps")
    lr: float = option(1e-5, "peak learning rate (AdamW)")
    min_lr_ratio: float = option(0.0, "cosine floor as a fraction of lr")
    schedule: str = option("constant", "learning-rate schedule after the linear warmup",
                           choices=["constant", "cosine"])
    warmup_steps: int = option(0, "linear warmup, counted in optimizer updates like the schedule")
    weight_decay: float = option(0.0, "AdamW weight decay")
    betas: tuple[float, float] = option((0.9, 0.95), "AdamW betas, e.g. '[0.9, 0.95]'")
    eps: float = option(1e-8, "AdamW epsilon")
    grad_clip: float = option(1.0, "clip the gradient norm to this (0: off)")
    dtype: str = option("float32", "float32, or bfloat16 (autocast on CUDA; on CPU bf16 weights and activations)",
                        choices=["float32", "bfloat16"])
    save_every: int = option(0, "checkpoint every N steps (0: only at the end)")
    keep_last: int = option(2, "checkpoints kept (0: all)")
    log_every: int = option(1, "a metrics.jsonl line every N steps")
    plot_every: int = option(10, "redraw metrics.png every N steps (0: only at the end)")
    seed: int = option(0, "random seed")
    progress: bool = option(True, "show a progress bar")
    fsdp: bool = option(False, "shard with FSDP2 when launched on several processes")


class Objective(Protocol):
    """What a training method supplies to the loop."""

    iterations: int  # optimizer updates per step over the same prepared micro-batches (GRPO's mu; else 1)

    def prepare(self, step: int, model: nn.Module) -> list[Any]:
        """The micro-batches of this step (this rank's share); GRPO samples its rollouts here.

        Ranks may return different numbers of micro-batches, except under FSDP: there every forward is a collective,
        so all ranks must run the same number of forwards (in prepare too) in lockstep."""
        ...

    def loss(self, model: nn.Module, micro: Any) -> tuple[Tensor, dict[str, float]]:
        """Loss already normalised by the step's global count (sum over micro-batches and ranks = step loss), and this
        micro-batch's metrics (e.g. token means); the loop logs their mean over micro-batches, ranks and passes."""
        ...

    def metrics(self, step: int) -> dict[str, float]:
        """Per-step metrics (rewards, accuracy, "tokens" trained on...), logged as given (rank 0's); may be {}."""
        ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


# ---------------------------------------------------------------- distributed helpers


def dist_info() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside torchrun."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class RankAware:
    """rank and world for objectives, read when used, not at construction: the Trainer may start the process group
    after the objective exists."""

    @property
    def rank(self) -> int:
        return dist_info()[0]

    @property
    def world(self) -> int:
        return dist_info()[1]


def init_distributed() -> tuple[int, int]:
    """Join the process group when launched by torchrun (idempotent); returns (rank, world)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group("nccl")
        else:
            dist.init_process_group("gloo")
    return dist_info()


def finish_distributed() -> None:
    """Leave the process group at a normal end: every rank waits for the others first, because a gloo rank that tears
    its connections down while a peer still uses them can abort that peer ("terminate called without an active
    exception", seen in CI). A no-op outside torchrun."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """Sum a tensor over ranks in place (a no-op on one process); returns it."""
    if dist_info()[1] > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's obj, in rank order ([obj] on one process)."""
    world = dist_info()[1]
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


@contextmanager
def gathered(model: nn.Module) -> Iterator[None]:
    """Every FSDP unit of `model` holds its full weights on each rank while the block runs (a no-op without FSDP).

    Forwards of a sharded model all-gather each block, a collective, so ranks must run as many of them; rollouts run
    as many as their stops, turns and tool calls take, which differ per rank (gloo then fails on mismatched sizes or
    hangs). Gathered once here, in the same order on every rank, forwards issue no collective. The cost is one full
    copy of the parameters per rank while it lasts, as the rollout engines of verl and OpenRLHF hold."""
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for m in units:
        m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    try:
        yield
    finally:
        for m in units:
            m.reshard()
            m.set_reshard_after_forward(m is not model, recurse=False)  # as Trainer._shard sets them


def barrier() -> None:
    if dist_info()[1] > 1:
        dist.barrier()


# ---------------------------------------------------------------- learning rate


def lr_at(cfg: TrainConfig, update: int, total_updates: int) -> float:
    """Learning rate of optimizer update `update` (0-based) out of `total_updates`.

    Linear warmup reaches the peak on the last warmup update (the first update already moves: lr/warmup). Cosine then
    falls to lr * min_lr_ratio exactly on the final update.
    """
    if update < cfg.warmup_steps:
        return cfg.lr * (update + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "cosine":
        progress = min(1.0, (update + 1 - cfg.warmup_steps) / max(1, total_updates - cfg.warmup_steps))
        return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
    raise ValueError(f"unknown schedule {cfg.schedule!r}; use 'constant' or 'cosine'")


# ---------------------------------------------------------------- RNG state


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def retain_freed_memory(limit: int = 1 << 30) -> bool:
    """Keep freed blocks of up to `limit` bytes in the process instead of handing them back to the OS (glibc).

    glibc's malloc returns every block over its mmap threshold (at most 32 MB by default) to the OS on free, so a
    training step that allocates hundreds of MB of logits and activations page-faults all of it in again on the
    next step; on a small CPU that costs as much as the arithmetic (a 190 MB elementwise op: 35 ms on fresh memory,
    10 ms on reused). Linux with glibc only; returns whether the settings took."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # another C library (musl)
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(libc.mallopt(m_mmap_threshold, limit)) and bool(libc.mallopt(m_trim_threshold, limit))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---------------------------------------------------------------- the trainer


class Trainer:
    """Runs an Objective on a model: AdamW, LR schedule, clipping, DDP/FSDP, checkpoints, metrics and plots."""

    def __init__(
        self,
        model: nn.Module,
        cfg: TrainConfig,
        objective: Objective,
        evaluate: Callable[[int, nn.Module], dict] | None = None,
        eval_every: int = 0,
        tokenizer=None,  # saved into every checkpoint, so checkpoints are servable as is
    ):
        self.cfg, self.objective, self.evaluate, self.eval_every, self.tokenizer = (
            cfg, objective, evaluate, eval_every, tokenizer)
        self.rank, self.world = init_distributed()
        self.master = self.rank == 0
        self.out_dir = Path(cfg.out_dir)
        self.ckpt_dir = self.out_dir / "checkpoints"
        self.metrics_path = self.out_dir / "metrics.jsonl"
        self.plot_path = self.out_dir / "metrics.png"
        # Each rank its own stream (rollouts must differ across ranks); the model's init happened before, elsewhere.
        seed_everything(cfg.seed + self.rank)

        if self.world > 1 and torch.cuda.is_available():
            model = model.to(torch.device("cuda", torch.cuda.current_device()))
        self.device = next(model.parameters()).device
        if self.device.type == "cpu":
            retain_freed_memory()
        if cfg.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be 'float32' or 'bfloat16', not {cfg.dtype!r}")
        if cfg.dtype == "bfloat16" and self.device.type == "cpu":
            model = model.to(torch.bfloat16)  # CPU autocast is slow and partial: train in bf16 outright
        self.autocast = (torch.autocast("cuda", dtype=torch.bfloat16)
                         if cfg.dtype == "bfloat16" and self.device.type == "cuda" else nullcontext())
        if self.world > 1:
            with torch.no_grad():  # every rank starts from rank 0's weights, whatever its own init was
                for t in model.state_dict().values():
                    dist.broadcast(t, 0)
        self.fsdp = cfg.fsdp and self.world > 1
        # Frozen parameters (LoRA): the HF folder holds merged weights, so the trainable tensors (adapters) and the
        # buffers are also kept raw in trainer.pt, and resume takes the frozen base from the model it is given.
        self.frozen = any(not p.requires_grad for p in model.parameters())
        if self.fsdp and self.frozen:
            raise NotImplementedError("FSDP with frozen parameters (LoRA) is not supported; LoRA runs use plain "
                                      "data parallel (fsdp=False): its optimizer state is small anyway")
        if self.fsdp:
            self._shard(model)
        self.model = model.train()

        self.params = [p for p in model.parameters() if p.requires_grad]
        decay = [p for p in self.params if p.ndim >= 2]  # matrices and embeddings; never norms or biases
        no_decay = [p for p in self.params if p.ndim < 2]
        groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        # Fused kernels where they exist (CUDA, CPU); DTensor (FSDP) parameters take the foreach path.
        impl = {"foreach": True} if self.fsdp else {"fused": True}
        self.optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, **impl)
        self.iterations = int(getattr(objective, "iterations", 1))
        self.total_updates = cfg.max_steps * self.iterations
        self.step = 0  # optimizer steps completed
        self.updates = 0  # optimizer updates completed (= step * iterations); drives the LR schedule
        self.tokens_total = 0.0
        self.last_metrics: dict = {}

    # ------------------------------------------------------------ FSDP

    def _shard(self, model: nn.Module) -> None:
        from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method

        # One FSDP unit per block, so only one block's full weights exist at a time; the root holds the rest.
        blocks = list(getattr(getattr(model, "model", None), "layers", [])) + list(getattr(model, "mtp", []))
        for block in blocks:
            fully_shard(block)
        # The losses run the model's hidden() and then its final norm and head (head log-probs, cross-entropy, KL,
        # MTP): the root gathers its weights in hidden(), a forward of its own, and keeps them until the backward.
        fully_shard(model, reshard_after_forward=False)
        if hasattr(model, "hidden"):
            register_fsdp_forward_method(model, "hidden")
        for m in model.modules():
            if isinstance(m, FSDPModule):
                # Objectives normalise globally, so the reduce is a plain sum; forcing SUM (instead of a premultiplied
                # sum by 1/1) also keeps it on gloo, which has no PREMUL_SUM.
                m.set_gradient_divide_factor(1.0)
                m.set_force_sum_reduction_for_comms(True)

    def _set_grad_sync(self, sync: bool) -> None:
        if self.fsdp:
            self.model.set_requires_gradient_sync(sync)  # reduce-scatter only after the last micro-batch

    # ------------------------------------------------------------ one step

    def _sync_grads(self) -> None:
        """Sum gradients over ranks (no FSDP). A parameter unused on every rank keeps grad None, as on one process,
        so AdamW skips it; unused on some ranks only, it gets zeros there so that every rank joins the same reduce."""
        if self.world == 1 or self.fsdp:
            return
        used = torch.tensor([p.grad is not None for p in self.params], dtype=torch.float32, device=self.device)
        all_reduce_sum(used)
        handles = []
        for p, u in zip(self.params, used.tolist()):
            if u == 0:
                continue
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            handles.append(dist.all_reduce(p.grad, op=dist.ReduceOp.SUM, async_op=True))
        for h in handles:
            h.wait()

    def _clip(self) -> float:
        """Total gradient norm before clipping; clips in place when grad_clip > 0."""
        if self.cfg.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in self.params if p.grad is not None])
        if hasattr(norm, "full_tensor"):  # a DTensor under FSDP
            norm = norm.full_tensor()
        return float(norm)

    def train_step(self, step: int) -> dict:
        """Prepare step `step` (0-based), run its optimizer updates; returns the step's metrics (global)."""
        t0 = time.perf_counter()
        self.model.train()
        micros = self.objective.prepare(step, self.model)
        t_prepare = time.perf_counter() - t0
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        sums: dict[str, list[float]] = {}  # per key: [sum, count] of micro-batch values
        norms, lrs = [], []
        # Under FSDP every forward and backward is a collective: all ranks must run as many micro-batches. A rank
        # with fewer (GRPO's trained rows differ per rank) runs its last one again with the loss times 0.
        passes = len(micros)
        if self.fsdp:
            count = torch.tensor(float(passes), device=self.device)
            dist.all_reduce(count, op=dist.ReduceOp.MAX)
            passes = int(count.item())
            if passes and not micros:
                raise RuntimeError(f"rank {self.rank} got no micro-batch in step {step + 1} while others did: under "
                                   "FSDP every rank must run each forward (give each rank data: batch >= ranks)")
        for _ in range(self.iterations):
            lr = lr_at(self.cfg, self.updates, self.total_updates)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self.optimizer.zero_grad(set_to_none=True)
            for i in range(passes):
                micro, padding = micros[min(i, len(micros) - 1)], i >= len(micros)
                self._set_grad_sync(i == passes - 1)
                with self.autocast:
                    loss, m = self.objective.loss(self.model, micro)
                if padding:
                    loss = loss * 0.0
                if loss.requires_grad:  # a rank with nothing to learn from this micro-batch may return a constant
                    loss.backward()
                if padding:
                    continue
                loss_sum += loss.detach().double()
                for k, v in m.items():
                    acc = sums.setdefault(k, [0.0, 0])
                    acc[0] += float(v)
                    acc[1] += 1
            self._sync_grads()
            norms.append(self._clip())
            self.optimizer.step()
            if hasattr(self.objective, "after_update"):  # e.g. pretraining's router bias update
                self.objective.after_update(self.model)
            self.updates += 1
            lrs.append(lr)

        # Micro-batch losses are shares of the step loss: sum over ranks, average over passes. Micro-batch metrics are
        # averaged over micro-batches, ranks and passes.
        all_reduce_sum(loss_sum)
        gathered = all_gather_object(sums)
        row: dict[str, Any] = {"step": step + 1, "loss": loss_sum.item() / self.iterations, "lr": lrs[-1],
                               "grad_norm": sum(norms) / len(norms)}
        for k in sorted(set().union(*gathered)):
            total, count = (sum(g[k][i] for g in gathered if k in g) for i in (0, 1))
            row[k] = total / count
        row.update(self.objective.metrics(step))
        row.setdefault("tokens", 0.0)
        self.tokens_total += row["tokens"]
        row["tokens_total"] = self.tokens_total
        row["seconds"] = time.perf_counter() - t0
        row["prepare_seconds"] = t_prepare
        self.step = step + 1
        return row

    # ------------------------------------------------------------ the run

    def run_eval(self, step: int) -> dict:
        """Evaluate on every rank (evaluators may gather); metrics come back prefixed eval/."""
        self.model.eval()
        with torch.no_grad(), self.autocast:
            out = self.evaluate(step, self.model) if self.evaluate else {}
        self.model.train()
        return {f"eval/{k}": v for k, v in out.items()}

    def run(self) -> dict:
        """Train from self.step (0, or where resume() left off) to max_steps; returns the last metrics row."""
        cfg = self.cfg
        if self.master and self.step == 0:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self.metrics_path.unlink(missing_ok=True)  # a fresh run starts a fresh log
            if checkpoints(self.ckpt_dir):
                warnings.warn(f"{self.ckpt_dir} holds checkpoints of an earlier run: call resume() to continue it, "
                              "or use another out_dir (keep_last pruning goes by step number)")
        if self.step == 0 and self.evaluate and self.eval_every:  # the baseline, so curves start at step 0
            self.log({"step": 0, **self.run_eval(0)})
        bar = None
        if self.master and cfg.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.max_steps, initial=self.step, desc="train", dynamic_ncols=True)
        for step in range(self.step, cfg.max_steps):
            row = self.train_step(step)
            done = step + 1
            last = done == cfg.max_steps
            if self.evaluate and self.eval_every and (done % self.eval_every == 0 or last):
                row.update(self.run_eval(done))
            if last or done % max(1, cfg.log_every) == 0 or any(k.startswith("eval/") for k in row):
                self.log(row)
            if last or (cfg.save_every and done % cfg.save_every == 0):
                self.save(done)
            if self.master and (last or (cfg.plot_every and done % cfg.plot_every == 0)):
                self.plot()
            if bar is not None:
                bar.set_postfix_str(progress_text(row), refresh=False)
                bar.update(1)
            self.last_metrics = row
        if bar is not None:
            bar.close()
        return self.last_metrics

    def log(self, row: dict) -> None:
        if not self.master:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")

    def plot(self) -> None:
        if self.master and self.metrics_path.exists():
            from sputnik.train.plots import plot_metrics

            plot_metrics(self.metrics_path, self.plot_path)

    # ------------------------------------------------------------ checkpoints

    def _model_to_save(self) -> nn.Module | None:
        """The model with full weights on rank 0 (FSDP: gathered into a CPU copy; every rank must call this)."""
        if not self.fsdp:
            return self.model if self.master else None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        sd = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return self._cpu_copy(sd) if self.master else None

    def _cpu_copy(self, sd: dict[str, Tensor] | None = None) -> nn.Module:
        """A plain CPU model of the same config (FSDP saves and loads go through it)."""
        from sputnik.model import Transformer

        cfg = self.model.cfg
        with torch.device("meta"):
            m = Transformer(cfg)
        dtype = next(self.model.parameters()).dtype
        m = m.to_empty(device="cpu").to(dtype)
        if cfg.tie_embeddings:
            m.lm_head.weight = m.model.embed_tokens.weight
        if sd is not None:
            m.load_state_dict(sd)
        return m

    def save(self, step: int) -> Path:
        """Write checkpoints/step_{step:06d} atomically (temp dir, then rename); keep the last keep_last."""
        final = self.ckpt_dir / f"step_{step:06d}"
        # Collectives first, on every rank: per-rank RNG and objective state, FSDP's gathered weights and optimizer.
        rngs = all_gather_object(rng_state())
        objective_states = all_gather_object(self.objective.state_dict())
        model = self._model_to_save()
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            optim = get_optimizer_state_dict(self.model, self.optimizer,
                                             options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        else:
            optim = self.optimizer.state_dict()
        if self.master:
            tmp = self.ckpt_dir / f".tmp_step_{step:06d}"
            shutil.rmtree(tmp, ignore_errors=True)
            save_model(model, tmp, tokenizer=self.tokenizer)
            torch.save({"step": step, "updates": self.updates, "tokens_total": self.tokens_total, "optimizer": optim,
                        "rng": rngs, "objective": objective_states, "world": self.world, "config": asdict(self.cfg),
                        "raw": self._raw_state() if self.frozen else None}, tmp / "trainer.pt")
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)  # a kill before this line leaves only a temp dir, which resume() ignores
            if self.cfg.keep_last > 0:
                for old in checkpoints(self.ckpt_dir)[: -self.cfg.keep_last]:
                    shutil.rmtree(old, ignore_errors=True)
        barrier()  # nobody reads a checkpoint rank 0 has not finished
        return final

    def _raw_state(self) -> dict[str, Tensor]:
        """Trainable parameters and buffers as they are in the model (unmerged), for exact resume with LoRA."""
        trainable = {n for n, p in self.model.named_parameters() if p.requires_grad}
        params = {n for n, _ in self.model.named_parameters()}
        return {n: t.detach().cpu().clone() for n, t in self.model.state_dict().items()
                if n in trainable or n not in params}

    def resume(self) -> int:
        """Load the latest complete checkpoint under out_dir, if any; returns the step to continue from."""
        found = checkpoints(self.ckpt_dir)
        if not found:
            return self.step
        path = found[-1]
        state = torch.load(path / "trainer.pt", map_location="cpu", weights_only=False)
        if self.frozen:
            if state.get("raw") is None:
                raise RuntimeError(f"{path} comes from a run without frozen parameters: it cannot resume a LoRA run")
            # strict=False: the frozen base is not in "raw"; unexpected keys would still raise.
            unexpected = self.model.load_state_dict(state["raw"], strict=False).unexpected_keys
            if unexpected:
                raise RuntimeError(f"{path}: unexpected tensors {unexpected[:5]}")
            self.optimizer.load_state_dict(state["optimizer"])
        elif self.fsdp:
            _, sd, source = load_state(path)
            from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                                 set_optimizer_state_dict)

            full = self._cpu_copy()
            load_weights(full, sd, source)
            opts = StateDictOptions(full_state_dict=True)
            set_model_state_dict(self.model, full.state_dict(), options=opts)
            set_optimizer_state_dict(self.model, self.optimizer, optim_state_dict=state["optimizer"], options=opts)
        else:
            _, sd, source = load_state(path)
            load_weights(self.model, sd, source)
            self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.updates, self.tokens_total = state["step"], state["updates"], state["tokens_total"]
        # Each rank takes back its own stream; a different world size can only reuse rank 0's objective state.
        own = self.rank if state["world"] == self.world else 0
        set_rng_state(state["rng"][own])
        self.objective.load_state_dict(state["objective"][own])
        if self.master and self.metrics_path.exists():  # drop rows a killed run logged after this checkpoint
            rows = [line for line in self.metrics_path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= self.step]
            self.metrics_path.write_text("".join(r + "\n" for r in rows))
        barrier()
        return self.step


def checkpoints(ckpt_dir: str | Path) -> list[Path]:
    """Complete checkpoints under ckpt_dir, oldest first (temp dirs of interrupted saves are not listed)."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    found = [p for p in ckpt_dir.iterdir() if CKPT_RE.fullmatch(p.name) and (p / "trainer.pt").is_file()]
    return sorted(found, key=lambda p: int(CKPT_RE.fullmatch(p.name).group(1)))


def progress_text(row: dict) -> str:
    """The progress bar's postfix: loss and the metrics people watch (reward, accuracy, KL...), when present."""
    keys = ["loss"] + [k for k in row if any(w in k for w in ("reward", "acc", "kl", "eval/"))][:4] + ["lr"]
    return " ".join(f"{k}={row[k]:.4g}" for k in keys if isinstance(row.get(k), (int, float)))
