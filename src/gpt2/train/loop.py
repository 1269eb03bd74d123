"""The one training loop. Every stage (pretrain, finetune, reward, DPO, PPO) plugs a `Task` (`gpt2.train.task`)
into `train()`, which runs a `Trainer`: its named state (model, optimizer, the task's data position, a
`TrainState`) is what a checkpoint holds, and its methods `update`, `evaluate`, `save` and `fit` are the loop.
The pieces live beside it: settings (`train.config`), optimizer and LR schedule (`train.optim`), step statistics
(`train.stats`), device helpers (`train.runtime`), the run directory and resume rule (`train.run_dir`), metrics
(`train.metrics`) and signals (`train.signals`). Decisions, the same for every stage:

- Loss weighting (torchtitan's rule): the step's gradient is the gradient of the mean loss over every
  valid target of the global batch, all micro-steps and ranks, however the batch is split. A task whose
  loss is a mean over a varying number of targets (answer tokens of fine-tuning and PPO, pairs of DPO and
  the reward model) says how many with `loss_weight(batch)`; the loop all-reduces the step's count G
  before the first backward and scales micro-batch m's mean loss by n_m * W / G (W ranks: DDP averages
  gradients over ranks, the factor W undoes that), so the summed gradient is sum_m n_m * grad(mean_m) / G.
  When it returns None (the default) every micro-batch weighs the same (1 / (k * W)), right when all hold equally many
  targets, as pretraining's do. Under DDP the gradient all-reduce runs only on the last micro-step
  (`no_sync()` on the others), so N ranks x k micro-steps give the update of 1 rank x N*k micro-steps.
- The logged loss is the same weighted mean; task metrics are averaged over micro-steps and ranks. One
  all-reduce per update carries them, the token count, the gradient norm and the "stop now" flags, so every
  rank agrees on when to stop. gloo has no AVG: we sum and divide.
- One step, several updates (PPO): a task may split each batch into several optimizer updates with
  `Task.step_batches` -> (list of updates, each a list of micro batches; metrics of the batch); a PPO step is
  one rollout and its epochs x minibatches of updates, and everything below (schedule, checkpoints, stop
  signals, time limit, NaN check before each optimizer step, evaluation) works per step as for any stage.
- AdamW and the LR schedule: `gpt2.train.optim`.
- Speed on GPU: bf16 autocast, TF32 matmuls, `torch.compile` of the training forward only (evaluation runs the
  plain module, so its other shapes never trigger recompiles). On CPU, bf16 autocast is a flag (`--dtype`).
- Under DDP the order is `torch.compile(DDP(module))`, not `DDP(torch.compile(module))`: when dynamo sees the
  DDP wrapper it splits the compiled graph at DDP's gradient-bucket boundaries (DDPOptimizer), so each bucket's
  all-reduce starts while the backward of the earlier layers still runs. Compiling first and wrapping after
  gives DDP one opaque backward whose gradients all appear at its end: no overlap.
- Host syncs: one per update (one per step, except for a task whose `step_batches` makes several), the
  `.tolist()` of the update's statistics in `StepStats.reduce` (needed to log, to stop on NaN before the
  optimizer step and for every rank to agree on stopping). Everything known on the host (token counts, loss weights,
  stop flags, task metrics given as Python numbers) stays on the host; on one process nothing is copied to the device
  at all. Under DDP the host numbers travel with the one all-reduce, and the count G with its own all-reduce whose
  result stays on the device (the losses are scaled by it there): both are non-blocking copies from pinned memory, so
  neither waits for the GPU.
- Batches (`Task.step_batches`): a step's micro batches are fetched from the task on the host at the start of the
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
- One run per directory: `train()` holds RUN_DIR/run.lock (`gpt2.train.run_dir.run_lock`) from before its
  first write; a second run on the same --out is refused at start, a crashed or killed one never leaves it stuck.
- Observability: `RUN_DIR/metrics.jsonl` (one line per step and per eval, each also sent to the trackers of
  `--logger`: `gpt2.train.trackers`), a tqdm bar on rank 0 and the loss graph (`gpt2.plots.plot_run`) redrawn at
  every evaluation. MFU uses the GPU's own dense bf16 peak from the table in `gpt2.train.runtime` (None, and no
  MFU, when the card is unknown or on CPU), not one hard-coded card.
"""

