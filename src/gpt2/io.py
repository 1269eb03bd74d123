"""File writing and integrity: the one helper for atomic writes, and checksummed weight files.

Design decisions:
- `atomic_write(path)` is the only way the package writes a whole file. It writes a temporary file with a
  unique name in the same folder (a rename across file systems is not atomic), fsyncs it, renames it over
  `path` and fsyncs the folder, so after a crash, a SIGKILL or a full disk `path` holds either the old or the
  new bytes, never half of them. The temporary file is removed on any failure. The file gets mode 0666
  minus the umask (0644 usually), like a file made by `open()`; `mkstemp` alone would leave it 0600.
  `atomic_path(path)` is the same for a writer that opens the file by name itself (gguf's writer): it gets the
  temporary file's path. The temporary file is `flock`ed while it is written, so `remove_dead_temps` deletes
  what a killed writer left (a multi-GB GGUF file) without touching one being written.
- A disk error while writing (full disk, read-only file system, no permission) becomes a one-line
  `UserError` naming the file, not a traceback from deep inside torch or safetensors.
- Appends (metrics.jsonl) stay plain appends: a line cut short by a crash is skipped by its reader.
- Checksums: a file cannot hold the digest of its own bytes, so
  - `save_safetensors` stores a sha256 over the tensors (names, dtypes, shapes and bytes, in sorted name
    order) in the safetensors header's metadata, and `load_safetensors` recomputes it after loading. Files
    without that entry (OpenAI's GPT-2, other tools' exports) load unchecked: there is nothing to verify.
  - `save_torch` streams `torch.save` through a hasher and appends a 40-byte trailer (magic + sha256 of
    everything before it); `load_torch` verifies it before unpickling. A file without the trailer (written
    before checksums existed) loads unchecked.
  - `file_sha256` hashes a whole file (or its first bytes) by streaming it: the compile cache's manifest
    checksums its entries' files with it.
  Hashing streams and costs little next to the reading or writing it goes with (measured for a checkpoint's
  load: docs/benchmarks.md).
"""

from __future__ import annotations

import errno
import glob
import hashlib
import io
import json
import os
import re
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save

from gpt2.errors import UserError

# errno values that mean "this file cannot be written here", reported as one line naming the file
_DISK_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO, errno.EFBIG}
SHA256_KEY = "gpt2_scratch_sha256"
_TRAILER_MAGIC = b"GPT2SHA1"  # 8 bytes, then the 32-byte digest
_TRAILER_BYTES = len(_TRAILER_MAGIC) + 32


