"""float16 training with dynamic loss scaling: close to float32, overflowed steps skipped and counted (not a failed
run), the scaler's state saved and resumed exactly, and `--dtype auto` picking the GPU's dtype."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from test_train_loop import ListTask, cfg_for, losses, make_data, make_model, read_lines

from gpt2.checkpoint import load_checkpoint
from gpt2.precision import autocast_dtype
from gpt2.train.loop import train

pytestmark = pytest.mark.usefixtures("one_thread")




class _InfGrad(torch.autograd.Function):
    """The identity forward, an infinite gradient backward: what an fp16 overflow in backward looks like."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


class OverflowTask(ListTask):
    """The loss is finite at every step, but the gradients of the micro batches fetched at `at` overflow."""

    def __init__(self, data, at: int):
        super().__init__(data)
        self.at = at

    def loss(self, model, batch):
        loss, m = super().loss(model, batch)
        return (_InfGrad.apply(loss) if self.pos == self.at else loss), m


def test_float16_losses_stay_close_to_float32(tmp_path):
    """Autocast fp16 rounds activations to 11 bits (about 3 decimal digits); over 6 steps of a tiny model the losses
    of the two runs agree to well under 1%, far closer than the loss moves in those steps."""
    train(make_model(), ListTask(make_data()), cfg_for(tmp_path / "fp32"), grad_accum_steps=2)
    train(make_model(), ListTask(make_data()), cfg_for(tmp_path / "fp16", dtype="float16"), grad_accum_steps=2)
    lines = read_lines(tmp_path / "fp16", "train")
    assert not any(x["skipped"] for x in lines), "a tiny model's gradients should not overflow at the initial scale"
    assert losses(tmp_path / "fp16") == pytest.approx(losses(tmp_path / "fp32"), rel=5e-3)
    assert losses(tmp_path / "fp32")[0] - losses(tmp_path / "fp32")[-1] > 0.05  # the losses did move


def test_an_overflow_skips_one_step_and_halves_the_scale(tmp_path):
    clean, hit = tmp_path / "clean", tmp_path / "hit"
    train(make_model(), ListTask(make_data()), cfg_for(clean, dtype="float16"))
    res = train(make_model(), OverflowTask(make_data(), at=3), cfg_for(hit, dtype="float16"))
    assert res.step == 6  # a skipped step is not a failed run
    a, b = read_lines(clean, "train"), read_lines(hit, "train")
    assert [x["skipped"] for x in b] == [False, False, True, False, False, False]
    assert b[-1]["skipped_steps"] == 1 and b[2]["loss_scale"] == a[2]["loss_scale"] / 2
    assert b[2]["loss"] == pytest.approx(a[2]["loss"])  # the forward was unchanged: only its gradients overflowed
    assert b[3]["loss"] != pytest.approx(a[3]["loss"], rel=1e-6)  # the skipped update is missing after it
    state = load_checkpoint(hit)
    assert state["skipped_steps"] == 1 and state["scaler"]["scale"] == b[-1]["loss_scale"]


def test_float16_resume_is_exact(tmp_path):
    """Straight vs. stopped at step 3 and resumed: the same losses and weights bit for bit, because the scaler's
    scale and growth tracker are in the checkpoint (an overflow at step 2 lowers the scale before the stop)."""
    cfg = cfg_for(tmp_path / "straight", dtype="float16")
    train(make_model(), OverflowTask(make_data(), at=2), cfg)
    part = replace(cfg, out=str(tmp_path / "part"), stop_at_step=3)
    train(make_model(), OverflowTask(make_data(), at=2), part)
    train(make_model(seed=9), OverflowTask(make_data(), at=2), replace(part, stop_at_step=None, resume=True))
    assert losses(tmp_path / "part") == losses(tmp_path / "straight")
    a, b = load_checkpoint(tmp_path / "straight"), load_checkpoint(tmp_path / "part")
    assert all(torch.equal(v, b["model"][k]) for k, v in a["model"].items())
    assert a["scaler"] == b["scaler"] and a["skipped_steps"] == b["skipped_steps"] == 1


def test_auto_dtype_is_bf16_then_fp16_on_gpus_and_fp32_on_cpus(monkeypatch):
    cuda = torch.device("cuda")
    assert autocast_dtype("auto", torch.device("cpu")) is None
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert autocast_dtype("auto", cuda) is torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)  # V100, T4, RTX 20xx
    assert autocast_dtype("auto", cuda) is torch.float16
    assert autocast_dtype("float16", torch.device("cpu")) is torch.float16
