"""The README's "which settings for which GPU" table, from the memory plan's own arithmetic (`gpt2.train.memory`):
for each GPT-2 size, the largest micro batch of 1024-token rows that fits a 24, 32 and 80 GB card, in bf16 (fp16
takes the same memory), without (and, in brackets, with) activation checkpointing, under DDP and under FSDP over
8 GPUs.

    python scripts/gpu_settings.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from gpt2.model import GPT, PRESETS  # noqa: E402
from gpt2.train.memory import CUDA_RESERVE, GB, fitting_rows, plan_memory  # noqa: E402

CARDS = {"24 GB": 24 * GB, "32 GB": 32 * GB, "80 GB": 80 * GB}
SEQ = 1024


def cell(model: GPT, card: float, checkpointing: bool, shards: int) -> str:
    plan = plan_memory(model, 1, SEQ, torch.bfloat16, checkpointing, shards)
    rows = fitting_rows(plan, card - CUDA_RESERVE)
    return str(rows) if rows else "-"


def main() -> None:
    print(f"| model | parallel | {' | '.join(CARDS)} |")
    print("|---|---|" + "---|" * len(CARDS))
    for name in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"):
        with torch.device("meta"):
            model = GPT(PRESETS[name])
        size = f"{name} ({sum(p.numel() for p in model.parameters()) / 1e6:.0f}M)"
        for parallel, shards in (("ddp", 1), ("fsdp, 8 GPUs", 8)):
            cells = " | ".join(f"{cell(model, card, False, shards)} ({cell(model, card, True, shards)})"
                               for card in CARDS.values())
            print(f"| {size} | {parallel} | {cells} |")


if __name__ == "__main__":
    main()
