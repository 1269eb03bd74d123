"""Bad input and a hostile machine get one line naming the flag or file (exit status 2), never a traceback:
nonsense flags, unavailable devices, foreign token ids, empty sources, a full disk, two runs on one --out."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from test_generate_cli import model_dir  # noqa: F401  (fixture: a 64-token model)
from test_pretrain import VOCAB, pretrain, shards  # noqa: F401  (shards: fixture)

from gpt2 import io as gio
from gpt2.checkpoint import load_checkpoint
from gpt2.cli import main
from gpt2.data.shards import write_shard
from gpt2.model import GPT, GPTConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def error_line(capsys, run, alone: bool = False) -> str:
    """Run `run()`, expect exit status 2 and return its error line (the last line of stderr: progress bars may
    come before it; with `alone`, nothing may)."""
    with pytest.raises(SystemExit) as e:
        run()
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err, err
    if alone:
        assert len(err.splitlines()) == 1, err
    return err.splitlines()[-1]


def no_temp_files(folder) -> bool:
    return not [p for p in folder.rglob("*") if p.name.endswith(".tmp")]


@pytest.mark.parametrize("flags, message", [
    (["--lr", "-1"], "--lr must be a positive number (got -1.0)"),
    (["--dropout", "2"], "--dropout must be in [0, 1) (got 2.0)"),
    (["--dropout", "1"], "--dropout must be in [0, 1) (got 1.0)"),
    (["--max-minutes", "-1"], "--max-minutes must be > 0 (got -1.0); leave it out for no time limit"),
    (["--max-minutes", "0"], "--max-minutes must be > 0 (got 0.0); leave it out for no time limit"),
    (["--val-tokens", "0"], "--val-tokens must be >= 1 (got 0); use --eval-every 0 to skip evaluation"),
    (["--micro-batch", "-2"], "--micro-batch must be >= 1 (got -2)"),
    (["--weight-decay", "-0.1"], "--weight-decay must be >= 0 (got -0.1)"),
    (["--grad-clip", "-1"], "--grad-clip must be >= 0, 0 = no clipping (got -1.0)"),
    (["--device", "mps"], "--device mps: Apple's MPS is not available on this machine"),
])
def test_pretrain_flags(shards, tmp_path, capsys, flags, message):  # noqa: F811
    if flags == ["--device", "mps"] and torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    err = error_line(capsys, lambda: pretrain(shards, tmp_path / "run", *flags))
    assert err == f"gpt2 pretrain: error: {message}"
    assert not (tmp_path / "run").exists()  # refused before anything was written


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda(shards, tmp_path, capsys):  # noqa: F811
    err = error_line(capsys, lambda: pretrain(shards, tmp_path / "run", "--device", "cuda"))
    assert err == "gpt2 pretrain: error: --device cuda: CUDA is not available on this machine"


@pytest.mark.parametrize("argv, message", [
    ([""], "prompt 1 is empty: GPT-2 continues text, give it at least one character"),
    (["hi", ""], "prompt 2 is empty: GPT-2 continues text, give it at least one character"),
    (["--top-k", "0", "hi"], "--top-k must be >= 1 (got 0); leave it out (or none) to sample from every token"),
    (["--top-k", "-3", "hi"], "--top-k must be >= 1 (got -3); leave it out (or none) to sample from every token"),
    (["--top-p", "0", "hi"], "--top-p must be in (0, 1] (got 0.0); leave it out (or none) for no nucleus cut"),
    (["--top-p", "1.5", "hi"], "--top-p must be in (0, 1] (got 1.5); leave it out (or none) for no nucleus cut"),
    (["--temperature", "-1", "hi"], "--temperature must be a finite number >= 0, 0 = greedy (got -1.0)"),
    (["--device", "mps", "hi"], "--device mps: Apple's MPS is not available on this machine"),
    (["--device", "tpu", "hi"], "--device 'tpu': not a device; choose cpu, cuda, cuda:N, mps or auto"),
])
def test_generate_flags(model_dir, capsys, argv, message):  # noqa: F811
    if "mps" in argv and torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    err = error_line(capsys, lambda: main(["generate", "--model", str(model_dir), *argv]))
    assert err == f"gpt2 generate: error: {message}"


def test_generate_says_when_the_context_window_ends_it(tokenizer_ok, model_dir, capsys):  # noqa: F811
    main(["generate", "--model", str(model_dir), "--device", "cpu", "--temperature", "0", "--max-tokens", "400",
          "Hello"])  # "Hello" is 1 token: 63 new tokens fill the 64-token window
    err = capsys.readouterr().err.strip()
    assert err == "note: stopped after 63 of --max-tokens 400 new tokens at the model's context window (64 tokens)"
    main(["generate", "--model", str(model_dir), "--device", "cpu", "--temperature", "0", "--max-tokens", "5",
          "Hello"])
    assert capsys.readouterr().err == ""


def test_foreign_token_ids_under_pretrain(shards, tmp_path, capsys):  # noqa: F811
    bad = shards / "syn_train_000002.bin"
    ids = np.random.default_rng(1).integers(0, VOCAB, 3_000)
    ids[10] = VOCAB + 44  # one id outside the model's 256, in the second train shard (reached at step 47)
    write_shard(bad, ids)
    err = error_line(capsys, lambda: pretrain(shards, tmp_path / "run", "--max-steps", "60", "--eval-every", "0"))
    assert err == (f"gpt2 pretrain: error: {bad}: token id {VOCAB + 44} is outside the model's vocabulary "
                   f"({VOCAB} ids, --vocab-size); were these shards made with another tokenizer?")


def test_foreign_token_ids_under_eval_val_loss(tmp_path, capsys):
    torch.manual_seed(0)
    GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16)).save_pretrained(tmp_path / "model")
    (tmp_path / "data").mkdir()
    bad = tmp_path / "data" / "x_val_000000.bin"
    write_shard(bad, [1, 2, 60_000] * 100)  # 60000 >= GPT-2's 50257
    err = error_line(capsys, lambda: main(["eval", "val-loss", "--model", str(tmp_path / "model"), "--data",
                                           str(tmp_path / "data"), "--device", "cpu", "--batch-size", "2"]))
    assert err == (f"gpt2 eval val-loss: error: {bad}: token id 60000 is outside the model's vocabulary (50257 "
                   "ids, --vocab-size); were these shards made with another tokenizer?")


def prepare(source, out, *extra):
    main(["prepare", "fineweb", "--source", str(source), "--out", str(out), "--workers", "1", *extra])


@pytest.mark.parametrize("content", ["", "\n  \n"])
def test_prepare_fineweb_of_an_empty_file(tokenizer_ok, tmp_path, capsys, content):
    source = tmp_path / "empty.txt"
    source.write_text(content)
    err = error_line(capsys, lambda: prepare(source, tmp_path / "out"))
    assert err == (f"gpt2 prepare fineweb: error: {source}: no text to tokenize (none of its 1 record(s) has text "
                   "in field 'text')")
    assert not list((tmp_path / "out").glob("*.bin"))


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_prepare_fineweb_on_a_full_disk(tokenizer_ok, tmp_path, capsys, monkeypatch):
    source = tmp_path / "text.txt"
    source.write_text("The quick brown fox jumps over the lazy dog. " * 200)
    monkeypatch.setattr(os, "fsync", _enospc)  # the first shard's write runs out of space
    out = tmp_path / "out"
    err = error_line(capsys, lambda: prepare(source, out, "--val-tokens", "100", "--shard-tokens", "500"))
    assert err == (f"gpt2 prepare fineweb: error: cannot write {out / 'fineweb_val_000000.bin'}: No space left on "
                   "device (errno 28)")
    assert no_temp_files(out)


class _FillsUp:
    """Lets the first `ok` checkpoint writes through, then fails every write with ENOSPC mid-file."""

    def __init__(self, monkeypatch, ok: int):
        self.saves, self.ok = 0, ok
        real_init, real_write = gio._HashingWriter.__init__, gio._HashingWriter.write
        outer = self

        def init(writer, f):
            outer.saves += 1
            real_init(writer, f)

        def write(writer, b):
            if outer.saves > outer.ok:
                _enospc()
            return real_write(writer, b)

        monkeypatch.setattr(gio._HashingWriter, "__init__", init)
        monkeypatch.setattr(gio._HashingWriter, "write", write)


def test_pretrain_checkpoint_on_a_full_disk_keeps_the_previous_one(shards, tmp_path, capsys, monkeypatch):  # noqa: F811
    run = tmp_path / "run"
    _FillsUp(monkeypatch, ok=1)
    err = error_line(capsys, lambda: pretrain(shards, run, "--save-every", "2"))
    assert err == (f"gpt2 pretrain: error: saving step 4 failed: cannot write {run / 'checkpoint.pt'}: No space "
                   f"left on device (errno 28); {run / 'checkpoint.pt'} holds step 2")
    assert load_checkpoint(run)["step"] == 2
    assert no_temp_files(run)


def test_pretrain_resume_on_a_full_disk(shards, tmp_path, capsys, monkeypatch):  # noqa: F811
    run = tmp_path / "run"
    pretrain(shards, run, "--stop-at-step", "2")
    capsys.readouterr()
    before = (run / "checkpoint.pt").read_bytes()
    monkeypatch.setattr(os, "fsync", _enospc)  # nothing more fits
    err = error_line(capsys, lambda: pretrain(shards, run, "--resume"))
    assert err.startswith("gpt2 pretrain: error: ") and "No space left on device (errno 28)" in err
    assert str(run) in err
    assert (run / "checkpoint.pt").read_bytes() == before
    assert no_temp_files(run)


HOLD_LOCK = textwrap.dedent("""
    import fcntl, os, sys, time
    fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.pwrite(fd, f"{os.getpid()}\\n".encode(), 0)
    print("locked", flush=True)
    time.sleep(60)
