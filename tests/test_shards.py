"""Shard format: exact header layout, memory-mapped reads, and clear errors for bad files."""

from __future__ import annotations

import numpy as np
import pytest

from gpt2.data.shards import HEADER_BYTES, MAGIC, VERSION, list_shards, read_shard, shard_name, write_shard
from gpt2.errors import UserError


def test_write_read_round_trip_and_exact_layout(tmp_path):
    toks = np.array([50256, 0, 1, 65535, 464, 50256], dtype=np.int64)
    p = write_shard(tmp_path / "x_train_000000.bin", toks)
    raw = p.read_bytes()
    assert len(raw) == HEADER_BYTES + 2 * len(toks)
    header = np.frombuffer(raw[:HEADER_BYTES], dtype="<i4")
    assert header[:3].tolist() == [MAGIC, VERSION, len(toks)] and not header[3:].any()
    assert np.frombuffer(raw[HEADER_BYTES:], dtype="<u2").tolist() == toks.tolist()
    got = read_shard(p)
    assert isinstance(got, np.memmap) and got.dtype == np.uint16 and got.tolist() == toks.tolist()
    assert not got.flags.writeable
    assert [f.name for f in tmp_path.iterdir()] == ["x_train_000000.bin"]  # no temp file left behind
    assert read_shard(write_shard(tmp_path / "e_val_000000.bin", [])).tolist() == []


def test_write_rejects_out_of_range(tmp_path):
    with pytest.raises(ValueError, match="65535"):
        write_shard(tmp_path / "a.bin", [70000])
    with pytest.raises(ValueError, match="65535"):
        write_shard(tmp_path / "a.bin", [-1])


def _corrupt(path, *, header=None, size=None):
    raw = bytearray(path.read_bytes())
    if header is not None:
        idx, value = header
        raw[4 * idx:4 * idx + 4] = np.array([value], dtype="<i4").tobytes()
    if size is not None:
        raw = raw[:size] if size <= len(raw) else raw + b"\0" * (size - len(raw))
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("change, message", [
    (dict(header=(0, 12345)), "not a token shard .magic 12345"),
    (dict(header=(1, 7)), "unsupported shard version 7"),
    (dict(size=HEADER_BYTES + 2 * 5 + 1), "truncated shard"),  # one byte short of 6 tokens
    (dict(size=HEADER_BYTES - 4), "truncated shard .* smaller than the 1024-byte header"),
    (dict(size=0), "truncated shard"),
    (dict(size=HEADER_BYTES + 2 * 6 + 2), "corrupt shard"),  # trailing bytes
    (dict(header=(2, 100)), "truncated shard: 1036 bytes, header says 100 tokens"),
])
def test_bad_shards_fail_clearly(tmp_path, change, message):
    p = write_shard(tmp_path / "d_train_000000.bin", list(range(6)))
    _corrupt(p, **change)
    with pytest.raises(UserError, match=f"d_train_000000.bin: {message}"):
        read_shard(p)


def test_list_shards(tmp_path):
    for split, idx in [("train", 10), ("train", 2), ("val", 0), ("train", 1)]:
        write_shard(tmp_path / shard_name("fw", split, idx), [1, 2])
    (tmp_path / ".fw_train_000003.bin.tmp123").write_bytes(b"partial")  # a crashed write: ignored
    assert [p.name for p in list_shards(tmp_path, "train")] == [
        "fw_train_000001.bin", "fw_train_000002.bin", "fw_train_000010.bin"]
    assert [p.name for p in list_shards(tmp_path, "val")] == ["fw_val_000000.bin"]
    with pytest.raises(UserError, match="split 'test'"):
        list_shards(tmp_path, "test")
    with pytest.raises(UserError, match="nope: no such data folder"):
        list_shards(tmp_path / "nope", "train")
    write_shard(tmp_path / shard_name("other", "train", 0), [1])
    with pytest.raises(UserError, match="several datasets .fw, other."):
        list_shards(tmp_path, "train")
