"""Parity with transformers for every family on tiny random configs, MLA's latent cache, −inf group routing."""

import subprocess
import sys

import pytest
import torch
import transformers as tf

from sputnik.checkpoint import load_model, save_model
from sputnik.config import ModelConfig
from sputnik.engine import Engine, SamplingParams
from sputnik.engine.cache import KVCache
from sputnik.model import Gate, Transformer, Unpadded, build_mask
from sputnik.train.pretrain import mtp_logits

TINY = dict(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=3, num_attention_heads=4,
            max_position_embeddings=256)
DSV3 = dict(TINY, moe_intermediate_size=12, num_key_value_heads=4, n_shared_experts=1, n_routed_experts=8,
            num_experts_per_tok=2, n_group=2, topk_group=1, kv_lora_rank=16, qk_rope_head_dim=16,
            qk_nope_head_dim=32, v_head_dim=32)
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 32,
        "beta_slow": 1}

CASES = {
    "llama-tied": (tf.LlamaConfig, tf.LlamaForCausalLM, dict(TINY, num_key_value_heads=2, tie_word_embeddings=True)),
    "llama-linear": (tf.LlamaConfig, tf.LlamaForCausalLM,
                     dict(TINY, num_key_value_heads=2, rope_scaling={"rope_type": "linear", "factor": 2.0})),
    "llama3-rope": (tf.LlamaConfig, tf.LlamaForCausalLM,
                    dict(TINY, num_key_value_heads=1, rope_theta=500000.0,
                         rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 64})),
    "llama-yarn-bias": (tf.LlamaConfig, tf.LlamaForCausalLM,
                        dict(TINY, num_key_value_heads=2, attention_bias=True, rope_scaling=YARN)),
    "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM, dict(TINY, num_key_value_heads=2)),
    "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM, dict(TINY, num_key_value_heads=2, head_dim=16)),
    "deepseek-v3-q-lora-none-groups": (tf.DeepseekV3Config, tf.DeepseekV3ForCausalLM,
                                       dict(DSV3, q_lora_rank=None, first_k_dense_replace=1)),
    "deepseek-v3-q-lora-all-moe-yarn": (tf.DeepseekV3Config, tf.DeepseekV3ForCausalLM,
                                        dict(DSV3, q_lora_rank=32, first_k_dense_replace=0,
                                             rope_scaling=dict(YARN, mscale=1.0, mscale_all_dim=1.0))),
}


