"""`Tokenizer`: a `tokenizers.Tokenizer` plus the few facts around it (BOS/EOS, chat templates, stop tokens), loaded
from a Hugging Face folder or a GGUF file and saved as a folder transformers loads."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from tokenizers import AddedToken, models
from tokenizers import Tokenizer as Backend

from sputnik import r1
from sputnik.device import trim_heap
from sputnik.tokenizer.backends import bos_eos_processor
from sputnik.tokenizer.chat_template import render_chat_template
from sputnik.tokenizer.gguf import load_vocab

# Tokens that end a turn in the chat formats we meet. They count as stop tokens when the vocab has them.
# <|endoftext|> is not here: it ends a document, not a turn, so it stops generation only where it is the EOS.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end▁of▁sentence|>", r1.EOS, "<|end|>", "<end_of_turn>")

_BYTE_TOKEN = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the model's special tokens, stop tokens and chat template."""

    def __init__(
        self,
        backend: Backend,
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
        backend = Backend.from_file(str(tokenizer_file))
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
        vocab = load_vocab(path)
        tok = cls(vocab.backend, bos_token=vocab.bos_token, eos_token=vocab.eos_token, pad_token=vocab.pad_token,
                  unk_token=vocab.unk_token, chat_template=vocab.chat_templates, extra_stop_ids=vocab.stop_ids,
                  source=str(path))
        del vocab
        trim_heap()  # the vocabulary's temporaries (~3 MB of the heap)
        return tok

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
        self.backend.post_processor = bos_eos_processor(
            self.backend, self.bos_token if add_bos else None, self.eos_token if add_eos else None
        )

    @property
    def stop_ids(self) -> set[int]:
        """Ids that end generation: EOS, the model's end-of-turn tokens, and those generation_config names."""
        stops = set(self._extra_stop_ids)
        if self.eos_id is not None:
            stops.add(self.eos_id)
        for token in END_OF_TURN_TOKENS:
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
