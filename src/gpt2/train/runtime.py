"""What the training loop needs to know about the device it runs on: TF32 matmuls, seeding, moving batches to the
device, and the dense bf16 peak that MFU is measured against (`peak_flops`). The autocast dtype of `--dtype` is
`gpt2.precision`'s, shared with evaluation.

The peak table holds vendors' datasheet figures for dense bf16 tensor-core math (no 2:4 sparsity: datasheets print
the sparse figure first, twice the dense one) with fp32 accumulation, which is what autocast training does.
GeForce cards run bf16 with fp32 accumulation at half the rate of fp16 accumulation; the figures below are the
fp32-accumulate ones. A card is matched by its CUDA name (`torch.cuda.get_device_name`): a key matches when it
appears in the name as a whole word (so "A100" is not found in "A1000", nor "H200" in "GH200"), and of the keys
that match the longest wins ("H200 NVL" before "H200", "A10G" before "A10", "H100 PCIe" before "H100").
A card that is not in the table has no peak (None): MFU is then not reported, rather than measured against
another card's figure.
"""

from __future__ import annotations

import random
import re
from typing import Any

import numpy as np
import torch


def configure_matmul(device: torch.device) -> None:
    """TF32 matmuls and convolutions on CUDA (fp32 weights and optimizer, tensor-core speed); nothing elsewhere.
    The legacy `allow_tf32` flags only: torch 2.11 raises when they are mixed with the newer precision API."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def seed_everything(seed: int) -> None:
    """Python's, NumPy's and torch's generators (CPU and every CUDA device) from one seed."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def to_device(batch: Any, device: torch.device) -> Any:
    """Move every tensor in a nest of tuples/lists/dicts to `device`. CPU tensors bound for CUDA are pinned
    first, so `non_blocking=True` is a real asynchronous copy (from pageable memory it is a synchronous one)."""
    if isinstance(batch, torch.Tensor):
        if device.type == "cuda" and batch.device.type == "cpu" and not batch.is_pinned():
            batch = batch.pin_memory()
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def host_to_device(values: list[float], device: torch.device) -> torch.Tensor:
    """Python numbers as a float64 vector on `device` without a host sync: on CUDA a non-blocking copy from
    pinned memory (from pageable memory it would be a synchronous one)."""
    vec = torch.tensor(values, dtype=torch.float64)
    if device.type == "cuda":
        vec = vec.pin_memory()
    return vec.to(device, non_blocking=True)


def first_tensor(batch: Any) -> torch.Tensor | None:
    """The first tensor of a nest of tuples/lists/dicts (its shape gives a batch's tokens), or None."""
    if isinstance(batch, torch.Tensor):
        return batch
    values = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (list, tuple)) else []
    for v in values:
        t = first_tensor(v)
        if t is not None:
            return t
    return None

# key (a word or words of the CUDA device name) -> dense bf16 TFLOP/s with fp32 accumulation, and the source.
BF16_PEAK_TFLOPS: dict[str, tuple[float, str]] = {
    # Hopper. H100 datasheet (SXM 1,979 / PCIe 1,513 / NVL 1,671 sparse), H200 datasheet (SXM 1,979, NVL 1,671
    # sparse): half of each. The SXM parts are named plainly ("NVIDIA H100 80GB HBM3", "NVIDIA H200").
    "H100": (989.0, "NVIDIA H100 datasheet, SXM"),
    "H100 PCIe": (756.0, "NVIDIA H100 datasheet, PCIe"),
    "H100 NVL": (835.0, "NVIDIA H100 datasheet, NVL"),
    "H200": (989.0, "NVIDIA H200 datasheet, SXM"),
    "H200 NVL": (835.0, "NVIDIA H200 datasheet, NVL"),
    "GH200": (989.0, "NVIDIA GH200 datasheet (the H100/H200 SXM figure)"),
    "H800": (989.0, "NVIDIA H800 SXM: the H100 SXM figure"),
    "H20": (148.0, "NVIDIA H20: 148 dense FP16/BF16"),
    # Blackwell. HGX B200 datasheet: 4.5 PFLOP/s sparse per GPU; GB200 NVL72: 360 PFLOP/s sparse over 72 GPUs.
    "B200": (2250.0, "NVIDIA HGX B200 datasheet"),
    "GB200": (2500.0, "NVIDIA GB200 NVL72 datasheet, per GPU"),
    # GeForce RTX Blackwell whitepaper: RTX 5090 peak FP16/BF16 tensor with FP32 accumulate 209.5 (419 sparse).
    "RTX 5090": (209.5, "NVIDIA RTX Blackwell GPU architecture whitepaper"),
    # Ampere. A100 datasheet (SXM and PCIe alike): 312 dense.
    "A100": (312.0, "NVIDIA A100 datasheet"),
    "A800": (312.0, "NVIDIA A800: the A100 figure"),
    "A30": (165.0, "NVIDIA A30 datasheet"),
    "A40": (149.7, "NVIDIA A40 datasheet"),
    "A10": (125.0, "NVIDIA A10 datasheet"),
    "A10G": (70.0, "AWS A10G (no NVIDIA datasheet; the figure usually quoted)"),
    "RTX A6000": (154.8, "NVIDIA RTX A6000 datasheet"),
    "RTX 3090": (71.0, "NVIDIA Ampere GA102 whitepaper, FP32 accumulate"),
    # Ada. L4 datasheet 242 sparse, L40 362 sparse, L40S 733 sparse; Ada whitepaper for the RTX cards.
    "L4": (121.0, "NVIDIA L4 datasheet"),
    "L40": (181.0, "NVIDIA L40 datasheet"),
    "L40S": (362.0, "NVIDIA L40S datasheet"),
    "RTX 6000 Ada": (364.2, "NVIDIA RTX 6000 Ada datasheet"),
    "RTX 4090": (165.2, "NVIDIA Ada Lovelace whitepaper, FP32 accumulate"),
}


def _matches(key: str, name: str) -> bool:
    return re.search(rf"(?<![A-Za-z0-9]){re.escape(key)}(?![A-Za-z0-9])", name, flags=re.IGNORECASE) is not None


def peak_entry(name: str) -> tuple[str, float, str] | None:
    """(key, dense bf16 TFLOP/s, source) of the most specific table key found in CUDA device name `name`, or
    None when no key matches."""
    found = [key for key in BF16_PEAK_TFLOPS if _matches(key, name)]
    if not found:
        return None
    key = max(found, key=len)
    tflops, source = BF16_PEAK_TFLOPS[key]
    return key, tflops, source


def peak_tflops(name: str) -> float | None:
    """Dense bf16 TFLOP/s of the card named `name` (as CUDA names it), or None when it is not in the table."""
    entry = peak_entry(name)
    return entry[1] if entry else None


def peak_flops(device: torch.device) -> float | None:
    """The device's dense bf16 peak in FLOP/s, or None (CPU, or a card not in the table)."""
    if device.type != "cuda":
        return None
    tflops = peak_tflops(torch.cuda.get_device_name(device))
    return tflops * 1e12 if tflops is not None else None