""")


@pytest.mark.skipif(sys.platform == "win32", reason="no flock")
def test_a_second_run_on_a_held_out_is_refused_and_a_dead_one_does_not_block(shards, tmp_path, capsys):  # noqa: F811
    run = tmp_path / "run"
    run.mkdir()
    other = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(run / "run.lock")], stdout=subprocess.PIPE,
                             text=True)
    try:
        assert other.stdout.readline().strip() == "locked"
        err = error_line(capsys, lambda: pretrain(shards, run))
        assert err == (f"gpt2 pretrain: error: {run} is in use by another run (pid {other.pid} holds "
                       f"{run / 'run.lock'}); wait for it to end or choose another --out")
        assert not (run / "metrics.jsonl").exists()
    finally:
        other.kill()  # a killed holder: the kernel drops its lock
        other.wait()
    pretrain(shards, run)
    assert load_checkpoint(run)["step"] == 4


# ------------------------------------------------------------------ numbers, ranges, runs of other commands

BIG = str(10**20)  # does not fit in 64 bits


@pytest.mark.parametrize("flags, message", [
    (["--seed", BIG], f"--seed must be an integer in [0, 2**63) (got {BIG})"),
    (["--seed", "-1"], "--seed must be an integer in [0, 2**63) (got -1)"),
    (["--max-steps", BIG], f"--max-steps {BIG} is out of range: integers must fit in 64 bits (|x| < 2**63)"),
    (["--lr", "nan"], "--lr must be a finite number (got nan)"),
    (["--max-minutes", "inf"], "--max-minutes must be a finite number (got inf)"),
    (["--betas", "0.9", "nan"], "--betas must be a finite number (got nan)"),
    (["--n-layer", "0"], "--n-layer must be >= 1 (got 0)"),
    (["--lr", "0.01", "--min-lr", "0.1"],
     "--min-lr 0.1 is above --lr 0.01: the cosine decay goes from --lr down to --min-lr"),
    (["--warmup-steps", "5", "--max-steps", "4"],
     "--warmup-steps 5 is more than the run's 4 steps (--max-steps): the LR would never reach --lr; lower "
     "--warmup-steps"),
])
def test_pretrain_numbers(shards, tmp_path, capsys, flags, message):  # noqa: F811
    """One shared check (gpt2.config.check_values, the loop's check_schedule) refuses what no run can use."""
    err = error_line(capsys, lambda: pretrain(shards, tmp_path / "run", *flags))
    assert err == f"gpt2 pretrain: error: {message}"
    assert not (tmp_path / "run").exists()


def test_pretrain_out_naming_a_file(shards, tmp_path, capsys):  # noqa: F811
    (tmp_path / "file").write_text("not a folder")
    err = error_line(capsys, lambda: pretrain(shards, tmp_path / "file"))
    assert err == f"gpt2 pretrain: error: --out {tmp_path / 'file'}: {tmp_path / 'file'} is a file, not a folder: " \
                  "choose another path"
    err = error_line(capsys, lambda: pretrain(shards, tmp_path / "file" / "run"))  # a file above it
    assert err.endswith(f"{tmp_path / 'file'} is a file, not a folder: choose another path")
    assert (tmp_path / "file").read_text() == "not a folder"


@pytest.mark.parametrize("argv, message", [
    (["generate", "--seed", BIG, "hi"], f"--seed must be an integer in [0, 2**63) (got {BIG})"),
    (["generate", "--temperature", "inf", "hi"], "--temperature must be a finite number (got inf)"),
    (["chat", "--prompt", ""], "--prompt is empty: give the message, or leave --prompt out to chat interactively"),
    (["chat", "--prompt", "  "], "--prompt is empty: give the message, or leave --prompt out to chat interactively"),
    (["chat", "--system", ""], "--system is empty: give a value, or leave --system out"),
    (["prepare", "alpaca", "--source", ""], "--source is empty: give a value, or leave --source out"),
    (["chat", "--temperature", "nan"], "--temperature must be a finite number (got nan)"),
    (["serve", "--threads", "-1"], "--threads must be >= 1 (got -1); leave it out for torch's choice"),
    (["serve", "--threads", "0"], "--threads must be >= 1 (got 0); leave it out for torch's choice"),
    (["serve", "--max-batch-size", "0"], "--max-batch-size must be >= 1 (got 0)"),
    (["prepare", "alpaca", "--seed", BIG], f"--seed must be an integer in [0, 2**63) (got {BIG})"),
    (["eval", "val-loss", "--batch-size", "0"], "--batch-size must be >= 1 (got 0)"),
])
def test_numbers_and_empty_text_of_other_commands(model_dir, capsys, argv, message):  # noqa: F811
    """Refused before any model loads (--model names a real one, so only the flag can be at fault)."""
    name = " ".join(argv[:2]) if argv[0] in ("prepare", "eval") else argv[0]
    extra = [] if argv[0] == "prepare" else ["--model", str(model_dir)]
    err = error_line(capsys, lambda: main([*argv[:2 if name != argv[0] else 1], *extra,
                                           *argv[2 if name != argv[0] else 1:]]))
    assert err == f"gpt2 {name}: error: {message}"


def test_chat_refuses_nan_and_inf_temperatures_and_goes_on(model_dir, capsys, monkeypatch):  # noqa: F811
    import io

    script = "/temperature nan\nHello\n/temperature inf\n/temperature 1e999\nHello\n/temperature 0\nHello\n/quit\n"
    monkeypatch.setattr("sys.stdin", io.StringIO(script))
    messages = main(["chat", "--no-compile", "--model", str(model_dir), "--max-tokens", "4", "--temperature", "0.5",
                     "--device", "cpu"])
    out = capsys.readouterr().out
    for bad in ("nan", "inf", "inf"):  # 1e999 is inf as a float
        assert (f"error: /temperature must be a finite number >= 0, 0 = greedy (got {bad}); the temperature stays "
                "0.5\n") in out
    assert "(temperature 0.0)" in out and "Traceback" not in out and "error: this answer failed" not in out
    assert messages is None  # main returns nothing; the session answered all three questions:
    assert out.count("> ") >= 8


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_prepare_alpaca_refuses_a_record_larger_than_memory_should_hold(tokenizer_ok, tmp_path, capsys, monkeypatch,
                                                                       suffix):
    """A 2 GB line must not be read whole (and crash the tokenizer): the limit, lowered here, is refused with the
    size before the line or file is read into memory."""
    from gpt2.data import sources

    monkeypatch.setattr(sources, "MAX_RECORD_BYTES", 4096)
    ok = json.dumps({"instruction": "Say hi.", "output": "Hi."})
    big = json.dumps({"instruction": "Repeat.", "output": "x" * 10_000})
    source = tmp_path / f"alpaca{suffix}"
    source.write_text(f"{ok}\n{big}\n" if suffix == ".jsonl" else f"[{ok}, {big}]")
    err = error_line(capsys, lambda: main(["prepare", "alpaca", "--source", str(source), "--out",
                                           str(tmp_path / "out")]))
    if suffix == ".jsonl":
        assert err == (f"gpt2 prepare alpaca: error: {source}:2: the line is longer than 4,096 bytes, more than the "
                       "4,096 bytes one record may be (gpt2.data.sources.MAX_RECORD_BYTES); is it one record? cut it "
                       "down or leave it out")
    else:
        assert err == (f"gpt2 prepare alpaca: error: {source} is {source.stat().st_size:,} bytes, more than the 4,096 "
                       "bytes one record may be (gpt2.data.sources.MAX_RECORD_BYTES); a .json file is read whole: "
                       "write it as .jsonl, one record per line, which is read a line at a time")
    assert not (tmp_path / "out").exists()


@pytest.fixture
def rlhf(tmp_path, shared_data, tokenizer_ok):
    from test_rlhf_cli import setup

    return setup.__wrapped__(tmp_path, shared_data, tokenizer_ok)


RLHF = ["--device", "cpu", "--no-progress", "--batch-size", "4", "--lr", "1e-3", "--warmup-steps", "0"]


@pytest.mark.parametrize("flags, message", [
    (["--beta", "0"], "--beta must be > 0 (got 0.0): at 0 the DPO loss is ln 2 whatever the policy does, so nothing "
                      "would be trained"),
    (["--beta", "nan"], "--beta must be a finite number (got nan)"),
    (["--beta", "-0.1"], "--beta must be > 0 (got -0.1): at 0 the DPO loss is ln 2 whatever the policy does, so "
                         "nothing would be trained"),
    (["--max-steps", "4", "--warmup-steps", "10"],
     "--warmup-steps 10 is more than the run's 4 steps (--max-steps): the LR would never reach --lr; lower "
     "--warmup-steps"),
])
def test_dpo_flags_that_would_train_nothing(rlhf, capsys, flags, message):
    tmp, data, sft = rlhf
    err = error_line(capsys, lambda: main(["dpo", "--model", str(sft), "--data", str(data), "--out", str(tmp / "dpo"),
                                           *RLHF, *flags]))
    assert err == f"gpt2 dpo: error: {message}"
    assert not (tmp / "dpo").exists()


def test_dpo_warmup_beyond_the_epochs_run_length(rlhf, capsys):
    """Without --max-steps the run's length comes from --epochs; the warmup is checked against it once known."""
    tmp, data, sft = rlhf
    err = error_line(capsys, lambda: main(["dpo", "--model", str(sft), "--data", str(data), "--out", str(tmp / "dpo"),
                                           *RLHF, "--warmup-steps", "5"]))  # 8 pairs / 4 = 2 steps, 1 epoch
    assert err == ("gpt2 dpo: error: --warmup-steps 5 is more than the run's 2 steps (--max-steps): the LR would never "
                   "reach --lr; lower --warmup-steps")


def test_resume_with_another_command_names_the_run_and_its_command(rlhf, capsys):
    tmp, data, sft = rlhf
    run = tmp / "reward"
    main(["reward", "--model", str(sft), "--data", str(data), "--out", str(run), "--max-steps", "1", *RLHF])
    assert json.loads((run / "config.json").read_text())["command"] == "reward"
    capsys.readouterr()
    line = (f"{run} is a `gpt2 reward` run, not a `gpt2 {{}}` one: continue it with `gpt2 reward --out {run} "
            "--resume`, or choose another --out")
    for cmd in ("dpo", "finetune"):  # finetune would otherwise try to download its default --init, gpt2
        err = error_line(capsys, lambda cmd=cmd: main([cmd, "--out", str(run), "--resume"]))
        assert err == f"gpt2 {cmd}: error: {line.format(cmd)}"
    # without --resume: the same line rather than "pass --resume"
    err = error_line(capsys, lambda: main(["dpo", "--model", str(sft), "--data", str(data), "--out", str(run), *RLHF]))
    assert err == f"gpt2 dpo: error: {line.format('dpo')}"
    main(["reward", "--out", str(run), "--resume", "--max-steps", "2"])  # its own command continues it
    assert load_checkpoint(run)["step"] == 2


def test_resume_of_an_unrecorded_run_by_another_command(rlhf, capsys):
    """A run from before the command was recorded: its weights do not fit, said in one line."""
    tmp, data, sft = rlhf
    run = tmp / "reward"
    main(["reward", "--model", str(sft), "--data", str(data), "--out", str(run), "--max-steps", "1", *RLHF])
    state = load_checkpoint(run)
    del state["run_config"]["command"]
    gio.save_torch(state, run / "checkpoint.pt")
    saved = json.loads((run / "config.json").read_text())
    del saved["command"]
    (run / "config.json").write_text(json.dumps(saved))
    capsys.readouterr()
    err = error_line(capsys, lambda: main(["dpo", "--model", str(sft), "--data", str(data), "--out", str(run),
                                           "--resume", *RLHF]))
    assert err.startswith(f"gpt2 dpo: error: --resume: the weights in {run / 'checkpoint.pt'} do not fit this "
                          "command's model (")
    assert err.endswith(f"); was {run} made by another command?")


def test_ppo_reward_model_of_another_vocabulary(rlhf, capsys):
    from gpt2.rlhf.heads import RewardModel

    tmp, data, sft = rlhf
    policy = GPT.from_pretrained(sft)
    small = GPT(GPTConfig(**{**policy.config.__dict__, "vocab_size": policy.config.vocab_size - 7}))
    RewardModel(small).save_pretrained(tmp / "rm")
    err = error_line(capsys, lambda: main(["ppo", "--model", str(sft), "--reward-model", str(tmp / "rm"), "--data",
                                           str(data), "--out", str(tmp / "ppo"), "--max-new-tokens", "4", *RLHF]))
    assert err == (f"gpt2 ppo: error: --reward-model {tmp / 'rm'} has a vocabulary of {policy.config.vocab_size - 7} "
                   f"tokens but reads the token ids of --model {sft} ({policy.config.vocab_size} tokens): was it "
                   "trained with another tokenizer?")


@pytest.mark.parametrize("argv", [["generate", "Hello"], ["chat", "--prompt", "Hello", "--no-compile"]])
def test_a_model_of_another_vocabulary_reading_text(tmp_path, capsys, argv):
    """The GPT-2 tokenizer's ids (up to 50256) fed to a 300-token model failed deep in its embedding."""
    torch.manual_seed(0)
    GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=300)).save_pretrained(tmp_path / "m")
    err = error_line(capsys, lambda: main([argv[0], "--model", str(tmp_path / "m"), "--device", "cpu", *argv[1:]]))
    assert err == (f"gpt2 {argv[0]}: error: --model {tmp_path / 'm'} has a vocabulary of 300 tokens but reads the "
                   "token ids of the GPT-2 tokenizer (50257 tokens): was it trained with another tokenizer?")


