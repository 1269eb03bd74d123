"""Typed configs: dataclasses whose fields become CLI flags.

Design decisions:
- A config is a plain `@dataclass`. Each field is declared with `arg(default, "help text")`, so the help
  text lives next to the field and `--help` can never go out of date.
- Presets are named instances (`{"tiny": Cfg(...), ...}`); `--preset NAME` picks one and any flag given on
  the command line overrides that field. No `exec`, no config files that run code.
- Field types drive parsing: `bool` fields become `--flag/--no-flag`, `list[str]` fields take several
  values, `X | None` fields accept `none`.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any, TypeVar

T = TypeVar("T")

_MISSING = dataclasses.MISSING


def arg(default: Any = _MISSING, help: str = "", *, factory: Any = _MISSING, positional: bool = False,
        choices: list[str] | None = None, metavar: str | None = None) -> Any:
    """A dataclass field carrying its CLI help text (and optionally choices / positional)."""
    meta = {"help": help, "positional": positional, "choices": choices, "metavar": metavar}
    if factory is not _MISSING:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    """`X | None` -> (X, True); anything else -> (tp, False)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _scalar_parser(tp: Any, optional: bool):
    def parse(text: str):
        if optional and text.lower() in ("none", "null", ""):
            return None
        return tp(text)

    parse.__name__ = getattr(tp, "__name__", "value")  # argparse names the type in its errors
    return parse


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one flag per field of dataclass `cls`. Flags default to `argparse.SUPPRESS`, so the namespace holds
    only what the user typed (an explicit `none` included) and only that overrides the preset."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name.startswith("_"):
            continue
        tp, optional = _unwrap_optional(hints[f.name])
        meta = f.metadata
        help_text = meta.get("help") or f.name.replace("_", " ")
        default = f.default if f.default is not _MISSING else (
            f.default_factory() if f.default_factory is not _MISSING else None)
        kwargs: dict[str, Any] = {"help": f"{help_text} (default: {default!r})", "dest": f.name}
        if meta.get("metavar"):
            kwargs["metavar"] = meta["metavar"]
        if meta.get("choices"):
            kwargs["choices"] = meta["choices"]
        if tp is bool:
            parser.add_argument(_flag_name(f.name), action=argparse.BooleanOptionalAction,
                                default=argparse.SUPPRESS, **kwargs)
            continue
        if typing.get_origin(tp) in (list, tuple):
            (inner, *_) = typing.get_args(tp) or (str,)
            kwargs["type"] = _scalar_parser(inner, False)
            kwargs["nargs"] = "*" if meta.get("positional") else "+"
        else:
            kwargs["type"] = _scalar_parser(tp, optional)
        if meta.get("positional"):
            kwargs.pop("dest")
            kwargs["default"] = argparse.SUPPRESS
            if "nargs" not in kwargs:
                kwargs["nargs"] = "?" if f.default is not _MISSING else None
            parser.add_argument(f.name, **{k: v for k, v in kwargs.items() if v is not None})
        else:
            parser.add_argument(_flag_name(f.name), default=argparse.SUPPRESS, **kwargs)


def build_config(cls: type[T], ns: argparse.Namespace, presets: dict[str, T] | None = None) -> T:
    """The preset named by `ns.preset` (or the class defaults), with every flag the user gave applied."""
    base = cls() if not presets else presets[getattr(ns, "preset", None) or next(iter(presets))]
    overrides = {}
    given = vars(ns)
    for f in dataclasses.fields(cls):
        if f.name in given:
            value = given[f.name]
            overrides[f.name] = list(value) if isinstance(value, list) else value
    return dataclasses.replace(base, **overrides)


def to_dict(cfg: Any) -> dict[str, Any]:
    """JSON-ready dict of a (possibly nested) dataclass config."""
    return dataclasses.asdict(cfg)


def from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Inverse of `to_dict`, ignoring unknown keys (so old checkpoints load into newer configs)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in data.items() if k in names})
