"""The token shard format: a fixed header, then uint16 GPT-2 token ids.

Layout of a `.bin` shard (all little-endian):

    bytes [0, 1024)     header: 256 int32
                          header[0] = MAGIC   (20240520)
                          header[1] = VERSION (1)
                          header[2] = number of tokens N in this shard
                          header[3:] = 0 (reserved)
    bytes [1024, 1024 + 2N)   N tokens, uint16 (GPT-2's 50257 ids fit in 16 bits)

This is byte-for-byte the format of llm.c's and modded-nanogpt's FineWeb shards, so shards written by
either can be trained on here and vice versa.

Design decisions:
- `read_shard` memory-maps the tokens and never copies the file: a 100M-token shard costs nothing until a
  batch touches it. It checks the magic, the version, and that the file size is exactly header + 2N bytes,
  so a truncated or foreign file is a `UserError` naming the file, never a silent misread.
- `write_shard` writes through `gpt2.io.atomic_write` (temp file in the same folder, fsync, rename), so a
  crash or a full disk mid-write never leaves a file that looks like a complete shard.
- Names are `{prefix}_{split}_{index:06d}.bin` (e.g. `fineweb_val_000000.bin`, `fineweb_train_000001.bin`);
  `list_shards` finds one split's shards in index order.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from gpt2.errors import UserError
from gpt2.io import atomic_write

MAGIC = 20240520
VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
MAX_TOKENS = 2**31 - 1  # the count is an int32
SPLITS = ("train", "val")
_HEADER_DTYPE = np.dtype("<i4")
_TOKEN_DTYPE = np.dtype("<u2")


def shard_name(prefix: str, split: str, index: int) -> str:
    return f"{prefix}_{split}_{index:06d}.bin"


def write_shard(path: str | Path, tokens: np.ndarray | list[int]) -> Path:
    """Write `tokens` (ids in [0, 65535]) as one shard at `path`, atomically. Returns the path."""
    path = Path(path)
    arr = np.asarray(tokens)
    if arr.ndim != 1:
        raise ValueError(f"tokens must be 1-D, got shape {arr.shape}")
    if len(arr) > MAX_TOKENS:
        raise ValueError(f"{len(arr)} tokens do not fit one shard (max {MAX_TOKENS})")
    if arr.dtype != _TOKEN_DTYPE:
        if len(arr) and (arr.min() < 0 or arr.max() > np.iinfo(np.uint16).max):
            raise ValueError("token ids must be in [0, 65535] to be stored as uint16")
        arr = arr.astype(_TOKEN_DTYPE)
    header = np.zeros(HEADER_INTS, dtype=_HEADER_DTYPE)
    header[:3] = (MAGIC, VERSION, len(arr))
    with atomic_write(path, "wb") as f:
        f.write(header.tobytes())
        f.write(arr.tobytes())
    return path


def read_header(path: str | Path) -> int:
    """Validate the shard at `path` (magic, version, exact size) and return its token count."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(HEADER_BYTES)
    except OSError as e:
        raise UserError(f"{path}: cannot read shard ({e.strerror or e})") from e
    if len(raw) < HEADER_BYTES:
        raise UserError(f"{path}: truncated shard ({size} bytes, smaller than the {HEADER_BYTES}-byte header)")
    header = np.frombuffer(raw, dtype=_HEADER_DTYPE)
    if header[0] != MAGIC:
        raise UserError(f"{path}: not a token shard (magic {int(header[0])}, expected {MAGIC})")
    if header[1] != VERSION:
        raise UserError(f"{path}: unsupported shard version {int(header[1])} (this code reads {VERSION})")
    count = int(header[2])
    expected = HEADER_BYTES + 2 * count
    if count < 0 or size != expected:
        what = "truncated" if size < expected else "corrupt"
        raise UserError(f"{path}: {what} shard: {size} bytes, header says {count} tokens ({expected} bytes)")
    return count


def read_shard(path: str | Path) -> np.ndarray:
    """The tokens of the shard at `path` as a read-only uint16 array, memory-mapped (nothing copied)."""
    count = read_header(path)
    if count == 0:  # mmap cannot map zero bytes
        return np.zeros(0, dtype=_TOKEN_DTYPE)
    return np.memmap(path, dtype=_TOKEN_DTYPE, mode="r", offset=HEADER_BYTES, shape=(count,))


_NAME = re.compile(r"^(?P<prefix>.+)_(?P<split>train|val)_(?P<index>\d{6,})\.bin$")


def list_shards(data_dir: str | Path, split: str) -> list[Path]:
    """The `split` ("train" or "val") shards in `data_dir`, in index order (possibly empty)."""
    if split not in SPLITS:
        raise UserError(f"split {split!r}: expected one of {', '.join(SPLITS)}")
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise UserError(f"{data_dir}: no such data folder")
    found = []
    for p in data_dir.iterdir():
        m = _NAME.match(p.name)
        if m and m["split"] == split and p.is_file():
            found.append((m["prefix"], int(m["index"]), p))
    prefixes = sorted({prefix for prefix, _, _ in found})
    if len(prefixes) > 1:  # two datasets in one folder would be silently concatenated
        raise UserError(f"{data_dir}: shards of several datasets ({', '.join(prefixes)}) in one folder")
    return [p for _, _, p in sorted(found, key=lambda t: t[1])]


def check_token_ids(tokens, vocab_size: int, shards: list[Path]) -> None:
    """Raise a UserError naming the shard if `tokens` (a batch read from `shards`, tensor or array) holds an id
    >= vocab_size, which would otherwise be an IndexError deep inside the embedding. The batch's max is one
    cheap reduction per batch (scanning every shard up front would read the whole dataset before step 1);
    the shards themselves are scanned only to name the culprit."""
    if len(tokens) == 0 or int(tokens.max()) < vocab_size:
        return
    for path in shards:
        ids = read_shard(path)
        if len(ids) and (top := int(ids.max())) >= vocab_size:
            raise UserError(f"{path}: token id {top} is outside the model's vocabulary ({vocab_size} ids, "
                            "--vocab-size); were these shards made with another tokenizer?")
    raise UserError(f"token id {int(tokens.max())} read from {len(shards)} shard(s) is outside the model's "
                    f"vocabulary ({vocab_size} ids)")