def _umask() -> int:
    """The process umask, read without changing it where Linux allows (os.umask sets it, racing threads)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def fsync_dir(directory: Path) -> None:
    """Make a rename in `directory` durable (a no-op where folders cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def not_a_folder(folder: str | os.PathLike) -> UserError | None:
    """A one-line UserError when `folder` or a folder above it exists as a file (say `--out` names a file), so
    it cannot be made; None when it is a folder or can be made."""
    for p in [Path(folder), *Path(folder).parents]:
        if p.exists():
            return None if p.is_dir() else UserError(f"{p} is a file, not a folder: choose another path")
    return None


def make_folder(folder: str | os.PathLike) -> None:
    """`mkdir -p` with one-line errors: a file in the way, a full disk, no permission."""
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise (not_a_folder(folder) or disk_error(folder, e) or e) from e


def disk_error(path: str | os.PathLike, e: OSError) -> UserError | None:
    """A one-line UserError for an OSError that means `path` cannot be written; None for other errors."""
    if e.errno not in _DISK_ERRORS:
        return None
    return UserError(f"cannot write {path}: {e.strerror or os.strerror(e.errno)} (errno {e.errno})")


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """`with atomic_path(path) as tmp: writer.write(tmp)`: for writers that open the file by name themselves
    (gguf's `GGUFWriter`). `tmp` is an empty temporary file beside `path` (".NAME.XXXXXXXX.tmp", mode 0666 minus
    the umask); when the block ends it is fsynced and renamed over `path`, and on any error it is removed.

    The temporary file stays locked (`flock`) until it is renamed, so `remove_dead_temps` can tell the leftover
    of a killed writer from a file being written. The parent folder is created if needed."""
    path = Path(path)
    tmp: str | None = None
    fd: int | None = None
    try:
        make_folder(path.parent)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.fchmod(fd, 0o666 & ~_umask())
        _lock(fd, blocking=True)
        yield Path(tmp)
        os.fsync(fd)  # the same file, however the writer opened it: its data reach the disk before the rename
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        err = disk_error(path, e)
        if err is None:
            raise
        raise err from e
    finally:
        if fd is not None:
            os.close(fd)  # releases the lock
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
    fsync_dir(path.parent)


@contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", encoding: str | None = "utf-8") -> Iterator[IO]:
    """`with atomic_write(path, "w") as f: f.write(...)`: `path` appears complete or not at all.

    mode: "wb" or "w" (text, `encoding`). The parent folder is created if needed."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write: mode must be 'w' or 'wb', got {mode!r}")
    with atomic_path(path) as tmp, open(tmp, mode, encoding=None if "b" in mode else encoding) as f:
        yield f


def _lock(fd: int, blocking: bool) -> bool:
    """An exclusive `flock` on `fd`: True once held, False when another process holds it (only when not
    `blocking`). True where `fcntl` does not exist (Windows): nothing is locked there."""
    try:
        import fcntl  # POSIX only
    except ImportError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
    except BlockingIOError:
        return False
    return True


def remove_dead_temps(path: str | os.PathLike, min_age_s: float = 5.0) -> list[Path]:
    """Delete the temporary files that `atomic_path` writers of `path` killed mid-write left beside it, and return
    them: the ones no living writer holds locked. A file younger than `min_age_s` is kept (its writer may not
    have locked it yet), and so is every file where locks do not exist (Windows)."""
    path = Path(path)
    if not path.parent.is_dir() or os.name != "posix":  # no flock elsewhere: a live file would look dead
        return []
    removed = []
    for p in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        try:
            if not _TEMP_NAME.fullmatch(p.name) or time.time() - p.stat().st_mtime < min_age_s:
                continue
            fd = os.open(p, os.O_RDONLY)
        except OSError:  # gone meanwhile
            continue
        try:
            if _lock(fd, blocking=False):
                p.unlink(missing_ok=True)
                removed.append(p)
        finally:
            os.close(fd)
    return removed


def remove_temp_files(folder: str | os.PathLike) -> None:
    """Delete what `atomic_write`s killed mid-write left in `folder` (".NAME.XXXXXXXX.tmp"; never a whole file).
    Only for a folder whose writers are this process: call it holding the folder's lock."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    for p in folder.iterdir():
        if _TEMP_NAME.fullmatch(p.name) and p.is_file():
            p.unlink(missing_ok=True)


_TEMP_NAME = re.compile(r"\..+\.[A-Za-z0-9_]{8}\.tmp")  # tempfile.mkstemp's 8 random characters


def write_bytes_atomic(path: str | os.PathLike, data: bytes | memoryview) -> None:
    with atomic_write(path, "wb") as f:
        f.write(data)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_write(path, "w") as f:
        f.write(text)


def write_json_atomic(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> None:
    write_text_atomic(path, json.dumps(obj, indent=indent) + "\n")


# ------------------------------------------------------------------------------------------- checksums


def file_sha256(path: str | os.PathLike, length: int | None = None) -> str:
    """The sha256 (hex) of the file's bytes, or of its first `length` bytes, read in 8 MB chunks (a file of any
    size costs that much memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        left = os.fstat(f.fileno()).st_size if length is None else length
        while left > 0 and (chunk := f.read(min(left, 1 << 23))):
            h.update(chunk)
            left -= len(chunk)
    return h.hexdigest()


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over each tensor's name, dtype, shape and bytes, in sorted name order (no copies for
    contiguous CPU tensors)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        if t.numel():
            h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return h.hexdigest()


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike,
                     metadata: dict[str, str] | None = None) -> None:
    """Write `tensors` as a safetensors file, atomically, with their sha256 in the metadata."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    meta = {"format": "pt", **(metadata or {}), SHA256_KEY: tensors_sha256(tensors)}
    write_bytes_atomic(path, save(tensors, metadata=meta))


def load_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file on CPU; if it carries our sha256, a mismatch is a UserError."""
    try:
        with safe_open(str(path), framework="pt") as f:
            expected = (f.metadata() or {}).get(SHA256_KEY)
        tensors = load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for a bad header
        raise UserError(f"cannot read {path}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                        ) from e
    if expected is not None and tensors_sha256(tensors) != expected:
        raise UserError(f"{path} is corrupt: its tensors do not match the sha256 stored in the file")
    return tensors


class _HashingWriter(io.RawIOBase):
    """A write-only file that hashes what it forwards to `f` (torch.save streams into it)."""

    def __init__(self, f: IO[bytes]):
        self.f, self.sha = f, hashlib.sha256()

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        self.sha.update(b)
        return self.f.write(b)


def save_torch(obj: Any, path: str | os.PathLike) -> None:
    """`torch.save(obj)` to `path` atomically, followed by a trailer holding the sha256 of the payload."""
    path = Path(path)
    with atomic_write(path, "wb") as f:
        writer = _HashingWriter(f)
        try:
            torch.save(obj, writer)
        except RuntimeError as e:  # torch wraps the file object's OSError (a full disk) in its own error
            cause = e.__cause__ or e.__context__
            if isinstance(cause, OSError):
                raise cause from e
            raise
        f.write(_TRAILER_MAGIC + writer.sha.digest())


def load_torch(path: str | os.PathLike, weights_only: bool = True) -> Any:
    """The object saved by `save_torch` (or a plain `torch.save` file), on CPU, after checking its sha256.

    The hash streams over the file; `torch.load` then reads the path itself: its zip reader finds the archive's
    directory by searching back from the end, so the 40-byte trailer after it is harmless (a test holds it)."""
    path = Path(path)
    stored = _trailer_digest(path)
    if stored is not None and file_sha256(path, path.stat().st_size - _TRAILER_BYTES) != stored.hex():
        raise UserError(f"{path} is corrupt: its bytes do not match the sha256 stored in the file")
    return torch.load(path, map_location="cpu", weights_only=weights_only)


def stored_sha256(path: str | os.PathLike) -> str | None:
    """The sha256 (hex) that a `save_torch` file's trailer holds, read without hashing the file: a cheap name for
    its contents. None when there is no such file or it has no trailer."""
    path = Path(path)
    digest = _trailer_digest(path) if path.is_file() else None
    return digest.hex() if digest is not None else None


def _trailer_digest(path: Path) -> bytes | None:
    """The sha256 that `save_torch`'s trailer holds; None for a file without one."""
    size = path.stat().st_size
    if size < _TRAILER_BYTES:
        return None
    with open(path, "rb") as f:
        f.seek(size - _TRAILER_BYTES)
        tail = f.read()
    return tail[len(_TRAILER_MAGIC):] if tail.startswith(_TRAILER_MAGIC) else None


# ------------------------------------------------------------------------------------------- run locks

_HELD: dict[str, int] = {}  # lock files this process holds -> nesting depth


@contextmanager
def dir_lock(directory: str | os.PathLike, name: str = "run.lock") -> Iterator[Path]:
    """Hold an exclusive lock on DIRECTORY/NAME, or raise a UserError naming the process that holds it.

    `fcntl.flock` on an open descriptor: the kernel drops it when the holder exits, however it exits (a crash,
    SIGKILL, a power cut), so a dead run never leaves the folder stuck; the file stays, holding the last
    holder's PID for the message. Re-entrant within one process (a stage may take it before the loop does).
    Where `fcntl` does not exist (Windows) nothing is locked."""
    directory = Path(directory)
    path = directory / name
    make_folder(directory)
    key = str(path.resolve())
    if key in _HELD:
        _HELD[key] += 1
        try:
            yield path
        finally:
            _HELD[key] -= 1
        return
    try:
        import fcntl  # POSIX only: where it is missing (Windows) the run directory is not locked
    except ImportError:
        yield path
        return
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        raise (disk_error(path, e) or e) from e
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise UserError(f"{directory} is in use by another run (pid {holder} holds {path}); wait for it to "
                            "end or choose another --out") from None
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError:
            pass  # the PID is only for the message; the lock itself is held
        _HELD[key] = 1
        try:
            yield path
        finally:
            del _HELD[key]
    finally:
        os.close(fd)  # releases the lock
