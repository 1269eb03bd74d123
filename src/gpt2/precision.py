"""Mixed precision, one rule for training and evaluation: the autocast dtype that `--dtype` names on a device, and
the autocast context that runs a forward in it (or in plain float32)."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch

from gpt2.errors import UserError

TRAIN_DTYPES = ["auto", "bfloat16", "float16", "float32"]
# --dtype of every command that runs a model under autocast (training and evaluation): one meaning, one text.
AUTOCAST_HELP = ("autocast dtype: auto (bfloat16 on a GPU that has it, else float16 on CUDA, float32 on a CPU), "
                 "bfloat16, float16, float32")


def autocast_dtype(cfg_dtype: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `--dtype` on this device; None = plain float32. auto: bfloat16 on a GPU that has it,
    float16 on another GPU (V100, T4, RTX 20xx: with a gradient scaler in training), float32 on a CPU."""
    if cfg_dtype == "float32":
        return None
    if cfg_dtype == "bfloat16":
        return torch.bfloat16
    if cfg_dtype == "float16":
        return torch.float16
    if cfg_dtype == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    raise UserError(f"--dtype {cfg_dtype!r}: choose one of {', '.join(TRAIN_DTYPES)}")


def autocast_context(device: torch.device, dtype: torch.dtype | None) -> AbstractContextManager:
    """`torch.autocast` for `dtype` on `device`, or a no-op for None (float32)."""
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()
