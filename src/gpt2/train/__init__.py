"""Training: the one loop (`gpt2.train.loop`: `train` and its `Trainer`) and the stages' Tasks that plug into it."""

from gpt2.train.config import TrainConfig
from gpt2.train.loop import NonFiniteLossError, Trainer, TrainResult, train
from gpt2.train.metrics import MetricsLogger
from gpt2.train.optim import build_optimizer, lr_at
from gpt2.train.runtime import peak_flops
from gpt2.train.task import Task

__all__ = ["MetricsLogger", "NonFiniteLossError", "Task", "TrainConfig", "TrainResult", "Trainer",
           "build_optimizer", "lr_at", "peak_flops", "train"]
