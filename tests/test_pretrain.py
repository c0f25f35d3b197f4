"""Pretraining: token shards, document masks, MTP targets, router balancing, HF export, DDP/FSDP2 equality."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sputnik.checkpoint import load_state
from torchrun import assert_two_equal_one, torchrun
from sputnik.model import MoE, Transformer, build_doc_mask
from sputnik.train.data import TokenShards, document_ids, document_positions, write_shards
from sputnik.train.loop import TrainConfig, Trainer
from sputnik.train.pretrain import (PretrainConfig, PretrainObjective, init_weights, mtp_logits, nano_config,
                                    train_pretrain)

VOCAB, EOS = 64, 1


def shards(tmp_path: Path, n_docs: int = 200, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    # Documents with structure to learn: counting runs a + i, so loss can fall quickly.
    docs = []
    for _ in range(n_docs):
        a, n = int(rng.integers(2, 30)), int(rng.integers(5, 30))
        docs.append([2 + (a + i) % (VOCAB - 2) for i in range(n)])
    write_shards(docs, tmp_path / "shards", VOCAB, EOS, shard_tokens=1000)
    return str(tmp_path / "shards")


def tiny(arch: str, **kw):
    cfg = nano_config(VOCAB, arch, dim=32, n_layers=2, n_heads=4, max_seq_len=128, **kw)
    model = Transformer(cfg)
    init_weights(model, 0.05, seed=0)
    return model


def test_shards_round_trip_and_windows(tmp_path):
    path = shards(tmp_path)
    data = TokenShards(path)
    index = json.loads((Path(path) / "index.json").read_text())
    assert index["dtype"] == "uint16" and index["documents"] == 200 and len(index["shard_tokens"]) > 1
    stream = np.concatenate([np.asarray(s) for s in data.shards])
    assert (stream == EOS).sum() == 200
    w = data.windows(np.random.default_rng(1), 4, 33)
    assert w.shape == (4, 33) and w.dtype == np.int64
    with pytest.raises(ValueError, match="out of range"):
        write_shards([[VOCAB]], tmp_path / "bad", VOCAB, EOS)
    with pytest.raises(FileNotFoundError, match="index.json"):
        TokenShards(tmp_path / "nowhere")


def test_document_ids_and_positions_restart_after_eos():
    tokens = np.array([[5, 6, EOS, 7, 8, 9, EOS, 4]])
    doc = document_ids(tokens, EOS)
    assert doc.tolist() == [[0, 0, 0, 1, 1, 1, 1, 2]]
    assert document_positions(doc).tolist() == [[0, 1, 2, 0, 1, 2, 3, 0]]


@pytest.mark.parametrize("arch", ["dense", "moe"])
def test_packed_documents_do_not_see_each_other(arch):
    model = tiny(arch).eval()
    a, b = [5, 6, 7, EOS], [9, 10, 11, 12]
    packed = torch.tensor([a + b])
    doc = torch.from_numpy(document_ids(packed.numpy(), EOS))
    pos = torch.from_numpy(document_positions(doc.numpy()))
    with torch.no_grad():
        together = model(packed, pos, mask=build_doc_mask(doc))
        alone = model(torch.tensor([b]))
    torch.testing.assert_close(together[0, 4:], alone[0], rtol=1e-4, atol=1e-5)


def test_mtp_loss_uses_the_right_shifted_targets(tmp_path):
    model = tiny("moe")
    cfg = PretrainConfig(data=shards(tmp_path), seq_len=16, batch_size=2, micro_batch=2, mask_documents=False,
                         mtp_lambda=1.0, balance_alpha=0.0)
    objective = PretrainObjective(model, cfg, peak_flops=1e9)
    micro = objective.prepare(0, model)[0]
    loss, _ = objective.loss(model, micro)
    # By hand: depth-1 MTP at input position i predicts the token two places ahead, micro[:, i + 2].
    x = micro[:, :-1]
    h = model.hidden(x)  # no document mask: as the objective was configured
    main = F.cross_entropy(model.lm_head(model.model.norm(h)).flatten(0, 1), micro[:, 1:].flatten(), reduction="sum")
    (depth1,) = mtp_logits(model, h, x)
    mtp = F.cross_entropy(depth1.flatten(0, 1), micro[:, 2:].flatten(), reduction="sum")
    torch.testing.assert_close(loss, (main + mtp) / (2 * 16), rtol=1e-5, atol=1e-6)


def test_bias_update_moves_a_skewed_router_toward_balance(tmp_path):
    model = tiny("moe")
    moe = next(m for m in model.modules() if isinstance(m, MoE))
    with torch.no_grad():  # a router that sends almost every token to experts 0 and 1
        moe.gate.weight.mul_(0.02)
        moe.gate.e_score_correction_bias[:2] = 0.2
    cfg = PretrainConfig(data=shards(tmp_path), seq_len=32, batch_size=4, micro_batch=4, bias_update_gamma=0.01,
                         balance_alpha=0.0, mtp_lambda=0.0)
    objective = PretrainObjective(model, cfg, peak_flops=1e9)
    Trainer(model, TrainConfig(out_dir=str(tmp_path / "run"), max_steps=40, lr=0.0, progress=False, plot_every=0),
            objective).run()
    shares = np.array([step[0] for step in objective.load_log])  # [steps, experts]
    assert shares[0, :2].sum() > 0.9  # skewed to begin with (8 experts, 2 per token: 0.25 is even)
    late = shares[-10:].mean(0)
    assert late[:2].sum() < 0.5 and late.max() < 0.5 * shares[0].max()
    bias = moe.gate.e_score_correction_bias
    assert bias[:2].mean() - bias[2:].mean() < 0.2 - 0.1  # the overloaded experts lost their head start


def test_balance_loss_is_the_v3_formula():
    from sputnik.train.pretrain import Routers, sequence_balance

    model = tiny("moe").train()
    x = torch.randint(2, VOCAB, (3, 10))
    moe = next(m for m in model.modules() if isinstance(m, MoE))
    routers = Routers([moe])
    model(x)
    (route,) = routers.take()
    s, chosen = route.scores.view(3, 10, -1), route.experts.view(3, 10, -1)
    E, K = s.shape[-1], chosen.shape[-1]
    want = 0.0
    for b in range(3):
        for i in range(E):
            f = E / (K * 10) * (chosen[b] == i).sum()
            p = (s[b, :, i] / s[b].sum(-1)).mean()
            want += f * p
    torch.testing.assert_close(sequence_balance(route, 3), torch.as_tensor(want, dtype=torch.float32))


@pytest.mark.parametrize("arch", ["dense", "moe"])
def test_pretrain_learns_logs_mfu_and_exports_to_transformers(tmp_path, arch):
    transformers = pytest.importorskip("transformers")
    cfg = PretrainConfig(data=shards(tmp_path), seq_len=32, batch_size=8, micro_batch=4)
    train = TrainConfig(out_dir=str(tmp_path / "run"), max_steps=30, lr=3e-3, warmup_steps=3, progress=False,
                        plot_every=0)
    summary = train_pretrain(tiny(arch).cfg, cfg, train)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["ce"] < rows[0]["ce"] - 1.0  # it learns the counting documents
    assert 0 < rows[-1]["mfu"] < 1 and rows[-1]["tokens_per_s"] > 0
    if arch == "moe":
        assert "mtp_ce" in rows[-1] and "expert_max_share" in rows[-1]
        assert (tmp_path / "run" / "expert_load.png").is_file()
    folder = Path(summary["checkpoint"])
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["DeepseekV3ForCausalLM" if arch == "moe" else "LlamaForCausalLM"]
    ours = tiny(arch).eval()
    ours.load_state_dict(load_state(folder)[1], strict=False)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
    x = torch.randint(2, VOCAB, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, ours(x), rtol=1e-4, atol=1e-4)


DIST = """
import sys
sys.path.insert(0, {tests!r})
from test_pretrain import tiny
from sputnik.train.loop import TrainConfig, Trainer, finish_distributed
from sputnik.train.pretrain import PretrainConfig, PretrainObjective
model = tiny("moe")
cfg = PretrainConfig(data={data!r}, seq_len=16, batch_size=2, micro_batch=1)
objective = PretrainObjective(model, cfg, peak_flops=1e9)
Trainer(model, TrainConfig(out_dir={out!r}, max_steps=2, lr=3e-3, progress=False, plot_every=0, fsdp={fsdp}),
        objective).run()
