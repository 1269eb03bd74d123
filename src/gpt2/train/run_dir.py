"""A training run's directory and the rule for using it again; every training stage goes through here.

RUN_DIR holds `checkpoint.pt` (the full training state), `config.json` (the run's settings and the command that
made it), `model/` (the Hugging Face export), `metrics.jsonl`, `loss.png` and `run.lock`.

- The lock: one run per directory (`run_lock`, an flock the kernel drops however the holder ends), taken before
  the first write; a second run on the same --out is refused at its start.
- A checkpoint is continued only with `--resume`, and only by the command that made it (`check_run_dir`).
- The resume rule. `--resume` alone continues with the saved settings (`resume_settings`, which the CLI uses
  instead of the preset). A flag given again applies by the rule its field declares (`gpt2.config.arg`'s
  `on_resume`), each with one message: SESSION flags apply to this session only; APPLY flags apply; ANNOUNCE
  flags (the schedule) apply from the checkpoint's step and are printed (`resume_changes`); a REFUSE flag with a
  new value is an error naming every such flag (`check_refused`), whether it came from the command line
  (`resumed_config`) or from a library caller's config (the loop checks the checkpoint's own copy).
- Across machines, every process reads RUN_DIR from its own machine's disk (the CLI its config.json; on --resume
  the loop its checkpoint.pt, which holds each rank's data position and RNG state beside the weights), while only
  global rank 0 writes it. So RUN_DIR must be on storage the machines share, or copied to each before --resume;
  `check_same_run` refuses, on every rank in one line, a job whose processes see different checkpoints or were
  started with different settings (one machine resuming while another starts afresh would train on silently).
  Reading rather than broadcasting from rank 0 keeps a resume from sending the whole state over the network.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import types
import typing
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from gpt2.checkpoint import CHECKPOINT_FILE, MODEL_DIR, load_checkpoint
from gpt2.config import ANNOUNCE, REFUSE, SESSION, check_values, flag_name, resume_rule, to_dict, with_given
from gpt2.distributed import DistInfo, all_gather_object
from gpt2.errors import UserError, as_json
from gpt2.io import dir_lock, make_folder, remove_temp_files, stored_sha256, write_json_atomic

T = TypeVar("T")

CONFIG_FILE = "config.json"
COMMAND_KEY = "command"  # in config.json and the checkpoint's run_config: the command that made the run


def checkpoint_path(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / CHECKPOINT_FILE


@contextmanager
def run_lock(run_dir: str | os.PathLike) -> Iterator[Path]:
    """Hold RUN_DIR/run.lock for the block, or raise a one-line UserError naming the process that holds it.
    Re-entrant in one process (a stage that writes before the loop takes it first). Holding it, nothing else
    writes RUN_DIR: the temporary files of a save that a killed run left (there and in its model/) go."""
    with dir_lock(run_dir, "run.lock") as path:
        for folder in (Path(run_dir), Path(run_dir) / MODEL_DIR):
            remove_temp_files(folder)
        yield path


def write_run_config(run_dir: str | os.PathLike, run_config: dict[str, Any]) -> None:
    """RUN_DIR/config.json, rewritten by every session (so it holds what was announced since the checkpoint)."""
    make_folder(run_dir)
    write_json_atomic(Path(run_dir) / CONFIG_FILE, run_config)


def saved_run_config(run_dir: str | os.PathLike) -> tuple[dict[str, Any], Path] | None:
    """The settings of the run in `run_dir` and the file they came from: its config.json, else (missing or cut
    short) the checkpoint's own copy. A run killed before its first checkpoint has config.json alone: its
    settings still apply. None when the folder holds neither (`--resume` then starts a new run)."""
    ckpt = checkpoint_path(run_dir)
    path = Path(run_dir) / CONFIG_FILE
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(saved, dict):
            return saved, path
    except (OSError, ValueError):
        pass  # missing or cut short: the checkpoint has the same settings
    if not ckpt.exists():
        if path.exists():
            raise UserError(f"{path} is not a JSON object of settings and there is no checkpoint to read them "
                            "from: cannot resume with them; start a new run with another --out")
        return None
    state = load_checkpoint(ckpt)
    saved = state.get("run_config") or state.get("train_config")
    if not isinstance(saved, dict):
        raise UserError(f"{ckpt} holds no saved settings and {path} is missing: cannot resume with them")
    return dict(saved), ckpt


def check_saved_settings(cls: type, saved: dict[str, Any], source: Path) -> None:
    """Each saved setting that is a field of `cls` has that field's type (a hand-edited config.json with
    `"lr": "fast"` is one line naming the file and the field, not a traceback deep in the loop)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in saved and not _fits(hints[f.name], saved[f.name]):
            raise UserError(f"{source}: setting {f.name!r} is {saved[f.name]!r}, not {_type_text(hints[f.name])}; "
                            "fix the file or start a new run with another --out")


