"""Training: the shared loop (`gpt2.train.loop`) and the stages that plug a Task into it."""

from gpt2.train.loop import (
    MetricsLogger,
    NonFiniteLossError,
    Task,
    TrainConfig,
    TrainResult,
    autocast_context,
    autocast_dtype,
    build_optimizer,
    lr_at,
    peak_flops,
    train,
)

__all__ = ["MetricsLogger", "NonFiniteLossError", "Task", "TrainConfig", "TrainResult", "autocast_context",
           "autocast_dtype", "build_optimizer", "lr_at", "peak_flops", "train"]
