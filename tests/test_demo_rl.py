"""`make demo-rl`'s recipe and its table (`scripts/rl_table.py`): fixed step counts, and a table whose lifts and
intervals are computed from the eval files the stages write."""

from __future__ import annotations

import json
import re
import subprocess
import sys

from conftest import REPO

SCRIPT = REPO / "scripts" / "demo_rl.sh"
TABLE = REPO / "scripts" / "rl_table.py"


def test_the_rl_demo_is_valid_bash_with_no_wall_clock_cap():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    assert not re.search(r"--max-minutes|_MINUTES", SCRIPT.read_text())


def _eval_file(path, scores: list[float]) -> None:
    answers = [{"prompt": f"What is {i}?", "target": str(i), "answer": str(i) if s else "x", "score": s}
               for i, s in enumerate(scores)]
    correct = int(sum(scores))
    path.write_text(json.dumps({"task": "arithmetic", "n": len(scores), "correct": correct,
                                "accuracy": correct / len(scores), "ci_low": 0.0, "ci_high": 1.0,
                                "answers": answers}))


def test_the_table_reports_paired_lifts_against_their_goals(tmp_path):
    n = 100
    _eval_file(tmp_path / "eval_sft.json", [1.0] * 50 + [0.0] * 50)
    _eval_file(tmp_path / "eval_grpo.json", [1.0] * 80 + [0.0] * 20)  # +0.30: 30 fixed, none broken
    _eval_file(tmp_path / "eval_dpo.json", [1.0] * 45 + [0.0] * 5 + [1.0] * 10 + [0.0] * 40)  # +0.05
    out = subprocess.run([sys.executable, str(TABLE), str(tmp_path)], capture_output=True, text=True, check=True).stdout
    grpo = next(line for line in out.splitlines() if line.startswith("GRPO"))
    assert f"80/{n}" in grpo and "+0.300" in grpo and "met" in grpo
    # 30 of 100 questions went from wrong to right, none the other way: sd of the differences sqrt(0.21 * 100/99)
    half = 1.959964 * (0.21 * 100 / 99) ** 0.5 / 10
    assert f"+{0.3 - half:.3f} to +{0.3 + half:.3f}" in grpo
    dpo = next(line for line in out.splitlines() if line.startswith("DPO"))
    assert "+0.050" in dpo and "missed" in dpo
    assert "(not run)" in next(line for line in out.splitlines() if line.startswith("PPO"))
    assert "answers before and after" in out


def test_the_table_needs_the_fine_tuned_models_file(tmp_path):
    r = subprocess.run([sys.executable, str(TABLE), str(tmp_path)], capture_output=True, text=True)
    assert r.returncode != 0 and "eval_sft.json" in r.stderr
