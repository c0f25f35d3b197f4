"""The shared train loop: LR schedule, micro-batch and rank invariance, exact resume, clipping, metrics and plots."""

import json
import math
import os
import random
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from sputnik.checkpoint import load_model, load_state
from sputnik.config import ModelConfig
from sputnik.model import Transformer
from sputnik.train.loop import TrainConfig, Trainer, all_reduce_sum, checkpoints, lr_at
from sputnik.train.plots import plot_metrics

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


def tiny_model(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    cfg = ModelConfig(family="llama", vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, inter_dim=48,
                      max_seq_len=128)
    return Transformer(cfg)


def toy_data(rows: int = 16, length: int = 17, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 64, (rows, length), generator=g)


class LMObjective:
    """Next-token loss summed over tokens and divided by the step's GLOBAL token count (all ranks)."""

    def __init__(self, data, batch=8, micro=8, shard=(0, 1), seed=0, iterations=1, draw=False):
        self.data, self.batch, self.micro, self.shard, self.iterations = data, batch, micro, shard, iterations
        self.gen = torch.Generator().manual_seed(seed)  # data order: part of the objective's state
        self.draw = draw  # report draws from the global RNGs, to check that resume restores them

    def prepare(self, step, model):
        rows = self.data[torch.randint(len(self.data), (self.batch,), generator=self.gen)]
        rank, world = self.shard
        rows = rows.chunk(world)[rank]
        self.global_tokens = all_reduce_sum(torch.tensor(float(rows[:, 1:].numel()))).item()
        return list(rows.split(self.micro))

    def loss(self, model, micro):
        logits = model(micro[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1).float(), micro[:, 1:].flatten(), reduction="sum")
        return loss / self.global_tokens, {"micro_rows": float(len(micro))}

    def metrics(self, step):
        out = {"tokens": self.global_tokens}
        if self.draw:
            out["draw"] = torch.rand(()).item() + random.random()
        return out

    def state_dict(self):
        return {"gen": self.gen.get_state()}

    def load_state_dict(self, state):
        self.gen.set_state(state["gen"])


def config(out, **kw) -> TrainConfig:
    base = dict(out_dir=str(out), max_steps=2, lr=1e-3, progress=False, plot_every=0)
    return TrainConfig(**{**base, **kw})


def read_rows(out) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def test_lr_schedule():
    cfg = TrainConfig(lr=1.0, warmup_steps=4, schedule="constant")
    assert [lr_at(cfg, u, 14) for u in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    cfg = TrainConfig(lr=2.0, warmup_steps=4, schedule="cosine", min_lr_ratio=0.1)
    assert lr_at(cfg, 0, 14) == 0.5 and lr_at(cfg, 3, 14) == 2.0
    assert lr_at(cfg, 4, 14) == pytest.approx(2.0 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 10))))
    assert lr_at(cfg, 8, 14) == pytest.approx(2.0 * 0.55)  # halfway down
    assert lr_at(cfg, 13, 14) == pytest.approx(0.2)  # the last update sits on the floor
    lrs = [lr_at(cfg, u, 14) for u in range(3, 14)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_schedule_advances_per_update(tmp_path):
    """GRPO's mu: two optimizer updates per step, each one a schedule tick."""
    obj = LMObjective(toy_data(), batch=4, micro=4, iterations=2)
    cfg = config(tmp_path, max_steps=3, warmup_steps=2, schedule="cosine", lr=1e-2)
    trainer = Trainer(tiny_model(), cfg, obj)
    rows = [trainer.train_step(s) for s in range(3)]
    assert trainer.updates == 6
    assert [r["lr"] for r in rows] == [lr_at(cfg, u, 6) for u in (1, 3, 5)]
    assert rows[-1]["lr"] == 0.0
    assert rows[0]["tokens"] == 4 * 16 and rows[0]["micro_rows"] == 4


def test_micro_batch_split_invariance(tmp_path):
    data = toy_data()
    models = []
    for micro in (8, 2):
        model = tiny_model()
        trainer = Trainer(model, config(tmp_path / f"m{micro}", weight_decay=0.1), LMObjective(data, micro=micro))
        row = trainer.train_step(0)
        models.append((model, row))
    (a, ra), (b, rb) = models
    assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-6) and ra["tokens"] == rb["tokens"] == 8 * 16
    assert (ra["micro_rows"], rb["micro_rows"]) == (8, 2)  # micro-batch metrics are means, not sums
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-5, atol=1e-7, msg=name)
        torch.testing.assert_close(pa, pb, rtol=0, atol=1e-6, msg=name)


