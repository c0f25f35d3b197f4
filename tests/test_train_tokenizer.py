"""Tests for sputnik.train.tokenizer: byte-level BPE training, special tokens, Hangul pre-tokenization, saving."""

from __future__ import annotations

import io
import json
import random
import re
from pathlib import Path

import pytest

from sputnik.tokenizer import Tokenizer
from sputnik.train.tokenizer import (
    TokenizerConfig,
    _capped,
    chars_per_token,
    generated_english,
    generated_korean,
    iter_texts,
    korean_sample,
    korean_sample_source,
    print_report,
    report,
    run,
    save_tokenizer,
    train_tokenizer,
)

CFG = TokenizerConfig(vocab_size=600, fetch_korean_sample=False)

HANGUL = re.compile("[\u1100-\u11ff\u3130-\u318f\ua960-\ua97f\uac00-\ud7a3\ud7b0-\ud7ff]")
LATIN_OR_DIGIT = re.compile("[A-Za-z0-9]")

EMOJI = [
    "👩‍👩‍👧 family, 🏳️‍🌈 flag, 🇰🇷 and 🇺🇸, thumbs 👍🏽, 🧑🏻‍💻 at work",
    "🚀🔥✨ 😀😃😄 ❤️",
]
CONTROL = "\x00\x01\x07\x08\t\x0b\x0c\x1b[31mred\x1b[0m\x7f\x85\u200b\u200d\ufeff\u2028\r\n"


def random_unicode(rng: random.Random, length: int) -> str:
    """Random code points from the whole range, surrogates left out (they are not characters)."""
    chars = []
    while len(chars) < length:
        point = rng.choice([rng.randrange(0x20, 0x800), rng.randrange(0x800, 0x10000), rng.randrange(0x10000, 0x110000)])
        if not 0xD800 <= point <= 0xDFFF:
            chars.append(chr(point))
    return "".join(chars)


def corpus() -> list[str]:
    rng = random.Random(7)
    texts = generated_english(6000) + generated_korean(6000)
    texts += [f"{a} + {b} = {a + b}" for a, b in ((rng.randrange(1000), rng.randrange(1000)) for _ in range(200))]
    # Hangul glued to Latin letters and digits: without the Hangul split BPE would learn merges across them.
    texts += [f"Python가나다123 abc안녕 서울2024년 GPU메모리 x값은{i}" for i in range(50)]
    texts += EMOJI * 20 + [CONTROL] * 5 + [random_unicode(rng, 80) for _ in range(20)]
    return texts


@pytest.fixture(scope="module")
def trained() -> Tokenizer:
    return train_tokenizer(corpus(), CFG)


# ---------------------------------------------------------------------------------------------------
# Encoding
# ---------------------------------------------------------------------------------------------------


def test_round_trip_anything(trained: Tokenizer) -> None:
    rng = random.Random(11)
    texts = [
        "한국어 문장을 토큰으로 나눕니다. 안녕하세요! ㅋㅋㅋ ㅎㅎ",
        "\u1112\u1161\u11ab\u1100\u1173\u11af",  # 한글 as conjoining jamo, not precomposed
        *EMOJI,
        CONTROL,
        "e\u0301 combining, 中文 日本語 русский عربى",
        "  leading and trailing  \n\n",
        *(random_unicode(rng, 200) for _ in range(20)),
    ]
    for text in texts:
        ids = trained.encode(text)
        assert trained.decode(ids) == text, text
        assert all(trained.id_to_token(i) is not None for i in ids)


def test_no_unknown_token(trained: Tokenizer) -> None:
    assert trained.unk_token is None and trained.backend.model.unk_token is None
    assert "<unk>" not in trained.backend.get_vocab()
    # Every single byte has its own token, so bytes never seen in training still encode.
    assert trained.vocab_size == CFG.vocab_size


