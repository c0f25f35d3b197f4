"""The native decode step (sputnik/kernels/decode.cpp) against the PyTorch step it replaces: the same logits and cache
writes for every supported family, rows at different lengths; the same greedy text on the default model; and the
models it must leave to PyTorch."""

import pytest
import torch
import transformers as tf
from torch import nn

import sputnik.kernels as K
from sputnik.checkpoint import load_model
from sputnik.engine import Engine, SamplingParams
from sputnik.engine.cache import SlotView
from sputnik.engine.generate import next_logits
from sputnik.engine.native import native_decode, supported
from sputnik.kernels import QTensor, QuantLinear

pytestmark = pytest.mark.skipif(not K.available(), reason="no C++ compiler for the kernels")

FAMILIES = {
    "llama": (tf.LlamaConfig, tf.LlamaForCausalLM, dict(num_key_value_heads=2, attention_bias=True, mlp_bias=True)),
    "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM, dict(num_key_value_heads=1)),
    "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM, dict(num_key_value_heads=2, head_dim=32)),
}


def tiny(tmp_path, family: str) -> nn.Module:
    config_cls, model_cls, kw = FAMILIES[family]
    torch.manual_seed(0)
    cfg = config_cls(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                     max_position_embeddings=128, **kw)
    model_cls(cfg).save_pretrained(tmp_path)
    return load_model(tmp_path)


def with_f32_blocks(model: nn.Module) -> nn.Module:
    """Every projection as an F32 'block' layer: the kernels multiply it in floats (no 8-bit activations), so the
    native step must give the PyTorch step's numbers up to float rounding."""
    for name, m in list(model.model.named_modules()):
        if type(m) is nn.Linear:
            parent, _, attr = name.rpartition(".")
            raw = m.weight.detach().float().contiguous().view(torch.uint8)
            layer = QuantLinear(QTensor(raw, K.TYPE_IDS["F32"], tuple(m.weight.shape)), m.bias)
            setattr(model.model.get_submodule(parent), attr, layer)
    return model


