"""Read and write Hugging Face checkpoint folders (config.json + safetensors).

Tensors keep the exact names found in official checkpoints on disk, so the
model's ``state_dict()`` can load them as they are. Two on-disk variants are
normalised here so callers never see them:

* MoE experts fused into ``mlp.experts.gate_up_proj`` / ``mlp.experts.down_proj``
  (transformers 5 keeps them this way in memory and writes them so with
  ``save_pretrained(..., save_original_format=False)``) are split back into
  ``mlp.experts.{j}.gate_proj.weight`` etc.
* FP8 block-quantised weights (the official DeepSeek-V3/R1 release) are
  dequantised with their ``weight_scale_inv`` and the scale tensors dropped.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Iterable, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import save_file

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "deepseek_v3")

# Mistral checkpoints without a sliding window are Llama checkpoints under another name.
_ALIASES = {"mistral": "llama"}

_ARCHITECTURE_TO_TYPE = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "DeepseekV3ForCausalLM": "deepseek_v3",
}

CONFIG_NAME = "config.json"
SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
TORCH_WEIGHTS = "pytorch_model.bin"
TORCH_INDEX = "pytorch_model.bin.index.json"

DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3

_FUSED_GATE_UP = re.compile(r"^(?P<prefix>.*\.experts)\.gate_up_proj(?:\.weight)?$")
_FUSED_DOWN = re.compile(r"^(?P<prefix>.*\.experts)\.down_proj(?:\.weight)?$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read: missing, corrupt, or of an unsupported kind."""


def model_family(config: Mapping) -> str:
    """The supported family ('llama', 'qwen2', 'qwen3', 'deepseek_v3') of an HF config.

    Raises CheckpointError for anything else. Mistral counts as llama only when it
    has no sliding window, because then the two compute the same function.
    """
    model_type = config.get("model_type")
    if model_type is None:
        for arch in config.get("architectures") or []:
            if arch in _ARCHITECTURE_TO_TYPE:
                model_type = _ARCHITECTURE_TO_TYPE[arch]
                break
    if model_type in SUPPORTED_MODEL_TYPES:
        return model_type
    if model_type in _ALIASES and not _has_sliding_window(config):
        return _ALIASES[model_type]
    shown = model_type or config.get("architectures")
    raise CheckpointError(
        f"unsupported architecture {shown!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        " (and mistral without sliding window)"
    )


def _has_sliding_window(config: Mapping) -> bool:
    window = config.get("sliding_window")
    return window is not None and window < config.get("max_position_embeddings", 0)


def load_hf_folder(
    path: str | Path, dtype: torch.dtype | None = None
) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read ``config.json`` and all weights of an HF folder.

    Returns ``(config, state_dict)`` with on-disk HF tensor names (per-expert MoE
    keys). ``dtype`` casts floating tensors; None keeps what is stored (FP8 weights
    are always dequantised, to bfloat16 when ``dtype`` is None).
    """
    folder = Path(path).expanduser()
    if not folder.exists():
        raise CheckpointError(f"no such file or folder: {folder}")
    if not folder.is_dir():
        raise CheckpointError(f"not a checkpoint folder (expected a directory): {folder}")

    config = read_config(folder)
    try:
        model_family(config)
    except CheckpointError as err:
        raise CheckpointError(f"{folder / CONFIG_NAME}: {err}") from None

    state_dict = _read_weights(folder)
    block = (config.get("quantization_config") or {}).get("weight_block_size") or [128, 128]
    state_dict = _dequantize_fp8(state_dict, block, dtype or torch.bfloat16)
    state_dict = _split_fused_experts(state_dict, config)
    if dtype is not None:
        state_dict = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
    fp8 = (config.get("quantization_config") or {}).get("quant_method") == "fp8"
    if fp8 and not any(k.endswith(".weight_scale_inv") for k in state_dict):
        # The weights are plain floats now, so a leftover fp8 quantization_config would lie.
        config = {k: v for k, v in config.items() if k != "quantization_config"}
    return config, state_dict


def read_config(folder: str | Path) -> dict:
    """Parse ``folder/config.json``, with errors that name the file."""
    config_path = Path(folder) / CONFIG_NAME
    if not config_path.is_file():
        raise CheckpointError(f"config.json missing: no such file {config_path}")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"cannot parse {config_path}: {err}") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_path} does not hold a JSON object")
    return config


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of the folder, following transformers' file preference order."""
    if (folder / SAFE_WEIGHTS).is_file():
        return _read_safetensors(folder / SAFE_WEIGHTS)
    if (folder / SAFE_INDEX).is_file():
        return _read_index(folder / SAFE_INDEX, _read_safetensors)
    loose = sorted(p for p in folder.glob("*.safetensors") if p.is_file())
    if loose:
        state_dict: dict[str, torch.Tensor] = {}
        for file in loose:
            state_dict.update(_read_safetensors(file))
        return state_dict
    if (folder / TORCH_WEIGHTS).is_file():
        return _read_torch_bin(folder / TORCH_WEIGHTS)
    if (folder / TORCH_INDEX).is_file():
        return _read_index(folder / TORCH_INDEX, _read_torch_bin)
    raise CheckpointError(
        f"no weights in {folder}: expected {SAFE_WEIGHTS}, {SAFE_INDEX}, *.safetensors or {TORCH_WEIGHTS}"
    )


