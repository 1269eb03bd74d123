"""`--resume` continues a run with the settings it was saved with: `--out RUN --resume` alone is enough, the
saved settings beat the preset's, a flag that would change the schedule is applied from the checkpoint's
step and announced, one that would change the model or data is refused in one line; `--help` shows the
defaults that apply (the preset's)."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace

import pytest
import torch
from test_pretrain import (
    VOCAB,
    shards,  # noqa: F401  (fixture: a few synthetic token shards)
)

from gpt2.checkpoint import load_checkpoint
from gpt2.cli import main
from gpt2.config import ANNOUNCE, APPLY, SESSION, arg, resume_rule
from gpt2.errors import UserError
from gpt2.train.loop import TrainConfig, lr_at
from gpt2.train.run_dir import resumed_config

pytestmark = pytest.mark.usefixtures("one_thread")

# The run's recipe (on top of the tiny preset): a model small enough for a test.
RECIPE = ["--device", "cpu", "--vocab-size", str(VOCAB), "--n-layer", "1", "--n-head", "2", "--n-embd", "32",
          "--block-size", "32", "--micro-batch", "2", "--seq-len", "16", "--global-batch", "64", "--max-steps", "6",
          "--warmup-steps", "2", "--eval-every", "3", "--save-every", "0", "--val-tokens", "256", "--no-progress"]


@pytest.fixture
def token_shards(shards):  # noqa: F811
    return shards


def records(run, kind="train"):
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


def start(token_shards, out, *extra):
    main(["pretrain", "--preset", "tiny", "--data", str(token_shards), "--out", str(out), *RECIPE, *extra])


def test_out_and_resume_alone_reproduce_the_uninterrupted_run(token_shards, tmp_path, capsys):
    start(token_shards, tmp_path / "full")
    start(token_shards, tmp_path / "split", "--stop-at-step", "2")
    # No preset, no data, no recipe: everything comes from the saved run (the default preset, gpt2-124m,
    # would otherwise give a 124M model on data/fineweb).
    main(["pretrain", "--out", str(tmp_path / "split"), "--resume", "--stop-at-step", "4"])
    assert f"continuing {tmp_path / 'split'} with the settings saved in" in capsys.readouterr().out
    main(["pretrain", "--out", str(tmp_path / "split"), "--resume"])  # a saved --stop-at-step is not inherited
    full, split = load_checkpoint(tmp_path / "full"), load_checkpoint(tmp_path / "split")
    assert split["step"] == 6
    for name, tensor in full["model"].items():  # bit for bit: same machine, same order of operations
        assert torch.equal(tensor, split["model"][name]), name
    assert [r["loss"] for r in records(tmp_path / "split")] == [r["loss"] for r in records(tmp_path / "full")]
    split_evals = records(tmp_path / "split", "eval")  # plus one where each session ended (steps 2 and 4)
    assert [e for e in split_evals if e["step"] in (0, 3, 6)] == records(tmp_path / "full", "eval")
    saved = json.loads((tmp_path / "split" / "config.json").read_text())
    assert (saved["n_layer"], saved["max_steps"], saved["data"]) == (1, 6, str(token_shards))


def test_saved_settings_beat_the_preset(token_shards, tmp_path):
    """The issue's case: a tiny-preset run with its own --max-steps/--warmup-steps, resumed with the preset
    and data named again, keeps its own schedule instead of the preset's (300 steps, 30 warmup)."""
    run = tmp_path / "run"
    start(token_shards, run, "--stop-at-step", "3")
    before = json.loads((run / "config.json").read_text())
    main(["pretrain", "--preset", "tiny", "--data", str(token_shards), "--out", str(run), "--resume"])
    after = json.loads((run / "config.json").read_text())
    assert (after["max_steps"], after["warmup_steps"], after["eval_every"]) == (6, 2, 3)
    settings = lambda cfg: {k: v for k, v in cfg.items() if resume_rule(TrainConfig, k) != SESSION}  # noqa: E731
    assert settings(after) == settings(before)  # only this session's --stop-at-step/--resume differ
    assert [r["step"] for r in records(run)] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in records(run, "eval")] == [0, 3, 6]


def test_a_new_max_steps_is_applied_and_announced(token_shards, tmp_path, capsys):
    run = tmp_path / "run"
    start(token_shards, run, "--stop-at-step", "3")
    capsys.readouterr()
    main(["pretrain", "--out", str(run), "--resume", "--max-steps", "8", "--lr", "0.001"])
    out = capsys.readouterr().out
    assert "--resume: --max-steps 6 -> 8 (the LR schedule changes from step 3)" in out
    assert "--resume: --lr 0.002 -> 0.001 (the LR schedule changes from step 3)" in out
    lrs = [r["lr"] for r in records(run)]
    old = TrainConfig(max_steps=6, warmup_steps=2, lr=2e-3, min_lr=2e-4)
    new = TrainConfig(max_steps=8, warmup_steps=2, lr=1e-3, min_lr=2e-4)
    assert lrs == [lr_at(s, old) for s in range(3)] + [lr_at(s, new) for s in range(3, 8)]
    assert json.loads((run / "config.json").read_text())["max_steps"] == 8  # the run's settings now