@pytest.mark.parametrize("weights", ["f32 blocks", "dense 3 rows", "dense 6 rows"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_native_step_equals_the_pytorch_step(tmp_path, family, weights):
    """Block layers and plain float32 Linears (their rows read as F32, one token at a time up to 4 rows, ATen's GEMM
    past that)."""
    model = tiny(tmp_path, family)
    if weights == "f32 blocks":
        model = with_f32_blocks(model)
    assert supported(model) is None
    model.fuse()
    step = native_decode(model)
    cfg = model.cfg
    torch.manual_seed(1)
    rows = 6 if weights == "dense 6 rows" else 3
    k = [torch.randn(rows, cfg.n_kv_heads, 16, cfg.head_dim) for _ in range(cfg.n_layers)]
    v = [torch.randn_like(t) for t in k]
    mine_k, mine_v = [t.clone() for t in k], [t.clone() for t in v]
    lens = torch.tensor([0, 5, 11, 2, 9, 12][:rows])  # each row at its own length over a cache already holding data
    tokens = torch.tensor([[7], [42], [95], [3], [60], [11]][:rows])
    for _ in range(3):
        with torch.no_grad():
            want = next_logits(model, tokens, lens[:, None], SlotView(k + v, lens, 16, masked=True))
            got = step(tokens, lens[:, None], mine_k, mine_v)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        for a, b in zip(mine_k + mine_v, k + v):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        tokens, lens = want.argmax(-1, keepdim=True), lens + 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_long_rows_attend_in_chunks_merged_exactly_enough(tmp_path, dtype):
    """A row's slots past 256 are split into chunks the threads share, their softmax partials merged: the same
    logits as the PyTorch step at lengths around the chunk edges, and a row's logits the same, bit for bit, alone or
    in a batch."""
    model, ref = tiny(tmp_path, "llama").to(dtype), tiny(tmp_path, "llama").to(dtype).float()
    model.fuse()
    step, cfg = native_decode(model), model.cfg
    torch.manual_seed(2)
    lens = torch.tensor([255, 256, 511, 700])  # four rows: the kernels' rows, whose results do not depend on the batch
    k = [torch.randn(len(lens), cfg.n_kv_heads, 704, cfg.head_dim).to(dtype) for _ in range(cfg.n_layers)]
    v = [torch.randn_like(t) for t in k]
    tokens = torch.tensor([[7], [42], [95], [3]])
    with torch.no_grad():
        want = next_logits(ref, tokens, lens[:, None], SlotView([t.float() for t in k + v], lens, 704, masked=True))
        got = step(tokens, lens[:, None], [t.clone() for t in k], [t.clone() for t in v])
        torch.testing.assert_close(got.float(), want, rtol=0, atol=1e-4 if dtype == torch.float32 else 6e-3)
        for i in (1, 3):
            alone = step(tokens[i : i + 1], lens[i : i + 1, None], [t[i : i + 1].clone() for t in k],
                         [t[i : i + 1].clone() for t in v])
            assert torch.equal(alone[0], got[i])


@pytest.mark.parametrize("weights", ["f32 blocks", "dense 3 rows", "dense 6 rows"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_bfloat16_model_steps_natively_over_its_own_weights_and_cache(tmp_path, family, weights):
    """A bfloat16 model (what `--dtype auto` loads on a CPU with AVX512-BF16 or AMX, a GGUF file's blocks among its
    bfloat16 norms too) takes the native step over its bfloat16 weights and cache, in float32 arithmetic (bfloat16
    widens exactly): it equals the float32 PyTorch step over the same weights but for rounding what it writes into the
    cache (and, past four rows, the activations ATen's bfloat16 GEMM takes) to bfloat16. An in-place update of a
    weight (a trainer's) is seen by the next step."""
    model, ref = tiny(tmp_path, family).to(torch.bfloat16), tiny(tmp_path, family).to(torch.bfloat16).float()
    if weights == "f32 blocks":
        model = with_f32_blocks(model)
    rows = 6 if weights == "dense 6 rows" else 3
    assert supported(model) is None
    model.fuse()
    step, cfg = native_decode(model), model.cfg
    torch.manual_seed(1)
    k = [torch.randn(rows, cfg.n_kv_heads, 16, cfg.head_dim).bfloat16() for _ in range(cfg.n_layers)]
    v = [torch.randn_like(t) for t in k]
    want_k, want_v = [t.float() for t in k], [t.float() for t in v]
    lens = torch.tensor([0, 5, 11, 2, 9, 12][:rows])
    tokens = torch.tensor([[7], [42], [95], [3], [60], [11]][:rows])
    for i in range(3):
        if i == 2:
            with torch.no_grad():
                for m in (model, ref):
                    m.model.layers[1].post_attention_layernorm.weight.mul_(4)
        with torch.no_grad():
            want = next_logits(ref, tokens, lens[:, None], SlotView(want_k + want_v, lens, 16, masked=True))
            got = step(tokens, lens[:, None], k, v)
        # logits ~0.5 here; the bfloat16 PyTorch step is off the float32 one by up to 3e-3, this step by 3e-3 at most
        torch.testing.assert_close(got.float(), want, rtol=0, atol=6e-3)
        for a, b in zip(k + v, want_k + want_v):  # the new slots rounded to bfloat16, the old ones untouched
            assert a.dtype == torch.bfloat16
            torch.testing.assert_close(a.float(), b, rtol=4e-3, atol=2e-3 if rows <= 4 else 2e-2)
            b.copy_(a.float())
        tokens, lens = want.argmax(-1, keepdim=True), lens + 1


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_float32_model_steps_natively_over_a_16_bit_cache(tmp_path, family, dtype):
    """Engine(kv_dtype=bfloat16 or float16) under a float32 model: the native step rounds what it writes into the
    cache to 16 bits and widens what it reads, as the PyTorch step does over the same cache (SlotView's casts): the
    same logits and the same cache contents (both round the same float32 k and v, up to a last-bit tie)."""
    model = with_f32_blocks(tiny(tmp_path, family))
    model.fuse()
    step, cfg = native_decode(model), model.cfg
    torch.manual_seed(1)
    k = [torch.randn(3, cfg.n_kv_heads, 16, cfg.head_dim).to(dtype) for _ in range(cfg.n_layers)]
    v = [torch.randn_like(t) for t in k]
    mine_k, mine_v = [t.clone() for t in k], [t.clone() for t in v]
    lens, tokens = torch.tensor([0, 5, 11]), torch.tensor([[7], [42], [95]])
    for _ in range(3):
        with torch.no_grad():
            want = next_logits(model, tokens, lens[:, None], SlotView(k + v, lens, 16, masked=True))
            got = step(tokens, lens[:, None], mine_k, mine_v)
        assert want.dtype == got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        for a, b in zip(mine_k + mine_v, k + v):
            assert a.dtype == b.dtype == dtype
            torch.testing.assert_close(a.float(), b.float(), rtol=8e-3, atol=1e-5)
        tokens, lens = want.argmax(-1, keepdim=True), lens + 1


def test_default_model_greedy_text_with_the_native_step(default_gguf, default_tokenizer):
    """On the default model's Q4_1 blocks the native step and the PyTorch step round different float sums into 8-bit
    activations, so a near tie may flip; before that the greedy tokens are the same."""
    quant = load_model(default_gguf, quantize="auto")
    assert supported(quant) is None
    chats = [default_tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=True)
             for p in ("What is 17 + 25? Explain step by step.", "Write a haiku about the sea.",
                       "List three prime numbers and say why they are prime.")]
    greedy = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)
    native = [c[0].token_ids for c in Engine(quant, default_tokenizer).generate(chats, greedy)]
    eager = [c[0].token_ids for c in Engine(quant, default_tokenizer, native=False).generate(chats, greedy)]
    prefix = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), len(x)) for x, y in zip(native, eager)]
    assert sum(prefix) >= 40, prefix