def test_special_tokens_whole(trained: Tokenizer) -> None:
    ids = [trained.token_to_id(t) for t in CFG.special_tokens]
    assert ids == list(range(len(CFG.special_tokens)))
    assert set(ids) <= trained.special_ids
    for token, token_id in zip(CFG.special_tokens, ids):
        assert trained.encode(token) == [token_id]
        assert trained.encode(f"a{token}b").count(token_id) == 1
    think = trained.token_to_id("<think>")
    # Pieces of a special token in separate texts never make it.
    assert think not in trained.encode("<thi") + trained.encode("nk>")
    assert think not in trained.encode("< think > <thinking> <THINK> think>")
    # No ordinary (merged) token spells a special token.
    specials = set(ids)
    for token_id in range(trained.vocab_size):
        if token_id not in specials:
            assert not any(t in trained.decode([token_id]) for t in CFG.special_tokens), token_id
    assert trained.bos_token == "<|bos|>" and trained.eos_id in trained.stop_ids
    assert trained.encode("hi", add_special_tokens=True)[0] == trained.bos_id


def test_hangul_never_shares_a_token_with_latin_or_digits(trained: Tokenizer) -> None:
    texts = corpus() + ["GPU메모리123x값은9 ab가cd나12다", "서울2024년abc"]
    for text in texts:
        encoding = trained.backend.encode(text, add_special_tokens=False)
        for start, end in encoding.offsets:
            piece = text[start:end]
            assert not (HANGUL.search(piece) and LATIN_OR_DIGIT.search(piece)), (text, piece)
    # Digits are split one by one.
    assert len(trained.encode("1234567890")) == 10
    # Korean words are learned whole (with their leading space), not as UTF-8 fragments.
    assert len(trained.encode(" 이야기를")) == 1


def test_korean_packs_tighter_than_default(trained: Tokenizer, default_tokenizer: Tokenizer) -> None:
    sample = generated_korean(3000, seed=1)  # same words as the training text, new sentences
    ours, theirs = chars_per_token(trained, sample), chars_per_token(default_tokenizer, sample)
    assert theirs < 1.0  # SmolLM2's vocab spends about two tokens per Hangul syllable
    assert ours > 2 * theirs, (ours, theirs)


# ---------------------------------------------------------------------------------------------------
# Saving and the chat template
# ---------------------------------------------------------------------------------------------------

CONVERSATION = [
    {"role": "system", "content": "한국어로 답하세요."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "<think>\n2 plus 2 is 4.\n</think>\n\n4입니다."},
    {"role": "user", "content": "And 3+3? 🚀"},
]


def test_chat_template_renders_think(trained: Tokenizer) -> None:
    assert trained.apply_chat_template(CONVERSATION) == (
        "<|bos|><|system|>한국어로 답하세요.<|user|>What is 2+2?<|assistant|>4입니다.<|eos|>"
        "<|user|>And 3+3? 🚀<|assistant|><think>\n"
    )
    finished = trained.apply_chat_template(CONVERSATION[1:3], add_generation_prompt=False)
    assert finished == "<|bos|><|user|>What is 2+2?<|assistant|><think>\n2 plus 2 is 4.\n</think>\n\n4입니다.<|eos|>"
    ids = trained.apply_chat_template(CONVERSATION[1:2], tokenize=True)
    assert ids[0] == trained.bos_id
    assert ids[-3:] == [trained.token_to_id("<|assistant|>"), trained.token_to_id("<think>"), trained.encode("\n")[0]]