def test_exact_resume(tmp_path):
    data = toy_data()
    kw = dict(max_steps=4, warmup_steps=2, schedule="cosine", weight_decay=0.1, grad_clip=0.5, save_every=1,
              keep_last=2)

    straight = tiny_model()
    Trainer(straight, config(tmp_path / "a", **kw), LMObjective(data, micro=4, draw=True)).run()
    rows_a = read_rows(tmp_path / "a")
    assert [p.name for p in checkpoints(tmp_path / "a" / "checkpoints")] == ["step_000003", "step_000004"]

    first = Trainer(tiny_model(), config(tmp_path / "b", **kw), LMObjective(data, micro=4, draw=True))
    rows_b = [first.train_step(0), first.train_step(1)]
    first.save(2)
    # A save killed halfway leaves only a temp dir: resume must skip it.
    (tmp_path / "b" / "checkpoints" / ".tmp_step_000003").mkdir()

    resumed_model = tiny_model(seed=123)  # a different init: everything must come from the checkpoint
    resumed = Trainer(resumed_model, config(tmp_path / "b", **kw), LMObjective(data, micro=4, seed=99, draw=True))
    assert resumed.resume() == 2
    resumed.run()
    rows_b += read_rows(tmp_path / "b")
    for ra, rb in zip(rows_a, rows_b, strict=True):
        assert (ra["step"], ra["loss"], ra["lr"], ra["grad_norm"], ra["draw"]) == (
            rb["step"], rb["loss"], rb["lr"], rb["grad_norm"], rb["draw"])
    for (name, pa), pb in zip(straight.state_dict().items(), resumed_model.state_dict().values()):
        assert torch.equal(pa, pb), name


def test_exact_resume_with_lora(tmp_path):
    """Adapters are merged in the HF folder; resume takes them raw from trainer.pt and the frozen base as given."""
    from sputnik.train.lora import apply_lora

    def lora_model(seed):
        model = tiny_model()  # the same base every time, as a LoRA run reloads its base model
        torch.manual_seed(seed)
        apply_lora(model, r=4, alpha=8)
        return model

    data, kw = toy_data(), dict(max_steps=3, schedule="cosine", lr=1e-2)
    straight = lora_model(0)
    Trainer(straight, config(tmp_path / "a", **kw), LMObjective(data, micro=4)).run()
    first = Trainer(lora_model(0), config(tmp_path / "b", **kw), LMObjective(data, micro=4))
    first.train_step(0)
    first.save(1)
    resumed = lora_model(5)
    trainer = Trainer(resumed, config(tmp_path / "b", **kw), LMObjective(data, micro=4, seed=3))
    assert trainer.resume() == 1
    trainer.run()
    for (name, pa), pb in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(pa, pb), name
    merged = load_model(tmp_path / "b" / "checkpoints" / "step_000003")
    x = data[:2]
    torch.testing.assert_close(merged(x), straight.eval()(x), rtol=1e-4, atol=1e-5)


def test_tiny_model_learns_with_metrics_plots_and_checkpoint(tmp_path):
    seq = torch.arange(33) % 7 + 3  # a fixed periodic toy sequence
    obj = LMObjective(seq[None].repeat(4, 1), batch=4, micro=2)
    model = tiny_model()

    def evaluate(step, m):
        return {"loss": F.cross_entropy(m(seq[None, :-1])[0], seq[1:]).item()}

    cfg = config(tmp_path, max_steps=30, lr=1e-2, warmup_steps=3, schedule="cosine", plot_every=10, progress=True)
    Trainer(model, cfg, obj, evaluate=evaluate, eval_every=10).run()
    rows = read_rows(tmp_path)
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 31))
    assert {"step", "loss", "lr", "grad_norm", "tokens", "seconds"} <= set(steps[0])
    assert [r["step"] for r in rows if "eval/loss" in r] == [0, 10, 20, 30]
    assert steps[-1]["loss"] < 0.3 * steps[0]["loss"]
    assert (tmp_path / "metrics.png").stat().st_size > 1000
    # The final checkpoint is an ordinary HF folder that loads and computes what the trained model does.
    loaded = load_model(tmp_path / "checkpoints" / "step_000030")
    torch.testing.assert_close(loaded(seq[None]), model.eval()(seq[None]))


def test_grad_clip(tmp_path):
    data = toy_data()
    ref = tiny_model()
    obj = LMObjective(data, micro=4)
    batch = obj.prepare(0, ref)
    sum(obj.loss(ref, m)[0] for m in batch).backward()
    true_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in ref.parameters()])).item()

    for clip in (1e-3, 0.0):
        model = tiny_model()
        before = [p.detach().clone() for p in model.parameters()]
        trainer = Trainer(model, config(tmp_path / str(clip), grad_clip=clip), LMObjective(data, micro=4))
        row = trainer.train_step(0)
        assert row["grad_norm"] == pytest.approx(true_norm, rel=1e-5)  # logged before clipping
        after = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()])).item()
        assert after == pytest.approx(clip if clip else true_norm, rel=1e-4)
        step = max((p - b).abs().max().item() for p, b in zip(model.parameters(), before))
        assert step <= 1e-3 * 1.001  # AdamW's first update is at most lr per element