finish_distributed()
"""


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp2"])
def test_two_processes_equal_one(tmp_path, fsdp):
    data = shards(tmp_path)
    tests = Path(__file__).resolve().parent
    script = tmp_path / "dist.py"
    script.write_text(textwrap.dedent(DIST.format(tests=str(tests), data=data, out=str(tmp_path / "two"), fsdp=fsdp)))
    torchrun(script)
    model = tiny("moe")
    objective = PretrainObjective(model, PretrainConfig(data=data, seq_len=16, batch_size=4, micro_batch=1),
                                  peak_flops=1e9)
    Trainer(model, TrainConfig(out_dir=str(tmp_path / "one"), max_steps=2, lr=3e-3, progress=False, plot_every=0),
            objective).run()
    assert_two_equal_one(tmp_path / "two", tmp_path / "one", model, atol=2e-5)


def test_cli_tokenizer_then_pretrain_then_hf_folder(tmp_path, capsys):
    from sputnik.cli import main
    from sputnik.checkpoint import load_pretrained

    text = tmp_path / "corpus.txt"
    rng = np.random.default_rng(0)
    text.write_text("\n\n".join(" ".join(f"{a} plus {b} is {a + b}." for a, b in rng.integers(0, 50, (20, 2)))
                                for _ in range(40)), encoding="utf-8")
    tok_dir = tmp_path / "tok"
    assert main(["train", "tokenizer", str(text), "--out", str(tok_dir), "--vocab-size", "300",
                 "--fetch-korean-sample", "false"]) == 0
    assert main(["train", "pretrain", "--tokenizer", str(tok_dir), "--text", str(text), "--arch", "moe", "--dim", "32",
                 "--n-layers", "2", "--seq-len", "32", "--batch-size", "4", "--micro-batch", "4", "--max-steps", "3",
                 "--out-dir", str(tmp_path / "run"), "--progress", "false", "--lr", "0.003"]) == 0
    assert "MFU" in capsys.readouterr().out
    model, tok = load_pretrained(tmp_path / "run" / "checkpoints" / "step_000003")
    assert model.cfg.is_mla and model.cfg.n_routed_experts == 8 and tok.vocab_size == model.cfg.vocab_size
