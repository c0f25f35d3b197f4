"""Training a byte-level BPE tokenizer for sputnik's own models (`sputnik train tokenizer`).

The tokenizer reads text and JSONL files, learns byte-level BPE merges with Hugging Face `tokenizers`, and is
saved as a folder that both `sputnik.tokenizer.Tokenizer.load` and `transformers.AutoTokenizer` load, with an
R1-style chat template (`<|user|>`, `<|assistant|>`, `<think>`) in its tokenizer_config.json.

Pre-tokenization keeps each run of Hangul together (so BPE can learn whole Korean syllables and words instead of
UTF-8 fragments shared with other scripts), splits digits one by one (so numbers tokenize the same way everywhere,
which helps arithmetic), and splits the rest GPT-2 style. A small report compares characters per token on English
and Korean prose with the default model's tokenizer.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import random
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, TextIO

from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as Backend

from sputnik import r1
from sputnik.settings import option
from sputnik.tokenizer import Tokenizer

log = logging.getLogger(__name__)


@dataclass
class TokenizerConfig:
    """Settings for training a tokenizer: vocabulary size, special tokens, and how input files are read."""

    vocab_size: int = option(8192, "vocabulary size, special tokens and the 256 byte tokens included")
    min_frequency: int = option(2, "a pair must occur this often to be merged")
    bos_token: str = option("<|bos|>", "beginning-of-text token")
    eos_token: str = option("<|eos|>", "ends an assistant turn and a document; the stop token")
    pad_token: str = option("<|pad|>", "padding token")
    system_token: str = option("<|system|>", "opens a system turn")
    user_token: str = option("<|user|>", "opens a user turn")
    assistant_token: str = option("<|assistant|>", "opens an assistant turn")
    think_open: str = option(r1.THINK_OPEN, "opens the reasoning")
    think_close: str = option(r1.THINK_CLOSE, "closes the reasoning")
    add_bos: bool = option(True, "encode(..., add_special_tokens=True) starts with BOS, as DeepSeek's tokenizers do")
    text_key: str = option("text", 'the field of a JSONL row holding its text (rows with "messages" also work)')
    max_chars: int = option(100_000_000, "stop reading input after this many characters")
    fetch_korean_sample: bool = option(True, "download konlpy's wheel once for the Korean sample of the report")

    def __post_init__(self) -> None:
        tokens = self.special_tokens
        if len(set(tokens)) != len(tokens):
            raise ValueError(f"special tokens must be distinct, got {tokens}")
        for token in tokens:
            # They are written into the chat template inside '...' literals.
            if not token or any(c in token for c in "'\\\n\r"):
                raise ValueError(f"special token {token!r} must be non-empty, without quotes, backslashes or newlines")
        if self.vocab_size < 256 + len(tokens):
            raise ValueError(f"vocab_size {self.vocab_size} is too small: the 256 byte tokens and "
                             f"{len(tokens)} special tokens alone need {256 + len(tokens)}")
        if self.max_chars <= 0:
            raise ValueError(f"max_chars must be positive, got {self.max_chars}")

    @property
    def special_tokens(self) -> list[str]:
        """All special tokens, in id order (they take ids 0, 1, 2, ...)."""
        return [self.bos_token, self.eos_token, self.pad_token, self.system_token, self.user_token,
                self.assistant_token, self.think_open, self.think_close]


# --------------------------------------------------------------------------------------------------
# Pre-tokenization
# --------------------------------------------------------------------------------------------------

# Hangul syllables plus the jamo blocks (conjoining, compatibility, extended A and B).
_HANGUL = "\u1100-\u11ff\u3130-\u318f\ua960-\ua97f\uac00-\ud7a3\ud7b0-\ud7ff"
# A run of Hangul with the space before it, like GPT-2's " word": Korean words are space separated.
HANGUL_SPLIT = f" ?[{_HANGUL}]+"
DIGIT_SPLIT = r"\p{N}"
# GPT-2's split (contractions case-insensitive): words with their leading space, punctuation runs, whitespace.
WORD_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"


def pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    """Hangul runs, then single digits, then GPT-2 style pieces; each step only splits the pieces before it."""
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(HANGUL_SPLIT), behavior="isolated"),
        pre_tokenizers.Split(Regex(DIGIT_SPLIT), behavior="isolated"),
        pre_tokenizers.Split(Regex(WORD_SPLIT), behavior="isolated"),
        # The regexes above did the splitting; this only maps bytes to the 256 byte-level symbols.
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])


def r1_chat_template(cfg: TokenizerConfig) -> str:
    """The DeepSeek-R1 chat format (`sputnik.r1.chat_template`) with this tokenizer's tokens; system text follows
    BOS after the system token."""
    return r1.chat_template(cfg.bos_token, cfg.eos_token, cfg.user_token, cfg.assistant_token, cfg.think_open,
                            cfg.think_close, system=cfg.system_token, name="chat template")


# --------------------------------------------------------------------------------------------------
# Reading input
# --------------------------------------------------------------------------------------------------

_TEXT_SUFFIXES = (".txt", ".text", ".md")


def iter_texts(paths: Iterable[str | Path], text_key: str = "text") -> Iterator[str]:
    """Documents from .txt/.md files (split at blank lines) and .jsonl files (`text_key`, or chat `messages`)."""
    paths = [Path(p) for p in paths]
    # Check every file first, so a typo in the last one fails before any training starts.
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"training file not found: {path}")
        if path.suffix.lower() not in (".jsonl", *_TEXT_SUFFIXES):
            raise ValueError(f"{path}: expected a .jsonl file or a text file ({', '.join(_TEXT_SUFFIXES)})")
    for path in paths:
        if path.suffix.lower() == ".jsonl":
            yield from _jsonl_texts(path, text_key)
        else:
            yield from _text_documents(path)


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, line) pairs; decoding line by line lets an encoding error name its line."""
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                yield number, raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise ValueError(f"{path}:{number}: not UTF-8 text ({error})") from None


