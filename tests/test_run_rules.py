"""The rules of a run folder through `gpt2 pretrain` and `gpt2 dpo`: a default warmup is fitted to a short run
(one given is refused), `--resume` refuses a session that would end at or before its checkpoint, a run killed
before its first checkpoint resumes with its own settings, hand-damaged config.json and metrics.jsonl are one
line or a note, a killed save's temporary files go with the next run, and `gpt2 prepare fineweb` holds the same
lock as training."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from rlhf_data import pair_stage_inputs
from test_finetune import QA, make_data, make_init
from test_pretrain import (
    VOCAB,
    shards,  # noqa: F401  (fixture: a few synthetic token shards)
)

from gpt2.checkpoint import load_checkpoint
from gpt2.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

# A model small enough for a test, on the tiny preset (whose warmup is 30 steps); no --warmup-steps.
MODEL = ["--device", "cpu", "--vocab-size", str(VOCAB), "--n-layer", "1", "--n-head", "2", "--n-embd", "32",
         "--block-size", "32", "--micro-batch", "2", "--seq-len", "16", "--global-batch", "64", "--eval-every", "0",
         "--save-every", "0", "--val-tokens", "256", "--no-progress"]


def pretrain(shards_dir, out, *extra):  # noqa: F811
    main(["pretrain", "--preset", "tiny", "--data", str(shards_dir), "--out", str(out), *MODEL, *extra])


def refused(capsys, argv) -> str:
    """The one error line of a command that must refuse `argv` (exit 2, no traceback)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("gpt2 "), err
    return lines[0]


def train_steps(run):
    return [r["step"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if r["kind"] == "train"]


def test_a_default_warmup_is_cut_to_a_short_run_and_a_given_one_is_refused(shards, tmp_path, capsys):  # noqa: F811
    pretrain(shards, tmp_path / "short", "--max-steps", "2")
    assert "warmup cut from 30 to the run's 2 steps" in capsys.readouterr().err
    assert json.loads((tmp_path / "short" / "config.json").read_text())["warmup_steps"] == 2
    assert train_steps(tmp_path / "short") == [1, 2]
    line = refused(capsys, ["pretrain", "--preset", "tiny", "--data", str(shards), "--out", str(tmp_path / "given"),
                            *MODEL, "--max-steps", "2", "--warmup-steps", "30"])
    assert "--warmup-steps 30 is more than the run's 2 steps" in line


def test_dpo_with_one_step_fits_its_default_warmup(tmp_path, shared_data, tokenizer_ok, capsys):
    data, sft = pair_stage_inputs(tmp_path, shared_data, n=6, n_train=4)
    main(["dpo", "--model", str(sft), "--data", str(data), "--out", str(tmp_path / "dpo"),
          "--device", "cpu", "--no-progress", "--batch-size", "2", "--max-steps", "1"])
    assert "warmup cut from 10 to the run's 1 steps" in capsys.readouterr().err
    assert load_checkpoint(tmp_path / "dpo")["step"] == 1


def test_finetune_fits_its_default_warmup_to_a_run_its_epochs_make_short(tmp_path, tokenizer_ok, capsys):
    """The run's length is known only once the data is read (--epochs): the default warmup (50) is cut to it
    then, and a --warmup-steps given beyond it is still refused."""
    data, init = make_data(tmp_path, QA[:4]), make_init(tmp_path, n_embd=16)
    argv = ["finetune", "--init", str(init), "--data", str(data), "--epochs", "1", "--batch-size", "2", "--grad-accum",
            "1", "--device", "cpu", "--no-progress", "--sample-prompts", "Hi?", "--sample-max-tokens", "1"]
    main([*argv, "--out", str(tmp_path / "cut")])
    assert "warmup cut from 50 to the run's 2 steps" in capsys.readouterr().err
    assert train_steps(tmp_path / "cut") == [1, 2]
    line = refused(capsys, [*argv, "--out", str(tmp_path / "given"), "--warmup-steps", "50"])
    assert "--warmup-steps 50 is more than the run's 2 steps" in line


@pytest.mark.parametrize("flags, named", [
    (["--max-steps", "3"], "--max-steps 3"), (["--max-steps", "4"], "--max-steps 4"),
    (["--stop-at-step", "3"], "--stop-at-step 3"), (["--stop-at-step", "4"], "--stop-at-step 4"),
])
def test_resume_refuses_an_end_at_or_before_the_checkpoint(shards, tmp_path, capsys, flags, named):  # noqa: F811
    run = tmp_path / "run"
    pretrain(shards, run, "--max-steps", "6", "--warmup-steps", "1", "--stop-at-step", "4")
    before = (run / "checkpoint.pt").read_bytes()
    line = refused(capsys, ["pretrain", "--out", str(run), "--resume", *flags])
    assert named in line and "already at step 4" in line
    assert (run / "checkpoint.pt").read_bytes() == before  # not rewritten


def test_resume_of_a_finished_run_is_no_error(shards, tmp_path, capsys):  # noqa: F811
    run = tmp_path / "run"
    pretrain(shards, run, "--max-steps", "2", "--warmup-steps", "1")
    capsys.readouterr()
    main(["pretrain", "--out", str(run), "--resume"])
    assert "is already at step 2 of --max-steps 2: nothing to train" in capsys.readouterr().out
    assert load_checkpoint(run)["step"] == 2 and train_steps(run) == [1, 2]


def test_a_run_killed_before_its_first_checkpoint_resumes_with_its_own_settings(shards, tmp_path, capsys):  # noqa: F811
    run = tmp_path / "run"
    pretrain(shards, run, "--max-steps", "3", "--warmup-steps", "1")
    # what a kill before the first save leaves: the settings, no checkpoint, no export
    (run / "checkpoint.pt").unlink()
    saved = json.loads((run / "config.json").read_text())
    capsys.readouterr()
    main(["pretrain", "--preset", "tiny", "--out", str(run), "--resume"])
    out = capsys.readouterr().out
    assert "settings saved in" in out and "--preset tiny is not used" in out
    now = json.loads((run / "config.json").read_text())
    assert {**now, "resume": False} == saved  # not the tiny preset's model or data
    state = load_checkpoint(run)
    assert state["step"] == 3 and state["model_config"]["n_layer"] == 1


@pytest.mark.parametrize("field, value, said", [
    ("lr", "fast", "'lr' is 'fast', not a number"),
    ("n_layer", 1.5, "'n_layer' is 1.5, not an integer"),
    ("betas", "x", "'betas' is 'x'"),
    ("shuffle", "yes", "'shuffle' is 'yes', not true or false"),
])
def test_a_hand_edited_config_json_is_one_line(shards, tmp_path, capsys, field, value, said):  # noqa: F811
    run = tmp_path / "run"
    pretrain(shards, run, "--max-steps", "4", "--warmup-steps", "1", "--stop-at-step", "2")
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, field: value}))
    line = refused(capsys, ["pretrain", "--out", str(run), "--resume"])
    assert str(run / "config.json") in line and said in line


