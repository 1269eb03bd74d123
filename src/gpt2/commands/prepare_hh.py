"""`gpt2 prepare hh`: Anthropic HH-RLHF preference pairs -> prompt/chosen/rejected token ids, the folder that
`gpt2 dpo`, `gpt2 reward` and `gpt2 ppo` read with `--data`.

    gpt2 prepare hh --out data/hh                                    # Anthropic/hh-rlhf from the Hub
    gpt2 prepare hh --source hh_rlhf.jsonl.gz --out data/hh --max-len 256

Records are streamed (`gpt2.data.sources.iter_records`), split into the shared prompt and the two answers,
fitted to `--max-len` and held out by a hash of the dialogue; malformed pairs are counted by reason in
`OUT/meta.json`, never fatal. The rules and the file layout are `gpt2.data.preferences`'.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from gpt2.commands import Command
from gpt2.config import arg, check_values
from gpt2.data.preferences import HUB_ID, MalformedPair, is_val, tokenize_record, write_pairs
from gpt2.data.sources import iter_records
from gpt2.errors import UserError


@dataclass
class PrepareHHConfig:
    out: str = arg("data/hh", "output folder: train.jsonl, val.jsonl and meta.json are written there")
    source: str | None = arg(None, "local HH-RLHF file or folder (.jsonl, .jsonl.gz, .parquet); "
                                   "default: stream Anthropic/hh-rlhf from the Hugging Face Hub")
    split: str = arg("train", "hub split to read (train or test); ignored with --source")
    max_len: int = arg(1024, "longest prompt + answer in tokens; older turns are dropped to fit, else the "
                             "pair is dropped", minimum=2)
    val_fraction: float = arg(0.05, "fraction of dialogues held out for validation (by prompt hash)")
    limit: int | None = arg(None, "read at most this many records (quick runs)", minimum=1)


def prepare(cfg: PrepareHHConfig) -> dict:
    check_values(cfg)  # --max-len, --limit: their `minimum`
    if not 0 <= cfg.val_fraction < 1:
        raise UserError(f"--val-fraction must be in [0, 1), got {cfg.val_fraction}")
    out = Path(cfg.out)
    splits: dict[str, list[dict]] = {"train": [], "val": []}
    counts: Counter = Counter()
    records = iter_records(cfg.source, HUB_ID, None, cfg.split)
    for i, record in enumerate(tqdm(records, desc="prepare hh", unit=" pairs")):
        if cfg.limit is not None and i >= cfg.limit:
            break
        counts["read"] += 1
        try:
            pair, truncated = tokenize_record(record, cfg.max_len)
        except MalformedPair as e:
            counts[str(e)] += 1
            continue
        counts["truncated"] += truncated
        splits["val" if is_val(record, cfg.val_fraction) else "train"].append(pair)
    if not splits["train"]:
        raise UserError(f"no usable preference pairs in {cfg.source or HUB_ID} (counts: {dict(counts)})")
    meta = {"source": cfg.source or HUB_ID, "max_len": cfg.max_len, "train": len(splits["train"]),
            "val": len(splits["val"]), **dict(counts)}
    write_pairs(out, splits, meta)
    skipped = {k: v for k, v in counts.items() if k not in ("read", "truncated")}
    print(f"prepare hh: {meta['train']} train + {meta['val']} val pairs -> {out} "
          f"({counts['read']} read, {counts['truncated']} truncated, skipped {skipped or 'none'})")
    return meta


COMMAND = Command("prepare hh", "Anthropic HH-RLHF pairs -> prompt/chosen/rejected token ids",
                  PrepareHHConfig, prepare)