# ------------------------------------------------------------------ files a command reads: one line naming the field

def tiny_model(path, vocab_size: int = 300):
    """A 1-layer model folder (n_embd 32, 2 heads, 16 positions) of `vocab_size` tokens."""
    torch.manual_seed(0)
    GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=vocab_size)).save_pretrained(path)
    return path


@pytest.mark.parametrize("change, message", [
    ({"n_head": 0}, "n_head must be an integer >= 1, got 0"),
    ({"n_layer": "12"}, 'n_layer must be an integer >= 1, got "12"'),
    ({"n_layer": True}, "n_layer must be an integer >= 1, got true"),
    ({"n_embd": 32.0}, "n_embd must be an integer >= 1, got 32.0"),
    ({"n_positions": -5}, "n_positions must be an integer >= 1, got -5"),
    ({"vocab_size": None}, "vocab_size must be an integer >= 1, got null"),
    ({"n_head": 3}, "n_embd (32) must be divisible by n_head (3)"),
    ({"layer_norm_epsilon": 0}, "layer_norm_epsilon must be a finite number > 0, got 0"),
    ({"layer_norm_epsilon": "1e-5"}, 'layer_norm_epsilon must be a finite number > 0, got "1e-5"'),
    ({"gpt2_scratch": {"vocab_pad_multiple": 0}}, "gpt2_scratch.vocab_pad_multiple must be an integer >= 1, got 0"),
    ([{"n_head": 2}], "expected a JSON object of settings, got an array"),
])
def test_a_config_json_of_wrong_types_or_ranges(tmp_path, capsys, change, message):
    """config.json's fields are checked (types, then ranges) before a model is built from them."""
    model = tiny_model(tmp_path / "m")
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, **change} if isinstance(change, dict) else change))
    err = error_line(capsys, lambda: main(["generate", "--model", str(model), "--device", "cpu", "hi"]), alone=True)
    assert err == f"gpt2 generate: error: {model / 'config.json'}: {message}"


