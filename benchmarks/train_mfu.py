"""Training throughput and MFU on CPU (fp32): sputnik's pretraining step against a plain transformers loop, in one run.

Two models built by `nano_config` (vocab 8192, width 384, 6 heads), with random init:
  dense  a Llama of 7 layers: 19.7M parameters including its (tied) embedding, 16.5M without it;
  moe    MLA + MoE (8 routed experts of width 384, top 2, 1 shared, first layer dense), 8 layers, no MTP module:
         19.05M active parameters (sputnik's `active_params`: the experts a token is routed to, the output head, not
         the embedding lookup) of 40.8M in all.
sputnik trains each with its real step: the shared `Trainer` (fused AdamW, clipping at 1.0, constant LR) running
`PretrainObjective` (random windows of synthetic token shards written with `write_shards`, packed documents masked
from each other, and for the MoE the sequence-wise balance loss and the router bias update). The same weights, saved
with `save_model` and loaded by `AutoModelForCausalLM.from_pretrained`, train in a plain PyTorch loop: the same
batches (drawn by a second PretrainObjective, seeded per step as sputnik's), the same document masking (restarting
position_ids, which transformers turns into a packed-sequence mask), HF's own `labels=` loss (with shift_labels =
the next tokens, so both predict every one of the seq_len positions), and the same AdamW settings, clipping and
parameter groups. The two loops alternate step by step, so a busy neighbour on the cores slows both alike; the step-1
losses of the two sides must agree (a check that both compute the same thing). MTP is off by default because
transformers does not train it (--mtp-layers 1 adds it to sputnik's side only; MFU then counts its FLOPs there).

tokens/s = batch x seq_len / median step seconds (the seconds sputnik logs to metrics.jsonl; the same span, batch
drawing to optimizer step, on the transformers side), over the steps after the warm-up ones. MFU = tokens/s x
flops_per_token (6 x active params + causal attention) / this machine's fp32 matmul rate (`matmul_flops_per_s` at
n x n, measured before each model and at the end; the highest counts, as the least disturbed).

    python benchmarks/train_mfu.py [--steps 6] [--warmup 2] [--batch 8] [--seq-len 256] [--models dense,moe]
                                   [--threads N] [--skip-transformers]

On a shared machine a neighbour busy on one of the cores stalls every multi-threaded op (each parallel region waits
for the descheduled thread): the load average before and after is printed; compare runs only at a low one.
The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

import machine
from sputnik.checkpoint import save_model
from sputnik.model import Transformer
from sputnik.train.data import document_ids, document_positions, write_shards
from sputnik.train.loop import TrainConfig, Trainer
from sputnik.train.pretrain import (PretrainConfig, PretrainObjective, active_params, flops_per_token, init_weights,
                                    matmul_flops_per_s, nano_config)

EOS = 0


def synthetic_shards(out: Path, vocab: int, seq_len: int, tokens: int, seed: int = 0) -> str:
    """Random-token documents of seq_len/4 .. 4*seq_len tokens (so most windows hold a document boundary)."""
    rng = np.random.default_rng(seed)
    docs, n = [], 0
    while n < tokens:
        doc = rng.integers(1, vocab, int(rng.integers(seq_len // 4, 4 * seq_len))).tolist()
        docs.append(doc)
        n += len(doc) + 1
    write_shards(docs, out, vocab, EOS)
    return str(out)


def model_config(arch: str, args):
    if arch == "dense":
        return nano_config(args.vocab, "dense", dim=args.dim, n_layers=args.dense_layers, n_heads=args.heads,
                           max_seq_len=max(512, args.seq_len))
    return nano_config(args.vocab, "moe", dim=args.dim, n_layers=args.moe_layers, n_heads=args.heads,
                       max_seq_len=max(512, args.seq_len), n_mtp_layers=args.mtp_layers)


class HFLoop:
    """A transformers model trained the plain PyTorch way, with sputnik's optimizer settings and batches."""

    def __init__(self, folder: Path, data: PretrainObjective, train: TrainConfig, mask_documents: bool):
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
        self.model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).train()
        self.data, self.train, self.mask_documents = data, train, mask_documents
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        groups = [{"params": [p for p in self.params if p.ndim >= 2], "weight_decay": train.weight_decay},
                  {"params": [p for p in self.params if p.ndim < 2], "weight_decay": 0.0}]
        self.optimizer = torch.optim.AdamW(groups, lr=train.lr, betas=train.betas, eps=train.eps, fused=True)
        cfg = self.model.config
        self.impl = {"class": type(self.model).__name__, "attention": cfg._attn_implementation,
                     "experts": getattr(cfg, "_experts_implementation", None)}

    def step(self, step: int) -> dict:
        t0 = time.perf_counter()
        micros = self.data.prepare(step, self.model)  # sputnik's windows for this step, drawn the same way
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum = 0.0
        for micro in micros:
            x, y = micro[:, :-1].contiguous(), micro[:, 1:].contiguous()
            kw = {}
            if self.mask_documents:  # positions restarting per document: transformers masks the packed documents
                kw["position_ids"] = torch.from_numpy(document_positions(document_ids(x.numpy(), EOS)))
            out = self.model(input_ids=x, labels=x, shift_labels=y, num_items_in_batch=self.data.global_tokens,
                             use_cache=False, **kw)
            out.loss.backward()
            loss_sum += out.loss.item()
        torch.nn.utils.clip_grad_norm_(self.params, self.train.grad_clip)
        self.optimizer.step()
        return {"seconds": time.perf_counter() - t0, "loss": loss_sum, "tokens": float(self.data.global_tokens)}


