"""A run's `metrics.jsonl` drawn as a loss graph (PNG): `plot_run`, which the training loop calls at every
evaluation and `gpt2 plot RUN_DIR` (in `gpt2.commands.plot`) runs by hand.

Design decisions:
- Input is the loop's `RUN_DIR/metrics.jsonl`: `{"kind": "train", "step", "loss", "lr", ...}` lines and
  `{"kind": "eval", "step", "val_loss", ...}` lines. The file is read while the trainer may be appending to
  it, and a crash can leave a torn line in the middle (a resumed run appends after it), so unparseable lines
  and lines without the needed keys are skipped rather than fatal.
- A resumed run re-logs the steps after its last checkpoint; for each step the *latest* line wins, so the
  graph shows the history that the final weights actually went through.
- Panels: train loss (raw in a light colour, plus an exponential moving average with bias correction so the
  start is not dragged towards 0) with val loss points on top; the LR schedule below, sharing the x axis;
  and, only when present, one panel with the other eval metrics (hellaswag_acc, pref_acc, reward, ...).
- Drawn with `matplotlib.figure.Figure` and the Agg canvas directly, never pyplot: no display needed, no
  global figure state, safe to call from the training loop at every eval.
- Written atomically (temp file in the same folder + `os.replace`), so a viewer never sees half a PNG.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from gpt2.errors import UserError
from gpt2.io import atomic_write

# Keys of eval lines that are bookkeeping, not metrics to draw.
_EVAL_SKIP = {"kind", "step", "val_loss", "time"}


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The records of a metrics.jsonl file, in order; unreadable lines are skipped (`metrics_lines`)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such metrics file (a training run writes RUN_DIR/metrics.jsonl)")
    return [rec for _, rec in metrics_lines(path)[0]]


def metrics_lines(path: Path) -> tuple[list[tuple[str, dict]], list[int]]:
    """((text, record) of each good line, numbers of the others). A good line is UTF-8 JSON of an object whose
    "step", where present, is a whole number. Others are a line cut short by a crash (the trainer appends) or a
    hand edit: never fatal to reading, drawing or resuming."""
    good, bad = [], []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8").strip()
                rec = json.loads(text)
            except (UnicodeDecodeError, json.JSONDecodeError):
                bad.append(number)
                continue
            step = rec.get("step", 0) if isinstance(rec, dict) else None
            if isinstance(step, int) and not isinstance(step, bool):
                good.append((text, rec))
            else:
                bad.append(number)
    return good, bad


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _series(records: list[dict], kind: str, key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of `key` in lines of `kind`, sorted by step, the last line for a step winning."""
    by_step: dict[int, float] = {}
    for rec in records:
        if rec.get("kind", "train") != kind or not _is_number(rec.get("step")) or not _is_number(rec.get(key)):
            continue
        by_step[int(rec["step"])] = float(rec[key])
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def ema(values: list[float], span: int | None = None) -> list[float]:
    """Bias-corrected exponential moving average; `span` defaults to ~1/20 of the series (at least 1)."""
    if not values:
        return []
    span = span or max(1, len(values) // 20)
    beta = 1.0 - 2.0 / (span + 1)
    out, avg = [], 0.0
    for i, v in enumerate(values, start=1):
        avg = beta * avg + (1 - beta) * v
        out.append(avg / (1 - beta**i) if beta > 0 else v)
    return out


def _eval_metric_keys(records: list[dict]) -> list[str]:
    keys: dict[str, None] = {}  # ordered set, in first-seen order
    for rec in records:
        if rec.get("kind") == "eval":
            for k, v in rec.items():
                if k not in _EVAL_SKIP and _is_number(v):
                    keys[k] = None
    return list(keys)


def _loss_ylim_top(train: tuple[list[int], list[float]], val: tuple[list[int], list[float]]) -> float | None:
    """Upper y limit that leaves out the first 5% of the steps of a long run (loss ~11 at init would
    otherwise flatten the part of the curve worth reading); None for short runs, which are drawn whole."""
    (ts, tl), (vs, vl) = train, val
    if len(tl) < 100:
        return None
    cut = ts[0] + (ts[-1] - ts[0]) / 20
    rest = [v for s, v in zip(ts, ema(tl)) if s >= cut] + [v for s, v in zip(vs, vl) if s >= cut]
    top, bottom = max(rest), min(tl + vl)
    return top + 0.15 * (top - bottom)


def draw(records: list[dict], out: str | os.PathLike, title: str = "") -> Path:
    """Draw train/val loss, LR and extra eval metrics from metrics records to the PNG `out` (atomically)."""
    # matplotlib is slow to import: only when a graph is drawn, not whenever the loop is imported
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    train_steps, train_loss = _series(records, "train", "loss")
    val_steps, val_loss = _series(records, "eval", "val_loss")
    lr_steps, lr = _series(records, "train", "lr")
    extra = _eval_metric_keys(records)
    if not train_steps and not val_steps and not extra:
        raise UserError(f"nothing to plot for {out}: the metrics have no train 'loss', eval 'val_loss' or other "
                        "eval values")

    heights = [3, 1.3] + ([1.5] if extra else [])
    fig = Figure(figsize=(9, 2.2 * sum(heights) / 1.5), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(heights), 1, sharex=True, gridspec_kw={"height_ratios": heights})

    ax = axes[0]
    if train_steps:
        ax.plot(train_steps, train_loss, color="tab:blue", alpha=0.25, linewidth=0.8, label="train loss")
        ax.plot(train_steps, ema(train_loss), color="tab:blue", linewidth=1.6, label="train loss (smoothed)")
    if val_steps:
        ax.plot(val_steps, val_loss, color="tab:orange", marker="o", markersize=3.5, linewidth=1.2,
                label=f"val loss (last {val_loss[-1]:.4f})")
    if not train_steps and not val_steps:  # an RL stage's first evaluation (accuracy, score) comes before any loss
        ax.text(0.5, 0.5, "no loss values yet", ha="center", va="center", transform=ax.transAxes)
    top = _loss_ylim_top((train_steps, train_loss), (val_steps, val_loss))
    if top is not None:
        ax.set_ylim(top=top)
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    if train_steps or val_steps:
        ax.legend(loc="upper right", fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)

    ax = axes[1]
    if lr_steps:
        ax.plot(lr_steps, lr, color="tab:green", linewidth=1.2)
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    else:
        ax.text(0.5, 0.5, "no learning-rate values", ha="center", va="center", transform=ax.transAxes)
    ax.set_ylabel("learning rate")
    ax.grid(alpha=0.3)

    if extra:
        ax = axes[2]
        for key in extra:
            s, v = _series(records, "eval", key)
            ax.plot(s, v, marker="o", markersize=3, linewidth=1.0, label=f"{key} (last {v[-1]:.4g})")
        ax.set_ylabel("eval metrics")
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=8)
    axes[-1].set_xlabel("step")

    out = Path(out)
    with atomic_write(out, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    return out


def plot_run(run_dir: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Read `run_dir/metrics.jsonl`, draw it to `out` (default `run_dir/loss.png`); returns the PNG path."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: no such run directory")
    metrics = run_dir / "metrics.jsonl"
    records = read_metrics(metrics)
    if not records:
        raise UserError(f"{metrics}: no metrics yet (the file is empty)")
    return draw(records, out or run_dir / "loss.png", title=run_dir.resolve().name)
