"""gpt2.io: atomic writes (mode, fsync, no temp file left on failure) and checksummed weight files."""

from __future__ import annotations

import errno
import hashlib
import os
import stat

import pytest
import torch

from gpt2 import io as gio
from gpt2.checkpoint import load_checkpoint, load_model, save_checkpoint
from gpt2.errors import UserError
from gpt2.model import GPT, GPTConfig
from gpt2.rlhf.heads import REWARD_HEAD, RewardModel


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def flip_middle(path, n=16):
    """Invert n bytes in the middle of the file (a bad disk sector, a truncated copy patched up...)."""
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid:mid + n] = bytes(b ^ 0xFF for b in data[mid:mid + n])
    path.write_bytes(bytes(data))


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_atomic_write_makes_a_0644_file_and_fsyncs_it_and_its_folder(tmp_path, umask_022, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    path = tmp_path / "sub" / "a.json"
    gio.write_json_atomic(path, {"x": 1})
    assert path.read_text() == '{\n  "x": 1\n}\n'
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert len(synced) == 2  # the file before the rename, the folder after it
    assert os.listdir(path.parent) == ["a.json"]


def test_atomic_write_respects_the_umask(tmp_path):
    old = os.umask(0o077)
    try:
        gio.write_bytes_atomic(tmp_path / "b", b"x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "b").stat().st_mode) == 0o600


def test_a_full_disk_keeps_the_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "a.txt"
    gio.write_text_atomic(path, "old")
    monkeypatch.setattr(os, "fsync", _enospc)
    with pytest.raises(UserError, match=r"^cannot write .*a\.txt: No space left on device \(errno 28\)$"):
        gio.write_text_atomic(path, "new")
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["a.txt"]


def test_an_error_in_the_body_removes_the_temp_and_propagates(tmp_path):
    with pytest.raises(KeyError):
        with gio.atomic_write(tmp_path / "c", "w") as f:
            f.write("partial")
            raise KeyError("x")
    assert os.listdir(tmp_path) == []


def test_checkpoint_full_disk_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint({"step": 1, "w": torch.arange(1000)}, path)
    monkeypatch.setattr(gio._HashingWriter, "write", _enospc)
    with pytest.raises(UserError, match="No space left on device"):
        save_checkpoint({"step": 2, "w": torch.arange(1000)}, path)
    assert os.listdir(tmp_path) == ["checkpoint.pt"]
    assert load_checkpoint(path)["step"] == 1


def test_corrupted_checkpoint_is_refused(tmp_path):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint({"step": 3, "w": torch.randn(4096)}, path)
    assert load_checkpoint(path)["step"] == 3
    flip_middle(path)
    with pytest.raises(UserError, match=r"checkpoint\.pt is corrupt"):
        load_checkpoint(path)


def test_plain_torch_save_files_still_load(tmp_path):
    path = tmp_path / "old.pt"
    torch.save({"step": 5}, path)
    assert load_checkpoint(path)["step"] == 5


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    return GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=300))


def test_file_sha256_streams_a_whole_file_or_its_first_bytes(tmp_path):
    data = os.urandom((1 << 23) + 100)  # more than one chunk
    (tmp_path / "f").write_bytes(data)
    assert gio.file_sha256(tmp_path / "f") == hashlib.sha256(data).hexdigest()
    assert gio.file_sha256(tmp_path / "f", 1 << 23) == hashlib.sha256(data[: 1 << 23]).hexdigest()
    (tmp_path / "empty").write_bytes(b"")
    assert gio.file_sha256(tmp_path / "empty") == hashlib.sha256(b"").hexdigest()


def test_corrupted_model_safetensors_is_refused(tmp_path, tiny):
    tiny.save_pretrained(tmp_path)
    assert torch.equal(load_model(tmp_path).transformer.wpe.weight, tiny.transformer.wpe.weight)
    flip_middle(tmp_path / "model.safetensors")
    with pytest.raises(UserError, match=r"model\.safetensors is corrupt"):
        load_model(tmp_path)


def test_safetensors_without_our_checksum_load_unchecked(tmp_path, tiny):
    from safetensors.torch import save_file

    tiny.save_pretrained(tmp_path)
    save_file(tiny.hf_state_dict(), str(tmp_path / "model.safetensors"), metadata={"format": "pt"})  # OpenAI's
    assert torch.equal(load_model(tmp_path).transformer.h[0].mlp.c_fc.weight, tiny.transformer.h[0].mlp.c_fc.weight)


def test_corrupted_reward_head_is_refused(tmp_path, tiny):
    RewardModel(tiny).save_pretrained(tmp_path)
    RewardModel.from_pretrained(tmp_path)
    head = tmp_path / REWARD_HEAD
    data = bytearray(head.read_bytes())
    data[-10] ^= 0xFF  # inside the tensor bytes (the file is small: its middle is the JSON header)
    head.write_bytes(bytes(data))
    with pytest.raises(UserError, match=r"reward_head\.safetensors is corrupt"):
        RewardModel.from_pretrained(tmp_path)


def test_cli_reports_a_corrupted_model_in_one_line(tmp_path, tiny, capsys, tokenizer_ok):
    from gpt2.cli import main

    tiny.save_pretrained(tmp_path)
    flip_middle(tmp_path / "model.safetensors")
    with pytest.raises(SystemExit) as e:
        main(["generate", "--model", str(tmp_path), "--device", "cpu", "hi"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "\n" not in err
    assert err == f"gpt2 generate: error: {tmp_path / 'model.safetensors'} is corrupt: its tensors do not match " \
                  "the sha256 stored in the file"


def test_files_the_issue_found_0600_are_0644(tmp_path, tiny, umask_022):
    """model.safetensors, loss.png, the Alpaca jsonl and manifest.json were written through mkstemp (0600)."""
    import json

    from gpt2.data.alpaca import write_examples
    from gpt2.plots import plot_run

    tiny.save_pretrained(tmp_path / "model")
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"kind": "train", "step": s, "loss": 5.0 - s / 10,
                                                                "lr": 1e-3}) + "\n" for s in range(1, 5)))
    plot_run(tmp_path)
    write_examples(tmp_path / "train.jsonl", [([1, 2], [3])])
    for path in (tmp_path / "model" / "model.safetensors", tmp_path / "model" / "config.json",
                 tmp_path / "loss.png", tmp_path / "train.jsonl"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path


def test_remove_dead_temps_removes_a_killed_writers_file_only(tmp_path):
    """A writer's temporary file stays locked while it is written: old or not, it is spared; an old unlocked one (its
    writer was killed) is removed; a young one is kept (its writer may not have locked it yet)."""
    target = tmp_path / "big.gguf"
    dead, young = tmp_path / ".big.gguf.abcd1234.tmp", tmp_path / ".big.gguf.efgh5678.tmp"
    dead.write_bytes(b"left by a killed export")
    young.write_bytes(b"just created")
    os.utime(dead, (0, 0))
    with gio.atomic_path(target) as tmp:
        tmp.write_bytes(b"being written")
        os.utime(tmp, (0, 0))
        assert gio.remove_dead_temps(target) == [dead]
        assert tmp.exists() and young.exists()
    assert target.read_bytes() == b"being written"
    assert sorted(p.name for p in tmp_path.iterdir()) == [young.name, target.name]
