"""Helpers of the RLHF tests: real HH-RLHF pairs made small (shortened, relabelled into a compact
vocabulary) and a one-thread fixture for tiny models."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import torch

from gpt2.data.preferences import MalformedPair, tokenize_record
from gpt2.model import GPT, GPTConfig
from gpt2.tokenizer import EOT


def short_hh_pairs(shared_data, n: int = 8, prompt_tokens: int = 24, answer_tokens: int = 12) -> list[dict]:
    """The first n real pairs, each prompt cut to its last `prompt_tokens` tokens and each answer to its
    first `answer_tokens` (then EOT), keeping only pairs whose shortened answers still differ."""
    pairs = []
    with gzip.open(shared_data / "hh_rlhf_harmless_test.jsonl.gz", "rt", encoding="utf-8") as f:
        for line in f:
            try:
                pair, _ = tokenize_record(json.loads(line), max_len=1024)
            except MalformedPair:
                continue
            short = {"prompt": pair["prompt"][-prompt_tokens:],
                     "chosen": pair["chosen"][:answer_tokens] + [EOT],
                     "rejected": pair["rejected"][:answer_tokens] + [EOT]}
            if short["chosen"] != short["rejected"]:
                pairs.append(short)
            if len(pairs) == n:
                return pairs
    raise AssertionError("not enough pairs")


def compact(pairs: list[dict]) -> tuple[list[dict], GPTConfig]:
    """Relabel the token ids used by `pairs` as 0..K-1; returns the pairs and a tiny config with K tokens."""
    ids = sorted({t for p in pairs for seq in p.values() for t in seq})
    new = {t: i for i, t in enumerate(ids)}
    relabelled = [{k: [new[t] for t in seq] for k, seq in p.items()} for p in pairs]
    return relabelled, GPTConfig(block_size=64, vocab_size=len(ids), n_layer=2, n_head=2, n_embd=64)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matrices: on a busy 2-core machine a second thread costs far more in waiting than it gains.
    Autouse in every test module that imports it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pair_stage_inputs(folder: Path, shared_data: Path, n: int, n_train: int) -> tuple[Path, Path]:
    """(a prepared pairs folder of n compacted HH pairs, n_train of them for training; a random starting model
    of their vocabulary), both written under `folder`: what `gpt2 dpo` and `gpt2 reward` read."""
    pairs, config = compact(short_hh_pairs(shared_data, n=n))
    data = folder / "hh"
    data.mkdir()
    (data / "train.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs[:n_train]))
    (data / "val.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs[n_train:]))
    GPT(config).save_pretrained(folder / "sft")
    return data, folder / "sft"
