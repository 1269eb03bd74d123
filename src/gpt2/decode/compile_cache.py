"""The on-disk cache of compiled decoding pieces, kept like a checkpoint: whole or absent, checked, locked, bounded.

`gpt2.decode.compiled` builds and loads the pieces; this module owns only the folder they live in. Design decisions:
- **An entry is a folder named by its key** (`gpt2.decode.compiled.cache_key`: weights, config, torch, CPU) under
  `cache_root()`. It is built in a `.build-KEY-PID` folder beside it and renamed into place when complete, so
  a reader never sees half an entry.
- **A manifest, written last**, lists every file of the entry with its size and SHA-256, and what it was built
  for (the model's name, parameter count, torch). It is written and its hashes taken by `gpt2.io`
  (`write_json_atomic`, `file_sha256`), like every other checksummed file of the package. `verify` re-hashes
  every file before an entry is used (its cost: docs/compiled_decoding.md): a flipped byte, a cut-off file, a
  missing or extra file is caught, and the entry is rebuilt. An entry without a manifest is not an entry.
- **One builder per entry.** Building takes `KEY.lock` (`flock`, which the kernel releases when its holder
  dies, however it dies), so two processes that need the same entry build it once: the second waits and then
  finds it built. The same lock tells leftovers from builds in progress: a `.build-KEY-*` folder whose lock
  can be taken belongs to nobody and is removed (a builder killed with SIGKILL leaves one behind).
- **Bounded.** After a build, the least recently used entries are removed until the cache holds at most
  `$GPT2_COMPILE_CACHE_MAX_GB` (default 8 GB: a dozen 124M entries of ~650 MB); the entry just built and
  entries in use by another process are kept. `gpt2 cache` lists and removes entries.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from gpt2.errors import UserError
from gpt2.io import file_sha256, not_a_folder, write_json_atomic

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; concurrent first starts may then build twice
    fcntl = None  # type: ignore[assignment]

MANIFEST = "manifest.json"
BUILD_PREFIX = ".build-"
ROOT_ENV, MAX_GB_ENV = "GPT2_COMPILE_CACHE", "GPT2_COMPILE_CACHE_MAX_GB"
DEFAULT_MAX_GB = 8.0


def cache_root() -> Path:
    """Where compiled pieces are kept: $GPT2_COMPILE_CACHE, else ~/.cache/gpt2-scratch/compiled. A value naming a
    file (or a folder under one) is a UserError: listed, it would pass for an empty cache."""
    default = Path.home() / ".cache" / "gpt2-scratch" / "compiled"
    env = os.environ.get(ROOT_ENV)
    if not env:
        return default
    blocked = not_a_folder(env)
    if blocked is not None:
        raise UserError(f"{ROOT_ENV}={env}: {blocked}, or unset it for {default}")
    return Path(env)


def max_bytes() -> int:
    """The cache's size bound: $GPT2_COMPILE_CACHE_MAX_GB gigabytes (default 8); any other value than a positive
    finite number is a UserError naming the variable, not a bound silently replaced."""
    text = os.environ.get(MAX_GB_ENV, "").strip()
    if not text:
        return int(DEFAULT_MAX_GB * 1e9)
    try:
        gb = float(text)
    except ValueError:
        gb = math.nan
    if not (math.isfinite(gb) and gb > 0):
        raise UserError(f"{MAX_GB_ENV}={text}: expected a positive finite number of gigabytes (the compile "
                        f"cache's size bound; {DEFAULT_MAX_GB:g} when unset)")
    return int(gb * 1e9)


def check_settings() -> Path:
    """Both environment variables checked (a UserError naming the one at fault), at the start of whatever uses
    the cache: the compiled decoding path of a command checks them before its background thread starts, so a
    bad value is one line at startup rather than a failure inside that thread. Returns the cache's folder."""
    max_bytes()
    return cache_root()


