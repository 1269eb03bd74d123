"""The memory plan: before the first step, the estimated memory of one device (weights, gradients, optimizer state,
activations of one micro batch) against what the device has free, so a run that cannot fit stops in one line
that says what would fit, instead of failing minutes later inside a step (or swapping a CPU machine to a crawl).

The arithmetic, per device:
- weights and gradients: 4 bytes a parameter each (fp32 master weights; autocast casts per op); optimizer
  state: AdamW's two moments, 8 bytes a parameter. Sharded (FSDP) over W devices, each holds 1/W of all three.
- activations kept for backward, per transformer layer and micro batch of B x T tokens of width h: about
  34·B·T·h bytes with 16-bit autocast (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large
  Transformer Models", table 2, without the 5·a·T/h attention-score term, which SDPA's fused kernels do not
  keep), and about twice that in fp32. With activation checkpointing a layer keeps only its input (2 or 4
  bytes x B·T·h) and one layer's full set exists at a time, during its recompute.
- the head: logits B·T·V in the autocast dtype, their fp32 copy and its gradient for the cross-entropy.
The estimate is an upper bound for the fused CPU loss (which never holds the whole logits) and leaves out the
allocator's slack and the CUDA context (about 0.5 GB), which the plan keeps in reserve.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from gpt2.train.parallel import blocks

GB = 1e9
CUDA_RESERVE = 0.5 * GB  # the CUDA context and the allocator's slack


@dataclass
class MemoryPlan:
    weights: float  # bytes on one device
    gradients: float
    optimizer: float
    activations: float  # one micro batch
    rows: int  # micro batch rows (B) the activations are for
    per_row: float  # activation bytes of one row

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations

    def describe(self) -> str:
        return (f"{self.weights / GB:.2f} GB weights + {self.gradients / GB:.2f} gradients + "
                f"{self.optimizer / GB:.2f} optimizer state + {self.activations / GB:.2f} activations "
                f"({self.rows} rows) = {self.total / GB:.2f} GB")


def plan_memory(model: nn.Module, rows: int, seq_len: int, amp: torch.dtype | None, checkpointing: bool,
                shards: int = 1) -> MemoryPlan:
    """The plan for `model` training on micro batches of `rows` x `seq_len` tokens (module docstring). shards:
    the devices weights, gradients and optimizer state are split over (1 = DDP or one process)."""
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    layers = blocks(model)
    width = layers[0].ln_1.normalized_shape[0] if layers else 0
    vocab = max((m.out_features for m in model.modules() if isinstance(m, nn.Linear)), default=0)
    act = 2 if amp in (torch.bfloat16, torch.float16) else 4  # bytes of an activation element
    tokens = seq_len  # per row
    layer_full = 17 * act * tokens * width  # 34 bytes/element-count with 16-bit, twice in fp32
    if checkpointing:
        per_row = len(layers) * act * tokens * width + layer_full
    else:
        per_row = len(layers) * layer_full
    per_row += tokens * vocab * (act + 4 + 4)  # logits, their fp32 copy and its gradient
    return MemoryPlan(weights=4 * params / shards, gradients=4 * params / shards, optimizer=8 * params / shards,
                      activations=rows * per_row, rows=rows, per_row=per_row)


def free_memory(device: torch.device, resident: float) -> float | None:
    """Bytes this run may use on `device`, counting the `resident` bytes it already holds there (the weights,
    moved before the plan): CUDA's free memory minus a reserve, or a CPU's available memory (Linux'
    MemAvailable). None when unknown (then nothing is checked)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + resident - CUDA_RESERVE
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as f:
                info = dict(line.split(":", 1) for line in f)
            return int(info["MemAvailable"].split()[0]) * 1024 + resident
        except (OSError, KeyError, ValueError):
            return None
    return None


def fitting_rows(plan: MemoryPlan, free: float) -> int:
    """The largest micro batch whose plan fits in `free` bytes (0: not even one row)."""
    room = free - (plan.weights + plan.gradients + plan.optimizer)
    return max(0, int(room // plan.per_row)) if plan.per_row > 0 else 0


def advice(model: nn.Module, plan: MemoryPlan, free: float, seq_len: int, amp: torch.dtype | None,
           checkpointing: bool, batch_flag: str) -> str:
    """What would fit instead: a smaller micro batch, activation checkpointing."""
    tips = []
    rows = fitting_rows(plan, free)
    if 0 < rows < plan.rows:
        tips.append(f"{batch_flag} {rows} (or lower)")
    if not checkpointing:
        ac = plan_memory(model, plan.rows, seq_len, amp, True)
        tips.append(f"--activation-checkpointing ({ac.total / GB:.1f} GB)")
    return "; ".join(tips) if tips else "a smaller model or a device with more memory"
