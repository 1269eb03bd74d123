"""metrics.jsonl -> loss.png: torn lines, missing keys, resumed steps, extra eval panels, the CLI."""

from __future__ import annotations

import json
import struct

import pytest

from gpt2.cli import main
from gpt2.errors import UserError
from gpt2.plots import _loss_ylim_top, _series, ema, plot_run, read_metrics

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def write_metrics(run_dir, extra_eval: bool = False, torn_tail: bool = True):
    lines = []
    for step in range(50):
        lr = 6e-4 * min(1.0, (step + 1) / 10)
        lines.append({"kind": "train", "step": step, "loss": 10.0 - step * 0.1, "lr": lr, "grad_norm": 1.0,
                      "tokens_per_s": 1000.0, "mfu": None, "time": 0.1 * step})
        if step % 10 == 9:
            ev = {"kind": "eval", "step": step, "val_loss": 10.0 - step * 0.09}
            if extra_eval:
                ev["hellaswag_acc"] = 0.25 + step / 1000
            lines.append(ev)
    text = "".join(json.dumps(r) + "\n" for r in lines)
    if torn_tail:
        text += '{"kind": "train", "step": 50, "lo'  # the trainer was mid-write
    (run_dir / "metrics.jsonl").write_text(text)


@pytest.mark.parametrize("extra_eval", [False, True])
def test_plot_run_writes_a_valid_png(tmp_path, extra_eval):
    write_metrics(tmp_path, extra_eval)
    out = plot_run(tmp_path)
    assert out == tmp_path / "loss.png"
    w, h = png_size(out)
    assert 600 <= w <= 2000 and 300 <= h <= 2000
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # atomic write left no temp file


def test_extra_eval_metrics_get_a_taller_figure(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    write_metrics(a, extra_eval=False)
    write_metrics(b, extra_eval=True)
    assert png_size(plot_run(b))[1] > png_size(plot_run(a))[1]


def test_torn_and_invalid_lines_are_skipped_and_the_latest_line_per_step_wins(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"kind": "train", "step": 0, "loss": 5.0, "lr": 1e-4}\n'
                    '{"kind": "train", "step": 1, "lo\n'          # torn by a crash, then the run resumed
                    '{"kind": "train", "step": 1, "loss": 4.0}\n'  # no lr key: still a loss point
                    '[1, 2]\n'
                    '{"kind": "train", "step": 1, "loss": 3.5, "lr": 2e-4}\n'  # resumed run re-logs step 1
                    '{"kind": "eval", "step": 1, "val_loss": 3.9}\n'
                    '{"kind": "train", "step": 2, "loss')
    records = read_metrics(path)
    assert len(records) == 4
    assert _series(records, "train", "loss") == ([0, 1], [5.0, 3.5])
    assert _series(records, "train", "lr") == ([0, 1], [1e-4, 2e-4])
    assert _series(records, "eval", "val_loss") == ([1], [3.9])
    png_size(plot_run(tmp_path))


def test_ema_is_bias_corrected():
    assert ema([2.0, 2.0, 2.0], span=5) == pytest.approx([2.0, 2.0, 2.0])
    smooth = ema([0.0, 10.0] * 20, span=9)
    assert 3.0 < smooth[-1] < 7.0


def test_a_first_evaluation_without_any_loss_is_drawn(tmp_path):
    """An RL stage evaluates at step 0 (accuracy, reward-model score) before it has any loss to draw."""
    (tmp_path / "metrics.jsonl").write_text('{"kind": "eval", "step": 0, "accuracy": 0.25, "ci_low": 0.2}\n')
    png_size(plot_run(tmp_path))


def test_errors_name_the_file(tmp_path):
    with pytest.raises(UserError, match="metrics.jsonl"):
        plot_run(tmp_path)
    (tmp_path / "metrics.jsonl").write_text('{"kind": "train", "step": 0, "grad_norm": 1.0}\n')
    with pytest.raises(UserError, match="nothing to plot"):
        plot_run(tmp_path)
    with pytest.raises(UserError, match="no such run directory"):
        plot_run(tmp_path / "missing")


def test_cli_plot_with_out(tmp_path, capsys):
    write_metrics(tmp_path)
    out = tmp_path / "figs" / "custom.png"
    main(["plot", str(tmp_path), "--out", str(out)])
    png_size(out)
    assert str(out) in capsys.readouterr().out
    assert not (tmp_path / "loss.png").exists()


def test_cli_plot_error_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["plot", str(tmp_path / "nope")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("gpt2 plot: error:") and "\n" not in err


def test_long_runs_leave_the_initial_loss_spike_out_of_the_y_range():
    steps = list(range(200))
    loss = [11.0 if s < 5 else 3.0 for s in steps]
    top = _loss_ylim_top((steps, loss), ([0, 100, 199], [11.0, 3.2, 3.1]))
    assert 3.2 < top < 6.0  # far below the 11.0 at the start
    assert _loss_ylim_top((steps[:50], loss[:50]), ([], [])) is None
