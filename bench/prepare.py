"""Benchmark the pretraining data path, each figure against a baseline measured in the same run.

1. Tokenization: `gpt2 prepare fineweb --source` (reading a JSON-lines file, the process pool, shard
   writing, all of it) on tinyshakespeare repeated to --mb megabytes and cut into documents of about
   --doc-kb kilobytes, against single-process tiktoken `encode_ordinary_batch` on the same documents.
   Reported in tokens/s and as a ratio (pipeline / baseline).
   The baseline runs with tiktoken's default 8 threads and with 1 thread.
2. Loading: `ShardLoader.next_batch()` at 124M-training shapes (B=32, T=1024) over the shards just
   written, in batches/s, against the 150 batches/s target (10x what one H100 consumes at 500K tokens/s).

    python bench/prepare.py            # ~50 MB; --mb 10 for a quick run
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
if "TIKTOKEN_CACHE_DIR" not in os.environ and (SHARED / "tiktoken_cache").is_dir():
    os.environ["TIKTOKEN_CACHE_DIR"] = str(SHARED / "tiktoken_cache")
sys.path.insert(0, str(REPO / "src"))

from gpt2.commands.prepare_fineweb import PrepareFinewebConfig, run  # noqa: E402
from gpt2.data.loader import ShardLoader  # noqa: E402
from gpt2.tokenizer import get_encoding  # noqa: E402

TARGET_BATCHES_PER_S = 150


def make_documents(text: str, megabytes: float, doc_kb: float) -> list[str]:
    """`text` repeated to `megabytes`, cut at line ends into documents of about `doc_kb` KB."""
    total, size = int(megabytes * 1e6), int(doc_kb * 1e3)
    big = text * (total // len(text) + 1)
    docs, start = [], 0
    while start < total:
        end = big.find("\n", start + size)
        end = total if end < 0 or end > total else end + 1
        docs.append(big[start:end])
        start = end
    return docs


def bench_tokenize(docs: list[str], workers: int, tmp: Path) -> tuple[float, dict[int, float], int]:
    src = tmp / "docs.jsonl"
    with open(src, "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": d}) + "\n" for d in docs)
    enc = get_encoding()
    base = {}
    for threads in (8, 1):  # tiktoken's default thread count, and one thread (per-core speed)
        t0 = time.perf_counter()
        base_tokens = sum(len(ids) for ids in enc.encode_ordinary_batch(docs, num_threads=threads))
        base[threads] = base_tokens / (time.perf_counter() - t0)
    cfg = PrepareFinewebConfig(source=str(src), out=str(tmp / "shards"), shard_tokens=10_000_000,
                               val_tokens=0, workers=workers)
    t0 = time.perf_counter()
    summary = run(cfg)
    pipe_s = time.perf_counter() - t0
    assert summary["tokens"] == base_tokens + len(docs), "pipeline and baseline disagree on the token count"
    return summary["tokens"] / pipe_s, base, summary["tokens"]


def bench_loader(shards: Path, batches: int, batch_size: int, seq_len: int) -> float:
    dl = ShardLoader(shards, "train", batch_size, seq_len)
    for _ in range(5):  # warm the page cache and the allocator
        dl.next_batch()
    t0 = time.perf_counter()
    for _ in range(batches):
        dl.next_batch()
    return batches / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=float, default=50, help="input size in megabytes (default 50)")
    ap.add_argument("--doc-kb", type=float, default=4, help="document size in kilobytes (default 4)")
    ap.add_argument("--workers", type=int, default=os.cpu_count(), help="pipeline processes (default: all cores)")
    ap.add_argument("--batches", type=int, default=500, help="loader batches to time (default 500)")
    args = ap.parse_args()
    text = (SHARED / "data" / "tinyshakespeare.txt").read_text(encoding="utf-8")
    docs = make_documents(text, args.mb, args.doc_kb)
    print(f"input: {sum(map(len, docs)) / 1e6:.1f} MB in {len(docs):,} documents; {args.workers} workers, "
          f"{os.cpu_count()} cores", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        pipe, base, tokens = bench_tokenize(docs, args.workers, Path(tmp))
        print(f"tokenize  pipeline (gpt2 prepare fineweb): {pipe:>12,.0f} tokens/s  ({tokens:,} tokens)")
        for threads, rate in base.items():
            print(f"tokenize  baseline (tiktoken encode_ordinary_batch, 1 process, {threads} thread(s)): "
                  f"{rate:>12,.0f} tokens/s; ratio pipeline / baseline: {pipe / rate:.2f}x")
        rate = bench_loader(Path(tmp) / "shards", args.batches, 32, 1024)
        print(f"loader    ShardLoader B=32 T=1024: {rate:,.0f} batches/s ({rate * 32 * 1024 / 1e6:,.0f}M tokens/s); "
              f"{rate / TARGET_BATCHES_PER_S:.1f}x the {TARGET_BATCHES_PER_S} batches/s target")


if __name__ == "__main__":
    main()
