"""The compiled pieces' disk cache (`gpt2.decode.compile_cache`, `compiled.prepared`) without compiling anything:
the builder is replaced by one that writes stand-in pieces, so these check the folder's rules alone. An entry is
used only when every file matches its manifest (a flipped byte anywhere is rebuilt); one build per entry
across processes (the lock); no build folder outlives its builder; the size bound evicts the least recently
used; an unusable cache folder is one error, not a crash; `gpt2 cache` lists and removes entries."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import gpt2.decode.compiled
from gpt2.cli import main
from gpt2.decode import compile_cache as cc
from gpt2.decode.compiled import CacheUnavailable, prepared
from gpt2.errors import UserError
from gpt2.model import GPT, GPTConfig

SRC = str(Path(__file__).resolve().parents[1] / "src")


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("GPT2_COMPILE_CACHE", str(root))
    return root


@pytest.fixture
def model() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=64)).eval()


def fake_build(calls: list[Path], pause: float = 0.0, starters: Path | None = None):
    """A stand-in for `build_in_child`: two 'pieces' and the manifest, in a build folder renamed into place; it
    takes `pause` seconds, counted once two processes have left a file in `starters` (when given)."""
    def build(model, directory, progress, label=""):
        calls.append(directory)
        work = cc.build_folder(directory.parent, directory.name)
        deadline = time.monotonic() + 120
        while starters is not None and len(list(starters.iterdir())) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(pause)
        (work / "piece-00.pt2").write_bytes(os.urandom(3000))
        (work / "piece-01.pt2").write_bytes(b"x" * 500)
        cc.write_manifest(work, {"model": label, "params": model.num_params()})
        os.replace(work, directory)
    return build


def use(model: GPT, **kw) -> Path | None:
    with prepared(model, lambda line: None, **kw) as directory:
        return directory


def test_an_entry_is_built_once_then_used(cache, model, monkeypatch):
    calls: list[Path] = []
    monkeypatch.setattr(gpt2.decode.compiled, "build_in_child", fake_build(calls))
    first = use(model, label="tiny")
    assert use(model) == first and calls == [first]
    assert cc.verify(first) is None
    assert [e.model for e in cc.entries(cache)] == ["tiny"]


def test_not_built_when_not_asked(cache, model, monkeypatch):
    monkeypatch.setattr(gpt2.decode.compiled, "build_in_child", fake_build(calls := []))
    assert use(model, build=False) is None and calls == []


@pytest.mark.parametrize("damage", ["flip", "truncate", "extra", "missing", "manifest"])
def test_a_damaged_entry_is_never_used_but_rebuilt(cache, model, monkeypatch, damage):
    calls: list[Path] = []
    monkeypatch.setattr(gpt2.decode.compiled, "build_in_child", fake_build(calls))
    entry = use(model)
    piece = entry / "piece-00.pt2"
    data = bytearray(piece.read_bytes())
    if damage == "flip":  # one bit, in the middle of a file of the same size
        data[len(data) // 2] ^= 1
        piece.write_bytes(bytes(data))
    elif damage == "truncate":
        piece.write_bytes(bytes(data[:100]))
    elif damage == "extra":
        (entry / "stray.bin").write_bytes(b"?")
    elif damage == "missing":
        (entry / "piece-01.pt2").unlink()
    else:
        (entry / cc.MANIFEST).write_text("{not json")
    assert cc.verify(entry) is not None
    said: list[str] = []
    with prepared(model, said.append) as again:
        assert cc.verify(again) is None
    assert len(calls) == 2 and any("damaged" in line for line in said)


def test_every_file_is_checked(cache, model, monkeypatch):
    monkeypatch.setattr(gpt2.decode.compiled, "build_in_child", fake_build([]))
    entry = use(model)
    for path in sorted(p for p in entry.iterdir() if p.name != cc.MANIFEST):
        original = path.read_bytes()
        path.write_bytes(bytes([original[0] ^ 0x80]) + original[1:])
        assert path.name in cc.verify(entry)
        path.write_bytes(original)
    assert cc.verify(entry) is None


def test_leftover_build_folders_are_removed_unless_their_build_is_alive(cache, model, monkeypatch):
    cache.mkdir()
    dead = cache / f"{cc.BUILD_PREFIX}{'a' * 32}-999999"  # a builder killed with SIGKILL left this
    dead.mkdir()
    (dead / "weights.bin").write_bytes(b"w" * 100)
    alive = cache / f"{cc.BUILD_PREFIX}{'b' * 32}-{os.getpid()}"
    alive.mkdir()
    holder = cc.Lock(cache, "b" * 32)
    assert holder.acquire(blocking=False)  # a build in progress holds its key's lock
    try:
        monkeypatch.setattr(gpt2.decode.compiled, "build_in_child", fake_build([]))
        use(model)  # any start cleans up
        assert not dead.exists() and alive.exists()
    finally:
        holder.release()
    assert cc.remove_leftovers(cache) == [alive]


def test_two_processes_build_an_entry_once(cache, model, tmp_path):
    """The second process waits for the first one's lock, then finds the entry built."""
    weights = tmp_path / "weights"
    model.save_pretrained(weights)
    script = tmp_path / "start.py"
    starters = tmp_path / "started"
    starters.mkdir()
    script.write_text(textwrap.dedent(f"""
        import os, pathlib, test_compile_cache as t
        import gpt2.decode.compiled
        from gpt2.model import GPT
        calls = []
        gpt2.decode.compiled.build_in_child = t.fake_build(calls, pause=1.0, starters=pathlib.Path({str(starters)!r}))
        model = GPT.from_pretrained({str(weights)!r}).eval()
        (pathlib.Path({str(starters)!r}) / str(os.getpid())).touch()  # the builder waits for both to get here
        with gpt2.decode.compiled.prepared(model, lambda line: print(line, flush=True)) as d:
            print("built" if calls else "found", d.name, flush=True)
    """))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, str(Path(__file__).parent)])}
    procs = [subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, env=env)
             for _ in range(2)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    last = sorted(o.strip().splitlines()[-1].split()[0] for o in outs)
    assert last == ["built", "found"], outs
    assert any("another process is compiling" in o for o in outs)
    assert len(cc.entries(cache)) == 1