def _text_documents(path: Path) -> Iterator[str]:
    document: list[str] = []
    for _, line in _lines(path):
        if line.strip():
            document.append(line.replace("\r\n", "\n"))
        elif document:
            yield "".join(document).rstrip("\n")
            document = []
    if document:
        yield "".join(document).rstrip("\n")


def _jsonl_texts(path: Path, text_key: str) -> Iterator[str]:
    for number, line in _lines(path):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{where}: not valid JSON ({error})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
        if isinstance(row.get(text_key), str):
            yield row[text_key]
        elif isinstance(row.get("messages"), list):
            yield _join_messages(row["messages"], where)
        else:
            raise ValueError(f"{where}: the row has neither a string {text_key!r} field nor a 'messages' list")


def _join_messages(messages: list[Any], where: str) -> str:
    contents = []
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if content is None and isinstance(message, dict):
            continue  # e.g. an assistant turn holding only tool calls
        if not isinstance(content, str):
            raise ValueError(f"{where}: each message must be an object with a string 'content'")
        contents.append(content)
    return "\n\n".join(contents)


def _capped(texts: Iterable[str], max_chars: int) -> Iterator[str]:
    """The texts, cut off once `max_chars` characters have passed (the last one shortened)."""
    left = max_chars
    for text in texts:
        if left <= 0:
            return
        yield text[:left]
        left -= len(text)


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------


