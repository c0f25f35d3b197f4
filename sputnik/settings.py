"""Settings of every `sputnik` verb: config dataclasses filled from their defaults, then a flat YAML file
(`--config`), then `--field-name` flags generated from the fields, with help text from the field metadata
(as HfArgumentParser and open-r1's TrlParser do)."""

from __future__ import annotations

import argparse
import copy
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

import yaml

TRUE, FALSE = ("1", "true", "yes"), ("0", "false", "no")


def option(default: Any = dataclasses.MISSING, help: str = "", **metadata: Any) -> Any:
    """A dataclass field with its help text (and optional `aliases`, `choices`); list/dict defaults are copied."""
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"help": help, **metadata})
    return dataclasses.field(default=default, metadata={"help": help, **metadata})


def load_config(path: str | Path) -> dict[str, Any]:
    """A config file: a flat YAML mapping of setting names to values."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config not found: {p}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"{p}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{p}: a config is a mapping of settings, got {type(data).__name__}")
    return data


def coerce(value: Any, hint: Any, name: str) -> Any:
    """A YAML or command-line value as the field's declared type; ValueError naming the setting otherwise."""
    origin = typing.get_origin(hint)
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return coerce(value, args[0], name)
    container = origin in (dict, list, tuple) or hint in (dict, list, tuple)
    if container and isinstance(value, str):
        value = yaml.safe_load(value)  # --rewards '{accuracy: 1, format: 0.5}', --betas '[0.9, 0.95]'
    if (origin is list or hint is list) and isinstance(value, list) and len(value) == 1 and isinstance(value[0], str) \
            and value[0].startswith("["):
        value = yaml.safe_load(value[0])  # --lora-target-modules '[q_proj, v_proj]'
    try:
        if hint is bool:
            if isinstance(value, str):
                if value.lower() not in TRUE + FALSE:
                    raise ValueError(value)
                return value.lower() in TRUE
            if not isinstance(value, (bool, int)):
                raise ValueError(value)
            return bool(value)
        if hint is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if hint is float:
            return float(value)
        if hint is Path:
            return Path(value)
        if origin is tuple or hint is tuple:
            return tuple(value)
        if origin is list or hint is list:
            return [value] if isinstance(value, str) else list(value)
        if (origin is dict or hint is dict) and not isinstance(value, dict):
            raise ValueError(value)
        if hint is str and not isinstance(value, str):
            return str(value)
    except (TypeError, ValueError):
        raise ValueError(f"setting {name}: cannot read {value!r} as {getattr(hint, '__name__', hint)}") from None
    return value


def _default(f: dataclasses.Field, template: Any) -> Any:
    if template is not None:
        return copy.copy(getattr(template, f.name))  # a list default is not shared with the template
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _split(config: Any) -> tuple[type, Any]:
    """(the dataclass, the instance holding this verb's defaults or None) of a config given to add_flags."""
    return (config, None) if isinstance(config, type) else (type(config), config)


def _list_of(hint: Any) -> Any:
    """The element type of `list[X]` or `list[X] | None`; None for any other type."""
    for h in (hint, *typing.get_args(hint)):
        if h is list or typing.get_origin(h) is list:
            return (typing.get_args(h) or [str])[0]
    return None


def _metavar(hint: Any) -> str:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    plain = _list_of(hint) or (args[0] if typing.get_origin(hint) in (typing.Union, types.UnionType) else hint)
    return plain.__name__.upper() if plain in (str, int, float, Path) else "V"


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _names(f: dataclasses.Field) -> list[str]:
    """The names a setting goes by in a config file: its field name and its long aliases."""
    return [f.name] + [a.lstrip("-").replace("-", "_") for a in f.metadata.get("aliases", ()) if a.startswith("--")]


