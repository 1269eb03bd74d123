"""Documents -> GPT-2 tokens -> uint16 shards that `ShardLoader` streams (`gpt2 prepare fineweb`, in
`gpt2.commands.prepare_fineweb`, is the command that runs it).

Design decisions:
- Each document becomes `<|endoftext|>` followed by its tokens, so the shards are one stream in which EOT
  *starts* every document (the llm.c / build-nanogpt convention). Shards are filled to exactly
  `--shard-tokens` (documents are split across shard boundaries, nothing is padded); the first shard
  (`{prefix}_val_000000.bin`) holds the first `--val-tokens` tokens, then `{prefix}_train_000001.bin`, ...
  The default of 10M validation tokens gives a low-noise validation loss (20 evaluations of 0.5M tokens)
  while taking only 0.1% of the 10B sample from training. Format: see `gpt2.data.shards`.
- Tokenization runs in a process pool (`imap`, chunks of documents); `imap` returns results in input
  order, so the output is identical for any `--workers`.
- Resumable: shards are written to a temporary name and renamed, and after each shard `progress.json` is
  replaced atomically with the exact position in the document stream (documents fully written, plus the
  tokens already written of the document that straddles the shard boundary). A re-run skips that many
  documents, drops those tokens, and continues: nothing is duplicated or lost. Shards past the recorded
  position (written just before a crash) are deleted and rewritten. The last shard of a run may be
  partial; a later run with larger `--max-docs`/`--total-tokens` reopens it and continues filling it.
  Skipping documents on resume re-reads (re-downloads) them but does not re-tokenize them.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from gpt2.data.shards import SPLITS, list_shards, read_header, read_shard, shard_name, write_shard
from gpt2.errors import UserError
from gpt2.io import remove_temp_files, write_json_atomic
from gpt2.tokenizer import EOT, encode, get_encoding

DATASETS = {  # --dataset -> (hub id, config, shard file prefix)
    "fineweb": ("HuggingFaceFW/fineweb", "sample-10BT", "fineweb"),
    "fineweb-edu": ("HuggingFaceFW/fineweb-edu", "sample-10BT", "fineweb_edu"),
}
PROGRESS = "progress.json"
PROGRESS_VERSION = 1


def tokenize_document(text: str) -> np.ndarray:
    """`<|endoftext|>` + the document's GPT-2 tokens, as uint16 (runs in the pool's workers)."""
    ids = encode(text)
    out = np.empty(len(ids) + 1, dtype=np.uint16)
    out[0] = EOT
    out[1:] = ids
    return out


def _warm_tokenizer() -> None:
    """Pool initializer: load the BPE files once per worker, before the first chunk arrives."""
    get_encoding()


def iter_texts(records: Iterable[dict], field: str, where: str, first_index: int = 0) -> Iterator[str]:
    for i, rec in enumerate(records, start=first_index):
        text = rec.get(field)
        if not isinstance(text, str):
            what = "has no" if text is None else f"has a {type(text).__name__} in its"
            raise UserError(f"{where}: record {i} {what} {field!r} field (fields: {', '.join(map(str, rec))}); "
                            f"pick the field with --text-field")
        yield text


def tokenize_all(texts: Iterable[str], workers: int, chunksize: int = 16) -> Iterator[np.ndarray]:
    """Token arrays of `texts`, in input order, from `workers` processes (in-process when workers == 1)."""
    if workers <= 1:
        yield from map(tokenize_document, texts)
        return

    with mp.Pool(workers, initializer=_warm_tokenizer) as pool:  # leaving the block terminates the workers
        yield from pool.imap(tokenize_document, texts, chunksize=chunksize)


class ShardWriter:
    """Fills fixed-size shards from a stream of documents and records, after each shard, the exact stream
    position in `progress.json` (see the module docstring)."""

    def __init__(self, out: Path, prefix: str, settings: dict[str, Any], limits: dict[str, Any],
                 shard_tokens: int, val_tokens: int):
        self.out, self.prefix, self.settings, self.limits = out, prefix, settings, limits
        self.shard_tokens, self.val_tokens = shard_tokens, val_tokens
        self.shards: list[dict[str, Any]] = []  # [{"name", "tokens"}] of the shards written so far
        self.docs = 0  # documents written completely
        self.doc_tokens = 0  # tokens already written of document number `docs` (it straddles a boundary)
        self.tokens = 0  # tokens written in total
        self.buf = np.empty(0, dtype=np.uint16)
        self.fill = 0

    def _index(self) -> int:
        """Index of the shard being filled: 0 is validation; with --val-tokens 0 training starts at 1."""
        return len(self.shards) + (0 if self.val_tokens > 0 else 1)

    def _capacity(self, index: int) -> int:
        return self.val_tokens if index == 0 else self.shard_tokens

    def _open(self) -> None:
        capacity = self._capacity(self._index())
        if len(self.buf) != capacity:
            self.buf = np.empty(capacity, dtype=np.uint16)
        self.fill = 0

    def resume(self) -> bool:
        """Pick up `progress.json` if present. Returns False when a finished run already did this job."""
        state = load_progress(self.out)
        if state is None:
            stale = [p.name for s in SPLITS for p in list_shards(self.out, s)]
            if stale:
                raise UserError(f"{self.out}: holds shards ({stale[0]}, ...) but no {PROGRESS}; "
                                f"use an empty --out folder")
            self._open()
            return True
        if state["settings"] != self.settings:
            diff = [k for k in self.settings if state["settings"].get(k) != self.settings[k]]
            raise UserError(f"{self.out}: prepared with other settings ({', '.join(diff)} differ); use another "
                            f"--out folder, or delete this one to start over")
        self.shards, self.docs, self.doc_tokens, self.tokens = (
            state["shards"], state["docs"], state["doc_tokens"], state["tokens"])
        for s in self.shards:  # what progress.json calls written must still be there, intact
            if read_header(self.out / s["name"]) != s["tokens"]:
                raise UserError(f"{self.out / s['name']}: holds another token count than {PROGRESS} records; "
                                f"delete {self.out} to start over")
        self._delete_unrecorded()
        if state["finished"] and (state["exhausted"] or state["limits"] == self.limits):
            return False
        last = self.shards[-1] if self.shards else None
        if last and last["tokens"] < self._capacity(self._index() - 1):
            self.shards.pop()  # a partial last shard: reopen it and keep filling
            self._open()
            self.buf[:last["tokens"]] = read_shard(self.out / last["name"])
            self.fill = last["tokens"]
        else:
            self._open()
        return True

    @property
    def only_val(self) -> bool:
        """Whether every shard written so far is the validation shard (no token reached the train split)."""
        return bool(self.shards) and all(s["name"] == self._name(0) for s in self.shards)

    def _name(self, index: int) -> str:
        return shard_name(self.prefix, "val" if index == 0 else "train", index)

    def _delete_unrecorded(self) -> None:
        """Shards renamed into place after the last progress.json write (a crash in between), and temp files,
        are not part of the recorded state: remove them so they are rewritten, never counted twice."""
        recorded = {s["name"] for s in self.shards}
        remove_temp_files(self.out)  # the caller holds the folder's lock (`gpt2 prepare fineweb`'s run.lock)
        for split in SPLITS:
            for p in list_shards(self.out, split):
                if p.name not in recorded:
                    p.unlink()

    def add(self, doc: np.ndarray, skip: int = 0, end: int | None = None) -> int:
        """Append doc[skip:end] (`skip` tokens were written by an earlier run; `end` < len(doc) cuts the
        document at --total-tokens). Returns the number of tokens appended."""
        end = len(doc) if end is None else end
        pos = skip
        while pos < end:
            take = min(len(self.buf) - self.fill, end - pos)
            self.buf[self.fill:self.fill + take] = doc[pos:pos + take]
            self.fill += take
            pos += take
            self.tokens += take
            if pos == len(doc):
                self.docs, self.doc_tokens = self.docs + 1, 0
            else:
                self.doc_tokens = pos
            if self.fill == len(self.buf):
                self._flush()
                self._open()
        return end - skip

    def _flush(self, finished: bool = False, exhausted: bool = False) -> None:
        if self.fill:
            name = self._name(self._index())
            write_shard(self.out / name, self.buf[:self.fill])
            self.shards.append({"name": name, "tokens": self.fill})
        save_progress(self.out, {"version": PROGRESS_VERSION, "settings": self.settings, "shards": self.shards,
                                 "docs": self.docs, "doc_tokens": self.doc_tokens, "tokens": self.tokens,
                                 "finished": finished, "exhausted": exhausted, "limits": self.limits})

    def finish(self, exhausted: bool) -> None:
        """Write the partial last shard (if any) and the final position."""
        self._flush(finished=True, exhausted=exhausted)


def load_progress(out: Path) -> dict[str, Any] | None:
    path = out / PROGRESS
    if not path.exists():
        return None
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: unreadable ({e}); delete {out} to start over") from e
    if not isinstance(state, dict) or state.get("version") != PROGRESS_VERSION:
        raise UserError(f"{path}: not a progress file of this version; delete {out} to start over")
    return state


def save_progress(out: Path, state: dict[str, Any]) -> None:
    write_json_atomic(out / PROGRESS, state, indent=1)


def available_cpus() -> int:
    """Cores this process may run on (a container or taskset may allow fewer than the machine has)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1
