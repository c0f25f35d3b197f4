"""Tokenizers for sputnik models.

One `Tokenizer` class covers both places a model's tokenizer can live:

* a Hugging Face folder (`tokenizer.json` + `tokenizer_config.json`), and
* a GGUF file, whose metadata describes the vocabulary the way llama.cpp reads it.

Either way the result is a `tokenizers.Tokenizer` plus the few facts around it (BOS/EOS, chat
template, stop tokens). Chat templates are rendered the way transformers renders them, so a prompt
built here is byte-for-byte the prompt transformers would build. `StreamDecoder` turns generated ids
into text one token at a time without ever emitting half a character.
"""

from __future__ import annotations

import json
import logging
import re
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as _Backend

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------------
# The DeepSeek-R1 chat format, used by the models sputnik trains itself.
# The bars are FULLWIDTH VERTICAL LINE (U+FF5C) and the spaces are U+2581, exactly as in DeepSeek's vocab.
# --------------------------------------------------------------------------------------------------

R1_BOS = "<｜begin▁of▁sentence｜>"
R1_EOS = "<｜end▁of▁sentence｜>"
R1_USER = "<｜User｜>"
R1_ASSISTANT = "<｜Assistant｜>"
R1_THINK_OPEN = "<think>"
R1_THINK_CLOSE = "</think>"
R1_SPECIAL_TOKENS = [R1_BOS, R1_EOS, R1_USER, R1_ASSISTANT, R1_THINK_OPEN, R1_THINK_CLOSE]

# System messages go right after BOS. Earlier assistant turns keep only their answer (the text after the
# last `</think>`, leading whitespace dropped): the model never sees its old reasoning, as in DeepSeek-R1.
# The final message is rendered whole, so a finished conversation renders with its reasoning, for training.
R1_CHAT_TEMPLATE = (
    "{%- set ns = namespace(system='') -%}"
    "{%- for message in messages if message['role'] == 'system' -%}"
    "{%- set ns.system = ns.system + ('\\n\\n' if ns.system else '') + (message['content'] or '') -%}"
    "{%- endfor -%}"
    "{{- '" + R1_BOS + "' + ns.system -}}"
    "{%- for message in messages -%}"
    "{%- set content = message['content'] or '' -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{- '" + R1_USER + "' + content -}}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{%- if not loop.last and '" + R1_THINK_CLOSE + "' in content -%}"
    "{%- set content = content.split('" + R1_THINK_CLOSE + "')[-1].lstrip() -%}"
    "{%- endif -%}"
    "{{- '" + R1_ASSISTANT + "' + content + '" + R1_EOS + "' -}}"
    "{%- elif message['role'] != 'system' -%}"
    "{{- raise_exception('R1 chat template: unsupported role ' + message['role']) -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '" + R1_ASSISTANT + R1_THINK_OPEN + "\\n' -}}"
    "{%- endif -%}"
)

# Tokens that end a turn in the chat formats we meet. They count as stop tokens when the vocab has them.
# <|endoftext|> is not here: it ends a document, not a turn, so it stops generation only where it is the EOS.
_END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end▁of▁sentence|>", R1_EOS, "<|end|>", "<end_of_turn>")

# GGUF token types (llama.cpp's llama_token_type).
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6

_BYTE_TOKEN = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")


# --------------------------------------------------------------------------------------------------
# Pre-tokenizer splits for byte-level BPE vocabularies, keyed by GGUF `tokenizer.ggml.pre`.
# Facts from llama.cpp's llama-vocab.cpp (which regexes each pre type uses, applied one after another,
# each splitting the pieces of the one before) and from the models' own tokenizer.json files.
# --------------------------------------------------------------------------------------------------

