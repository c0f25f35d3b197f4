"""`sputnik perplexity`: sliding windows that score every token once, the sum checked against the model's own
logits window by window, the CLI on the default model and its errors naming the file."""

import json
import math

import pytest
import torch

from sputnik.cli import main
from sputnik.config import ModelConfig
from sputnik.model import Transformer
from sputnik.train.perplexity import perplexity, windows


def tiny() -> Transformer:
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=50, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, inter_dim=48,
                                    max_seq_len=64))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.4)
    return model.eval()


@pytest.mark.parametrize("n,context,stride", [(2, 8, 4), (10, 4, 2), (40, 16, 15), (41, 16, 1), (16, 16, 8)])
def test_windows_score_every_token_once_with_context_before_it(n, context, stride):
    spans = windows(n, context, stride)
    scored = [t for start, end, k in spans for t in range(end - k, end)]
    assert scored == list(range(1, n))
    for i, (start, end, k) in enumerate(spans):
        assert end - start <= context and k >= 1
        if i:  # after the first window each scored token sees at least context - stride tokens in its window
            assert end - k - start >= min(context - stride, end - k)


def by_hand(model: Transformer, ids: list[int], context: int, stride: int) -> float:
    """The same measure from the model's full logits, one window at a time."""
    total, count = 0.0, 0
    for start, end, k in windows(len(ids), context, stride):
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids[start:end]]))[0].double(), -1)
        for t in range(end - k, end):
            total -= float(logp[t - start - 1, ids[t]])
            count += 1
    return math.exp(total / count)


def test_perplexity_matches_the_models_logits_window_by_window():
    model = tiny()
    ids = torch.randint(0, 50, (60,), generator=torch.Generator().manual_seed(1)).tolist()
    whole = perplexity(model, ids, context=64, stride=32)
    assert whole.windows == 1 and whole.tokens == 59 and len(whole.logprobs) == 59
    assert whole.ppl == pytest.approx(by_hand(model, ids, 64, 32), rel=1e-5)
    slid = perplexity(model, ids, context=16, stride=5)
    assert slid.windows == 10 and slid.tokens == 59
    assert slid.ppl == pytest.approx(by_hand(model, ids, 16, 5), rel=1e-5)
    assert slid.ppl != pytest.approx(whole.ppl, rel=1e-4)  # shorter context: another measure
    assert perplexity(model, ids, context=1000, stride=32).ppl == whole.ppl  # capped at the model's 64
    capped = perplexity(model, ids)  # the defaults, 1024 and 512: 64 and 32 on this model
    assert (capped.context, capped.stride, capped.ppl) == (64, 32, whole.ppl)


def test_bad_settings_are_clear_errors():
    model = tiny()
    with pytest.raises(ValueError, match="at least 2 tokens"):
        perplexity(model, [3], 16, 8)
    with pytest.raises(ValueError, match="stride"):
        perplexity(model, [3, 4, 5], 16, 16)


def test_cli_scores_a_file_with_the_default_model(capsys, tmp_path, default_gguf):
    text = tmp_path / "text.txt"
    text.write_text("Paris is the capital of France. Seoul is the capital of Korea. " * 6)
    code = main(["perplexity", str(text), "--model", str(default_gguf), "--context", "48", "--stride", "24",
                 "--json"])
    out = capsys.readouterr().out
    result = json.loads(out.strip().splitlines()[-1])
    assert code == 0 and result["windows"] >= 3 and result["context"] == 48
    assert 1 < result["perplexity"] < 50  # a repeated sentence: the model follows it after the first time
    assert result["nll"] == pytest.approx(math.log(result["perplexity"]))


@pytest.mark.parametrize("content,message", [(None, "not found"), (b"  \n", "empty"), (b"\xff\xfe bad", "not UTF-8")])
def test_cli_names_a_bad_file(capsys, tmp_path, content, message):
    path = tmp_path / "text.txt"
    if content is not None:
        path.write_bytes(content)
    code = main(["perplexity", str(path), "--model", str(tmp_path / "no-model-needed-first")])
    err = capsys.readouterr().err
    assert code == 2 and message in err and str(path) in err