@pytest.mark.parametrize("name, shape", [
    ("transformer.wte.weight", (310, 32)),  # too many rows: another vocabulary
    ("transformer.wte.weight", (290, 32)),  # too few rows: these were filled with zeros
    ("transformer.wte.weight", (300, 48)),  # another width
    ("wte.weight", (320, 32)),  # a file saved from transformers' GPT2Model: its names lack "transformer."
    ("transformer.h.0.mlp.c_fc.weight", (128, 32)),  # transposed
])
def test_weights_of_another_shape_than_the_config(tmp_path, capsys, name, shape):
    """Every tensor of model.safetensors is checked against config.json, the token embedding included: HF files
    hold exactly vocab_size rows, never the padding."""
    model = tiny_model(tmp_path / "m")
    weights = {(k if name.startswith("transformer.") else k.removeprefix("transformer.")): v
               for k, v in gio.load_safetensors(model / "model.safetensors").items()}
    want = tuple(weights[name].shape)
    weights[name] = torch.zeros(shape)
    gio.save_safetensors(weights, model / "model.safetensors")
    err = error_line(capsys, lambda: main(["generate", "--model", str(model), "--device", "cpu", "hi"]), alone=True)
    assert err == (f"gpt2 generate: error: {model / 'model.safetensors'}: tensor {name} has shape {shape}, but the "
                   f"model's config (config.json) needs {want}")


