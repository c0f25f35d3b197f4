"""Where sputnik and llama.cpp part on a quantized file: the same prompt through both, compared tensor by tensor.

llama.cpp's intermediate tensors come from its scheduler's eval callback (in a child process, as every llama.cpp
figure here); sputnik's from forward hooks at the same points of layer 0, then the outputs of the second and the
last layer and the final norm. Each row is the relative L2 difference over the prompt's tokens and at its last token. It shows how far
greedy agreement can go: two engines that quantize activations to 8 bits round a few elements apart as soon as their
inputs differ in the last bits, and each product turns that into a quantum-sized difference, so the gap grows layer
by layer until it sits at the quantization's own noise.

    python benchmarks/llamacpp_trace.py [--model smollm2-135m-instruct] [--prompt 0]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

import machine
from llamacpp_parity import PROMPTS

POINTS = ("attn_norm-0", "Vcur-0", "kqv_out-0", "attn_out-0", "ffn_norm-0", "ffn_gate-0", "ffn_up-0", "ffn_swiglu-0",
          "l_out-0", "l_out-1", "l_out-last", "result_norm")


class GGMLTensor(ctypes.Structure):
    """The head of ggml's `struct ggml_tensor` up to its name (GGML_MAX_SRC 10, 16 op params)."""

    _fields_ = [("type", ctypes.c_int), ("buffer", ctypes.c_void_p), ("ne", ctypes.c_int64 * 4),
                ("nb", ctypes.c_size_t * 4), ("op", ctypes.c_int), ("op_params", ctypes.c_int32 * 16),
                ("flags", ctypes.c_int32), ("src", ctypes.c_void_p * 10), ("view_src", ctypes.c_void_p),
                ("view_offs", ctypes.c_size_t), ("data", ctypes.c_void_p), ("name", ctypes.c_char * 64)]


def llamacpp_tensors(path: str, prompt: list[int], out: str) -> None:
    """(child) Decode the prompt in llama.cpp and save the float32 tensors named in POINTS to `out` (.npz)."""
    import llama_cpp
    from llama_cpp import Llama

    got: dict[str, np.ndarray] = {}
    last = -1  # the highest layer whose output was seen: its l_out-N is l_out-last

    def point(name: str) -> str | None:
        if name in POINTS:
            return name
        return "l_out-last" if name.startswith("l_out-") and name[6:].isdigit() else None

    @llama_cpp.ggml_backend_sched_eval_callback
    def watch(t, ask, _):
        nonlocal last
        t = ctypes.cast(t, ctypes.POINTER(GGMLTensor)).contents
        name = t.name.decode()
        key = point(name)
        if ask:
            return key is not None
        if t.type == 0 and key is not None:  # F32; a name given twice keeps its last (post-rope) tensor
            if key == "l_out-last":
                if int(name[6:]) < last:
                    return True
                last = int(name[6:])
            n = int(np.prod(t.ne[:4]))
            got[key] = np.ctypeslib.as_array(ctypes.cast(t.data, ctypes.POINTER(ctypes.c_float)), (n,)).copy()
        return True

    llm = Llama(model_path=path, n_ctx=512, n_threads=1, logits_all=True, verbose=False)
    params = llm.context_params
    params.cb_eval = watch
    ctx = llama_cpp._internals.LlamaContext(model=llm._model, params=params, verbose=False)
    llm._batch.reset()
    llm._batch.set_batch(prompt, n_past=0, logits_all=True)
    ctx.decode(llm._batch)
    np.savez(out, **got)


def sputnik_tensors(model, prompt: list[int]) -> dict[str, np.ndarray]:
    """The same points from sputnik's forward, through hooks."""
    got: dict[str, torch.Tensor] = {}

    def keep(name: str, use_input: bool = False):
        def hook(_, inputs, output):
            got[name] = (inputs[0] if use_input else output).detach()
        return hook

    L0, layers = model.model.layers[0], model.model.layers
    hooks = [(L0.input_layernorm, keep("attn_norm-0")), (L0.self_attn.v_proj, keep("Vcur-0")),
             (L0.self_attn.o_proj, keep("kqv_out-0", True)), (L0.self_attn.o_proj, keep("attn_out-0")),
             (L0.post_attention_layernorm, keep("ffn_norm-0")), (L0.mlp.gate_proj, keep("ffn_gate-0")),
             (L0.mlp.up_proj, keep("ffn_up-0")), (L0.mlp.down_proj, keep("ffn_swiglu-0", True)),
             (L0, keep("l_out-0")), (layers[1], keep("l_out-1")), (layers[-1], keep("l_out-last")),
             (model.model.norm, keep("result_norm"))]
    handles = [m.register_forward_hook(h) for m, h in hooks]
    with torch.inference_mode():
        model(torch.tensor([prompt]))
    for h in handles:
        h.remove()
    return {k: v.float().reshape(len(prompt), -1).numpy() for k, v in got.items()}


def relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--prompt", type=int, default=0, help="which of llamacpp_parity's prompts")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)  # path, prompt json, out
    args = ap.parse_args()
    if args.child:
        llamacpp_tensors(args.child[0], json.loads(args.child[1]), args.child[2])
        return
    torch.set_num_threads(1)
    from sputnik.checkpoint import load_model
    from sputnik.checkpoint.registry import resolve
    from sputnik.tokenizer import Tokenizer

    path = resolve(args.model)
    prompt = Tokenizer.load(path).apply_chat_template([{"role": "user", "content": PROMPTS[args.prompt]}],
                                                      tokenize=True)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "llamacpp.npz"
        child = subprocess.run([sys.executable, __file__, "--child", str(path), json.dumps(prompt), str(out)],
                               capture_output=True, text=True, check=False)
        if not out.exists():
            print(f"llama.cpp gave no tensors (exit {child.returncode}): {child.stderr.strip()[-400:]}")
            print(json.dumps({"llamacpp": f"failed (exit {child.returncode})", "machine": machine.describe()}))
            return
        theirs = {k: v.reshape(len(prompt), -1) for k, v in np.load(out).items()}
    rows = {kind: sputnik_tensors(load_model(path, quantize=kind), prompt) for kind in ("auto", "none")}
    print(machine.line())
    print(f"prompt {args.prompt} ({len(prompt)} tokens): relative L2 difference from llama.cpp's tensor")
    print(f"{'tensor':<14}{'blocks: all':>13}{'last':>9}{'fp32: all':>12}{'last':>9}")
    figures: dict[str, dict[str, float]] = {}
    for name in POINTS:
        if name not in theirs:
            continue
        b = theirs[name]
        cells = {kind: (relative(r[name], b), relative(r[name][-1], b[-1])) for kind, r in rows.items()}
        figures[name] = {"blocks": round(cells["auto"][0], 6), "blocks_last": round(cells["auto"][1], 6),
                         "fp32": round(cells["none"][0], 6), "fp32_last": round(cells["none"][1], 6)}
        print(f"{name:<14}{cells['auto'][0]:>13.2e}{cells['auto'][1]:>9.2e}{cells['none'][0]:>12.2e}"
              f"{cells['none'][1]:>9.2e}")
    print(json.dumps({"prompt": args.prompt, "tokens": len(prompt), "relative_l2": figures,
                      "machine": machine.describe()}))


if __name__ == "__main__":
    main()
