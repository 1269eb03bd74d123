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
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

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


def _open_bytes(path: Path) -> IO[bytes]:
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")


def decode_utf8(data: bytes, path: Path, first_line: int = 1) -> str:
    """`data`, the bytes of `path` from line `first_line` on, as text. Bytes that are not UTF-8 are a UserError
    naming the file and the line they are on (decoding a file as a whole stream would name the line where its
    reader's buffer began instead)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = first_line + data.count(b"\n", 0, e.start)
        raise UserError(f"{path}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x}); save the file as UTF-8"
                        ) from e


def text_lines(path: str | os.PathLike) -> Iterator[tuple[int, str]]:
    """(line number, line) of a UTF-8 text file (gzip-compressed when its name ends in .gz), a line at a time and
    never more than one record (`MAX_RECORD_BYTES`) of it in memory. The one reader of line-based files (JSON
    lines, HellaSwag, prompt lists, prepared data): a line that is not UTF-8, too long, or a file that cannot be
    read is a UserError naming the file and the line."""
    path = Path(path)
    lineno = 0
    try:
        with _open_bytes(path) as f:
            while raw := f.readline(MAX_RECORD_BYTES + 1):
                lineno += 1
                if len(raw) > MAX_RECORD_BYTES and not raw.endswith(b"\n"):
                    raise _too_big(f"{path}:{lineno}: the line", f"longer than {_size(MAX_RECORD_BYTES)}",
                                   "is it one record? cut it down or leave it out")
                if raw.endswith(b"\r\n"):  # as text mode reads it (Windows line ends)
                    raw = raw[:-2] + b"\n"
                yield lineno, decode_utf8(raw, path, lineno)
    except (gzip.BadGzipFile, EOFError, OSError) as e:
        raise UserError(f"{path}:{lineno + 1}: cannot read ({type(e).__name__}: {e})") from e


def jsonl_records(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """(line number, JSON object) of each non-blank line of a JSON-lines file (`text_lines`); a line that is not a
    JSON object is a UserError naming the file and the line."""
    path = Path(path)
    for lineno, line in text_lines(path):
        if line.strip():
            yield lineno, _as_record(_loads(line, path, lineno), path, lineno)


def _size(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB" if n >= 2**20 else f"{n:,} bytes"


def _too_big(what: str, size: str, how: str) -> UserError:
    return UserError(f"{what} is {size}, more than the {_size(MAX_RECORD_BYTES)} one record may be "
                     f"(gpt2.data.sources.MAX_RECORD_BYTES); {how}")


def _read_whole(path: Path, how: str) -> str:
    """The whole text of `path`, refused with its size (before reading it, where the file's size tells) when
    larger than one record may be."""
    size = path.stat().st_size
    if not path.name.lower().endswith(".gz") and size > MAX_RECORD_BYTES:
        raise _too_big(str(path), _size(size), how)
    try:
        with _open_bytes(path) as f:
            data = f.read(MAX_RECORD_BYTES + 1)
    except (gzip.BadGzipFile, EOFError, OSError) as e:
        raise UserError(f"{path}: cannot read ({type(e).__name__}: {e})") from e
    if len(data) > MAX_RECORD_BYTES:  # compressed: its size is known only once read this far
        raise _too_big(str(path), f"more than {_size(MAX_RECORD_BYTES)} uncompressed", how)
    # universal newlines, as text mode reads a file: a document's Windows line ends become "\n"
    return decode_utf8(data, path).replace("\r\n", "\n").replace("\r", "\n")


def _read_jsonl(path: Path) -> Iterator[dict]:
    for _, record in jsonl_records(path):
        yield record


def _read_json(path: Path) -> Iterator[dict]:
    """A JSON array of objects (or one object); anything else is read as JSON lines."""
    text = _read_whole(path, "a .json file is read whole: write it as .jsonl, one record per line, which is read "
                             "a line at a time")
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
    yield {"text": _read_whole(path, "a .txt file is one document: split it into several files, or write it as "
                                     ".jsonl with one document per line")}


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
