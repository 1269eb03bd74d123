"""Stanford Alpaca instruction data: validate, tokenize, split, batch (`gpt2 prepare alpaca`, in
`gpt2.commands.prepare_alpaca`, is the command that writes it).

Design decisions:
- Records are `{"instruction", "input", "output"}` (the original `alpaca_data.json` layout, which the hub's
  `tatsu-lab/alpaca` also has). `input` may be missing or null (read as ""); a record that is not an
  object, lacks `instruction`/`output`, has a non-string field, or has an empty instruction or output is
  *malformed*: it is skipped and counted by reason (`check_record`), never a crash halfway through 52K rows.
- One example is `(question_ids, answer_ids)`: the question is `gpt2.template.format_prompt(instruction,
  input)` (the one template, ending in "### Response:\\n") and the answer is the output (surrounding
  whitespace stripped) followed by `<|endoftext|>` (50256), which is how the model learns to stop.
  The two are tokenized separately, so the question/answer boundary is exact.
- Batches (the seed's layout, `-100` outside the answer) and length-grouped batch order live in
  `gpt2.data.batching`, shared with DPO, the reward model and PPO.
- Over-length rule (`fit_length`, applied by fine-tuning with the model's context window, so prepared data
  does not depend on the model): an answer is never cut (that would lose its `<|endoftext|>`). If
  `len(seq) > max_len`, the question is truncated *from the left*, keeping its last `max_len -
  len(answer)` tokens: the instruction's end and the template's "### Response:" marker survive, the
  generic preamble goes first. If that would leave fewer than `MIN_QUESTION_TOKENS` question tokens, the
  example is dropped. Both cases are counted ("truncated", "dropped_too_long").
- Held-out split (`split_indices`): a seeded permutation of the valid examples, `round(n * val_fraction)`
  of them (at least one when the fraction is > 0 and n >= 2) held out. Same data + seed -> same split.

Data layout written by `gpt2 prepare alpaca --out DIR`:
    DIR/train.jsonl, DIR/val.jsonl   one example per line: {"question_ids": [...], "answer_ids": [...]}
    DIR/manifest.json                source, counts (records, valid, train, val), malformed by reason
                                     (with a few record indices), val_fraction, seed, token lengths.
Every file is written to a temporary name and renamed; the manifest is written last, so a folder with a
manifest is complete.
"""

from __future__ import annotations

import json
import os
import random
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from gpt2.data.batching import Example
from gpt2.data.sources import jsonl_records
from gpt2.errors import UserError
from gpt2.io import atomic_write, write_json_atomic
from gpt2.template import format_prompt
from gpt2.tokenizer import EOT, check_token_ids, encode_batch

HUB_ID = "tatsu-lab/alpaca"
MIN_QUESTION_TOKENS = 16  # below this a left-truncated question has lost its instruction: drop instead
MANIFEST = "manifest.json"



# ---------------------------------------------------------------- records -> examples


def check_record(record: Any) -> str | None:
    """None for a usable record, else the reason it is malformed (a short, stable string for counting)."""
    if not isinstance(record, dict):
        return "not an object"
    for field in ("instruction", "output"):
        if field not in record or record[field] is None:
            return f"missing {field}"
    for field in ("instruction", "input", "output"):
        value = record.get(field)
        if value is not None and not isinstance(value, str):
            return f"{field} is not a string"
    if not record["instruction"].strip():
        return "empty instruction"
    if not record["output"].strip():
        return "empty output"
    return None


def _texts(record: dict) -> tuple[str, str]:
    return format_prompt(record["instruction"], record.get("input") or ""), record["output"].strip()


def encode_example(record: dict) -> Example:
    """A valid record -> (question_ids, answer_ids); the answer ends with <|endoftext|> (50256)."""
    return encode_examples([record])[0]


def encode_examples(records: Sequence[dict]) -> list[Example]:
    """`encode_example` for many records at once (tiktoken encodes a batch on several threads)."""
    pairs = [_texts(r) for r in records]
    ids = encode_batch([t for pair in pairs for t in pair])
    return [(ids[2 * i], ids[2 * i + 1] + [EOT]) for i in range(len(pairs))]


def fit_length(example: Example, max_len: int) -> Example | None:
    """The over-length rule (module docstring): the example as is if it fits, its question cut from the
    left if enough of it is left, else None (drop)."""
    q, a = example
    if len(q) + len(a) <= max_len:
        return example
    keep = max_len - len(a)
    if keep < MIN_QUESTION_TOKENS:
        return None
    return q[len(q) - keep :], a