from __future__ import annotations

import copy
import math
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm.auto import tqdm

from gpt2.checkpoint import (
    MODEL_DIR,
    BackgroundWriter,
    capture_rng_state,
    restore_rng_state,
    save_checkpoint,
    state_to_cpu,
)
from gpt2.config import to_dict
from gpt2.distributed import DistInfo, all_gather_object, all_reduce_sum, init_distributed, lost_contact
from gpt2.errors import UserError
from gpt2.export import save_model_folder
from gpt2.precision import autocast_context, autocast_dtype
from gpt2.train.config import (  # noqa: F401  (the loop's settings, also known from here)
    EPOCHS_HELP,
    MAX_STEPS_HELP,
    TrainConfig,
    check_schedule,
    run_length,
)
from gpt2.train.memory import GB, advice, free_memory, plan_memory
from gpt2.train.metrics import METRICS_FILE, MetricsLogger, plot
from gpt2.train.optim import apply_lr, build_optimizer, lr_at  # noqa: F401  (lr_at: also known from here)
from gpt2.train.parallel import (
    blocks,
    checkpoint_activations,
    full_model_state,
    full_state,
    gradient_sync,
    load_full_state,
    local_tensor,
    local_tensor_bytes,
    shard_model,
)
from gpt2.train.run_dir import (
    COMMAND_KEY,
    check_same_run,
    checkpoint_path,
    resume_changes,
    resume_checkpoint,
    run_lock,
    write_run_config,
)
from gpt2.train.runtime import (
    configure_matmul,
    first_tensor,
    peak_flops,
    seed_everything,
    to_device,
)
from gpt2.train.signals import StopSignals
from gpt2.train.stats import StepStats, global_count
from gpt2.train.task import Task
from gpt2.train.trackers import Trackers, open_trackers


@dataclass
class TrainResult:
    step: int  # optimizer steps completed
    loss: float | None  # last logged training loss
    run_dir: Path
    # The trained weights as a plain module on rank 0 (None on the others), for work after training such as
    # sampling: the model itself, or, sharded, a whole host copy (the sharded model needs every rank to run).
    model: nn.Module | None = None


class NonFiniteLossError(UserError):
    """Raised (on every rank) when the loss or gradient norm is NaN/inf; the last checkpoint is kept."""


@dataclass
class TrainState:
    """The loop's own part of a checkpoint, next to the model, the optimizer and each rank's task state."""

    step: int = 0  # optimizer steps done
    elapsed: float = 0.0  # seconds of training over all sessions
    last_saved: int | None = None  # the step checkpoint.pt holds (None: nothing saved yet)
    skipped_steps: int = 0  # float16: optimizer steps skipped because the scaled gradients overflowed


class _TaskLoss(nn.Module):
    """The model plus the task's loss as one module, so that DDP (gradient sync), FSDP (its root unit) and
    torch.compile wrap the whole training forward while the task still sees the plain model."""

    def __init__(self, model: nn.Module, loss_fn: Callable):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: Any, run: Callable[[nn.Module], Any] | None = None) -> Any:
        """The task's loss on `batch`; or `run(model)`, for other work on the model (evaluation) that must go
        through this module's call, where FSDP gathers the root unit's parameters."""
        return run(self.model) if run is not None else self.loss_fn(self.model, batch)


def _export_hf(model: nn.Module, folder: Path) -> None:
    if hasattr(model, "save_pretrained"):  # a stage's model; the loop also trains plain modules (tests)
        save_model_folder(model, folder)


