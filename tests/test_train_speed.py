"""The training loop's speed measures, on CPU: torch.compile after DDP, one host sync per optimizer
update, a step's batches fetched without moving the saved data position, evaluation without full logits, no
recompiles on fine-tuning's variable lengths, checkpoints written in the background."""

from __future__ import annotations

import functools
import os
import random
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from test_train_loop import (
    ListTask,
    MaskedTask,
    _free_port,
    cfg_for,
    load_checkpoint,
    losses,
    make_data,
    make_model,
)

from gpt2.checkpoint import BackgroundWriter, state_to_cpu
from gpt2.train.loop import train
from gpt2.train.stats import sum_over_ranks

pytestmark = pytest.mark.usefixtures("one_thread")




# --------------------------------------------------------------------------- batches


class CountingTask(ListTask):
    def __init__(self, data, rank=0, world=1):
        super().__init__(data, rank, world)
        self.fetched = 0

    def next_batch(self):
        self.fetched += 1
        return super().next_batch()


def test_prefetched_batch_never_counts_in_the_saved_position(tmp_path):
    """accum 2, stopped at step 3 with a save every step: each checkpoint holds exactly the batches its steps
    consumed, the run fetched no batch it did not use, and resuming matches a straight run bit for bit."""
    data = make_data()
    straight = cfg_for(tmp_path / "straight", max_steps=5, save_every=1)
    train(make_model(dropout=0.1), ListTask(data), straight, grad_accum_steps=2)
    task = CountingTask(data)
    part = cfg_for(tmp_path / "part", max_steps=5, save_every=1, stop_at_step=3)
    train(make_model(dropout=0.1), task, part, grad_accum_steps=2)
    assert task.fetched == 6 and load_checkpoint(tmp_path / "part")["ranks"][0]["task"] == {"pos": 6}
    train(make_model(seed=5, dropout=0.1), ListTask(data), cfg_for(tmp_path / "part", max_steps=5, save_every=1,
                                                                    resume=True), grad_accum_steps=2)
    assert losses(tmp_path / "part") == losses(tmp_path / "straight")
    a, b = load_checkpoint(tmp_path / "straight"), load_checkpoint(tmp_path / "part")
    assert all(torch.equal(v, b["model"][k]) for k, v in a["model"].items())


class SplitTask(ListTask):
    """Each batch becomes two optimizer updates of one micro batch each (as PPO's `step_batches`)."""

    def step_batches(self, grad_accum_steps):
        x, y = self.next_batch()
        half = x.size(0) // 2
        return [[(x[:half], y[:half])], [(x[half:], y[half:])]], {"rows": float(x.size(0))}


def test_a_step_fetches_its_micro_batches_in_order_and_no_more():
    task = CountingTask(make_data())
    updates, metrics = task.step_batches(3)
    assert task.fetched == 3 and metrics == {} and len(updates) == 1
    assert [torch.equal(x, d[:, :-1]) for (x, _), d in zip(updates[0], make_data())] == [True] * 3
    updates, metrics = SplitTask(make_data()).step_batches(3)  # one batch, whatever the accumulation
    assert len(updates) == 2 and metrics == {"rows": 2.0}


# --------------------------------------------------------------------------- host syncs


def test_one_host_sync_per_step(tmp_path, monkeypatch):
    """Tensor -> Python conversions made by the loop itself (its modules: the trainer, the step statistics):
    exactly one per optimizer update (the stats' .tolist()), so one per step, except for a task whose
    step_batches() splits a step into several updates."""
    import gpt2.train.loop as loop_mod
    import gpt2.train.stats as stats_mod

    loop_files = {loop_mod.__file__, stats_mod.__file__}

    calls = []

    def counting(name):
        original = getattr(torch.Tensor, name)

        @functools.wraps(original)
        def wrapper(self, *a, **k):
            if sys._getframe(1).f_code.co_filename in loop_files:
                calls.append(name)
            return original(self, *a, **k)
        return wrapper

    for name in ("tolist", "item", "__float__", "__int__", "__bool__"):
        monkeypatch.setattr(torch.Tensor, name, counting(name))
    train(make_model(), ListTask(make_data()), cfg_for(tmp_path / "plain", max_steps=4), grad_accum_steps=2)
    assert calls == ["tolist"] * 4
    calls.clear()  # token-weighted losses: the weights and their total G are host numbers on one process
    train(make_model(), MaskedTask(), cfg_for(tmp_path / "weighted", max_steps=4), grad_accum_steps=2)
    assert calls == ["tolist"] * 4
    calls.clear()  # several updates a step: one per update, each with its NaN check before the optimizer step
    train(make_model(), SplitTask(make_data()), cfg_for(tmp_path / "split", max_steps=4), grad_accum_steps=1)
    assert calls == ["tolist"] * 8


