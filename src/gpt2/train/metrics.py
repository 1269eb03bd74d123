"""A run's metrics: RUN_DIR/metrics.jsonl, one JSON object per step and per evaluation (each also sent to the
run's trackers, `gpt2.train.trackers`), and its loss graph."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from gpt2.errors import UserError, note
from gpt2.io import disk_error, make_folder, write_text_atomic
from gpt2.plots import metrics_lines, plot_run
from gpt2.train.trackers import Trackers

METRICS_FILE = "metrics.jsonl"


class MetricsLogger:
    """Appends one JSON object per line to RUN_DIR/metrics.jsonl (rank 0 only), and hands each to `trackers`.
    On resume, lines logged after the checkpoint's step are dropped, so the file always matches the weights."""

    def __init__(self, path: str | os.PathLike, enabled: bool = True, keep_until_step: int | None = None,
                 trackers: Trackers | None = None):
        self.path = Path(path)
        self.enabled = enabled
        self.trackers = trackers or Trackers([])
        if not enabled:
            return
        make_folder(self.path.parent)
        kept = []
        if keep_until_step is not None and self.path.exists():
            good, bad = metrics_lines(self.path)
            kept = [text + "\n" for text, rec in good if rec.get("step", 0) <= keep_until_step]
            if bad:  # a line cut short by a crash, or a hand edit
                note(f"note: {self.path}: dropped {len(bad)} unreadable line(s) (line {bad[0]} first): not UTF-8 "
                     "JSON objects with a whole-number step")
        write_text_atomic(self.path, "".join(kept))

    def log(self, record: dict[str, Any]) -> None:
        if self.enabled:
            try:
                with open(self.path, "a") as f:  # an append: a line cut short by a crash is skipped on reading
                    f.write(json.dumps(record) + "\n")
            except OSError as e:
                raise (disk_error(self.path, e) or e) from e
            self.trackers.log(record)


def plot(run_dir: Path) -> None:
    """Redraw RUN_DIR/loss.png from metrics.jsonl. The graph is a convenience: a failure to draw it (nothing
    logged yet, a full disk, no matplotlib on a GPU box) is reported, never fatal to a run."""
    try:
        plot_run(run_dir)
    except (UserError, OSError, ValueError, ImportError) as e:
        print(f"warning: loss graph not drawn: {e}", file=sys.stderr)