class Trainer:
    """The loop's parts and named state: `model`, `optimizer`, `task` (its data position per rank) and `state`
    (a `TrainState`), which are what a checkpoint holds; `update`, `evaluate`, `save` and `fit` act on them.

    run_config: the stage's whole config (a dataclass or dict), written to RUN_DIR/config.json and into
    checkpoints (default: cfg). command: the name of the command that trains (its `Command.name`), recorded
    beside run_config so that a --resume by another command is refused; None (a library call) records none.
    export(model, dir): writes the model folder at each save (default: `gpt2.export.save_model_folder` when
    the model has `save_pretrained`). flops_per_token: training FLOPs per token for MFU (default:
    `model.flops_per_token(T)` with T the batch's last dimension)."""

    def __init__(self, model: nn.Module, task: Task, cfg: TrainConfig, grad_accum_steps: int, dist: DistInfo, *,
                 run_config: Any = None, command: str | None = None,
                 export: Callable[[nn.Module, Path], None] | None = None, flops_per_token: float | None = None):
        self.model, self.task, self.cfg, self.accum, self.dist = model, task, cfg, grad_accum_steps, dist
        self.device = dist.device
        self.run_dir = Path(cfg.out)
        self.ckpt_path = checkpoint_path(self.run_dir)
        run_config = run_config if run_config is not None else cfg
        self.command = command
        self.run_config = to_dict(run_config) if is_dataclass(run_config) else dict(run_config)
        if self.command is not None:
            self.run_config[COMMAND_KEY] = self.command  # the run's maker: --resume by another is refused
        check_same_run(self.run_dir, self.run_config, dist)  # before DDP's check of the model, less clear
        configure_matmul(self.device)
        model.to(self.device)
        if cfg.activation_checkpointing:
            checkpoint_activations(model)
        self.amp = autocast_dtype(cfg.dtype, self.device, training=True)
        if cfg.dtype == "auto" and self.device.type == "cpu" and self.amp is not None:
            self._say("note: --dtype auto trains in bfloat16 autocast on this CPU (it has native bf16); "
                      "--dtype float32 trains in plain float32")
        self.sharded = cfg.parallel == "fsdp" and dist.is_distributed
        if cfg.parallel == "fsdp" and not dist.is_distributed:
            self._say("note: --parallel fsdp shards over the processes of torchrun; one process trains unsharded")
        # A host copy the writer exports from: made before sharding (the whole model) or at the first save.
        self._shadow: nn.Module | None = copy.deepcopy(model).to("cpu") if self.sharded and dist.is_main else None
        self.forward, self.ddp = self._wrap()  # before the optimizer: sharding replaces the parameters
        self.optimizer = build_optimizer(model, cfg, self.device, sharded=self.sharded,
                                         scaled=self.amp == torch.float16)
        self.state = TrainState()
        # float16's narrow range: the loss is scaled up before backward and the gradients unscaled before
        # clipping; a step whose gradients overflowed is skipped and the scale lowered (a no-op otherwise).
        # Sharded, an overflow may sit in one rank's shard only: the sharded scaler all-reduces the finding, so
        # every rank skips the same steps.
        scaler = ShardedGradScaler if self.sharded else torch.amp.GradScaler
        self.scaler = scaler(self.device.type, enabled=self.amp == torch.float16)
        self.peak = peak_flops(self.device)
        self.export = export or _export_hf
        self.flops_per_token = flops_per_token
        self.writer = BackgroundWriter()
        self.bar = None
        self.trackers = Trackers([])  # rank 0 opens those of --logger once it knows the step it starts from

    def _wrap(self) -> tuple[nn.Module, Any]:
        """The training forward: the task's loss around the model, under DDP (or with the model sharded by FSDP)
        when distributed, compiled when asked. `torch.compile(DDP(module))`, not the reverse: see the module
        docstring."""
        forward: nn.Module = _TaskLoss(self.model, self.task.loss)
        self.root = forward  # uncompiled: evaluation runs through it when sharded
        ddp = None
        if self.sharded:
            shard_model(forward, self.amp, self.device)
        elif self.dist.is_distributed:
            device = self.device
            ddp = forward = DDP(forward, device_ids=[device.index] if device.type == "cuda" else None)
        self.compiled = self.cfg.compile if self.cfg.compile is not None else self.device.type == "cuda"
        if self.compiled:
            forward = torch.compile(forward)
        return forward, ddp

    # ---------------------------------------------------------------- state

    def restore(self) -> dict | None:
        """Continue from RUN_DIR's checkpoint when --resume finds one (its model, optimizer, task position and
        train state; the RNG state is returned, to restore just before the first step); else seed a new run."""
        resumed = resume_checkpoint(self.run_dir, self.cfg.resume, self.command, self.dist.world_size)
        if resumed is None:
            if self.cfg.resume:
                self._say(f"--resume: no checkpoint in {self.run_dir} yet; starting from step 0")
            seed_everything(self.cfg.seed + self.dist.rank)
            return None
        if bool(resumed.get("sharded")) != self.sharded:  # the optimizer state is keyed by name when sharded
            was = "an FSDP run (--parallel fsdp under torchrun)" if resumed.get("sharded") else "an unsharded run"
            raise UserError(f"{self.ckpt_path} was written by {was}: resume it the same way (the optimizer state "
                            "of the two is laid out differently)")
        try:
            load_full_state(self.model, self.optimizer, resumed["model"], resumed["optimizer"])
        except RuntimeError as e:  # a run from before the command was recorded, made by another command
            raise UserError(f"--resume: the weights in {self.ckpt_path} do not fit this command's model "
                            f"({str(e).splitlines()[0]}); was {self.run_dir} made by another command?") from e
        self.task.load_state_dict(resumed["ranks"][self.dist.rank]["task"])
        if self.scaler.is_enabled() and resumed.get("scaler"):
            self.scaler.load_state_dict(resumed["scaler"])
        step = resumed["step"]
        self._check_end(step)
        self.state = TrainState(step=step, elapsed=resumed.get("elapsed", 0.0), last_saved=step,
                                skipped_steps=resumed.get("skipped_steps", 0))
        for line in resume_changes(resumed.get("train_config", {}), self.cfg, step):
            self._say(line)
        return resumed["ranks"][self.dist.rank]["rng"]

    def _check_end(self, step: int) -> None:
        """Refuse a session that would end at or before the checkpoint's `step`: it would do nothing but rewrite
        the checkpoint. A plain --resume of a finished run (--max-steps as saved, not given) is no error."""
        cfg = self.cfg
        if cfg.stop_at_step is not None and cfg.stop_at_step <= step:
            raise UserError(f"--stop-at-step {cfg.stop_at_step}: {self.ckpt_path} is already at step {step}; give a "
                            "later step, or leave it out to train to --max-steps")
        if cfg.max_steps < step or (cfg.max_steps == step and "max_steps" in cfg._given):
            raise UserError(f"--max-steps {cfg.max_steps}: {self.ckpt_path} is already at step {step}; give more "
                            "steps to train on")

    def save(self, step: int, elapsed: float) -> None:
        """Checkpoint `step`. The device only waits for the copy of the state to host memory; the file, the HF
        export and the loss graph are written by the background writer (its error is raised at the next
        save, evaluation or the end)."""
        model_state, optim_state = full_state(self.model, self.optimizer)  # sharded: a collective
        ranks = all_gather_object({"task": self.task.state_dict(), "rng": capture_rng_state(self.device)})
        if self.dist.is_main:
            self.writer.wait()  # the previous save is complete (its error raised here) before this one starts
            if self._shadow is None:
                self._shadow = copy.deepcopy(self.model).to("cpu")
            config = getattr(self.model, "config", None)
            state = state_to_cpu({
                "model": model_state, "optimizer": optim_state, "step": step, "sharded": self.sharded,
                "elapsed": elapsed, "world_size": self.dist.world_size, "ranks": ranks,
                "train_config": to_dict(self.cfg), "run_config": self.run_config,
                "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
                "skipped_steps": self.state.skipped_steps,
                "model_config": asdict(config) if is_dataclass(config) else None,
            })
            self.writer.submit(self._writer_job(state, step, self.state.last_saved))
        self.state.last_saved = step

    def _writer_job(self, state: dict, step: int, previous: int | None) -> Callable[[], None]:
        shadow, ckpt_path, run_dir, export = self._shadow, self.ckpt_path, self.run_dir, self.export

        def write() -> None:
            written = previous
            try:  # a full disk: a one-line error; the atomic writes keep the previous files whole
                save_checkpoint(state, ckpt_path)
                written = step
                shadow.load_state_dict(state["model"])
                export(shadow, run_dir / MODEL_DIR)
            except UserError as e:
                kept = f"{ckpt_path} holds step {written}" if written is not None else "no checkpoint was written"
                raise UserError(f"saving step {step} failed: {e}; {kept}") from e
            plot(run_dir)

        return write

    # ---------------------------------------------------------------- work

    def evaluate(self, step: int) -> None:
        """The task's evaluation on the plain module (its other shapes never recompile the training forward),
        logged and printed, and the loss graph redrawn in the background."""
        self.model.eval()
        with torch.no_grad(), autocast_context(self.device, self.amp):
            if self.sharded:  # through FSDP's root, which gathers the parameters outside the blocks, then frees them
                results = self.root(None, run=self.task.evaluate)
                self.root.reshard()
            else:
                results = self.task.evaluate(self.model)
        self.model.train()
        if self.dist.is_main:
            if results:
                self.metrics.log({"kind": "eval", "step": step, **{k: float(v) for k, v in results.items()}})
                self.bar.write(f"step {step}: " + ", ".join(f"{k} {float(v):.4f}" for k, v in results.items()))
            run_dir = self.run_dir  # not `self`: the writer's job must not keep the trainer alive
            self.writer.submit(lambda: plot(run_dir))

    def check_memory(self, micro_batch: Any) -> None:
        """The memory plan (`gpt2.train.memory`) for this micro batch's shape, printed; a plan that cannot fit is
        a one-line error naming what would, before the first step."""
        batch = first_tensor(micro_batch)
        if not (self.cfg.memory_check and blocks(self.model) and batch is not None and batch.dim() >= 2):
            return
        rows, seq_len = batch.shape[0], batch.shape[-1]
        shards = self.dist.world_size if self.sharded else 1
        plan = plan_memory(self.model, rows, seq_len, self.amp, self.cfg.activation_checkpointing, shards)
        resident = sum(local_tensor_bytes(p) for p in self.model.parameters())
        free = free_memory(self.device, resident)
        line = f"memory plan per {self.device.type} device: {plan.describe()} (x {seq_len} tokens)"
        line += f", {free / GB:.1f} GB free" if free is not None else ""
        misfits = float(free is not None and plan.total > free)
        if self.dist.is_distributed:  # every rank stops, or none: one stopping alone would hang the others
            misfits = all_reduce_sum(torch.tensor(misfits, device=self.device)).item()
        if not misfits:
            return self._say(line)
        if free is None or plan.total <= free:
            raise UserError(f"{line}; another rank's plan does not fit its device (see its line)")
        flag = "--micro-batch" if "micro_batch" in self.run_config else "--batch-size"
        tips = advice(self.model, plan, free, seq_len, self.amp, self.cfg.activation_checkpointing, flag)
        raise UserError(f"{line}: it does not fit; try {tips} (or --no-memory-check to try anyway)")

    def _out_of_memory(self, step: int) -> UserError:
        """A device's out-of-memory error inside a step, as one line: where, and what the checkpoint holds."""
        last = self.state.last_saved
        kept = f"{self.ckpt_path} holds step {last}" if last is not None else "no checkpoint was written yet"
        return UserError(f"out of memory on {self.device} at step {step}; {kept}. Lower the micro batch, add "
                         "--activation-checkpointing or shard the model (--parallel fsdp)")

    def update(self, micro_batches: list, batch_metrics: dict[str, float], *, out_of_time: bool,
               signalled: bool) -> StepStats:
        """Forward/backward over one update's micro batches, then one optimizer step (skipped, with the run
        stopped, when the loss or the norm is not finite). One host sync: the statistics' all-reduce."""
        task, device, W = self.task, self.device, self.dist.world_size
        # Weights and tokens are counted on the host batches; then every micro batch's copy is queued at once
        # (pinned, non-blocking on CUDA), so the copies overlap the device's work instead of waiting on the host.
        weights = [task.loss_weight(b) for b in micro_batches]
        weights = None if weights[0] is None else [int(w) for w in weights]
        total = global_count(weights, len(micro_batches), W, device)
        tokens = sum(int(task.num_tokens(b)) for b in micro_batches)
        on_device = [to_device(b, device) for b in micro_batches]
        loss_sum = torch.zeros((), device=device, dtype=torch.float64)
        sums: dict[str, Any] = {}  # task metrics: 0-d device tensors or host numbers, summed
        for micro, batch in enumerate(on_device):
            weight = weights[micro] if weights else 1
            with gradient_sync(self.root, self.ddp, micro == len(on_device) - 1):
                with autocast_context(device, self.amp):
                    loss, step_metrics = self.forward(batch)
                self.scaler.scale(loss * (weight * W / total)).backward()
            loss_sum += loss.detach() * (weight / total)
            for k, v in step_metrics.items():
                v = v.detach() if isinstance(v, torch.Tensor) else float(v)
                sums[k] = sums[k] + v if k in sums else v
        clip = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
        self.scaler.unscale_(self.optimizer)  # clipping sees the true gradients
        grad_norm = local_tensor(torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip))
        stats = StepStats.reduce(loss=loss_sum, grad_norm=grad_norm,
                                 metrics={k: v / len(on_device) for k, v in sums.items()}, tokens=tokens,
                                 batch_metrics=batch_metrics, out_of_time=out_of_time, signalled=signalled,
                                 world_size=W)
        stats.skipped = self.scaler.is_enabled() and math.isfinite(stats.loss) and not math.isfinite(stats.grad_norm)
        if not (math.isfinite(stats.loss) and (math.isfinite(stats.grad_norm) or stats.skipped)):
            self.bar.close()
            last = self.state.last_saved
            where = (f"the last good checkpoint (step {last}) is kept in {self.ckpt_path}" if last is not None
                     else "no checkpoint had been written yet")
            raise NonFiniteLossError(f"training stopped at step {self.state.step + 1}: loss {stats.loss}, grad "
                                     f"norm {stats.grad_norm} (not finite); {where}. Lower --lr or check the data.")
        self.scaler.step(self.optimizer)  # skipped when the scaler found inf/NaN gradients
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return stats

    def log_step(self, stats: StepStats, lr: float, seconds: float, seq_len: int, now: float) -> None:
        tok_per_s = stats.tokens / seconds
        fpt = self.flops_per_token
        if fpt is None and hasattr(self.model, "flops_per_token"):
            fpt = self.model.flops_per_token(seq_len)
        mfu = tok_per_s * fpt / (self.peak * self.dist.world_size) if self.peak and fpt else None
        record = {"kind": "train", "step": self.state.step, "loss": stats.loss, "lr": lr,
                  "grad_norm": stats.grad_norm, "tokens_per_s": tok_per_s, "mfu": mfu, "time": now - self.t_start,
                  **stats.metrics, **stats.batch_metrics}
        scaled = ""
        if self.scaler.is_enabled():
            self.state.skipped_steps += stats.skipped
            record.update(loss_scale=self.scaler.get_scale(), skipped=stats.skipped,
                          skipped_steps=self.state.skipped_steps)
            scaled = f" scale {record['loss_scale']:g} skipped {self.state.skipped_steps}"
        self.metrics.log(record)
        self.bar.set_postfix_str(f"loss {stats.loss:.4f} lr {lr:.2e} {tok_per_s:,.0f} tok/s"
                                 + (f" mfu {mfu:.1%}" if mfu is not None else "") + scaled, refresh=False)
        self.bar.update(1)

    def fit(self) -> TrainResult:
        """Train from the restored (or new) state to the session's end: --max-steps, --stop-at-step,
        --max-minutes, or a signal (saved, then exit as the signal asked)."""
        cfg, dist = self.cfg, self.dist
        rng = self.restore()
        start = self.state.step
        if dist.is_main:
            write_run_config(self.run_dir, self.run_config)
        resume_step = start if rng is not None else None
        if dist.is_main:
            self.trackers = open_trackers(cfg.logger, self.run_dir, self.run_config, resume_step, cfg.wandb_project)
        self.metrics = MetricsLogger(self.run_dir / METRICS_FILE, enabled=dist.is_main, keep_until_step=resume_step,
                                     trackers=self.trackers)
        self.bar = tqdm(total=cfg.max_steps, initial=start, disable=not (dist.is_main and cfg.progress),
                        unit="step", dynamic_ncols=True, desc=self.run_dir.name)
        self.model.train()
        if rng is None and cfg.eval_every:
            self.evaluate(0)
        if rng is not None:
            restore_rng_state(rng, self.device)
        t_session = time.perf_counter()
        self.t_start = t_session - self.state.elapsed
        end_step = cfg.stop_at_step or cfg.max_steps
        if start >= end_step:
            self._say(f"{self.ckpt_path} is already at step {start} of --max-steps {cfg.max_steps}: nothing to "
                      "train (a larger --max-steps continues it)")
        loss = None
        with StopSignals() as stop, self.writer:
            for step in range(start, end_step):
                t0 = time.perf_counter()
                lr = apply_lr(self.optimizer, step, cfg)
                # Fetched here, after the previous step's checkpoint: a saved data position never counts a
                # batch that was fetched but not trained on.
                updates, batch_metrics = self.task.step_batches(self.accum)
                if step == start:
                    self.check_memory(updates[0][0])
                    if self.compiled:  # otherwise the first step is a silent minute or more
                        self._say("compiling the training step (torch.compile): the first step takes longer")
                per_update = []
                for micro_batches in updates:
                    out_of_time = (cfg.max_minutes is not None
                                   and time.perf_counter() - t_session > 60 * cfg.max_minutes)
                    try:
                        per_update.append(self.update(micro_batches, batch_metrics, out_of_time=out_of_time,
                                                      signalled=bool(stop.signum)))
                    except torch.OutOfMemoryError as e:
                        raise self._out_of_memory(step + 1) from e
                stats = StepStats.mean(per_update)
                done = self.state.step = step + 1
                loss = stats.loss
                now = time.perf_counter()
                self.log_step(stats, lr, now - t0, first_tensor(updates[-1][-1]).shape[-1], now)
                # Also evaluate where this session ends (the last step, --stop-at-step, --max-minutes), so the
                # graph of every session ends with a val loss. Evaluation never touches training state.
                if cfg.eval_every and (done % cfg.eval_every == 0 or done == end_step or stats.out_of_time):
                    self.evaluate(done)
                session_end = (done == end_step or stats.out_of_time) and cfg.save_final
                if session_end or stats.signalled or (cfg.save_every and done % cfg.save_every == 0):
                    self.save(done, time.perf_counter() - self.t_start)
                if stats.signalled:
                    self.bar.close()
                    self.writer.wait()
                    self._say(f"saved {self.ckpt_path} at step {done}; continue with --resume")
                    stop.exit()
                if stats.out_of_time:
                    end_step = done
                    break
        self.bar.close()
        if start < end_step < cfg.max_steps:
            saved = self.state.last_saved == end_step
            how = "continue with --resume" if saved else "--no-save-final: no checkpoint of it"
            self._say(f"stopped at step {end_step} of {cfg.max_steps}; {how}")
        return TrainResult(step=max(start, end_step), loss=loss, run_dir=self.run_dir, model=self.whole_model())

    def whole_model(self) -> nn.Module | None:
        """The trained weights as a plain module on rank 0, None on the others. Sharded: the host copy that
        saves export from, filled now (a collective of every rank) when the session ended without a save."""
        if not self.sharded:
            return self.model if self.dist.is_main else None
        self.writer.wait()  # a save's export may still be loading the copy
        if self.state.last_saved != self.state.step:  # the same on every rank: all take part or none
            state = full_model_state(self.model)
            if self.dist.is_main:
                self._shadow.load_state_dict(state)
        return self._shadow if self.dist.is_main else None

    def close(self) -> None:
        """Close the trackers (flushed; W&B told whether the session failed: an error, not a signal's saved stop),
        and drop the DDP wrapper now, while its process group lives: a DDP reducer freed after
        `destroy_process_group` (say by the garbage collector at exit) deadlocks in gloo's teardown."""
        self.trackers.close(failed=isinstance(sys.exc_info()[1], Exception))
        self.forward = self.ddp = self.root = None

    def _say(self, line: str) -> None:
        if self.dist.is_main:
            print(line, flush=True)


