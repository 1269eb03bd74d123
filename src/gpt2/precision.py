"""Mixed precision, one rule for training and evaluation: the autocast dtype that `--dtype` names on a device, and
the autocast context that runs a forward in it (or in plain float32)."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import torch

from gpt2.errors import UserError

TRAIN_DTYPES = ["auto", "bfloat16", "float16", "float32"]
# --dtype of every command that runs a model under autocast (training and evaluation): one meaning, one text.
AUTOCAST_HELP = ("autocast dtype: auto (bfloat16 on a GPU that has it, else float16 on CUDA, float32 on a CPU), "
                 "bfloat16, float16, float32")
# Training's auto differs on a CPU only: bfloat16 where the CPU multiplies it natively (see `autocast_dtype`).
TRAIN_AUTOCAST_HELP = ("autocast dtype: auto (bfloat16 on a GPU that has it, else float16 on CUDA; on a CPU, "
                       "bfloat16 where the CPU has native bf16 (AVX512-BF16 or AMX), else float32), bfloat16, "
                       "float16, float32")
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # Linux's /proc/cpuinfo names of native bf16 arithmetic


def cpu_has_native_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX), from Linux's `cpuinfo` flags; False
    where the file is absent or unreadable (other systems: float32 stays the safe choice)."""
    try:
        lines = cpuinfo.read_text(errors="replace").splitlines()
    except OSError:
        return False
    flags = {flag for line in lines if line.startswith("flags") for flag in line.partition(":")[2].split()}
    return any(flag in flags for flag in NATIVE_BF16_FLAGS)


def autocast_dtype(cfg_dtype: str, device: torch.device, training: bool = False,
                   native_bf16: bool | None = None) -> torch.dtype | None:
    """The autocast dtype for `--dtype` on this device; None = plain float32. auto: bfloat16 on a GPU that has it,
    float16 on another GPU (V100, T4, RTX 20xx: with a gradient scaler in training); on a CPU, float32, except
    in `training` on a CPU with native bf16 (`native_bf16`, default `cpu_has_native_bf16()`): bfloat16 there.

    Why training only: there bf16 autocast buys speed where the CPU multiplies bf16 natively, and its loss curve
    stays with fp32's (docs/training.md); without native bf16 it is emulated and slower than fp32. Evaluation
    keeps float32 on a CPU so that its scores compare exactly with other tools' (transformers, lm-eval)."""
    if cfg_dtype == "float32":
        return None
    if cfg_dtype == "bfloat16":
        return torch.bfloat16
    if cfg_dtype == "float16":
        return torch.float16
    if cfg_dtype == "auto":
        if device.type == "cpu":
            native = cpu_has_native_bf16() if native_bf16 is None else native_bf16
            return torch.bfloat16 if training and native else None
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    raise UserError(f"--dtype {cfg_dtype!r}: choose one of {', '.join(TRAIN_DTYPES)}")


def autocast_context(device: torch.device, dtype: torch.dtype | None) -> AbstractContextManager:
    """`torch.autocast` for `dtype` on `device`, or a no-op for None (float32)."""
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()
