"""Anthropic HH-RLHF preference pairs -> token ids (prompt, chosen answer, rejected answer); `gpt2 prepare hh`,
in `gpt2.commands.prepare_hh`, is the command that writes them.

Design decisions:
- HH-RLHF records are two full dialogues, `chosen` and `rejected`, in the "\\n\\nHuman: ...\\n\\nAssistant:
  ..." form, identical except for the final Assistant turn. A pair is split into the shared *prompt* (every
  turn before the final "\\n\\nAssistant:") and the two final answers. The prompt is rendered with the one
  fine-tuning template (`gpt2.template.format_chat`: the last Human turn is the instruction, earlier turns
  the input), and each answer is its text followed by `<|endoftext|>`, so a pair trains exactly like two
  fine-tuning examples `(prompt_ids, answer_ids)` and batches use the fine-tuning layout
  (`gpt2.data.batching.collate`: prompt and padding positions have target -100).
- Malformed pairs are counted by reason and reported, never a crash mid-run: a dialogue that does not
  parse into Human/Assistant turns, one that does not end with an Assistant turn, chosen and rejected
  prompts that differ, identical answers (no preference signal), missing or non-string fields.
- Over-length rule (`--max-len`, default 1024 = GPT-2's context): a pair must fit as prompt + the longer
  answer. If it does not, the oldest dialogue turns are dropped one at a time (the template is re-rendered,
  so the prompt stays well formed and keeps the question being answered) and the pair counts as
  "truncated"; if even the last Human turn alone is too long, the pair is dropped ("too_long").
  Answers are never cut: a cut answer would lose its `<|endoftext|>`.
- The held-out split is decided by a hash of the rendered full prompt, so pairs that share a dialogue
  prefix never straddle train and validation, and the split does not depend on record order.
- Output: `OUT/train.jsonl` and `OUT/val.jsonl` (one `{"prompt": [...], "chosen": [...], "rejected": [...]}`
  of token ids per line) and `OUT/meta.json` (counts), each written under a temporary name and renamed.
"""

from __future__ import annotations

import json
import os
import re
import zlib
from pathlib import Path

import torch

from gpt2.data.batching import collate
from gpt2.data.sources import jsonl_records
from gpt2.errors import UserError
from gpt2.io import atomic_write, make_folder, write_json_atomic
from gpt2.template import format_chat
from gpt2.tokenizer import EOT, check_token_ids, encode

HUB_ID = "Anthropic/hh-rlhf"
_TURN = re.compile(r"\n\n(Human|Assistant):")
_ROLES = {"Human": "user", "Assistant": "assistant"}

Pair = dict[str, list[int]]  # {"prompt": ids, "chosen": ids, "rejected": ids}
PAIR_FIELDS = ("prompt", "chosen", "rejected")


class MalformedPair(ValueError):
    """A record that cannot be used; its message is the reason it is counted under."""


# ----------------------------------------------------------------------------- parsing


def parse_dialogue(text: str) -> list[dict]:
    """"\\n\\nHuman: a\\n\\nAssistant: b" -> [{"role": "user", "content": "a"}, {"role": "assistant", ...}]."""
    parts = _TURN.split(text)
    if len(parts) < 3 or parts[0].strip():
        raise MalformedPair("not_a_dialogue")
    return [{"role": _ROLES[r], "content": c.strip()} for r, c in zip(parts[1::2], parts[2::2])]


def split_pair(chosen: object, rejected: object) -> tuple[list[dict], str, str]:
    """Two full dialogues -> (shared prompt messages, chosen answer, rejected answer)."""
    if not isinstance(chosen, str) or not isinstance(rejected, str):
        raise MalformedPair("missing_field")
    c, r = parse_dialogue(chosen), parse_dialogue(rejected)
    if c[-1]["role"] != "assistant" or r[-1]["role"] != "assistant":
        raise MalformedPair("no_final_answer")
    prompt = c[:-1]
    if not prompt or prompt[-1]["role"] != "user":
        raise MalformedPair("no_final_answer")
    if r[:-1] != prompt:
        raise MalformedPair("prompt_mismatch")
    if c[-1]["content"] == r[-1]["content"]:
        raise MalformedPair("identical_answers")
    return prompt, c[-1]["content"], r[-1]["content"]


def encode_answer(text: str) -> list[int]:
    """An answer's tokens: its text, then `<|endoftext|>` so the model learns to stop."""
    return encode(text) + [EOT]


