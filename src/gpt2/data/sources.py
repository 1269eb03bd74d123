"""One place that turns a Hugging Face hub id or local files into an iterator of records (dicts).

Every data-preparation command (`prepare fineweb`, `prepare alpaca`, ...) reads through `iter_records`, so
the hub download and a user's own files go down the same code path, and the tests (offline) exercise the
exact code that users run online.

Design decisions:
- `source=None` streams the hub dataset (`datasets.load_dataset(..., streaming=True)`): the raw parquet
  never lands on disk, so a 10B-token download never needs room for raw data and shards at once.
- Local formats are picked by file suffix: `.parquet` (rows read batch-wise with pyarrow, so a multi-GB
  file is never loaded whole), `.jsonl` / `.jsonl.gz` (one JSON object per line, blank lines skipped),
  `.json` / `.json.gz` (a JSON array of objects, or JSON lines), `.txt` (the whole file is one record
  `{"text": ...}`).
- A folder is walked recursively in sorted order of relative path, so the record order (and therefore
  every shard written from it) is deterministic. Files with other suffixes and hidden files are skipped
  (folders downloaded from the hub hold `.gitattributes`, READMEs, ...); a folder with no readable file is
  an error, not a silent empty dataset.
- Bad input (missing path, undecodable bytes, malformed JSON, a non-object row) raises `UserError` naming
  the file, and the line for line-based formats.
- Memory stays bounded whatever the file: JSON lines are read one at a time, and one record (a line, or a
  `.json`/`.txt` file, which is read whole) may be at most `MAX_RECORD_BYTES` (64 MiB, far above any real
  record: Alpaca's and HH's are a few KB, a FineWeb document well under 1 MB). Anything larger is refused with
  its size before it is read into memory (a 2 GB line would otherwise be read whole and then crash the
  tokenizer).
"""

from __future__ import annotations

import gzip
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from gpt2.errors import UserError

# Suffixes we read, longest first so ".jsonl.gz" wins over ".gz".
SUFFIXES = (".jsonl.gz", ".json.gz", ".parquet", ".jsonl", ".json", ".txt")
PARQUET_BATCH_ROWS = 1024
MAX_RECORD_BYTES = 64 << 20  # one line, or one .json/.txt file read whole (module docstring)


def iter_records(source: str | None, hub_id: str, hub_config: str | None = None,
                 split: str = "train") -> Iterator[dict]:
    """Records (dicts) from `source` (a local file or folder) or, when `source` is None, streamed from
    the hub dataset `hub_id` / `hub_config` / `split`."""
    if source is None:
        return _iter_hub(hub_id, hub_config, split)
    return _iter_local(Path(source))


def local_files(path: Path) -> list[Path]:
    """The readable files under `path` in the order `iter_records` reads them (a file: itself)."""
    if not path.exists():
        raise UserError(f"{path}: no such file or folder")
    if path.is_file():
        if _suffix(path) is None:
            raise UserError(f"{path}: unsupported file type (expected one of {', '.join(SUFFIXES)})")
        return [path]
    files = sorted((p for p in path.rglob("*") if p.is_file() and _suffix(p) is not None
                    and not any(part.startswith(".") for part in p.relative_to(path).parts)),
                   key=lambda p: p.relative_to(path).as_posix())
    if not files:
        raise UserError(f"{path}: folder holds no {', '.join(SUFFIXES)} files")
    return files


def _suffix(path: Path) -> str | None:
    name = path.name.lower()
    return next((s for s in SUFFIXES if name.endswith(s)), None)


def _iter_local(path: Path) -> Iterator[dict]:
    files = local_files(path)  # outside the generator: a bad path fails at the call, not at first next()

    def gen() -> Iterator[dict]:
        for f in files:
            yield from _READERS[_suffix(f)](f)

    return gen()


def _iter_hub(hub_id: str, hub_config: str | None, split: str) -> Iterator[dict]:
    name = f"{hub_id}" + (f" (config {hub_config})" if hub_config else "") + f" split {split}"
    try:
        import datasets  # about a second to import, and only the hub path needs it

        ds = datasets.load_dataset(hub_id, hub_config, split=split, streaming=True)
    except Exception as e:  # network, auth and unknown-name errors come in many types
        raise UserError(f"cannot stream {name} from the Hugging Face Hub ({type(e).__name__}: {e}); "
                        f"offline? pass local files with --source") from e

    def gen() -> Iterator[dict]:
        try:
            for rec in ds:
                yield dict(rec)
        except Exception as e:
            raise UserError(f"streaming {name} failed ({type(e).__name__}: {e}); re-run to resume") from e

    return gen()


