"""Pretraining as an objective of the shared loop: next-token loss over packed token shards, DeepSeek-V3's MTP loss
(weight λ), its sequence-wise balance loss (α) and aux-loss-free router bias update (γ), tokens/s and MFU."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sputnik.config import ModelConfig
from sputnik.model import MoE, Routing, Transformer, build_doc_mask
from sputnik.settings import option
from sputnik.train.data import TokenShards, document_ids, document_positions
from sputnik.train.loop import RankAware, TrainConfig, all_reduce_sum


@dataclass
class PretrainConfig:
    """Data, batch and the V3 training terms; model shapes come from a ModelConfig (see nano_config)."""

    data: str = option("", "a token shard folder (sputnik.train.data.write_shards); or give --text")
    seq_len: int = option(256, "tokens per training sequence")
    batch_size: int = option(16, "sequences per step, per rank")
    micro_batch: int = option(8, "sequences per forward/backward")
    mask_documents: bool = option(True, "packed documents never attend across their EOS")
    mtp_lambda: float = option(0.3, "weight of the multi-token-prediction loss (mean over depths)")
    balance_alpha: float = option(1e-4, "sequence-wise balance loss weight (summed over MoE layers)")
    bias_update_gamma: float = option(0.001, "aux-loss-free balancing: b += gamma * sign(mean load - load)")
    init_std: float = option(0.02, "std of the initial weights")


@dataclass
class ModelShape:
    """The model a pretraining run builds (see nano_config) and the tokenizer it reads text with."""

    tokenizer: str = option("", "a tokenizer folder (sputnik train tokenizer) or any loadable model's tokenizer")
    arch: str = option("moe", "moe: MLA + MoE + MTP (DeepSeek-V3 style); dense: Llama", choices=["moe", "dense"])
    dim: int = option(128, "model width")
    n_layers: int = option(4, "transformer blocks")
    n_heads: int = option(4, "attention heads")
    max_seq_len: int = option(512, "longest sequence the model is built for")


def shards_from_text(files: list[str], tokenizer, out: Path) -> str:
    """Tokenize text/JSONL files (documents as `sputnik train tokenizer` reads them) into token shards."""
    from sputnik.train.data import write_shards
    from sputnik.train.tokenizer import iter_texts

    eos = tokenizer.eos_id
    if eos is None:
        raise ValueError("the tokenizer has no end-of-text token to separate documents")
    docs = (tokenizer.encode(text) for text in iter_texts([Path(f) for f in files]))
    write_shards(docs, out, tokenizer.vocab_size, eos)
    return str(out)


def nano_config(vocab_size: int, arch: str = "moe", dim: int = 128, n_layers: int = 4, n_heads: int = 4,
                max_seq_len: int = 512, **overrides: Any) -> ModelConfig:
    """A small DeepSeek-V3-style model (MLA + MoE + 1 MTP module), or a dense Llama of the same width."""
    if arch == "dense":
        kw: dict[str, Any] = dict(family="llama", n_kv_heads=n_heads, inter_dim=4 * dim, tie_embeddings=True)
    elif arch == "moe":
        head = dim // n_heads
        kw = dict(family="deepseek_v3", n_kv_heads=n_heads, inter_dim=4 * dim, kv_lora_rank=dim // 2,
                  q_lora_rank=None, qk_nope_head_dim=head, qk_rope_head_dim=head // 2, v_head_dim=head,
                  n_routed_experts=8, n_shared_experts=1, moe_inter_dim=dim, n_activated_experts=2,
                  first_k_dense_replace=1, n_mtp_layers=1, routed_scaling_factor=1.0)
    else:
        raise ValueError(f"arch must be 'moe' or 'dense', not {arch!r}")
    kw.update(overrides)
    return ModelConfig(vocab_size=vocab_size, dim=dim, n_layers=n_layers, n_heads=n_heads, max_seq_len=max_seq_len,
                       **kw)


def init_weights(model: Transformer, std: float, seed: int) -> None:
    """Normal(0, std) matrices and embeddings, zero biases, unit norms, zero router bias: V3's recipe at small std."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.fill_(1.0)
        for m in model.modules():
            if isinstance(m, MoE):
                m.gate.e_score_correction_bias.zero_()