@pytest.mark.parametrize("flags, named", [
    (["--n-layer", "2"], "--n-layer 2 (saved: 1)"),
    (["--data", "elsewhere"], "--data 'elsewhere'"),
    (["--global-batch", "128", "--seed", "1"], "--seed 1 (saved: 1337)"),
])
def test_a_flag_that_changes_the_model_or_data_is_refused(token_shards, tmp_path, capsys, flags, named):
    run = tmp_path / "run"
    start(token_shards, run, "--stop-at-step", "2")
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["pretrain", "--out", str(run), "--resume", *flags])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("gpt2 pretrain: error: --resume: ") and named in err and "\n" not in err
    assert load_checkpoint(run)["step"] == 2  # untouched


def test_resume_without_a_checkpoint_starts_a_new_run(token_shards, tmp_path, capsys):
    start(token_shards, tmp_path / "new", "--resume", "--max-steps", "2")
    assert "no checkpoint in" in capsys.readouterr().out
    assert load_checkpoint(tmp_path / "new")["step"] == 2


def test_the_loop_itself_refuses_a_changed_seed(token_shards, tmp_path):
    """Through the API (no CLI): the checkpoint's own copy of the settings is checked too (by the loop, or
    first by the shuffled loader, whose saved order depends on the seed: either names the new seed)."""
    from gpt2.commands.pretrain import PRETRAIN_PRESETS, run

    start(token_shards, tmp_path / "run", "--stop-at-step", "2")
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    cfg = resumed_config(type(PRETRAIN_PRESETS["tiny"]), saved, {"resume": True})
    with pytest.raises(UserError, match="seed 7"):
        run(cfg.__class__(**{**cfg.__dict__, "seed": 7}))


def test_a_run_started_through_the_api_records_its_command(token_shards, tmp_path, capsys):
    """`run(cfg)` called without the CLI (as bench/gpu_check.py does) records its command as `gpt2 pretrain`
    does, so another command's --resume of it is refused the same way."""
    from gpt2.commands.pretrain import PRETRAIN_PRESETS, run

    out = tmp_path / "api"
    run(replace(PRETRAIN_PRESETS["tiny"], data=str(token_shards), out=str(out), device="cpu", vocab_size=VOCAB,
                n_layer=1, n_head=2, n_embd=32, block_size=32, micro_batch=2, seq_len=16, global_batch=64,
                max_steps=1, warmup_steps=0, eval_every=0, progress=False))
    assert json.loads((out / "config.json").read_text())["command"] == "pretrain"
    with pytest.raises(SystemExit):
        main(["finetune", "--out", str(out), "--resume"])
    assert f"{out} is a `gpt2 pretrain` run, not a `gpt2 finetune` one" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ the rules themselves


@dataclass
class Cfg(TrainConfig):
    width: int = arg(8, "a model field: refused on resume")
    samples: int = arg(2, "an evaluation field", on_resume=APPLY)
    lr: float = arg(1e-3, "redeclared without a rule: inherits ANNOUNCE")


def test_rules_inherit_and_default_to_refuse():
    assert resume_rule(Cfg, "lr") == ANNOUNCE and resume_rule(Cfg, "stop_at_step") == SESSION
    assert resume_rule(Cfg, "width") == resume_rule(Cfg, "seed") == "refuse"
    saved = {**Cfg(width=16, stop_at_step=3, max_steps=50).__dict__, "betas": [0.9, 0.95], "unknown": 1}
    cfg = resumed_config(Cfg, saved, {"width": 16, "samples": 5, "betas": [0.9, 0.95], "resume": True})
    assert (cfg.width, cfg.samples, cfg.max_steps, cfg.stop_at_step, cfg.resume) == (16, 5, 50, None, True)
    with pytest.raises(UserError, match=r"--width 8 \(saved: 16\)"):
        resumed_config(Cfg, saved, {"width": 8})


# ------------------------------------------------------------------------------------------------ --help


def test_help_shows_the_defaults_that_apply(capsys):
    with pytest.raises(SystemExit):
        main(["pretrain", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert ("(default: 19073 with preset gpt2-124m, 19073 with gpt2-medium, 19073 with gpt2-large, 9537 with "
            "gpt2-xl, 300 with tiny)") in text
    assert "(default: 715 with preset gpt2-124m, 715 with gpt2-medium, 715 with gpt2-large, 358 with gpt2-xl, " \
           "30 with tiny)" in text
    assert "(default: 'runs/gpt2-124m' with preset gpt2-124m, 'runs/gpt2-medium' with gpt2-medium" in text
    assert "(default: 1000)" not in text and "'runs/run'" not in text
    assert "--resume: `gpt2 pretrain --out RUN --resume` alone continues RUN" in text
    assert "A new value of --max-steps, --lr, --min-lr, --warmup-steps, --muon-lr, --grad-clip is applied" in text