def _read_parquet(path: Path) -> Iterator[dict]:
    # pyarrow only for .parquet files: every `gpt2` command imports this module, few read parquet
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
        for batch in pf.iter_batches(batch_size=PARQUET_BATCH_ROWS):
            yield from batch.to_pylist()
    except (pa.ArrowException, OSError) as e:
        raise UserError(f"{path}: not a readable parquet file ({e})") from e


def _open_text(path: Path) -> io.TextIOBase:
    if path.name.lower().endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return open(path, encoding="utf-8")


def _size(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB" if n >= 2**20 else f"{n:,} bytes"


def _too_big(what: str, size: str, how: str) -> UserError:
    return UserError(f"{what} is {size}, more than the {_size(MAX_RECORD_BYTES)} one record may be "
                     f"(gpt2.data.sources.MAX_RECORD_BYTES); {how}")


def _read_whole(f: io.TextIOBase, path: Path, how: str) -> str:
    """The whole text of `f`, refused with its size (before reading it, where the file's size tells) when
    larger than one record may be."""
    size = path.stat().st_size
    if not path.name.lower().endswith(".gz") and size > MAX_RECORD_BYTES:
        raise _too_big(str(path), _size(size), how)
    text = f.read(MAX_RECORD_BYTES + 1)
    if len(text) > MAX_RECORD_BYTES:  # compressed: its size is known only once read this far
        raise _too_big(str(path), f"more than {_size(MAX_RECORD_BYTES)} uncompressed", how)
    return text


def _read_jsonl(path: Path) -> Iterator[dict]:
    lineno = 0
    try:
        with _open_text(path) as f:
            while line := f.readline(MAX_RECORD_BYTES + 1):  # a line at a time, never more than one record
                lineno += 1
                if len(line) > MAX_RECORD_BYTES and not line.endswith("\n"):
                    raise _too_big(f"{path}:{lineno}: the line", f"longer than {_size(MAX_RECORD_BYTES)}",
                                   "is it one record? cut it down or leave it out")
                if line.strip():
                    yield _as_record(_loads(line, path, lineno), path, lineno)
    except (UnicodeDecodeError, gzip.BadGzipFile, EOFError, OSError) as e:
        raise UserError(f"{path}:{lineno + 1}: cannot read ({type(e).__name__}: {e})") from e


def _read_json(path: Path) -> Iterator[dict]:
    """A JSON array of objects (or one object); anything else is read as JSON lines."""
    try:
        with _open_text(path) as f:
            text = _read_whole(f, path, "a .json file is read whole: write it as .jsonl, one record per line, "
                                        "which is read a line at a time")
    except (UnicodeDecodeError, gzip.BadGzipFile, EOFError, OSError) as e:
        raise UserError(f"{path}: cannot read ({type(e).__name__}: {e})") from e
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if not text.lstrip().startswith("{"):  # a broken array: report where it breaks
            raise UserError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from e
        yield from _read_jsonl(path)  # several objects: JSON lines
        return
    if isinstance(data, dict):
        yield data
        return
    if not isinstance(data, list):
        raise UserError(f"{path}: expected a JSON array of objects, got {type(data).__name__}")
    for i, rec in enumerate(data):
        if not isinstance(rec, dict):
            raise UserError(f"{path}: element {i} of the array is a {type(rec).__name__}, not an object")
        yield rec


def _read_txt(path: Path) -> Iterator[dict]:
    try:
        with open(path, encoding="utf-8") as f:
            text = _read_whole(f, path, "a .txt file is one document: split it into several files, or write "
                                        "it as .jsonl with one document per line")
        yield {"text": text}
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e})") from e


def _loads(line: str, path: Path, lineno: int) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{lineno}: invalid JSON ({e.msg})") from e


def _as_record(obj: Any, path: Path, lineno: int) -> dict:
    if not isinstance(obj, dict):
        raise UserError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
    return obj


_READERS = {".parquet": _read_parquet, ".jsonl": _read_jsonl, ".jsonl.gz": _read_jsonl,
            ".json": _read_json, ".json.gz": _read_json, ".txt": _read_txt}
