"""Evaluation: validation loss and HellaSwag accuracy (`gpt2 eval ...`, in `gpt2.commands.eval`, runs them
from the command line).

Design decisions:
- `val_loss` takes any iterable of (x, y) batches, so the training loop (a `ShardLoader` on the val split,
  a fixed number of batches), `gpt2 eval val-loss` and tests share one function. It never knows about data
  files or DDP: averaging across ranks is the caller's job (`gpt2.distributed.all_reduce_mean`).
- The loss goes through `eval_loss` (chunked lm_head + cross-entropy), so evaluating a 32 x 1024 batch never
  holds its 6.6 GB of float32 logits.
- The mean is token-weighted (each batch's mean loss times its number of non-ignored targets), so batches
  with -100 targets or a short last batch count for exactly the tokens they hold.
- The model is put in eval mode (no dropout) for the duration and its previous mode restored afterwards,
  since the loop calls this in the middle of training.
- HellaSwag is scored completion-style as in the GPT-2/GPT-3 papers and build-nanogpt: each of the 4 rows
  is context tokens + " " + ending tokens; only the ending tokens are scored. `acc` picks the ending with
  the lowest *summed* loss, `acc_norm` the lowest *mean per-token* loss (build-nanogpt's "acc_norm";
  lm-eval-harness normalises by the ending's character length instead, so its acc_norm differs slightly).
  Rows are right-padded: with causal attention and positions 0..T-1 a real token never sees the pads after
  it, so no attention mask is needed, and padded positions are excluded from the loss by the mask.
  Several examples (4 rows each) go through the model in one forward pass for speed.
- Under DDP every rank scores the examples `i % world_size == rank` and the counts are summed across ranks,
  so each rank returns the same global accuracy.
- The data is the official validation file from the rowanz/hellaswag GitHub repository, downloaded once
  into a cache folder; `--source FILE` reads a local copy in the same jsonl format (the offline path runs
  the same parsing and validation code).
"""

from __future__ import annotations

import os
import urllib.request
from collections.abc import Iterable, Sequence
from itertools import islice
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from gpt2.data.sources import jsonl_records
from gpt2.errors import UserError
from gpt2.io import atomic_write
from gpt2.losses import IGNORE_INDEX, gpt_loss_chunked
from gpt2.padding import pad_right
from gpt2.precision import autocast_context
from gpt2.tokenizer import encode

