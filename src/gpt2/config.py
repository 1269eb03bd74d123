"""Typed configs: dataclasses whose fields become CLI flags.

Design decisions:
- A config is a plain `@dataclass`. Each field is declared with `arg(default, "help text")`, so the help
  text lives next to the field and `--help` can never go out of date.
- Presets are named instances (`{"tiny": Cfg(...), ...}`); `--preset NAME` picks one and any flag given on
  the command line overrides that field. No `exec`, no config files that run code.
- Field types drive parsing: `bool` fields become `--flag/--no-flag`, `list[str]` fields take several
  values, `X | None` fields accept `none`.
- `--help` shows the default that will apply: the class default, or with presets the default preset's value
  and every other preset's where they differ.
- Resume: a resumed run's saved settings replace the preset as the base (`gpt2.train.run_dir`, which applies
  the rule). Each field says what a flag given again on resume does (`on_resume`): SESSION (this session only, never
  inherited: --stop-at-step), APPLY (inherited; a new value just applies: --device, --eval-every), ANNOUNCE
  (inherited; a new value applies on purpose and the loop prints the change: --max-steps, --lr) or REFUSE
  (the default: a new value would silently make another run, so it is an error: the model shape, the data,
  the batch, the seed). A subclass that redeclares a field inherits its base's rule.
- One check for every command's numbers (`check_values`, run by `build_config`, `resumed_config` and the training loop's
  `validate`): a float flag must be finite (nan and inf make no run or answer that means anything), an integer
  must fit in 64 bits (torch and numpy take no more), a seed must be in [0, 2**63), a text flag must not be
  empty or blank (`--source ""` is not "no source"), and a field declared with `arg(..., minimum=N)` must be >= N
  (`hint` adds what to do instead). Checks that relate two flags (warmup vs max steps, min lr vs lr) are the
  commands' own `validate`.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from typing import Any, TypeVar

from gpt2.errors import UserError

T = TypeVar("T")

_MISSING = dataclasses.MISSING

# What a flag given again on `--resume` does (see the module docstring).
SESSION, APPLY, ANNOUNCE, REFUSE = "session", "apply", "announce", "refuse"


def arg(default: Any = _MISSING, help: str = "", *, factory: Any = _MISSING, positional: bool = False,
        choices: list[str] | None = None, metavar: str | None = None, on_resume: str | None = None,
        minimum: int | float | None = None, hint: str = "", aliases: tuple[str, ...] = ()) -> Any:
    """A dataclass field carrying its CLI help text (and optionally choices / positional, and its rule on
    `--resume`: SESSION, APPLY, ANNOUNCE or REFUSE; None = the base class's rule for this name, else REFUSE).
    minimum: the smallest value that makes sense (`check_values` refuses less, adding `hint` to its message).
    aliases: other flag names that set the field too (kept so that scripts written for an older name still run;
    argparse's help lists them beside the flag)."""
    meta = {"help": help, "positional": positional, "choices": choices, "metavar": metavar,
            "on_resume": on_resume, "minimum": minimum, "hint": hint or None, "aliases": aliases}
    if factory is not _MISSING:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def flag_name(name: str) -> str:
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
        # "" is None for a number, but stays "" for text: `--prompt ""` is an empty prompt (refused by its
        # command), not a flag left out
        if optional and (text.lower() in ("none", "null") or (text == "" and tp is not str)):
            return None
        return tp(text)

    parse.__name__ = getattr(tp, "__name__", "value")  # argparse names the type in its errors
    return parse


def _default_text(f: dataclasses.Field, presets: dict[str, Any] | None) -> str:
    """"(default: X)", or with presets whose values differ "(default: X with preset A, Y with B)": the value
    that applies when the flag is not given."""
    if presets:
        values = {name: getattr(p, f.name) for name, p in presets.items()}
        first, *rest = values.items()
        if any(v != first[1] for _, v in rest):
            others = ", ".join(f"{v!r} with {name}" for name, v in rest)
            return f"(default: {first[1]!r} with preset {first[0]}, {others})"
        default = first[1]
    else:
        default = f.default if f.default is not _MISSING else (
            f.default_factory() if f.default_factory is not _MISSING else None)
    if default is None and "default" in f.metadata.get("help", ""):
        return ""  # the help text already says what None means ("default: lr / 10")
    return f"(default: {default!r})"


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type, presets: dict[str, Any] | None = None) -> None:
    """Add one flag per field of dataclass `cls`. Flags default to `argparse.SUPPRESS`, so the namespace holds
    only what the user typed (an explicit `none` included) and only that overrides the preset (or, on
    resume, the saved run). The help shows the default the preset gives."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name.startswith("_"):
            continue
        tp, optional = _unwrap_optional(hints[f.name])
        meta = f.metadata
        help_text = meta.get("help") or f.name.replace("_", " ")
        aliases = meta.get("aliases") or ()
        kwargs: dict[str, Any] = {"help": f"{help_text} {_default_text(f, presets)}".rstrip(), "dest": f.name}
        if meta.get("metavar"):
            kwargs["metavar"] = meta["metavar"]
        if meta.get("choices"):
            kwargs["choices"] = meta["choices"]
        if tp is bool:
            parser.add_argument(flag_name(f.name), *aliases, action=argparse.BooleanOptionalAction,
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
            parser.add_argument(flag_name(f.name), *aliases, default=argparse.SUPPRESS, **kwargs)


def given_fields(cls: type, ns: argparse.Namespace) -> dict[str, Any]:
    """The fields of `cls` the user typed on the command line (flags default to SUPPRESS), with their values."""
    given = vars(ns)
    return {f.name: list(given[f.name]) if isinstance(given[f.name], list) else given[f.name]
            for f in dataclasses.fields(cls) if f.name in given}


def default_config(cls: type[T], ns: argparse.Namespace, presets: dict[str, T] | None = None) -> T:
    """The preset named by `ns.preset` (the first preset when none was typed), or the class defaults."""
    return cls() if not presets else presets[getattr(ns, "preset", None) or next(iter(presets))]


INT64 = 2**63  # integers must lie in [-INT64, INT64): torch's and numpy's limit
SEED_FIELDS = ("seed",)


def check_values(cfg: Any) -> None:
    """The checks every config gets (module docstring): finite floats, 64-bit integers, seeds in [0, 2**63),
    non-empty text, and each field's declared `minimum`. Raises a one-line UserError naming the flag."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        flag = flag_name(f.name)
        if isinstance(value, str) and not value.strip():  # `--source ""` would read the current folder
            hint = declared(type(cfg), f.name, "hint") or f"give a value, or leave {flag} out"
            raise UserError(f"{flag} is empty: {hint}")
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            if isinstance(v, float) and not math.isfinite(v):
                raise UserError(f"{flag} must be a finite number (got {v})")
            if f.name in SEED_FIELDS and not 0 <= v < INT64:
                raise UserError(f"{flag} must be an integer in [0, 2**63) (got {v})")
            if isinstance(v, int) and not -INT64 <= v < INT64:
                raise UserError(f"{flag} {v} is out of range: integers must fit in 64 bits (|x| < 2**63)")
            minimum = declared(type(cfg), f.name, "minimum")
            if minimum is not None and v < minimum:
                hint = declared(type(cfg), f.name, "hint")
                raise UserError(f"{flag} must be >= {minimum} (got {v}){'; ' + hint if hint else ''}")


def build_config(cls: type[T], ns: argparse.Namespace, presets: dict[str, T] | None = None) -> T:
    """The preset named by `ns.preset` (or the class defaults), with every flag the user gave applied. (On
    `--resume` the saved settings are the base instead: `gpt2.train.run_dir.resumed_config`.)"""
    given = given_fields(cls, ns)
    cfg = with_given(dataclasses.replace(default_config(cls, ns, presets), **given), given)
    check_values(cfg)
    return cfg


def declared(cls: type, name: str, key: str) -> Any:
    """`arg(...)`'s `key` for field `name`: from the most derived declaration that sets it (a subclass that
    redeclares a field to change its default or help keeps its base's rules), else None."""
    for klass in cls.__mro__:
        f = getattr(klass, "__dataclass_fields__", {}).get(name)
        if f is not None and f.metadata.get(key) is not None:
            return f.metadata[key]
    return None


def resume_rule(cls: type, name: str) -> str:
    """The `on_resume` rule of field `name`: the most derived declaration that sets one, else REFUSE."""
    return declared(cls, name, "on_resume") or REFUSE


def to_dict(cfg: Any) -> dict[str, Any]:
    """JSON-ready dict of a (possibly nested) dataclass config, without its fields that are not flags (`_name`)."""
    return {k: v for k, v in dataclasses.asdict(cfg).items() if not k.startswith("_")}


def with_given(cfg: T, given: dict[str, Any]) -> T:
    """`cfg` knowing which fields the user set (its `_given` field, where it has one: `TrainConfig`'s)."""
    if "_given" not in {f.name for f in dataclasses.fields(cfg)}:
        return cfg
    return dataclasses.replace(cfg, _given=tuple(sorted(given)))


def from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Inverse of `to_dict`, ignoring unknown keys (so old checkpoints load into newer configs)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in data.items() if k in names})


def check_sampling(temperature: float, top_k: int | None, top_p: float | None, prefix: str = "--") -> None:
    """One-line errors for sampling flags that mean nothing (shared by every command that samples, and by chat's
    /temperature with prefix "/"); nan and inf are refused (inf would sample uniform noise)."""
    if not (math.isfinite(temperature) and temperature >= 0):
        raise UserError(f"{prefix}temperature must be a finite number >= 0, 0 = greedy (got {temperature})")
    if top_k is not None and top_k < 1:
        raise UserError(f"--top-k must be >= 1 (got {top_k}); leave it out (or none) to sample from every token")
    if top_p is not None and not 0 < top_p <= 1:
        raise UserError(f"--top-p must be in (0, 1] (got {top_p}); leave it out (or none) for no nucleus cut")
