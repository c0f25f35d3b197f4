"""Tests for sputnik.tokenizer: GGUF and folder loading, parity with transformers, chat templates, streaming."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from sputnik.r1 import CHAT_TEMPLATE as R1_CHAT_TEMPLATE
from sputnik.r1 import SPECIAL_TOKENS as R1_SPECIAL_TOKENS
from sputnik.tokenizer import StreamDecoder, Tokenizer
from sputnik.tokenizer.pretokenize import PRE_SPLITS


TEXTS = [
    "Hello, world! This is a simple English sentence.",
    "12345+678=",
    "I have 2024 apples and 3.14159 pies; x² + y² = z²",
    "한국어 문장을 토큰으로 나눕니다. 안녕하세요!",
    "Emoji: 🚀🔥👩‍👩‍👧 and flags 🇰🇷 done",
    "def f(x):\n    return x ** 2  # square\n\n\tprint(f(3))",
    "spaces:   three, then\t\ttabs, then      six",
    "line one\nline two\r\n\n\nline five\n",
    "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n",
    "It's we're they've I'm you'll he'd DON'T",
    "   leading and trailing   ",
    "Mixed 中文 日本語 русский عربى ελληνικά",
    "",
]

CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi!"}],
    [
        {"role": "system", "content": "Answer in Korean."},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "안녕하세요!"},
        {"role": "user", "content": "How are you? 🚀"},
    ],
    [
        {"role": "user", "content": "First"},
        {"role": "assistant", "content": "Reply one"},
        {"role": "user", "content": "Second"},
        {"role": "assistant", "content": "Reply two"},
    ],
]


@pytest.fixture(scope="module")
def gguf_path(default_gguf: Path) -> Path:
    return default_gguf


@pytest.fixture(scope="module")
def tok(gguf_path: Path) -> Tokenizer:
    return Tokenizer.from_gguf(gguf_path)


@pytest.fixture(scope="module")
def hf_tok(gguf_path: Path):
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    return transformers.AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)


def write_gguf(path: Path, arch: str = "llama", **tokenizer) -> Path:
    """A GGUF file with metadata only (no tensors): enough to describe a tokenizer."""
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    if "model" in tokenizer:
        writer.add_tokenizer_model(tokenizer["model"])
    if "pre" in tokenizer:
        writer.add_tokenizer_pre(tokenizer["pre"])
    if "tokens" in tokenizer:
        writer.add_token_list(tokenizer["tokens"])
    if "types" in tokenizer:
        writer.add_token_types(tokenizer["types"])
    if "scores" in tokenizer:
        writer.add_token_scores(tokenizer["scores"])
    if "merges" in tokenizer:
        writer.add_token_merges(tokenizer["merges"])
    for key, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                     ("unk", writer.add_unk_token_id)):
        if key in tokenizer:
            add(tokenizer[key])
    if "add_bos" in tokenizer:
        writer.add_add_bos_token(tokenizer["add_bos"])
    if "chat_template" in tokenizer:
        writer.add_chat_template(tokenizer["chat_template"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# ---------------------------------------------------------------------------------------------------
# The default model's GGUF against transformers
# ---------------------------------------------------------------------------------------------------


def test_gguf_ids_match_transformers(tok: Tokenizer, hf_tok) -> None:
    for text in TEXTS:
        assert tok.encode(text) == hf_tok.encode(text, add_special_tokens=False), text
        assert tok.encode(text, add_special_tokens=True) == hf_tok.encode(text, add_special_tokens=True), text


def test_gguf_matches_original_smollm_pipeline(tok: Tokenizer) -> None:
    """SmolLM2's own tokenizer.json splits digits one by one before GPT-2's regex ("smollm" in llama.cpp).

    transformers' GGUF loader leaves the digit split out, which changes the ids wherever a run of
    whitespace meets a number ("\n\n1.", "  9"); we follow the model's tokenizer and llama.cpp there.
    """
    from tokenizers import Tokenizer as Backend
    from tokenizers import pre_tokenizers

    original = Backend.from_str(tok.backend.to_str())
    original.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    rng = random.Random(5)
    pool = list("ab Z09²½\n\t\r'!.-(<|") + ["<|im_end|>", "한", "🚀", "é", "中", "'s", "  ", "\u00a0", "Ⅻ"]
    samples = ["Steps:\n\n1. Mix\n2. Bake", "x =  9", "a\t\t42"]
    samples += ["".join(rng.choice(pool) for _ in range(rng.randrange(40))) for _ in range(500)]
    for text in samples:
        assert tok.encode(text) == original.encode(text, add_special_tokens=False).ids, text
    assert tok.encode("\n\n1.") == [tok.token_to_id("ĊĊ"), tok.token_to_id("1"), tok.token_to_id(".")]


def test_gguf_saved_as_folder(tok: Tokenizer, tmp_path: Path) -> None:
    """A GGUF's tokenizer written out as an HF folder loads in transformers and behaves the same."""
    transformers = pytest.importorskip("transformers")
    tok.save(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    for text in TEXTS + ["Steps:\n\n1. Mix\n2. Bake"]:
        assert hf.encode(text, add_special_tokens=False) == tok.encode(text), text
    for conversation in CONVERSATIONS:
        assert hf.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False) == (
            tok.apply_chat_template(conversation)
        )


