"""`gpt2 prepare alpaca`: read Stanford Alpaca (the hub's tatsu-lab/alpaca, or a local file), validate and
tokenize its records, split off a held-out set and write the folder that `gpt2 finetune --data` reads.

    gpt2 prepare alpaca --out data/alpaca
    gpt2 prepare alpaca --source alpaca_data.json --out data/alpaca --limit 1000

Malformed records are skipped and counted by reason, and the split is seeded; the record rules, the example
layout and the files written are `gpt2.data.alpaca`'s. The manifest is written last, so a folder with a
manifest is complete.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

from gpt2.commands import Command
from gpt2.config import arg, check_values
from gpt2.data.alpaca import HUB_ID, encode_records, write_prepared
from gpt2.data.sources import iter_records
from gpt2.errors import UserError


@dataclass
class PrepareAlpacaConfig:
    out: str = arg("data/alpaca", help="output folder for train.jsonl, val.jsonl and manifest.json")
    source: str | None = arg(None, help="local .json/.jsonl file (or folder) in the alpaca_data.json layout; "
                                        f"default: download {HUB_ID} from the Hugging Face Hub")
    val_fraction: float = arg(0.02, help="fraction of the valid examples held out for validation loss")
    seed: int = arg(1337, help="seed of the train/val split")
    limit: int | None = arg(None, help="read at most this many records (quick demos)", minimum=1)


def prepare(cfg: PrepareAlpacaConfig) -> dict:
    """Read, validate, tokenize, split and write the data; returns the manifest."""
    if cfg.source is not None and not Path(cfg.source).exists():
        raise UserError(f"--source {cfg.source}: no such file or folder")
    check_values(cfg)  # --limit, --seed
    if not 0 <= cfg.val_fraction < 1:
        raise UserError(f"--val-fraction must be in [0, 1), got {cfg.val_fraction}")
    records = itertools.islice(iter_records(cfg.source, HUB_ID), cfg.limit)  # limit None: all of them
    examples, n_records, malformed, where = encode_records(records)
    if not examples:
        raise UserError(f"{cfg.source or HUB_ID}: no valid Alpaca records among {n_records} "
                        f"(malformed: {dict(malformed) or 'none'})")
    manifest = write_prepared(Path(cfg.out), examples, source=cfg.source or HUB_ID, records=n_records,
                              malformed=malformed, where=where, val_fraction=cfg.val_fraction, seed=cfg.seed)
    out = Path(cfg.out)
    print(report(manifest, out))
    return manifest


def report(manifest: dict, out: Path) -> str:
    bad = ", ".join(f"{v} {k} (records {manifest['malformed_examples'][k]}...)"
                    for k, v in manifest["malformed"].items())
    return (f"alpaca: {manifest['records']} records -> {manifest['valid']} examples "
            f"({manifest['train']} train, {manifest['val']} val) in {out}; "
            f"malformed: {sum(manifest['malformed'].values())}{' = ' + bad if bad else ''}; "
            f"tokens {manifest['tokens']['total']}, longest {manifest['tokens']['max_len']}")


COMMAND = Command("prepare alpaca", "validate, tokenize and split Stanford Alpaca for fine-tuning",
                  PrepareAlpacaConfig, prepare)