def fit_examples(examples: Iterable[Example], max_len: int) -> tuple[list[Example], Counter]:
    """Apply `fit_length` to every example; returns the kept ones and counts of "truncated" and
    "dropped_too_long"."""
    kept, counts = [], Counter()
    for ex in examples:
        fitted = fit_length(ex, max_len)
        if fitted is None:
            counts["dropped_too_long"] += 1
            continue
        if fitted is not ex:
            counts["truncated"] += 1
        kept.append(fitted)
    return kept, counts


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Deterministic (train, val) index lists over n examples; val is `round(n * val_fraction)` of them
    (at least 1 when val_fraction > 0 and n >= 2), both in ascending order."""
    if not 0 <= val_fraction < 1:
        raise UserError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    n_val = round(n * val_fraction)
    if val_fraction > 0 and n >= 2:
        n_val = max(1, n_val)
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return sorted(order[n_val:]), sorted(order[:n_val])


# ---------------------------------------------------------------- files


def write_examples(path: Path, examples: Iterable[Example]) -> None:
    with atomic_write(path, "w") as f:
        for q, a in examples:
            f.write(json.dumps({"question_ids": q, "answer_ids": a}, separators=(",", ":")) + "\n")


def write_prepared(out: Path, examples: list[Example], *, source: str, records: int, malformed: Counter,
                   where: dict[str, list[int]], val_fraction: float, seed: int) -> dict:
    """Split `examples` (`split_indices`) and write the prepared folder that `gpt2 finetune --data` reads:
    train.jsonl, val.jsonl, then the manifest (last, so a folder with a manifest is complete). Returns the
    manifest. `records`, `malformed` and `where` are what was read (`encode_records`), `source` names it."""
    train_idx, val_idx = split_indices(len(examples), val_fraction, seed)
    write_examples(out / "train.jsonl", (examples[i] for i in train_idx))
    write_examples(out / "val.jsonl", (examples[i] for i in val_idx))
    lengths = sorted(len(q) + len(a) for q, a in examples)
    manifest = {
        "format": "alpaca-examples-v1",
        "source": source,
        "tokenizer": "gpt2",
        "records": records,
        "valid": len(examples),
        "train": len(train_idx),
        "val": len(val_idx),
        "val_fraction": val_fraction,
        "seed": seed,
        "malformed": dict(sorted(malformed.items())),
        "malformed_examples": {k: where[k] for k in sorted(where)},
        "tokens": {"total": sum(lengths), "max_len": lengths[-1], "median_len": lengths[len(lengths) // 2],
                   "over_1024": sum(n > 1024 for n in lengths)},
    }
    write_json_atomic(out / MANIFEST, manifest)
    return manifest


def read_manifest(data_dir: str | os.PathLike) -> dict:
    path = Path(data_dir) / MANIFEST
    if not path.is_file():
        raise UserError(f"{path} not found: prepare the data first with `gpt2 prepare alpaca --out {data_dir}`")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e})") from e


def load_split(data_dir: str | os.PathLike, split: str) -> list[Example]:
    """The prepared examples of `split` ("train" or "val") from `gpt2 prepare alpaca --out DIR`."""
    read_manifest(data_dir)  # a folder without a manifest is incomplete
    path = Path(data_dir) / f"{split}.jsonl"
    if not path.is_file():
        raise UserError(f"{path} not found")
    return [check_example(row, f"{path}:{lineno}") for lineno, row in jsonl_records(path)]


def check_example(row: dict, where: str) -> Example:
    """One line of a prepared file (`where` names the file and the line) as an example: both fields lists of
    GPT-2 token ids, neither empty, the answer ending in <|endoftext|>; else a UserError naming the field."""
    for field in ("question_ids", "answer_ids"):
        if field not in row:
            raise UserError(f"{where}: no field {field}: not a line of `gpt2 prepare alpaca`")
    q = check_token_ids(row["question_ids"], f"{where}: question_ids")
    a = check_token_ids(row["answer_ids"], f"{where}: answer_ids")
    if not q or not a or a[-1] != EOT:
        raise UserError(f"{where}: empty question or answer not ending in {EOT}")
    return q, a


# ---------------------------------------------------------------- records in bulk


def _chunks(records: Iterable[Any], size: int) -> Iterator[list[Any]]:
    chunk: list[Any] = []
    for r in records:
        chunk.append(r)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def encode_records(records: Iterable[Any], label: str = "alpaca records",
                   ) -> tuple[list[Example], int, Counter, dict[str, list[int]]]:
    """Validate and tokenize a stream of records: (examples, records read, malformed counts by reason,
    the first few malformed record indices per reason). `label` names them on the progress bar."""
    examples: list[Example] = []
    malformed: Counter = Counter()
    where: dict[str, list[int]] = {}
    n = 0
    with tqdm(desc=label, unit=" rec") as bar:
        for chunk in _chunks(records, 1024):
            good = []
            for record in chunk:
                reason = check_record(record)
                if reason is None:
                    good.append(record)
                else:
                    malformed[reason] += 1
                    if len(where.setdefault(reason, [])) < 5:
                        where[reason].append(n)
                n += 1
            examples += encode_examples(good)
            bar.update(len(chunk))
    return examples, n, malformed, where