def test_gguf_decode_matches_transformers(tok: Tokenizer, hf_tok) -> None:
    for text in TEXTS:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert tok.decode(ids) == hf_tok.decode(ids)
        assert tok.decode(ids, skip_special_tokens=True) == hf_tok.decode(ids, skip_special_tokens=True)


def test_gguf_special_tokens(tok: Tokenizer, hf_tok) -> None:
    assert tok.vocab_size == len(hf_tok) == 49152
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (hf_tok.bos_token_id, hf_tok.eos_token_id, hf_tok.pad_token_id)
    assert tok.bos_token == "<|im_start|>" and tok.eos_token == "<|im_end|>"
    # <|endoftext|> is not the EOS here, so it does not stop generation; <|im_end|> does.
    assert tok.stop_ids == {tok.token_to_id("<|im_end|>")}
    assert tok.id_to_token(tok.eos_id) == "<|im_end|>"
    assert tok.token_to_id("<|im_start|>") in tok.special_ids
    assert tok.encode("<|im_start|>") == [tok.token_to_id("<|im_start|>")]
    assert not tok.add_bos  # the file says add_bos_token = false


@pytest.mark.parametrize("conversation", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_gguf_chat_matches_transformers(tok: Tokenizer, hf_tok, conversation, add_generation_prompt) -> None:
    ours = tok.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt)
    theirs = hf_tok.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt, tokenize=False)
    assert ours == theirs
    ids = tok.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt, tokenize=True)
    assert ids == hf_tok.encode(theirs, add_special_tokens=False)


def test_gguf_chat_default_system_prompt(tok: Tokenizer) -> None:
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")


# ---------------------------------------------------------------------------------------------------
# Streaming decode
# ---------------------------------------------------------------------------------------------------


def stream(tokenizer: Tokenizer, ids: list[int], skip_special_tokens: bool = False,
           max_window: int | None = None) -> list[str]:
    decoder = StreamDecoder(tokenizer, skip_special_tokens=skip_special_tokens)
    pieces = []
    for token_id in ids:
        pieces.append(decoder.push(token_id))
        # On real text the window holds the last emitted chunk plus pending tokens, not the whole sequence.
        # (Random ids may legitimately hold back longer: invalid bytes, runs of byte tokens.)
        assert max_window is None or len(decoder._ids) <= max_window
    pieces.append(decoder.flush())
    return pieces


def test_stream_korean_emoji(tok: Tokenizer) -> None:
    text = "한국어 문장입니다. 🚀🔥 emoji 👩‍👩‍👧 and 🇰🇷 끝! " * 5
    ids = tok.encode(text)
    pieces = stream(tok, ids, max_window=8)
    assert all("\ufffd" not in piece for piece in pieces)
    assert "".join(pieces) == tok.decode(ids) == text
    assert sum(1 for piece in pieces if piece) > len(ids) // 4  # text comes out as it goes, not all at the end


def test_stream_random_ids(tok: Tokenizer) -> None:
    rng = random.Random(0)
    for _ in range(30):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 60))]
        assert "".join(stream(tok, ids)) == tok.decode(ids)
        assert "".join(stream(tok, ids, skip_special_tokens=True)) == tok.decode(ids, skip_special_tokens=True)


def test_stream_byte_pieces(tok: Tokenizer) -> None:
    # Byte-level tokens that each hold part of a character: nothing comes out until it is whole.
    byte_ids = [tok.token_to_id(piece) for piece in ("ðŁ", "ļ", "Ģ")]  # the bytes of 🚀 split in three
    if None in byte_ids or tok.decode(byte_ids) != "🚀":
        byte_ids = tok.encode("🚀")
    decoder = StreamDecoder(tok)
    pieces = [decoder.push(i) for i in byte_ids]
    assert pieces[:-1] == [""] * (len(byte_ids) - 1) and pieces[-1] == "🚀"
    assert decoder.flush() == ""


