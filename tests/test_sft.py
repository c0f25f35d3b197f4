"""SFT: assistant-only loss masks on real chat templates, packed rows that equal documents alone, micro-batch
invariance, a tiny model that learns a reply, and clear errors for bad JSONL."""

import json
from pathlib import Path

import pytest
import torch

from sputnik.model import Transformer, build_doc_mask
from sputnik.r1 import CHAT_TEMPLATE as R1_CHAT_TEMPLATE, EOS as R1_EOS, SPECIAL_TOKENS as R1_SPECIAL_TOKENS
from sputnik.tokenizer import Tokenizer
from sputnik.train.loop import TrainConfig
from sputnik.train.sft import (SFTConfig, SFTObjective, collate, load_chat_jsonl, pack, tokenize_chat,
                               train_sft)
from test_engine import tiny as tiny_model  # 2 layers, weights large enough that masking mistakes show

CHAT = [
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "It is 4.", "reasoning_content": "Two and two make four."},
    {"role": "user", "content": "And 3+3?"},
    {"role": "assistant", "content": "<think>\nThree twice.\n</think>\n\nIt is 6."},
]


@pytest.fixture(scope="module")
def r1_tokenizer() -> Tokenizer:
    return make_r1_tokenizer()


def make_r1_tokenizer() -> Tokenizer:
    """A small byte-level BPE with DeepSeek-R1's special tokens and chat template."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, trainers

    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=R1_SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = ["What is two plus two? It is four. The answer is 42.", "Think step by step, then answer."]
    backend.train_from_iterator(text * 5, trainer)
    return Tokenizer(backend, bos_token=R1_SPECIAL_TOKENS[0], eos_token=R1_EOS, chat_template=R1_CHAT_TEMPLATE)


def masked_spans(tok: Tokenizer, ids: list[int], mask: list[int]) -> list[str]:
    """The text of each run of masked tokens."""
    spans, run = [], []
    for i, m in zip(ids + [None], mask + [0]):
        if m:
            run.append(i)
        elif run:
            spans.append(tok.decode(run))
            run = []
    return spans


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


# ---------------------------------------------------------------- loss masks


def test_mask_chatml_covers_assistant_text_and_end_of_turn(default_tokenizer):
    tok = default_tokenizer
    ids, mask = tokenize_chat(tok, CHAT)
    text = tok.decode(ids)
    # The reasoning field is folded into the content inside <think>; inline <think> is kept as written.
    assert "<|im_start|>assistant\n<think>\nTwo and two make four.\n</think>\n\nIt is 4.<|im_end|>" in text
    assert masked_spans(tok, ids, mask) == ["<think>\nTwo and two make four.\n</think>\n\nIt is 4.<|im_end|>",
                                            "<think>\nThree twice.\n</think>\n\nIt is 6.<|im_end|>"]
    assert ids == tok.apply_chat_template(
        [{"role": m["role"], "content": m["content"]} for m in CHAT[:1]] + [
            {"role": "assistant", "content": "<think>\nTwo and two make four.\n</think>\n\nIt is 4."}] + CHAT[2:],
        add_generation_prompt=False, tokenize=True)
    # `reasoning` is read like `reasoning_content`; a plain reply masks just its text and <|im_end|>.
    ids, mask = tokenize_chat(tok, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                                    {"role": "assistant", "content": "Hello there", "reasoning": "greet"}])
    assert masked_spans(tok, ids, mask) == ["<think>\ngreet\n</think>\n\nHello there<|im_end|>"]
    ids, mask = tokenize_chat(tok, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}])
    assert masked_spans(tok, ids, mask) == ["Hello<|im_end|>"]
    assert tok.decode(ids).endswith("<|im_start|>assistant\nHello<|im_end|>\n")  # the trailing newline: not masked


def test_mask_r1_template(r1_tokenizer):
    tok = r1_tokenizer
    ids, mask = tokenize_chat(tok, CHAT)
    # R1's template keeps only the answer of earlier turns, and the last turn whole with its reasoning.
    assert masked_spans(tok, ids, mask) == ["It is 4." + R1_EOS, "<think>\nThree twice.\n</think>\n\nIt is 6." + R1_EOS]
    assistant = tok.token_to_id("<｜Assistant｜>")
    assert all(m == 0 for i, m in zip(ids, mask) if i == assistant)
    assert sum(m for i, m in zip(ids, mask) if i == tok.eos_id) == 2
    ids, mask = tokenize_chat(tok, CHAT[:2])
    assert masked_spans(tok, ids, mask) == ["<think>\nTwo and two make four.\n</think>\n\nIt is 4." + R1_EOS]
    # Naming the template explicitly renders the same ids as the tokenizer's default.
    assert tokenize_chat(tok, CHAT[:2], chat_template=R1_CHAT_TEMPLATE) == (ids, mask)


# ---------------------------------------------------------------- packing


def test_pack_positions_doc_ids_and_truncation():
    examples = [([1] * 5, [0, 0, 1, 1, 1]), ([2] * 9, [1] * 9), ([3] * 3, [0, 1, 1]), ([4] * 14, [1] * 14)]
    rows = pack(examples, seq_len=10)
    assert all(len(r.tokens) <= 10 for r in rows)
    assert sum(r.truncated for r in rows) == 1  # the 14-token example
    docs = sorted(tuple(r.tokens[i] for i, d in enumerate(r.doc_ids) if d == doc)
                  for r in rows for doc in set(r.doc_ids))
    assert docs == [(1,) * 5, (2,) * 9, (3,) * 3, (4,) * 10]
    for r in rows:
        for i, d in enumerate(r.doc_ids):
            first = i == 0 or r.doc_ids[i - 1] != d
            assert r.positions[i] == (0 if first else r.positions[i - 1] + 1)
    assert len(rows) == 3  # 10 | 9 | 5 + 3 (best fit)
    batch = collate(rows, pad_id=0)
    # A target never crosses a document boundary or lands on a non-assistant token.
    row = next(b for b, r in enumerate(rows) if len(set(r.doc_ids)) == 2)
    assert batch["targets"][row].tolist()[:8] == [-100, 1, 1, 1, -100, 3, 3, -100]
    assert batch["doc_ids"][row].tolist()[8:] == [-1, -1]


@pytest.mark.parametrize("family", ["llama", "deepseek_v3"])
def test_packed_documents_equal_documents_alone(family):
    model = tiny_model(family, vocab=64)
    g = torch.Generator().manual_seed(1)
    docs = [torch.randint(1, 64, (n,), generator=g).tolist() for n in (7, 12, 5)]
    rows = pack([(d, [1] * len(d)) for d in docs], seq_len=24)
    assert len(rows) == 1
    row = rows[0]
    b = collate(rows, pad_id=0)

    def packed_logits(tokens: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model(tokens, b["positions"], mask=build_doc_mask(b["doc_ids"]))[0]

    logits = packed_logits(b["tokens"])
    doc_of = torch.tensor(row.doc_ids)
    for d in range(len(docs)):
        alone_tokens = b["tokens"][0, doc_of == d]
        with torch.no_grad():
            alone = model(alone_tokens[None])[0]
        torch.testing.assert_close(logits[doc_of == d], alone, atol=2e-5, rtol=1e-5)

    # Changing the first document leaves the others untouched; without doc_ids it would not.
    changed = b["tokens"].clone()
    changed[0, doc_of == 0] = (changed[0, doc_of == 0] + 7) % 63 + 1
    after = packed_logits(changed)
    rest = doc_of != 0
    torch.testing.assert_close(after[rest], logits[rest], atol=1e-6, rtol=0)
    assert not torch.allclose(after[doc_of == 0], logits[doc_of == 0])
    with torch.no_grad():
        leaky = model(changed, b["positions"])[0]
        plain = model(b["tokens"], b["positions"])[0]
    assert not torch.allclose(leaky[rest], plain[rest])

    # Padding (a shorter row in the batch) changes nothing either.
    short = pack([(docs[2], [1] * 5)], seq_len=24)
    both = collate(rows + short, pad_id=0)
    with torch.no_grad():
        batched = model(both["tokens"], both["positions"], mask=build_doc_mask(both["doc_ids"]))
    torch.testing.assert_close(batched[0], logits, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(batched[1, :5], logits[doc_of == 2], atol=2e-5, rtol=1e-5)


# ---------------------------------------------------------------- the objective and a run


def conversations(n: int, every: int = 2) -> list[dict]:
    """n questions with one fixed reply; every `every`-th one also carries reasoning."""
    return [{"messages": [{"role": "user", "content": f"What is {i} plus {i}?" + " Think." * (i % 4)},
                          {"role": "assistant", "content": "The answer is 42.",
                           **({"reasoning_content": "Think step by step."} if i % every == 0 else {})}]}
            for i in range(n)]


def test_loss_does_not_depend_on_micro_batch_split(tmp_path, r1_tokenizer):
    data = write_jsonl(tmp_path / "chat.jsonl", conversations(12))
    model = tiny_model("llama", r1_tokenizer.vocab_size).train()
    results = []
    for micro_batch in (4, 1, 3):
        objective = SFTObjective(r1_tokenizer, SFTConfig(data=str(data), seq_len=48, batch_size=4,
                                                         micro_batch=micro_batch, seed=3))
        model.zero_grad(set_to_none=True)
        micros = objective.prepare(0, model)
        assert len(micros) == -(-4 // micro_batch)
        total = 0.0
        for m in micros:
            loss, _ = objective.loss(model, m)
            loss.backward()
            total += loss.item()
        grads = [p.grad.clone() for p in model.parameters()]
        results.append((total, grads, objective.metrics(0)))
    (loss4, grads4, metrics4), *others = results
    assert metrics4["assistant_tokens"] > 0 and metrics4["tokens"] > metrics4["assistant_tokens"]
    for loss, grads, metrics in others:
        assert loss == pytest.approx(loss4, rel=1e-5)
        assert metrics == metrics4
        for a, b in zip(grads, grads4):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def test_data_order_is_seeded_per_epoch_and_checked_on_resume(tmp_path, r1_tokenizer):
    data = write_jsonl(tmp_path / "chat.jsonl", conversations(10))
    cfg = SFTConfig(data=str(data), seq_len=24, batch_size=3, micro_batch=3, seed=5)
    a, b = SFTObjective(r1_tokenizer, cfg), SFTObjective(r1_tokenizer, cfg)
    n = len(a.rows)
    order = [i for step in range(2 * n) for i in a.step_indices(step)]  # several epochs
    for e in range(3):
        assert sorted(order[e * n : (e + 1) * n]) == list(range(n))
    assert order[:n] != order[n : 2 * n]
    b.load_state_dict(a.state_dict())
    assert [b.step_indices(s) for s in (7, 2, 5)] == [a.step_indices(s) for s in (7, 2, 5)]
    other = SFTObjective(r1_tokenizer, SFTConfig(data=str(data), seq_len=32, batch_size=3, seed=5))
    with pytest.raises(ValueError, match="other SFT data"):
        other.load_state_dict(a.state_dict())


def test_resume_continues_bit_for_bit(tmp_path, r1_tokenizer):
    import shutil

    data = write_jsonl(tmp_path / "chat.jsonl", conversations(10))
    sft = SFTConfig(data=str(data), seq_len=40, batch_size=2, micro_batch=1, seed=1)

    def run(out: Path, model: Transformer) -> dict:
        train = TrainConfig(out_dir=str(out), max_steps=6, lr=1e-2, save_every=3, keep_last=0, progress=False,
                            plot_every=0)
        train_sft(model, r1_tokenizer, sft, train)
        return {k: v.clone() for k, v in model.state_dict().items()}

    whole = run(tmp_path / "a", tiny_model("llama", r1_tokenizer.vocab_size))
    shutil.copytree(tmp_path / "a" / "checkpoints" / "step_000003", tmp_path / "b" / "checkpoints" / "step_000003")
    resumed = run(tmp_path / "b", tiny_model("llama", r1_tokenizer.vocab_size))
    for k in whole:
        assert torch.equal(whole[k], resumed[k]), k


def test_tiny_model_learns_a_fixed_reply(tmp_path, r1_tokenizer):
    data = write_jsonl(tmp_path / "chat.jsonl", conversations(16, every=1))
    model = tiny_model("llama", r1_tokenizer.vocab_size)
    for p in model.parameters():  # a gentler init than the masking tests' (trains faster)
        torch.nn.init.normal_(p, 0, 0.05) if p.ndim > 1 else torch.nn.init.ones_(p)
    out = tmp_path / "run"
    summary = train_sft(model, r1_tokenizer, SFTConfig(data=str(data), seq_len=64, batch_size=4, micro_batch=2),
                        TrainConfig(out_dir=str(out), max_steps=30, lr=1e-2, progress=False, plot_every=0))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 30 and {"loss", "tokens", "assistant_tokens"} <= set(rows[0])
    assert summary["loss_last"] < 0.1 * summary["loss_first"], summary
    # Greedy decoding after a new question's assistant header now writes the reply.
    ids, mask = tokenize_chat(r1_tokenizer, conversations(17, every=1)[16]["messages"])
    start = mask.index(1)
    out_ids = ids[:start]
    model.eval()
    with torch.no_grad():
        for _ in range(len(ids) - start):
            out_ids.append(int(model(torch.tensor([out_ids]))[0, -1].argmax()))
    assert out_ids == ids
    assert json.loads((out / "summary.json").read_text())["examples"] == 16
    assert (out / "metrics.png").is_file() and (out / "checkpoints" / "step_000030" / "trainer.pt").is_file()


# ---------------------------------------------------------------- bad data


def test_bad_jsonl_names_file_and_line(tmp_path):
    good = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    assert load_chat_jsonl(write_jsonl(tmp_path / "ok.jsonl", [good, "", good])) == [good["messages"]] * 2
    cases = {
        "not valid JSON": [good, "", "{oops"],
        "messages": [good, {"text": "no messages"}],
        "'role'": [good, good, {"messages": [{"content": "no role"}]}],
        "no assistant": [{"messages": [{"role": "user", "content": "Hi"}]}],
        "reasoning given twice": [{"messages": [{"role": "assistant", "content": "<think>a</think>b",
                                                 "reasoning_content": "a"}]}],
    }
    for why, rows in cases.items():
        path = write_jsonl(tmp_path / "bad.jsonl", rows)
        line = len(rows)
        with pytest.raises(ValueError, match=rf"bad\.jsonl, line {line}: .*{why}"):
            load_chat_jsonl(path)


DIST = """
import sys
sys.path.insert(0, {tests!r})
from test_sft import make_r1_tokenizer, tiny_model
from sputnik.train.loop import TrainConfig, Trainer, finish_distributed
from sputnik.train.sft import SFTConfig, SFTObjective
tok = make_r1_tokenizer()
objective = SFTObjective(tok, SFTConfig(data={data!r}, seq_len=48, batch_size=3, micro_batch=1, seed=3))
Trainer(tiny_model("llama", tok.vocab_size).train(),
        TrainConfig(out_dir={out!r}, max_steps=2, lr=3e-3, progress=False, plot_every=0, fsdp={fsdp}), objective).run()
finish_distributed()
"""


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp2"])
def test_two_processes_equal_one(tmp_path, r1_tokenizer, fsdp):
    """3 rows a step over 2 ranks: one rank runs 2 micro-batches, the other 1 (and a padding one under FSDP)."""
    import textwrap

    from sputnik.train.loop import Trainer
    from torchrun import assert_two_equal_one, torchrun

    data = write_jsonl(tmp_path / "chat.jsonl", conversations(12))
    script = tmp_path / "dist.py"
    script.write_text(textwrap.dedent(DIST.format(tests=str(Path(__file__).resolve().parent), data=str(data),
                                                  out=str(tmp_path / "two"), fsdp=fsdp)))
    torchrun(script)
    model = tiny_model("llama", r1_tokenizer.vocab_size).train()
    objective = SFTObjective(r1_tokenizer, SFTConfig(data=str(data), seq_len=48, batch_size=3, micro_batch=1, seed=3))
    Trainer(model, TrainConfig(out_dir=str(tmp_path / "one"), max_steps=2, lr=3e-3, progress=False, plot_every=0),
            objective).run()
    assert_two_equal_one(tmp_path / "two", tmp_path / "one", model)