def train_tokenizer(texts: Iterable[str], cfg: TokenizerConfig | None = None) -> Tokenizer:
    """Learn a byte-level BPE tokenizer from `texts`; any byte string round-trips, so there is no unknown token."""
    cfg = cfg or TokenizerConfig()
    backend = Backend(models.BPE())  # no unk_token: byte-level covers every byte
    backend.pre_tokenizer = pre_tokenizer()
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=cfg.min_frequency,
        special_tokens=cfg.special_tokens,
        # All 256 bytes are in the vocabulary even if the input never shows some of them.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    seen = 0

    def counted() -> Iterator[str]:
        nonlocal seen
        for text in _capped(texts, cfg.max_chars):
            seen += len(text)
            yield text

    backend.train_from_iterator(counted(), trainer)
    if seen == 0:
        raise ValueError("no text to train the tokenizer on")
    tokenizer = Tokenizer(
        backend,
        bos_token=cfg.bos_token,
        eos_token=cfg.eos_token,
        pad_token=cfg.pad_token,
        chat_template=r1_chat_template(cfg),
        source="trained",
    )
    tokenizer.set_add_special_tokens(add_bos=cfg.add_bos)
    return tokenizer


def save_tokenizer(tokenizer: Tokenizer, out: Path, cfg: TokenizerConfig) -> Path:
    """`Tokenizer.save`, plus the role and think tokens listed in tokenizer_config.json for transformers."""
    tokenizer.save(out)
    config_file = out / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    named = {cfg.bos_token, cfg.eos_token, cfg.pad_token}
    # transformers 4 reads this key and transformers 5 converts it to extra_special_tokens.
    config["additional_special_tokens"] = [t for t in cfg.special_tokens if t not in named]
    config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return out


# --------------------------------------------------------------------------------------------------
# Characters per token
# --------------------------------------------------------------------------------------------------


def chars_per_token(tokenizer: Tokenizer, texts: Iterable[str]) -> float:
    """Characters of `texts` per token (no BOS/EOS); higher means the tokenizer packs the text tighter."""
    texts = [t for t in texts if t]
    encodings = tokenizer.backend.encode_batch(texts, add_special_tokens=False)
    tokens = sum(len(e.ids) for e in encodings)
    return sum(len(t) for t in texts) / tokens if tokens else 0.0


def report(tokenizers: dict[str, Tokenizer], samples: dict[str, list[str]]) -> dict[str, dict[str, float]]:
    """Characters per token, as {tokenizer name: {language: value}}."""
    return {
        name: {language: round(chars_per_token(tok, texts), 3) for language, texts in samples.items()}
        for name, tok in tokenizers.items()
    }


def print_report(table: dict[str, dict[str, float]], file: TextIO | None = None) -> None:
    """Print a `report()` result as a small table: one row per tokenizer, one column per language."""
    file = file or sys.stdout
    languages = list(dict.fromkeys(lang for row in table.values() for lang in row))
    width = max([len("chars/token"), *(len(name) for name in table)]) + 2
    print("chars/token".ljust(width) + "".join(f"{lang:>10}" for lang in languages), file=file)
    for name, row in table.items():
        cells = "".join(f"{row[lang]:>10.2f}" if lang in row else f"{'-':>10}" for lang in languages)
        print(name.ljust(width) + cells, file=file)


# --------------------------------------------------------------------------------------------------
# Sample prose for the report
# --------------------------------------------------------------------------------------------------

# The Korean constitution as konlpy ships it: real prose, fetched like the default model (pip, no deps).
_KONLPY_REQUIREMENT = "konlpy==0.6.0"
_KONLPY_MEMBER = "konlpy/data/corpus/kolaw/constitution.txt"
_KONLPY_SIZE = 45859
_KONLPY_SHA256 = "69377a88c0e577b37b1373f4496147e995209d5139a993633a8a2776bc0e2ca8"

_SAMPLE_CHARS = 20_000  # enough for a stable ratio, small enough to encode in a blink


def korean_corpus_path() -> Path:
    """Where the konlpy Korean text is kept once fetched."""
    from sputnik.checkpoint.registry import sputnik_home

    return sputnik_home() / "corpora" / "konlpy-0.6.0" / "constitution.txt"