def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Weights large enough that a wrong op shows in the logits (HF's 0.02 init makes them nearly flat)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.ndim > 1 else 0.1) + (1.0 if "norm" in name else 0))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                # Positive: transformers masks dropped groups with 0, which cannot win against positive scores.
                b.copy_(torch.rand(b.shape, generator=g) * 0.1)


@pytest.fixture(scope="module", params=list(CASES))
def pair(request, tmp_path_factory):
    config_cls, model_cls, kw = CASES[request.param]
    torch.manual_seed(0)
    ref = model_cls(config_cls(**kw)).eval()
    randomize(ref)
    path = tmp_path_factory.mktemp(request.param)
    ref.save_pretrained(path)
    return ref, load_model(path), path


def test_logits_match_transformers(pair):
    ref, ours, _ = pair
    tokens = torch.randint(0, 99, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref(tokens).logits
        got = ours(tokens)
    assert (got - want).abs().max().item() <= 1e-4 * max(1.0, want.abs().max().item())


def test_greedy_continuation_matches_transformers(pair):
    ref, ours, _ = pair
    prompt = torch.randint(0, 99, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = ref.generate(prompt, max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0)
    got = Engine(ours).generate([prompt[0].tolist()], SamplingParams(max_tokens=16, temperature=0))[0][0]
    assert got.token_ids == want[0, 12:].tolist()


def test_export_round_trip_in_transformers(pair, tmp_path):
    ref, ours, _ = pair
    save_model(ours, tmp_path / "export")
    back = type(ref).from_pretrained(tmp_path / "export").eval()
    tokens = torch.randint(0, 99, (1, 20))
    with torch.no_grad():
        assert torch.equal(back(tokens).logits, ref(tokens).logits)


def test_left_padding_and_cache_equal_plain_forward(pair):
    _, ours, _ = pair
    tokens = torch.randint(0, 99, (1, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        plain = ours(tokens)
        padded = torch.cat([torch.zeros(1, 5, dtype=torch.long), tokens], 1)
        mask = torch.arange(25)[None] >= 5
        positions = (torch.arange(25)[None] - 5).clamp(min=0)
        left = ours(padded, positions, mask=build_mask(1, 25, 0, mask, "cpu"))[:, 5:]
        cache = KVCache(ours.cfg, 1, 32, torch.float32, "cpu")
        chunks = [ours(tokens[:, :7], cache=cache), ours(tokens[:, 7:8], cache=cache), ours(tokens[:, 8:], cache=cache)]
    assert (left - plain).abs().max().item() < 1e-4
    assert (torch.cat(chunks, 1) - plain).abs().max().item() < 1e-4


def test_unpadded_rows_equal_padded_forward(pair):
    """unpad: rows with left and right padding run as one row of their real tokens; states at those tokens match
    the padded forward's, gradients included (every family: GQA, MLA, MoE)."""
    _, ours, _ = pair
    g = torch.Generator().manual_seed(4)
    tokens = torch.randint(0, 99, (3, 16), generator=g)
    real = torch.zeros(3, 16, dtype=torch.bool)
    real[0, 3:12], real[1, :16], real[2, 6:9] = True, True, True  # left+right pads, none, a short middle run
    positions = (real.long().cumsum(1) - 1).clamp(min=0)
    ours.zero_grad()
    padded = ours.hidden(tokens, positions, mask=build_mask(3, 16, 0, real, "cpu"))[real]
    padded.pow(2).sum().backward()
    want = {n: p.grad.clone() for n, p in ours.named_parameters() if p.grad is not None}
    ours.zero_grad()
    unpadded = ours.hidden(tokens, positions, mask=Unpadded.of(real))
    assert unpadded.shape == (1, int(real.sum()), ours.cfg.dim)
    torch.testing.assert_close(unpadded[0], padded.detach(), atol=1e-4, rtol=1e-4)
    unpadded.pow(2).sum().backward()
    for n, p in ours.named_parameters():
        if n in want:
            scale = want[n].abs().max().item()  # (large: the weights are randomized to ~0.3)
            assert (p.grad - want[n]).abs().max().item() <= 1e-5 * max(scale, 1.0), n
    ours.zero_grad()
    with pytest.raises(ValueError, match="mask"):  # a cached forward takes its mask from the cache
        ours.hidden(tokens, positions, KVCache(ours.cfg, 3, 16, torch.float32, "cpu"), mask=Unpadded.of(real))


def test_mla_latent_cache_equals_naive_path():
    cfg = ModelConfig.from_hf_config(tf.DeepseekV3Config(**DSV3, q_lora_rank=32, first_k_dense_replace=1).to_dict())
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    randomize(model)
    tokens = torch.randint(0, 99, (3, 30))
    cache = KVCache(cfg, 3, 40, torch.float32, "cpu")
    assert cache.nbytes_per_token() == cfg.n_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 4
    with torch.no_grad():
        naive = model(tokens)
        latent = torch.cat([model(tokens[:, :10], cache=cache)] + [model(tokens[:, i : i + 1], cache=cache)
                                                                  for i in range(10, 30)], 1)
    assert (naive - latent).abs().max().item() < 1e-4


def test_dropped_groups_masked_with_minus_inf():
    cfg = ModelConfig(family="deepseek_v3", dim=8, n_heads=1, n_routed_experts=4, n_activated_experts=2, n_group=2,
                      topk_group=1, moe_inter_dim=4, kv_lora_rank=4, qk_rope_head_dim=2, qk_nope_head_dim=2,
                      v_head_dim=2)
    gate = Gate(cfg)
    with torch.no_grad():
        gate.weight.zero_()  # every score is sigmoid(0) = 0.5
        # Group 0 (experts 0, 1) wins on its top-2 sum; group 1 is dropped. Expert 1's bias is so negative that a
        # 0-filled mask would let dropped experts 2/3 (0) beat it (0.5 - 5 < 0): with -inf it must still be chosen.
        gate.e_score_correction_bias.copy_(torch.tensor([3.0, -5.0, -1.2, -1.2]))
    route = gate(torch.randn(5, 8))
    idx, weights = route.experts, route.weights
    assert sorted(idx[0].tolist()) == [0, 1]
    # Weights come from the scores without the bias, renormalised over the chosen k.
    assert torch.allclose(weights, torch.full_like(weights, 0.5))


def test_trains_with_autograd_in_fp32_and_bf16():
    cfg = ModelConfig.from_hf_config(tf.DeepseekV3Config(**DSV3, q_lora_rank=None, first_k_dense_replace=1,
                                                         num_nextn_predict_layers=1).to_dict())
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        model = Transformer(cfg).to(dtype)
        randomize(model)
        model.to(dtype)
        tokens = torch.randint(0, 99, (2, 16))
        h = model.hidden(tokens)
        logits = model.logits(h)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten())
        (mtp,) = mtp_logits(model, h, tokens)
        assert mtp.shape == (2, 15, 99)
        loss = loss + 0.3 * torch.nn.functional.cross_entropy(mtp[:, :-1].flatten(0, 1).float(), tokens[:, 2:].flatten())
        loss.backward()
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        assert torch.isfinite(loss) and all(g is not None and torch.isfinite(g).all() for g in grads)


def test_mtp_layers_load_and_save(tmp_path):
    """MTP weights on disk as model.layers.{n}.* are loaded into model.mtp and written back the same way."""
    hf = tf.DeepseekV3Config(**DSV3, q_lora_rank=None, first_k_dense_replace=1, num_nextn_predict_layers=1).to_dict()
    model = Transformer(ModelConfig.from_hf_config(hf))
    randomize(model)
    save_model(model, tmp_path / "m")
    from safetensors import safe_open

    with safe_open(tmp_path / "m" / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert {"model.layers.3.eh_proj.weight", "model.layers.3.enorm.weight", "model.layers.3.shared_head.head.weight",
            "model.layers.3.self_attn.kv_b_proj.weight"} <= keys
    back = load_model(tmp_path / "m")
    assert torch.equal(back.mtp[0].eh_proj.weight, model.mtp[0].eh_proj.weight)
    # transformers ignores the MTP layer and gives the same logits.
    ref = tf.DeepseekV3ForCausalLM.from_pretrained(tmp_path / "m").eval()
    tokens = torch.randint(0, 99, (1, 10))
    with torch.no_grad():
        assert (ref(tokens).logits - back(tokens)).abs().max().item() < 1e-4


def test_a_meta_skeleton_imports_no_compiler():
    # load_model builds the model on the meta device before the weights arrive; a random draw there ran through
    # torch._refs and imported torch._dynamo: ~70 MB resident and seconds for every load.
    code = ("import sys, torch\nfrom sputnik.config import ModelConfig\nfrom sputnik.model import Transformer\n"
            "cfg = ModelConfig(family='llama', vocab_size=64, dim=32, n_layers=1, n_heads=4, n_kv_heads=2, inter_dim=64)\n"
            "with torch.device('meta'):\n    model = Transformer(cfg)\n"
            "assert model.model.embed_tokens.weight.is_meta and model.model.embed_tokens.weight.requires_grad\n"
            "assert 'torch._dynamo' not in sys.modules, 'torch._dynamo imported'\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-1500:]