def test_step_stats_keep_host_numbers_on_the_host():
    dev = [torch.tensor(1.5), torch.tensor(2.0, dtype=torch.float32)]
    got = sum_over_ranks({"a": dev[0], "b": dev[1]}, {"c": 3, "d": 0.25}, distributed=False)
    assert got == {"a": 1.5, "b": 2.0, "c": 3.0, "d": 0.25}


# --------------------------------------------------------------------------- evaluation without full logits


def test_val_loss_never_builds_full_logits(monkeypatch):
    from gpt2.evaluate import val_loss
    from gpt2.model import GPT

    model = make_model()
    data = make_data(num_micro=3, batch=4)
    batches = [(d[:, :-1], d[:, 1:]) for d in data]
    with torch.no_grad():
        want = sum(model.loss(x, y).item() for x, y in batches) / len(batches)
    monkeypatch.setattr(GPT, "loss", lambda *a: pytest.fail("evaluation materialised the full logits"))
    assert val_loss(model, batches) == pytest.approx(want, rel=1e-5)


# --------------------------------------------------------------------------- background checkpoints


def test_state_to_cpu_copies_and_keeps_ties():
    w = torch.ones(3, 2)
    state = {"a": w, "b": w.detach(), "opt": [{"m": torch.zeros(2)}], "step": 3}
    copy = state_to_cpu(state)
    w.add_(1)
    assert torch.equal(copy["a"], torch.ones(3, 2)) and copy["step"] == 3
    assert copy["a"].untyped_storage().data_ptr() == copy["b"].untyped_storage().data_ptr()