def fetch_korean_corpus(timeout: float = 300.0) -> Path | None:
    """Download konlpy's wheel with pip (no dependencies) and keep its Korean law text; None when that fails."""
    from sputnik.checkpoint.registry import ModelEntry, extract_verified

    target = korean_corpus_path()
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    entry = ModelEntry(requirement=_KONLPY_REQUIREMENT, member=_KONLPY_MEMBER, size=_KONLPY_SIZE,
                       sha256=_KONLPY_SHA256, description="Korean constitution text from konlpy")
    with tempfile.TemporaryDirectory(prefix="sputnik-konlpy-") as tmp:
        command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                   _KONLPY_REQUIREMENT, "-d", tmp]
        try:
            subprocess.run(command, check=True, capture_output=True, timeout=timeout)
            wheel = next(Path(tmp).glob("*.whl"))
            # The registry's extraction checks size and sha256 and never leaves a half-written file.
            extract_verified(wheel, entry, target)
        except Exception as error:  # offline, pip missing, a changed wheel: the report falls back to generated text
            log.warning("could not fetch %s for the Korean sample (%s); using generated Korean", _KONLPY_REQUIREMENT,
                        error)
            return None
    return target


def korean_sample(fetch: bool = False) -> list[str]:
    """Korean prose: konlpy's constitution text when fetched (or `fetch`), else Korean generated from real words."""
    path = korean_corpus_path()
    if fetch and not path.is_file():
        fetch_korean_corpus()
    if path.is_file():
        text = path.read_text(encoding="utf-8").replace("\r\n", "\n")
        return _first_chars([p.strip() for p in text.split("\n") if p.strip()], _SAMPLE_CHARS)
    return generated_korean(_SAMPLE_CHARS)


def english_sample() -> list[str]:
    """English prose: paragraphs of the Python reference bundled with CPython (pydoc_data), else generated."""
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions leave pydoc_data out
        return generated_english(_SAMPLE_CHARS)
    paragraphs = []
    for name in sorted(topics):
        for block in topics[name].split("\n\n"):
            # Indented blocks are code or grammar, and short ones are headings; keep the running text.
            if len(block) > 200 and not block.startswith((" ", "*", "-")):
                paragraphs.append(" ".join(block.split()))
    return _first_chars(paragraphs, _SAMPLE_CHARS)


def korean_sample_source() -> str:
    """Where `korean_sample()` takes its text from, for the report."""
    return f"{_KONLPY_REQUIREMENT} {_KONLPY_MEMBER}" if korean_corpus_path().is_file() else "generated"


def english_sample_source() -> str:
    """Where `english_sample()` takes its text from, for the report."""
    if importlib.util.find_spec("pydoc_data") is None:
        return "generated"
    return "pydoc_data.topics (CPython's bundled reference text)"


def _first_chars(paragraphs: list[str], limit: int) -> list[str]:
    kept, total = [], 0
    for paragraph in paragraphs:
        if total >= limit:
            break
        kept.append(paragraph)
        total += len(paragraph)
    return kept


_KO_SUBJECTS = ["우리 가족은", "학생들은", "그 회사는", "어머니께서는", "친구가", "선생님은", "도시의 시민들은",
                "작은 고양이가", "연구팀은", "할아버지께서는", "아이들이", "정부는"]
_KO_TIMES = ["오늘 아침에", "지난 주말에", "매일 저녁", "봄이 오면", "비가 내리는 날에", "회의가 끝난 뒤에",
             "방학 동안", "새해 첫날에"]
_KO_PLACES = ["공원에서", "도서관에서", "시장에서", "바닷가에서", "학교 앞에서", "작은 마을에서", "서울에서",
              "부엌에서"]
_KO_ACTIONS = ["책을 읽었습니다", "맛있는 음식을 만들었습니다", "새로운 계획을 세웠습니다", "오래된 사진을 정리했습니다",
               "친구들과 이야기를 나누었습니다", "문제를 차근차근 해결했습니다", "노래를 부르며 걸었습니다",
               "나무를 심었습니다", "편지를 썼습니다", "경제 정책을 발표했습니다"]
