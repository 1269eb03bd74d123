"""`gpt2 finetune`: instruction fine-tuning on Alpaca, so a pretrained GPT answers a question and stops.

Design decisions:
- Thin by design: this config, the Task of `gpt2.train.finetune` (batches, loss, evaluation, data position)
  and a before/after report. Everything else (AdamW, warmup + cosine, accumulation, DDP under torchrun,
  checkpoints and exact resume, metrics.jsonl, progress bar, loss.png) is the shared loop in `gpt2.train.loop`.
- The data comes from `gpt2 prepare alpaca --out DIR` (tokenized (question_ids, answer_ids) pairs). The
  over-length rule of `gpt2.data.alpaca.fit_length` is applied here, with the model's context window (or
  `--max-len`), and the truncated/dropped counts are printed.
- Length of the run: the rule of every command (`gpt2.train.loop.run_length`): `--max-steps` when given,
  else `--epochs` (2) x steps per epoch, where a step is `--grad-accum` micro batches of `--batch-size`
  examples on every rank. Validation loss on the held-out split is
  computed at step 0, after every epoch (`--eval-every` defaults to the steps per epoch) and at the end. It
  is token-weighted over the whole split: each rank evaluates every W-th batch and the sums are all-reduced.
- Before/after report: greedy (or `--sample-temperature`) answers to `--sample-prompts`, each formatted with
  `gpt2.template.format_prompt`, from the starting model and from the fine-tuned one, side by side in
  `RUN_DIR/samples.md` with whether each answer ended with <|endoftext|>. The "before" answers are kept in
  `RUN_DIR/samples_before.json`, so a resumed run still compares against the model it started from.
- Presets: `gpt2` (OpenAI's 124M at LR 2e-5, the recipe for real use) and `tiny` (`make demo`'s: the tiny
  pretrained model from `gpt2 pretrain --preset tiny`, 80 epochs at a high LR over a few short records, and
  sample questions taken from them, which is what a 7M model can learn to answer).
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn as nn

from gpt2.checkpoint import load_model
from gpt2.commands import Command
from gpt2.config import APPLY, arg, from_dict, to_dict
from gpt2.data.alpaca import fit_examples, load_split
from gpt2.data.batching import Example
from gpt2.distributed import destroy_distributed, init_distributed
from gpt2.errors import UserError
from gpt2.io import make_folder, write_json_atomic, write_text_atomic
from gpt2.model import GPT
from gpt2.model import PRESETS as MODEL_PRESETS
from gpt2.train.config import EPOCHS_HELP, MAX_STEPS_HELP, TrainConfig, run_length
from gpt2.train.finetune import FinetuneTask, answer_prompts, render_samples
from gpt2.train.loop import train
from gpt2.train.run_dir import check_run_dir, run_lock

DEFAULT_PROMPTS = [
    "What are the places I can visit in New York?",
    "Who is the first president of the United States?",
    "Give three tips for staying healthy.",
    "What is the capital of France?",
]
SAMPLES_FILE = "samples.md"
SAMPLES_BEFORE_FILE = "samples_before.json"


@dataclass
class FinetuneConfig(TrainConfig):
    init: str = arg("gpt2", "starting model: a training run dir (ours), a Hugging Face checkpoint dir, or a hub "
                            "name such as gpt2")
    scratch: str | None = arg(None, "start from freshly initialised weights of this model preset (seeded by --seed) "
                                    "instead of --init: for a task small enough to learn from its own data, such as "
                                    "`gpt2 prepare task`'s", choices=sorted(MODEL_PRESETS))
    data: str = arg("data/alpaca", "folder written by `gpt2 prepare alpaca --out` (or `gpt2 prepare task --out`)")
    epochs: float = arg(2.0, EPOCHS_HELP)
    batch_size: int = arg(16, "examples per micro batch on each rank", minimum=1)
    grad_accum: int = arg(2, "micro batches per optimizer step (global batch = batch size x grad accum x ranks)",
                          minimum=1)
    max_len: int | None = arg(None, "longest question + answer in tokens (default: the model's context window); "
                                    "longer questions are cut from the left, or the example dropped", minimum=2)
    group_batches: int = arg(16, "length grouping: sort this many batches' worth of shuffled examples by "
                                 "length before cutting batches (more = less padding, less randomness)", minimum=1)
    fused_loss: bool | None = arg(None, "chunked fused lm_head + cross-entropy (gpt2.losses); default: "
                                        "on for CPU, off for CUDA (where torch.compile fuses the loss)",
                                  on_resume=APPLY)
    sample_prompts: list[str] = arg(factory=lambda: list(DEFAULT_PROMPTS), on_resume=APPLY,
                                    help="questions answered before and after fine-tuning (RUN_DIR/samples.md)")
    sample_max_tokens: int = arg(128, "longest answer generated for samples.md", on_resume=APPLY, minimum=1)
    sample_temperature: float = arg(0.0, "sampling temperature for samples.md; 0 = greedy", on_resume=APPLY)
    # Loop fields whose fine-tuning defaults differ (None = derived from the data, see --epochs).
    out: str = arg("runs/finetune", "run directory: checkpoint.pt, model/ (HF export), metrics.jsonl, loss.png, "
                                    "samples.md")
    max_steps: int | None = arg(None, MAX_STEPS_HELP)
    eval_every: int | None = arg(None, "validation loss every N steps (default: once per epoch); 0 = never")
    lr: float = arg(2e-5, "peak learning rate (reached after warmup)")
    min_lr: float | None = arg(None, "learning rate at the end of the cosine decay (default: lr / 10)")
    warmup_steps: int = arg(50, "steps of linear LR warmup")
    weight_decay: float = arg(0.0, "AdamW weight decay, on 2-D weights only")
    save_every: int = arg(500, "checkpoint every N steps; 0 = only at the end, at --stop-at-step and on "
                               "SIGTERM/Ctrl-C")

    def validate(self) -> None:
        super().validate()
        if not self.epochs > 0:
            raise UserError(f"--epochs must be > 0 (got {self.epochs})")
        if self.scratch is not None and "init" in self._given:
            raise UserError("--init and --scratch both name the starting model: give one")
        if not self.sample_temperature >= 0:
            raise UserError(f"--sample-temperature must be >= 0, 0 = greedy (got {self.sample_temperature})")


# The `tiny` preset is `make demo`'s recipe: a 7M model pretrained for a minute on a CPU, fine-tuned on the 34
# Alpaca records (of the first 335) that have no input and an answer of at most 16 tokens. Such a model can
# learn the format and the answers it was trained on, not answer new questions, so its sample questions are
# four of those records; measured: 80 epochs at LR 3e-3 (400 steps) give all four back word for word and stop
# with <|endoftext|> (8 epochs over all 327 records gave word salad or nothing).
DEMO_PROMPTS = [
    "What is the capital of France?",
    "What are the three primary colors?",
    "What does DNA stand for?",
    "Name three fruits that are rich in Vitamin C.",
]

PRESETS = {
    "gpt2": FinetuneConfig(),
    "tiny": FinetuneConfig(init="runs/demo/pretrain", out="runs/demo/finetune", batch_size=8, grad_accum=1,
                           epochs=80, lr=3e-3, warmup_steps=20, sample_prompts=list(DEMO_PROMPTS),
                           sample_max_tokens=48, save_every=0),
}


# ---------------------------------------------------------------- the report


def samples_header(cfg: FinetuneConfig, done: int, max_steps: int, steps_per_epoch: int) -> str:
    how = "greedy" if cfg.sample_temperature <= 0 else f"sampled at temperature {cfg.sample_temperature}"
    start = f"A new `{cfg.scratch}` model" if cfg.scratch else f"Model `{cfg.init}`"
    return (f"{start} fine-tuned on `{cfg.data}`: {done} of {max_steps} steps "
            f"({done / steps_per_epoch:.2f} epochs). Answers {how}, at most {cfg.sample_max_tokens} tokens; "
            "each question is formatted with `gpt2.template.format_prompt`.")


def before_answers(model: nn.Module, cfg: FinetuneConfig, run_dir: Path) -> list[dict]:
    """The starting model's answers, generated once per run and kept in RUN_DIR for resumed runs."""
    path = run_dir / SAMPLES_BEFORE_FILE
    if cfg.resume and path.exists():
        saved = json.loads(path.read_text())
        if saved.get("prompts") == cfg.sample_prompts:
            return saved["answers"]
    answers = answer_prompts(model, cfg.sample_prompts, cfg.sample_max_tokens, cfg.sample_temperature, cfg.seed)
    make_folder(run_dir)
    write_json_atomic(path, {"prompts": cfg.sample_prompts, "answers": answers})
    return answers


