"""Start-up with an empty compile cache, as real processes: `gpt2 serve --compile` answers `/health` and a completion
while its pieces compile in the background (the real compiler child, not a stand-in), and a start killed mid-build,
by SIGTERM or SIGKILL, leaves no build folder and no compiler process behind; `gpt2 chat --prompt --compile`
answers and exits, stopping its unfinished build."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from serve_helpers import ServerProcess, tiny_checkpoint, wait_until

# Generous, for a loaded 2-core machine (an idle one answers in seconds: docs/compiled_decoding.md); what matters
# is that the answer comes while the compile is still running, which the tests check from /health.
ANSWER_WITHIN = 60.0


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizer_ok):
    return tiny_checkpoint(tmp_path_factory.mktemp("tiny"))


@pytest.fixture
def empty_cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "compiled"
    monkeypatch.setenv("GPT2_COMPILE_CACHE", str(root))  # the server process inherits it
    return root


def compiler_pids(root: Path) -> list[int]:
    """Processes whose command line names a build folder under `root` (the compiler child)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if str(root) in cmdline and "gpt2.compiled" in cmdline:
                pids.append(int(proc.name))
    return pids


def leftovers(root: Path) -> list[Path]:
    return list(root.glob(".build-*")) if root.exists() else []


def building(root: Path) -> bool:
    return bool(compiler_pids(root)) and bool(leftovers(root))


pytestmark = pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="reads /proc to find the child")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_serves_at_once_while_compiling_and_a_killed_start_leaves_nothing(checkpoint, empty_cache, sig):
    t0 = time.monotonic()
    with ServerProcess(checkpoint, "--compile") as s:
        health = httpx.get(s.url + "/health", timeout=5).json()
        r = httpx.post(s.url + "/v1/completions", json={"prompt": "Hello", "max_tokens": 3, "temperature": 0},
                       timeout=60)
        answered = time.monotonic() - t0
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
        assert answered < ANSWER_WITHIN, f"first completion after {answered:.1f} s"
        assert health["decoder"] == "eager" and health["compile"]["state"] in ("starting", "compiling")
        assert wait_until(lambda: building(empty_cache), timeout=60, interval=0.2), "no compiler child seen"
        status = httpx.get(s.url + "/health", timeout=5).json()["compile"]
        assert status["state"] == "compiling" and status["pieces"] == 4
        s.proc.send_signal(sig)
        s.proc.wait(timeout=30)
        if sig == signal.SIGTERM:
            assert s.proc.returncode == 0 and "stopped unfinished" in s.proc.stderr.read()
    # the child notices (SIGTERM from its parent, or its parent gone) and removes its folder and itself
    assert wait_until(lambda: not compiler_pids(empty_cache) and not leftovers(empty_cache), timeout=30,
                      interval=0.2), (compiler_pids(empty_cache), leftovers(empty_cache))
    assert not [p for p in empty_cache.iterdir() if p.is_dir()]  # no entry either: it was never finished


def test_chat_answers_at_once_and_stops_its_unfinished_build(checkpoint, empty_cache):
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "gpt2", "chat", "--model", str(checkpoint), "--prompt", "Hi",
                           "--max-tokens", "4", "--temperature", "0", "--compile"], capture_output=True, text=True,
                          env=env, timeout=120)
    took = time.monotonic() - t0
    assert proc.returncode == 0, proc.stderr
    assert took < ANSWER_WITHIN, f"chat took {took:.1f} s"
    assert "Traceback" not in proc.stderr
    assert wait_until(lambda: not compiler_pids(empty_cache) and not leftovers(empty_cache), timeout=30)