def validate(cfg: TrainConfig, grad_accum_steps: int) -> None:
    cfg.validate()
    if cfg.max_steps is None:
        raise UserError("--max-steps must be set before training starts")
    if grad_accum_steps < 1:
        raise UserError(f"gradient accumulation steps must be >= 1 (got {grad_accum_steps})")


def train(model: nn.Module, task: Task, cfg: TrainConfig, grad_accum_steps: int = 1, *,
          dist: DistInfo | None = None, run_config: Any = None, command: str | None = None,
          export: Callable[[nn.Module, Path], None] | None = None,
          flops_per_token: float | None = None) -> TrainResult:
    """Train `model` on `task` for cfg.max_steps optimizer steps of `grad_accum_steps` micro batches each, holding
    RUN_DIR/run.lock from before anything is written there (a second run on the same --out is refused at start
    instead of interleaving metrics and checkpoints). dist: from `init_distributed()` (default: called here);
    the other arguments: see `Trainer`. Raises NonFiniteLossError on a NaN/inf loss; on SIGTERM/Ctrl-C saves,
    then raises SystemExit(143) / KeyboardInterrupt."""
    if not isinstance(task, Task):
        raise TypeError(f"{type(task).__name__} is not a gpt2.train.Task: subclass it (its optional methods "
                        "have defaults)")
    validate(cfg, grad_accum_steps)
    dist = dist or init_distributed(cfg.device, cfg.dist_timeout)
    with run_lock(cfg.out) if dist.is_main else nullcontext():
        try:
            trainer = Trainer(model, task, cfg, grad_accum_steps, dist, run_config=run_config, command=command,
                              export=export, flops_per_token=flops_per_token)
            try:
                return trainer.fit()
            finally:
                trainer.close()
        except Exception as e:
            if isinstance(e, UserError) or lost_contact(e):
                _close_progress_bars()  # the error line then starts a line of its own, not the bar's
            raise


def _close_progress_bars() -> None:
    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()
