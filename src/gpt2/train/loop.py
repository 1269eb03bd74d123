"""The one training loop. Every stage (pretrain, finetune, reward, DPO, ...) plugs a `Task` into `train()`.

A `Task` supplies this rank's micro batches, a loss, an evaluation and its own data position; the loop does
everything else, the same way for every stage:

- Loss weighting (torchtitan's rule): the step's gradient is the gradient of the mean loss over every
  valid target of the global batch, all micro-steps and ranks, however the batch is split. A task whose
  loss is a mean over a varying number of targets (answer tokens of fine-tuning and PPO, pairs of DPO and
  the reward model) says how many with `loss_weight(batch)`; the loop all-reduces the step's count G
  before the first backward and scales micro-batch m's mean loss by n_m * W / G (W ranks: DDP averages
  gradients over ranks, the factor W undoes that), so the summed gradient is sum_m n_m * grad(mean_m) / G.
  Without `loss_weight` every micro-batch weighs the same (1 / (k * W)), right when all hold equally many
  targets, as pretraining's do. Under DDP the gradient all-reduce runs only on the last micro-step
  (`no_sync()` on the others), so N ranks x k micro-steps give the update of 1 rank x N*k micro-steps.
- The logged loss is the same weighted mean; task metrics are averaged over micro-steps and ranks. One
  all-reduce per update carries them, the token count, the gradient norm and the "stop now" flags, so every
  rank agrees on when to stop. gloo has no AVG: we sum and divide.
- One step, several updates (PPO): a task may split each batch into several optimizer updates with
  `updates(batch) -> (list of updates, each a list of micro batches; metrics of the batch)`; a PPO step is
  one rollout and its epochs x minibatches of updates, and everything below (schedule, checkpoints, stop
  signals, time limit, NaN check before each optimizer step, evaluation) works per step as for any stage.
- AdamW with weight decay on 2-D weights only (matmuls and embeddings; never biases or LayerNorm gains), fused
  kernels where PyTorch has them; global-norm gradient clipping; LR linear warmup then cosine decay to min_lr
  (`lr_at`, a pure function of the step, so resuming never needs scheduler state).
- Speed on GPU: bf16 autocast, TF32 matmuls, `torch.compile` of the training forward only (evaluation runs the
  plain module, so its other shapes never trigger recompiles). On CPU, bf16 autocast is a flag (`--dtype`).
- Under DDP the order is `torch.compile(DDP(module))`, not `DDP(torch.compile(module))`: when dynamo sees the
  DDP wrapper it splits the compiled graph at DDP's gradient-bucket boundaries (DDPOptimizer), so each bucket's
  all-reduce starts while the backward of the earlier layers still runs. Compiling first and wrapping after
  gives DDP one opaque backward whose gradients all appear at its end: no overlap.
- Host syncs: one per update (one per step, except for a task whose `updates()` makes several), the
  `.tolist()` of the update's statistics (needed to log, to stop on NaN before the optimizer step and for every
  rank to agree on stopping). Everything known on the host (token counts, loss weights, stop flags, task
  metrics given as Python numbers) stays on the host; on one process nothing is copied to the device at all.
  Under DDP the host numbers travel with the one all-reduce, and the count G with its own all-reduce whose
  result stays on the device (the losses are scaled by it there): both are non-blocking copies from pinned
  memory, so neither waits for the GPU.
- Batches (`fetch_step`): a step's micro batches are fetched from the task on the host at the start of the
  step, after the previous step's checkpoint, so a checkpoint's data position never counts a fetched-but-unused
  batch (loss weighting needs all of them before the first backward anyway; host batches are small). At the
  start of each update all of its micro batches are pinned (CUDA only) and queued for copy with
  `non_blocking=True`, so the copies overlap the GPU's work; the task's host work for the step overlaps the
  previous optimizer step still running on the GPU (no thread, which keeps the tasks' RNG use in plain order).
- Checkpoints (every `save_every` steps, at the end, at `stop_at_step`, on SIGTERM/Ctrl-C) hold the model,
  optimizer, step, each rank's task state and RNG states, and the configs; they are written atomically and the
  weights are exported to `RUN_DIR/model/` in Hugging Face format each time. `resume` continues exactly.
  The GPU only waits for the copy of the state to host memory: the file, the HF export and the loss graph are
  written by a background thread (`gpt2.checkpoint.BackgroundWriter`), joined before the next save and
  before `train()` returns or exits.
- A NaN/inf loss or gradient norm stops the run before the optimizer step, so the last checkpoint stays good.
  A failed save (a full disk) is a one-line error saying which step checkpoint.pt still holds. The write runs
  in the background, so its error is raised at the next save, evaluation or the end of the run (the last
  save is always joined before `train()` returns): by then training may have gone on, but the message names
  the step that failed and the one the file holds, and the atomic write left no temp file.
- One run per directory: `train()` holds RUN_DIR/run.lock (`gpt2.io.dir_lock`, flock) from before its first
  write; a second run on the same --out is refused at start, a crashed or killed one never leaves it stuck.
- Observability: `RUN_DIR/metrics.jsonl` (one line per step and per eval), a tqdm bar on rank 0 and the loss
  graph (`gpt2.plots.plot_run`) redrawn at every evaluation. MFU uses the GPU's own dense bf16 peak from the
  table in `gpt2.train.runtime` (None, and no MFU, when the card is unknown or on CPU), not one hard-coded card.

"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn as nn

from gpt2.checkpoint import (
    CHECKPOINT_FILE,
    MODEL_DIR,
    BackgroundWriter,
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
    state_to_cpu,
)
from gpt2.config import (
    ANNOUNCE,
    APPLY,
    SESSION,
    arg,
    check_values,
    command_name,
    to_dict,
)
from gpt2.distributed import DistInfo, all_gather_object, all_reduce_sum, init_distributed
from gpt2.errors import UserError
from gpt2.io import dir_lock, disk_error, make_folder, not_a_folder, write_json_atomic, write_text_atomic
from gpt2.train.run_dir import (  # noqa: F401  (saved_run_config: also known from here)
    COMMAND_KEY,
    CONFIG_FILE,
    check_run_dir,
    resume_changes,
    saved_run_config,
)
from gpt2.train.runtime import peak_flops  # also imported from here (gpt2.train, older callers)

METRICS_FILE = "metrics.jsonl"


@dataclass
class TrainConfig:
    """Fields of the training loop shared by every stage (each becomes a CLI flag). `on_resume` says what the
    flag does when given again on `--resume` (see `gpt2.config`): ANNOUNCE for the schedule (applied from the
    checkpoint's step and printed), APPLY for how and where to run, SESSION for this session's limits, REFUSE
    (the default) for what the saved optimizer state or data order already holds (betas, weight decay, seed)."""

    out: str = arg("runs/run", "run directory: checkpoint.pt, model/ (HF export), metrics.jsonl, loss.png",
                   on_resume=APPLY)
    max_steps: int = arg(1000, "optimizer steps of the whole run (the LR schedule ends here)", on_resume=ANNOUNCE,
                         minimum=1)
    stop_at_step: int | None = arg(None, "end after this step with a checkpoint, keeping the schedule of "
                                         "--max-steps (split a long run across time-limited jobs)", on_resume=SESSION)
    max_minutes: float | None = arg(None, "end with a checkpoint after this many minutes of training in this "
                                          "process, keeping the schedule of --max-steps (--resume continues)",
                                    on_resume=SESSION)
    lr: float = arg(6e-4, "peak learning rate (reached after warmup)", on_resume=ANNOUNCE)
    min_lr: float | None = arg(None, "learning rate at the end of the cosine decay (default: lr / 10)",
                               on_resume=ANNOUNCE, minimum=0)
    warmup_steps: int = arg(100, "steps of linear LR warmup", on_resume=ANNOUNCE, minimum=0)
    weight_decay: float = arg(0.1, "AdamW weight decay, on 2-D weights only (not biases or LayerNorms)", minimum=0)
    betas: tuple[float, float] = arg((0.9, 0.95), "AdamW betas (two numbers)")
    grad_clip: float = arg(1.0, "clip the global gradient norm to this value; 0 = no clipping", on_resume=ANNOUNCE)
    eval_every: int = arg(250, "evaluate and redraw loss.png every N steps (and at the end); 0 = never",
                          on_resume=APPLY)
    save_every: int = arg(500, "checkpoint every N steps; 0 = only at the end, at --stop-at-step and on "
                               "SIGTERM/Ctrl-C", on_resume=APPLY)
    save_final: bool = arg(True, "checkpoint (and HF export) where the session ends: the last step, --stop-at-step, "
                                 "--max-minutes; --no-save-final skips it, for benchmark runs whose weights "
                                 "nothing reads (--save-every and SIGTERM/Ctrl-C still save)", on_resume=SESSION)
    resume: bool = arg(False, "continue the run in --out from its checkpoint.pt with the settings it was saved "
                              "with (see below); starts a new run when --out has no checkpoint", on_resume=SESSION)
    seed: int = arg(1337, "random seed (model init, data order, dropout)")
    device: str = arg("auto", "cpu, cuda, cuda:N, mps or auto (under torchrun: this process's GPU)", on_resume=APPLY)
    dtype: str = arg("auto", "autocast dtype: auto (bfloat16 on CUDA, float32 elsewhere), bfloat16, float32",
                     choices=["auto", "bfloat16", "float32"], on_resume=APPLY)
    compile: bool | None = arg(None, "torch.compile the training forward (default: on for CUDA, off on CPU)",
                               on_resume=APPLY)
    progress: bool = arg(True, "show a progress bar (rank 0)", on_resume=APPLY)

    def validate(self) -> None:
        """Raise a one-line UserError naming the first flag whose value makes no sense. Stages with more
        fields extend this (calling super); `train()` and each command's `run` call it before any work.
        Fields a stage derives later (None, e.g. finetune's max_steps) are checked once they are set."""
        check_values(self)
        if self.out and (err := not_a_folder(self.out)):
            raise UserError(f"--out {self.out}: {err}")
        if self.stop_at_step is not None and not 1 <= self.stop_at_step <= (self.max_steps or self.stop_at_step):
            raise UserError(f"--stop-at-step must be between 1 and --max-steps ({self.max_steps}), got "
                            f"{self.stop_at_step}")
        if self.stop_at_step is not None and not self.save_final:
            raise UserError("--stop-at-step ends the session with a checkpoint to resume from; it cannot be "
                            "combined with --no-save-final")
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise UserError(f"--max-minutes must be > 0 (got {self.max_minutes}); leave it out for no time limit")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise UserError(f"--lr must be a positive number (got {self.lr})")
        check_schedule(self.lr, self.min_lr, self.warmup_steps, self.max_steps)
        if not (math.isfinite(self.grad_clip) and self.grad_clip >= 0):
            raise UserError(f"--grad-clip must be >= 0, 0 = no clipping (got {self.grad_clip})")
        for flag in ("eval_every", "save_every"):
            value = getattr(self, flag)
            if value is not None and value < 0:
                raise UserError(f"--{flag.replace('_', '-')} must be >= 0, 0 = never (got {value})")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise UserError(f"--betas takes two numbers in [0, 1) (got {list(self.betas)})")


def check_schedule(lr: float, min_lr: float | None, warmup_steps: int, max_steps: int | None) -> None:
    """The LR schedule's bounds must not contradict each other: the decay ends at or below the peak, and the
    warmup ends within the run (else the LR never reaches --lr). `max_steps` None: derived later (from
    --epochs), checked again by `train()` once it is known."""
    if min_lr is not None and min_lr > lr:
        raise UserError(f"--min-lr {min_lr} is above --lr {lr}: the cosine decay goes from --lr down to --min-lr")
    if max_steps is not None and warmup_steps > max_steps:
        raise UserError(f"--warmup-steps {warmup_steps} is more than the run's {max_steps} steps (--max-steps): the "
                        "LR would never reach --lr; lower --warmup-steps")


# The one rule for the length of a run, in every command that has both flags (finetune, dpo, reward).
MAX_STEPS_HELP = ("optimizer steps of the whole run (the LR schedule ends here); when given it wins over "
                  "--epochs")
EPOCHS_HELP = "passes over the training data (may be fractional); sets --max-steps when that is not given"


def run_length(max_steps: int | None, epochs: float, steps_per_epoch: int) -> int:
    """Optimizer steps of a run: `max_steps` when given, else ceil(epochs x steps_per_epoch), at least 1."""
    if max_steps is not None:
        return max_steps
    if not epochs > 0:
        raise UserError(f"--epochs must be > 0 (got {epochs}); or give --max-steps")
    return max(1, math.ceil(epochs * steps_per_epoch))


@runtime_checkable
class Task(Protocol):
    """What a stage plugs into `train()`. Batches may be any nesting of tuples/lists/dicts of tensors on the
    CPU; the loop moves them to the device. Tokens per batch (for tokens/s and MFU) are counted by an optional
    `num_tokens(batch) -> int` method, else as the element count of the batch's first tensor."""

    def next_batch(self) -> Any:
        """This rank's next micro batch."""

    def loss(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, Any]]:
        """(scalar loss to minimise, extra metrics as floats or 0-d tensors). Called inside autocast; `model`
        is the plain module (the loop compiles/wraps around this call, so gradients sync under DDP)."""

    # Optional, see the module docstring:
    #   loss_weight(batch) -> int: what the batch's loss is a mean over (valid targets, pairs).
    #   updates(batch) -> (list[list[micro batch]], dict of metrics): several optimizer updates from one batch.
    #   num_tokens(batch) -> int: tokens of a micro batch for tokens/s and MFU.

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Evaluation metrics (e.g. {"val_loss": ...}); may be {}. Called on every rank under no_grad,
        autocast and model.eval(); return the same values on every rank (all-reduce if you shard)."""

    def state_dict(self) -> dict[str, Any]:
        """This rank's data position, for exact resume."""

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class TrainResult:
    step: int  # optimizer steps completed
    loss: float | None  # last logged training loss
    run_dir: Path


class NonFiniteLossError(UserError):
    """Raised (on every rank) when the loss or gradient norm is NaN/inf; the last checkpoint is kept."""


# --------------------------------------------------------------------------- pieces


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of 0-based optimizer step `step`: linear warmup to cfg.lr over warmup_steps, then cosine
    decay to min_lr at max_steps (and min_lr after it)."""
    min_lr = cfg.lr * 0.1 if cfg.min_lr is None else cfg.min_lr
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if step >= cfg.max_steps:
        return min_lr
    ratio = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.lr - min_lr)



def apply_lr(optimizer: torch.optim.Optimizer, step: int, cfg: TrainConfig) -> float:
    """Set every param group to the schedule's LR for `step` (0-based); return it."""
    lr = lr_at(step, cfg)
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr

def build_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW decaying only 2-D weights; fused kernels on CUDA and CPU (one kernel for all parameters)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    fused = device.type in ("cuda", "cpu")
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=1e-8, fused=fused)


