"""The decoding forward compiled ahead of time for this machine (AOTInductor), cached on disk.

`gpt2.decoder.Decoder(model, compile=True)` runs on this; nothing else does. Design decisions:
- **Pieces between attentions.** Everything that holds weights runs compiled, as flat rows (N, C): the
  embeddings and the first layer's q/k/v projection; then, for each layer, its output projection, MLP and the
  next layer's q/k/v projection (the last layer's ends in the final LayerNorm); then the vocabulary head.
  Attention itself (`CausalSelfAttention.attend`: the cache, SDPA) has no weights and runs as it does eagerly,
  between the pieces, on the decoder's `KVCache`. So prefill, a decoding step and a full forward (echo
  scoring) are the same pieces at any number of rows, and each weight is compiled, packed and held once.
  (A whole-step graph needs separate graphs, each with its own packed copy of every weight, for one token and
  for many, and for one row and for several.)
- **Ahead of time, in another process, cached.** Each piece is exported (`torch.export`, any number of rows)
  and compiled by AOTInductor with frozen weights (which lets it pre-pack them for its GEMMs) and autotuned
  between inductor's C++ GEMM and ATen's, keeping whichever measures faster on this CPU. Compiling holds
  several copies of the weights at once, so it runs in a child process; the decoding process only loads
  the packages, and a later start with the same weights, torch and CPU loads them from the cache in seconds.
  The cache key hashes the weights, the config, the torch version and the CPU's model and flags.
- **Weights once.** Packages keep their weights in a separate blob, read once into memory (in the shared
  library they would be both mapped and copied). A decoder made with `release_weights=True` (what `gpt2
  chat`, `gpt2 serve` and `gpt2 generate --compile` do) empties the model (`model.to("meta")`) before loading
  them: the pieces then hold the only copy, and the model object keeps its config and weightless attention.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn

from gpt2.errors import UserError
from gpt2.model import GPT, Block, additive_mask

FORMAT = 3  # bump when the pieces change: old cache entries are then never matched
_INDUCTOR_OPTIONS = {
    "freezing": True,  # weights are constants: the GEMMs may pre-pack them
    "max_autotune": True,
    "max_autotune_gemm_backends": "CPP,ATEN",  # inductor's C++ GEMM or ATen's, whichever measures faster here
    "aot_inductor.package_constants_in_so": False,  # weights in a blob read once, not also mapped with the .so
    "aot_inductor.package_constants_on_disk_format": "binary_blob",
}


# ---------------------------------------------------------------------------------------------- the pieces


class _Embed(nn.Module):
    """tokens, positions (N,) -> the residual stream x (N, C) and the first layer's q/k/v (N, 3C)."""

    def __init__(self, model: GPT):
        super().__init__()
        self.wte, self.wpe, self.first = model.transformer.wte, model.transformer.wpe, model.transformer.h[0]

    def forward(self, tok: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.wte(tok) + self.wpe(pos)  # (N, C)
        return x, self.first.attn.c_attn(self.first.ln_1(x))


class _Between(nn.Module):
    """x (N, C) and a layer's attention output y (N, C) -> the new x and the next layer's q/k/v (N, 3C), or,
    after the last layer, the final LayerNorm's output (N, C)."""

    def __init__(self, block: Block, after: Block | None, ln_f: nn.LayerNorm):
        super().__init__()
        self.block, self.after, self.ln_f = block, after, ln_f

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.block.mlp_residual(x + self.block.attn.c_proj(y))
        if self.after is None:
            return x, self.ln_f(x)
        return x, self.after.attn.c_attn(self.after.ln_1(x))


class _Head(nn.Module):
    """Final hidden states (N, C) -> logits (N, vocab_size)."""

    def __init__(self, model: GPT):
        super().__init__()
        self.model = model

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.logits(hidden)


def pieces(model: GPT) -> list[nn.Module]:
    """The model as its compiled pieces, in the order a forward runs them (see the module docstring)."""
    blocks = list(model.transformer.h)
    between = [_Between(b, a, model.transformer.ln_f) for b, a in zip(blocks, blocks[1:] + [None])]
    return [_Embed(model), *between, _Head(model)]


EXAMPLE_ROWS = 8  # the row count the GEMMs are autotuned and blocked for; any count runs (see `_example`)


def _example(i: int, n_pieces: int, model: GPT) -> tuple[torch.Tensor, ...]:
    """Inputs of `EXAMPLE_ROWS` rows for piece i. The compiled GEMMs are tuned for that many and run any number:
    measured on 124M pieces (AMD EPYC, AVX2, weights read from memory as in a step), tuning for 8 rows was as
    fast as tuning for 3 at one and two rows and 2-7% faster at 8 and 16; tuning for 16 was slower throughout."""
    device = model.lm_head.weight.device
    if i == 0:
        ids = torch.zeros(EXAMPLE_ROWS, dtype=torch.long, device=device)
        return ids, ids.clone()
    x = torch.zeros(EXAMPLE_ROWS, model.config.n_embd, device=device, dtype=model.lm_head.weight.dtype)
    return (x,) if i == n_pieces - 1 else (x, x.clone())


# ---------------------------------------------------------------------------------------------- building


def build(model: GPT, directory: Path, progress: Callable[[str], None] = print) -> None:
    """Compile every piece of `model` into `directory` (piece-NN.pt2), in this process."""
    import torch._inductor  # here: importing inductor takes seconds, and a cached start needs only its loader

    directory.mkdir(parents=True, exist_ok=True)
    parts = pieces(model)
    rows = torch.export.Dim("rows", min=1)
    for i, piece in enumerate(parts):
        t0 = time.perf_counter()
        example = _example(i, len(parts), model)
        with torch.no_grad():
            program = torch.export.export(piece, example, dynamic_shapes=tuple({0: rows} for _ in example))
            torch._inductor.aoti_compile_and_package(program, package_path=str(directory / f"piece-{i:02d}.pt2"),
                                                     inductor_configs=_INDUCTOR_OPTIONS)
        progress(f"  piece {i + 1}/{len(parts)} compiled in {time.perf_counter() - t0:.0f} s")


def cache_root() -> Path:
    """Where compiled pieces are kept: $GPT2_COMPILE_CACHE, else ~/.cache/gpt2-scratch/compiled."""
    env = os.environ.get("GPT2_COMPILE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "gpt2-scratch" / "compiled"


def _cpu_identity() -> str:
    """The CPU's model and feature flags (Linux), else what the platform says: the packages are built for it."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return "\n".join(sorted({ln for ln in lines if ln.startswith(("model name", "flags"))}))
    except OSError:
        return platform.processor() or platform.machine()


def cache_key(model: GPT) -> str:
    """A hash of everything the compiled pieces' outputs depend on: the weights, the config, torch and the CPU.
    The embedding's padding rows are left out: they never reach an output, and a loaded checkpoint has them zero
    where a freshly initialised model has them random."""
    h = hashlib.sha256(json.dumps([FORMAT, torch.__version__, _cpu_identity(), repr(model.config)]).encode())
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t is model.transformer.wte.weight:
            t = t[: model.config.vocab_size]
        h.update(f"{name} {tuple(t.shape)} {t.dtype}".encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().data)
    return h.hexdigest()[:32]


def build_in_child(model: GPT, directory: Path, progress: Callable[[str], None]) -> None:
    """`build` in a child process (compiling holds several copies of the weights: see the module docstring),
    into a temporary folder renamed to `directory` when every piece is there, so a cache entry is whole or
    absent. The child reads the weights from a checkpoint written for it."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=directory.name + ".", dir=directory.parent))
    try:
        model.save_pretrained(work / "weights", tokenizer=False)
        dtype = str(model.lm_head.weight.dtype).removeprefix("torch.")
        cmd = [sys.executable, "-m", "gpt2.compiled", str(work / "weights"), str(work / "pieces"), dtype]
        lines: list[str] = []
        with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1) as child:
            for line in child.stdout:  # progress as it comes; the rest (inductor's autotuning log) is kept for errors
                lines.append(line.rstrip())
                if line.startswith("  piece"):
                    progress(line.rstrip())
        if child.returncode != 0:
            raise RuntimeError(next((ln for ln in reversed(lines) if ln.strip()), f"exit {child.returncode}"))
        shutil.rmtree(work / "weights")
        (work / "pieces" / "done.json").write_text(json.dumps({"pieces": len(pieces(model))}))
        try:
            os.replace(work / "pieces", directory)
        except OSError:  # another process finished the same entry first: theirs serves as well
            if not (directory / "done.json").exists():
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- running


class CompiledForward:
    """The loaded pieces of one model; `hidden_states` and `logits` mirror `GPT.hidden_states` and `GPT.logits`."""

    def __init__(self, directory: Path, n_pieces: int):
        import torch._inductor

        # largest first (the embeddings, the head): loading a piece briefly holds its weights twice, and this way
        # that happens while little else is loaded (124M: peak 1079 -> 960 MB)
        paths = [directory / f"piece-{i:02d}.pt2" for i in range(n_pieces)]
        loaded = {p: torch._inductor.aoti_load_package(str(p)) for p in sorted(paths, key=lambda p: -p.stat().st_size)}
        self._pieces = [loaded[p] for p in paths]

    @staticmethod
    def is_cached(directory: Path) -> bool:
        return (directory / "done.json").exists()

    @staticmethod
    def is_whole(directory: Path, n_pieces: int) -> bool:
        """Every piece is there and readable as a package (a cut-off copy or a disk error is not)."""
        return all(zipfile.is_zipfile(directory / f"piece-{i:02d}.pt2") for i in range(n_pieces))

    def hidden_states(self, model: GPT, idx: torch.Tensor, position_ids: torch.Tensor | None = None,
                      attn_mask: torch.Tensor | None = None, cache=None) -> torch.Tensor:
        """`model.hidden_states` through the pieces: (B, T) ids -> (B, T, C). `model` lends its attention only."""
        B, T = idx.shape
        if position_ids is None:
            position_ids = torch.arange(T, device=idx.device)[None]  # (1, T)
        x, qkv = self._pieces[0](idx.reshape(-1), position_ids.expand(B, T).reshape(-1))  # (N, C), (N, 3C)
        attn_mask = additive_mask(attn_mask, x.dtype)
        for i, block in enumerate(model.transformer.h):
            y = block.attn.attend(qkv.view(B, T, -1), attn_mask, cache)  # (B, T, C)
            x, qkv = self._pieces[i + 1](x, y.view(B * T, -1))
        return qkv.view(B, T, -1)  # the last piece's second output is the final LayerNorm's

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits (..., V) of hidden states (..., C)."""
        flat = hidden.reshape(-1, hidden.size(-1)).contiguous()
        return self._pieces[-1](flat).view(*hidden.shape[:-1], -1)


def load(model: GPT, release_weights: bool = False,
         progress: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True)) -> CompiledForward:
    """The compiled pieces of `model` from the cache, compiled first (in a child process) if they are not there.
    With `release_weights`, the model is emptied (its weights go to the meta device) before the pieces load."""
    directory = cache_root() / cache_key(model)
    n = len(pieces(model))
    if CompiledForward.is_cached(directory) and not CompiledForward.is_whole(directory, n):
        progress(f"the compiled pieces in {directory} are damaged; compiling them again")
        shutil.rmtree(directory, ignore_errors=True)
    if not CompiledForward.is_cached(directory):
        progress(f"compiling the model's {n} pieces for this machine into {directory} (once per model, torch and "
                 "CPU: later starts load them in seconds)")
        build_in_child(model, directory, progress)
    if not release_weights:
        return CompiledForward(directory, n)
    model.to("meta")
    try:
        return CompiledForward(directory, n)
    except Exception as e:  # the weights are gone from the model: no eager fallback, so say what to do
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise UserError(f"could not load the compiled pieces in {directory} ({reason}); delete that folder to "
                        "compile them again, or pass --no-compile") from e


def main(argv: list[str] | None = None) -> None:
    """The child of `build_in_child`: compile a checkpoint's pieces into a folder."""
    parser = argparse.ArgumentParser(prog="python -m gpt2.compiled", description=main.__doc__)
    parser.add_argument("checkpoint", help="a checkpoint folder (GPT.save_pretrained)")
    parser.add_argument("out", help="the folder for the compiled pieces")
    parser.add_argument("dtype", help="the model's dtype, e.g. float32")
    args = parser.parse_args(argv)
    model = GPT.from_pretrained(args.checkpoint).to(getattr(torch, args.dtype)).eval()
    build(model, Path(args.out), progress=lambda line: print(line, flush=True))
    status = Path("/proc/self/status")
    peak = next((ln.split()[1] for ln in status.read_text().splitlines() if ln.startswith("VmHWM:")), None) \
        if status.exists() else None
    if peak:  # compiling's memory, for whoever wonders why it runs apart from decoding
        print(f"  pieces compiled; the compiling process's peak memory was {int(peak) // 1024} MB", flush=True)


if __name__ == "__main__":
    main()
