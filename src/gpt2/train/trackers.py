"""Experiment trackers (`--logger tensorboard wandb`): every record the loop writes to RUN_DIR/metrics.jsonl also
goes to TensorBoard and/or Weights & Biases, at the same step with the same numbers.

Design decisions:
- metrics.jsonl stays the run's own record, always written; a tracker is one more sink of
  `gpt2.train.metrics.MetricsLogger.log`, so no number can reach one and miss the other, and every stage (each
  a Task on the one loop, each config a `TrainConfig`) gets the flag without code of its own.
- Tags: `<kind>/<key>` of each line: `train/loss`, `train/lr`, `train/grad_norm`, `train/tokens_per_s`,
  `train/mfu`, `train/time`, a task's own (`train/pref_acc`, PPO's `train/reward`, ...), `eval/val_loss`,
  `eval/hellaswag_acc`. Every number of a line is a scalar (a bool as 0/1); `kind` and `step` are not, and a null
  (MFU where the card's peak is unknown) is left out, as it has no value at that step.
- The packages are optional (the `trackers` extra): `check_trackers` (run by `TrainConfig.validate`, before any
  work) finds them without importing them; they are imported only when a tracker opens.
- Rank 0 only: the loop opens them where it opens metrics.jsonl.
- Resume. metrics.jsonl keeps its lines up to the checkpoint's step and the loop redoes the steps after it.
  TensorBoard: the same folder (RUN_DIR/tensorboard), opened with `purge_step` = the checkpoint's step + 1, so
  TensorBoard's reader drops whatever an earlier session wrote from there on (the steps being redone); a new run
  (no checkpoint to continue) removes the event files a run that never saved left there, as metrics.jsonl starts
  empty. W&B: the run id lives in RUN_DIR/wandb_id.txt; a resumed session continues that run (`resume="allow"`),
  a new run gets a new id. W&B cannot drop steps it already holds and ignores a step below its last (online it
  starts a resumed run after them): those records are not sent, and one note says so; metrics.jsonl and
  TensorBoard hold the redone values. Offline, W&B does not know the run's steps: each session writes every one.
- The flag takes its trackers space-separated, like every list flag (`--logger tensorboard wandb`); `none`
  alone means metrics.jsonl only, which is how a resumed run turns off the trackers it inherited.
- The end: every tracker is closed where the loop ends, also on an error or a signal's saved stop (TensorBoard
  flushed, the W&B run finished: failed after an error, finished after a saved stop).
- Hyper-parameters: the run's config (config.json's content). TensorBoard: an HParams summary written into the
  run's own folder (`add_hparams` would open a separate sub-run beside it, whose scalars are not the run's) and
  the whole config as a `config` text summary at the session's first step; each session writes both, since
  --resume may change some settings: the text shows each session's, the HParams table the first one written
  (TensorBoard keeps a tag's first metadata). W&B: the run's config, updated by each session.
- W&B's console capture is off: it rewires the process's stdout and stderr, which holds progress bars, and the
  run's numbers are already logged. W&B reads its usual environment (WANDB_MODE=offline, WANDB_ENTITY,
  WANDB_API_KEY, ...); offline runs are written under RUN_DIR/wandb and uploaded later with `wandb sync`.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import secrets
import string
from pathlib import Path
from typing import Any, Protocol

from gpt2.errors import UserError, note
from gpt2.io import write_text_atomic

TRACKERS = ("tensorboard", "wandb")
NO_TRACKER = "none"  # `--logger none`: metrics.jsonl only (turns off a saved run's trackers on --resume)
EXTRA = "pip install 'gpt2-scratch[trackers]'"
TENSORBOARD_DIR = "tensorboard"
WANDB_ID_FILE = "wandb_id.txt"
DEFAULT_WANDB_PROJECT = "gpt2-scratch"
_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}  # tracker -> the package it imports


class Tracker(Protocol):
    def log(self, record: dict[str, Any]) -> None: ...

    def close(self, failed: bool = False) -> None: ...


def tracker_names(values: list[str]) -> list[str]:
    """The trackers that `--logger` values name, in order and once each ([] for `none`); a one-line UserError
    for a name that is no tracker, or `none` beside one."""
    names = list(dict.fromkeys(values))
    for name in names:
        if name not in (*TRACKERS, NO_TRACKER):
            raise UserError(f"--logger {name}: not a tracker; give tensorboard, wandb or both (space-separated), "
                            f"or {NO_TRACKER} for metrics.jsonl alone")
    if NO_TRACKER in names and len(names) > 1:
        raise UserError(f"--logger {' '.join(values)}: {NO_TRACKER} means no tracker; give it alone")
    return [n for n in names if n != NO_TRACKER]


def check_trackers(values: list[str]) -> None:
    """Refuse, in one line and before any work, a `--logger` value that is no tracker or whose package is not
    installed (found without importing it: importing wandb takes seconds)."""
    for name in tracker_names(values):
        if importlib.util.find_spec(_PACKAGES[name]) is None:
            raise UserError(f"--logger {name}: the {_PACKAGES[name]} package is not installed; {EXTRA}")


def scalars(record: dict[str, Any]) -> tuple[int, dict[str, float]]:
    """(step, {tag: value}) of a metrics.jsonl record: each number under `<kind>/<key>` (module docstring)."""
    kind = record.get("kind", "train")
    values = {f"{kind}/{key}": float(value) for key, value in record.items()
              if key not in ("kind", "step") and isinstance(value, (int, float)) and math.isfinite(value)}
    return int(record["step"]), values


def hparams(run_config: dict[str, Any]) -> dict[str, bool | int | float | str]:
    """The run's config as TensorBoard hyper-parameters, which take numbers, text and bools (a list or None as
    its JSON text)."""
    return {k: v if isinstance(v, (bool, int, float, str)) else json.dumps(v) for k, v in run_config.items()}


class TensorBoardTracker:
    """Scalars into RUN_DIR/tensorboard (`tensorboard --logdir runs/` shows each run folder as a run)."""

    def __init__(self, run_dir: Path, run_config: dict[str, Any], resume_step: int | None):
        # optional packages (the trackers extra), imported only by a run that asks for them
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams as hparams_summary

        folder = run_dir / TENSORBOARD_DIR
        if resume_step is None:  # a new run: what a run that never saved a checkpoint left is no history of it
            for old in folder.glob("events.out.tfevents.*"):
                old.unlink()
        # A resumed session writes from the step after its checkpoint: purging from there drops what an earlier
        # session wrote past the checkpoint (the steps redone now), its config text included.
        first = 0 if resume_step is None else resume_step + 1
        self.writer = SummaryWriter(log_dir=str(folder), purge_step=None if resume_step is None else first)
        self.writer.add_text("config", "```json\n" + json.dumps(run_config, indent=2) + "\n```", global_step=first)
        for summary in hparams_summary(hparams(run_config), {"train/loss": None, "eval/val_loss": None}):
            self.writer.file_writer.add_summary(summary, global_step=first)

    def log(self, record: dict[str, Any]) -> None:
        step, values = scalars(record)
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, global_step=step)

    def close(self, failed: bool = False) -> None:
        self.writer.close()  # flushes


class WandbTracker:
    """One W&B run per run folder: its id kept in RUN_DIR/wandb_id.txt, its local files in RUN_DIR/wandb."""

    def __init__(self, run_dir: Path, run_config: dict[str, Any], resume_step: int | None, project: str | None):
        import wandb  # optional (the trackers extra) and seconds to import: only a run that asks for it

        id_file = run_dir / WANDB_ID_FILE
        run_id = _saved_id(id_file) if resume_step is not None else None
        if run_id is None:
            run_id = new_run_id()
            write_text_atomic(id_file, run_id + "\n")
        try:
            self.run = wandb.init(id=run_id, resume="allow", dir=str(run_dir), name=run_dir.name,
                                  project=project or os.environ.get("WANDB_PROJECT") or DEFAULT_WANDB_PROJECT,
                                  settings=wandb.Settings(console="off"))
        except wandb.errors.Error as e:  # not logged in, no network: before any training
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"--logger wandb: {first.rstrip('.')}; or log offline with WANDB_MODE=offline and "
                            "upload later with `wandb sync`") from e
        self.run.config.update(run_config, allow_val_change=True)  # a resumed session's may differ (--resume rule)
        self.unsent: list[int] = []

    def log(self, record: dict[str, Any]) -> None:
        step, values = scalars(record)
        if step < self.run.step:  # W&B holds this step from an earlier session and would ignore it
            self.unsent.append(step)
            return
        self.run.log(values, step=step)

    def close(self, failed: bool = False) -> None:
        if self.unsent:
            note(f"note: W&B run {self.run.id} already held steps {self.unsent[0]}-{self.unsent[-1]} from an "
                 "earlier session; they were not sent again (metrics.jsonl and TensorBoard hold the redone values)")
        self.run.finish(exit_code=1 if failed else 0)


def new_run_id() -> str:
    """A new W&B run id: 8 random lowercase letters and digits, the shape W&B gives its own."""
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


def _saved_id(path: Path) -> str | None:
    try:
        text = path.read_text(encoding="utf-8").strip()
    except OSError:
        return None
    return text or None


class Trackers:
    """The trackers of a run, fed each metrics.jsonl record; closed (flushed) at the end of the session, also
    when it ends with an error or a signal."""

    def __init__(self, trackers: list[Tracker]):
        self.trackers = trackers

    def log(self, record: dict[str, Any]) -> None:
        for tracker in self.trackers:
            tracker.log(record)

    def close(self, failed: bool = False) -> None:
        trackers, self.trackers = self.trackers, []  # once, whoever calls first
        for tracker in trackers:
            tracker.close(failed)


def open_trackers(values: list[str], run_dir: Path, run_config: dict[str, Any], resume_step: int | None,
                  wandb_project: str | None = None) -> Trackers:
    """The trackers `--logger` names, opened for `run_dir`. resume_step: the checkpoint's step a resumed session
    continues from (None: a new run)."""
    trackers = Trackers([])
    try:
        for name in tracker_names(values):
            if name == "tensorboard":
                trackers.trackers.append(TensorBoardTracker(run_dir, run_config, resume_step))
            else:
                trackers.trackers.append(WandbTracker(run_dir, run_config, resume_step, wandb_project))
    except BaseException:
        trackers.close(failed=True)  # those already open: the session ends before it starts
        raise
    return trackers
