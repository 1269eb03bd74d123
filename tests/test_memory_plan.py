"""The memory plan before step 1: its activation arithmetic against what autograd really keeps, the printed line,
a plan that cannot fit refused before the first step with what would fit, and an out-of-memory error inside a
step turned into one line with the checkpoint intact."""

from __future__ import annotations

import pytest
import torch
from test_train_loop import ListTask, cfg_for, make_data, make_model, read_lines

import gpt2.train.loop as loop
from gpt2.checkpoint import load_checkpoint
from gpt2.errors import UserError
from gpt2.model import GPT, GPTConfig
from gpt2.train.memory import GB, fitting_rows, plan_memory

pytestmark = pytest.mark.usefixtures("one_thread")




def activation_bytes(model: GPT, x: torch.Tensor, y: torch.Tensor, amp: torch.dtype | None) -> int:
    """Bytes autograd keeps for backward, not counting the parameters themselves (the plan counts those as
    weights), each tensor once."""
    params = {p.data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.data_ptr() not in params:
            seen[t.data_ptr()] = max(seen.get(t.data_ptr(), 0), t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=amp, enabled=amp is not None):
            model.loss(x, y)
    return sum(seen.values())


def plan_and_real(amp: torch.dtype | None, checkpointing: bool):
    from gpt2.train.parallel import checkpoint_activations

    cfg = GPTConfig(block_size=256, vocab_size=1024, n_layer=3, n_head=4, n_embd=256)
    torch.manual_seed(0)
    model = GPT(cfg).train()
    if checkpointing:
        checkpoint_activations(model)
    x, y = torch.randint(0, 1024, (2, 256)), torch.randint(0, 1024, (2, 256))
    return model, plan_memory(model, 2, 256, amp, checkpointing), activation_bytes(model, x, y, amp)


@pytest.mark.parametrize("amp", [None, torch.bfloat16])
def test_activation_estimate_is_within_a_third_of_what_autograd_keeps(amp):
    """The plan is an estimate from a published per-layer count, not a measurement: it must land within a
    third of the truth on each side, for both dtypes, so its advice is usable."""
    model, plan, real = plan_and_real(amp, False)
    assert 0.67 < plan.activations / real < 1.33, (plan.activations, real)
    assert plan.weights == plan.gradients == 4 * sum(p.numel() for p in model.parameters())
    assert plan.optimizer == 2 * plan.weights  # AdamW's two moments
    sharded = plan_memory(model, 2, 256, amp, False, shards=2)
    assert sharded.weights + sharded.gradients + sharded.optimizer == pytest.approx(
        (plan.weights + plan.gradients + plan.optimizer) / 2)


@pytest.mark.parametrize("amp", [None, torch.bfloat16])
def test_checkpointing_estimate_bounds_what_autograd_keeps(amp):
    """With checkpointing autograd keeps the blocks' inputs and the head's tensors in forward; the plan adds one
    block's full set (alive during its recompute in backward) and the logits' gradient, so it is an upper bound,
    and still well under the plan without checkpointing."""
    _, plan, real = plan_and_real(amp, True)
    _, plain, _ = plan_and_real(amp, False)
    assert real <= plan.activations < 0.8 * plain.activations


def test_the_124m_plan_matches_its_parameter_count():
    from gpt2.model import PRESETS

    with torch.device("meta"):
        model = GPT(PRESETS["gpt2"])
    plan = plan_memory(model, 32, 1024, torch.bfloat16, False)
    n = sum(p.numel() for p in model.parameters())  # 124M + the padded vocabulary rows, tied once
    assert plan.weights + plan.gradients + plan.optimizer == 16 * n
    assert 20 * GB < plan.activations < 60 * GB  # the seed's micro batch 32 x 1024: why it needs a big card
    assert fitting_rows(plan, 16 * n + 10 * plan.per_row) == 10


def test_the_plan_is_printed_before_step_one(tmp_path, capsys):
    loop.train(make_model(), ListTask(make_data()), cfg_for(tmp_path, max_steps=1, warmup_steps=0))
    out = capsys.readouterr().out
    assert "memory plan per cpu device:" in out and "GB free" in out and "activations (2 rows)" in out


def test_a_plan_that_cannot_fit_stops_before_the_first_step(tmp_path, monkeypatch):
    model = make_model()
    weights = 16 * sum(p.numel() for p in model.parameters())
    monkeypatch.setattr(loop, "free_memory", lambda device, resident: weights + 1000)  # room for no activations
    with pytest.raises(UserError, match=r"does not fit; try --activation-checkpointing .*--no-memory-check"):
        loop.train(model, ListTask(make_data()), cfg_for(tmp_path))
    assert read_lines(tmp_path, "train") == [] and not (tmp_path / "checkpoint.pt").exists()
    monkeypatch.setattr(loop, "free_memory", lambda device, resident: 1.0)  # the check can be turned off
    assert loop.train(make_model(), ListTask(make_data()), cfg_for(tmp_path / "b", memory_check=False)).step == 6


def test_a_smaller_micro_batch_is_named_when_one_fits(tmp_path, monkeypatch):
    model = make_model()
    plan = plan_memory(model, 2, 16, None, False)
    monkeypatch.setattr(loop, "free_memory", lambda device, resident: plan.total - plan.per_row / 2)
    with pytest.raises(UserError, match=r"try --batch-size 1 \(or lower\); --activation-checkpointing"):
        loop.train(model, ListTask(make_data()), cfg_for(tmp_path))


def test_out_of_memory_inside_a_step_is_one_line_and_keeps_the_checkpoint(tmp_path, monkeypatch):
    real = loop.Trainer.update

    def update(self, *a, **k):
        if self.state.step == 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(self, *a, **k)

    monkeypatch.setattr(loop.Trainer, "update", update)
    with pytest.raises(UserError, match=r"out of memory on cpu at step 4; .*checkpoint.pt holds step 2\. Lower"):
        loop.train(make_model(), ListTask(make_data()), cfg_for(tmp_path, save_every=2))
    assert load_checkpoint(tmp_path)["step"] == 2


@pytest.mark.parametrize("name", ["gpt2-124m", "gpt2-medium", "gpt2-large", "gpt2-xl"])
def test_the_pretraining_presets_fit_an_80gb_card_on_8_gpus(name):
    """Each GPU preset validates, its batch divides over 8 processes, and its micro batch fits 80 GB under DDP in
    bf16 by the plan (the presets' own promise)."""
    from gpt2.commands.pretrain import PRETRAIN_PRESETS
    from gpt2.train.pretrain import grad_accum_steps

    cfg = PRETRAIN_PRESETS[name]
    cfg.validate()
    assert grad_accum_steps(cfg.global_batch, cfg.micro_batch, cfg.seq_len, 8) >= 1
    with torch.device("meta"):
        model = GPT(cfg.model_config())
    plan = plan_memory(model, cfg.micro_batch, cfg.seq_len, torch.bfloat16, False)
    assert plan.total < 80 * GB - 0.5 * GB
    assert cfg.warmup_steps * cfg.global_batch == pytest.approx(375e6, rel=0.01)  # GPT-3's 375M warmup tokens
