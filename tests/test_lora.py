"""LoRA: starts as the base model, trains only adapters, merges into weights that save and load as a plain model."""

import torch

from sputnik.checkpoint import load_model, save_model
from sputnik.config import ModelConfig
from sputnik.model import Transformer
from sputnik.train.lora import LoRALinear, apply_lora


def tiny() -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(family="llama", vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                                   inter_dim=48, max_seq_len=64, tie_embeddings=True))


def test_lora_trains_adapters_only_and_merges(tmp_path):
    model = tiny()
    tokens = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        base = model(tokens)
    n = apply_lora(model, r=4, alpha=8, targets=("q_proj", "v_proj", "down_proj"))
    assert n == 2 * (4 * 32 + 32 * 4) + 2 * (4 * 32 + 16 * 4) + 2 * (4 * 48 + 32 * 4)
    assert sum(isinstance(m, LoRALinear) for m in model.modules()) == 6
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in name for name in trainable)
    with torch.no_grad():
        assert torch.equal(model(tokens), base)  # B = 0 at the start
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    frozen = model.model.layers[0].self_attn.q_proj.weight.clone()
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(model(tokens)[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight, frozen)
    with torch.no_grad():
        tuned = model(tokens)
    assert (tuned - base).abs().max() > 1e-4
    # Saving folds the adapters in: the folder is a plain model with the tuned outputs.
    save_model(model, tmp_path / "m")
    with torch.no_grad():
        assert torch.allclose(load_model(tmp_path / "m")(tokens), tuned, atol=1e-5)
