"""ModelArgs: the settings that load a model for inference (which model, dtype, device, quantization, the KV cache's
dtype), shared by every entry point that samples (generate, chat, eval, serve), so each loads it in one and the same
step."""

from __future__ import annotations

from dataclasses import dataclass

from sputnik.checkpoint.registry import DEFAULT_MODEL
from sputnik.device import DTYPES, pick_device, pick_dtype
from sputnik.settings import option

DTYPE_HELP = ("weights' dtype; auto: bf16 where the device multiplies it natively (CPUs with AVX512-BF16 or AMX, "
              "GPUs), else float32")


@dataclass
class ModelArgs:
    """The model to load, and where."""

    model: str = option(DEFAULT_MODEL, "a registry name, an HF folder, a .gguf file or an HF repo id", aliases=["-m"])
    dtype: str = option("float32", DTYPE_HELP, choices=["auto", *DTYPES])
    device: str = option("auto", "cpu, cuda, cuda:1 … (auto: cuda when available)")
    quantize: str = option("auto", "auto: a GGUF file's quantized weights run as they are on the CPU (dequantized "
                                   "elsewhere); none: dequantize to --dtype; int8/int4: quantize any checkpoint's "
                                   "matrices to Q8_0/Q4_1 blocks (a GGUF file's blocks kept), on a GPU too, "
                                   "where they stay in its memory", choices=["auto", "none", "int8", "int4"])
    kv_dtype: str = option("auto", "the KV cache's dtype; auto: float16 under GGUF or int8/int4 blocks on the CPU, "
                                   "as llama.cpp keeps it (half the bytes a long context costs each token), else the "
                                   "model's", choices=["auto", "float32", "bfloat16", "float16"])

    def load(self):
        """(model, tokenizer), ready for the engine."""
        from sputnik.checkpoint import load_pretrained

        device = pick_device(self.device)
        return load_pretrained(self.model, dtype=pick_dtype(self.dtype, device), device=device,
                               quantize=self.quantize)

    def cache_dtype(self, model, compile: bool = False):
        """The KV cache dtype of an engine over this model (see --kv-dtype; compile: the engine's)."""
        from sputnik.engine.native import auto_cache_dtype

        return auto_cache_dtype(model, compile) if self.kv_dtype == "auto" else pick_dtype(self.kv_dtype, "cpu")