def autocast_dtype(cfg_dtype: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `--dtype` on this device; None = plain float32."""
    if cfg_dtype == "float32":
        return None
    if cfg_dtype == "bfloat16":
        return torch.bfloat16
    if cfg_dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None
    raise UserError(f"--dtype {cfg_dtype!r}: choose auto, bfloat16 or float32")


def autocast_context(device: torch.device, dtype: torch.dtype | None):
    """`torch.autocast` for `dtype` on `device`, or a no-op for None (float32)."""
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class MetricsLogger:
    """Appends one JSON object per line to RUN_DIR/metrics.jsonl (rank 0 only). On resume, lines logged after
    the checkpoint's step are dropped, so the file always matches the weights."""

    def __init__(self, path: str | os.PathLike, enabled: bool = True, keep_until_step: int | None = None):
        self.path = Path(path)
        self.enabled = enabled
        if not enabled:
            return
        make_folder(self.path.parent)
        kept = []
        if keep_until_step is not None and self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by a crash
                if rec.get("step", 0) <= keep_until_step:
                    kept.append(line + "\n")
        write_text_atomic(self.path, "".join(kept))

    def log(self, record: dict[str, Any]) -> None:
        if self.enabled:
            try:
                with open(self.path, "a") as f:  # an append: a line cut short by a crash is skipped on reading
                    f.write(json.dumps(record) + "\n")
            except OSError as e:
                raise (disk_error(self.path, e) or e) from e


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


def _first_tensor(batch: Any) -> torch.Tensor | None:
    if isinstance(batch, torch.Tensor):
        return batch
    values = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (list, tuple)) else []
    for v in values:
        t = _first_tensor(v)
        if t is not None:
            return t
    return None