def _read_index(index_path: Path, read_file) -> dict[str, torch.Tensor]:
    """Read the shards listed in a ``*.index.json`` weight map."""
    try:
        weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise CheckpointError(f"cannot parse shard index {index_path}: {err!r}") from None

    shards = sorted(set(weight_map.values()))
    missing = [s for s in shards if not (index_path.parent / s).is_file()]
    if missing:
        raise CheckpointError(
            f"shard index {index_path} points to missing shard file(s): {', '.join(missing)}"
        )
    state_dict: dict[str, torch.Tensor] = {}
    for shard in shards:
        state_dict.update(read_file(index_path.parent / shard))
    absent = [name for name in weight_map if name not in state_dict]
    if absent:
        raise CheckpointError(
            f"shard index {index_path} lists {len(absent)} tensor(s) not found in the shards,"
            f" e.g. {absent[0]!r} expected in {weight_map[absent[0]]}"
        )
    return state_dict


def _read_safetensors(file: Path) -> dict[str, torch.Tensor]:
    """Every tensor of one safetensors file; a damaged file becomes a CheckpointError."""
    try:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            return {name: f.get_tensor(name) for name in f.keys()}
    except Exception as err:  # safetensors raises its own SafetensorError and OSError/RuntimeError
        raise CheckpointError(
            f"safetensors file {file} is truncated or corrupt ({type(err).__name__}: {err})"
        ) from None