def test_config_json_that_is_not_an_object_and_no_checkpoint_is_one_line(shards, tmp_path, capsys):  # noqa: F811
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("[1, 2]")
    line = refused(capsys, ["pretrain", "--out", str(run), "--resume"])
    assert "config.json is not a JSON object of settings" in line


def test_damaged_metrics_lines_are_dropped_with_a_note_on_resume(shards, tmp_path, capsys):  # noqa: F811
    run = tmp_path / "run"
    pretrain(shards, run, "--max-steps", "4", "--warmup-steps", "1", "--stop-at-step", "2")
    with open(run / "metrics.jsonl", "ab") as f:
        f.write(b'\xff\xfe not utf-8\n[1, 2]\n{"kind": "train", "step": "x"}\n"text"\n{"kind": "train", "st')
    capsys.readouterr()
    main(["pretrain", "--out", str(run), "--resume"])
    assert "metrics.jsonl: dropped 5 unreadable line(s) (line 3 first)" in capsys.readouterr().err
    assert train_steps(run) == [1, 2, 3, 4]  # every line JSON again
    main(["plot", str(run)])  # and the graph draws


def test_a_killed_saves_temporary_files_go_with_the_next_run(shards, tmp_path):  # noqa: F811
    run = tmp_path / "run"
    pretrain(shards, run, "--max-steps", "4", "--warmup-steps", "1", "--stop-at-step", "2")
    left = [run / ".checkpoint.pt.k3j_x9q2.tmp", run / ".loss.png.abcdefgh.tmp",
            run / "model" / ".model.safetensors.Zz09aa_b.tmp"]
    kept = [run / ".notes.tmp", run / "notes.tmp", tmp_path / ".checkpoint.pt.k3j_x9q2.tmp"]  # not the save's
    for p in left + kept:
        p.write_bytes(b"partial")
    main(["pretrain", "--out", str(run), "--resume"])
    assert not any(p.exists() for p in left) and all(p.exists() for p in kept)


def test_prepare_fineweb_refuses_a_folder_that_another_process_is_writing(tmp_path, capsys):
    out = tmp_path / "data"
    out.mkdir()
    (tmp_path / "a.txt").write_text("some text to tokenize\n")
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys\n"
        f"fd = os.open({str(out / 'run.lock')!r}, os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "print('held', flush=True)\n"
        "sys.stdin.read()\n")], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        line = refused(capsys, ["prepare", "fineweb", "--source", str(tmp_path / "a.txt"), "--out", str(out)])
        assert f"{out} is in use by another run" in line
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    assert not list(out.glob("*.bin"))  # nothing of the refused run was written
