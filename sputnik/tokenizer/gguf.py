"""The tokenizer a GGUF file describes in its `tokenizer.*` metadata, the way llama.cpp reads it (and writes it)."""

from __future__ import annotations

import json
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from tokenizers import AddedToken
from tokenizers import Tokenizer as Backend

from sputnik.tokenizer.backends import bos_eos_processor, byte_level_bpe, sentencepiece_bpe
from sputnik.tokenizer.gguf_file import GGUFFile, read_gguf
from sputnik.tokenizer.pretokenize import ADD_BOS_PRE


def open_gguf(path: str | Path) -> GGUFFile:
    """A parsed, memory-mapped GGUF file, shared by the model and tokenizer loaders: parsed once while anything holds
    it (load_pretrained holds it across both), and freed with its last holder, so its metadata (a vocabulary of
    ~100k strings: ~15 MB of Python objects) does not stay resident beside the loaded model."""
    file = Path(path).expanduser().resolve()
    st = file.stat()
    key = (file, st.st_mtime_ns, st.st_size)  # a file that changes on disk is parsed again
    parsed = _OPEN.get(key)
    if parsed is None:
        parsed = _OPEN[key] = read_gguf(file)  # tensors are views of the map: read only when used
    return parsed


_OPEN: weakref.WeakValueDictionary[tuple, GGUFFile] = weakref.WeakValueDictionary()


# GGUF token types (llama.cpp's llama_token_type).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


@dataclass
class GGUFVocab:
    """What a GGUF file says about its tokenizer: the backend, the named special tokens, templates and stops."""

    backend: Backend
    bos_token: str | None
    eos_token: str | None
    pad_token: str | None
    unk_token: str | None
    chat_templates: dict[str, str] = field(default_factory=dict)
    stop_ids: list[int] = field(default_factory=list)