def _read_torch_bin(file: Path) -> dict[str, torch.Tensor]:
    """A legacy pickled state dict, read without executing arbitrary code."""
    try:
        state_dict = torch.load(str(file), map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:
        raise CheckpointError(f"cannot read {file}: truncated or corrupt ({type(err).__name__}: {err})") from None
    if not isinstance(state_dict, dict):
        raise CheckpointError(f"{file} does not hold a state dict")
    return dict(state_dict)


def _dequantize_fp8(
    state_dict: dict[str, torch.Tensor], block: list[int], dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """Turn FP8 ``weight`` + ``weight_scale_inv`` pairs into plain ``dtype`` weights.

    The scale holds one factor per ``block`` tile of the weight (the last tiles of
    a row or column may be partial), as in the official DeepSeek-V3 release.
    """
    scales = [k for k in state_dict if k.endswith(".weight_scale_inv")]
    if not scales:
        return state_dict
    out = dict(state_dict)
    for scale_key in scales:
        weight_key = scale_key[: -len("_scale_inv")]
        weight = out.get(weight_key)
        if weight is None:
            continue
        scale = out.pop(scale_key).float()
        rows, cols = weight.shape
        if scale.shape != (math.ceil(rows / block[0]), math.ceil(cols / block[1])):
            raise CheckpointError(
                f"{scale_key} has shape {tuple(scale.shape)}, which does not tile"
                f" {weight_key} {tuple(weight.shape)} in {block[0]}x{block[1]} blocks"
            )
        full = scale.repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]
        out[weight_key] = (weight.float() * full).to(dtype)
    return out


def _split_fused_experts(state_dict: dict[str, torch.Tensor], config: Mapping) -> dict[str, torch.Tensor]:
    """Replace fused 3-D expert tensors by the per-expert names used on disk.

    transformers 5 fuses experts as ``gate_up_proj`` [E, 2I, D] (gate rows first)
    and ``down_proj`` [E, D, I]. A transposed variant ([E, D, 2I] / [E, I, D]) is
    recognised when the hidden size makes the layout unambiguous.
    """
    hidden = config.get("hidden_size")
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state_dict.items():
        gate_up = _FUSED_GATE_UP.match(name)
        down = _FUSED_DOWN.match(name)
        if tensor.dim() != 3 or not (gate_up or down):
            out[name] = tensor
            continue
        if gate_up:
            if tensor.shape[2] != hidden and tensor.shape[1] == hidden:
                tensor = tensor.transpose(1, 2)
            gate, up = tensor.chunk(2, dim=1)
            for j in range(tensor.shape[0]):
                out[f"{gate_up['prefix']}.{j}.gate_proj.weight"] = gate[j].contiguous()
                out[f"{gate_up['prefix']}.{j}.up_proj.weight"] = up[j].contiguous()
        else:
            if tensor.shape[1] != hidden and tensor.shape[2] == hidden:
                tensor = tensor.transpose(1, 2)
            for j in range(tensor.shape[0]):
                out[f"{down['prefix']}.{j}.down_proj.weight"] = tensor[j].contiguous()
    return out


def save_hf_folder(
    path: str | Path,
    config: Mapping,
    state_dict: Mapping[str, torch.Tensor],
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> Path:
    """Write ``config.json`` and safetensors weights that transformers can load.

    One ``model.safetensors`` when everything fits in ``max_shard_bytes``, else
    ``model-0000k-of-0000n.safetensors`` shards plus ``model.safetensors.index.json``.
    ``lm_head.weight`` is left out only when the config ties it to the embeddings.
    """
    folder = Path(path).expanduser()
    folder.mkdir(parents=True, exist_ok=True)

    tensors = _tensors_to_save(state_dict, config)
    shards = _plan_shards(tensors, max_shard_bytes)

    # Stale weights from an earlier save would shadow or mix with the new ones.
    for old in _own_weight_files(folder):
        old.unlink()

    (folder / CONFIG_NAME).write_text(json.dumps(dict(config), indent=2, sort_keys=False) + "\n", encoding="utf-8")
    metadata = {"format": "pt"}  # transformers checks this field when loading
    if len(shards) == 1:
        save_file(shards[0], str(folder / SAFE_WEIGHTS), metadata=metadata)
        return folder

    weight_map: dict[str, str] = {}
    for k, shard in enumerate(shards, start=1):
        file_name = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / file_name), metadata=metadata)
        weight_map.update({name: file_name for name in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return folder


def _tensors_to_save(state_dict: Mapping[str, torch.Tensor], config: Mapping) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors, each owning its whole storage (safetensors refuses shared memory)."""
    tied = bool(config.get("tie_word_embeddings", False))
    seen: set[int] = set()
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in state_dict.items():
        if tied and name == "lm_head.weight":
            continue
        tensor = tensor.detach().to("cpu").contiguous()
        storage = tensor.untyped_storage()
        if storage.data_ptr() in seen or storage.nbytes() != tensor.numel() * tensor.element_size():
            tensor = tensor.clone()
        seen.add(tensor.untyped_storage().data_ptr())
        tensors[name] = tensor
    return tensors


def _plan_shards(tensors: dict[str, torch.Tensor], max_shard_bytes: int) -> list[dict[str, torch.Tensor]]:
    """Greedy split in name order; a tensor larger than the limit gets a shard of its own."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    return shards


def _own_weight_files(folder: Path) -> Iterable[Path]:
    """Files an earlier save_hf_folder could have written."""
    yield from (p for p in [folder / SAFE_WEIGHTS, folder / SAFE_INDEX] if p.is_file())
    yield from (p for p in folder.glob("model-*-of-*.safetensors") if p.is_file())
