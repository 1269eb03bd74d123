"""bench/gpu_check.py without a GPU: every section's data and batch arithmetic at the GPU's real sizes, the time
plan, a tiny CPU dry run with results written per section and `--rerun-failed`, and the kill of a section's
whole process tree."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "gpu_check.py"


@pytest.fixture(scope="module")
def gc():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = mod  # its dataclasses look their module up
    spec.loader.exec_module(mod)
    yield mod
    sys.modules.pop("gpu_check", None)


def args_for(shared_data: Path, dry_run: bool) -> argparse.Namespace:
    return argparse.Namespace(dry_run=dry_run, device="cpu" if dry_run else "cuda", out=None,
                              text=str(shared_data / "tinyshakespeare.txt"))


def test_every_section_fits_at_the_gpu_sizes(gc, shared_data, tokenizer_ok, tmp_path):
    names = [s.name for s in gc.SECTIONS]
    checked = gc.check_sizes(args_for(shared_data, False), tmp_path, names)
    assert {n: r["ok"] for n, r in checked.items()} == dict.fromkeys(names, True), checked
    text = {n: r["summary"] for n, r in checked.items()}
    # the curve: several steps an epoch, and its val batch is the whole val split (33 windows, 32 in a batch)
    assert "32,768 tokens/step" in text["curve"] and "(9 steps/epoch)" in text["curve"]
    assert "val every 9: 1 x 32 x 1024 of 33 windows" in text["curve"]
    assert "65,536 tokens/step" in text["speed-64-compiled"] and "(4 steps/epoch)" in text["speed-64-compiled"]
    assert "1 save(s) of 1.49 GB + HF export 0.50 GB" in text["resume"]  # the only 124M checkpoint of the call
    assert "save" not in text["speed-32-compiled"] and "save" not in text["curve"]


def test_the_time_plan_fits_the_call(gc):
    assert gc.DEFAULT_BUDGET <= 9 * 60 - 25  # the command ends within 9 minutes, with a margin to kill a section
    assert sum(s.expected for s in gc.SECTIONS) <= gc.DEFAULT_BUDGET - 20  # the size check and start-up
    assert all(s.expected < s.box or s.needs for s in gc.SECTIONS)
    names = [s.name for s in gc.SECTIONS]
    assert names[:3] == ["parity", "matmul", "speed-32-compiled"]  # what matters most comes first


def test_a_size_error_shows_in_the_check(gc, shared_data, tokenizer_ok, tmp_path, monkeypatch):
    real = gc.sizes
    monkeypatch.setattr(gc, "sizes", lambda args: {**real(args), "T": 2048})  # longer than the block
    checked = gc.check_sizes(args_for(shared_data, False), tmp_path, ["speed-32-eager", "parity"])
    assert not checked["speed-32-eager"]["ok"] and "--seq-len 2048 exceeds --block-size 1024" in \
        checked["speed-32-eager"]["error"]
    assert checked["parity"]["ok"]


def test_tiny_sizes_check_too(gc, shared_data, tokenizer_ok, tmp_path):
    checked = gc.check_sizes(args_for(shared_data, True), tmp_path, [s.name for s in gc.SECTIONS])
    assert all(r["ok"] for r in checked.values()), checked


def test_derived_checks(gc):
    results = {"speed-32-eager": {"ok": True, "losses": [10.9, 10.5, 10.0], "achieved_tflops": 100.0,
                                  "step_s": 0.2, "summary": "eager"},
               "speed-32-compiled": {"ok": True, "losses": [10.9, 10.51, 10.0], "achieved_tflops": 300.0,
                                     "step_s": 0.1, "summary": "compiled"},
               "matmul": {"ok": True, "tflops": 600.0}, "bare-32": {"ok": True, "bare_step_s": 0.09, "summary": "b"}}
    gc.derive(results)
    gc.derive(results)  # idempotent: summaries are not extended twice
    assert results["compile"]["ok"] and results["compile"]["max_abs_diff"] == pytest.approx(0.01)
    assert results["speed-32-compiled"]["mfu_measured"] == 0.5
    assert results["speed-32-compiled"]["summary"] == "compiled | 50.0% of measured 600"
    assert results["bare-32"]["outside_fwd_bwd_opt"] == pytest.approx(0.1)
    results["speed-32-compiled"]["losses"][2] = 9.0  # a wrong graph
    gc.derive(results)
    assert not results["compile"]["ok"]


def run_script(*argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    return subprocess.run([sys.executable, str(SCRIPT), *argv], capture_output=True, text=True, env=env,
                          timeout=300, cwd=REPO)


def test_dry_run_writes_per_section_and_reruns_only_what_failed(shared_data, tokenizer_ok, tmp_path):
    first = tmp_path / "first"
    proc = run_script("--dry-run", "--only", "matmul", "--out", str(first))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    done = json.loads((first / "results.json").read_text())
    assert done["sections"]["matmul"]["ok"] and "matmul" in (first / "table.txt").read_text()
    # a call that lost parity and matmul: --rerun-failed runs again what was not ok, keeps the rest
    done["sections"]["matmul"] = {"ok": False, "status": "TIMEOUT", "summary": "over its box"}
    done["sections"]["parity"] = {"ok": True, "summary": "kept from the first call", "seconds": 1}
    (first / "results.json").write_text(json.dumps(done))
    second = tmp_path / "second"
    proc = run_script("--dry-run", "--only", "parity,matmul", "--rerun-failed", str(first / "results.json"),
                      "--out", str(second))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    merged = json.loads((second / "results.json").read_text())["sections"]
    assert merged["matmul"]["ok"] and merged["parity"]["summary"] == "kept from the first call"
    log = (second / "gpu_check.log").read_text()
    assert "===== matmul" in log and "===== parity" not in log


def test_kill_tree_reaches_a_worker_in_its_own_session(gc):
    # torchrun starts its workers with start_new_session: killing the launcher's group alone would leave them
    code = ("import subprocess, sys, time\n"
            "w = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'], start_new_session=True)\n"
            "print(w.pid, flush=True)\n"
            "time.sleep(120)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, start_new_session=True)
    worker = int(proc.stdout.readline())
    assert gc._alive(worker)
    gc.kill_tree(proc, grace=5.0)
    assert proc.poll() is not None and not gc._alive(worker)
