"""Helpers of the tests that run `gpt2` under torchrun: the launch itself (one machine, or one of two "machines"
on 127.0.0.1), a run's metrics, and the comparison of a run's per-step losses with one process's."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

# fp32: the sums are the same up to where they are taken (ranks, shards), so float32 rounding over a few steps.
# fp16: autocast's float16 products carry 11 bits, so a different order of sums moves the loss in the 4th digit.
TOLERANCE = {"float32": 1e-5, "float16": 2e-3}


def torchrun_command(launcher: list[str], argv: list[str]) -> list[str]:
    """`python -m torch.distributed.run LAUNCHER -m gpt2 ARGV` (torchrun as this interpreter runs it)."""
    return [sys.executable, "-m", "torch.distributed.run", *launcher, "-m", "gpt2", *argv]


def torchrun_env() -> dict[str, str]:
    """One thread per rank: tiny models gain nothing from more, and ranks' threads would fight for the cores."""
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def torchrun(argv: list[str], cwd: Path) -> None:
    """`torchrun --standalone --nproc_per_node 2 -m gpt2 ARGV`, one thread per rank; fails the test with the
    ranks' output when it fails."""
    cmd = torchrun_command(["--standalone", "--nproc_per_node", "2"], argv)
    done = subprocess.run(cmd, cwd=cwd, env=torchrun_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Traceback" not in done.stderr and "returned a view" not in done.stderr, done.stderr[-3000:]


def metrics(run: Path, kind: str, key: str) -> list[float]:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r[key] for r in lines if r["kind"] == kind]


def same_run(one: Path, two: Path, dtype: str, steps: int) -> None:
    """Two ranks' run equals one process's: per-step losses and, under fp16, the skipped steps."""
    a, b = metrics(one, "train", "loss"), metrics(two, "train", "loss")
    assert len(a) == steps and b == pytest.approx(a, abs=TOLERANCE[dtype])
    if dtype == "float16":
        assert metrics(two, "train", "skipped") == metrics(one, "train", "skipped")
    if metrics(one, "eval", "val_loss"):
        assert metrics(two, "eval", "val_loss") == pytest.approx(metrics(one, "eval", "val_loss"),
                                                                 abs=TOLERANCE[dtype])


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on now (the kernel's pick for port 0)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_tree(pid: int) -> list[int]:
    """`pid` and every process below it (torchrun starts its workers in sessions of their own, so killing the
    launcher's process group would leave them running). Linux: read from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # ended meanwhile
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo.extend(children.get(p, []))
    return tree


def signal_tree(pid: int, signum: int = signal.SIGKILL) -> None:
    """Send `signum` to `pid` and every process below it, as if their machine died (SIGKILL) or froze (SIGSTOP)."""
    for p in process_tree(pid):
        try:
            os.kill(p, signum)
        except ProcessLookupError:
            pass  # ended meanwhile
