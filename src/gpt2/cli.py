"""`gpt2 <command>`: one typed function per command.

Each stage module declares its command with `register(Command(...))`: a name (one or two words, e.g.
"prepare fineweb"), a help line, the dataclass config whose fields become flags, optional named presets,
and the function that takes the filled-in config. This file only lists those modules and builds the
argparse tree from them, so adding a command never touches another command's code.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from gpt2.config import (
    ANNOUNCE,
    APPLY,
    SESSION,
    add_dataclass_args,
    build_config,
    default_config,
    flag_name,
    resume_rule,
)
from gpt2.errors import UserError

# Modules that register commands, imported when the CLI starts.
COMMAND_MODULES = [
    "gpt2.generate",
    "gpt2.data.fineweb",
    "gpt2.plots",
    "gpt2.evaluate",
    "gpt2.train.pretrain",
    "gpt2.data.alpaca",
    "gpt2.train.finetune",
    "gpt2.data.preferences",
    "gpt2.rlhf.dpo",
    "gpt2.rlhf.reward",
    "gpt2.rlhf.ppo",
    "gpt2.serve.chat",
    "gpt2.serve.server",
    "gpt2.commands.cache",
]


@dataclass
class Command:
    name: str  # "generate" or "prepare fineweb"
    help: str
    config: type
    run: Callable[[Any], Any]
    presets: dict[str, Any] | None = None
    description: str | None = None


_REGISTRY: dict[str, Command] = {}

# Help lines of the two-word command groups.
GROUP_HELP = {
    "prepare": "download or read a dataset and tokenize it (fineweb, alpaca, hh)",
    "eval": "evaluate a model (hellaswag, val-loss)",
    "cache": "the compiled decoding pieces kept on disk (list, remove, build)",
}


def register(cmd: Command) -> Command:
    _REGISTRY[cmd.name] = cmd
    return cmd


def command_name(config: Any) -> str | None:
    """The name of the command whose config `config` is; None for any other object (a library call's plain
    `TrainConfig`, a dict)."""
    return next((name for name, cmd in _REGISTRY.items() if type(config) is cmd.config), None)


def _load_commands() -> dict[str, Command]:
    for mod in COMMAND_MODULES:
        importlib.import_module(mod)
    return _REGISTRY


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gpt2",
        description="GPT-2 from scratch: prepare data, pretrain, fine-tune, align, evaluate and serve.",
    )
    top = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    groups: dict[str, argparse._SubParsersAction] = {}
    for name, cmd in sorted(_load_commands().items()):
        words = name.split()
        if len(words) == 1:
            sub = top.add_parser(name, help=cmd.help, description=cmd.description or cmd.help)
        else:
            group, leaf = words
            if group not in groups:
                text = GROUP_HELP.get(group, f"{group} subcommands")
                gp = top.add_parser(group, help=text, description=text)
                groups[group] = gp.add_subparsers(dest="subcommand", metavar="SUBCOMMAND", required=True)
            sub = groups[group].add_parser(leaf, help=cmd.help, description=cmd.description or cmd.help)
        if cmd.presets:
            # SUPPRESS: on --resume we must know whether it was typed (the saved settings replace it).
            sub.add_argument("--preset", choices=sorted(cmd.presets), default=argparse.SUPPRESS,
                             help=f"named starting config; flags override its fields (default: "
                                  f"{next(iter(cmd.presets))}; ignored on --resume of a saved run)")
        add_dataclass_args(sub, cmd.config, cmd.presets)
        if _resumable(cmd):
            sub.epilog = resume_help(cmd)
        sub.set_defaults(_command=cmd)
    return parser


def _resumable(cmd: Command) -> bool:
    return {"resume", "out"} <= {f.name for f in dataclasses.fields(cmd.config)}


def resume_help(cmd: Command) -> str:
    """The --resume rule of this command's flags, listed from their `on_resume` declarations."""
    names = [f.name for f in dataclasses.fields(cmd.config) if f.name not in ("resume", "out")]
    by_rule = lambda rule: ", ".join(flag_name(n) for n in names if resume_rule(cmd.config, n) == rule)  # noqa: E731
    return (f"--resume: `gpt2 {cmd.name} --out RUN --resume` alone continues RUN with the settings it was saved "
            f"with (RUN/config.json), not the preset's or the defaults. Flags given again with the saved value "
            f"change nothing. A new value of {by_rule(ANNOUNCE)} is applied from the checkpoint's step and printed "
            f"(the LR schedule changes there); {by_rule(APPLY)} just apply; {by_rule(SESSION)} apply to this "
            f"session only; any other flag with a new value is refused (it would change the model, the data "
            f"or the recipe: start a new run with another --out instead).")


def saved_settings(cmd: Command, ns: argparse.Namespace) -> dict[str, Any] | None:
    """On `--resume` of a run that has a checkpoint: its saved settings (printed where they come from), which
    `build_config` uses instead of the preset. None otherwise (no --resume, or nothing saved yet)."""
    if not (_resumable(cmd) and getattr(ns, "resume", False)):
        return None
    from gpt2.train.loop import COMMAND_KEY, check_run_dir, saved_run_config

    out = getattr(ns, "out", None) or default_config(cmd.config, ns, cmd.presets).out
    found = saved_run_config(out)
    if found is None:
        return None
    saved, source = found
    check_run_dir(out, True, cmd.name, made_by=saved.get(COMMAND_KEY))  # another command's run: say whose
    if os.environ.get("RANK", "0") == "0":
        unused = f"; --preset {ns.preset} is not used" if getattr(ns, "preset", None) else ""
        print(f"--resume: continuing {out} with the settings saved in {source}{unused}", flush=True)
    return {**saved, "out": out}


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    ns = parser.parse_args(argv)
    cmd: Command = ns._command
    try:
        cfg = build_config(cmd.config, ns, cmd.presets, saved=saved_settings(cmd, ns))
        cmd.run(cfg)
    except UserError as e:
        print(f"gpt2 {cmd.name}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"\ngpt2 {cmd.name}: interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