# ---------------------------------------------------------------- the command


def _load_examples(cfg: FinetuneConfig, block_size: int, is_main: bool) -> tuple[list[Example], list[Example]]:
    max_len = min(cfg.max_len or block_size, block_size)
    if max_len < 2:
        raise UserError(f"--max-len must be >= 2 (got {cfg.max_len})")
    splits = []
    for split in ("train", "val"):
        examples, counts = fit_examples(load_split(cfg.data, split), max_len)
        if is_main and counts:
            print(f"finetune: {split}: {counts['truncated']} questions cut from the left and "
                  f"{counts['dropped_too_long']} examples dropped to fit {max_len} tokens", flush=True)
        splits.append(examples)
    if not splits[0]:
        raise UserError(f"{cfg.data}: no training examples fit in {max_len} tokens")
    return splits[0], splits[1]


def starting_model(cfg: FinetuneConfig) -> GPT:
    """`--init`'s model, or with `--scratch` a new one of that preset (the same weights on every rank)."""
    if cfg.scratch is None:
        return load_model(cfg.init, reads_text="--init")
    torch.manual_seed(cfg.seed)
    return GPT(MODEL_PRESETS[cfg.scratch])


def run(cfg: FinetuneConfig):
    cfg.validate()
    run_dir = Path(cfg.out)
    check_run_dir(run_dir, cfg.resume, COMMAND.name)  # before the model loads
    dist = init_distributed(cfg.device, cfg.dist_timeout)
    try:
        model = starting_model(cfg).to(dist.device)
        train_ex, val_ex = _load_examples(cfg, model.config.block_size, dist.is_main)
        task = FinetuneTask(train_ex, val_ex, cfg.batch_size, seed=cfg.seed, rank=dist.rank,
                            world_size=dist.world_size, group_batches=cfg.group_batches,
                            fused_loss=cfg.fused_loss if cfg.fused_loss is not None else dist.device.type == "cpu")
        steps_per_epoch = task.batches_per_epoch // cfg.grad_accum
        if steps_per_epoch < 1:
            raise UserError(f"one epoch is {task.batches_per_epoch} micro batches per rank, fewer than "
                            f"--grad-accum {cfg.grad_accum}: lower --batch-size or --grad-accum")
        max_steps = run_length(cfg.max_steps, cfg.epochs, steps_per_epoch)
        eval_every = cfg.eval_every if cfg.eval_every is not None else steps_per_epoch if val_ex else 0
        loop_cfg = replace(from_dict(TrainConfig, {**to_dict(cfg), "max_steps": max_steps, "eval_every": eval_every}),
                           _given=cfg._given)  # a --warmup-steps the user gave is still refused, a default cut

        # the run's lock spans samples_before.json, samples.md and the loop (which takes it again)
        with run_lock(run_dir) if dist.is_main else nullcontext():
            header = lambda done: samples_header(cfg, done, max_steps, steps_per_epoch)
            before = None
            if dist.is_main:
                print(f"finetune: {len(train_ex)} train / {len(val_ex)} val examples, {steps_per_epoch} steps per "
                      f"epoch on {dist.world_size} rank(s), {max_steps} steps", flush=True)
                before = before_answers(model, cfg, run_dir)
                write_text_atomic(run_dir / SAMPLES_FILE, render_samples(cfg.sample_prompts, before, None, header(0)))
            result = train(model, task, loop_cfg, cfg.grad_accum, dist=dist,
                           run_config=replace(cfg, max_steps=max_steps, eval_every=eval_every), command=COMMAND.name)
            if dist.is_main:  # also after --stop-at-step / --max-minutes: the answers so far
                after = answer_prompts(result.model, cfg.sample_prompts, cfg.sample_max_tokens,
                                       cfg.sample_temperature, cfg.seed)
                text = render_samples(cfg.sample_prompts, before, after, header(result.step))
                write_text_atomic(run_dir / SAMPLES_FILE, text)
                print(text, flush=True)
        return result
    finally:
        destroy_distributed()


COMMAND = Command("finetune", "instruction-tune a pretrained GPT-2 on Alpaca (before/after answers in samples.md)",
                  FinetuneConfig, run, presets=PRESETS)