def test_background_writer_runs_in_order_and_reraises():
    done = []
    with BackgroundWriter() as w:
        w.submit(lambda: done.append(1))
        w.submit(lambda: done.append(2))  # waits for the first
    assert done == [1, 2]
    w = BackgroundWriter()
    w.submit(lambda: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        w.wait()
    w.wait()  # raised once


def test_a_failed_background_save_is_raised_at_the_next_one(tmp_path, monkeypatch):
    """The write of step 4 fails in the writer thread while training goes on; the next save joins it and
    raises the loop's one-line error naming the failed step and the step the file still holds."""
    import gpt2.train.loop as loop_mod
    from gpt2.errors import UserError

    real, calls = loop_mod.save_checkpoint, []

    def flaky(state, path):
        calls.append(state["step"])
        if state["step"] == 4:
            raise UserError(f"cannot write {path}: No space left on device (errno 28)")
        return real(state, path)

    monkeypatch.setattr(loop_mod, "save_checkpoint", flaky)
    run = tmp_path / "run"
    with pytest.raises(UserError) as err:
        train(make_model(), ListTask(make_data()), cfg_for(run, max_steps=8, save_every=2))
    ckpt = run / "checkpoint.pt"
    assert str(err.value) == (f"saving step 4 failed: cannot write {ckpt}: No space left on device (errno 28); "
                              f"{ckpt} holds step 2")
    assert calls == [2, 4] and load_checkpoint(run)["step"] == 2  # raised at step 6's save, before its write


def test_checkpoint_holds_the_weights_of_its_step(tmp_path):
    """The background write must not see the updates made after the save was taken."""
    cfg = cfg_for(tmp_path / "a", max_steps=4, save_every=2)
    train(make_model(), ListTask(make_data()), cfg)
    at2 = cfg_for(tmp_path / "b", max_steps=4, stop_at_step=2)
    train(make_model(), ListTask(make_data()), at2)
    # run a: the checkpoint of step 2 was overwritten at step 4; compare its HF export instead via run b
    b = load_checkpoint(tmp_path / "b")
    assert b["step"] == 2
    from gpt2.checkpoint import load_model

    m = load_model(tmp_path / "b")
    assert torch.equal(m.transformer.h[0].mlp.c_fc.weight, b["model"]["transformer.h.0.mlp.c_fc.weight"])
    assert (tmp_path / "a" / "loss.png").is_file()


# --------------------------------------------------------------------------- torch.compile


def _compile_counting(monkeypatch, wrapped: list):
    """torch.compile with the aot_eager backend (dynamo, AOTAutograd and DDP graph splitting as in a real run,
    without inductor's minutes of C++ compilation on a CPU); records what the loop compiles."""
    real = torch.compile

    def compile_(module, **kw):
        wrapped.append(type(module).__name__)
        return real(module, **{**kw, "backend": "aot_eager"})
    monkeypatch.setattr(torch, "compile", compile_)


class VarLenTask(ListTask):
    """Fine-tuning-like micro batches: lengths (and the last batch's size) vary, answers are masked -100."""

    def next_batch(self):
        from gpt2.data.batching import collate

        rng = random.Random(self.pos)
        self.pos += 1
        size = 3 if self.pos % 5 == 0 else 4
        return collate([([1 + rng.randrange(100)] * rng.randint(2, 12), [5] * rng.randint(1, 18))
                        for _ in range(size)])


def test_variable_lengths_compile_a_bounded_number_of_graphs(tmp_path, monkeypatch, capsys):
    """Measured with dynamo's counters: after the first shape the sequence dimension turns dynamic (one
    recompile), after the first short batch the batch dimension (another), and the model's graph has no break
    (`is_causal` stays a plain bool, not a symbolic one), so 12 steps of ever new lengths make 3 graphs, not
    one per length."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    _compile_counting(monkeypatch, [])
    train(make_model(), VarLenTask(make_data()), cfg_for(tmp_path, max_steps=12, compile=True), grad_accum_steps=1)
    assert counters["stats"]["unique_graphs"] <= 3, dict(counters["stats"])
    assert not counters["graph_break"], dict(counters["graph_break"])
    torch._dynamo.reset()
    # the first step's wait for the compiler is said, once
    assert capsys.readouterr().out.count("compiling the training step (torch.compile)") == 1


def _ddp_compile_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from gpt2.distributed import destroy_distributed

    wrapped: list = []
    mp_ = pytest.MonkeyPatch()
    _compile_counting(mp_, wrapped)
    try:
        train(make_model(), ListTask(make_data(), rank, world), cfg_for(Path(out), compile=True),
              grad_accum_steps=2)
        assert wrapped == ["DistributedDataParallel"], wrapped  # compile(DDP(...)), not DDP(compile(...))
    finally:
        mp_.undo()
        destroy_distributed()


@pytest.mark.slow
def test_compiled_ddp_matches_one_process_with_accumulation(tmp_path):
    """2 gloo ranks x 2 micro-steps under torch.compile(DDP(...)) == 1 eager process x 4 micro-steps."""
    single = tmp_path / "single"
    train(make_model(), ListTask(make_data()), cfg_for(single), grad_accum_steps=4)
    mp.spawn(_ddp_compile_worker, args=(2, _free_port(), str(tmp_path / "ddp")), nprocs=2, join=True)
    assert losses(tmp_path / "ddp") == pytest.approx(losses(single), abs=1e-5)
    a, b = load_checkpoint(single), load_checkpoint(tmp_path / "ddp")
    for k, v in a["model"].items():
        torch.testing.assert_close(b["model"][k], v, atol=1e-5, rtol=1e-4)
