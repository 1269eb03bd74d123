"""Process-group setup for `torchrun`, and the few collectives the training loop needs.

Design decisions:
- One entry point, `init_distributed()`, reads torchrun's environment (RANK, LOCAL_RANK, WORLD_SIZE). Without
  it we are a single process and no process group is created, so the same code runs under plain `python`.
- NCCL when the processes train on CUDA, gloo on CPU (gloo runs everywhere, which is what the CPU tests use).
- gloo has no `ReduceOp.AVG`, so averages are always an all-reduce SUM followed by a division.
- Two ranks, two jobs: LOCAL_RANK (the process's number on its machine) picks the GPU; RANK (its number in the
  whole job, over every machine) splits the data and makes rank 0 the one process that writes the run folder.
  On one machine they coincide; across machines (`torchrun --nnodes N`) only RANK is unique.
- A process that stops (its machine died, it was killed, it failed) ends the others' next collective: gloo
  raises a RuntimeError on each of them, which `lost_contact` turns into one line for the CLI. One that hangs
  instead holds the others until the process group's timeout (`--dist-timeout`, else torch's default).
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import NoReturn

import torch
import torch.distributed as dist

from gpt2.errors import UserError


@dataclass
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0 writes files, logs and draws the progress bar."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def pick_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """'auto' -> this process's CUDA device if there is one, else mps, else cpu."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank)
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r}: not a device; choose cpu, cuda, cuda:N, mps or auto") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {name}: CUDA is not available on this machine")
        if device.index is None:  # one GPU per process under torchrun
            device = torch.device("cuda", local_rank)
        if device.index >= torch.cuda.device_count():
            raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s) "
                            f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    elif device.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise UserError(f"--device {name}: Apple's MPS is not available on this machine")
    elif device.type != "cpu":
        raise UserError(f"--device {name}: unsupported device type; choose cpu, cuda, cuda:N, mps or auto")
    return device


def init_distributed(device: str = "auto", timeout_minutes: float | None = None) -> DistInfo:
    """Join torchrun's process group when launched by it; otherwise describe a single process. timeout_minutes:
    how long joining and each collective wait for the other processes (None: torch's default)."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return DistInfo(0, 0, 1, pick_device(device))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    dev = pick_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        kwargs = {"device_id": dev} if dev.type == "cuda" else {}
        if timeout_minutes is not None:
            kwargs["timeout"] = timedelta(minutes=timeout_minutes)
        dist.init_process_group(backend=backend, rank=rank, world_size=world, **kwargs)
    return DistInfo(rank, local_rank, world, dev)


def destroy_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def in_job() -> bool:
    """Whether this process is one of several that torchrun started (its WORLD_SIZE above 1)."""
    return os.environ.get("WORLD_SIZE", "1").strip() not in ("", "0", "1")


# gloo's transport errors (a peer's connection closed or reset, a receive that timed out) come as plain RuntimeErrors
# whose text starts with the source location inside gloo's transport; NCCL's and the store's as `dist.DistError`s.
_GLOO_TRANSPORT = re.compile(r"^\[[^\]]*gloo/transport/[^\]]*\]\s*")


def lost_contact(error: BaseException) -> str | None:
    """One line for an error that means this process of a torchrun job lost the others: a collective that failed
    because another process (or its machine) stopped, or waited past the timeout for one that hangs. None for any
    other error, and outside a job: a real bug keeps its traceback. The line names this rank and the transport's
    own words (peer address, or the time waited), without gloo's source location and advice."""
    if not in_job():
        return None
    cause: BaseException | None = error
    while cause is not None:  # the failed collective may be the cause of what reached us
        text = (str(cause).strip().splitlines() or [""])[0]
        gloo = isinstance(cause, RuntimeError) and _GLOO_TRANSPORT.match(text)
        if gloo or isinstance(cause, dist.DistError):
            what = _GLOO_TRANSPORT.sub("", text).split(". ")[0].rstrip(".")
            rank, world = os.environ.get("RANK", "?"), os.environ.get("WORLD_SIZE", "?")
            return (f"rank {rank} of {world} lost contact with the other processes of this job ({what}): another "
                    "process or its machine stopped or hangs; its own output says why (a hung one is given up on "
                    "after --dist-timeout minutes)")
        cause = cause.__cause__ or cause.__context__
    return None


def end_process(code: int) -> NoReturn:
    """End a process that took part in collectives, without interpreter finalization, once its work is done.

    Why: `destroy_process_group` does not end gloo's process group once FSDP2 or DTensor has run a functional
    collective on it (torch keeps a reference to the group), so its worker threads live until the interpreter is
    torn down. A tensor that such a thread releases then, or the group's own teardown, needs the GIL of a
    finalizing interpreter, and the process aborts ("terminate called without an active exception") after a run
    that succeeded, which its launcher reports as failed. Everything this package writes is complete by now
    (files are written atomically and the checkpoint writer is joined before `train()` returns), so only the
    standard streams are flushed."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass  # a closed pipe: nothing more can reach it
    os._exit(code)


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of `t` over ranks (a new tensor; `t` itself is untouched)."""
    t = t.detach().clone()
    if _active():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean of `t` over ranks: SUM then divide, because gloo has no AVG."""
    if not _active():
        return t.detach().clone()
    return all_reduce_sum(t) / dist.get_world_size()


def all_gather_object(obj):
    """List of every rank's `obj` (a one-element list on a single process)."""
    if not _active():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if _active():
        dist.barrier()