def _fits(tp: Any, value: Any) -> bool:
    """Whether a JSON value has type `tp` (int | None, float, str, bool, list[str], tuple[float, float], ...)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(a, value) for a in args)
    if tp is type(None):
        return value is None
    if origin in (list, tuple):
        inner = args[0] if args else Any
        return isinstance(value, list) and all(_fits(inner, v) for v in value)
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return tp is Any or isinstance(value, tp)


def _type_text(tp: Any) -> str:
    return {int: "an integer", float: "a number", str: "text", bool: "true or false"}.get(tp, f"of type {tp}")


def run_command(run_dir: str | os.PathLike) -> str | None:
    """The command that made the run in `run_dir` as its config.json records it; None when not recorded."""
    try:
        saved = json.loads((Path(run_dir) / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return saved.get(COMMAND_KEY) if isinstance(saved, dict) else None


def check_maker(run_dir: str | os.PathLike, made_by: str | None, command: str | None) -> None:
    """Refuse, in one line, to continue a run that another command made, naming that command."""
    if made_by and command and made_by != command:
        raise UserError(f"{run_dir} is a `gpt2 {made_by}` run, not a `gpt2 {command}` one: continue it with "
                        f"`gpt2 {made_by} --out {run_dir} --resume`, or choose another --out")


def check_run_dir(run_dir: str | os.PathLike, resume: bool, command: str | None, made_by: str | None = None) -> None:
    """Refuse, in one line, a --out whose checkpoint another command made (naming the run and that command),
    and a checkpoint without --resume. made_by: the recording command when known (default: config.json's)."""
    run_dir = Path(run_dir)
    if not checkpoint_path(run_dir).exists():
        return
    check_maker(run_dir, made_by or run_command(run_dir), command)
    if not resume:
        raise UserError(f"{run_dir} already holds a checkpoint: pass --resume to continue it, or choose another "
                        "--out")


def resume_checkpoint(run_dir: str | os.PathLike, resume: bool, command: str | None, world_size: int,
                      ) -> dict[str, Any] | None:
    """The checkpoint to continue (None: a new run), after the one-line refusals: another command's run, a
    checkpoint without --resume, another number of processes."""
    check_run_dir(run_dir, resume, command)
    path = checkpoint_path(run_dir)
    if not (resume and path.exists()):
        return None
    state = load_checkpoint(path)
    check_run_dir(run_dir, True, command, made_by=(state.get("run_config") or {}).get(COMMAND_KEY))
    if state.get("world_size", 1) != world_size:
        raise UserError(f"{path} was written by {state['world_size']} processes; resume it with the same number "
                        f"(now {world_size})")
    return state


def check_same_run(run_dir: str | os.PathLike, run_config: dict[str, Any], dist: DistInfo) -> None:
    """Under torchrun, refuse a job whose processes do not see the same run: another checkpoint.pt in RUN_DIR (or
    none) on some machine, or other settings (another command line). One all-gather, on every rank at the start
    of training; a difference is the same one-line error on each rank, naming ranks and hosts."""
    if not dist.is_distributed:
        return
    path = checkpoint_path(run_dir)
    found = (stored_sha256(path) or f"{path.stat().st_size} bytes") if path.is_file() else None
    everyone = all_gather_object((socket.gethostname(), found, run_config))
    hosts = [host for host, _, _ in everyone]
    seen = _by_value([ckpt for _, ckpt, _ in everyone], hosts)
    if len(seen) > 1:
        where = "; ".join(f"{who}: {f'sha256 {ckpt[:12]}' if ckpt else 'none'}" for ckpt, who in seen)
        raise UserError(f"--out {run_dir}: the processes of this job do not see the same {path.name} ({where}); "
                        "every machine reads the run folder at the same path: keep it on storage they share, or "
                        "copy it to each machine before --resume")
    names = sorted({name for _, _, settings in everyone for name in settings})
    differ = []
    for name in names:
        values = _by_value([settings.get(name, "(not set)") for _, _, settings in everyone], hosts)
        if len(values) > 1:
            label = "the command" if name == COMMAND_KEY else flag_name(name)
            differ.append(f"{label} " + ", ".join(f"{as_json(v)} on {who}" for v, who in values))
    if differ:
        raise UserError(f"the processes of this job were started with different settings ({'; '.join(differ[:3])}"
                        f"{'; ...' if len(differ) > 3 else ''}): run the same command on every machine")


def _by_value(values: list[Any], hosts: list[str]) -> list[tuple[Any, str]]:
    """Each distinct value of the ranks' `values`, in rank order, with who holds it: "ranks 0-7 (node-a)"."""
    groups: dict[str, list[int]] = {}
    for rank, value in enumerate(values):
        groups.setdefault(json.dumps(value, sort_keys=True, default=str), []).append(rank)
    return [(values[ranks[0]], f"{_ranks_text(ranks)} ({', '.join(dict.fromkeys(hosts[r] for r in ranks))})")
            for ranks in groups.values()]


def _ranks_text(ranks: list[int]) -> str:
    """[3] -> "rank 3"; [0, 1, 2, 5] -> "ranks 0-2, 5"."""
    spans: list[list[int]] = []
    for r in ranks:
        if spans and r == spans[-1][1] + 1:
            spans[-1][1] = r
        else:
            spans.append([r, r])
    text = ", ".join(f"{a}-{b}" if b > a else f"{a}" for a, b in spans)
    return f"rank {text}" if len(ranks) == 1 else f"ranks {text}"


def resume_settings(out: str, command: str, preset: str | None, cls: type) -> dict[str, Any] | None:
    """On `--resume` of a run that has saved settings (a checkpoint, or config.json alone when it was killed
    before its first one): those settings (printed where they come from, checked against the fields of the
    command's config `cls`), to use instead of the preset. None when there is nothing saved yet."""
    found = saved_run_config(out)
    if found is None:
        return None
    saved, source = found
    check_maker(out, saved.get(COMMAND_KEY), command)  # another command's run: say whose
    check_saved_settings(cls, saved, source)
    if os.environ.get("RANK", "0") == "0":
        unused = f"; --preset {preset} is not used" if preset else ""
        print(f"--resume: continuing {out} with the settings saved in {source}{unused}", flush=True)
    return {**saved, "out": out}


def same_setting(a: Any, b: Any) -> bool:
    """Equal as saved in JSON (tuples come back as lists; "runs/x/" and "runs/x" name one folder)."""
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return list(a) == list(b)
    if isinstance(a, str) and isinstance(b, str):
        return os.path.normpath(a) == os.path.normpath(b)
    return a == b


def check_refused(cls: type, saved: dict[str, Any], values: dict[str, Any]) -> None:
    """The one refusal: REFUSE fields of `cls` whose value in `values` differs from `saved`, all named."""
    refused = [f"{flag_name(k)} {v!r} (saved: {saved[k]!r})" for k, v in values.items()
               if k in saved and resume_rule(cls, k) == REFUSE and not same_setting(v, saved[k])]
    if refused:
        raise UserError(f"--resume: {', '.join(refused)} would change the saved run's model, data or recipe; "
                        "drop these flags to continue it, or start a new run with another --out")


def resumed_config(cls: type[T], saved: dict[str, Any], given: dict[str, Any]) -> T:
    """The saved run's config with the flags `given` on resume applied by their rule: SESSION fields start
    from the class default (a saved --stop-at-step must not end the resumed session at once), APPLY and
    ANNOUNCE values apply (the loop announces schedule changes), a REFUSE one with a new value is refused."""
    defaults = cls()
    names = {f.name for f in dataclasses.fields(cls)}
    base = {**to_dict(defaults), **{k: v for k, v in saved.items() if k in names}}
    for name in names:
        if resume_rule(cls, name) == SESSION:
            base[name] = getattr(defaults, name)
    check_refused(cls, base, given)
    cfg = with_given(dataclasses.replace(dataclasses.replace(defaults, **base), **given), given)
    check_values(cfg)
    return cfg


_SCHEDULE_FIELDS = ("max_steps", "lr", "min_lr", "warmup_steps")


def resume_changes(saved: dict[str, Any], cfg: Any, step: int) -> list[str]:
    """The loop's settings against the checkpoint's copy `saved`: a changed REFUSE field is refused
    (`check_refused`: the optimizer state or data order already holds the saved value), a changed ANNOUNCE
    field is returned as one line to print."""
    values = to_dict(cfg)
    check_refused(type(cfg), saved, values)
    lines = []
    for name, new in values.items():
        if name in saved and not same_setting(saved[name], new) and resume_rule(type(cfg), name) == ANNOUNCE:
            what = "the LR schedule changes" if name in _SCHEDULE_FIELDS else "applies"
            lines.append(f"--resume: {flag_name(name)} {saved[name]} -> {new} ({what} from step {step})")
    return lines
