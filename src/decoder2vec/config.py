"""Configuration dataclasses: one declaration feeds the Python API, the CLI and the saved JSON.

Each field carries its help text in ``metadata={"help": ...}``. :func:`add_arguments` turns a
dataclass into command-line options (``--field-name``), :func:`load_config` builds one from a
YAML or JSON file plus overrides, and :func:`save_config` writes it atomically.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import types
import typing
from pathlib import Path
from typing import Any

__all__ = ["add_arguments", "config_from_args", "load_config", "option", "save_config"]


def option(default: Any = dataclasses.MISSING, help: str = "", **kwargs) -> Any:  # noqa: A002
    """A dataclass field with a help string (``default_factory`` works as in ``dataclasses.field``)."""
    return dataclasses.field(default=default, metadata={"help": help}, **kwargs)


def _base_type(annotation) -> tuple[type, bool]:
    """(the scalar or list type behind an annotation, whether None is allowed)."""
    if isinstance(annotation, str):
        annotation = eval(annotation, vars(typing), {})  # annotations are strings under `from __future__`
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _base_type(args[0])[0], True
    return annotation, False


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def add_arguments(parser: argparse.ArgumentParser, cls, *, exclude: tuple[str, ...] = ()) -> None:
    """Add ``--field-name`` options for every field of ``cls``; unset options stay None (not overrides)."""
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        if field.name in exclude or field.name.startswith("_"):
            continue
        kind, _ = _base_type(hints[field.name])
        flag = "--" + field.name.replace("_", "-")
        default = field.default if field.default is not dataclasses.MISSING else None
        help_text = field.metadata.get("help", "") + (f" (default: {default!r})" if default is not None else "")
        if kind is bool:
            parser.add_argument(flag, type=_parse_bool, default=None, metavar="BOOL", help=help_text)
        elif typing.get_origin(kind) in (list, tuple):
            parser.add_argument(flag, nargs="+", default=None, help=help_text)
        elif kind in (int, float, str):
            parser.add_argument(flag, type=kind, default=None, help=help_text)
        else:
            parser.add_argument(flag, type=str, default=None, help=help_text)


def config_from_args(cls, args: argparse.Namespace, base: dict | None = None):
    """Build ``cls`` from ``base`` values updated by the options the user actually gave."""
    values = dict(base or {})
    for field in dataclasses.fields(cls):
        given = getattr(args, field.name, None)
        if given is not None:
            values[field.name] = given
    return cls(**values)


def read_config_file(path: str | os.PathLike | None) -> dict:
    """A YAML or JSON file as a dict (empty when ``path`` is None)."""
    if path is None:
        return {}
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {str(path)!r} not found")
    text = path.read_text()
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text) or {}
    else:
        data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping of option names to values")
    return data


def load_config(cls, path: str | os.PathLike | None = None, **overrides):
    """``cls`` from a YAML/JSON file, then keyword overrides; unknown keys are an error."""
    values = read_config_file(path)
    values.update({k: v for k, v in overrides.items() if v is not None})
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(
            f"unknown option(s) for {cls.__name__}: {', '.join(unknown)}; known: {', '.join(sorted(known))}"
        )
    return cls(**values)


def save_config(config, path: str | os.PathLike) -> None:
    """Write a dataclass as JSON, atomically (temp file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(dataclasses.asdict(config), indent=2, default=str) + "\n")
    os.replace(tmp, path)
