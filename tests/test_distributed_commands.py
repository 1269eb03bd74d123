"""The training commands themselves under `torchrun` with 2 gloo ranks: `gpt2 pretrain`, `gpt2 finetune` and
`gpt2 dpo` (plain and with its NLL term), each with DDP and FSDP, with and without activation checkpointing, in
fp32 and fp16 (loss scaling), with AdamW and Muon (not with FSDP, which refuses it); and `gpt2 reward --score
likelihood` (its whole LM trained) under DDP. Every run's per-step losses equal one process's that takes the same
global batch as accumulated micro batches.

Each case is one real `torchrun ... -m gpt2 COMMAND` (the path a user runs, defaults included: the fused loss
on a CPU) against `gpt2 COMMAND` in this process. The combinations are spread over the cases rather than run as
the whole product (each launch costs seconds of process start): every command runs under DDP and under FSDP, and
checkpointing, fp16 and Muon each run under DDP and (Muon excepted) under FSDP."""

from __future__ import annotations

import pytest
from rlhf_data import pair_stage_inputs
from test_finetune import QA, make_data, make_init
from test_pretrain import VOCAB, synthetic_shards
from torchrun_helpers import same_run, torchrun

from gpt2.cli import main

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


def flags(parallel: str, dtype: str, ckpt: bool, optimizer: str) -> list[str]:
    return ["--parallel", parallel, "--dtype", dtype, "--optimizer", optimizer, "--device", "cpu", "--no-progress",
            *(["--activation-checkpointing"] if ckpt else [])]


CASES = [  # (parallel, dtype, activation checkpointing, optimizer)
    ("ddp", "float32", False, "adamw"),
    ("fsdp", "float32", True, "adamw"),
    ("ddp", "float16", True, "muon"),
    ("fsdp", "float16", False, "adamw"),
]


def case_id(case) -> str:
    parallel, dtype, ckpt, optimizer = case
    return f"{parallel}-{dtype}-{'ckpt-' if ckpt else ''}{optimizer}"


@pytest.mark.parametrize("case", CASES[1:], ids=case_id)  # plain DDP in fp32: test_dpo's first case
def test_pretrain(case, tmp_path):
    data = synthetic_shards(tmp_path / "shards", 2_000, [3_000, 3_000])
    common = ["pretrain", "--preset", "tiny", "--data", str(data), "--vocab-size", str(VOCAB), "--n-layer", "2",
              "--n-head", "2", "--n-embd", "32", "--block-size", "32", "--micro-batch", "2", "--seq-len", "16",
              "--global-batch", "128", "--max-steps", "3", "--warmup-steps", "1", "--eval-every", "3",
              "--val-tokens", "256", *flags(*case)]
    main([*common, "--out", str(tmp_path / "one")])
    torchrun([*common, "--out", str(tmp_path / "two")], tmp_path)
    same_run(tmp_path / "one", tmp_path / "two", case[1], 3)


@pytest.mark.parametrize("case", [CASES[1], CASES[2]], ids=case_id)
def test_finetune(case, tmp_path, tokenizer_ok):
    data, init = make_data(tmp_path, QA[:6], val_fraction=0.3), make_init(tmp_path, n_embd=16)
    common = ["finetune", "--init", str(init), "--data", str(data), "--epochs", "2", "--lr", "1e-2",
              "--warmup-steps", "1", "--batch-size", "1", "--save-every", "0", "--sample-prompts", "Hi?",
              "--sample-max-tokens", "2", *flags(*case)]
    main([*common, "--grad-accum", "2", "--out", str(tmp_path / "one")])
    torchrun([*common, "--grad-accum", "1", "--out", str(tmp_path / "two")], tmp_path)
    same_run(tmp_path / "one", tmp_path / "two", case[1], 4)


@pytest.mark.parametrize(("case", "extra"), [(CASES[0], []), (CASES[3], ["--nll-coef", "1"])],
                         ids=lambda v: case_id(v) if isinstance(v, tuple) else " ".join(v) or "plain")
def test_dpo(case, extra, tmp_path, shared_data, tokenizer_ok):
    data, sft = pair_stage_inputs(tmp_path, shared_data, n=8, n_train=6)
    common = ["dpo", "--model", str(sft), "--data", str(data), "--lr", "1e-3", "--warmup-steps", "0",
              "--max-steps", "3", "--batch-size", "1", *extra, *flags(*case)]
    main([*common, "--grad-accum", "2", "--out", str(tmp_path / "one")])
    torchrun([*common, "--grad-accum", "1", "--out", str(tmp_path / "two")], tmp_path)
    same_run(tmp_path / "one", tmp_path / "two", case[1], 3)


def test_reward_with_the_likelihood_score(tmp_path, shared_data, tokenizer_ok):
    data, sft = pair_stage_inputs(tmp_path, shared_data, n=8, n_train=6)
    common = ["reward", "--model", str(sft), "--data", str(data), "--lr", "1e-3", "--warmup-steps", "0",
              "--max-steps", "3", "--batch-size", "1", "--score", "likelihood", *flags(*CASES[0])]
    main([*common, "--grad-accum", "2", "--out", str(tmp_path / "one")])
    torchrun([*common, "--grad-accum", "1", "--out", str(tmp_path / "two")], tmp_path)
    same_run(tmp_path / "one", tmp_path / "two", CASES[0][1], 3)