def fit_prompt(messages: list[dict], answer_len: int, max_len: int) -> tuple[list[int], bool] | None:
    """Prompt ids such that prompt + an answer of `answer_len` tokens fits in `max_len`, dropping the
    oldest turns as needed. Returns (prompt_ids, truncated) or None when nothing fits."""
    for start in range(len(messages)):
        ids = encode(format_chat(messages[start:]))
        if len(ids) + answer_len <= max_len:
            return ids, start > 0
    return None


def tokenize_record(record: dict, max_len: int) -> tuple[Pair, bool]:
    """One HH-RLHF record -> (pair of token ids, truncated?). Raises MalformedPair with the reason."""
    prompt, chosen_text, rejected_text = split_pair(record.get("chosen"), record.get("rejected"))
    chosen, rejected = encode_answer(chosen_text), encode_answer(rejected_text)
    fitted = fit_prompt(prompt, max(len(chosen), len(rejected)), max_len)
    if fitted is None:
        raise MalformedPair("too_long")
    prompt_ids, truncated = fitted
    return {"prompt": prompt_ids, "chosen": chosen, "rejected": rejected}, truncated


def is_val(record: dict, val_fraction: float) -> bool:
    """Held-out by a hash of the shared dialogue prefix (stable across runs and record order)."""
    return held_out(record["chosen"][: record["chosen"].rfind("\n\nAssistant:")], val_fraction)


def held_out(key: str, val_fraction: float) -> bool:
    """Whether the pairs of prompt `key` are validation pairs: a hash of the text, so the same prompt always
    falls on the same side, whatever the order or the other pairs."""
    return zlib.crc32(key.encode("utf-8")) % 1_000_000 < val_fraction * 1_000_000


# ----------------------------------------------------------------------------- batches


def collate_pairs(pairs: list[Pair]) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of B pairs -> (input_ids, targets) of 2B rows: the B chosen rows, then the B rejected rows
    (one forward pass scores both sides)."""
    return collate([(p["prompt"], p["chosen"]) for p in pairs] + [(p["prompt"], p["rejected"]) for p in pairs])


# ----------------------------------------------------------------------------- files


def load_pairs(path: str | os.PathLike) -> list[Pair]:
    """The pairs of a `train.jsonl`/`val.jsonl` written by `gpt2 prepare hh`."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such preference file (make one with `gpt2 prepare hh --out DIR`)")
    return [check_pair(row, f"{path}:{lineno}") for lineno, row in jsonl_records(path)]


def check_pair(row: dict, where: str) -> Pair:
    """One line of a prepared file (`where` names the file and the line) as a pair: prompt, chosen and rejected
    each a list of GPT-2 token ids; else a UserError naming the field."""
    missing = [k for k in PAIR_FIELDS if k not in row]
    if missing:
        raise UserError(f"{where}: no field {missing[0]}: not a line of `gpt2 prepare hh`")
    return {k: check_token_ids(row[k], f"{where}: {k}") for k in PAIR_FIELDS}


def highest_token_id(pairs: list[Pair]) -> int:
    """The largest token id in `pairs` (-1 when there is none): a model must have more ids to read them."""
    return max((max(seq) for p in pairs for seq in p.values() if seq), default=-1)


def pair_length(pair: Pair) -> int:
    """Tokens a pair needs in the context window: its prompt plus its longer answer."""
    return len(pair["prompt"]) + max(len(pair["chosen"]), len(pair["rejected"]))


def write_pairs(out: Path, splits: dict[str, list[Pair]], meta: dict) -> None:
    """The prepared folder `gpt2 dpo`, `gpt2 reward` and `gpt2 ppo` read: `{split}.jsonl` (a pair per line) for
    each split, then meta.json (counts, `meta` plus the split sizes), each written atomically."""
    make_folder(out)
    for split, pairs in splits.items():
        with atomic_write(out / f"{split}.jsonl", "w") as f:
            f.writelines(json.dumps(p) + "\n" for p in pairs)
    write_json_atomic(out / "meta.json", {**meta, **{split: len(pairs) for split, pairs in splits.items()}})


def split_file(data: str | os.PathLike, split: str) -> Path:
    """`DIR` -> `DIR/{split}.jsonl`; a file path is returned as is."""
    path = Path(data)
    return path / f"{split}.jsonl" if path.is_dir() else path