HELLASWAG_URLS = {
    split: f"https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_{split}.jsonl"
    for split in ("train", "val")
}
HELLASWAG_DIR = "data/hellaswag"  # where the downloaded file is cached (relative to the working directory)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside a DDP wrapper (`.module`) and/or `torch.compile` (`._orig_mod`)."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def eval_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of a batch without materialising its full logits: the chunked loss of
    `gpt2.losses` for a GPT (row chunks sized for the device: cache-sized on CPU, larger matmuls on a
    GPU), `model.loss` for any other model and for a GPT whose head holds no weight matrix (8-bit weights:
    `gpt2.decode.int8`)."""
    if not hasattr(model, "hidden_states") or not isinstance(getattr(model.lm_head, "weight", None), torch.Tensor):
        return model.loss(x, y)
    return gpt_loss_chunked(model, x, y, chunk=128 if x.device.type == "cpu" else 4096)


@torch.no_grad()
def val_loss(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
             device: torch.device | str | None = None, autocast_dtype: torch.dtype | None = None) -> float:
    """Token-weighted mean cross-entropy of `model` over `batches` of (x, y) LongTensors [B, T].

    `device` defaults to the model's; batches are moved there. `autocast_dtype` (e.g. torch.bfloat16)
    runs the forward under autocast; the loss itself is always computed in float32.
    """
    core = unwrap(model)
    device = torch.device(device) if device is not None else next(core.parameters()).device
    was_training = core.training
    core.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    try:
        for x, y in batches:
            n = int((y != IGNORE_INDEX).sum())  # before the move: no device sync when batches come from CPU
            if n == 0:
                continue
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with autocast_context(device, autocast_dtype):
                loss = eval_loss(core, x, y)
            total += loss.double() * n
            count += n
    finally:
        core.train(was_training)
    if count == 0:
        raise ValueError("val_loss: no batches (or only ignored targets) to evaluate")
    return float(total) / count


# ---------------------------------------------------------------------------------------------- HellaSwag


def download_hellaswag(split: str = "val", data_dir: str | os.PathLike = HELLASWAG_DIR) -> Path:
    """The path of the cached `hellaswag_{split}.jsonl`, downloading it first if it is not there."""
    if split not in HELLASWAG_URLS:
        raise UserError(f"--split {split!r}: HellaSwag splits with labels are {sorted(HELLASWAG_URLS)}")
    path = Path(data_dir) / f"hellaswag_{split}.jsonl"
    if path.is_file():
        return path
    url = HELLASWAG_URLS[split]
    try:
        with atomic_write(path, "wb") as f, urllib.request.urlopen(url, timeout=60) as response:
            while chunk := response.read(1 << 20):
                f.write(chunk)
    except OSError as e:  # URLError and timeouts (a full disk is already a UserError naming the file)
        raise UserError(f"cannot download HellaSwag from {url} ({e}); offline, pass a local copy of "
                        f"hellaswag_{split}.jsonl with --source FILE") from e
    return path


def _check_record(rec, where: str) -> dict:
    if not isinstance(rec, dict):
        raise UserError(f"{where}: expected a JSON object with ctx, endings and label")
    missing = [k for k in ("ctx", "endings", "label") if k not in rec]
    if missing:
        raise UserError(f"{where}: missing field(s) {', '.join(missing)} (not a HellaSwag record?)")
    endings, label = rec["endings"], rec["label"]
    if not isinstance(rec["ctx"], str) or not rec["ctx"]:
        raise UserError(f"{where}: 'ctx' must be a non-empty string")
    if not (isinstance(endings, list) and len(endings) == 4 and all(isinstance(e, str) and e for e in endings)):
        raise UserError(f"{where}: 'endings' must be a list of 4 non-empty strings")
    if isinstance(label, str) and label.isdigit():
        label = int(label)
    if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < 4:
        raise UserError(f"{where}: 'label' must be 0, 1, 2 or 3, got {rec['label']!r}")
    return {**rec, "label": label}


def read_hellaswag(path: str | os.PathLike, limit: int | None = None) -> list[dict]:
    """HellaSwag records (dicts with at least ctx, endings, label) from a jsonl file, validated."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such HellaSwag file")
    # a line at a time, and no further than `limit` records: bad bytes or JSON past them are never read
    examples = [_check_record(rec, f"{path}:{lineno}") for lineno, rec in islice(jsonl_records(path), limit)]
    if not examples:
        raise UserError(f"{path}: no HellaSwag records")
    return examples


def load_hellaswag(source: str | os.PathLike | None = None, split: str = "val",
                   data_dir: str | os.PathLike = HELLASWAG_DIR, limit: int | None = None) -> list[dict]:
    """Records from `source` (a local jsonl) or, when None, the official file (downloaded and cached)."""
    return read_hellaswag(source if source is not None else download_hellaswag(split, data_dir), limit)


def render_example(example: dict, block_size: int | None = None) -> tuple[list[list[int]], list[int]]:
    """The 4 candidate rows of one example as token lists (context + " " + ending) and the number of
    ending tokens at the end of each row. Rows longer than `block_size` lose tokens from the left."""
    ctx = encode(example["ctx"])
    rows, n_end = [], []
    for ending in example["endings"]:
        end = encode(" " + ending)
        row = ctx + end
        if block_size is not None and len(row) > block_size:
            row = row[-block_size:]
        rows.append(row)
        n_end.append(min(len(end), len(row) - 1))  # the first token of a row has no prediction
    return rows, n_end


