"""Recipes: dataclass configs filled from a flat YAML file, then overridden by CLI flags named after the fields."""

from __future__ import annotations

import argparse
import dataclasses
import typing
from pathlib import Path
from typing import Any

import yaml


def load_recipe(path: str | Path) -> dict[str, Any]:
    """A recipe: a flat YAML mapping of field names (of GRPOConfig, TrainConfig, ...) plus `model`."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"recipe not found: {p}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"{p}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{p}: a recipe is a mapping of settings, got {type(data).__name__}")
    return data


def _coerce(value: Any, hint: Any, name: str) -> Any:
    """A YAML or command-line value as the field's declared type."""
    origin = typing.get_origin(hint)
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return _coerce(value, args[0], name)
    if isinstance(value, str) and (origin in (dict, list, tuple) or hint in (dict, list, tuple)):
        value = yaml.safe_load(value)  # --rewards '{accuracy: 1, format: 0.5}'
    try:
        if hint is bool:
            if isinstance(value, str):
                if value.lower() not in ("1", "0", "true", "false", "yes", "no"):
                    raise ValueError(value)
                return value.lower() in ("1", "true", "yes")
            return bool(value)
        if hint is int:
            return int(value)
        if hint is float:
            return float(value)
        if origin is tuple or hint is tuple:
            return tuple(value)
        if origin is list:
            return [value] if isinstance(value, str) else list(value)
        if origin is dict and not isinstance(value, dict):
            raise ValueError(value)
    except (TypeError, ValueError):
        raise ValueError(f"setting {name}: cannot read {value!r} as {getattr(hint, '__name__', hint)}") from None
    return value


def build(cls: type, values: dict[str, Any]) -> Any:
    """An instance of dataclass `cls` from the values whose keys are its fields."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: _coerce(v, hints[k], k) for k, v in values.items() if k in names})


def add_flags(parser: argparse.ArgumentParser, *classes: type) -> None:
    """--field-name flags for every field of the dataclasses (default None: the recipe or the field default)."""
    seen: set[str] = set()
    for cls in classes:
        group = parser.add_argument_group(cls.__name__)
        for f in dataclasses.fields(cls):
            if f.name in seen:
                continue
            seen.add(f.name)
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            group.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=None, metavar="V",
                               help=f"(default: {default!r})")


def settings(args: argparse.Namespace, recipe: dict[str, Any], *classes: type) -> list[Any]:
    """Each dataclass filled from the recipe, then from the flags given on the command line."""
    unknown = set(recipe) - {"model"} - {f.name for cls in classes for f in dataclasses.fields(cls)}
    if unknown:
        raise ValueError(f"unknown settings in recipe: {', '.join(sorted(unknown))}")
    values = dict(recipe)
    values.update({k: v for k, v in vars(args).items() if v is not None})
    return [build(cls, values) for cls in classes]
