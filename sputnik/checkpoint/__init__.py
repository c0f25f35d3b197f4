"""Checkpoints in and out: HF folders and GGUF files to a Transformer (+ tokenizer), and back to an HF folder."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import Tensor, nn

from sputnik.checkpoint.hf import CheckpointError, load_hf_folder, save_hf_folder
from sputnik.checkpoint.registry import resolve
from sputnik.config import ModelConfig
from sputnik.device import trim_heap
from sputnik.kernels import QTensor, QuantEmbedding, QuantLinear
from sputnik.model import Transformer

__all__ = ["CheckpointError", "load_model", "load_pretrained", "load_state", "save_model", "load_weights"]

_MTP_EXTRA = ("embed_tokens.weight", "shared_head.head.weight")  # copies of the main model's, on disk only


def load_state(path: str | Path, keep_blocks: bool = False) -> tuple[ModelConfig, dict[str, Tensor | QTensor], Path]:
    """(config, HF-named state dict, resolved path) of a registry name, an HF folder or a .gguf file; keep_blocks:
    a GGUF file's quantized matrices stay in their block formats (QTensors)."""
    p = resolve(path)
    if p.is_file() and p.suffix == ".gguf":
        from sputnik.checkpoint.gguf import load_gguf

        hf_cfg, sd = load_gguf(p, keep_blocks=keep_blocks)
    else:
        hf_cfg, sd = load_hf_folder(p)
    try:
        cfg = ModelConfig.from_hf_config(hf_cfg)
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"{p}: unsupported or incomplete config: {e}") from None
    if cfg.n_mtp_layers and not any(k.startswith(f"model.layers.{cfg.n_layers}.") for k in sd):
        cfg.n_mtp_layers = 0  # the config names MTP modules the file does not carry (transformers drops them)
    return cfg, sd, p


