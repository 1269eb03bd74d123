"""A training run's directory: its saved settings (`config.json`, else the checkpoint's copy), which command made
it, and the rules for using it again: a checkpoint is continued only with `--resume` and only by the command
that made it; on resume, a changed setting is applied and announced or refused by its field's `on_resume`
rule (`gpt2.config`). Every stage checks a `--out` here; `gpt2.train.loop` holds the directory's lock while it
trains.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from gpt2.checkpoint import CHECKPOINT_FILE, load_checkpoint
from gpt2.config import ANNOUNCE, REFUSE, flag_name, resume_rule, same_setting, to_dict
from gpt2.errors import UserError

CONFIG_FILE = "config.json"


def saved_run_config(run_dir: str | os.PathLike) -> tuple[dict[str, Any], Path] | None:
    """The settings of the run in `run_dir` and the file they came from, when it has a checkpoint to resume:
    its config.json (rewritten by every session, so it holds changes announced since the last checkpoint),
    else the checkpoint's own copy. None when there is no checkpoint (`--resume` then starts a new run)."""
    run_dir = Path(run_dir)
    ckpt = run_dir / CHECKPOINT_FILE
    if not ckpt.exists():
        return None
    path = run_dir / CONFIG_FILE
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(saved, dict):
            return saved, path
    except (OSError, ValueError):
        pass  # missing or cut short: the checkpoint has the same settings
    state = load_checkpoint(ckpt)
    saved = state.get("run_config") or state.get("train_config")
    if not isinstance(saved, dict):
        raise UserError(f"{ckpt} holds no saved settings and {path} is missing: cannot resume with them")
    return dict(saved), ckpt


COMMAND_KEY = "command"  # in config.json and the checkpoint's run_config: the command that made the run


def run_command(run_dir: str | os.PathLike) -> str | None:
    """The command that made the run in `run_dir` as its config.json records it; None when not recorded."""
    try:
        saved = json.loads((Path(run_dir) / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return saved.get(COMMAND_KEY) if isinstance(saved, dict) else None


def check_run_dir(run_dir: str | os.PathLike, resume: bool, command: str | None, made_by: str | None = None) -> None:
    """Refuse, in one line, a --out whose checkpoint another command made (naming the run and that command),
    and a checkpoint without --resume. made_by: the recording command when known (default: config.json's)."""
    run_dir = Path(run_dir)
    if not (run_dir / CHECKPOINT_FILE).exists():
        return
    made_by = made_by or run_command(run_dir)
    if made_by and command and made_by != command:
        raise UserError(f"{run_dir} is a `gpt2 {made_by}` run, not a `gpt2 {command}` one: continue it with "
                        f"`gpt2 {made_by} --out {run_dir} --resume`, or choose another --out")
    if not resume:
        raise UserError(f"{run_dir} already holds a checkpoint: pass --resume to continue it, or choose another "
                        "--out")


_SCHEDULE_FIELDS = ("max_steps", "lr", "min_lr", "warmup_steps")


def resume_changes(saved: dict[str, Any], cfg: Any, step: int) -> list[str]:
    """Compare the checkpoint's loop settings with the resumed session's: a REFUSE field that differs is a
    UserError (the optimizer state or data order already holds the saved value, so the new one would be
    silently ignored or make another run); an ANNOUNCE field that differs is returned as one line to print."""
    lines, refused = [], []
    for name, new in to_dict(cfg).items():
        if name not in saved or same_setting(saved[name], new):
            continue
        rule = resume_rule(type(cfg), name)
        if rule == REFUSE:
            refused.append(f"{flag_name(name)} {new!r} (saved: {saved[name]!r})")
        elif rule == ANNOUNCE:
            what = "the LR schedule changes" if name in _SCHEDULE_FIELDS else "applies"
            lines.append(f"--resume: {flag_name(name)} {saved[name]} -> {new} ({what} from step {step})")
    if refused:
        raise UserError(f"--resume: {', '.join(refused)} differs from the checkpoint; drop it to continue the run")
    return lines