def write_manifest(directory: Path, about: dict) -> None:
    """Checksum every file of `directory` into its manifest (written last, atomically)."""
    files = {p.name: {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
             for p in sorted(directory.iterdir()) if p.is_file() and p.name != MANIFEST}
    write_json_atomic(directory / MANIFEST, {**about, "created": time.time(), "files": files}, indent=1)


def read_manifest(directory: Path) -> dict | None:
    try:
        data = json.loads((directory / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("files"), dict) else None


def verify(directory: Path) -> str | None:
    """None when the entry is whole and every file matches its checksum, else what is wrong (one phrase)."""
    manifest = read_manifest(directory)
    if manifest is None:
        return "no readable manifest"
    present = {p.name for p in directory.iterdir() if p.is_file() and p.name != MANIFEST}
    if present != set(manifest["files"]):
        missing, extra = sorted(set(manifest["files"]) - present), sorted(present - set(manifest["files"]))
        return f"missing {missing}" if missing else f"unexpected {extra}"
    for name, want in manifest["files"].items():
        path = directory / name
        if path.stat().st_size != want.get("bytes") or file_sha256(path) != want.get("sha256"):
            return f"{name} does not match its checksum"
    return None


def touch(directory: Path) -> None:
    """Mark an entry as just used (eviction removes the least recently used first)."""
    with contextlib.suppress(OSError):
        os.utime(directory / MANIFEST)


# ---------------------------------------------------------------------------------------------- locking


class Lock:
    """An exclusive `flock` on ROOT/KEY.lock, released when closed or when the process dies."""

    def __init__(self, root: Path, key: str):
        self.path = root / f"{key}.lock"
        self._file = None

    def acquire(self, blocking: bool = True, on_wait: Callable[[], None] | None = None,
                poll: float = 0.2, give_up: Callable[[], bool] = lambda: False) -> bool:
        """Take the lock; with `blocking`, wait for it (calling `on_wait` once if it has to) until `give_up()`.
        Returns whether it was taken."""
        self._file = self.path.open("a+")
        if fcntl is None:
            return True
        waited = False
        while True:
            try:
                fcntl.flock(self._file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                if not blocking or give_up():
                    self.release()
                    return False
                if not waited and on_wait is not None:
                    on_wait()
                waited = True
                time.sleep(poll)

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing the descriptor drops the flock
            self._file = None


@contextlib.contextmanager
def locked(root: Path, key: str, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    lock = Lock(root, key)
    lock.acquire(on_wait=on_wait)
    try:
        yield
    finally:
        lock.release()


def build_folder(root: Path, key: str) -> Path:
    """A fresh folder for building entry `key` in (hold the key's lock while it exists)."""
    path = root / f"{BUILD_PREFIX}{key}-{os.getpid()}"
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def remove_leftovers(root: Path) -> list[Path]:
    """Remove build folders that no live process is building (their key's lock is free); returns them."""
    removed = []
    if not root.is_dir():
        return removed
    for path in root.glob(BUILD_PREFIX + "*"):
        key = path.name[len(BUILD_PREFIX):].rsplit("-", 1)[0]
        lock = Lock(root, key)
        if lock.acquire(blocking=False):
            try:
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
            finally:
                lock.release()
    return removed


# ---------------------------------------------------------------------------------------------- listing


@dataclass
class Entry:
    key: str
    path: Path
    model: str
    params: int
    bytes: int
    created: float
    last_used: float


def entries(root: Path | None = None) -> list[Entry]:
    """The cache's complete entries (those with a manifest), least recently used first."""
    root = root or cache_root()
    out = []
    if not root.is_dir():
        return out
    for path in root.iterdir():
        manifest = read_manifest(path) if path.is_dir() and not path.name.startswith(".") else None
        if manifest is None:
            continue
        size = sum(int(f.get("bytes", 0)) for f in manifest["files"].values())
        out.append(Entry(path.name, path, str(manifest.get("model", "?")), int(manifest.get("params", 0)), size,
                         float(manifest.get("created", 0)), (path / MANIFEST).stat().st_mtime))
    return sorted(out, key=lambda e: e.last_used)


def remove(root: Path, key: str) -> bool:
    """Remove entry `key` unless another process holds its lock (building or loading it); returns whether it
    was removed."""
    lock = Lock(root, key)
    if not lock.acquire(blocking=False):
        return False
    try:
        shutil.rmtree(root / key, ignore_errors=True)  # (the empty lock file stays: unlinking it would race)
        return True
    finally:
        lock.release()


def evict(root: Path, keep: str, limit: int | None = None) -> list[Entry]:
    """Remove least recently used entries (never `keep`) until the cache holds at most `limit` bytes (default
    `max_bytes()`); returns those removed."""
    limit = max_bytes() if limit is None else limit
    all_entries = entries(root)
    total = sum(e.bytes for e in all_entries)
    removed = []
    for e in all_entries:
        if total <= limit:
            break
        if e.key != keep and remove(root, e.key):
            total -= e.bytes
            removed.append(e)
    return removed
