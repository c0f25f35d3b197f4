"""`tokenizers` backends built from a bare vocabulary (what a GGUF file holds): byte-level BPE and SentencePiece
BPE as llama.cpp runs them, and the post-processor that adds BOS/EOS."""

from __future__ import annotations

import logging
from typing import Any

from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as Backend

from sputnik.tokenizer.pretokenize import DEFAULT_SPLITS, GPT2_SPLIT, IGNORE_MERGES_PRE, PRE_SPLITS

log = logging.getLogger(__name__)


def byte_level_bpe(names: list[str], merges: list[str], pre: str | None) -> Backend:
    """GPT-2 style byte-level BPE, split by the regexes llama.cpp uses for this `pre` type."""
    vocab = {name: index for index, name in enumerate(names)}
    pairs = []
    for merge in merges:
        # llama.cpp splits at the first space after the first character, so a piece may start with one.
        cut = merge.find(" ", 1)
        left, right = merge[:cut], merge[cut + 1:]
        if cut > 0 and left in vocab and right in vocab:
            pairs.append((left, right))
    splits = PRE_SPLITS.get(pre or "")
    if splits is None:
        log.warning("Unknown GGUF pre-tokenizer %r; using llama.cpp's default split", pre)
        splits = DEFAULT_SPLITS
    backend = Backend(models.BPE(vocab=vocab, merges=pairs, ignore_merges=pre in IGNORE_MERGES_PRE))
    backend.pre_tokenizer = byte_level_pre_tokenizer(splits)
    backend.decoder = decoders.ByteLevel()
    return backend


def byte_level_pre_tokenizer(splits: list[str]) -> pre_tokenizers.PreTokenizer:
    """The regex splits of one llama.cpp pre type, applied in turn, then the byte-level mapping."""
    steps: list[Any] = [pre_tokenizers.Split(Regex(s), behavior="isolated") for s in splits[:-1]]
    if splits[-1] == GPT2_SPLIT:
        steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True))  # GPT-2's own split
    else:
        steps.append(pre_tokenizers.Split(Regex(splits[-1]), behavior="isolated"))
        steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False))
    return pre_tokenizers.Sequence(steps) if len(steps) > 1 else steps[0]


def sentencepiece_bpe(names: list[str], scores: list[float], mergeable: list[bool], add_prefix: bool,
                      unk_id: int | None) -> Backend:
    """SentencePiece-style BPE as llama.cpp runs it: spaces become ▁, pieces merge best score first,
    characters outside the vocab fall back to <0xXX> byte tokens.

    tokenizers' BPE wants merges, so they are rebuilt from the scores: every way to cut a piece into two
    pieces is a merge, ranked by the score of the piece. Merging by that rank is merging by score. Only the pieces
    marked `mergeable` (llama.cpp's normal and user-defined tokens) take part.
    """
    vocab = {name: index for index, name in enumerate(names)}
    pieces = {n: i for i, (n, m) in enumerate(zip(names, mergeable)) if m}
    ranked = []
    for piece, index in pieces.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in pieces and right in pieces:
                ranked.append((-scores[index], index, pieces[left], left, right))
    ranked.sort()
    unk = names[unk_id] if unk_id is not None and 0 <= unk_id < len(names) else None
    if unk is None and "<unk>" in vocab:
        unk = "<unk>"
    backend = Backend(models.BPE(
        vocab=vocab, merges=[(left, right) for *_, left, right in ranked], unk_token=unk,
        fuse_unk=True, byte_fallback=True,
    ))
    # Prepend runs on each stretch of text between special tokens, as llama.cpp adds its space prefix
    # at the start and after every special token.
    steps = [normalizers.Prepend("▁")] if add_prefix else []
    backend.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", "▁")])
    dec = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_prefix:
        dec.append(decoders.Strip(content=" ", left=1, right=0))
    backend.decoder = decoders.Sequence(dec)
    return backend


def bos_eos_processor(backend: Backend, bos: str | None, eos: str | None) -> processors.TemplateProcessing:
    """A post-processor that adds BOS and/or EOS around a sequence (or nothing)."""
    single = " ".join([*([f"{bos}:0"] if bos else []), "$A:0", *([f"{eos}:0"] if eos else [])])
    pair = single + " " + " ".join([*([f"{bos}:1"] if bos else []), "$B:1", *([f"{eos}:1"] if eos else [])])
    specials = [(t, backend.token_to_id(t)) for t in dict.fromkeys(x for x in (bos, eos) if x)]
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)
