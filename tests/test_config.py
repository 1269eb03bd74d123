"""Dataclass configs as CLI flags: presets, overrides, optional fields, booleans, lists."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import pytest

from gpt2.config import add_dataclass_args, arg, build_config


@dataclass
class Cfg:
    name: str = arg("a", "a name")
    steps: int = arg(10, "steps")
    epochs: int | None = arg(2, "epochs; none = use steps")
    compile: bool = arg(False, "compile")
    prompts: list[str] = arg(factory=list, help="prompts", positional=True)


PRESETS = {"small": Cfg(steps=5), "big": Cfg(steps=500, compile=True)}


def parse(argv, presets=None):
    p = argparse.ArgumentParser()
    if presets:
        p.add_argument("--preset", default=next(iter(presets)))
    add_dataclass_args(p, Cfg)
    return build_config(Cfg, p.parse_args(argv), presets)


def test_defaults_and_overrides():
    assert parse([]) == Cfg()
    assert parse(["--steps", "3", "--compile", "x", "y"]) == Cfg(steps=3, compile=True, prompts=["x", "y"])


def test_preset_then_flags():
    assert parse([], PRESETS) == Cfg(steps=5)
    assert parse(["--preset", "big", "--no-compile"], PRESETS) == Cfg(steps=500, compile=False)


def test_explicit_none_resets_an_optional_field():
    assert parse(["--epochs", "none"]).epochs is None
    assert parse([]).epochs == 2


def test_every_flag_has_help():
    p = argparse.ArgumentParser()
    add_dataclass_args(p, Cfg)
    assert all(a.help for a in p._actions if a.dest != "help")


def test_bad_value_is_an_argparse_error():
    with pytest.raises(SystemExit):
        parse(["--steps", "many"])


def test_one_meaning_per_dtype_flag_and_the_old_name_still_parses():
    """--dtype is the autocast dtype wherever it is the flag's name; the decoding commands' weights dtype is
    --weights-dtype, with --dtype kept as its alias so that scripts keep working."""
    from gpt2.cli import build_parser

    parser = build_parser()
    for argv in (["serve"], ["chat"], ["cache", "build"]):
        assert parser.parse_args([*argv, "--dtype", "bfloat16"]).weights_dtype == "bfloat16"
        assert parser.parse_args([*argv, "--weights-dtype", "float16"]).weights_dtype == "float16"
    for argv in (["pretrain"], ["finetune"], ["eval", "val-loss"]):
        assert parser.parse_args([*argv, "--dtype", "float16"]).dtype == "float16"


def test_max_tokens_is_new_tokens_wherever_it_is_a_flag_and_the_old_names_still_parse():
    """--max-tokens is the most new tokens per answer (chat, generate, as in the OpenAI API); the corpus size
    limit of `prepare fineweb` is --total-tokens and generate's old --max-steps (training's step count
    elsewhere) is an alias, both kept so that scripts keep working."""
    from gpt2.cli import build_parser

    parser = build_parser()
    for argv in (["generate"], ["chat"]):
        assert parser.parse_args([*argv, "--max-tokens", "9"]).max_tokens == 9
    assert parser.parse_args(["generate", "--max-steps", "9"]).max_tokens == 9
    fineweb = ["prepare", "fineweb", "--out", "x"]
    assert parser.parse_args([*fineweb, "--total-tokens", "9"]).total_tokens == 9
    assert parser.parse_args([*fineweb, "--max-tokens", "9"]).total_tokens == 9