# ---------------------------------------------------------------------------------------------------
# A tiny tokenizer built here, saved, and loaded by transformers
# ---------------------------------------------------------------------------------------------------

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Reasoning models think before they answer.",
    "Let me compute 12 + 30 = 42 step by step.",
    "한국어도 조금 넣어 봅니다.",
    "def add(a, b):\n    return a + b\n",
]


@pytest.fixture(scope="module")
def tiny() -> Tokenizer:
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, trainers

    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=R1_SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(SENTENCES * 3, trainer)
    return Tokenizer(backend, bos_token=R1_SPECIAL_TOKENS[0], eos_token=R1_SPECIAL_TOKENS[1],
                     chat_template=R1_CHAT_TEMPLATE)


R1_TWO_TURNS = [
    {"role": "system", "content": "You are helpful."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "<think>\n2 plus 2 is 4.\n</think>\n\nThe answer is 4."},
    {"role": "user", "content": "And 3+3?"},
]


def test_r1_template_exact(tiny: Tokenizer) -> None:
    text = tiny.apply_chat_template(R1_TWO_TURNS)
    assert text == (
        "<｜begin▁of▁sentence｜>You are helpful."
        "<｜User｜>What is 2+2?"
        "<｜Assistant｜>The answer is 4.<｜end▁of▁sentence｜>"
        "<｜User｜>And 3+3?"
        "<｜Assistant｜><think>\n"
    )
    assert tiny.apply_chat_template(R1_TWO_TURNS[1:2]) == (
        "<｜begin▁of▁sentence｜><｜User｜>What is 2+2?<｜Assistant｜><think>\n"
    )
    # A finished conversation keeps the final answer's reasoning (training data) and ends with EOS.
    finished = R1_TWO_TURNS[:3]
    assert tiny.apply_chat_template(finished, add_generation_prompt=False).endswith(
        "<｜Assistant｜><think>\n2 plus 2 is 4.\n</think>\n\nThe answer is 4.<｜end▁of▁sentence｜>"
    )
    ids = tiny.apply_chat_template(R1_TWO_TURNS, tokenize=True)
    assert ids[0] == tiny.bos_id and ids[-3:-1] == [tiny.token_to_id("<｜Assistant｜>"), tiny.token_to_id("<think>")]


def test_save_loads_in_transformers(tiny: Tokenizer, tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    tiny.set_add_special_tokens(add_bos=True)
    try:
        tiny.save(tmp_path)
        hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
        reloaded = Tokenizer.load(tmp_path)
        for text in SENTENCES + TEXTS + ["<think>\nhmm\n</think>\n\nok<｜end▁of▁sentence｜>"]:
            for special in (False, True):
                ids = tiny.encode(text, add_special_tokens=special)
                assert ids == hf.encode(text, add_special_tokens=special) == reloaded.encode(text, special), text
            assert tiny.decode(tiny.encode(text)) == hf.decode(tiny.encode(text)) == text
        for conversation in [R1_TWO_TURNS, *CONVERSATIONS]:
            for prompt in (True, False):
                ours = tiny.apply_chat_template(conversation, add_generation_prompt=prompt)
                assert ours == hf.apply_chat_template(conversation, add_generation_prompt=prompt, tokenize=False)
                assert ours == reloaded.apply_chat_template(conversation, add_generation_prompt=prompt)
        assert (hf.bos_token, hf.eos_token) == (tiny.bos_token, tiny.eos_token)
        assert reloaded.add_bos and reloaded.bos_id == tiny.bos_id
    finally:
        tiny.set_add_special_tokens(add_bos=False)


def test_stream_on_tiny(tiny: Tokenizer) -> None:
    text = "<think>\n한국어 🚀\n</think>\n\nok<｜end▁of▁sentence｜>"
    ids = tiny.encode(text)
    pieces = stream(tiny, ids, max_window=8)
    assert "".join(pieces) == text and all("\ufffd" not in p for p in pieces)
    assert "".join(stream(tiny, ids, skip_special_tokens=True)) == tiny.decode(ids, skip_special_tokens=True)


# ---------------------------------------------------------------------------------------------------
# Folders
# ---------------------------------------------------------------------------------------------------


def test_from_dir_config_variants(tiny: Tokenizer, tmp_path: Path) -> None:
    tiny.save(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast" and config["chat_template"] == R1_CHAT_TEMPLATE

    # A list of named templates, tokens as AddedToken dicts, and extra stop ids from generation_config.json.
    config["chat_template"] = [{"name": "default", "template": "D{{ messages[0]['content'] }}"},
                               {"name": "tool_use", "template": "T"}]
    config["eos_token"] = {"content": "<｜end▁of▁sentence｜>", "special": True}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [5, 6]}), encoding="utf-8")
    loaded = Tokenizer.from_dir(tmp_path)
    assert loaded.apply_chat_template([{"role": "user", "content": "x"}]) == "Dx"
    assert loaded.apply_chat_template([{"role": "user", "content": "x"}], chat_template="tool_use") == "T"
    assert loaded.eos_id == tiny.eos_id and {5, 6, tiny.eos_id} <= loaded.stop_ids

    # chat_template.jinja wins over the config entry, as in transformers.
    (tmp_path / "chat_template.jinja").write_text("J{{ messages | length }}", encoding="utf-8")
    assert Tokenizer.load(tmp_path).apply_chat_template([{"role": "user", "content": "x"}]) == "J1"


