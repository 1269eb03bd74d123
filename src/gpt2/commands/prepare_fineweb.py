"""`gpt2 prepare fineweb`: documents -> GPT-2 tokens -> uint16 shards that `ShardLoader` streams.

    gpt2 prepare fineweb                          # HuggingFaceFW/fineweb, sample-10BT (~10B tokens, ~100 shards)
    gpt2 prepare fineweb --dataset fineweb-edu    # HuggingFaceFW/fineweb-edu, sample-10BT
    gpt2 prepare fineweb --source my_texts/ --out data/mine --shard-tokens 10000000 --val-tokens 100000

Design decisions:
- Records come from `gpt2.data.sources.iter_records`: the hub is streamed (the raw parquet never sits on
  disk next to the shards) and `--source` files take exactly the same path after that.
- The shard layout, the process pool and the exact resume after a crash are `gpt2.data.fineweb`'s: a re-run
  with the same settings continues where the last one stopped, and one with larger `--max-docs` or
  `--total-tokens` continues a finished one.
"""

from __future__ import annotations

import itertools
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from gpt2.commands import Command
from gpt2.config import arg, check_values
from gpt2.data.fineweb import DATASETS, ShardWriter, available_cpus, iter_texts, tokenize_all
from gpt2.data.sources import iter_records
from gpt2.errors import UserError
from gpt2.io import dir_lock, make_folder
from gpt2.tokenizer import get_encoding


@dataclass
class PrepareFinewebConfig:
    out: str | None = arg(None, "output folder for the shards; none means data/<dataset>")
    dataset: str = arg("fineweb", "hub dataset to stream (config sample-10BT)", choices=sorted(DATASETS))
    source: str | None = arg(None, "local file or folder (.parquet, .jsonl[.gz], .json, .txt) instead of the hub")
    text_field: str = arg("text", "record field that holds the document text")
    shard_tokens: int = arg(100_000_000, "tokens per train shard")
    val_tokens: int = arg(10_000_000, "tokens in the validation shard (the first shard); 0 for none")
    workers: int | None = arg(None, "tokenizer processes; none means one per available core", minimum=1)
    max_docs: int | None = arg(None, "stop after this many documents (in total, across resumed runs)", minimum=0)
    total_tokens: int | None = arg(None, "stop after this many tokens (in total, across resumed runs)", minimum=0,
                                    aliases=("--max-tokens",))

    def validate(self) -> None:
        if self.shard_tokens < 1 or self.shard_tokens > 2**31 - 1:
            raise UserError(f"--shard-tokens {self.shard_tokens}: must be between 1 and 2147483647")
        if self.val_tokens < 0 or self.val_tokens > 2**31 - 1:
            raise UserError(f"--val-tokens {self.val_tokens}: must be between 0 and 2147483647")
        check_values(self)  # --workers, --max-docs, --total-tokens: their `minimum`


def run(cfg: PrepareFinewebConfig) -> dict[str, Any]:
    """Prepare (or resume preparing) the shards; returns a summary {shards, docs, tokens, out}. One run per
    --out at a time: it holds OUT/run.lock, as training runs hold theirs (two writers would mix their shards
    and progress)."""
    cfg.validate()
    out = Path(cfg.out or f"data/{cfg.dataset}")
    with dir_lock(out, "run.lock"):
        return _prepare(cfg, out)


def _prepare(cfg: PrepareFinewebConfig, out: Path) -> dict[str, Any]:
    hub_id, hub_config, prefix = DATASETS[cfg.dataset]
    settings = {"input": str(Path(cfg.source).resolve()) if cfg.source else f"{hub_id}/{hub_config}",
                "text_field": cfg.text_field, "shard_tokens": cfg.shard_tokens, "val_tokens": cfg.val_tokens}
    get_encoding()  # a missing tokenizer is one clear error here, not one per worker
    make_folder(out)
    limits = {"max_docs": cfg.max_docs, "max_tokens": cfg.total_tokens}  # progress.json's key
    writer = ShardWriter(out, prefix, settings, limits, cfg.shard_tokens, cfg.val_tokens)
    if not writer.resume():
        print(f"{out}: already complete ({len(writer.shards)} shards, {writer.tokens:,} tokens, "
              f"{writer.docs:,} documents)", file=sys.stderr)
        return _summary(writer, out)
    if writer.tokens or writer.docs:
        print(f"{out}: resuming after {writer.docs:,} documents, {writer.tokens:,} tokens", file=sys.stderr)

    start_doc, skip = writer.docs, writer.doc_tokens
    records = iter_records(cfg.source, hub_id, hub_config, split="train")
    records = itertools.islice(records, start_doc, cfg.max_docs)  # resume: past what is written
    texts = iter_texts(records, cfg.text_field, cfg.source or hub_id, first_index=start_doc)
    with_text = 0  # documents of this run that hold any text

    def counted(texts: Iterator[str]) -> Iterator[str]:
        nonlocal with_text
        for text in texts:
            with_text += bool(text.strip())
            yield text

    texts = counted(texts)
    budget = None if cfg.total_tokens is None else cfg.total_tokens - writer.tokens  # tokens this run may add
    exhausted = budget is None or budget > 0
    t0 = shown = time.time()
    new_tokens = 0
    bar = tqdm(desc="tokenizing", unit=" docs", initial=start_doc, total=cfg.max_docs, dynamic_ncols=True,
               mininterval=0.5)
    docs = tokenize_all(texts, cfg.workers or available_cpus()) if exhausted else (d for d in ())
    try:
        for doc in docs:
            end = len(doc) if budget is None else min(len(doc), skip + budget - new_tokens)
            new_tokens += writer.add(doc, skip, end)
            skip = 0
            bar.update(1)
            if time.time() - shown > 0.5:
                shown = time.time()
                bar.set_postfix_str(f"{writer.tokens:,} tokens, {new_tokens / (shown - t0):,.0f} tokens/s",
                                    refresh=False)
            if budget is not None and new_tokens == budget:  # --total-tokens reached
                exhausted = False
                break
    finally:
        docs.close()  # stops the pool now, also on an error or a break
        bar.close()
    if cfg.max_docs is not None and writer.docs >= cfg.max_docs:
        exhausted = False
    if start_doc == 0 and with_text == 0 and exhausted:
        raise UserError(f"{cfg.source or hub_id}: no text to tokenize (none of its {writer.docs} record(s) has text "
                        f"in field {cfg.text_field!r})")
    writer.finish(exhausted)
    rate = new_tokens / max(time.time() - t0, 1e-9)
    print(f"{out}: {len(writer.shards)} shards, {writer.tokens:,} tokens from {writer.docs:,} documents "
          f"({new_tokens:,} new tokens at {rate:,.0f} tokens/s)", file=sys.stderr)
    if writer.only_val:
        print(f"{out}: warning: every token went to the validation shard; lower --val-tokens", file=sys.stderr)
    return _summary(writer, out)


def _summary(writer: ShardWriter, out: Path) -> dict[str, Any]:
    return {"out": out, "shards": [s["name"] for s in writer.shards], "docs": writer.docs, "tokens": writer.tokens}


COMMAND = Command("prepare fineweb", "tokenize FineWeb (or local text) into uint16 shards for pretraining",
                  PrepareFinewebConfig, run)