def plot(run_dir: Path) -> None:
    """Redraw RUN_DIR/loss.png from metrics.jsonl (imported here: matplotlib is slow to import). The graph is
    a convenience: a failure to draw it (nothing logged yet, a full disk, no matplotlib on a GPU box) is
    reported, never fatal to a run."""
    from gpt2.plots import plot_run

    try:
        plot_run(run_dir)
    except (UserError, OSError, ValueError, ImportError) as e:
        print(f"warning: loss graph not drawn: {e}", file=sys.stderr)


def fetch_step(task: Task, grad_accum_steps: int) -> tuple[list[list[Any]], dict[str, float]]:
    """One step's batches from the task, on the host, all before the step's first backward (the loss weights
    need every micro batch's count first): (updates, each a list of micro batches; the batch's metrics)."""
    split = getattr(task, "updates", None)
    if split:
        return split(task.next_batch())
    return [[task.next_batch() for _ in range(grad_accum_steps)]], {}


def host_to_device(values: list[float], device: torch.device) -> torch.Tensor:
    """Python numbers as a float64 vector on `device` without a host sync: on CUDA a non-blocking copy from
    pinned memory (from pageable memory it would be a synchronous one)."""
    vec = torch.tensor(values, dtype=torch.float64)
    if device.type == "cuda":
        vec = vec.pin_memory()
    return vec.to(device, non_blocking=True)


