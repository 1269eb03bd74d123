"""Training checkpoints: atomic save/load of the full training state, RNG capture, and `load_model`.

Design decisions:
- A run directory holds `checkpoint.pt` (everything needed to continue exactly: model, optimizer, step, each
  rank's data position and RNG states, configs) and `model/` (the same weights in Hugging Face format, which
  is what every other command loads).
- Files are written with `gpt2.io.save_torch` (temp file, fsync, rename: a crash, a SIGKILL or a full disk
  mid-write leaves the previous checkpoint intact rather than half a file) and carry a sha256 trailer that
  `load_checkpoint` verifies, so a corrupted file is an error rather than weights that load and talk nonsense.
- Exact resume needs every source of randomness: Python's `random`, NumPy's global generator, torch's CPU
  generator and, when present, the CUDA generator of this process's device.
"""

from __future__ import annotations

import os
import random
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gpt2.distributed import pick_device
from gpt2.errors import UserError
from gpt2.io import load_torch, save_torch
from gpt2.model import GPT, GPTConfig
from gpt2.tokenizer import VOCAB_SIZE

CHECKPOINT_FILE = "checkpoint.pt"
MODEL_DIR = "model"


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> Path:
    """`torch.save` atomically, with a checksum (`gpt2.io.save_torch`); a full disk is a UserError."""
    path = Path(path)
    save_torch(state, path)
    return path


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """The dict written by `save_checkpoint`, on CPU. Bad or missing files raise UserError naming them."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_FILE
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    try:
        # Our own file, holding NumPy RNG state and plain dicts: not loadable with weights_only.
        return load_torch(path, weights_only=False)
    except UserError:
        raise
    except Exception as e:
        first_line = (str(e).strip().splitlines() or [""])[0]
        raise UserError(f"cannot read checkpoint {path}: {type(e).__name__}: {first_line}") from e


def capture_rng_state(device: torch.device | None = None) -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng_state(state: dict[str, Any], device: torch.device | None = None) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def load_model(path: str | os.PathLike, device: str | torch.device | None = None,
               dtype: torch.dtype | None = None, reads_text: str | None = None):
    """A `GPT` from a training run directory (its `model/` export), a `checkpoint.pt` file, a Hugging Face
    checkpoint directory, or a hub name such as "gpt2"; moved to `device` ("auto" or a name as `--device`
    takes it) and its weights cast to `dtype` when given. The one model loader of every command.
    reads_text: the flag that named the model, when it will read text through the GPT-2 tokenizer: a model
    with a smaller vocabulary is refused in one line (`check_vocab`) rather than failing in its embedding."""
    p = Path(path)
    if p.is_dir() and (p / MODEL_DIR / "config.json").is_file():
        model = GPT.from_pretrained(p / MODEL_DIR)
    elif p.is_file():
        state = load_checkpoint(p)
        if "model_config" not in state:
            raise UserError(f"{p} holds no model config: not a checkpoint of a GPT training run")
        model = GPT(GPTConfig(**state["model_config"]))
        try:
            model.load_state_dict(state["model"])
        except RuntimeError as e:
            raise UserError(f"{p}: weights do not match its model config: {str(e).splitlines()[0]}") from e
    else:
        model = GPT.from_pretrained(path)
    if reads_text is not None:
        check_vocab(model, VOCAB_SIZE, f"{reads_text} {path}", "the GPT-2 tokenizer")
    if isinstance(device, str):
        device = pick_device(device)
    return model.to(device=device, dtype=dtype)


def check_vocab(model: Any, vocab_size: int, name: str, source: str) -> None:
    """`model` (called `name` in the message: a flag and its value) is about to read token ids below
    `vocab_size`, from `source`: a model with fewer ids was trained with another tokenizer or vocabulary, and
    would fail deep inside its embedding. The one check of every command that feeds one model's ids to another
    model, or the tokenizer's to a model."""
    own = model.config.vocab_size
    if own < vocab_size:
        raise UserError(f"{name} has a vocabulary of {own} tokens but reads the token ids of {source} "
                        f"({vocab_size} tokens): was it trained with another tokenizer?")


def check_ids_fit(model: Any, highest: int, name: str, source: str) -> None:
    """`model` (called `name`: a flag and its value) is about to read prepared token ids up to `highest` from
    `source` (a file): data made for a larger vocabulary would fail deep inside the model's embedding. The
    check of every command that trains on prepared token ids, as `check_vocab` is for the tokenizer's."""
    own = model.config.vocab_size
    if highest >= own:
        raise UserError(f"{name} has a vocabulary of {own} tokens but {source} holds token id {highest}: was the "
                        "model trained, or the data prepared, with another tokenizer?")


def state_to_cpu(obj: Any, _memo: dict | None = None) -> Any:
    """A copy of a nest of dicts/lists/tuples whose tensors are detached copies in host memory, so that it can
    be written while training goes on changing the originals. Tensors sharing memory (tied weights) stay
    shared in the copy, as `torch.save` expects."""
    memo = {} if _memo is None else _memo
    if isinstance(obj, torch.Tensor):
        key = (obj.device, obj.untyped_storage().data_ptr(), obj.storage_offset(), tuple(obj.shape),
               obj.stride(), obj.dtype)
        if key not in memo:
            memo[key] = obj.detach().to("cpu", copy=True)
        return memo[key]
    if isinstance(obj, dict):
        return {k: state_to_cpu(v, memo) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(state_to_cpu(v, memo) for v in obj)
    return obj


class BackgroundWriter:
    """Runs write jobs one at a time on a background thread, so the training loop waits only for the state's
    copy to host memory, not for the disk. `submit` first waits for the previous job; `wait` joins and
    re-raises a job's exception in the caller. As a context manager it waits on exit; when the block is
    already failing, a write error is printed rather than raised over the original exception."""

    def __init__(self):
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def _run(self, job) -> None:
        try:
            job()
        except BaseException as e:  # re-raised in the training thread by wait()
            self._error = e

    def submit(self, job) -> None:
        self.wait()
        self._thread = threading.Thread(target=self._run, args=(job,), name="checkpoint-writer", daemon=True)
        self._thread.start()

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def __enter__(self) -> BackgroundWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.wait()
            return
        try:
            self.wait()
        except BaseException as e:
            print(f"warning: a background checkpoint write also failed: {type(e).__name__}: {e}", file=sys.stderr)