def test_bfloat16_on_cpu(tmp_path):
    model = tiny_model()
    trainer = Trainer(model, config(tmp_path, dtype="bfloat16", max_steps=1), LMObjective(toy_data(), micro=4))
    row = trainer.run()
    assert trainer.model.dtype == torch.bfloat16 and math.isfinite(row["loss"])
    _, sd, _ = load_state(tmp_path / "checkpoints" / "step_000001")
    assert sd["lm_head.weight"].dtype == torch.bfloat16


def test_plot_metrics_handles_sparse_keys(tmp_path):
    lines = [{"step": i, "loss": 1 / i, "reward": i % 3, "kl": 0.01 * i} for i in range(1, 40)]
    lines.insert(0, {"step": 0, "eval/accuracy": 0.1})
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"step": 40, "lo')
    out = plot_metrics(tmp_path / "m.jsonl", tmp_path / "p.png")
    assert out.stat().st_size > 1000
    assert plot_metrics(tmp_path / "m.jsonl", tmp_path / "q.png", keys=["kl"]).is_file()


DIST_SCRIPT = """
import sys
import torch
sys.path.insert(0, {tests!r})
from test_train_loop import LMObjective, config, tiny_model, toy_data
from sputnik.train.loop import Trainer, all_gather_object, finish_distributed, init_distributed

rank, world = init_distributed()
assert world == 2 and all_gather_object(rank * 10) == [0, 10]
out = {out!r}
data = toy_data()

def objective():
    return LMObjective(data, batch=8, micro=2, shard=(rank, world))

# Plain data parallel: a different init per rank, which the initial broadcast must undo.
Trainer(tiny_model(seed=rank + 7), config(out + "/plain", weight_decay=0.1), objective()).run()

# FSDP2: one step, save, then a new trainer resumes and finishes.
first = Trainer(tiny_model(seed=rank + 7), config(out + "/fsdp", weight_decay=0.1, fsdp=True), objective())
first.train_step(0)
first.save(1)
second = Trainer(tiny_model(seed=rank + 3), config(out + "/fsdp", weight_decay=0.1, fsdp=True), objective())
assert second.resume() == 1
second.run()
finish_distributed()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one(tmp_path):
    script = tmp_path / "dist_run.py"
    script.write_text(textwrap.dedent(DIST_SCRIPT.format(tests=str(TESTS), out=str(tmp_path))))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(script)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]

    single = tiny_model(seed=7)
    Trainer(single, config(tmp_path / "single", weight_decay=0.1), LMObjective(toy_data(), micro=4)).run()
    want = single.state_dict()
    for run in ("plain", "fsdp"):
        _, got, _ = load_state(tmp_path / run / "checkpoints" / "step_000002")
        for name, t in want.items():
            torch.testing.assert_close(got[name], t, rtol=0, atol=1e-5, msg=f"{run}: {name}")
        single_loss = {r["step"]: r["loss"] for r in read_rows(tmp_path / "single")}
        for r in read_rows(tmp_path / run):  # fsdp logged only the resumed step 2
            assert r["loss"] == pytest.approx(single_loss[r["step"]], rel=1e-5)
            assert r["tokens"] == 8 * 16 and r["micro_rows"] == 2  # global count; micro metrics averaged over ranks


FAULTS = """
import resource, sys, torch
from sputnik.train.loop import retain_freed_memory
def steps(n=4):  # minor page faults of a training step's pattern: activations pile up, then all are freed
    out = []
    for _ in range(n):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        xs = [torch.ones(1_500_000) for _ in range(40)]  # 40 x 6 MB
        del xs
        out.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return out
print(steps()[-1], retain_freed_memory(), steps()[-1])
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_retain_freed_memory_stops_refaulting_each_step():
    """By default glibc hands most of a step's freed activations back to the OS, and the next step page-faults them
    in again; after retain_freed_memory (which the Trainer calls on a CPU) they are reused. In a fresh process: the
    setting is process-wide."""
    for _ in range(5):  # whether glibc trims depends on what else sits on the heap: usually it does
        out = subprocess.run([sys.executable, "-c", FAULTS], capture_output=True, text=True, check=True).stdout.split()
        before, took, after = int(out[0]), out[1] == "True", int(out[2])
        assert took
        if before >= 1000:
            break
    else:
        pytest.skip(f"only {before} page faults a step without it (transparent huge pages?): nothing to compare")
    assert after < before // 20, (before, after)
