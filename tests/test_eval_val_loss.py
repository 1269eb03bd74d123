"""`gpt2 eval val-loss`: the mean loss over the first windows of the val shards, matching a manual
computation on the same tokens; the token budget never wraps into a second pass; errors are one line."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gpt2.cli import main
from gpt2.commands.eval import ValLossConfig, run_val_loss
from gpt2.data.shards import write_shard
from gpt2.model import GPT, GPTConfig


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("valloss")
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=32)).eval()
    model.save_pretrained(root / "model")
    (root / "data").mkdir()
    stream = np.random.default_rng(0).integers(0, 50257, size=700, dtype=np.int64)
    write_shard(root / "data" / "tiny_val_000000.bin", stream[:300])  # batches straddle the two shards
    write_shard(root / "data" / "tiny_val_000001.bin", stream[300:])
    write_shard(root / "data" / "tiny_train_000000.bin", stream[:100])
    return root, model, torch.from_numpy(stream)


def manual(model, stream, steps, B, T):
    losses = []
    for s in range(steps):
        buf = stream[s * B * T: (s + 1) * B * T + 1]
        with torch.no_grad():
            losses.append(model.loss(buf[:-1].view(B, T), buf[1:].view(B, T)).item())
    return sum(losses) / steps


def cfg(root, **kw):
    return ValLossConfig(model=str(root / "model"), data=str(root / "data"), device="cpu", **kw)


def test_token_budget_sets_the_number_of_batches(setup, capsys):
    root, model, stream = setup
    got = run_val_loss(cfg(root, tokens=2 * 4 * 32 + 5, batch_size=4))  # seq_len defaults to block_size 32
    assert got["tokens"] == 256
    assert got["val_loss"] == pytest.approx(manual(model, stream, 2, 4, 32), rel=1e-5)
    assert "val loss" in capsys.readouterr().out


def test_budget_is_capped_at_one_pass(setup):
    root, model, stream = setup
    got = run_val_loss(cfg(root, tokens=10**9, batch_size=2, seq_len=16))
    steps = (700 - 1) // 32  # 21 windows of 2 x 16 fit; the tail is not read, nothing is read twice
    assert got["tokens"] == steps * 32
    assert got["val_loss"] == pytest.approx(manual(model, stream, steps, 2, 16), rel=1e-5)


def test_cli_and_errors(setup, capsys):
    root, _, _ = setup
    main(["eval", "val-loss", "--model", str(root / "model"), "--data", str(root / "data"), "--tokens", "64",
          "--batch-size", "2", "--seq-len", "16", "--device", "cpu"])
    assert "over 64 tokens (2 batches of 2 x 16)" in capsys.readouterr().out
    for argv, message in [
        ([], "--data DIR"),
        (["--data", str(root / "data"), "--seq-len", "64"], "--seq-len 64 exceeds"),
        (["--data", str(root / "data"), "--split", "train", "--batch-size", "8"], "fewer than one step"),
        (["--data", str(root / "nope")], "no such data folder"),
    ]:
        with pytest.raises(SystemExit):
            main(["eval", "val-loss", "--model", str(root / "model"), "--device", "cpu", *argv])
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err