def test_the_size_bound_evicts_the_least_recently_used(cache, model, monkeypatch):
    cache.mkdir()
    for i, key in enumerate(["old", "mid", "new"]):
        (cache / key).mkdir()
        (cache / key / "piece-00.pt2").write_bytes(b"p" * 1000)
        cc.write_manifest(cache / key, {"model": key})
        os.utime(cache / key / cc.MANIFEST, (1000 + i, 1000 + i))
    busy = cc.Lock(cache, "old")
    assert busy.acquire(blocking=False)  # in use by another process: kept even though it is the oldest
    try:
        removed = cc.evict(cache, keep="new", limit=1500)
    finally:
        busy.release()
    assert [e.key for e in removed] == ["mid"]
    assert cc.evict(cache, keep="new", limit=1500)[0].key == "old"
    assert [e.key for e in cc.entries(cache)] == ["new"]


def test_an_unusable_cache_folder_is_one_error(cache, model, monkeypatch):
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # not writable (root may write anywhere)
    with pytest.raises(CacheUnavailable, match="cannot be used"):
        use(model)


def test_a_cache_setting_naming_a_file_is_one_error(tmp_path, model, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("GPT2_COMPILE_CACHE", str(blocker / "compiled"))  # a folder under a file
    with pytest.raises(UserError, match=f"GPT2_COMPILE_CACHE={blocker / 'compiled'}: {blocker} is a file"):
        use(model)


def test_cache_list_and_remove_commands(cache, model, monkeypatch, capsys):
    monkeypatch.setattr(gpt2.decode.compiled, "build_in_child", fake_build([]))
    entry = use(model, label="runs/demo/finetune")
    main(["cache", "list"])
    out = capsys.readouterr().out
    assert entry.name in out and "runs/demo/finetune" in out and "1 entries" in out
    with pytest.raises(SystemExit) as e:
        main(["cache", "remove", "nosuchkey"])
    assert e.value.code == 2 and "nosuchkey" in capsys.readouterr().err
    main(["cache", "remove", entry.name])
    assert not entry.exists() and cc.entries(cache) == []
    manifest = json.dumps({"files": {}})
    (cache / "x").mkdir()
    (cache / "x" / cc.MANIFEST).write_text(manifest)
    main(["cache", "remove", "--all"])
    assert cc.entries(cache) == []


def test_a_full_disk_mid_build_leaves_no_folder(cache, model, monkeypatch):
    def full(self, directory):
        Path(directory).mkdir(parents=True)
        (Path(directory) / "model.safetensors").write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(GPT, "save_pretrained", full)
    with pytest.raises(OSError, match="No space left"):
        use(model)
    assert [p.name for p in cache.iterdir() if not p.name.endswith(".lock")] == []