def bench(arch: str, args, shards: str, tmp: Path) -> dict:
    cfg = model_config(arch, args)
    torch.manual_seed(0)
    model = Transformer(cfg)
    init_weights(model, 0.02, seed=0)
    total = sum(p.numel() for p in model.parameters())
    res: dict = {"params": total, "non_embedding_params": total - model.model.embed_tokens.weight.numel(),
                 "active_params": active_params(model), "flops_per_token": flops_per_token(model, args.seq_len)}
    with torch.device("meta"):  # what the transformers side runs: no MTP module
        hf_shape = Transformer(dataclasses.replace(cfg, n_mtp_layers=0))
    res["hf_flops_per_token"] = flops_per_token(hf_shape, args.seq_len)
    folder = save_model(model, tmp / arch / "hf")  # the untrained weights, for transformers

    pcfg = PretrainConfig(data=shards, seq_len=args.seq_len, batch_size=args.batch,
                          micro_batch=args.micro_batch or args.batch, mask_documents=not args.no_doc_mask)
    n_steps = args.warmup + args.steps
    train = TrainConfig(out_dir=str(tmp / arch / "sputnik"), max_steps=n_steps, lr=args.lr,
                        weight_decay=args.weight_decay, progress=False, plot_every=0, save_every=0, seed=0)
    objective = PretrainObjective(model, pcfg, seed=0, peak_flops=1.0)  # MFU is computed here, not from its figure
    trainer = Trainer(model, train, objective)
    trainer.out_dir.mkdir(parents=True, exist_ok=True)

    hf, hf_rows = None, []
    res["hf_error"] = None
    if not args.skip_transformers:
        try:
            hf = HFLoop(folder, PretrainObjective(model, pcfg, seed=0, peak_flops=1.0), train, not args.no_doc_mask)
            res["hf_impl"] = hf.impl
        except Exception as e:  # noqa: BLE001 - reported in the table and JSON, not fatal
            res["hf_error"] = f"load: {type(e).__name__}: {e}"[:300]
    else:
        res["hf_error"] = "skipped"

    def hf_step(step: int) -> None:
        nonlocal hf
        if hf is None:
            return
        try:
            hf_rows.append(hf.step(step))
        except Exception as e:  # noqa: BLE001
            res["hf_error"] = f"step {step + 1}: {type(e).__name__}: {e}"[:300]
            hf = None

    for step in range(n_steps):
        # Alternate which side goes first, so neither always runs right after the other.
        if step % 2:
            hf_step(step)
        row = trainer.train_step(step)
        trainer.log(row)  # metrics.jsonl, as a run writes it
        if not step % 2:
            hf_step(step)
        last = hf_rows[-1] if hf_rows and len(hf_rows) == step + 1 else None
        hf_text = f"transformers {last['seconds']:.2f}s loss {last['loss']:.4f}" if last else "transformers -"
        print(f"  {arch} step {step + 1}/{n_steps}: sputnik {row['seconds']:.2f}s loss {row['loss']:.4f} | {hf_text}",
              flush=True)

    rows = [json.loads(line) for line in trainer.metrics_path.read_text().splitlines() if line.strip()]
    res["sputnik_steps_s"] = [r["seconds"] for r in rows]
    res["sputnik_ce"] = [r["ce"] for r in rows]  # the next-token loss alone (no balance / MTP terms)
    res["tokens_per_step"] = rows[-1]["tokens"]
    if len(hf_rows) == n_steps:
        res["hf_steps_s"] = [r["seconds"] for r in hf_rows]
        res["hf_loss"] = [r["loss"] for r in hf_rows]
    else:
        res["hf_steps_s"] = res["hf_loss"] = None
    del trainer, objective, model, hf
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=6, help="timed steps per model and side")
    ap.add_argument("--warmup", type=int, default=2, help="steps before them, not timed")
    ap.add_argument("--batch", type=int, default=8, help="sequences per step")
    ap.add_argument("--micro-batch", type=int, default=0, help="sequences per forward/backward (0: the batch)")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--models", default="dense,moe")
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--dense-layers", type=int, default=7)
    ap.add_argument("--moe-layers", type=int, default=8)
    ap.add_argument("--mtp-layers", type=int, default=0, help="MTP modules of the MoE (sputnik's side only)")
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--no-doc-mask", action="store_true", help="plain causal attention across packed documents")
    ap.add_argument("--peak-n", type=int, default=1024, help="n of the n x n matmul that sets the MFU denominator")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default, one per core)")
    ap.add_argument("--skip-transformers", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    archs = [a.strip() for a in args.models.split(",") if a.strip()]
    if not args.steps or any(a not in ("dense", "moe") for a in archs):
        ap.error("--steps must be > 0 and --models a list of dense, moe")
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    load_before = os.getloadavg()[0]  # another busy process on the cores skews every figure: it is reported
    start = time.perf_counter()

    peaks: list[float] = []
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="train_mfu_") as tmp_name:
        tmp = Path(tmp_name)
        n_windows = (args.warmup + args.steps) * args.batch
        shards = synthetic_shards(tmp / "shards", args.vocab, args.seq_len, max(1 << 18, 4 * n_windows * args.seq_len))
        for arch in archs:
            peaks.append(matmul_flops_per_s(args.peak_n, repeats=7))
            print(f"{arch}: sputnik Trainer + PretrainObjective against transformers, alternating", flush=True)
            results[arch] = bench(arch, args, shards, tmp)
    peaks.append(matmul_flops_per_s(args.peak_n, repeats=7))
    peak = max(peaks)

    def med(values: list[float] | None) -> float | None:
        return statistics.median(values[args.warmup:]) if values else None

    for r in results.values():
        toks = r["tokens_per_step"]
        r["sputnik_step_s"] = med(r["sputnik_steps_s"])
        r["sputnik_tok_s"] = toks / r["sputnik_step_s"]
        r["sputnik_mfu"] = r["sputnik_tok_s"] * r["flops_per_token"] / peak
        s = med(r["hf_steps_s"])
        r["hf_step_s"], r["hf_tok_s"] = s, (toks / s if s else None)
        r["hf_mfu"] = r["hf_tok_s"] * r["hf_flops_per_token"] / peak if s else None
        r["vs"] = r["sputnik_tok_s"] / r["hf_tok_s"] if s else None
        r["step1_loss_diff"] = abs(r["sputnik_ce"][0] - r["hf_loss"][0]) if r["hf_loss"] else None

    tokens = args.batch * args.seq_len
    print(f"\nTraining step, fp32, AdamW (fused), seq_len {args.seq_len} x batch {args.batch} = {tokens} tokens/step, "
          f"median of {args.steps} steps after {args.warmup} warm-up")
    print(machine.line())
    print(f"matmul peak {peak / 1e9:.1f} GFLOP/s ({args.peak_n}x{args.peak_n} fp32, best of "
          f"{', '.join(f'{p / 1e9:.1f}' for p in peaks)}); load average {load_before:.2f} before, "
          f"{os.getloadavg()[0]:.2f} after")
    head = (f"{'model':<7}{'engine':<14}{'params':>9}{'active':>9}{'MFLOP/tok':>11}{'step s':>9}{'tok/s':>9}"
            f"{'MFU':>8}{'loss@1':>9}{'loss@end':>10}{'sputnik/tf':>12}")
    print(head)
    for arch, r in results.items():
        M = 1e6
        vs = f"{r['vs']:.2f}x" if r["vs"] else "-"
        print(f"{arch:<7}{'sputnik':<14}{r['params'] / M:>8.1f}M{r['active_params'] / M:>8.1f}M"
              f"{r['flops_per_token'] / M:>11.1f}{r['sputnik_step_s']:>9.2f}{r['sputnik_tok_s']:>9.0f}"
              f"{r['sputnik_mfu']:>8.1%}{r['sputnik_ce'][0]:>9.4f}{r['sputnik_ce'][-1]:>10.4f}"
              f"{vs:>12}")
        if r["hf_tok_s"]:
            print(f"{'':<7}{'transformers':<14}{r['params'] / M:>8.1f}M{r['active_params'] / M:>8.1f}M"
                  f"{r['hf_flops_per_token'] / M:>11.1f}{r['hf_step_s']:>9.2f}{r['hf_tok_s']:>9.0f}"
                  f"{r['hf_mfu']:>8.1%}{r['hf_loss'][0]:>9.4f}{r['hf_loss'][-1]:>10.4f}{'':>12}")
        else:
            print(f"{'':<7}{'transformers':<14}  failed or skipped: {r['hf_error']}")
    print("params: dense counts its tied embedding once; active = sputnik's active_params (embedding lookup and "
          "unrouted experts excluded, output head included). loss = next-token CE (step 1 must agree).")
    for arch, r in results.items():
        if r.get("hf_impl"):
            print(f"transformers {arch}: {r['hf_impl']['class']}, attention {r['hf_impl']['attention']}, "
                  f"experts {r['hf_impl']['experts']}")

    def rnd(x, nd=3):
        return round(x, nd) if isinstance(x, float) else x

    try:
        import transformers

        tf_version = transformers.__version__
    except ImportError:
        tf_version = None
    figures: dict = {}
    for arch, r in results.items():
        figures.update({
            f"{arch}_mfu": rnd(r["sputnik_mfu"], 4),
            f"{arch}_vs_transformers": rnd(r["vs"]),
            f"{arch}_mfu_vs_transformers": rnd(r["sputnik_mfu"] / r["hf_mfu"]) if r["hf_mfu"] else None,
            f"{arch}_tok_s": rnd(r["sputnik_tok_s"], 1),
            f"transformers_{arch}_tok_s": rnd(r["hf_tok_s"], 1),
            f"transformers_{arch}_mfu": rnd(r["hf_mfu"], 4),
            f"{arch}_step_s": rnd(r["sputnik_step_s"]),
            f"transformers_{arch}_step_s": rnd(r["hf_step_s"]),
            f"{arch}_params": r["params"],
            f"{arch}_non_embedding_params": r["non_embedding_params"],
            f"{arch}_active_params": r["active_params"],
            f"{arch}_flops_per_token": round(r["flops_per_token"]),
            f"transformers_{arch}_flops_per_token": round(r["hf_flops_per_token"]),
            f"{arch}_step1_loss_diff": rnd(r["step1_loss_diff"], 6),
            f"{arch}_steps_s": [round(s, 3) for s in r["sputnik_steps_s"]],
            f"transformers_{arch}_steps_s": [round(s, 3) for s in r["hf_steps_s"]] if r["hf_steps_s"] else None,
            f"transformers_{arch}_error": r["hf_error"],
            f"transformers_{arch}_impl": r.get("hf_impl"),
        })
    for arch in ("dense", "moe"):  # always present, null when that model was not run
        for key in (f"{arch}_mfu", f"{arch}_vs_transformers"):
            figures.setdefault(key, None)
    figures.update({
        "matmul_gflop_s": round(peak / 1e9, 2), "matmul_gflop_s_samples": [round(p / 1e9, 2) for p in peaks],
        "matmul_n": args.peak_n, "machine": machine.describe(),
        "torch": torch.__version__, "transformers": tf_version,
        "steps": args.steps, "warmup": args.warmup, "batch": args.batch,
        "micro_batch": args.micro_batch or args.batch, "seq_len": args.seq_len, "tokens_per_step": tokens,
        "vocab": args.vocab, "dim": args.dim, "mtp_layers": args.mtp_layers, "doc_mask": not args.no_doc_mask,
        "load_before": round(load_before, 2), "load_after": round(os.getloadavg()[0], 2),
        "wall_s": round(time.perf_counter() - start, 1),
    })
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
