"""`gpt2 prepare fineweb` on local files: exact round trip, determinism across workers, resumable runs
(crashes at every kind of point, growing limits) that neither duplicate nor lose documents."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import gpt2.data.fineweb as fineweb
from gpt2.cli import main
from gpt2.commands.prepare_fineweb import PrepareFinewebConfig, run
from gpt2.data.loader import ShardLoader
from gpt2.data.shards import list_shards, read_shard
from gpt2.errors import UserError
from gpt2.tokenizer import EOT, decode_bytes

SHARD, VAL = 5000, 3000


@pytest.fixture
def docs(shared_data, tokenizer_ok) -> list[str]:
    """~100 KB of Shakespeare as documents of a few paragraphs each, plus an empty and a non-ASCII one."""
    text = (shared_data / "tinyshakespeare.txt").read_text(encoding="utf-8")[:100_000]
    paras = text.split("\n\n")
    out = ["\n\n".join(paras[i:i + 7]) for i in range(0, len(paras), 7)]
    return out[:20] + ["", "naïve café — 日本語 🙂"] + out[20:]


@pytest.fixture
def source(tmp_path, docs):
    """The documents spread over one folder in every format, in sorted-name order."""
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "00.jsonl").write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in
                                          enumerate(docs[:10])), encoding="utf-8")
    pq.write_table(pa.Table.from_pylist([{"text": d} for d in docs[10:25]]), src / "01.parquet")
    for i, d in enumerate(docs[25:28]):
        (src / f"02_{i}.txt").write_text(d, encoding="utf-8")
    (src / "03.json").write_text(json.dumps([{"text": d} for d in docs[28:35]]), encoding="utf-8")
    with gzip.open(src / "sub" / "04.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": d}) + "\n" for d in docs[35:])
    return src


def prepare(source, out, **kw):
    cfg = PrepareFinewebConfig(source=str(source), out=str(out), shard_tokens=SHARD, val_tokens=VAL,
                               workers=1, **kw)
    return run(cfg)


def stream(out) -> np.ndarray:
    return np.concatenate([read_shard(p) for s in ("val", "train") for p in list_shards(out, s)])


def snapshot(out) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.bin"))}


def expected_text(docs) -> bytes:
    return "".join("<|endoftext|>" + d for d in docs).encode("utf-8")


def test_round_trip_exact(source, docs, tmp_path):
    out = tmp_path / "out"
    summary = prepare(source, out)
    assert summary["docs"] == len(docs)
    toks = stream(out)
    assert decode_bytes(toks.tolist()) == expected_text(docs)
    assert (toks == EOT).sum() == len(docs)  # "<|endoftext|>" inside text is never the special token
    sizes = [len(read_shard(p)) for p in list_shards(out, "train")]
    assert [len(read_shard(p)) for p in list_shards(out, "val")] == [VAL]
    assert sizes[:-1] == [SHARD] * (len(sizes) - 1) and 0 < sizes[-1] <= SHARD and len(sizes) >= 4
    assert [p.name for p in list_shards(out, "train")][0] == "fineweb_train_000001.bin"
    # the loader streams the train shards in order
    dl = ShardLoader(out, "train", batch_size=2, seq_len=64)
    x, y = dl.next_batch()
    assert x.flatten().tolist() == toks[VAL:VAL + 128].tolist()
    assert y.flatten().tolist() == toks[VAL + 1:VAL + 129].tolist()


def test_workers_do_not_change_output(source, tmp_path):
    prepare(source, tmp_path / "one")
    cfg = PrepareFinewebConfig(source=str(source), out=str(tmp_path / "two"), shard_tokens=SHARD,
                               val_tokens=VAL, workers=2)
    run(cfg)
    assert snapshot(tmp_path / "one") == snapshot(tmp_path / "two")


class Crash(Exception):
    pass


def crash_after(monkeypatch, name, calls):
    real = getattr(fineweb, name)
    count = {"n": 0}

    def wrapped(*args, **kwargs):
        if count["n"] == calls:
            raise Crash(f"{name} call {calls}")
        count["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(fineweb, name, wrapped)


@pytest.mark.parametrize("where, calls", [
    ("write_shard", 0), ("write_shard", 1), ("write_shard", 3),  # crash while writing shard k
    ("save_progress", 2), ("save_progress", 4),  # crash after shard k is renamed, before progress.json
])
def test_interrupted_rerun_neither_duplicates_nor_loses(source, docs, tmp_path, monkeypatch, where, calls):
    ref = tmp_path / "ref"
    prepare(source, ref)
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        crash_after(m, where, calls)
        with pytest.raises(Crash):
            prepare(source, out)
    assert not (out / "progress.json").exists() or json.loads((out / "progress.json").read_text())["finished"] is False
    # a re-run that stops where the crashed one had recorded must not pick up a shard that was renamed into
    # place but never recorded
    progress = out / "progress.json"
    done = json.loads(progress.read_text())["tokens"] if progress.exists() else 0
    limit = max(done, VAL + SHARD)
    small = prepare(source, out, total_tokens=limit)
    assert sorted(small["shards"]) == [p.name for p in sorted(out.glob("*.bin"))]
    assert stream(out).tolist() == stream(ref)[:limit].tolist()
    prepare(source, out)
    assert snapshot(out) == snapshot(ref)
    assert decode_bytes(stream(out).tolist()) == expected_text(docs)
    assert not [p for p in out.iterdir() if ".tmp" in p.name]


def test_growing_limits_continue_where_they_stopped(source, docs, tmp_path):
    ref = tmp_path / "ref"
    prepare(source, ref)
    out = tmp_path / "out"
    s = prepare(source, out, max_docs=3)  # ends inside the validation shard
    assert s["docs"] == 3 and decode_bytes(stream(out).tolist()) == expected_text(docs[:3])
    s = prepare(source, out, total_tokens=VAL + SHARD + 123)  # cuts a document in the middle
    assert s["tokens"] == VAL + SHARD + 123
    assert prepare(source, out, total_tokens=VAL + SHARD + 123)["tokens"] == VAL + SHARD + 123  # nothing to do
    prepare(source, out, max_docs=30)
    prepare(source, out)
    assert snapshot(out) == snapshot(ref)
    assert json.loads((out / "progress.json").read_text())["exhausted"] is True


def test_bad_resumes_fail_clearly(source, tmp_path):
    out = tmp_path / "out"
    prepare(source, out, max_docs=30)
    with pytest.raises(UserError, match="other settings .shard_tokens differ"):
        run(PrepareFinewebConfig(source=str(source), out=str(out), shard_tokens=SHARD + 1,
                                 val_tokens=VAL, workers=1))
    shard = list_shards(out, "train")[0]
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(UserError, match=f"{shard.name}: truncated shard"):
        prepare(source, out)
    (out / "progress.json").unlink()
    with pytest.raises(UserError, match="holds shards .* but no progress.json"):
        prepare(source, out)


def test_missing_text_field(tokenizer_ok, tmp_path):
    (tmp_path / "d.jsonl").write_text('{"text": "ok"}\n{"body": "no text"}\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"d.jsonl: record 1 has no 'text' field \(fields: body\)"):
        prepare(tmp_path / "d.jsonl", tmp_path / "out")
    (tmp_path / "b.jsonl").write_text('{"body": "a"}\n{"body": "b"}\n', encoding="utf-8")
    s = run(PrepareFinewebConfig(source=str(tmp_path / "b.jsonl"), out=str(tmp_path / "o2"),
                                 text_field="body", val_tokens=0, workers=1))
    assert decode_bytes(stream(tmp_path / "o2").tolist()) == b"<|endoftext|>a<|endoftext|>b"
    assert s["docs"] == 2 and s["shards"] == ["fineweb_train_000001.bin"]


def test_cli(source, docs, tmp_path, capsys):
    out = tmp_path / "cli"
    main(["prepare", "fineweb", "--source", str(source), "--out", str(out), "--shard-tokens", str(SHARD),
          "--val-tokens", str(VAL), "--workers", "1", "--max-docs", "5"])
    assert decode_bytes(stream(out).tolist()) == expected_text(docs[:5])
    with pytest.raises(SystemExit) as e:
        main(["prepare", "fineweb", "--source", str(tmp_path / "nope"), "--out", str(tmp_path / "x")])
    assert e.value.code == 2
    assert "gpt2 prepare fineweb: error: " in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["prepare", "fineweb", "--source", str(source), "--shard-tokens", "0"])
    assert "--shard-tokens 0" in capsys.readouterr().err


@pytest.mark.parametrize("dataset, hub_id, prefix", [("fineweb", "HuggingFaceFW/fineweb", "fineweb"),
                                                     ("fineweb-edu", "HuggingFaceFW/fineweb-edu", "fineweb_edu")])
def test_hub_path_streams_the_sample(docs, tmp_path, monkeypatch, dataset, hub_id, prefix):
    import datasets

    calls = []

    def fake_load_dataset(name, config, split, streaming):
        calls.append((name, config, split, streaming))
        return ({"text": d, "id": f"<urn:{i}>", "dump": "CC-MAIN"} for i, d in enumerate(docs))

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    cfg = PrepareFinewebConfig(dataset=dataset, out=str(tmp_path / "hub"), shard_tokens=SHARD,
                               val_tokens=VAL, workers=1, max_docs=30)
    summary = run(cfg)
    assert calls == [(hub_id, "sample-10BT", "train", True)]
    assert summary["shards"][0] == f"{prefix}_val_000000.bin"
    assert decode_bytes(stream(tmp_path / "hub").tolist()) == expected_text(docs[:30])
