"""FSDP2 (`--parallel fsdp`) with 2 gloo CPU processes: the same losses as DDP and as one process with
accumulation, exact resume FSDP -> FSDP, a checkpoint and export that load in one process like a DDP run's, and
about half of DDP's per-rank memory for parameters, gradients and optimizer state."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from test_train_fp16 import OverflowTask
from test_train_loop import ListTask, _free_port, cfg_for, losses, make_data, make_model, read_lines

from gpt2.checkpoint import load_checkpoint, load_model
from gpt2.model import GPT
from gpt2.train.loop import Trainer, train
from gpt2.train.parallel import local_tensor_bytes

pytestmark = pytest.mark.slow


def state_bytes(trainer: Trainer) -> int:
    """This rank's bytes of parameters, their gradients (one of each while training) and AdamW's state."""
    params = sum(local_tensor_bytes(p) for p in trainer.model.parameters())
    moments = sum(local_tensor_bytes(v) for s in trainer.optimizer.state.values() for v in s.values()
                  if isinstance(v, torch.Tensor) and v.dim() > 0)
    return 2 * params + moments


def _worker(rank: int, world: int, port: int, out: str, parallel: str, stop_at: int | None, resume: bool,
            dtype: str = "auto") -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from gpt2.distributed import destroy_distributed, end_process

    try:
        Path(out, f"bytes{rank}.json").write_text(json.dumps(train_and_measure(rank, world, out, parallel, stop_at,
                                                                               resume, dtype)))
    finally:
        destroy_distributed()  # after the trainer is gone: a DDP wrapper freed after its process group deadlocks
    end_process(0)  # as `gpt2` ends a torchrun worker (see there); an error above is raised to mp.spawn instead


def train_and_measure(rank: int, world: int, out: str, parallel: str, stop_at: int | None, resume: bool,
                      dtype: str) -> int:
    from gpt2.distributed import init_distributed

    dist = init_distributed("cpu")
    cfg = cfg_for(Path(out), parallel=parallel, save_every=2, stop_at_step=stop_at, resume=resume, dtype=dtype)
    # float16 runs overflow in the step whose last micro batch is this rank's 4th (rank 0 only: one rank's
    # overflow must make every rank skip the step)
    task = OverflowTask(make_data(), at=4 if rank == 0 else -1) if dtype == "float16" else ListTask(make_data())
    task.rank, task.world = rank, world
    trainer = Trainer(make_model(seed=7 if resume else 0), task, cfg, 2, dist)
    try:
        trainer.fit()
        return state_bytes(trainer)
    finally:
        trainer.close()


def spawn(out: Path, parallel: str, stop_at: int | None = None, resume: bool = False, dtype: str = "float32") -> None:
    mp.spawn(_worker, args=(2, _free_port(), str(out), parallel, stop_at, resume, dtype), nprocs=2, join=True)


def test_fsdp_matches_ddp_and_one_process_resumes_exactly_and_halves_state(tmp_path):
    single = tmp_path / "single"
    train(make_model(), ListTask(make_data()), replace(cfg_for(single), save_every=2), grad_accum_steps=4)
    spawn(tmp_path / "ddp", "ddp")
    spawn(tmp_path / "fsdp", "fsdp")
    # Sharding changes where the sums are taken (reduce-scatter of shards instead of an all-reduce), not what is
    # summed: the losses agree to float32 rounding accumulated over 6 steps.
    assert losses(tmp_path / "fsdp") == pytest.approx(losses(tmp_path / "ddp"), abs=1e-5)
    assert losses(tmp_path / "fsdp") == pytest.approx(losses(single), abs=1e-5)

    fsdp, ddp = load_checkpoint(tmp_path / "fsdp"), load_checkpoint(tmp_path / "ddp")
    assert fsdp["sharded"] and not ddp["sharded"]
    assert set(fsdp["model"]) == set(ddp["model"])  # whole weights, same names
    for k, v in ddp["model"].items():
        torch.testing.assert_close(fsdp["model"][k], v, atol=1e-5, rtol=1e-4)
    # the export loads in one process as a DDP run's does, with the same weights
    a, b = load_model(tmp_path / "fsdp"), load_model(tmp_path / "ddp")
    assert isinstance(a, GPT) and sorted(os.listdir(tmp_path / "fsdp" / "model")) == sorted(
        os.listdir(tmp_path / "ddp" / "model"))
    for (k, v), (_, w) in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(v, w, atol=1e-5, rtol=1e-4, msg=k)

    # per rank: parameters + gradients + optimizer state about half of DDP's at 2 ranks
    sharded = [json.loads((tmp_path / "fsdp" / f"bytes{r}.json").read_text()) for r in range(2)]
    whole = [json.loads((tmp_path / "ddp" / f"bytes{r}.json").read_text()) for r in range(2)]
    for s, w in zip(sharded, whole):
        assert 0.45 < s / w < 0.6, (s, w)

    # FSDP -> FSDP resume: stopped at step 3 (checkpoint 3), resumed from other initial weights, equal bit for bit
    spawn(tmp_path / "part", "fsdp", stop_at=3)
    spawn(tmp_path / "part", "fsdp", resume=True)
    assert losses(tmp_path / "part") == losses(tmp_path / "fsdp")
    part = load_checkpoint(tmp_path / "part")
    assert all(torch.equal(v, part["model"][k]) for k, v in fsdp["model"].items())
    # a sharded checkpoint continued under DDP: one line on each rank, not a KeyError from the optimizer
    with pytest.raises(mp.ProcessRaisedException, match=r"UserError: .*was written by an FSDP run"):
        spawn(tmp_path / "part", "ddp", resume=True)


def test_fsdp_float16_skips_an_overflowed_step_on_every_rank_as_ddp_does(tmp_path):
    """fp16 loss scaling under FSDP: the gradient scaler's overflow finding is all-reduced, so the step that
    overflowed on one rank is skipped on both, with the scale halved, exactly where DDP skips it; the losses stay
    those of DDP (to float32 rounding of the sharded sums)."""
    spawn(tmp_path / "ddp", "ddp", dtype="float16")
    spawn(tmp_path / "fsdp", "fsdp", dtype="float16")
    a, b = read_lines(tmp_path / "ddp", "train"), read_lines(tmp_path / "fsdp", "train")
    assert [x["skipped"] for x in a] == [False, True, False, False, False, False]
    assert [(x["skipped"], x["loss_scale"]) for x in b] == [(x["skipped"], x["loss_scale"]) for x in a]
    assert [x["loss"] for x in b] == pytest.approx([x["loss"] for x in a], abs=1e-4)
