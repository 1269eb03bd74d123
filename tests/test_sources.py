"""`iter_records` on small temp files of every supported format, folders, and bad input."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gpt2.data.sources import iter_records, local_files
from gpt2.errors import UserError

ROWS = [{"text": "first doc", "id": 1}, {"text": "second\ndoc ünïcode", "id": 2}, {"text": "", "id": 3}]


def read(path: Path | str) -> list[dict]:
    return list(iter_records(str(path), hub_id="unused/never-contacted"))


def test_parquet_batches(tmp_path, monkeypatch):
    import gpt2.data.sources as sources

    monkeypatch.setattr(sources, "PARQUET_BATCH_ROWS", 2)  # several row batches, still in order
    p = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS * 3), p, row_group_size=4)
    assert read(p) == ROWS * 3


def test_jsonl_and_gz(tmp_path):
    lines = "\n".join(json.dumps(r) for r in ROWS) + "\n\n"  # trailing blank line is skipped
    (tmp_path / "a.jsonl").write_text(lines, encoding="utf-8")
    with gzip.open(tmp_path / "b.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(lines)
    assert read(tmp_path / "a.jsonl") == ROWS
    assert read(tmp_path / "b.jsonl.gz") == ROWS


def test_json_array_object_and_lines(tmp_path):
    (tmp_path / "arr.json").write_text(json.dumps(ROWS, indent=2), encoding="utf-8")
    (tmp_path / "one.json").write_text(json.dumps(ROWS[0], indent=2), encoding="utf-8")
    (tmp_path / "lines.json").write_text("\n".join(json.dumps(r) for r in ROWS), encoding="utf-8")
    assert read(tmp_path / "arr.json") == ROWS
    assert read(tmp_path / "one.json") == [ROWS[0]]
    assert read(tmp_path / "lines.json") == ROWS


def test_txt_is_one_record(tmp_path):
    (tmp_path / "t.txt").write_text("line 1\nline 2\n", encoding="utf-8")
    assert read(tmp_path / "t.txt") == [{"text": "line 1\nline 2\n"}]


def test_folder_sorted_recursive_skips_other_files(tmp_path):
    (tmp_path / "b.txt").write_text("B", encoding="utf-8")
    (tmp_path / "a.txt").write_text("A", encoding="utf-8")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.jsonl").write_text('{"text": "C"}\n', encoding="utf-8")
    (tmp_path / "README.md").write_text("ignored", encoding="utf-8")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "x.txt").write_text("ignored", encoding="utf-8")
    assert [r["text"] for r in read(tmp_path)] == ["A", "B", "C"]
    assert [p.name for p in local_files(tmp_path)] == ["a.txt", "b.txt", "c.jsonl"]


def test_missing_and_unsupported(tmp_path):
    with pytest.raises(UserError, match="nope.jsonl: no such file"):
        read(tmp_path / "nope.jsonl")
    (tmp_path / "x.csv").write_text("a,b", encoding="utf-8")
    with pytest.raises(UserError, match="x.csv: unsupported file type"):
        read(tmp_path / "x.csv")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="empty: folder holds no"):
        read(empty)


def test_bad_jsonl_names_file_and_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"text": "ok"}\n{"text": oops}\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"bad.jsonl:2: invalid JSON"):
        read(p)
    p.write_text('{"text": "ok"}\n[1, 2]\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"bad.jsonl:2: expected a JSON object, got list"):
        read(p)


def test_bad_encodings_and_containers(tmp_path):
    (tmp_path / "latin.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(UserError, match="latin.txt:1: not UTF-8"):
        read(tmp_path / "latin.txt")
    (tmp_path / "notgz.jsonl.gz").write_bytes(b"plain text, not gzip")
    with pytest.raises(UserError, match="notgz.jsonl.gz"):
        read(tmp_path / "notgz.jsonl.gz")
    (tmp_path / "broken.json").write_text('[{"text": "a"},\n {"text": }]', encoding="utf-8")
    with pytest.raises(UserError, match=r"broken.json:2: invalid JSON"):
        read(tmp_path / "broken.json")
    (tmp_path / "nums.json").write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(UserError, match="nums.json: element 0"):
        read(tmp_path / "nums.json")
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(UserError, match="bad.parquet: not a readable parquet"):
        read(tmp_path / "bad.parquet")


def test_hub_failure_is_user_error(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(UserError, match="cannot stream HuggingFaceFW/fineweb .config sample-10BT.*--source"):
        iter_records(None, "HuggingFaceFW/fineweb", "sample-10BT")


def test_hub_streams_records(monkeypatch):
    import datasets

    seen = {}

    def fake(hub_id, config, split, streaming):
        seen.update(hub_id=hub_id, config=config, split=split, streaming=streaming)
        return iter(ROWS)

    monkeypatch.setattr(datasets, "load_dataset", fake)
    assert list(iter_records(None, "org/ds", "cfg", split="test")) == ROWS
    assert seen == {"hub_id": "org/ds", "config": "cfg", "split": "test", "streaming": True}
