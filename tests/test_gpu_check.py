"""bench/gpu_check.py (the runner) and bench/gpu_check_sections.py (the sections) without a GPU: every section's
data and batch arithmetic at the GPU's real sizes, the time plan, the table's dispatch, a tiny CPU dry run with
results written per section and `--rerun-failed`, the checks derived from other sections' results, the --text
flag's error, and the kill of a section's process group."""

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
SECTIONS_FILE = REPO / "bench" / "gpu_check_sections.py"


@pytest.fixture(scope="module")
def gc():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = mod  # its dataclasses look their module up
    spec.loader.exec_module(mod)  # imports gpu_check_sections, beside it
    yield mod
    sys.modules.pop("gpu_check", None)
    sys.modules.pop("gpu_check_sections", None)


@pytest.fixture(scope="module")
def gs(gc):
    """The sections module the runner imported."""
    return sys.modules["gpu_check_sections"]


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
    # the memory plans at the GPU's sizes, each within the smaller card (else the trainer refuses the run there)
    assert "plans b32 28.74, b32+ckpt 19.93, b64 55.49, b64+ckpt 37.88 GB, each within 83.3 GB" in text["memory"]
    assert "3 steps" in text["memory"] and "save" not in text["memory"]
    assert text["fp16"].startswith(text["speed-32-eager"].split("; logits")[0])  # the run fp16 is compared with
    assert "losses of the first 10 steps" in text["fp16"] and "save" not in text["fp16"]


def test_the_time_plan_fits_the_call(gc):
    assert gc.DEFAULT_BUDGET <= 9 * 60 - 25  # the command ends within 9 minutes, with a margin to kill a section
    assert all(s.expected < s.box or s.needs for s in gc.SECTIONS)
    names = [s.name for s in gc.SECTIONS]
    assert names[:3] == ["parity", "matmul", "speed-32-compiled"]  # what matters most comes first
    assert names.index("curve") < names.index("memory") < names.index("fp16") < names.index("resume")
    # at the expected times only the least important sections, the last ones, are left for --rerun-failed
    started, skipped = gc.time_plan(names)
    assert skipped == ["bare-32", "speed-64-eager"]
    assert started + skipped == [n for n in names if not gc.BY_NAME[n].needs]
    assert sum(gc.BY_NAME[n].expected for n in started) <= gc.DEFAULT_BUDGET - gc.START_OVERHEAD


def test_a_section_that_no_longer_fits_is_skipped_unstarted(gc, tmp_path):
    args = argparse.Namespace(dry_run=False, device="cuda", text="t", out=None)
    left = gc.BY_NAME["memory"].expected + 4 + (gc.time.time() - gc.T_START)  # 1 s short of the rule
    with open(tmp_path / "log", "w") as log:
        res = gc.run_child(gc.BY_NAME["memory"], args, tmp_path, tmp_path, {}, log, budget=left)
    assert res["status"] == "skipped" and "--rerun-failed" in res["summary"] and res["seconds"] == 0


def test_only_adds_what_a_check_compares_with_unless_held(gc, tmp_path):
    def select(only, rerun=None):
        return gc.select(argparse.Namespace(only=only, rerun_failed=rerun))

    assert select("fp16") == ["speed-32-eager", "fp16"]
    assert select("compile") == ["speed-32-compiled", "speed-32-eager", "compile"]
    previous = tmp_path / "results.json"
    previous.write_text(json.dumps({"sections": {"speed-32-eager": {"ok": True}, "fp16": {"ok": False}}}))
    assert select("fp16", str(previous)) == ["fp16"]  # compared with the earlier call's eager losses


def test_a_size_error_shows_in_the_check(gc, gs, shared_data, tokenizer_ok, tmp_path, monkeypatch):
    real = gs.sizes
    monkeypatch.setattr(gs, "sizes", lambda args: {**real(args), "T": 2048})  # longer than the block
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
    results["speed-32-eager"]["tokens_per_s"] = 1000.0
    gc.derive(results)
    gc.derive(results)  # idempotent: summaries are not extended twice
    assert results["compile"]["ok"] and results["compile"]["max_abs_diff"] == pytest.approx(0.01)
    assert results["speed-32-compiled"]["mfu_measured"] == 0.5
    assert results["speed-32-compiled"]["summary"] == "compiled | 50.0% of measured 600"
    assert results["bare-32"]["outside_fwd_bwd_opt"] == pytest.approx(0.1)
    results["speed-32-compiled"]["losses"][2] = 9.0  # a wrong graph
    gc.derive(results)
    assert not results["compile"]["ok"]


