"""`gpt2 <command>`: one explicit table of commands, built into an argparse tree.

Each command is a module of `gpt2.commands` whose `COMMAND` (or, for a group such as `gpt2 cache`,
`COMMANDS`) gives its name (one or two words, e.g. "prepare fineweb"), a help line, the dataclass config whose
fields become flags, optional named presets, and the function that takes the filled-in config. This file is the
only place that lists them; the library never imports it or them.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import sys
from typing import Any

from gpt2.commands import Command
from gpt2.config import (
    ANNOUNCE,
    APPLY,
    SESSION,
    add_dataclass_args,
    build_config,
    default_config,
    flag_name,
    given_fields,
    resume_rule,
)
from gpt2.distributed import end_process, in_job, lost_contact
from gpt2.errors import UserError
from gpt2.train.run_dir import resume_settings, resumed_config

# The command modules (`gpt2 --help` lists their commands by name).
COMMAND_MODULES = [
    "prepare_fineweb", "prepare_alpaca", "prepare_hh", "prepare_task",
    "pretrain", "finetune", "dpo", "reward", "ppo", "grpo",
    "eval", "plot", "generate", "chat", "serve", "cache",
    "export",
]


# Help lines of the two-word command groups.
GROUP_HELP = {
    "prepare": "download or read a dataset and tokenize it (fineweb, alpaca, hh, task, task-pairs)",
    "eval": "evaluate a model (hellaswag, val-loss, task)",
    "cache": "the compiled decoding pieces kept on disk (list, remove, build)",
}


def _load_commands() -> dict[str, Command]:
    """Every command of the table, by name (importing a command module imports the library it runs)."""
    table: dict[str, Command] = {}
    for name in COMMAND_MODULES:
        module = importlib.import_module(f"gpt2.commands.{name}")
        for cmd in getattr(module, "COMMANDS", None) or [module.COMMAND]:
            table[cmd.name] = cmd
    return table


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


def resumed(cmd: Command, ns: argparse.Namespace) -> Any | None:
    """On `--resume` of a run that has a checkpoint: the config from its saved settings and the flags given
    again (`gpt2.train.run_dir`'s rule). None otherwise (no --resume, or nothing saved yet)."""
    if not (_resumable(cmd) and getattr(ns, "resume", False)):
        return None
    out = getattr(ns, "out", None) or default_config(cmd.config, ns, cmd.presets).out
    saved = resume_settings(out, cmd.name, getattr(ns, "preset", None), cmd.config)
    return None if saved is None else resumed_config(cmd.config, saved, given_fields(cmd.config, ns))


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    ns = parser.parse_args(argv)
    cmd: Command = ns._command
    code = 0
    try:
        cfg = resumed(cmd, ns) or build_config(cmd.config, ns, cmd.presets)
        cmd.run(cfg)
    except UserError as e:
        print(f"gpt2 {cmd.name}: error: {e}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print(f"\ngpt2 {cmd.name}: interrupted", file=sys.stderr)
        code = 130
    except SystemExit as e:  # a signal's exit after its checkpoint (143)
        if not in_job():
            raise
        code = e.code if isinstance(e.code, int) else 1
    except Exception as e:  # a torchrun worker whose job lost a process: one line, not a traceback
        if (line := lost_contact(e)) is None:
            raise
        print(f"gpt2 {cmd.name}: error: {line}", file=sys.stderr)
        code = 1
    if in_job():  # a torchrun worker: see `end_process`
        end_process(code)
    if code:
        sys.exit(code)


if __name__ == "__main__":
    main()
