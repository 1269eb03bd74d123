"""`gpt2 pretrain`: accumulation arithmetic, presets and flags, and short CLI runs on synthetic shards
(resume through the ShardLoader state, the run directory layout, one-line errors)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from gpt2.checkpoint import load_checkpoint, load_model
from gpt2.cli import main
from gpt2.commands.pretrain import PRETRAIN_PRESETS, PretrainConfig
from gpt2.data.shards import write_shard
from gpt2.errors import UserError
from gpt2.model import PRESETS, GPTConfig
from gpt2.train.loop import TrainConfig
from gpt2.train.pretrain import grad_accum_steps

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 256


def test_grad_accum_arithmetic():
    assert grad_accum_steps(524_288, 32, 1024, 1) == 16
    assert grad_accum_steps(524_288, 32, 1024, 8) == 2
    assert grad_accum_steps(524_288, 64, 1024, 8) == 1
    assert grad_accum_steps(2048, 8, 128, 1) == 2


def test_grad_accum_error_names_the_flags():
    with pytest.raises(UserError, match=r"--global-batch 524288 is not a multiple of --micro-batch 24 x "
                                        r"--seq-len 1024 x 1 process\(es\) = 24576 tokens"):
        grad_accum_steps(524_288, 24, 1024, 1)
    with pytest.raises(UserError, match="not a multiple"):
        grad_accum_steps(524_288, 32, 1024, 3)  # 3 GPUs do not divide 2^19
    with pytest.raises(UserError, match="not a multiple"):
        grad_accum_steps(1000, 32, 1024, 1)  # smaller than one micro batch


def test_every_model_and_loop_field_is_a_flag():
    names = {f.name for f in dataclasses.fields(PretrainConfig)}
    assert {f.name for f in dataclasses.fields(GPTConfig)} <= names
    assert {f.name for f in dataclasses.fields(TrainConfig)} <= names
    flags = [f for f in dataclasses.fields(PretrainConfig) if not f.name.startswith("_")]  # `_given`: not a flag
    assert all(f.metadata.get("help") for f in flags)


def test_124m_preset_is_the_seed_recipe():
    p = PRETRAIN_PRESETS["gpt2-124m"]
    assert p.model_config() == PRESETS["gpt2"]
    assert (p.global_batch, p.micro_batch, p.seq_len, p.lr, p.min_lr, p.warmup_steps, p.max_steps) == (
        524_288, 32, 1024, 6e-4, 6e-5, 715, 19_073)
    assert p.max_steps * p.global_batch == pytest.approx(10e9, rel=1e-3)  # one epoch of 10B tokens
    assert (p.weight_decay, tuple(p.betas), p.grad_clip) == (0.1, (0.9, 0.95), 1.0)
    assert grad_accum_steps(p.global_batch, p.micro_batch, p.seq_len, 8) == 2


def synthetic_shards(d, val_tokens: int, train_tokens: list[int]):
    """A shard folder of random token ids: one val shard and the given train shards."""
    rng = np.random.default_rng(0)
    d.mkdir()
    write_shard(d / "syn_val_000000.bin", rng.integers(0, VOCAB, val_tokens))
    for i, n in enumerate(train_tokens):
        write_shard(d / f"syn_train_{i + 1:06d}.bin", rng.integers(0, VOCAB, n))
    return d


@pytest.fixture
def shards(tmp_path):
    return synthetic_shards(tmp_path / "shards", 2_000, [3_000, 3_000])


def pretrain(data, out, *extra):
    main(["pretrain", "--preset", "tiny", "--data", str(data), "--out", str(out), "--device", "cpu",
          "--vocab-size", str(VOCAB), "--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--block-size", "32",
          "--micro-batch", "2", "--seq-len", "16", "--global-batch", "64", "--max-steps", "4", "--warmup-steps",
          "1", "--eval-every", "2", "--save-every", "0", "--val-tokens", "256", "--no-progress", *extra])


def train_losses(run_dir):
    return [r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if r["kind"] == "train"]


def test_cli_run_layout_and_exact_resume(shards, tmp_path):
    pretrain(shards, tmp_path / "full")
    run = tmp_path / "full"
    assert {p.name for p in run.iterdir()} >= {"checkpoint.pt", "model", "metrics.jsonl", "loss.png",
                                               "config.json"}
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["kind"], r["step"]) for r in lines] == [
        ("eval", 0), ("train", 1), ("train", 2), ("eval", 2), ("train", 3), ("train", 4), ("eval", 4)]
    assert lines[0]["val_loss"] == pytest.approx(np.log(VOCAB), abs=0.2)
    config = json.loads((run / "config.json").read_text())
    assert (config["n_layer"], config["global_batch"], config["data"]) == (1, 64, str(shards))
    model = load_model(run)
    assert (model.config.n_layer, model.config.vocab_size) == (1, VOCAB)
    ckpt = load_checkpoint(run)
    assert ckpt["step"] == 4 and ckpt["ranks"][0]["task"]["offset"] == 4 * 64  # 4 steps of 64 tokens

    pretrain(shards, tmp_path / "split", "--stop-at-step", "3")
    assert load_checkpoint(tmp_path / "split")["step"] == 3
    pretrain(shards, tmp_path / "split", "--resume")
    assert train_losses(tmp_path / "split") == train_losses(run)
    resumed = load_checkpoint(tmp_path / "split")["model"]
    assert all(torch.equal(v, resumed[k]) for k, v in ckpt["model"].items())
    assert ckpt["ranks"][0]["task"]["shuffle"] is True  # shuffled windows by default, resumed mid-epoch


def test_no_save_final_writes_no_checkpoint(shards, tmp_path, capsys):
    pretrain(shards, tmp_path / "bench", "--no-save-final")
    run = tmp_path / "bench"
    assert not (run / "checkpoint.pt").exists() and not (run / "model").exists()
    assert len(train_losses(run)) == 4 and (run / "loss.png").is_file()  # metrics and the graph all the same
    assert "--no-save-final: no final checkpoint" in capsys.readouterr().out
    pretrain(shards, tmp_path / "periodic", "--no-save-final", "--save-every", "2")  # --save-every still saves
    assert load_checkpoint(tmp_path / "periodic")["step"] == 4
    with pytest.raises(SystemExit):
        pretrain(shards, tmp_path / "bad", "--no-save-final", "--stop-at-step", "2")
    assert "--stop-at-step" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_val_batch_capped_to_a_small_val_split(tmp_path):
    # 100 val tokens hold 6 windows of 16: micro batch 8 would be no val batch at all; 6 rows are measured
    d = synthetic_shards(tmp_path / "small", 100, [3_000])
    pretrain(d, tmp_path / "run", "--micro-batch", "8", "--global-batch", "128", "--max-steps", "2",
             "--val-tokens", "100000")
    evals = [r for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
             if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [0, 2] and all(np.isfinite(r["val_loss"]) for r in evals)
    from gpt2.distributed import DistInfo
    from gpt2.train.pretrain import PretrainTask

    cfg = dataclasses.replace(PRETRAIN_PRESETS["tiny"], data=str(d), micro_batch=8, seq_len=16, global_batch=128)
    loader, steps = PretrainTask(cfg, DistInfo(0, 0, 1, torch.device("cpu"))).val_loader()
    assert (loader.batch_size, steps) == (6, 1)


def test_no_shuffle_reads_the_stream_in_order(shards, tmp_path):
    pretrain(shards, tmp_path / "ordered", "--no-shuffle", "--max-steps", "1", "--eval-every", "0")
    ckpt = load_checkpoint(tmp_path / "ordered")
    assert ckpt["ranks"][0]["task"]["shuffle"] is False and ckpt["run_config"]["shuffle"] is False
    pretrain(shards, tmp_path / "shuffled", "--max-steps", "1", "--eval-every", "0")
    assert train_losses(tmp_path / "ordered") != train_losses(tmp_path / "shuffled")  # other windows


def test_cli_errors_are_one_line(shards, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        pretrain(shards, tmp_path / "bad", "--global-batch", "100")
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("gpt2 pretrain: error: --global-batch 100 is not a multiple") and "\n" not in err
    with pytest.raises(SystemExit):
        pretrain(tmp_path / "missing", tmp_path / "bad")
    assert "missing" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        pretrain(shards, tmp_path / "bad", "--seq-len", "64")
    assert "--seq-len 64 exceeds --block-size 32" in capsys.readouterr().err


def test_cli_hellaswag_during_training(shards, tmp_path, tokenizer_ok):
    records = [{"ind": i, "ctx": "A man is sitting on a roof. he", "label": i % 4, "split": "val",
                "endings": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                            "is holding a rubik's cube.", "starts pulling up roofing on a roof."]} for i in range(3)]
    source = tmp_path / "hellaswag.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in records))
    pretrain(shards, tmp_path / "hs", "--vocab-size", "50257", "--max-steps", "2", "--hellaswag",
             "--hellaswag-source", str(source))
    evals = [r for r in map(json.loads, (tmp_path / "hs" / "metrics.jsonl").read_text().splitlines())
             if r["kind"] == "eval"]
    assert [e["step"] for e in evals] == [0, 2]
    assert all(set(e) == {"kind", "step", "val_loss", "hellaswag_acc"} for e in evals)
    assert all(e["hellaswag_acc"] in (0.0, 1 / 3, 2 / 3, 1.0) for e in evals)