_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SEED_CODER_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1}"
    r"| ?[^\s\p{L}\p{N}\r\n]+|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_DEEPSEEK_V3_SPLITS = [
    r"\p{N}{1,3}",
    r"[一-龥぀-ゟ゠-ヿ]+",
    r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"
    r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
]
_DEEPSEEK_CODER_SPLITS = [r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", r"[一-龥ࠀ-一가-퟿]+", r"\p{N}"]
_FALCON_SPLITS = [r"[\p{P}\$\+<=>\^~\|`]+", _GPT2_SPLIT, r"[0-9][0-9][0-9]"]
_BLOOM_SPLIT = r" ?[^(\s|.,!?…。，、।۔،)]+"
# llama.cpp's fallback for a missing or unknown pre type.
_DEFAULT_SPLITS = [r"[\p{P}\$\+<=>\^~\|]+", _GPT2_SPLIT, r"\p{N}+", r"[0-9][0-9][0-9]"]

_PRE_SPLITS: dict[str, list[str]] = {}
for _names, _splits in [
    (("default",), _DEFAULT_SPLITS),
    (("gpt-2", "phi-2", "jina-es", "jina-de", "gigachat", "jina-v1-en", "jina-v2-es", "jina-v2-de",
      "jina-v2-code", "roberta-bpe", "mpt", "olmo", "jais", "trillion", "granite-docling", "exaone4",
      "a.x-4.0", "mellum"), [_GPT2_SPLIT]),
    # Digits one by one, then GPT-2's split: StarCoder's tokenizer and those derived from it (SmolLM's is).
    (("starcoder", "refact", "command-r", "smollm", "codeshell", "exaone", "minerva-7b"), [r"\p{N}", _GPT2_SPLIT]),
    (("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
      "dbrx", "smaug-bpe", "chatglm-bpe", "glm4"), [_LLAMA3_SPLIT]),
    (("qwen2", "deepseek-r1-qwen", "kormo", "megrez", "stablelm2", "hunyuan", "grok-2"), [_QWEN2_SPLIT]),
    (("seed-coder",), [_SEED_CODER_SPLIT]),
    (("deepseek-v3", "hunyuan-dense"), _DEEPSEEK_V3_SPLITS),
    (("deepseek-coder",), _DEEPSEEK_CODER_SPLITS),
    (("falcon",), _FALCON_SPLITS),
    (("gpt-4o", "llama4", "minimax-m2"), [_GPT4O_SPLIT]),
    (("tekken",), [_TEKKEN_SPLIT]),
    (("poro-chat", "bloom", "gpt3-finnish"), [_BLOOM_SPLIT]),
    (("viking",), [_BLOOM_SPLIT, r"\p{N}"]),
]:
    for _name in _names:
        _PRE_SPLITS[_name] = _splits

# llama.cpp matches whole words against the vocab before merging for these, and adds BOS unless told not to.
_IGNORE_MERGES_PRE = {
    "llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2", "tekken",
}
_ADD_BOS_PRE = _IGNORE_MERGES_PRE | {"chameleon"}


# --------------------------------------------------------------------------------------------------
# Chat templates, rendered like transformers renders them.
# --------------------------------------------------------------------------------------------------


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`: transformers marks assistant text with it; we only render it."""

    tags = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Any) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # Jinja's own tojson escapes HTML characters (<, >, &, '), which would change the prompt text.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=32)
def _compile_template(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


def _prepare_messages(messages: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Messages as transformers hands them to a template: None values dropped, reasoning under every name."""
    prepared = []
    for message in messages:
        message = {key: value for key, value in dict(message).items() if value is not None}
        reasoning = next(
            (message[key] for key in ("reasoning_content", "thinking", "reasoning") if key in message), None
        )
        if reasoning is not None:
            # Templates read reasoning as `reasoning_content` (DeepSeek, Qwen) or `thinking` (gpt-oss).
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        prepared.append(message)
    return prepared


def render_chat_template(template: str, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
                         **variables: Any) -> str:
    """Render a chat template with the variables and helpers transformers provides."""
    variables.setdefault("tools", None)
    variables.setdefault("documents", None)
    return _compile_template(template).render(
        messages=_prepare_messages(messages), add_generation_prompt=add_generation_prompt, **variables
    )


# --------------------------------------------------------------------------------------------------
# The tokenizer
# --------------------------------------------------------------------------------------------------


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the model's special tokens, stop tokens and chat template."""

    def __init__(
        self,
        backend: _Backend,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
        unk_token: str | None = None,
        chat_template: str | Mapping[str, str] | None = None,
        extra_stop_ids: Iterable[int] = (),
        source: str = "",
    ) -> None:
        self.backend = backend
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.pad_token = pad_token
        self.unk_token = unk_token
        self.source = source
        if isinstance(chat_template, str):
            self.chat_templates: dict[str, str] = {"default": chat_template}
        else:
            self.chat_templates = dict(chat_template or {})
        self._extra_stop_ids = {int(i) for i in extra_stop_ids}
        # transformers registers the named special tokens as special added tokens when it loads a
        # tokenizer, which keeps them whole in text; do the same so both split text alike.
        self._ensure_special(t for t in (bos_token, eos_token, unk_token, pad_token) if t)
        self._refresh_special_ids()

    # ----- construction -----

    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        """Load from a `.gguf` file, a folder with `tokenizer.json`, or a folder holding one GGUF file."""
        path = Path(path).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"No tokenizer at {path}: the path does not exist")
        if path.is_file():
            if path.suffix.lower() == ".gguf":
                return cls.from_gguf(path)
            raise ValueError(f"No tokenizer at {path}: expected a .gguf file or a folder with tokenizer.json")
        if (path / "tokenizer.json").is_file():
            return cls.from_dir(path)
        ggufs = sorted(path.glob("*.gguf"))
        if ggufs:
            # Split models name their first shard ...-00001-of-0000N.gguf; sorting puts it first.
            return cls.from_gguf(ggufs[0])
        raise ValueError(f"No tokenizer at {path}: the folder has neither tokenizer.json nor a .gguf file")

    @classmethod
    def from_dir(cls, path: str | Path) -> "Tokenizer":
        """Load a Hugging Face tokenizer folder (tokenizer.json, tokenizer_config.json, ...)."""
        path = Path(path).expanduser()
        tokenizer_file = path / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise ValueError(f"No tokenizer at {path}: tokenizer.json is missing")
        backend = _Backend.from_file(str(tokenizer_file))
        config = _read_json(path / "tokenizer_config.json")
        special_map = _read_json(path / "special_tokens_map.json")
        generation = _read_json(path / "generation_config.json")

        def named(key: str) -> str | None:
            return _token_content(config.get(key)) or _token_content(special_map.get(key))

        # The newer standalone template files win over the config entry, as in transformers.
        templates: dict[str, str] = {}
        raw = config.get("chat_template")
        if isinstance(raw, str):
            templates["default"] = raw
        elif isinstance(raw, list):
            templates.update({item["name"]: item["template"] for item in raw})
        files: dict[str, str] = {}
        if (path / "chat_template.jinja").is_file():
            files["default"] = (path / "chat_template.jinja").read_text(encoding="utf-8")
        extra_dir = path / "additional_chat_templates"
        if extra_dir.is_dir():
            for file in sorted(extra_dir.glob("*.jinja")):
                files[file.name.removesuffix(".jinja")] = file.read_text(encoding="utf-8")
        if files:
            templates = files

        stop_ids = generation.get("eos_token_id")
        stop_ids = [] if stop_ids is None else [stop_ids] if isinstance(stop_ids, int) else list(stop_ids)
        return cls(
            backend,
            bos_token=named("bos_token"),
            eos_token=named("eos_token"),
            pad_token=named("pad_token"),
            unk_token=named("unk_token"),
            chat_template=templates,
            extra_stop_ids=stop_ids,
            source=str(path),
        )

    @classmethod
    def from_gguf(cls, path: str | Path) -> "Tokenizer":
        """Build the tokenizer a GGUF file describes in its `tokenizer.*` metadata."""
        path = Path(path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"No tokenizer at {path}: the file does not exist")
        meta = _read_gguf_metadata(path)
        kind = meta.get("tokenizer.ggml.model")
        tokens = meta.get("tokenizer.ggml.tokens")
        if kind is None or not tokens:
            raise ValueError(
                f"{path} has no tokenizer metadata (tokenizer.ggml.model / tokenizer.ggml.tokens are missing)"
            )
        names = _unique_token_names(tokens)
        types = [int(t) for t in meta.get("tokenizer.ggml.token_type") or [_NORMAL] * len(names)]
        pre = meta.get("tokenizer.ggml.pre")
        if kind == "gpt2":
            backend = _byte_level_bpe(names, meta.get("tokenizer.ggml.merges") or [], pre)
            add_bos_default = pre in _ADD_BOS_PRE
        elif kind == "llama":
            scores = meta.get("tokenizer.ggml.scores") or [0.0] * len(names)
            add_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
            unk_id = meta.get("tokenizer.ggml.unknown_token_id")
            backend = _sentencepiece_bpe(names, [float(s) for s in scores], types, add_prefix, unk_id)
            add_bos_default = True
        else:
            raise ValueError(
                f"{path}: tokenizer model {kind!r} is not supported (supported: 'gpt2' byte-level BPE, "
                "'llama' SentencePiece)"
            )

        # Control and unknown tokens are special: matched whole in text, dropped by skip_special_tokens.
        # User-defined ones (like <think> in some vocabs) are matched whole but stay ordinary text.
        special = [AddedToken(n, special=True, normalized=False)
                   for n, t in zip(names, types) if t in (_CONTROL, _UNKNOWN)]
        user = [AddedToken(n, special=False, normalized=False) for n, t in zip(names, types) if t == _USER_DEFINED]
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
        backend.post_processor = _bos_eos_processor(backend, bos if add_bos else None, eos if add_eos else None)

        templates: dict[str, str] = {}
        if meta.get("tokenizer.chat_template"):
            templates["default"] = meta["tokenizer.chat_template"]
        for name in meta.get("tokenizer.chat_templates") or []:
            text = meta.get(f"tokenizer.chat_template.{name}")
            if text:
                templates[name] = text

        stop_ids = [meta[k] for k in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id") if k in meta]
        return cls(
            backend,
            bos_token=bos,
            eos_token=eos,
            pad_token=name_of("tokenizer.ggml.padding_token_id"),
            unk_token=name_of("tokenizer.ggml.unknown_token_id"),
            chat_template=templates,
            extra_stop_ids=stop_ids,
            source=str(path),
        )

    # ----- encoding and decoding -----

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`; with add_special_tokens, BOS/EOS are added only where the model asks for them."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def bos_id(self) -> int | None:
        return self.token_to_id(self.bos_token) if self.bos_token else None

    @property
    def eos_id(self) -> int | None:
        return self.token_to_id(self.eos_token) if self.eos_token else None

    @property
    def pad_id(self) -> int | None:
        pad = self.token_to_id(self.pad_token) if self.pad_token else None
        return pad if pad is not None else self.eos_id

    @property
    def add_bos(self) -> bool:
        """Whether `encode(..., add_special_tokens=True)` puts BOS first."""
        ids = self.backend.encode("", add_special_tokens=True).ids
        return bool(ids) and ids[0] == self.bos_id

    @property
    def add_eos(self) -> bool:
        """Whether `encode(..., add_special_tokens=True)` puts EOS last."""
        ids = self.backend.encode("", add_special_tokens=True).ids
        # A lone id that is BOS and EOS at once was put there as BOS.
        return bool(ids) and ids[-1] == self.eos_id and (len(ids) > 1 or not self.add_bos)

    def set_add_special_tokens(self, add_bos: bool, add_eos: bool = False) -> None:
        """Choose what `encode(..., add_special_tokens=True)` adds; `save()` carries the choice along."""
        if (add_bos and self.bos_id is None) or (add_eos and self.eos_id is None):
            raise ValueError("Cannot add BOS/EOS: the tokenizer has no such token")
        self.backend.post_processor = _bos_eos_processor(
            self.backend, self.bos_token if add_bos else None, self.eos_token if add_eos else None
        )

    @property
    def stop_ids(self) -> set[int]:
        """Ids that end generation: EOS, the model's end-of-turn tokens, and those generation_config names."""
        stops = set(self._extra_stop_ids)
        if self.eos_id is not None:
            stops.add(self.eos_id)
        for token in _END_OF_TURN_TOKENS:
            token_id = self.token_to_id(token)
            if token_id is not None:
                stops.add(token_id)
        return stops

    @property
    def special_ids(self) -> frozenset[int]:
        """Ids of the special added tokens (what `skip_special_tokens` drops)."""
        return self._special_ids

    @property
    def byte_fallback_ids(self) -> frozenset[int]:
        """Ids of `<0xXX>` byte tokens in a byte-fallback vocabulary (empty for byte-level BPE)."""
        return self._byte_ids

    # ----- chat -----

    @property
    def chat_template(self) -> str | None:
        """The default chat template, if the model has one."""
        if not self.chat_templates:
            return None
        return self.chat_templates.get("default", next(iter(self.chat_templates.values())))

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        tokenize: bool = False,
        *,
        chat_template: str | None = None,
        **kwargs: Any,
    ) -> str | list[int]:
        """Render `messages` with the model's chat template; `chat_template` may be a name or a template."""
        template = self.chat_templates.get(chat_template, chat_template) if chat_template else self.chat_template
        if template is None:
            raise ValueError(f"The tokenizer from {self.source or 'memory'} has no chat template")
        # Named special tokens first, so that caller kwargs override them (as in transformers).
        variables: dict[str, Any] = {
            key: value
            for key, value in (("bos_token", self.bos_token), ("eos_token", self.eos_token),
                               ("unk_token", self.unk_token), ("pad_token", self.pad_token))
            if value is not None
        }
        variables.update(kwargs)
        text = render_chat_template(template, messages, add_generation_prompt, **variables)
        # The template writes BOS itself where the model wants it, so no special tokens get added here.
        return self.encode(text, add_special_tokens=False) if tokenize else text

    # ----- saving -----

    def save(self, directory: str | Path) -> Path:
        """Write tokenizer.json and tokenizer_config.json; `transformers.AutoTokenizer` loads the result."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(directory / "tokenizer.json"))
        config: dict[str, Any] = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "add_bos_token": self.add_bos,
            "add_eos_token": self.add_eos,
            "clean_up_tokenization_spaces": False,
        }
        for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
            if getattr(self, key) is not None:
                config[key] = getattr(self, key)
        if set(self.chat_templates) == {"default"}:
            config["chat_template"] = self.chat_templates["default"]
        elif self.chat_templates:
            config["chat_template"] = [{"name": n, "template": t} for n, t in self.chat_templates.items()]
        (directory / "tokenizer_config.json").write_text(
            json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
        )
        # A chat_template.jinja left from an earlier save would override the config; keep it in step.
        stale = directory / "chat_template.jinja"
        if stale.is_file() and self.chat_template is not None:
            stale.write_text(self.chat_template, encoding="utf-8")
        return directory

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self.vocab_size}, bos={self.bos_token!r}, eos={self.eos_token!r}, "
                f"source={self.source!r})")

    # ----- internals -----

    def _ensure_special(self, tokens: Iterable[str]) -> None:
        added = {t.content for t in self.backend.get_added_tokens_decoder().values()}
        missing = [AddedToken(t, special=True, normalized=False) for t in dict.fromkeys(tokens) if t not in added]
        if missing:
            self.backend.add_special_tokens(missing)

    def _refresh_special_ids(self) -> None:
        self._special_ids = frozenset(i for i, t in self.backend.get_added_tokens_decoder().items() if t.special)
        byte_ids: set[int] = set()
        model = self.backend.model
        if isinstance(model, models.BPE) and model.byte_fallback:
            byte_ids = {i for t, i in self.backend.get_vocab(with_added_tokens=False).items() if _BYTE_TOKEN.match(t)}
        self._byte_ids = frozenset(byte_ids)


# --------------------------------------------------------------------------------------------------
# Streaming detokenizer
# --------------------------------------------------------------------------------------------------


class StreamDecoder:
    """Turns ids into text one token at a time; the pieces joined equal `tokenizer.decode(all_ids)`.

    Each push decodes only a short window: the tokens last emitted (as context, because decoders such as
    SentencePiece's strip a leading space from the first token they see) plus the pending ones. Text is
    held back while it ends in U+FFFD, i.e. while a multi-byte character is still incomplete.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._ids: list[int] = []
        self._read = 0  # ids[:_read] are emitted; ids[0:_read] is also the context window

    def push(self, token_id: int) -> str:
        """Add one id; return the text it completes ('' while a character is still incomplete)."""
        if self.skip_special_tokens and token_id in self.tokenizer.special_ids:
            return ""  # decode(skip_special_tokens=True) drops these before decoding, so they affect nothing
        self._ids.append(int(token_id))
        if token_id in self.tokenizer.byte_fallback_ids:
            # A run of <0xXX> tokens decodes as one unit (one U+FFFD per byte if the run is invalid), so a
            # run is never cut: wait for the token after it.
            return ""
        context = self._decode(self._ids[: self._read])
        text = self._decode(self._ids)
        if len(text) <= len(context) or text.endswith("\ufffd"):
            return ""
        # Keep what was just emitted as the next window's context and forget everything before it.
        del self._ids[: self._read]
        self._read = len(self._ids)
        return text[len(context):]

    def flush(self) -> str:
        """Return whatever is still held back (incomplete bytes come out as U+FFFD, as decode() does)."""
        context = self._decode(self._ids[: self._read])
        text = self._decode(self._ids)
        del self._ids[: self._read]
        self._read = len(self._ids)
        return text[len(context):]

    def reset(self) -> None:
        self._ids.clear()
        self._read = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.backend.decode(ids, skip_special_tokens=False) if ids else ""


# --------------------------------------------------------------------------------------------------
# Builders and helpers
# --------------------------------------------------------------------------------------------------


def _byte_level_bpe(names: list[str], merges: list[str], pre: str | None) -> _Backend:
    """GPT-2 style byte-level BPE, split by the regexes llama.cpp uses for this `pre` type."""
    vocab = {name: index for index, name in enumerate(names)}
    pairs = []
    for merge in merges:
        # llama.cpp splits at the first space after the first character, so a piece may start with one.
        cut = merge.find(" ", 1)
        left, right = merge[:cut], merge[cut + 1:]
        if cut > 0 and left in vocab and right in vocab:
            pairs.append((left, right))
    splits = _PRE_SPLITS.get(pre or "")
    if splits is None:
        log.warning("Unknown GGUF pre-tokenizer %r; using llama.cpp's default split", pre)
        splits = _DEFAULT_SPLITS
    backend = _Backend(models.BPE(vocab=vocab, merges=pairs, ignore_merges=pre in _IGNORE_MERGES_PRE))
    steps: list[Any] = [pre_tokenizers.Split(Regex(s), behavior="isolated") for s in splits[:-1]]
    if splits[-1] == _GPT2_SPLIT:
        steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True))  # GPT-2's own split
    else:
        steps.append(pre_tokenizers.Split(Regex(splits[-1]), behavior="isolated"))
        steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False))
    backend.pre_tokenizer = pre_tokenizers.Sequence(steps) if len(steps) > 1 else steps[0]
    backend.decoder = decoders.ByteLevel()
    return backend