def _add_field(group, f: dataclasses.Field, hint: Any, default: Any) -> None:
    text = f.metadata.get("help", "")
    if default is dataclasses.MISSING:
        text += " (required)"
    elif default not in (None, "", [], {}):
        text += f" (default: {default.name if isinstance(default, Path) else default})"
    names = [_flag(f.name), *f.metadata.get("aliases", ())]
    kind = dict(dest=f.name, default=None, help=text.strip(), choices=f.metadata.get("choices"))
    if hint is bool:
        # `--flag` alone means true; `--flag false` still reads (and `--no-flag` for settings that default to true).
        group.add_argument(*names, nargs="?", const="true", metavar="true|false", **kind)
        if default is True:
            group.add_argument(_flag("no_" + f.name), dest=f.name, action="store_const", const="false",
                               help=f"same as {_flag(f.name)} false")
    elif _list_of(hint) is not None:
        group.add_argument(*names, nargs="+", action="extend", metavar=_metavar(hint), **kind)  # repeatable
    else:
        group.add_argument(*names, metavar=_metavar(hint) if kind["choices"] is None else None, **kind)


def add_flags(parser: argparse.ArgumentParser, *configs: Any, positional: tuple[str, ...] = ()) -> None:
    """`--config` and a --field-name flag for every field of the verb's config dataclasses.

    A config is a dataclass or an instance of one (then its values are this verb's defaults); a field shared by two
    configs is one flag setting both. Fields named in `positional` may also be given as positional arguments."""
    parser.add_argument("--config", "-c", default=None, metavar="FILE.yaml",
                        help="a flat YAML mapping of the settings below; flags given here override it")
    seen: set[str] = set()
    for config in configs:
        cls, template = _split(config)
        hints = typing.get_type_hints(cls)
        group = parser.add_argument_group(cls.__name__, (cls.__doc__ or "").strip())
        for f in dataclasses.fields(cls):
            if f.name in seen or not f.init or f.metadata.get("cli") is False:
                continue
            seen.add(f.name)
            if f.name in positional:
                many = _list_of(hints[f.name]) is not None
                parser.add_argument(f.name + ":pos", nargs="*" if many else "?", default=None, metavar=f.name.upper(),
                                    help=f"same as {_flag(f.name)}")
            _add_field(group, f, hints[f.name], _default(f, template))
    parser.set_defaults(verb_configs=configs)


def fill(args: argparse.Namespace) -> list[Any]:
    """The verb's configs (see add_flags): their defaults, then the --config file's values, then the flags given."""
    configs = args.verb_configs
    fields = {}
    for config in configs:
        for f in dataclasses.fields(_split(config)[0]):
            if f.metadata.get("cli") is False:
                continue
            for name in _names(f):
                fields.setdefault(name, f.name)
    given: dict[str, Any] = {}
    if args.config:
        values = load_config(args.config)
        unknown = [repr(k) for k in values if k not in fields]
        if unknown:
            raise ValueError(f"{args.config}: unknown setting{'s' * (len(unknown) > 1)} {', '.join(unknown)} "
                             "(the settings are the flags of --help)")
        given.update({fields[k]: (v, f"{args.config}: ") for k, v in values.items()})
    flags = vars(args)
    for name in set(fields.values()):
        value = flags.get(name + ":pos")
        if value in (None, []):
            value = flags.get(name)
        if value is not None:
            given[name] = (value, "")
    return [_build(config, given) for config in configs]


def _build(config: Any, given: dict[str, tuple[Any, str]]) -> Any:
    cls, template = _split(config)
    hints = typing.get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        if f.name in given:
            value, where = given[f.name]
            try:
                values[f.name] = coerce(value, hints[f.name], f.name)
            except ValueError as e:
                raise ValueError(f"{where}{e}") from None
            choices = f.metadata.get("choices")
            if choices and values[f.name] not in choices:
                raise ValueError(f"{where}setting {f.name}: {values[f.name]!r} is not one of {', '.join(choices)}")
        elif (default := _default(f, template)) is not dataclasses.MISSING:
            values[f.name] = default
        else:
            raise ValueError(f"setting {f.name} is required ({_flag(f.name)})")
    return cls(**values)
