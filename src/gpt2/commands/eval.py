"""`gpt2 eval hellaswag`, `gpt2 eval val-loss` and `gpt2 eval task`: score a model (a training run, a Hugging
Face folder or a hub name) on HellaSwag, on the val (or train) split of token shards, or on the held-out
questions of a task with a verifiable answer, and print the result.

    gpt2 eval hellaswag --model RUN_DIR                             # downloads hellaswag_val.jsonl once
    gpt2 eval val-loss --model RUN_DIR --data data/fineweb --tokens 10485760
    gpt2 eval task --model RUN_DIR --task arithmetic --limit 500 --show 5

The scoring is `gpt2.evaluate`'s (`hellaswag_eval`, `val_loss`), the same functions the training loop
evaluates with, and `gpt2.rlhf.tasks.evaluate_task` for tasks, the function GRPO evaluates with.
`--dtype auto` is the training loop's rule (bfloat16 autocast on a GPU that supports it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from gpt2.checkpoint import load_model
from gpt2.commands import Command
from gpt2.config import arg
from gpt2.data.loader import ShardLoader, checked_batch
from gpt2.decode import WEIGHTS_DTYPE_METAVAR, load_dtype
from gpt2.decode.int8 import check_supported, quantized, quantizing_note
from gpt2.distributed import pick_device
from gpt2.errors import UserError, note
from gpt2.evaluate import HELLASWAG_DIR, HELLASWAG_URLS, hellaswag_eval, load_hellaswag, val_loss
from gpt2.io import write_json_atomic
from gpt2.precision import AUTOCAST_HELP, TRAIN_DTYPES, autocast_dtype
from gpt2.rlhf.tasks import SPLITS, TASKS, evaluate_task, get_task


def _prepare(model_name: str, device_name: str, dtype_name: str, reads_text: str | None = None,
             weights_dtype: str = "float32") -> tuple[nn.Module, torch.device, torch.dtype | None]:
    """The model on its device in eval mode, its weights in `weights_dtype` (int8: the copy decoding runs,
    `gpt2.decode.int8`), and the autocast dtype for `--dtype`."""
    device = pick_device(device_name)
    model = load_model(model_name, device, load_dtype(weights_dtype), reads_text=reads_text).eval()
    if weights_dtype == "int8":
        check_supported(model)
        note(quantizing_note(model))
        model = quantized(model)
    return model, device, autocast_dtype(dtype_name, device)


@dataclass
class HellaSwagConfig:
    model: str = arg("gpt2", help="training run dir, Hugging Face checkpoint dir, or hub name")
    source: str | None = arg(None, help="local HellaSwag jsonl (official format) instead of downloading it")
    split: str = arg("val", help="which official file to download", choices=sorted(HELLASWAG_URLS))
    data_dir: str = arg(HELLASWAG_DIR, help="folder the downloaded HellaSwag file is cached in")
    limit: int | None = arg(None, help="score only the first N examples", minimum=1)
    batch_size: int = arg(8, help="examples per forward pass (4 rows each)", minimum=1)
    device: str = arg("auto", help="cpu, cuda, mps or auto")
    dtype: str = arg("auto", help=AUTOCAST_HELP, choices=TRAIN_DTYPES)


def run_hellaswag(cfg: HellaSwagConfig) -> dict[str, float]:
    examples = load_hellaswag(cfg.source, cfg.split, cfg.data_dir, cfg.limit)
    model, device, dtype = _prepare(cfg.model, cfg.device, cfg.dtype, reads_text="--model")
    result = hellaswag_eval(model, examples, device, dtype, batch_size=cfg.batch_size, progress=True)
    print(f"hellaswag {cfg.split}: {int(result['n'])} examples  acc {result['acc']:.4f}  "
          f"acc_norm {result['acc_norm']:.4f}")
    return result


@dataclass
class ValLossConfig:
    model: str = arg("gpt2", help="training run dir, Hugging Face checkpoint dir, or hub name")
    data: str | None = arg(None, help="folder of token shards (from `gpt2 prepare ...`)", metavar="DIR")
    split: str = arg("val", help="which shards to score", choices=["val", "train"])
    tokens: int = arg(10_485_760, help="token budget (20 x 524288, build-nanogpt's); capped at one pass "
                                       "over the split", minimum=1)
    batch_size: int = arg(8, help="sequences per forward pass", minimum=1)
    seq_len: int | None = arg(None, help="tokens per sequence; none = the model's context window", minimum=1)
    device: str = arg("auto", help="cpu, cuda, mps or auto")
    dtype: str = arg("auto", help=AUTOCAST_HELP, choices=TRAIN_DTYPES)
    weights_dtype: str = arg("float32", help="the weights' dtype: float32, bfloat16 or float16 (cast), or int8 (the "
                             "8-bit weights of `--weights-dtype int8` decoding, to measure what they lose; their "
                             "logits are materialised per batch: bound them with --batch-size)",
                             metavar=WEIGHTS_DTYPE_METAVAR)


def run_val_loss(cfg: ValLossConfig) -> dict[str, float]:
    if not cfg.data:
        raise UserError("give the shard folder: gpt2 eval val-loss --model M --data DIR")
    load_dtype(cfg.weights_dtype)  # a bad value is one line before anything loads
    model, device, dtype = _prepare(cfg.model, cfg.device, cfg.dtype, weights_dtype=cfg.weights_dtype)
    seq_len = cfg.seq_len or model.config.block_size
    if seq_len > model.config.block_size:
        raise UserError(f"--seq-len {seq_len} exceeds the model's context window ({model.config.block_size})")
    loader = ShardLoader(cfg.data, cfg.split, cfg.batch_size, seq_len)
    # never wrap into a second epoch: that would count tokens twice
    steps = max(1, min(cfg.tokens // loader.window, loader.steps_per_epoch))
    with tqdm(range(steps), desc=f"{cfg.split} loss", unit="batch", dynamic_ncols=True) as bar:  # closed on errors
        loss = val_loss(model, (checked_batch(loader, model.config.vocab_size) for _ in bar), device, dtype)
    n_tokens = steps * loader.window
    print(f"{cfg.split} loss {loss:.4f} (perplexity {math.exp(loss):.2f}) over {n_tokens} tokens "
          f"({steps} batches of {cfg.batch_size} x {seq_len}) from {cfg.data}, {cfg.weights_dtype} weights")
    return {"val_loss": loss, "tokens": n_tokens}


@dataclass
class TaskEvalConfig:
    model: str = arg("runs/finetune", help="training run dir, Hugging Face checkpoint dir, or hub name")
    task: str = arg("arithmetic", help="task with a verifiable answer (gpt2.rlhf.tasks)", choices=sorted(TASKS))
    source: str | None = arg(None, help="gsm8k: a local file or folder with the hub's fields (question, answer) "
                                        "instead of downloading openai/gsm8k")
    split: str = arg("test", help="which questions to answer (test is held out of training)", choices=list(SPLITS))
    limit: int | None = arg(None, help="answer only the first N questions of the split", minimum=1)
    max_new_tokens: int | None = arg(None, help="longest answer in tokens; default: the task's", minimum=1)
    batch_size: int = arg(64, help="questions answered together", minimum=1)
    show: int = arg(0, help="print the first K questions with the model's answer and its verdict", minimum=0)
    json: str | None = arg(None, help="also write the result (and every answer) to this JSON file",
                           metavar="FILE")
    device: str = arg("auto", help="cpu, cuda, mps or auto")


def run_task(cfg: TaskEvalConfig) -> dict:
    """Greedy answers to the split's questions, scored exactly; prints accuracy with its 95% Wilson interval."""
    task = get_task(cfg.task, cfg.source)
    questions = task.questions(cfg.split)[: cfg.limit]
    model = load_model(cfg.model, pick_device(cfg.device), reads_text="--model").eval()
    max_new = cfg.max_new_tokens or task.max_new_tokens
    result = evaluate_task(model, questions, task, max_new, cfg.batch_size)
    for q, answer, score in list(zip(questions, result["completions"], result["scores"]))[: cfg.show]:
        print(f"{'right' if score else 'WRONG'}  {q.prompt!r} -> {answer.strip()!r} (expected {q.target})")
    print(f"{task.name} {cfg.split}: {result['correct']}/{result['n']} correct, accuracy {result['accuracy']:.3f} "
          f"(95% CI {result['ci_low']:.3f}-{result['ci_high']:.3f}), greedy, at most {max_new} new tokens")
    summary = {k: result[k] for k in ("accuracy", "n", "correct", "ci_low", "ci_high")}
    if cfg.json:
        write_json_atomic(cfg.json, {"model": cfg.model, "task": task.name, "split": cfg.split,
                                     "max_new_tokens": max_new, **summary,
                                     "answers": [{"prompt": q.prompt, "target": q.target, "answer": a, "score": sc}
                                                 for q, a, sc in zip(questions, result["completions"],
                                                                     result["scores"])]})
    return summary


COMMANDS = [
    Command("eval hellaswag", "HellaSwag accuracy (completion-style scoring, acc and acc_norm)",
            HellaSwagConfig, run_hellaswag),
    Command("eval val-loss", "mean next-token loss of a model on token shards", ValLossConfig,
            run_val_loss),
    Command("eval task", "exact-match accuracy on a task's held-out questions (greedy answers, 95% CI)",
            TaskEvalConfig, run_task),
]