def fp16_result(losses: list[float], skipped_at: list[int]) -> dict:
    return {"ok": True, "run_ok": True, "losses": losses, "skipped_at": skipped_at, "tokens_per_s": 900.0,
            "summary": "fp16"}


def test_fp16_is_compared_with_bf16_up_to_its_first_skipped_step(gc):
    bf16 = {"ok": True, "losses": [10.9, 10.5, 10.0, 9.6], "tokens_per_s": 1000.0}
    results = {"speed-32-eager": bf16, "fp16": fp16_result([10.9, 10.51, 10.02, 9.59], [])}
    gc.derive(results)
    gc.derive(results)
    fp16 = results["fp16"]
    assert fp16["ok"] and fp16["steps_compared"] == 4 and fp16["max_abs_diff_vs_bf16"] == pytest.approx(0.02)
    assert fp16["tokens_per_s_vs_bf16"] == pytest.approx(0.9)
    assert fp16["summary"] == "fp16 | first 4 steps: max |fp16 - bf16| loss 2.00e-02 (<= 0.05); 0.90x bf16's tok/s"
    # step 2 skipped: its loss still compares, the next ones are a step behind and do not
    results["fp16"] = fp16_result([10.9, 10.5, 10.5, 10.0], [2])
    gc.derive(results)
    assert results["fp16"]["ok"] and results["fp16"]["steps_compared"] == 2
    results["fp16"] = fp16_result([10.9, 10.7, 10.2, 9.7], [])  # a wrong update
    gc.derive(results)
    assert not results["fp16"]["ok"]
    del results["speed-32-eager"]  # nothing to compare with: not a pass
    results["fp16"] = fp16_result([10.9, 10.5], [])
    gc.derive(results)
    assert not results["fp16"]["ok"] and "speed-32-eager did not run" in results["fp16"]["summary"]


def test_memory_plans_meet_the_compiled_peaks(gc, gs):
    rows = [{"micro_batch": 32, "checkpointing": False, "plan_bytes": 30e9},
            {"micro_batch": 32, "checkpointing": True, "plan_bytes": 20e9}]
    results = {"memory": {"ok": True, "rows": rows, "summary": "eager"},
               "speed-32-compiled": {"ok": True, "micro_batch": 32, "peak_mem_bytes": 25e9}}
    gc.derive(results)
    gc.derive(results)
    (compiled,) = results["memory"]["compiled_peaks"]
    assert compiled["ratio"] == pytest.approx(1.2) and not compiled["within"]
    assert results["memory"]["summary"] == "eager | compiled plan/real: b32 1.20"
    saved = gs.checkpointing_savings([{**r, "label": "b32", "real_bytes": b} for r, b in zip(rows, (32e9, 16e9))])
    assert saved == [{"label": "b32", "micro_batch": 32, "real": 0.5, "plan": pytest.approx(1 / 3)}]