def test_saved_folder_loads_in_sputnik_and_transformers(trained: Tokenizer, tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    save_tokenizer(trained, tmp_path, CFG)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["chat_template"] == trained.chat_template and "<think>" in config["chat_template"]
    assert (config["bos_token"], config["eos_token"], config["pad_token"]) == ("<|bos|>", "<|eos|>", "<|pad|>")
    assert config["additional_special_tokens"] == CFG.special_tokens[3:]

    reloaded = Tokenizer.load(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    texts = corpus()[::40] + EMOJI + [CONTROL, "<think>\n생각\n</think>\n\n답<|eos|>", "<thi" + "nk>"]
    for text in texts:
        for special in (False, True):
            ids = trained.encode(text, add_special_tokens=special)
            assert ids == reloaded.encode(text, special) == hf.encode(text, add_special_tokens=special), text
        assert hf.decode(trained.encode(text)) == text
    for prompt in (True, False):
        ours = trained.apply_chat_template(CONVERSATION, add_generation_prompt=prompt)
        assert ours == reloaded.apply_chat_template(CONVERSATION, add_generation_prompt=prompt)
        assert ours == hf.apply_chat_template(CONVERSATION, add_generation_prompt=prompt, tokenize=False)
    assert (hf.bos_token, hf.eos_token, hf.pad_token) == ("<|bos|>", "<|eos|>", "<|pad|>")
    assert reloaded.stop_ids == trained.stop_ids == {trained.eos_id}
    assert reloaded.special_ids == trained.special_ids


# ---------------------------------------------------------------------------------------------------
# Input files, the report and run()
# ---------------------------------------------------------------------------------------------------


def test_iter_texts(tmp_path: Path) -> None:
    txt = tmp_path / "a.txt"
    txt.write_text("first line\nsame doc\n\n\nsecond doc\r\n\nthird\n", encoding="utf-8")
    rows = [{"text": "plain row"}, {"body": "x", "messages": [{"role": "user", "content": "hi"},
                                                              {"role": "assistant", "content": "안녕"}]}]
    jsonl = tmp_path / "b.jsonl"
    jsonl.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n\n", encoding="utf-8")
    assert list(iter_texts([txt, jsonl])) == ["first line\nsame doc", "second doc", "third", "plain row", "hi\n\n안녕"]
    with pytest.raises(ValueError, match=r"b\.jsonl:1: .*'body'"):
        list(iter_texts([jsonl], text_key="body"))

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n\n{"text": broken\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.jsonl:3: not valid JSON"):
        list(iter_texts([bad]))
    no_text = tmp_path / "no_text.jsonl"
    no_text.write_text('{"text": "ok"}\n{"title": "x"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"no_text\.jsonl:2: .*'text'"):
        list(iter_texts([no_text]))
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        list(iter_texts([txt, tmp_path / "missing.txt"]))
    with pytest.raises(ValueError, match="no text to train"):
        train_tokenizer([], CFG)
    with pytest.raises(ValueError, match="too small"):
        TokenizerConfig(vocab_size=100)
    assert list(_capped(["abcd", "efgh", "ijkl"], 6)) == ["abcd", "ef"]


def test_run_writes_folder_and_report(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "en.txt").write_text("\n\n".join(generated_english(4000)), encoding="utf-8")
    (data / "ko.jsonl").write_text(
        "\n".join(json.dumps({"text": t}, ensure_ascii=False) for t in generated_korean(4000)), encoding="utf-8"
    )
    out = tmp_path / "tok"
    result = run([data / "en.txt", data / "ko.jsonl"], out, CFG)
    assert json.loads((out / "report.json").read_text(encoding="utf-8")) == result
    table = result["chars_per_token"]
    assert set(table["trained"]) == {"english", "korean"} and all(v > 0 for v in table["trained"].values())
    assert result["samples"]["korean"]["chars"] > 1000 and result["vocab_size"] == CFG.vocab_size
    assert Tokenizer.load(out).encode("안녕하세요") == train_tokenizer(
        iter_texts([data / "en.txt", data / "ko.jsonl"]), CFG).encode("안녕하세요")

    printed = io.StringIO()
    print_report(report({"a": Tokenizer.load(out)}, {"korean": ["한국어"], "english": ["hello"]}), printed)
    lines = printed.getvalue().splitlines()
    assert lines[0].split() == ["chars/token", "korean", "english"] and lines[1].split()[0] == "a"


def test_korean_sample_without_network(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPUTNIK_HOME", str(tmp_path))  # nothing fetched there, and fetch=False never downloads
    sample = korean_sample()
    assert korean_sample_source() == "generated" and sum(map(len, sample)) >= 20_000
    assert all(HANGUL.search(paragraph) for paragraph in sample)
