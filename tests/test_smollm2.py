"""The default model for real: SmolLM2-135M-Instruct from its Q4_1 GGUF against transformers loading the same file."""

import pytest
import torch

from sputnik.checkpoint import load_model
from sputnik.engine import Engine, SamplingParams

MESSAGES = [{"role": "user", "content": "What is 23 + 19? Explain step by step."}]


@pytest.fixture(scope="module")
def models(default_gguf, default_tokenizer):
    tf = pytest.importorskip("transformers")
    tf.logging.set_verbosity_error()
    ref = tf.AutoModelForCausalLM.from_pretrained(default_gguf.parent, gguf_file=default_gguf.name,
                                                  dtype=torch.float32).eval()
    ref_tok = tf.AutoTokenizer.from_pretrained(default_gguf.parent, gguf_file=default_gguf.name)
    return ref, ref_tok, load_model(default_gguf), default_tokenizer


def test_same_chat_prompt(models):
    _, ref_tok, _, tok = models
    want = ref_tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert tok.apply_chat_template(MESSAGES, add_generation_prompt=True) == want
    assert tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True) == ref_tok(want).input_ids


def test_logits_match_transformers(models):
    ref, _, ours, tok = models
    ids = torch.tensor([tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True)])
    with torch.no_grad():
        want, got = ref(ids).logits, ours(ids)
    assert (got - want).abs().max().item() <= 1e-3


def test_same_32_greedy_tokens(models):
    ref, _, ours, tok = models
    prompt = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True)
    with torch.no_grad():
        want = ref.generate(torch.tensor([prompt]), max_new_tokens=32, min_new_tokens=32, do_sample=False,
                            pad_token_id=tok.pad_id)[0, len(prompt):].tolist()
    got = Engine(ours, tok).generate([prompt], SamplingParams(max_tokens=32, temperature=0, ignore_eos=True))[0][0]
    assert got.token_ids == want
    assert len(want) == 32