def global_count(weights: list[int], loss_weight: bool, world_size: int, device: torch.device,
                 ) -> float | torch.Tensor:
    """G, the update's count over all ranks that micro-batch losses are weighted by (module docstring). Known
    on the host without `loss_weight` (micro batches x ranks) and on one process; under DDP with weights it is
    all-reduced and stays a device tensor, so it costs no host sync: the losses are scaled by it on the
    device."""
    if not loss_weight:
        return float(len(weights) * world_size)
    if world_size == 1:
        return float(max(sum(weights), 1))
    return all_reduce_sum(host_to_device([float(sum(weights))], device)[0]).clamp(min=1)


def reduce_step_stats(on_device: list[torch.Tensor], on_host: list[float], distributed: bool) -> list[float]:
    """Sum over ranks of the device scalars followed by the host numbers, as Python floats, with one host sync
    (the `.tolist()`). On one process the host numbers never travel to the device."""
    device_vec = torch.stack([t.detach().to(torch.float64).reshape(()) for t in on_device])
    if not distributed:
        return device_vec.tolist() + [float(v) for v in on_host]
    return all_reduce_sum(torch.cat([device_vec, host_to_device(on_host, device_vec.device)])).tolist()


class _TaskLoss(nn.Module):
    """The model plus the task's loss as one module, so that DDP (gradient sync) and torch.compile wrap the
    whole training forward while the task still sees the plain model."""

    def __init__(self, model: nn.Module, loss_fn: Callable):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch):
        return self.loss_fn(self.model, batch)