_KO_AFTER = ["그래서 모두 기뻐했습니다.", "하지만 시간이 조금 부족했습니다.", "덕분에 하루가 즐거웠습니다.",
             "그 결과는 생각보다 좋았습니다.", "사람들은 그 이야기를 오래 기억했습니다."]

_EN_SUBJECTS = ["The small team", "My neighbour", "A curious student", "The city council", "Our teacher",
                "The old fisherman", "Every visitor", "The research group"]
_EN_TIMES = ["this morning", "last weekend", "every evening", "in early spring", "after the long meeting"]
_EN_ACTIONS = ["read a book about distant mountains", "cooked a simple dinner for everyone",
               "planned a careful route through the valley", "answered questions from the audience",
               "planted trees along the quiet river", "wrote a letter to an old friend",
               "solved the problem step by step"]
_EN_AFTER = ["Everyone was pleased with the result.", "It took longer than they had expected.",
             "Nobody had tried that before.", "The story was retold for years."]


def generated_korean(chars: int, seed: int = 0) -> list[str]:
    """Korean paragraphs built from templates over everyday words (no network, deterministic)."""
    rng = random.Random(seed)
    return _generate(chars, rng, lambda: (f"{rng.choice(_KO_TIMES)} {rng.choice(_KO_SUBJECTS)} "
                                          f"{rng.choice(_KO_PLACES)} {rng.choice(_KO_ACTIONS)}. {rng.choice(_KO_AFTER)}"))


def generated_english(chars: int, seed: int = 0) -> list[str]:
    """English paragraphs built from templates over everyday words (no network, deterministic)."""
    rng = random.Random(seed)
    return _generate(chars, rng, lambda: (f"{rng.choice(_EN_TIMES).capitalize()}, {rng.choice(_EN_SUBJECTS).lower()} "
                                          f"{rng.choice(_EN_ACTIONS)}. {rng.choice(_EN_AFTER)}"))


def _generate(chars: int, rng: random.Random, sentence: Callable[[], str]) -> list[str]:
    paragraphs, total = [], 0
    while total < chars:
        paragraph = " ".join(sentence() for _ in range(rng.randint(3, 6)))
        paragraphs.append(paragraph)
        total += len(paragraph)
    return paragraphs


# --------------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------------


def _default_tokenizer() -> tuple[str, Tokenizer] | None:
    """The default model's tokenizer, when that model is installed."""
    from sputnik.checkpoint.registry import DEFAULT_MODEL, resolve

    try:
        return DEFAULT_MODEL, Tokenizer.load(resolve(DEFAULT_MODEL))
    except Exception as error:  # not pulled, or unreadable: the report just lacks that row
        log.info("default model's tokenizer not available for the report: %s", error)
        return None


def run(files: list[Path], out: Path, cfg: TokenizerConfig | None = None) -> dict[str, Any]:
    """Train on `files`, save to `out`, write `out/report.json` (chars/token vs the default model) and return it."""
    cfg = cfg or TokenizerConfig()
    out = Path(out)
    tokenizer = train_tokenizer(iter_texts(files, cfg.text_key), cfg)
    save_tokenizer(tokenizer, out, cfg)

    tokenizers = {"trained": tokenizer}
    default = _default_tokenizer()
    if default is not None:
        tokenizers[default[0]] = default[1]
    samples = {"english": english_sample(), "korean": korean_sample(fetch=cfg.fetch_korean_sample)}
    result = {
        "chars_per_token": report(tokenizers, samples),
        "samples": {
            "english": {"source": english_sample_source(), "chars": sum(map(len, samples["english"]))},
            "korean": {"source": korean_sample_source(), "chars": sum(map(len, samples["korean"]))},
        },
        "vocab_size": tokenizer.vocab_size,
        "files": [str(f) for f in files],
        "folder": str(out),
        "config": asdict(cfg),
    }
    (out / "report.json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return result