def _damage(path, line: int, field: str, value) -> None:
    """Set `field` of the JSON object on `line` (1-based) of `path` to `value` (an element when `field` is
    "name[i]")."""
    lines = path.read_text().splitlines()
    row = json.loads(lines[line - 1])
    name, _, index = field.partition("[")
    if index:
        row[name][int(index.rstrip("]"))] = value
    else:
        row[name] = value
    lines[line - 1] = json.dumps(row)
    path.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("kind, field, value, message", [
    ("alpaca", "answer_ids[1]", 50_300, "answer_ids[1] is 50300, not a token id of the GPT-2 tokenizer (an integer "
                                        "from 0 to 50256)"),
    ("alpaca", "question_ids[0]", -3, "question_ids[0] is -3, not a token id of the GPT-2 tokenizer (an integer from "
                                      "0 to 50256)"),
    ("alpaca", "question_ids", "1 2 3", "question_ids is a string, not a list of token ids"),
    ("hh", "chosen[0]", 1.5, "chosen[0] is 1.5, not a token id of the GPT-2 tokenizer (an integer from 0 to 50256)"),
    ("hh", "prompt[2]", "12", 'prompt[2] is "12", not a token id of the GPT-2 tokenizer (an integer from 0 to '
                              '50256)'),
])
def test_prepared_data_with_ids_that_are_not_token_ids(tmp_path, shared_data, tokenizer_ok, capsys, kind, field,
                                                       value, message):
    """`gpt2 prepare alpaca` / `prepare hh` output damaged by hand: refused when fine-tuning or DPO loads it."""
    data = tmp_path / kind
    if kind == "alpaca":
        source = tmp_path / "alpaca.jsonl"
        source.write_text("".join(json.dumps({"instruction": f"Say {w}.", "output": w}) + "\n"
                                  for w in ("hi", "yes", "no", "maybe")))
        main(["prepare", "alpaca", "--source", str(source), "--out", str(data), "--val-fraction", "0"])
    else:
        main(["prepare", "hh", "--source", str(shared_data / "hh_rlhf_harmless_test.jsonl.gz"), "--out", str(data),
              "--limit", "8", "--val-fraction", "0"])
    capsys.readouterr()
    _damage(data / "train.jsonl", 2, field, value)
    model = tiny_model(tmp_path / "m", vocab_size=50257)
    argv = (["finetune", "--init", str(model), "--data", str(data)] if kind == "alpaca" else
            ["dpo", "--model", str(model), "--data", str(data)])
    err = error_line(capsys, lambda: main([*argv, "--out", str(tmp_path / "run"), "--device", "cpu"]), alone=True)
    assert err == f"gpt2 {argv[0]}: error: {data / 'train.jsonl'}:2: {message}"
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