def active_params(model: Transformer) -> int:
    """Parameters one token passes through: everything but the embedding table and the experts it was not routed to
    (a tied lm_head counts once, as the output projection)."""
    total = sum(p.numel() for p in model.parameters())
    if not model.cfg.tie_embeddings:
        total -= model.model.embed_tokens.weight.numel()
    for m in model.modules():
        if isinstance(m, MoE):
            per_expert = sum(p.numel() for p in m.experts[0].parameters())
            total -= per_expert * (len(m.experts) - m.gate.top_k)
    return total


def flops_per_token(model: Transformer, seq_len: int) -> float:
    """Training FLOPs per token: 6 per active parameter, plus causal attention's score and value products."""
    cfg = model.cfg
    qk = (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim) if cfg.is_mla else cfg.head_dim
    v = cfg.v_head_dim if cfg.is_mla else cfg.head_dim
    layers = cfg.n_layers + cfg.n_mtp_layers
    attention = 6 * layers * cfg.n_heads * (qk + v) * seq_len / 2  # forward 2·T/2·(qk+v) per head, ×3 with backward
    return 6 * active_params(model) + attention


def matmul_flops_per_s(n: int = 1024, repeats: int = 5) -> float:
    """This machine's fp32 matmul rate at a training-sized shape (the MFU denominator), measured now."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    return 2 * n**3 / sorted(times)[len(times) // 2]


class PretrainObjective(RankAware):
    """Next-token (+ MTP, + balance) loss on random windows of the token shards, seeded per (seed, step)."""

    iterations = 1

    def __init__(self, model: Transformer, cfg: PretrainConfig, seed: int = 0, peak_flops: float | None = None):
        self.cfg, self.seed = cfg, seed
        self.shards = TokenShards(cfg.data)
        self.moes = [layer.mlp for layer in model.model.layers if isinstance(layer.mlp, MoE)]
        self.routers = Routers(self.moes)
        self.loads = [torch.zeros(len(m.experts)) for m in self.moes]
        self.load_log: list[list[list[float]]] = []  # per step: per layer, each expert's share of the tokens
        self.flops_per_token = flops_per_token(model, cfg.seq_len)
        self.peak = peak_flops or matmul_flops_per_s()
        self._t0 = 0.0

    def prepare(self, step: int, model: nn.Module) -> list[Tensor]:
        self._t0 = time.perf_counter()
        # The step's global batch is drawn once and split by rank, so N processes train on what one would.
        rng = np.random.default_rng([self.seed, step])
        B = self.cfg.batch_size
        windows = self.shards.windows(rng, B * self.world, self.cfg.seq_len + 1)[self.rank * B : (self.rank + 1) * B]
        windows = torch.from_numpy(np.ascontiguousarray(windows))
        self.global_tokens = self.cfg.batch_size * self.cfg.seq_len * self.world
        self.global_seqs = self.cfg.batch_size * self.world
        return list(windows.split(self.cfg.micro_batch))

    def loss(self, model: nn.Module, micro: Tensor) -> tuple[Tensor, dict[str, float]]:
        cfg = self.cfg
        device = next(model.parameters()).device
        x, y = micro[:, :-1], micro[:, 1:].to(device)
        doc = positions = mask = None
        if cfg.mask_documents:
            d = document_ids(x.numpy(), self.shards.eos_id)
            doc, positions = torch.from_numpy(d).to(device), torch.from_numpy(document_positions(d)).to(device)
            mask = build_doc_mask(doc)
        x = x.to(device)
        # (FSDP: the root keeps its embedding and head gathered after hidden() for the head and MTP, see loop._shard)
        h = model.hidden(x, positions, mask=mask)
        ce = F.cross_entropy(model.logits(h).flatten(0, 1).float(), y.flatten(), reduction="sum")
        loss = ce / self.global_tokens
        metrics = {"ce": ce.item() / y.numel()}
        depths = mtp_logits(model, h, x, positions, doc) if cfg.mtp_lambda and model.cfg.n_mtp_layers else []
        if depths:
            mtp = sum(F.cross_entropy(lk.flatten(0, 1).float(), y[:, k:].flatten(), reduction="sum")
                      for k, lk in enumerate(depths, start=1)) / len(depths)
            loss = loss + cfg.mtp_lambda * mtp / self.global_tokens
            metrics["mtp_ce"] = mtp.item() / y.numel()
        if self.moes:
            routes = self.routers.take()
            balance = sum(sequence_balance(r, x.shape[0]) for r in routes)
            if cfg.balance_alpha:
                loss = loss + cfg.balance_alpha * balance / self.global_seqs
            metrics["balance"] = balance.item() / x.shape[0]
            for acc, r in zip(self.loads, routes):
                acc += torch.bincount(r.experts.flatten(), minlength=len(acc)).float().cpu()
        return loss, metrics

    def after_update(self, model: nn.Module) -> None:
        """Aux-loss-free balancing: nudge each router's bias toward the experts the step under-used (all ranks agree:
        the loads are summed over ranks first)."""
        if not self.moes:
            return
        shares = []
        for acc, m in zip(self.loads, self.moes):
            bias = m.gate.e_score_correction_bias
            load = all_reduce_sum(acc.to(bias.device, copy=True)).cpu()
            if self.cfg.bias_update_gamma:
                bias += (self.cfg.bias_update_gamma * torch.sign(load.mean() - load)).to(bias)
            shares.append((load / load.sum().clamp(min=1)).tolist())
            acc.zero_()
        self.load_log.append(shares)

    def metrics(self, step: int) -> dict[str, float]:
        seconds = max(time.perf_counter() - self._t0, 1e-9)
        out = {"tokens": float(self.global_tokens), "tokens_per_s": self.global_tokens / seconds,
               "mfu": self.global_tokens * self.flops_per_token / seconds / (self.peak * self.world)}
        if self.load_log:
            shares = np.array(self.load_log[-1])  # [layers, experts]
            out["expert_max_share"] = float((shares.max(-1) * shares.shape[-1]).mean())  # 1.0 = perfectly even
        return out

    def state_dict(self) -> dict:
        return {"load_log": self.load_log}

    def load_state_dict(self, state: dict) -> None:
        self.load_log = state.get("load_log", [])


def mtp_logits(model: Transformer, h: Tensor, tokens: Tensor, positions: Tensor | None = None,
               doc_ids: Tensor | None = None) -> list[Tensor]:
    """Logits of each MTP depth k: row i of depth k predicts token i + k + 1 (DeepSeek-V3 §2.2).

    h is model.hidden() of `tokens`; depth k combines depth k-1's states with the embedding of token i + k, so depth
    k returns [B, T - k, vocab]. Row i belongs to the document of h_i: packed rows (doc_ids) keep their block-diagonal
    mask here too.
    """
    B, T = tokens.shape
    out = []
    for k, layer in enumerate(model.mtp, start=1):
        n = T - k
        if n <= 0:
            break
        pos = positions[:, :n] if positions is not None else torch.arange(n, device=tokens.device).expand(B, n)
        cos, sin = model.rotary(pos)
        mask = build_doc_mask(doc_ids[:, :n]) if doc_ids is not None else None
        h, normed = layer(h[:, :n], model.model.embed_tokens(tokens[:, k : k + n]), cos, sin, mask)
        out.append(model.lm_head(normed))
    return out


class Routers:
    """Forward hooks on MoE layers' gates that keep each training forward's routing (scores with their graph), for
    the sequence-wise balance loss and the expert loads of the bias update; `take` hands them over."""

    def __init__(self, moes: list[MoE]):
        self.last: list[Routing | None] = [None] * len(moes)
        for i, moe in enumerate(moes):
            moe.gate.register_forward_hook(self._keeper(i))

    def _keeper(self, i: int):
        def keep(gate: nn.Module, args: Any, route: Routing) -> None:
            if gate.training:
                self.last[i] = route
        return keep

    def take(self) -> list[Routing]:
        """Every gate's routing in the last training forward (each gate must have run since the last take)."""
        routes, self.last = self.last, [None] * len(self.last)
        if any(r is None for r in routes):
            raise RuntimeError("a MoE gate did not run in training mode since the last take()")
        return routes  # type: ignore[return-value]