class StopSignals:
    """SIGTERM / Ctrl-C set a flag; the loop finishes the current step, saves and exits. A second signal
    stops at once."""

    def __init__(self):
        self.signum = 0
        self._old: dict[int, Any] = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum:
            raise KeyboardInterrupt
        self.signum = signum
        print(f"\n{signal.Signals(signum).name}: finishing this step, then saving a checkpoint "
              "(send again to stop at once)", flush=True)

    def __exit__(self, *exc):
        for s, handler in self._old.items():
            signal.signal(s, handler)

    def exit(self) -> None:
        """After the checkpoint is saved: leave as the signal asked (Ctrl-C -> KeyboardInterrupt, else exit
        status 128 + signal number, 143 for SIGTERM)."""
        signum = self.signum or signal.SIGTERM
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise SystemExit(128 + int(signum))


# --------------------------------------------------------------------------- the loop


def validate(cfg: TrainConfig, grad_accum_steps: int) -> None:
    cfg.validate()
    if cfg.max_steps is None:
        raise UserError("--max-steps must be set before training starts")
    if grad_accum_steps < 1:
        raise UserError(f"gradient accumulation steps must be >= 1 (got {grad_accum_steps})")


def train(model: nn.Module, task: Task, cfg: TrainConfig, grad_accum_steps: int = 1, *,
          dist: DistInfo | None = None, run_config: Any = None,
          export: Callable[[nn.Module, Path], None] | None = None,
          flops_per_token: float | None = None) -> TrainResult:
    """`_train` (below) while holding RUN_DIR/run.lock, taken before anything is written to the run directory,
    so a second run on the same --out is refused at start instead of interleaving metrics and checkpoints."""
    validate(cfg, grad_accum_steps)
    dist = dist or init_distributed(cfg.device)
    with dir_lock(cfg.out) if dist.is_main else nullcontext():
        try:
            return _train(model, task, cfg, grad_accum_steps, dist=dist, run_config=run_config, export=export,
                          flops_per_token=flops_per_token)
        except UserError:
            _close_progress_bars()  # the error line then starts a line of its own, not the bar's
            raise


