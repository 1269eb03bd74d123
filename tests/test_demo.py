"""`make demo`'s recipe: a fixed amount of work (no wall-clock cap), and sample questions the tiny model was
trained on (a 7M model learns the answers it saw, not new ones), so its "after" answers can show learning."""

from __future__ import annotations

import json
import re

import pytest
from conftest import REPO, SHARED_DATA

from gpt2.commands.finetune import PRESETS


def test_the_demo_has_no_wall_clock_cap():
    script = (REPO / "scripts" / "demo.sh").read_text()
    assert not re.search(r"--max-minutes|_MINUTES", script)


def test_the_tiny_finetune_questions_are_training_records():
    source = SHARED_DATA / "alpaca_sample.json"
    if not source.is_file():
        pytest.skip(f"{source} is absent")
    no_input = {r["instruction"].strip() for r in json.loads(source.read_text()) if not r["input"].strip()}
    assert set(PRESETS["tiny"].sample_prompts) <= no_input