def sequence_balance(route: Routing, batch: int) -> Tensor:
    """Σ over sequences of Σ_i f_i·P_i for one MoE layer's routing of `batch` rows (DeepSeek-V3's sequence-wise
    balance loss): f_i = E/(K·T) × tokens of the sequence routed to expert i, P_i = mean over its tokens of the
    normalised score."""
    scores, chosen = route.scores, route.experts
    E, K = scores.shape[-1], chosen.shape[-1]
    scores = scores.view(batch, -1, E)
    T = scores.shape[1]
    counts = torch.zeros(batch, E, device=scores.device).scatter_add_(
        1, chosen.view(batch, -1), torch.ones(batch, T * K, device=scores.device))
    f = counts * E / (K * T)
    p = (scores / scores.sum(-1, keepdim=True)).mean(1)
    return (f * p).sum()


def plot_expert_load(load_log: list[list[list[float]]], path: Path) -> None:
    """Each MoE layer's expert shares over the run (one panel per layer; 1/E is perfect balance)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arr = np.array(load_log)  # [steps, layers, experts]
    layers = arr.shape[1]
    fig, axes = plt.subplots(1, layers, figsize=(4 * layers, 3), squeeze=False)
    for i, ax in enumerate(axes[0]):
        ax.imshow(arr[:, i].T, aspect="auto", cmap="viridis", interpolation="nearest")
        ax.set_title(f"MoE layer {i}: expert share")
        ax.set_xlabel("step")
        ax.set_ylabel("expert")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def train_pretrain(model_cfg: ModelConfig, cfg: PretrainConfig, train: TrainConfig, tokenizer=None) -> dict:
    """Build a model from model_cfg, pretrain it with the shared loop (resuming from out_dir's checkpoints if any);
    the last checkpoint is an HF folder (LlamaForCausalLM / DeepseekV3ForCausalLM). Writes summary.json."""
    from sputnik.train.loop import Trainer

    start = time.perf_counter()
    torch.manual_seed(train.seed)
    model = Transformer(model_cfg)
    init_weights(model, cfg.init_std, train.seed)
    objective = PretrainObjective(model, cfg, seed=train.seed)
    trainer = Trainer(model, train, objective, tokenizer=tokenizer)
    resumed = trainer.resume()
    last = trainer.run()
    out = Path(train.out_dir)
    summary = {"model": asdict(model_cfg), "pretrain": asdict(cfg), "steps": train.max_steps, "resumed_from": resumed,
               "loss": last.get("loss"), "ce": last.get("ce"), "tokens_per_s": last.get("tokens_per_s"),
               "mfu": last.get("mfu"), "active_params": active_params(model),
               "params": sum(p.numel() for p in model.parameters()),
               "minutes": round((time.perf_counter() - start) / 60, 2),
               "checkpoint": str(out / "checkpoints" / f"step_{train.max_steps:06d}")}
    if trainer.master:
        out.mkdir(parents=True, exist_ok=True)
        if objective.load_log:
            plot_expert_load(objective.load_log, out / "expert_load.png")
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
