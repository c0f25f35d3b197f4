"""The tokenizer a GGUF file describes in its `tokenizer.*` metadata, the way llama.cpp reads it."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from tokenizers import AddedToken
from tokenizers import Tokenizer as Backend

from sputnik.tokenizer.backends import bos_eos_processor, byte_level_bpe, sentencepiece_bpe
from sputnik.tokenizer.pretokenize import ADD_BOS_PRE

if TYPE_CHECKING:
    from gguf import GGUFReader


def open_gguf(path: str | Path) -> GGUFReader:
    """A memory-mapped reader, shared by the model and tokenizer loaders: parsing a 49k-token vocabulary's metadata
    takes GGUFReader seconds, so a file is parsed once per process (until it changes on disk)."""
    file = Path(path).expanduser().resolve()
    st = file.stat()
    return _open_gguf(file, st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=2)
def _open_gguf(file: Path, mtime_ns: int, size: int) -> GGUFReader:
    from gguf import GGUFReader  # imported when a GGUF file is read

    return GGUFReader(file, "r")  # tensors are read only when dequantised


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
    import gguf  # heavy-ish import, only needed for GGUF files
    import numpy as np

    try:
        reader = open_gguf(path)
    except Exception as error:  # GGUFReader raises ValueError/struct errors on files that are not GGUF
        raise ValueError(f"{path} is not a readable GGUF file: {error}") from error
    values: dict[str, Any] = {}
    for key, entry in reader.fields.items():
        if not (key.startswith("tokenizer.") or key.startswith("general.")) or not entry.types:
            continue
        kind = entry.types[0]
        if kind == gguf.GGUFValueType.ARRAY:
            if entry.types[-1] == gguf.GGUFValueType.STRING:
                values[key] = [bytes(entry.parts[i]).decode("utf-8", errors="replace") for i in entry.data]
            elif entry.data:
                values[key] = np.concatenate([np.asarray(entry.parts[i]).reshape(-1) for i in entry.data]).tolist()
            else:
                values[key] = []
        elif kind == gguf.GGUFValueType.STRING:
            values[key] = bytes(entry.parts[entry.data[0]]).decode("utf-8", errors="replace")
        else:
            values[key] = np.asarray(entry.parts[entry.data[0]]).reshape(-1)[0].item()
    return values
