"""Bad input and a hostile machine get one line naming the flag or file (exit status 2), never a traceback:
nonsense flags, unavailable devices, foreign token ids, empty sources, a full disk, two runs on one --out."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from test_generate_cli import model_dir  # noqa: F401  (fixture: a 64-token model)
from test_pretrain import VOCAB, pretrain, shards  # noqa: F401  (shards: fixture)
from test_train_loop import _one_thread  # noqa: F401  (autouse: one torch thread for tiny models)

from gpt2 import io as gio
from gpt2.checkpoint import load_checkpoint
from gpt2.cli import main
from gpt2.data.shards import write_shard
from gpt2.model import GPT, GPTConfig


def error_line(capsys, run) -> str:
    """Run `run()`, expect exit status 2 and return its error line (the last line of stderr: progress bars may
    come before it)."""
    with pytest.raises(SystemExit) as e:
        run()
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err, err
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
    main(["generate", "--model", str(model_dir), "--device", "cpu", "--temperature", "0", "--max-steps", "400",
          "Hello"])  # "Hello" is 1 token: 63 new tokens fill the 64-token window
    err = capsys.readouterr().err.strip()
    assert err == "note: stopped after 63 of --max-steps 400 new tokens at the model's context window (64 tokens)"
    main(["generate", "--model", str(model_dir), "--device", "cpu", "--temperature", "0", "--max-steps", "5",
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