def load_vocab(path: Path) -> GGUFVocab:
    """Build the tokenizer a GGUF file describes (byte-level BPE for 'gpt2', SentencePiece BPE for 'llama')."""
    meta = read_metadata(path)
    kind = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if kind is None or not tokens:
        raise ValueError(
            f"{path} has no tokenizer metadata (tokenizer.ggml.model / tokenizer.ggml.tokens are missing)"
        )
    names = unique_token_names(tokens)
    types = [int(t) for t in meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(names)]
    pre = meta.get("tokenizer.ggml.pre")
    if kind == "gpt2":
        backend = byte_level_bpe(names, meta.get("tokenizer.ggml.merges") or [], pre)
        add_bos_default = pre in ADD_BOS_PRE
    elif kind == "llama":
        scores = meta.get("tokenizer.ggml.scores") or [0.0] * len(names)
        add_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
        unk_id = meta.get("tokenizer.ggml.unknown_token_id")
        mergeable = [t in (NORMAL, USER_DEFINED) for t in types]
        backend = sentencepiece_bpe(names, [float(s) for s in scores], mergeable, add_prefix, unk_id)
        add_bos_default = True
    else:
        raise ValueError(
            f"{path}: tokenizer model {kind!r} is not supported (supported: 'gpt2' byte-level BPE, "
            "'llama' SentencePiece)"
        )

    # Control and unknown tokens are special: matched whole in text, dropped by skip_special_tokens.
    # User-defined ones (like <think> in some vocabs) are matched whole but stay ordinary text.
    special = [AddedToken(n, special=True, normalized=False) for n, t in zip(names, types) if t in (CONTROL, UNKNOWN)]
    user = [AddedToken(n, special=False, normalized=False) for n, t in zip(names, types) if t == USER_DEFINED]
    if special:
        backend.add_special_tokens(special)
    if user:
        backend.add_tokens(user)

    def name_of(key: str) -> str | None:
        index = meta.get(key)
        return names[int(index)] if index is not None and 0 <= int(index) < len(names) else None

    bos, eos = name_of("tokenizer.ggml.bos_token_id"), name_of("tokenizer.ggml.eos_token_id")
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", add_bos_default)) and bos is not None
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False)) and eos is not None
    backend.post_processor = bos_eos_processor(backend, bos if add_bos else None, eos if add_eos else None)

    templates: dict[str, str] = {}
    if meta.get("tokenizer.chat_template"):
        templates["default"] = meta["tokenizer.chat_template"]
    for name in meta.get("tokenizer.chat_templates") or []:
        text = meta.get(f"tokenizer.chat_template.{name}")
        if text:
            templates[name] = text

    stop_ids = [meta[k] for k in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id") if k in meta]
    return GGUFVocab(backend, bos, eos, name_of("tokenizer.ggml.padding_token_id"),
                     name_of("tokenizer.ggml.unknown_token_id"), templates, stop_ids)


def unique_token_names(tokens: Sequence[str]) -> list[str]:
    """Token strings with empties and duplicates renamed, so every id keeps its own entry."""
    names, seen = [], set()
    for index, token in enumerate(tokens):
        if not token:
            token = f"[EMPTY_{index}]"  # llama.cpp's name for an empty token
        if token in seen:
            token = f"[DUPLICATE_{index}]"
        seen.add(token)
        names.append(token)
    return names


def read_metadata(path: Path) -> dict[str, Any]:
    """The tokenizer.* and general.* metadata of a GGUF file, as plain Python values."""
    try:
        reader = open_gguf(path)
    except (OSError, ValueError) as error:
        raise ValueError(f"{path} is not a readable GGUF file: {error}") from error
    return {key: value for key, value in reader.fields.items() if key.startswith(("tokenizer.", "general."))}


# ---------------------------------------------------------------- writing a tokenizer into a GGUF file

# Text whose pre-tokenization tells llama.cpp's pre types apart (its converter does the same with a hash of the
# token ids of such a text): contractions, digit runs, CJK and Hangul, punctuation runs, newlines and spaces.
_PRE_PROBE = ("Hello World! I'm 12345 years-old... 3.14\n\n  tabs\tand   spaces 한국어 日本語 中文 カタカナ ü ß ÉCOLE "
              "don't WE'LL ?!?\r\n🚀 x=y+1; 'tis $100 | <a href=\"/x\">ok</a>\n\n\n   end")


def detect_pre(backend: Backend) -> str | None:
    """The llama.cpp pre type (tokenizer.ggml.pre) that splits text as this byte-level backend does, or None.

    The first name of PRE_SPLITS whose regexes give the same pieces on a probe text and whose whole-word matching
    (ignore_merges) agrees; names sharing one split behave alike in llama.cpp."""
    from sputnik.tokenizer.backends import byte_level_pre_tokenizer
    from sputnik.tokenizer.pretokenize import IGNORE_MERGES_PRE, PRE_SPLITS

    if backend.pre_tokenizer is None:
        return None
    want = [piece for piece, _ in backend.pre_tokenizer.pre_tokenize_str(_PRE_PROBE)]
    ignore_merges = bool(getattr(backend.model, "ignore_merges", False))
    tried: dict[int, bool] = {}
    for name, splits in PRE_SPLITS.items():
        if id(splits) not in tried:
            got = [piece for piece, _ in byte_level_pre_tokenizer(splits).pre_tokenize_str(_PRE_PROBE)]
            tried[id(splits)] = got == want
        if tried[id(splits)] and (name in IGNORE_MERGES_PRE) == ignore_merges:
            return name
    return None


def write_vocab(writer, tok, vocab_size: int) -> list[str]:
    """Put a byte-level BPE tokenizer (a sputnik Tokenizer) in a GGUFWriter's metadata as llama.cpp reads it: model
    "gpt2", the pre type, tokens padded to the model's vocab_size with unused [PADi] tokens, their types, merges,
    the special token ids, whether BOS/EOS are added, and the chat templates. Returns warnings for the user."""
    import gguf
    from tokenizers import decoders, models

    backend = tok.backend
    byte_level = isinstance(backend.model, models.BPE) and isinstance(backend.decoder, decoders.ByteLevel)
    if not byte_level or backend.model.byte_fallback:
        raise ValueError("only byte-level BPE tokenizers (GPT-2 style, as Llama 3, Qwen, SmolLM and DeepSeek use) can "
                         "be written to GGUF; this one is a "
                         f"{type(backend.model).__name__} with a {type(backend.decoder).__name__} decoder")
    n = tok.vocab_size
    if n > vocab_size:
        raise ValueError(f"the tokenizer has {n} tokens but the model's embedding only {vocab_size}")
    added = backend.get_added_tokens_decoder()
    tokens, types = [], []
    for i in range(vocab_size):
        token = backend.id_to_token(i) if i < n else None
        if token is None:
            tokens.append(f"[PAD{i}]")  # as llama.cpp's converter names ids the vocabulary leaves unnamed
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(token)
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(token)
            types.append(gguf.TokenType.NORMAL)
    merges = json.loads(backend.to_str())["model"].get("merges") or []
    merges = [m if isinstance(m, str) else " ".join(m) for m in merges]

    warnings = []
    writer.add_tokenizer_model("gpt2")
    pre = detect_pre(backend)
    if pre is None:
        warnings.append("the tokenizer's pre-tokenizer matches none of llama.cpp's pre types: the file says none, so "
                        "llama.cpp splits text with its default regexes and may tokenize differently")
    else:
        writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for token_id, add in ((tok.bos_id, writer.add_bos_token_id), (tok.eos_id, writer.add_eos_token_id),
                          (_id(tok, tok.pad_token), writer.add_pad_token_id),
                          (_id(tok, tok.unk_token), writer.add_unk_token_id)):
        if token_id is not None:
            add(token_id)
    writer.add_add_bos_token(tok.add_bos)
    writer.add_add_eos_token(tok.add_eos)
    if set(tok.chat_templates) == {"default"}:
        writer.add_chat_template(tok.chat_templates["default"])
    elif tok.chat_templates:
        writer.add_chat_template([{"name": k, "template": v} for k, v in tok.chat_templates.items()])
    return warnings


def _id(tok, token: str | None) -> int | None:
    return tok.token_to_id(token) if token else None