def test_chat_template_helpers(tiny: Tokenizer) -> None:
    template = (
        "{% for m in messages %}{% if m['role'] == 'skip' %}{% continue %}{% endif %}"
        "{% generation %}{{ m | tojson }}{% endgeneration %}{% endfor %}"
        "{{ bos_token }}|{{ strftime_now('%Y') | length }}|{{ extra }}"
    )
    messages = [{"role": "user", "content": "<b>é</b>", "tool_calls": None}, {"role": "skip", "content": ""}]
    text = tiny.apply_chat_template(messages, chat_template=template, extra="E")
    assert text == '{"role": "user", "content": "<b>é</b>"}<｜begin▁of▁sentence｜>|4|E'
    with pytest.raises(Exception, match="boom"):
        tiny.apply_chat_template(messages, chat_template="{{ raise_exception('boom') }}")


# ---------------------------------------------------------------------------------------------------
# Other GGUF tokenizers, written here
# ---------------------------------------------------------------------------------------------------

SPM_PIECES = ["▁", "h", "e", "l", "o", "w", "r", "d", "a", "n", "t", "s", "é", "he", "ll", "llo", "▁h", "▁hello",
              "▁w", "or", "ld", "▁wor", "▁world", "an", "▁an", "▁and", "st", "▁t", "▁the", "th", "the",
              "ss",
              "▁a", "as", "▁as", "▁s", "▁st", "▁sa"]


@pytest.fixture(scope="module")
def spm_gguf(tmp_path_factory) -> Path:
    specials = ["<unk>", "<s>", "</s>", "<|user|>"]
    bytes_ = [f"<0x{b:02X}>" for b in range(256)]
    rng = random.Random(1)
    scores = [0.0] * (len(specials) + 256) + [-rng.uniform(0, 100) for _ in SPM_PIECES]
    return write_gguf(
        tmp_path_factory.mktemp("spm") / "spm.gguf",
        model="llama", tokens=specials + bytes_ + SPM_PIECES, scores=scores,
        types=[2, 3, 3, 4] + [6] * 256 + [1] * len(SPM_PIECES), bos=1, eos=2, unk=0,
    )


def spm_reference(text: str, tokens: list[str], scores: list[float]) -> list[int]:
    """llama.cpp's SentencePiece loop, written plainly: merge the best-scoring neighbours until none is left."""
    vocab = {t: i for i, t in enumerate(tokens)}
    if not text:
        return []
    symbols = list("▁" + text.replace(" ", "▁"))
    while True:
        best = None
        for i in range(len(symbols) - 1):
            merged = symbols[i] + symbols[i + 1]
            if merged in vocab and not merged.startswith("<") and (best is None or scores[vocab[merged]] > best[0]):
                best = (scores[vocab[merged]], i)
        if best is None:
            break
        i = best[1]
        symbols[i:i + 2] = [symbols[i] + symbols[i + 1]]
    ids = []
    for symbol in symbols:
        if symbol in vocab:
            ids.append(vocab[symbol])
        else:
            ids.extend(vocab[f"<0x{b:02X}>"] for b in symbol.encode("utf-8"))
    return ids


def test_sentencepiece_gguf_matches_reference(spm_gguf: Path) -> None:
    import gguf

    reader = gguf.GGUFReader(str(spm_gguf))
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    scores = reader.fields["tokenizer.ggml.scores"].contents()
    tok = Tokenizer.from_gguf(spm_gguf)
    rng = random.Random(2)
    alphabet = "helowrdants é한🚀"
    samples = ["hello world", "the sand and the sea", "  two spaces", "héllo 한국 🚀", "x"]
    samples += ["".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 25))) for _ in range(200)]
    for text in samples:
        ids = tok.encode(text)
        assert ids == spm_reference(text, tokens, scores), text
        assert tok.decode(ids) == text
    # BOS is added by default for SentencePiece, and a prefix space follows every special token (as llama.cpp).
    assert tok.encode("hello", add_special_tokens=True) == [1] + spm_reference("hello", tokens, scores)
    user = tok.token_to_id("<|user|>")
    hello, world = spm_reference("hello", tokens, scores), spm_reference("world", tokens, scores)
    assert tok.encode("hello<|user|>world") == hello + [user] + world
    assert tok.decode(tok.encode("hi </s>"), skip_special_tokens=True) == "hi "