def ending_losses(model: nn.Module, rows: Sequence[list[int]], n_end: Sequence[int],
                  device: torch.device | None = None,
                  autocast_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed and mean cross-entropy of each row's last `n_end` tokens, both float32 [len(rows)] on CPU.

    Rows are right-padded into one batch; pads sit after every real token, so with causal attention they
    change nothing before them, and the mask keeps them out of the sums.
    """
    device = device or next(model.parameters()).device
    ids, valid = pad_right(list(rows))  # (R, T) each
    lengths = valid.sum(1)  # (R,)
    pos = torch.arange(ids.size(1))[None]  # (1, T)
    scored = (pos >= (lengths - torch.tensor(n_end))[:, None]) & (pos < lengths[:, None])  # (R, T) ending tokens
    # logits at t predict token t+1, so token t is scored from logits t-1; cross-entropy only at the scored
    # positions (about a third), not over the whole (R, T, 50257) block in float32
    sel = scored[:, 1:].to(device)  # (R, T-1)
    with autocast_context(device, autocast_dtype):
        logits = model(ids.to(device))  # (R, T, V)
    token_loss = F.cross_entropy(logits[:, :-1][sel].float(), ids[:, 1:].to(device)[sel], reduction="none")  # (N,)
    row_of = torch.arange(ids.size(0), device=device)[:, None].expand_as(sel)[sel]  # (N,)
    total = torch.zeros(ids.size(0), device=device).index_add_(0, row_of, token_loss).cpu()  # (R,)
    return total, total / torch.tensor(n_end, dtype=torch.float32)


@torch.no_grad()
def hellaswag_eval(model: nn.Module, examples: Sequence[dict], device: torch.device | str | None = None,
                   autocast_dtype: torch.dtype | None = None, batch_size: int = 8, rank: int = 0,
                   world_size: int = 1, progress: bool = False) -> dict[str, float]:
    """Completion-style HellaSwag accuracy: {"acc", "acc_norm", "n"} (see the module docstring).

    `batch_size` examples (4 rows each) go through the model per forward pass. With `world_size` > 1 and
    torch.distributed initialised, each rank scores its share and the counts are summed over ranks.
    """
    core = unwrap(model)
    device = torch.device(device) if device is not None else next(core.parameters()).device
    mine = list(examples)[rank::world_size]
    counts = torch.zeros(3, dtype=torch.float64)  # correct (sum), correct (mean), examples
    was_training = core.training
    core.eval()
    try:
        bar = tqdm(total=len(mine), desc="hellaswag", unit="ex", disable=not progress, dynamic_ncols=True)
        for start in range(0, len(mine), batch_size):
            chunk = mine[start:start + batch_size]
            rows, n_end = [], []
            for ex in chunk:
                r, n = render_example(ex, core.config.block_size)
                rows += r
                n_end += n
            total, mean = ending_losses(core, rows, n_end, device, autocast_dtype)
            labels = torch.tensor([ex["label"] for ex in chunk])
            counts[0] += (total.view(-1, 4).argmin(1) == labels).sum().item()
            counts[1] += (mean.view(-1, 4).argmin(1) == labels).sum().item()
            counts[2] += len(chunk)
            bar.update(len(chunk))
            bar.set_postfix(acc_norm=f"{counts[1].item() / counts[2].item():.4f}")
        bar.close()
    finally:
        core.train(was_training)
    if world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        # gloo and NCCL both support SUM; NCCL needs the tensor on the rank's device
        on_dev = counts.to(device)
        torch.distributed.all_reduce(on_dev)
        counts = on_dev.cpu()
    n = counts[2].item()
    if n == 0:
        raise ValueError("hellaswag_eval: no examples")
    return {"acc": counts[0].item() / n, "acc_norm": counts[1].item() / n, "n": n}