def _to_module_names(cfg: ModelConfig, sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Map disk names to ours: MTP modules live on disk as layers n_layers.. and in the model as mtp.k."""
    out = {}
    for name, t in sd.items():
        m = re.match(r"model\.layers\.(\d+)\.(.*)", name)
        if m and int(m.group(1)) >= cfg.n_layers:
            k = int(m.group(1)) - cfg.n_layers
            if k >= cfg.n_mtp_layers or m.group(2) in _MTP_EXTRA:
                continue
            name = f"mtp.{k}.{m.group(2)}"
        out[name] = t
    if cfg.tie_embeddings:
        out.pop("lm_head.weight", None)
    return out


def load_weights(model: Transformer, sd: dict[str, Tensor], source: str | Path) -> None:
    """Copy an HF-named state dict into the model, naming the file and tensor on any missing key or shape mismatch."""
    sd = _to_module_names(model.cfg, sd)
    own = {k: v for k, v in model.state_dict().items() if not k.endswith(".qweight")}  # placed by use_blocks
    if model.cfg.tie_embeddings:
        own.pop("lm_head.weight", None)
    missing = sorted(set(own) - set(sd))
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise CheckpointError(f"{source}: missing tensors {', '.join(missing[:5])}{more}")
    unexpected = sorted(set(sd) - set(own))
    if unexpected:
        more = f" (and {len(unexpected) - 5} more)" if len(unexpected) > 5 else ""
        raise CheckpointError(f"{source}: unexpected tensors {', '.join(unexpected[:5])}{more}")
    for name, t in sd.items():
        if tuple(t.shape) != tuple(own[name].shape):
            raise CheckpointError(
                f"{source}: shape mismatch for {name}: checkpoint has {tuple(t.shape)}, "
                f"the model expects {tuple(own[name].shape)}"
            )
    with torch.no_grad():
        for name, t in sd.items():
            own[name].copy_(t)


QUANTIZE = ("none", "auto", "int8", "int4")
BLOCK_TYPES = {"int8": "Q8_0", "int4": "Q4_1"}  # what --quantize int8 / int4 quantize the matrices to


def load_model(
    path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", quantize: str = "none"
) -> Transformer:
    """A ready model from a registry name, an HF folder or a .gguf file.

    quantize: "none" dequantizes everything to `dtype`; "auto" keeps a GGUF file's quantized matrices in their
    blocks where the kernels run (the CPU, with a compiler), multiplied as they are; "int8" / "int4" quantize the
    matrices of any checkpoint to Q8_0 / Q4_1 blocks (weight-only, groups of 32), a GGUF file's blocks kept, on any
    device (on a GPU the blocks stay in its memory and are decoded by torch operators for each product).
    """
    if quantize not in QUANTIZE:
        raise ValueError(f"unknown quantize {quantize!r}: use one of {', '.join(QUANTIZE)}")
    from sputnik import kernels

    if torch.device(device).type == "cpu":
        blocks = quantize != "none" and kernels.available()
    else:  # a GPU keeps blocks only when asked by name: decoding them for each product costs time
        blocks = quantize in ("int8", "int4")
    cfg, sd, p = load_state(path, keep_blocks=blocks)
    if blocks and quantize in BLOCK_TYPES:
        sd = quantize_state(sd, BLOCK_TYPES[quantize])
    if not blocks:
        sd = {k: v.dequantize() if isinstance(v, QTensor) else v for k, v in sd.items()}
    model = build_model(cfg, sd, dtype, device, p)
    del sd
    trim_heap()
    return model


def build_model(cfg: ModelConfig, sd: dict[str, Tensor | QTensor], dtype: torch.dtype = torch.float32,
                device: str | torch.device = "cpu", source: str | Path = "state dict") -> Transformer:
    """The model of `cfg` holding `sd` (HF names; QTensors become block layers), in eval mode: load_model's last
    step, and how a quantized copy of a model in memory is made (quantize_state of its state_dict())."""
    with torch.device("meta"):
        model = Transformer(cfg)
    sd = use_blocks(model, _to_module_names(cfg, sd), dtype)
    # No random init, every tensor is about to be overwritten; and only the meta ones: the blocks are already real.
    # torch.empty, not empty_like: a meta tensor's empty_like imports sympy's shape machinery (~35 MB, a second).
    model = model._apply(lambda t: torch.empty(t.shape, dtype=t.dtype, device=device) if t.is_meta else t)
    if cfg.tie_embeddings and isinstance(model.lm_head, torch.nn.Linear):
        model.lm_head.weight = model.model.embed_tokens.weight
    load_weights(model, sd, source)
    return model.to(device=device, dtype=dtype).eval()  # the device: block buffers come from the file on the CPU


def quantized_copy(model: nn.Module, quantize: str = "int8") -> Transformer:
    """A copy of a model in memory with its matrices in int8 / int4 blocks (adapters folded in), on its device: what
    GRPO samples its rollouts from when asked to, made again after each update."""
    if quantize not in BLOCK_TYPES:
        raise ValueError(f"unknown quantize {quantize!r}: int8 or int4")
    weight = next(model.parameters())
    sd = {k: v.detach() for k, v in merged_state_dict(model).items()}
    if model.cfg.tie_embeddings:  # one matrix under two names: quantized once, its blocks shared by the head
        sd.pop("lm_head.weight", None)
    return build_model(model.cfg, quantize_state(sd, BLOCK_TYPES[quantize]), torch.float32, weight.device)


def quantize_state(sd: dict[str, Tensor | QTensor], type_name: str) -> dict[str, Tensor | QTensor]:
    """Every dense linear / embedding matrix (2-d, rows a multiple of 32 wide) of a state dict in `type_name`
    blocks (checkpoint.quants); norms, biases, routers and MLA's kv_b_proj (read as a matrix) stay."""
    from sputnik.checkpoint.quants import quantize_tensor
    from sputnik.kernels import TYPE_IDS

    out: dict[str, Tensor | QTensor] = {}
    for name, t in sd.items():
        skip = ("kv_b_proj", ".gate.weight", "norm")
        if isinstance(t, QTensor) or t.dim() != 2 or t.shape[1] % 32 or any(s in name for s in skip):
            out[name] = t
            continue
        out[name] = QTensor(quantize_tensor(t, type_name), TYPE_IDS[type_name], tuple(t.shape))
    return out


def use_blocks(model: Transformer, sd: dict[str, Tensor | QTensor], dtype: torch.dtype) -> dict[str, Tensor]:
    """Swap in a QuantLinear / QuantEmbedding for each module whose weight the (module-named) state dict holds as
    a QTensor (a tied lm_head shares the embedding's blocks); the dense rest is returned for load_weights."""
    dense = {k: v for k, v in sd.items() if not isinstance(v, QTensor)}
    for name, q in sd.items():
        if not isinstance(q, QTensor):
            continue
        path = name.removesuffix(".weight")
        parent, _, attr = path.rpartition(".")
        old = model.get_submodule(path)
        if isinstance(old, torch.nn.Embedding):
            new = QuantEmbedding(q, dtype)
            if model.cfg.tie_embeddings and path == "model.embed_tokens":
                model.lm_head = QuantLinear(q)
        else:
            new = QuantLinear(q, None if old.bias is None else torch.empty_like(old.bias, device="meta"))
        setattr(model.get_submodule(parent) if parent else model, attr, new)
    return dense


def load_pretrained(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                    quantize: str = "none"):
    """(model, tokenizer) from a registry name, an HF folder or a .gguf file (quantize: see load_model)."""
    from sputnik.tokenizer import Tokenizer
    from sputnik.tokenizer.gguf import open_gguf

    p = resolve(path)
    held = open_gguf(p) if p.suffix == ".gguf" else None  # noqa: F841 (parsed once for both loaders; freed on return)
    return load_model(p, dtype=dtype, device=device, quantize=quantize), Tokenizer.load(p)


def merged_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The state dict to save: a layer with adapters (one with a merged_weight(), as train/lora's LoRALinear) is saved
    as its merged weight without its adapter tensors, so the folder holds a plain model."""
    sd = model.state_dict()
    for name, module in model.named_modules():
        if hasattr(module, "merged_weight"):
            prefix = f"{name}." if name else ""
            for own, _ in module.named_parameters(recurse=False):
                if own not in ("weight", "bias"):
                    sd.pop(prefix + own)
            sd[prefix + "weight"] = module.merged_weight().detach()
    return sd


def save_model(model: Transformer, path: str | Path, tokenizer=None, max_shard_bytes: int = 2 << 30) -> Path:
    """Write an HF folder (config.json, safetensors, tokenizer files) that transformers and vLLM load."""
    cfg = model.cfg
    sd: dict[str, Tensor] = {}
    for name, t in merged_state_dict(model).items():
        m = re.match(r"mtp\.(\d+)\.(.*)", name)
        if m:
            prefix = f"model.layers.{cfg.n_layers + int(m.group(1))}."
            sd[prefix + m.group(2)] = t
            sd[prefix + "embed_tokens.weight"] = model.model.embed_tokens.weight
            sd[prefix + "shared_head.head.weight"] = model.lm_head.weight
        else:
            sd[name] = t
    if cfg.tie_embeddings:
        sd.pop("lm_head.weight", None)
    path = Path(path)
    save_hf_folder(path, cfg.to_hf_config(), sd, max_shard_bytes=max_shard_bytes)
    if tokenizer is not None:
        tokenizer.save(path)
    return path