@pytest.mark.parametrize("command", ["dpo", "reward"])
def test_dpo_and_reward_with_a_model_of_another_vocabulary_than_the_pairs(rlhf, capsys, command):
    """The pairs' ids reach past the model's embedding: refused in one line (it was an IndexError)."""
    tmp, data, sft = rlhf
    config = GPT.from_pretrained(sft).config
    small = tmp / "small"
    GPT(GPTConfig(**{**config.__dict__, "vocab_size": config.vocab_size - 5})).save_pretrained(small)
    highest = max(t for line in (data / "train.jsonl").read_text().splitlines()
                  for seq in json.loads(line).values() for t in seq)
    err = error_line(capsys, lambda: main([command, "--model", str(small), "--data", str(data), "--out",
                                           str(tmp / "run"), *RLHF]), alone=True)
    assert err == (f"gpt2 {command}: error: --model {small} has a vocabulary of {config.vocab_size - 5} tokens but "
                   f"{data / 'train.jsonl'} holds token id {highest}: was the model trained, or the data prepared, "
                   "with another tokenizer?")


@pytest.mark.parametrize("command", ["ppo", "eval hellaswag"])
def test_a_prompts_or_hellaswag_file_that_is_not_utf8(tmp_path, capsys, command):
    """The line named is the one holding the bad byte, also far past the reader's first buffer."""
    if command == "ppo":
        good = "What is the capital of France?\n"
        from gpt2.rlhf.heads import RewardModel

        model = tiny_model(tmp_path / "m", vocab_size=50257)
        RewardModel(GPT.from_pretrained(model)).save_pretrained(tmp_path / "rm")
        argv = ["ppo", "--model", str(model), "--reward-model", str(tmp_path / "rm"), "--prompts"]
        rest = ["--out", str(tmp_path / "run"), "--device", "cpu"]
    else:
        good = json.dumps({"ctx": "A man", "endings": ["a", "b", "c", "d"], "label": 0}) + "\n"
        argv, rest = ["eval", "hellaswag", "--model", str(tmp_path / "none"), "--source"], []
    path = tmp_path / "latin1.txt"
    path.write_bytes(good.encode() * 400 + good.replace("a", "\u00e0").encode("latin-1") + good.encode())
    err = error_line(capsys, lambda: main([*argv, str(path), *rest]), alone=True)
    assert err == f"gpt2 {command}: error: {path}:401: not UTF-8 text (byte 0xe0); save the file as UTF-8"