def test_a_cache_of_the_wrong_shape_is_refused(tmp_path):
    model = with_f32_blocks(tiny(tmp_path, "llama"))
    model.fuse()
    step, cfg = native_decode(model), model.cfg
    k = [torch.zeros(1, cfg.n_kv_heads, 8, cfg.head_dim) for _ in range(cfg.n_layers)]
    with pytest.raises(RuntimeError, match="rows >= B"):  # two rows, a cache of one: never written out of bounds
        step(torch.tensor([[1], [2]]), torch.tensor([[0], [0]]), k, [t.clone() for t in k])
    with pytest.raises(RuntimeError, match="out of range"):
        step(torch.tensor([[1]]), torch.tensor([[8]]), k, [t.clone() for t in k])


def test_models_left_to_pytorch(tmp_path):
    from sputnik.train.lora import apply_lora

    adapted = tiny(tmp_path, "llama")
    apply_lora(adapted, r=4)
    assert "neither in a block format nor a plain float32 or bfloat16 Linear" in supported(adapted)
    assert native_decode(adapted) is None
    assert supported(tiny(tmp_path, "llama").to(torch.float16)) == "only float32 and bfloat16 models on the CPU"
    assert "latent attention" in supported(load_model_mla(tmp_path / "mla"))


def test_kv_dtype_auto_is_float16_under_blocks_the_native_step_runs(tmp_path, default_gguf):
    """--kv-dtype auto: float16 (llama.cpp's) where the native step multiplies blocks (the default GGUF), the model's
    dtype for a dense model (exact), a compiled engine and a quantized model the native step leaves to PyTorch
    (either would widen a copy of the cache every layer); an explicit dtype always wins."""
    from sputnik.checkpoint.args import ModelArgs

    auto, fp32 = ModelArgs(), ModelArgs(kv_dtype="float32")
    gguf = load_model(default_gguf, quantize="auto")
    assert auto.cache_dtype(gguf) == torch.float16 and fp32.cache_dtype(gguf) == torch.float32
    assert auto.cache_dtype(gguf, compile=True) == torch.float32
    assert auto.cache_dtype(tiny(tmp_path, "llama")) == torch.float32
    assert auto.cache_dtype(with_f32_blocks(tiny(tmp_path, "qwen3"))) == torch.float16
    assert auto.cache_dtype(load_model_mla(tmp_path / "mla")) == torch.float32
    assert ModelArgs(kv_dtype="bfloat16").cache_dtype(tiny(tmp_path, "llama")) == torch.bfloat16


def load_model_mla(path):
    torch.manual_seed(0)
    cfg = tf.DeepseekV3Config(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                              num_attention_heads=4, max_position_embeddings=128, moe_intermediate_size=32,
                              num_key_value_heads=4, n_shared_experts=1, n_routed_experts=4, num_experts_per_tok=2,
                              n_group=1, topk_group=1, kv_lora_rank=32, q_lora_rank=64, qk_rope_head_dim=16,
                              qk_nope_head_dim=32, v_head_dim=32, first_k_dense_replace=1)
    tf.DeepseekV3ForCausalLM(cfg).save_pretrained(path)
    return load_model(path, quantize="int8")


def test_a_float32_model_decodes_natively_and_reads_what_a_trainer_writes(tmp_path):
    """A plain float32 model takes the native step, over its own (fused) weights: an in-place update (an optimizer
    step) is seen by the next generation, as the PyTorch step sees it."""
    model = tiny(tmp_path, "qwen2")  # q/k/v biases: fused with their weights
    engine, eager = Engine(model), Engine(model, native=False)
    assert engine._native is not None
    greedy = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    prompts = [[1, 5, 9, 23], [4, 4, 80]]
    for _ in range(2):
        assert [c[0].token_ids for c in engine.generate(prompts, greedy)] == \
               [c[0].token_ids for c in eager.generate(prompts, greedy)]
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
