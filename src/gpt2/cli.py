"""`gpt2 <command>`: one typed function per command.

Each stage module declares its command with `register(Command(...))`: a name (one or two words, e.g.
"prepare fineweb"), a help line, the dataclass config whose fields become flags, optional named presets,
and the function that takes the filled-in config. This file only lists those modules and builds the
argparse tree from them, so adding a command never touches another command's code.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from gpt2.config import add_dataclass_args, build_config
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
}


def register(cmd: Command) -> Command:
    _REGISTRY[cmd.name] = cmd
    return cmd


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
            sub.add_argument("--preset", choices=sorted(cmd.presets), default=next(iter(cmd.presets)),
                             help=f"named starting config; flags override its fields (default: "
                                  f"{next(iter(cmd.presets))})")
        add_dataclass_args(sub, cmd.config)
        sub.set_defaults(_command=cmd)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    ns = parser.parse_args(argv)
    cmd: Command = ns._command
    try:
        cfg = build_config(cmd.config, ns, cmd.presets)
        cmd.run(cfg)
    except UserError as e:
        print(f"gpt2 {cmd.name}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"\ngpt2 {cmd.name}: interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
