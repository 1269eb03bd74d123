"""The training loop's settings, shared by every stage: `TrainConfig` (each field a flag of every training command)
and the rules for the length and LR schedule of a run."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

from gpt2.config import ANNOUNCE, APPLY, SESSION, arg, check_values
from gpt2.errors import UserError, note
from gpt2.io import not_a_folder
from gpt2.precision import TRAIN_AUTOCAST_HELP, TRAIN_DTYPES
from gpt2.train.trackers import DEFAULT_WANDB_PROJECT, EXTRA, check_trackers


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
    warmup_steps: int = arg(100, "steps of linear LR warmup; when not given, cut to the run's length (with a "
                                 "note) if the run is shorter", on_resume=ANNOUNCE, minimum=0)
    weight_decay: float = arg(0.1, "AdamW weight decay, on 2-D weights only (not biases or LayerNorms)", minimum=0)
    optimizer: str = arg("adamw", "adamw for every weight, or muon for the 2-D weights inside the blocks (AdamW "
                                  "keeps the embeddings, head, biases and LayerNorms; not with --parallel fsdp)",
                         choices=["adamw", "muon"])
    muon_lr: float = arg(0.02, "--optimizer muon: peak learning rate of the block matrices (--lr stays AdamW's); "
                               "on the same warmup and cosine shape", on_resume=ANNOUNCE, minimum=0)
    muon_weight_decay: float = arg(0.0, "--optimizer muon: decoupled weight decay of the block matrices",
                                   minimum=0)
    muon_momentum: float = arg(0.95, "--optimizer muon: momentum (Nesterov) of the block matrices", minimum=0)
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
    dist_timeout: float | None = arg(None, "under torchrun: minutes a process waits for the others (to join the job, "
                                           "in each collective) before it ends with one line; a process or "
                                           "machine that hangs is given up on after this long, so it must exceed "
                                           "the longest time one process works alone (its first compiled step, "
                                           "rank 0 finishing a checkpoint write); default: torch's (10 with NCCL, "
                                           "30 with gloo)", on_resume=APPLY)
    dtype: str = arg("auto", TRAIN_AUTOCAST_HELP + "; float16 trains with dynamic loss scaling",
                     choices=TRAIN_DTYPES, on_resume=APPLY)
    compile: bool | None = arg(None, "torch.compile the training forward (default: on for CUDA, off on CPU)",
                               on_resume=APPLY)
    parallel: str = arg("ddp", "several processes: ddp (each keeps the whole model, gradients and optimizer state) "
                               "or fsdp (each keeps 1/N of them and gathers one block at a time: models too large "
                               "for one device)", choices=["ddp", "fsdp"])
    activation_checkpointing: bool = arg(False, "keep only each block's input for backward and recompute its "
                                                "activations there: much less activation memory for one more "
                                                "forward pass of compute (the gradients are unchanged)",
                                         on_resume=APPLY)
    memory_check: bool = arg(True, "before step 1, print the estimated memory per device (weights, gradients, "
                                   "optimizer state, activations) and stop with what would fit when it exceeds "
                                   "the device's free memory", on_resume=APPLY)
    progress: bool = arg(True, "show a progress bar (rank 0)", on_resume=APPLY)
    logger: list[str] = arg(factory=list, help="trackers that also get metrics.jsonl's numbers (rank 0), "
                                               "space-separated: tensorboard (into RUN_DIR/tensorboard), wandb "
                                               "(W&B, online or WANDB_MODE=offline; the run id kept in RUN_DIR), or "
                                               f"none; they need `{EXTRA}`", on_resume=APPLY, metavar="NAME")
    wandb_project: str | None = arg(None, "--logger wandb: the W&B project (default: $WANDB_PROJECT, else "
                                          f"{DEFAULT_WANDB_PROJECT})", on_resume=APPLY)
    # Not a flag: the fields the user set (the CLI fills it). A default may be fitted to the run; a value the
    # user gave is refused when it contradicts another.
    _given: tuple[str, ...] = field(default=(), repr=False, compare=False)

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
        if self.dist_timeout is not None and not self.dist_timeout > 0:
            raise UserError(f"--dist-timeout must be > 0 minutes (got {self.dist_timeout}); leave it out for torch's "
                            "default")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise UserError(f"--lr must be a positive number (got {self.lr})")
        self.fit_warmup()
        check_schedule(self.lr, self.min_lr, self.warmup_steps, self.max_steps)
        if not (math.isfinite(self.grad_clip) and self.grad_clip >= 0):
            raise UserError(f"--grad-clip must be >= 0, 0 = no clipping (got {self.grad_clip})")
        for flag in ("eval_every", "save_every"):
            value = getattr(self, flag)
            if value is not None and value < 0:
                raise UserError(f"--{flag.replace('_', '-')} must be >= 0, 0 = never (got {value})")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise UserError(f"--betas takes two numbers in [0, 1) (got {list(self.betas)})")
        check_trackers(self.logger)


    def fit_warmup(self) -> None:
        """A warmup the user did not set (the class's or the preset's) is cut to a run that is shorter, with a
        note; one the user gave stays, and `check_schedule` refuses it."""
        if "warmup_steps" in self._given or self.max_steps is None or self.warmup_steps <= self.max_steps:
            return
        if os.environ.get("RANK", "0") == "0":
            note(f"note: warmup cut from {self.warmup_steps} to the run's {self.max_steps} steps (--max-steps); "
                 "--warmup-steps sets it")
        self.warmup_steps = self.max_steps


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