def test_sentencepiece_stream_random_ids(spm_gguf: Path) -> None:
    tok = Tokenizer.from_gguf(spm_gguf)
    rng = random.Random(3)
    for _ in range(200):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 30))]
        assert "".join(stream(tok, ids)) == tok.decode(ids), ids
        assert "".join(stream(tok, ids, skip_special_tokens=True)) == tok.decode(ids, skip_special_tokens=True), ids
    ids = tok.encode("héllo 한국 🚀 the world")
    pieces = stream(tok, ids, max_window=12)  # a byte-token run is held whole: 한국 is six byte tokens
    assert all("\ufffd" not in p for p in pieces) and "".join(pieces) == "héllo 한국 🚀 the world"


def test_every_pre_type_builds() -> None:
    from tokenizers import Regex, pre_tokenizers

    text = "Hello, world! 12345 한국어 中文テキスト it's\n\n  x = 9"
    for name, splits in PRE_SPLITS.items():
        for split in splits:
            pre = pre_tokenizers.Split(Regex(split), behavior="isolated")  # raises if Oniguruma rejects it
            pieces = [piece for piece, _ in pre.pre_tokenize_str(text)]
            assert "".join(pieces) == text and len(pieces) > 1, name  # splits, and loses nothing


def byte_level_gguf(tmp_path: Path, pre: str) -> Tokenizer:
    """A byte-level vocab of single bytes plus a few digit merges, under the given pre-tokenizer type."""
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = sorted(ByteLevel.alphabet())
    tokens = ["<|endoftext|>"] + alphabet + ["12", "123", "Ġ1"]
    return Tokenizer.from_gguf(write_gguf(
        tmp_path / f"{pre}.gguf", model="gpt2", pre=pre, tokens=tokens, types=[3] + [1] * (len(tokens) - 1),
        merges=["1 2", "12 3", "Ġ 1"], eos=0, chat_template="{{ messages[0]['content'] }}",
    ))


@pytest.mark.parametrize(
    "pre, pieces",
    [
        ("smollm", ["x", "Ġ", "1", "2", "3", "4", "5"]),  # digits one at a time
        ("qwen2", ["x", "Ġ", "1", "2", "3", "4", "5"]),
        ("llama-bpe", ["x", "Ġ", "123", "45"]),  # up to three digits, space split off
        ("deepseek-v3", ["x", "Ġ", "123", "45"]),
        ("gpt-2", ["x", "Ġ12345"]),  # a space sticks to the number
        ("some-future-pre", ["x", "Ġ", "123", "45"]),  # unknown: llama.cpp's default (warns)
    ],
)
def test_byte_level_pre_types(tmp_path: Path, pre: str, pieces: list[str]) -> None:
    tok = byte_level_gguf(tmp_path, pre)
    assert [piece for piece, _ in tok.backend.pre_tokenizer.pre_tokenize_str("x 12345")] == pieces
    # Merges apply within a piece only: "12"+"3" can merge only where digits are not split apart.
    expected = ["1", "2", "3"] if "1" in pieces else ["123"]
    assert [tok.id_to_token(i) for i in tok.encode("123")] == expected
    assert tok.decode(tok.encode("x 123 ü")) == "x 123 ü"
    assert tok.apply_chat_template([{"role": "user", "content": "hey"}]) == "hey"
    assert tok.stop_ids == {0}


# ---------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------


def test_missing_path_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "model.gguf"
    with pytest.raises(FileNotFoundError, match="nope"):
        Tokenizer.load(missing)
    with pytest.raises(FileNotFoundError, match="nope"):
        Tokenizer.from_gguf(missing)


def test_gguf_without_tokenizer_error(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "bare.gguf")
    with pytest.raises(ValueError, match=r"bare\.gguf.*no tokenizer metadata"):
        Tokenizer.load(path)


def test_unsupported_and_unusable_errors(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "bert.gguf", model="bert", tokens=["[PAD]", "a"])
    with pytest.raises(ValueError, match=r"bert\.gguf.*'bert'"):
        Tokenizer.from_gguf(path)
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(ValueError, match=r"junk\.gguf"):
        Tokenizer.from_gguf(tmp_path / "junk.gguf")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="empty"):
        Tokenizer.load(empty)