@pytest.mark.parametrize("variable, value, command, flags", [
    ("GPT2_COMPILE_CACHE_MAX_GB", "nan", "cache list", []),
    ("GPT2_COMPILE_CACHE_MAX_GB", "inf", "cache list", []),
    ("GPT2_COMPILE_CACHE_MAX_GB", "lots", "cache list", []),
    ("GPT2_COMPILE_CACHE_MAX_GB", "0", "cache list", []),
    ("GPT2_COMPILE_CACHE_MAX_GB", "lots", "generate", ["--compile", "hi"]),
    ("GPT2_COMPILE_CACHE", "a-file", "cache list", []),
    ("GPT2_COMPILE_CACHE", "a-file", "chat", ["--compile", "--prompt", "hi"]),
])
def test_compile_cache_settings(tmp_path, model_dir, capsys, monkeypatch, variable, value, command,  # noqa: F811
                                flags):
    """Checked where the commands use them: `gpt2 cache list`, and the compiled decoding of generate, chat and serve
    at their start (not in the thread that makes the pieces ready, which would leave decoding eager, unsaid)."""
    if value == "a-file":
        value = str(tmp_path / "a-file")
        (tmp_path / "a-file").write_text("")
    monkeypatch.setenv(variable, value)
    model = [] if command == "cache list" else ["--model", str(model_dir), "--device", "cpu"]
    err = error_line(capsys, lambda: main([*command.split(), *model, *flags]), alone=True)
    if variable == "GPT2_COMPILE_CACHE":
        assert err == (f"gpt2 {command}: error: GPT2_COMPILE_CACHE={value}: {value} is a file, not a folder: choose "
                       f"another path, or unset it for {Path.home() / '.cache' / 'gpt2-scratch' / 'compiled'}")
    else:
        assert err == (f"gpt2 {command}: error: GPT2_COMPILE_CACHE_MAX_GB={value}: expected a positive finite number "
                       "of gigabytes (the compile cache's size bound; 8 when unset)")
