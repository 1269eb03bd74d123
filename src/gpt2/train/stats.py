"""One optimizer update's statistics, named, and summed over ranks with one all-reduce and one host sync.

Loss weighting (torchtitan's rule) needs the update's count G over all ranks before the first backward
(`global_count`); everything the loop logs, checks (a NaN loss stops the run before the optimizer step) or must
agree on across ranks (stop now: a signal, the time limit) travels in the one all-reduce of `StepStats.reduce`.
gloo has no AVG: we sum and divide.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gpt2.distributed import all_reduce_sum
from gpt2.train.runtime import host_to_device


@dataclass
class StepStats:
    loss: float  # the weighted mean loss over the global batch
    grad_norm: float  # the global gradient norm before clipping
    tokens: float  # tokens of every rank
    metrics: dict[str, float]  # the task's loss metrics, mean over micro batches and ranks
    batch_metrics: dict[str, float]  # the metrics of the step's batch (PPO's rollout), mean over ranks
    out_of_time: bool = False  # some rank is past --max-minutes
    signalled: bool = False  # some rank got SIGTERM or Ctrl-C
    skipped: bool = False  # float16: the gradients overflowed, so the optimizer step was skipped (set by the loop)

    @classmethod
    def reduce(cls, *, loss: torch.Tensor, grad_norm: torch.Tensor, metrics: dict[str, torch.Tensor | float],
               tokens: int, batch_metrics: dict[str, float], out_of_time: bool, signalled: bool,
               world_size: int) -> StepStats:
        """Every rank's values summed (this rank's `loss` is its share of the global mean, so the sum is the
        mean; the rest are averaged over ranks). Device tensors and host numbers go in one vector."""
        on_device = {"loss": loss, "grad_norm": grad_norm}
        on_host: dict[str, float] = {"tokens": tokens, "out_of_time": out_of_time, "signalled": signalled}
        for name, value in metrics.items():
            (on_device if isinstance(value, torch.Tensor) else on_host)[f"metric:{name}"] = value
        on_host.update({f"batch:{name}": value for name, value in batch_metrics.items()})
        s = sum_over_ranks(on_device, on_host, world_size > 1)
        W = world_size
        return cls(loss=s["loss"], grad_norm=s["grad_norm"] / W, tokens=s["tokens"],
                   metrics={k[7:]: v / W for k, v in s.items() if k.startswith("metric:")},
                   batch_metrics={k[6:]: v / W for k, v in s.items() if k.startswith("batch:")},
                   out_of_time=s["out_of_time"] > 0, signalled=s["signalled"] > 0)

    @classmethod
    def mean(cls, updates: list[StepStats]) -> StepStats:
        """A step of several updates (PPO): loss, norm and metrics averaged, tokens summed; the batch's metrics
        and the stop flags are the last update's."""
        n, last = len(updates), updates[-1]
        return cls(loss=sum(u.loss for u in updates) / n, grad_norm=sum(u.grad_norm for u in updates) / n,
                   tokens=sum(u.tokens for u in updates),
                   metrics={k: sum(u.metrics[k] for u in updates) / n for k in last.metrics},
                   batch_metrics=last.batch_metrics, out_of_time=last.out_of_time, signalled=last.signalled,
                   skipped=any(u.skipped for u in updates))


def sum_over_ranks(on_device: dict[str, torch.Tensor], on_host: dict[str, float], distributed: bool,
                   ) -> dict[str, float]:
    """Sum over ranks of named device scalars and host numbers, as Python floats, with one host sync (the
    `.tolist()`). On one process the host numbers never travel to the device; under DDP they travel with the
    one all-reduce as a non-blocking copy from pinned memory."""
    names = [*on_device, *on_host]
    device_vec = torch.stack([t.detach().to(torch.float64).reshape(()) for t in on_device.values()])
    if not distributed:
        values = device_vec.tolist() + [float(v) for v in on_host.values()]
    else:
        host = host_to_device([float(v) for v in on_host.values()], device_vec.device)
        values = all_reduce_sum(torch.cat([device_vec, host])).tolist()
    return dict(zip(names, values))


def global_count(weights: list[int] | None, micro_batches: int, world_size: int, device: torch.device,
                 ) -> float | torch.Tensor:
    """G, the update's count over all ranks that micro-batch losses are weighted by. Known on the host without
    weights (micro batches x ranks) and on one process; under DDP with weights it is all-reduced and stays a
    device tensor, so it costs no host sync: the losses are scaled by it on the device."""
    if weights is None:
        return float(micro_batches * world_size)
    if world_size == 1:
        return float(max(sum(weights), 1))
    return all_reduce_sum(host_to_device([float(sum(weights))], device)[0]).clamp(min=1)