def _sentencepiece_bpe(names: list[str], scores: list[float], types: list[int], add_prefix: bool,
                       unk_id: int | None) -> _Backend:
    """SentencePiece-style BPE as llama.cpp runs it: spaces become ▁, pieces merge best score first,
    characters outside the vocab fall back to <0xXX> byte tokens.

    tokenizers' BPE wants merges, so they are rebuilt from the scores: every way to cut a piece into two
    pieces is a merge, ranked by the score of the piece. Merging by that rank is merging by score.
    """
    vocab = {name: index for index, name in enumerate(names)}
    mergeable = {n: i for i, (n, t) in enumerate(zip(names, types)) if t in (_NORMAL, _USER_DEFINED)}
    ranked = []
    for piece, index in mergeable.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in mergeable and right in mergeable:
                ranked.append((-scores[index], index, mergeable[left], left, right))
    ranked.sort()
    unk = names[unk_id] if unk_id is not None and 0 <= unk_id < len(names) else None
    if unk is None and "<unk>" in vocab:
        unk = "<unk>"
    backend = _Backend(models.BPE(
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


def _bos_eos_processor(backend: _Backend, bos: str | None, eos: str | None) -> processors.TemplateProcessing:
    """A post-processor that adds BOS and/or EOS around a sequence (or nothing)."""
    single = " ".join([*([f"{bos}:0"] if bos else []), "$A:0", *([f"{eos}:0"] if eos else [])])
    pair = single + " " + " ".join([*([f"{bos}:1"] if bos else []), "$B:1", *([f"{eos}:1"] if eos else [])])
    specials = [(t, backend.token_to_id(t)) for t in dict.fromkeys(x for x in (bos, eos) if x)]
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)


def _unique_token_names(tokens: Sequence[str]) -> list[str]:
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


def _read_gguf_metadata(path: Path) -> dict[str, Any]:
    """The tokenizer.* and general.* metadata of a GGUF file, as plain Python values."""
    import gguf  # heavy-ish import, only needed for GGUF files
    import numpy as np

    try:
        from sputnik.checkpoint.gguf import open_gguf

        reader = open_gguf(path)
    except Exception as error:  # GGUFReader raises ValueError/struct errors on files that are not GGUF
        raise ValueError(f"{path} is not a readable GGUF file: {error}") from error
    values: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if not (key.startswith("tokenizer.") or key.startswith("general.")) or not field.types:
            continue
        kind = field.types[0]
        if kind == gguf.GGUFValueType.ARRAY:
            if field.types[-1] == gguf.GGUFValueType.STRING:
                values[key] = [bytes(field.parts[i]).decode("utf-8", errors="replace") for i in field.data]
            elif field.data:
                values[key] = np.concatenate([np.asarray(field.parts[i]).reshape(-1) for i in field.data]).tolist()
            else:
                values[key] = []
        elif kind == gguf.GGUFValueType.STRING:
            values[key] = bytes(field.parts[field.data[0]]).decode("utf-8", errors="replace")
        else:
            values[key] = np.asarray(field.parts[field.data[0]]).reshape(-1)[0].item()
    return values


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    with open(path, encoding="utf-8") as handle:
        data = json.load(handle)
    return data if isinstance(data, dict) else {}


def _token_content(value: Any) -> str | None:
    """A special token from a config: a plain string, or a serialized AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None