def run_script(*argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    return subprocess.run([sys.executable, str(SCRIPT), *argv], capture_output=True, text=True, env=env,
                          timeout=300, cwd=REPO)


def test_dry_run_writes_per_section_and_reruns_only_what_failed(shared_data, tokenizer_ok, tmp_path):
    first = tmp_path / "first"
    text = str(shared_data / "tinyshakespeare.txt")
    proc = run_script("--dry-run", "--only", "memory,fp16", "--text", text, "--out", str(first))  # + speed-32-eager
    assert proc.returncode == 0, proc.stdout + proc.stderr
    done = json.loads((first / "results.json").read_text())
    assert list(done["sections"]) == ["speed-32-eager", "memory", "fp16"]
    assert all(r["ok"] for r in done["sections"].values()) and "fp16" in (first / "table.txt").read_text()
    check_memory_and_fp16(done["sections"], (first / "gpu_check.log").read_text())
    # a call that lost parity and matmul: --rerun-failed runs again what was not ok, keeps the rest
    done["sections"]["matmul"] = {"ok": False, "status": "TIMEOUT", "summary": "over its box"}
    done["sections"]["parity"] = {"ok": True, "summary": "kept from the first call", "seconds": 1}
    (first / "results.json").write_text(json.dumps(done))
    second = tmp_path / "second"
    proc = run_script("--dry-run", "--only", "parity,matmul", "--rerun-failed", str(first / "results.json"),
                      "--text", text, "--out", str(second))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    merged = json.loads((second / "results.json").read_text())["sections"]
    assert merged["matmul"]["ok"] and merged["parity"]["summary"] == "kept from the first call"
    assert merged["fp16"] == done["sections"]["fp16"] and merged["memory"]["ok"]  # kept, derived again alike
    log = (second / "gpu_check.log").read_text()
    assert "===== matmul" in log and "===== parity" not in log


def check_memory_and_fp16(sections: dict, log: str) -> None:
    """The new sections' results on the dry run: the plans (the trainer's own lines) with no CUDA peak, and
    fp16's run compared with the bf16 one."""
    memory = sections["memory"]
    assert [(r["label"], r["micro_batch"], r["checkpointing"]) for r in memory["rows"]] == [
        ("b32", 2, False), ("b32+ckpt", 2, True), ("b64", 4, False), ("b64+ckpt", 4, True)]
    for row in memory["rows"]:
        assert row["plan_bytes"] > 0 and row["real_bytes"] is None and row["ratio"] is None
        assert f"memory plan per cpu device: {row['plan']}" in log  # the plan is the one the trainer printed
    assert memory["plan_within_tolerance"] is None and [x["real"] for x in memory["savings"]] == [None, None]
    assert all(0 < x["plan"] < 1 for x in memory["savings"])
    assert "plan GB (no CUDA peak on cpu): b32 " in memory["summary"]
    fp16 = sections["fp16"]
    assert fp16["steps"] == fp16["steps_compared"] == len(sections["speed-32-eager"]["losses"]) == 5
    assert fp16["max_abs_diff_vs_bf16"] <= fp16["tolerance"] and fp16["skipped_steps"] == 0
    assert fp16["loss_scale"] > 0 and fp16["tokens_per_s"] > 0 and fp16["tokens_per_s_vs_bf16"] > 0


def test_sections_are_dispatched_through_the_table(gc, gs):
    for s in gc.SECTIONS:
        assert (s.run is None) == bool(s.needs), s.name  # a process of its own, or a check derived by derive()
    assert gc.BY_NAME["speed-64-eager"].run.keywords == {"micro_key": 64, "compiled": False}
    assert dict(gc.BY_NAME["resume"].env) == {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
    for path in (SCRIPT, SECTIONS_FILE):  # no lookup by name, no folder outside the repository assumed
        text = path.read_text()
        assert "globals()" not in text and "../shared" not in text and "shared/" not in text, path


def test_a_missing_text_names_the_flag(tmp_path):
    proc = run_script("--check-sizes", "--text", str(tmp_path / "absent.txt"))
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1] == (f"bench/gpu_check.py: --text {tmp_path / 'absent.txt'}: no "
                                                    "such file (tinyshakespeare's text; pass --text FILE)")


def _gone(pid: int) -> bool:
    """No such process, or a zombie (it has exited: it holds nothing; its reaper may be slow)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


@pytest.mark.skipif(not hasattr(os, "killpg") or not Path("/proc").is_dir(), reason="POSIX with /proc")
def test_kill_session_ends_the_whole_group(gc):
    # a section's child that ignores SIGTERM, in the section's group: SIGKILL reaches it after the grace time
    code = ("import subprocess, sys, time\n"
            "w = subprocess.Popen([sys.executable, '-c', 'import signal, time; "
            "signal.signal(signal.SIGTERM, signal.SIG_IGN); print(1, flush=True); time.sleep(120)'], "
            "stdout=subprocess.PIPE)\n"
            "w.stdout.readline()\n"
            "print(w.pid, flush=True)\n"
            "time.sleep(120)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, start_new_session=True)
    worker = int(proc.stdout.readline())
    assert not _gone(worker)
    gc.kill_session(proc, grace=1.0)
    assert proc.poll() is not None and _gone(worker)