def _close_progress_bars() -> None:
    from tqdm.auto import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def _train(model: nn.Module, task: Task, cfg: TrainConfig, grad_accum_steps: int = 1, *,
           dist: DistInfo | None = None, run_config: Any = None,
           export: Callable[[nn.Module, Path], None] | None = None,
           flops_per_token: float | None = None) -> TrainResult:
    """Train `model` on `task` for cfg.max_steps optimizer steps of `grad_accum_steps` micro batches each.

    dist: from `init_distributed()` (default: called here). run_config: the stage's whole config (a dataclass
    or dict), written to RUN_DIR/config.json and into checkpoints (default: cfg). export(model, dir): writes
    the HF export at each save (default: `model.save_pretrained` when the model has it). flops_per_token:
    training FLOPs per token for MFU (default: `model.flops_per_token(T)` with T the batch's last dimension).
    Raises NonFiniteLossError on a NaN/inf loss; on SIGTERM/Ctrl-C saves, then raises SystemExit(143) /
    KeyboardInterrupt.
    """
    dist = dist or init_distributed(cfg.device)
    device, is_main = dist.device, dist.is_main
    run_dir = Path(cfg.out)
    ckpt_path = run_dir / CHECKPOINT_FILE
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    model.to(device)
    optimizer = build_optimizer(model, cfg, device)
    run_config = run_config if run_config is not None else cfg
    command = command_name(run_config)
    run_config = to_dict(run_config) if is_dataclass(run_config) else dict(run_config)
    if command is not None:
        run_config[COMMAND_KEY] = command  # which command made the run: --resume by another is refused

    check_run_dir(run_dir, cfg.resume, command)
    start_step, elapsed0, resumed = 0, 0.0, None
    if cfg.resume and ckpt_path.exists():
        resumed = load_checkpoint(ckpt_path)
        check_run_dir(run_dir, True, command, made_by=(resumed.get("run_config") or {}).get(COMMAND_KEY))
        if resumed.get("world_size", 1) != dist.world_size:
            raise UserError(f"{ckpt_path} was written by {resumed['world_size']} processes; resume it with the "
                            f"same number (now {dist.world_size})")
        try:
            model.load_state_dict(resumed["model"])
        except RuntimeError as e:  # a run from before the command was recorded, made by another command
            raise UserError(f"--resume: the weights in {ckpt_path} do not fit this command's model "
                            f"({str(e).splitlines()[0]}); was {run_dir} made by another command?") from e
        optimizer.load_state_dict(resumed["optimizer"])
        task.load_state_dict(resumed["ranks"][dist.rank]["task"])
        start_step, elapsed0 = resumed["step"], resumed.get("elapsed", 0.0)
        for line in resume_changes(resumed.get("train_config", {}), cfg, start_step):
            if is_main:
                print(line, flush=True)
    else:
        if cfg.resume and is_main:
            print(f"--resume: no checkpoint in {run_dir} yet; starting a new run", flush=True)
        seed_everything(cfg.seed + dist.rank)

    if is_main:
        make_folder(run_dir)
        write_json_atomic(run_dir / CONFIG_FILE, run_config)
    metrics = MetricsLogger(run_dir / METRICS_FILE, enabled=is_main,
                            keep_until_step=start_step if resumed else None)

    forward: nn.Module = _TaskLoss(model, task.loss)
    ddp = None
    if dist.is_distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        ddp = forward = DDP(forward, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile if cfg.compile is not None else device.type == "cuda":
        forward = torch.compile(forward)  # after DDP: see the module docstring
    amp = autocast_dtype(cfg.dtype, device)
    peak = peak_flops(device)
    export = export or (lambda m, d: m.save_pretrained(d) if hasattr(m, "save_pretrained") else None)
    num_tokens = getattr(task, "num_tokens", None)
    writer = BackgroundWriter()
    shadow: list[nn.Module] = []  # a host copy of the model that the writer exports from (made at the first save)
    end_step = cfg.stop_at_step or cfg.max_steps
    last_saved = start_step if resumed else None

    def evaluate(step: int) -> None:
        model.eval()
        with torch.no_grad(), autocast_context(device, amp):
            results = task.evaluate(model)
        model.train()
        if is_main:
            if results:
                metrics.log({"kind": "eval", "step": step, **{k: float(v) for k, v in results.items()}})
                bar.write(f"step {step}: " + ", ".join(f"{k} {float(v):.4f}" for k, v in results.items()))
            writer.submit(lambda: plot(run_dir))

    def save(step: int, elapsed: float) -> None:
        nonlocal last_saved
        ranks = all_gather_object({"task": task.state_dict(), "rng": capture_rng_state(device)})
        if is_main:
            config = getattr(model, "config", None)
            writer.wait()  # the previous save is complete (its error raised here) before this one starts
            if not shadow:
                import copy

                shadow.append(copy.deepcopy(model).to("cpu"))
            # The only time the GPU waits: copying the state to host memory. Writing happens in the background.
            state = state_to_cpu({
                "model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                "elapsed": elapsed, "world_size": dist.world_size, "ranks": ranks,
                "train_config": to_dict(cfg), "run_config": run_config,
                "model_config": asdict(config) if is_dataclass(config) else None,
            })
            previous = last_saved  # written: a failed write would have been raised by wait() above

            def write() -> None:
                written = previous
                try:  # a full disk: a one-line error; the atomic writes keep the previous files whole
                    save_checkpoint(state, ckpt_path)
                    written = step
                    shadow[0].load_state_dict(state["model"])
                    export(shadow[0], run_dir / MODEL_DIR)
                except UserError as e:
                    kept = f"{ckpt_path} holds step {written}" if written is not None else "no checkpoint was written"
                    raise UserError(f"saving step {step} failed: {e}; {kept}") from e
                plot(run_dir)

            writer.submit(write)
        last_saved = step

    from tqdm.auto import tqdm

    bar = tqdm(total=cfg.max_steps, initial=start_step, disable=not (is_main and cfg.progress), unit="step",
               dynamic_ncols=True, desc=run_dir.name)
    model.train()
    if resumed is None and cfg.eval_every:
        evaluate(0)
    if resumed is not None:
        restore_rng_state(resumed["ranks"][dist.rank]["rng"], device)
        del resumed
    t_session = time.perf_counter()
    t_start = t_session - elapsed0
    loss_value = None
    loss_weight = getattr(task, "loss_weight", None)
    W = dist.world_size

    def update(micro_batches: list, batch_metrics: dict[str, float], flags: list[float],
               ) -> tuple[list[float], list[str], Any]:
        """Forward/backward over one update's micro batches, then one optimizer step. Returns (the all-reduced
        [weighted loss, *task metrics, grad norm, tokens, *batch metrics, *flags], the task metrics' names,
        the last micro batch). One host sync: the stats' `.tolist()` in `reduce_step_stats`."""
        # Weights and tokens are counted on the host batches; then every micro batch's copy is queued at once
        # (pinned, non-blocking on CUDA), so the copies overlap the GPU's work instead of waiting on the host.
        weights = [int(loss_weight(b)) if loss_weight else 1 for b in micro_batches]
        tokens = sum(int(num_tokens(b)) if num_tokens else _first_tensor(b).numel() for b in micro_batches)
        total = global_count(weights, loss_weight is not None, W, device)
        on_device = [to_device(b, device) for b in micro_batches]
        loss_sum = torch.zeros((), device=device, dtype=torch.float64)
        extra: dict[str, Any] = {}  # task metrics: 0-d device tensors or host numbers, summed
        for micro, (batch, weight) in enumerate(zip(on_device, weights)):
            sync = ddp is None or micro == len(on_device) - 1
            with nullcontext() if sync else ddp.no_sync():
                with autocast_context(device, amp):
                    loss, step_metrics = forward(batch)
                (loss * (weight * W / total)).backward()
            loss_sum += loss.detach() * (weight / total)
            for k, v in step_metrics.items():
                v = v.detach() if isinstance(v, torch.Tensor) else float(v)
                extra[k] = extra[k] + v if k in extra else v
        clip = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        dev_keys = sorted(k for k, v in extra.items() if isinstance(v, torch.Tensor))
        host_keys = sorted(k for k in extra if k not in dev_keys)
        micro_steps = len(on_device)
        r = reduce_step_stats([loss_sum, *(extra[n] / micro_steps for n in dev_keys), grad_norm],
                              [*(extra[n] / micro_steps for n in host_keys), tokens,
                               *(batch_metrics[n] for n in sorted(batch_metrics)), *flags], dist.is_distributed)
        nd, nh = len(dev_keys), len(host_keys)
        values = r[:1 + nd] + r[2 + nd:2 + nd + nh] + [r[1 + nd]] + r[2 + nd + nh:]  # the layout above
        keys = dev_keys + host_keys
        loss_value, norm = values[0], values[1 + len(keys)] / W
        if not (math.isfinite(loss_value) and math.isfinite(norm)):
            bar.close()
            where = (f"the last good checkpoint (step {last_saved}) is kept in {ckpt_path}"
                     if last_saved is not None else "no checkpoint had been written yet")
            raise NonFiniteLossError(f"training stopped at step {step + 1}: loss {loss_value}, grad norm "
                                     f"{norm} (not finite); {where}. Lower --lr or check the data.")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return values, keys, micro_batches[-1]

    with StopSignals() as stop, writer:
        for step in range(start_step, end_step):
            t0 = time.perf_counter()
            lr = apply_lr(optimizer, step, cfg)
            # Fetched here, after the previous step's checkpoint: a saved data position never counts a batch
            # that was fetched but not trained on.
            updates, batch_metrics = fetch_step(task, grad_accum_steps)
            totals = None
            for micro_batches in updates:
                out_of_time = cfg.max_minutes is not None and time.perf_counter() - t_session > 60 * cfg.max_minutes
                values, keys, batch = update(micro_batches, batch_metrics, [float(out_of_time), float(stop.signum)])
                totals = values if totals is None else [a + b for a, b in zip(totals, values)]
            n = len(updates)
            loss_value, norm = totals[0] / n, totals[1 + len(keys)] / (n * W)
            tokens = totals[2 + len(keys)]
            batch_values = [v / W for v in values[3 + len(keys):len(values) - 2]]  # from the last update
            done = step + 1
            now = time.perf_counter()
            tok_per_s = tokens / (now - t0)
            fpt = flops_per_token
            if fpt is None and hasattr(model, "flops_per_token"):
                fpt = model.flops_per_token(_first_tensor(batch).shape[-1])
            mfu = tok_per_s * fpt / (peak * dist.world_size) if peak and fpt else None
            record = {"kind": "train", "step": done, "loss": loss_value, "lr": lr, "grad_norm": norm,
                      "tokens_per_s": tok_per_s, "mfu": mfu, "time": now - t_start}
            record.update({k: v / (n * W) for k, v in zip(keys, totals[1:1 + len(keys)])})
            record.update(zip(sorted(batch_metrics), batch_values))
            metrics.log(record)
            bar.set_postfix_str(f"loss {loss_value:.4f} lr {lr:.2e} {tok_per_s:,.0f} tok/s"
                                + (f" mfu {mfu:.1%}" if mfu is not None else ""), refresh=False)
            bar.update(1)

            signalled, timed_out = values[-1] > 0, values[-2] > 0
            # Also evaluate where this session ends (the last step, --stop-at-step, --max-minutes), so the
            # graph of every session ends with a val loss. Evaluation never touches training state.
            if cfg.eval_every and (done % cfg.eval_every == 0 or done == end_step or timed_out):
                evaluate(done)
            session_end = (done == end_step or timed_out) and cfg.save_final
            if session_end or signalled or (cfg.save_every and done % cfg.save_every == 0):
                save(done, time.perf_counter() - t_start)
            if signalled:
                bar.close()
                writer.wait()
                if is_main:
                    print(f"saved {ckpt_path} at step {done}; continue with --resume", flush=True)
                stop.exit()
            if timed_out:
                end_step = done
                break
    bar.close()
    if is_main and start_step < end_step < cfg.max_steps:
        how = "continue with --resume" if last_saved == end_step else "--no-save-final: no checkpoint of it"
        print(f"stopped at step {end_step} of {cfg.max_steps}; {how}", flush=True)
    return TrainResult(step=max(start_step, end_step), loss=loss_value, run_dir=run_dir)
