"""The decoding forward compiled ahead of time for this machine (AOTInductor), cached on disk.

`gpt2.decode.Decoder` runs on this; nothing else does. Design decisions:
- **Pieces between attentions.** Everything that holds weights runs compiled, as flat rows (N, C): the
  position embedding and the first layer's q/k/v projection; then, for each layer, its output projection, MLP and the
  next layer's q/k/v projection (the last layer's ends in the final LayerNorm); then the vocabulary head.
  Attention itself (`CausalSelfAttention.attend`: the cache, SDPA) has no weights and runs as it does eagerly,
  between the pieces, on the decoder's `KVCache`. So prefill, a decoding step and a full forward (echo
  scoring) are the same pieces at any number of rows, and each weight is compiled, packed and held once.
  (A whole-step graph needs separate graphs, each with its own packed copy of every weight, for one token and
  for many, and for one row and for several.)
- **One row's head is a plain product.** The tied embedding is kept once more, transposed (C, V), beside the
  pieces (`head.pt`): one row's logits are `h @ W` on it, which BLAS runs as a matrix-vector product that
  streams the head faster than the packed head piece, while from two rows on the piece is faster (measured in
  docs/compiled_decoding.md). Token embeddings are read from the same matrix, so the embeddings piece holds no
  copy of it and the weights stay held once.
- **Ahead of time, in another process, cached.** Each piece is exported (`torch.export`, any number of rows)
  and compiled by AOTInductor with frozen weights (which lets it pre-pack them for its GEMMs) and autotuned
  between inductor's C++ GEMM and ATen's, keeping whichever measures faster on this CPU. Compiling holds
  several copies of the weights at once, so it runs in a child process at a lower priority, which dies with
  its parent; the decoding process only loads the packages. The cache (`gpt2.decode.compile_cache`: checksummed,
  locked, bounded) is keyed by a hash of the weights, the config, the torch version and the CPU's model and
  flags, so a later start with the same weights loads the pieces in seconds.
- **Never waited for.** `BackgroundCompile` does all of that in a thread while the caller decodes eagerly;
  the decoder switches to the loaded pieces between two steps (`Decoder.compile_in_background`).
- **Weights once.** Packages keep their weights in a separate blob, read once into memory (in the shared
  library they would be both mapped and copied). A decoder made with `release_weights=True` (what `gpt2
  chat`, `gpt2 serve` and `gpt2 generate --compile` do) empties the model (`model.to("meta")`) before loading
  them: the pieces then hold the only copy, and the model object keeps its config and weightless attention.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import hashlib
import json
import logging
import os
import platform
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn as nn

from gpt2.decode import compile_cache as cc
from gpt2.errors import UserError
from gpt2.model import GPT, Block, additive_mask

log = logging.getLogger(__name__)  # where the commands' lines come from: progress, the unfinished build

FORMAT = 4  # bump when the pieces change: old cache entries are then never matched
_INDUCTOR_OPTIONS = {
    "freezing": True,  # weights are constants: the GEMMs may pre-pack them
    "max_autotune": True,
    "max_autotune_gemm_backends": "CPP,ATEN",  # inductor's C++ GEMM or ATen's, whichever measures faster here
    "aot_inductor.package_constants_in_so": False,  # weights in a blob read once, not also mapped with the .so
    "aot_inductor.package_constants_on_disk_format": "binary_blob",
}


# ---------------------------------------------------------------------------------------------- the pieces


class _Embed(nn.Module):
    """token embeddings (N, C), positions (N,) -> the residual stream x (N, C) and the first layer's q/k/v
    (N, 3C). (The token embeddings are looked up outside, in `head.pt`'s copy of the tied matrix.)"""

    def __init__(self, model: GPT):
        super().__init__()
        self.wpe, self.first = model.transformer.wpe, model.transformer.h[0]

    def forward(self, tok_emb: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = tok_emb + self.wpe(pos)  # (N, C)
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
    """Inputs of `EXAMPLE_ROWS` rows for piece i. The compiled GEMMs are tuned for that many and run any number;
    why 8 (as fast as fewer at one and two rows, faster at 8 and 16): docs/compiled_decoding.md."""
    device = model.lm_head.weight.device
    x = torch.zeros(EXAMPLE_ROWS, model.config.n_embd, device=device, dtype=model.lm_head.weight.dtype)
    if i == 0:
        return x, torch.zeros(EXAMPLE_ROWS, dtype=torch.long, device=device)
    return (x,) if i == n_pieces - 1 else (x, x.clone())


HEAD_FILE = "head.pt"


def head_matrix(model: GPT) -> torch.Tensor:
    """The tied embedding transposed, (C, V) without the padding rows: the head as `h @ W`, which CPU BLAS runs
    faster than `h @ W.T` for the few rows of decoding (see `Decoder`)."""
    with torch.no_grad():
        return model.transformer.wte.weight[: model.config.vocab_size].t().contiguous()


# ---------------------------------------------------------------------------------------------- building


def build(model: GPT, directory: Path, progress: Callable[[str], None] = print) -> None:
    """Compile every piece of `model` into `directory` (piece-NN.pt2), in this process."""
    import torch._inductor  # here: importing inductor takes seconds, and a cached start needs only its loader

    directory.mkdir(parents=True, exist_ok=True)
    torch.save(head_matrix(model), directory / HEAD_FILE)
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


class _Builds:
    """This process's builds in progress: their folders and compiler children, so that an exit stops and removes
    them all (including one still writing the weights for its child), and no build starts once exit has begun."""

    def __init__(self):
        self.lock = threading.Lock()
        self.exiting = False
        self.folders: dict[Path, subprocess.Popen | None] = {}
        self.threads: list[threading.Thread] = []  # `BackgroundCompile` threads, joined at exit

    def add(self, folder: Path, child: subprocess.Popen | None = None) -> None:
        with self.lock:
            if self.exiting:
                raise RuntimeError("the process is exiting")
            self.folders[folder] = child

    def remove(self, folder: Path) -> None:
        with self.lock:
            self.folders.pop(folder, None)

    def stop_all(self) -> None:
        """At exit (a finished command, Ctrl+C, SIGTERM in `gpt2 serve`): builds still running are stopped and
        their folders removed; nothing half-built stays behind."""
        with self.lock:
            self.exiting = True
            running = list(self.folders.items())
        if running:
            log.warning("note: the compile running in the background was stopped unfinished (nothing cached); "
                        "`gpt2 cache build --model MODEL` compiles a model ahead of time")
        for folder, child in running:
            if child is not None:
                _stop_child(child)
            shutil.rmtree(folder, ignore_errors=True)
        # a thread still in native code (writing the weights, loading pieces) when the interpreter tears down
        # aborts the process ("terminate called without an active exception"): let each finish, it is seconds
        for thread in self.threads:
            thread.join(timeout=60)
        for folder, _ in running:  # anything such a thread wrote after the first removal
            shutil.rmtree(folder, ignore_errors=True)


_builds = _Builds()
atexit.register(_builds.stop_all)


def build_in_child(model: GPT, directory: Path, progress: Callable[[str], None], label: str = "") -> None:
    """`build` in a child process (compiling holds several copies of the weights: see the module docstring),
    into a build folder renamed to `directory`, with its manifest, when every piece is there (the caller holds
    the entry's lock: `gpt2.decode.compile_cache`). The child reads the weights from a checkpoint written for
    it, runs at a lower priority than decoding, and dies with this process: it removes the build folder and its
    own compiler processes when this process ends, however it ends, and when it is sent SIGTERM."""
    work = cc.build_folder(directory.parent, directory.name)
    child = None
    try:
        _builds.add(work)
        model.save_pretrained(work / "weights")
        dtype = str(model.lm_head.weight.dtype).removeprefix("torch.")
        cmd = [sys.executable, "-m", "gpt2.decode.compiled", str(work / "weights"), str(work / "pieces"), dtype,
               "--parent", str(os.getpid()), "--work", str(work)]
        lines: list[str] = []
        with _builds.lock:  # not once exit has begun: nothing would stop the child
            if _builds.exiting:
                raise RuntimeError("the process is exiting")
            child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                                     start_new_session=True)  # Ctrl+C reaches this process only, which stops it
            _builds.folders[work] = child
        for line in child.stdout:  # progress as it comes; the rest (inductor's autotuning log) is kept for errors
            lines.append(line.rstrip())
            if line.startswith("  piece"):
                progress(line.rstrip())
        if child.wait() != 0:
            raise RuntimeError(next((ln for ln in reversed(lines) if ln.strip()), f"exit {child.returncode}"))
        shutil.rmtree(work / "weights")
        cc.write_manifest(work / "pieces", {"format": FORMAT, "model": label, "params": model.num_params(),
                                            "pieces": len(pieces(model)), "torch": torch.__version__})
        os.replace(work / "pieces", directory)
    finally:
        if child is not None:
            _stop_child(child)
        _builds.remove(work)
        shutil.rmtree(work, ignore_errors=True)


def _stop_child(child: subprocess.Popen) -> None:
    """End a compiler child and its compiler processes (SIGTERM: it cleans up; SIGKILL if it does not)."""
    if child.poll() is not None:
        return
    child.terminate()
    try:
        child.wait(timeout=10)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(OSError):
            os.killpg(child.pid, signal.SIGKILL)
        child.wait()


@contextlib.contextmanager
def prepared(model: GPT, progress: Callable[[str], None], build: bool = True,
             label: str = "") -> Iterator[Path | None]:
    """The verified cache entry of `model`'s pieces, built first if it is absent or damaged (None when it is not
    cached and `build` is False), with the entry's lock held until the block ends (so no other process evicts
    or rebuilds it while it is loaded). Raises `CacheUnavailable` where the cache folder cannot be written."""
    root, key = cc.check_settings(), cache_key(model)
    directory, lock = root / key, cc.Lock(root, key)
    try:
        root.mkdir(parents=True, exist_ok=True)
        if not os.access(root, os.W_OK):
            raise PermissionError(f"not writable: {root}")
        cc.remove_leftovers(root)
        taken = lock.acquire(on_wait=lambda: progress("another process is compiling this model; waiting for it"),
                             give_up=lambda: _builds.exiting)
    except OSError as e:
        raise CacheUnavailable(f"the compile cache {root} cannot be used ({e.strerror or e})") from e
    if not taken:
        raise RuntimeError("the process is exiting")
    try:
        damage = cc.verify(directory) if directory.exists() else None
        if damage is not None:
            progress(f"the compiled pieces in {directory} are damaged ({damage}); compiling them again")
            shutil.rmtree(directory)
        if not directory.exists():
            if not build:
                yield None
                return
            progress(f"compiling the model's {len(pieces(model))} pieces for this CPU into {directory} (once per "
                     "model, torch and CPU: later starts load them in seconds)")
            build_in_child(model, directory, progress, label)
            cc.evict(root, keep=directory.name)
        cc.touch(directory)
        yield directory
    finally:
        lock.release()


class CacheUnavailable(OSError):
    """The compile cache's folder cannot be created or written."""


# ---------------------------------------------------------------------------------------------- running


class CompiledForward:
    """The loaded pieces of one model; `hidden_states` and `logits` mirror `GPT.hidden_states` and `GPT.logits`."""

    def __init__(self, directory: Path, n_pieces: int):
        import torch._inductor  # a second to import: here, so that importing gpt2.decode stays quick

        # the head matrix and then the largest piece (the head) first: loading a piece briefly holds its weights
        # twice, and this way that happens while little else is loaded
        self.head = torch.load(directory / HEAD_FILE, weights_only=True)  # (C, V)
        paths = [directory / f"piece-{i:02d}.pt2" for i in range(n_pieces)]
        loaded = {p: torch._inductor.aoti_load_package(str(p)) for p in sorted(paths, key=lambda p: -p.stat().st_size)}
        self._pieces = [loaded[p] for p in paths]

    def hidden_states(self, model: GPT, idx: torch.Tensor, position_ids: torch.Tensor | None = None,
                      attn_mask: torch.Tensor | None = None, cache=None) -> torch.Tensor:
        """`model.hidden_states` through the pieces: (B, T) ids -> (B, T, C). `model` lends its attention only."""
        B, T = idx.shape
        if position_ids is None:
            position_ids = torch.arange(T, device=idx.device)[None]  # (1, T)
        tok_emb = torch.nn.functional.embedding(idx.reshape(-1), self.head.t())  # (N, C)
        x, qkv = self._pieces[0](tok_emb, position_ids.expand(B, T).reshape(-1))  # (N, C), (N, 3C)
        attn_mask = additive_mask(attn_mask, x.dtype)
        for i, block in enumerate(model.transformer.h):
            y = block.attn.attend(qkv.view(B, T, -1), attn_mask, cache)  # (B, T, C)
            x, qkv = self._pieces[i + 1](x, y.view(B * T, -1))
        return qkv.view(B, T, -1)  # the last piece's second output is the final LayerNorm's

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits (..., V) of hidden states (..., C)."""
        flat = hidden.reshape(-1, hidden.size(-1)).contiguous()
        logits = flat @ self.head if flat.size(0) == 1 else self._pieces[-1](flat)  # (N, V)
        return logits.view(*hidden.shape[:-1], -1)


def load(model: GPT, release_weights: bool = False, progress: Callable[[str], None] = log.info,
         label: str = "") -> CompiledForward:
    """The compiled pieces of `model` from the cache, compiled first (in a child process) if they are not there.
    With `release_weights`, the model is emptied (its weights go to the meta device) before the pieces load."""
    n = len(pieces(model))
    with prepared(model, progress, label=label) as directory:
        if not release_weights:
            return CompiledForward(directory, n)
        model.to("meta")
        return _load_released(directory, n)


def _load_released(directory: Path, n: int) -> CompiledForward:
    try:
        return CompiledForward(directory, n)
    except Exception as e:  # the weights are gone from the model: no eager fallback, so say what to do
        raise UserError(f"could not load the compiled pieces in {directory} ({one_line(e)}); delete that folder "
                        "(gpt2 cache remove) to compile them again, or pass --no-compile") from e


def one_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


class BackgroundCompile:
    """A model's compiled pieces made ready in a thread of this process while the caller decodes eagerly: the
    cache entry is waited for (another process building it), verified, built in the child if absent (`build`),
    then loaded. `forward` is the loaded `CompiledForward` once `state` is "ready"; `status()` says how far it
    is (for `/health`). The thread only prepares: the decoder switches to the pieces itself, between steps."""

    def __init__(self, model: GPT, build: bool = True, label: str = "",
                 progress: Callable[[str], None] = log.info):
        self.n_pieces = len(pieces(model))
        self.state = "starting"  # starting, waiting, compiling, loading, ready, not cached, failed
        self.pieces_done = 0
        self.built = False
        self.child_peak_mb: int | None = None  # the compiler child's peak memory, from its last line
        self.error: str | None = None
        self.forward: CompiledForward | None = None
        self.started = time.monotonic()
        self.seconds = 0.0  # until ready (or failed)
        self.load_seconds = 0.0
        self._say = progress
        cc.check_settings()  # here, in the caller's thread: a bad setting is the command's one-line error
        self._thread = threading.Thread(target=self._run, args=(model, build, label), name="gpt2-compile",
                                        daemon=True)
        _builds.threads.append(self._thread)
        self._thread.start()

    @property
    def done(self) -> bool:
        return self.state in ("ready", "not cached", "failed")

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the thread has finished (for tests and benchmarks); returns whether it has."""
        self._thread.join(timeout)
        return self.done

    def status(self) -> dict:
        out = {"state": self.state, "pieces": self.n_pieces, "pieces_compiled": self.pieces_done,
               "seconds": round(self.seconds if self.done else time.monotonic() - self.started, 1)}
        if self.error:
            out["error"] = self.error
        return out

    def _progress(self, line: str) -> None:
        if line.startswith("  piece "):  # "  piece 3/14 compiled in 12 s"
            self.pieces_done += 1
        elif line.startswith("  pieces compiled"):  # "... the compiling process's peak memory was 1515 MB"
            words = line.split()  # a line of another shape is only not reported, never a failed build
            self.child_peak_mb = int(words[-2]) if len(words) > 1 and words[-2].isdigit() else None
        elif line.startswith("another process"):
            self.state = "waiting"
            self._say(line)
        elif line.startswith(("compiling", "the compiled pieces")):
            self.state, self.built = "compiling", True
            self._say(line + "; decoding eagerly until they are ready")

    def _run(self, model: GPT, build: bool, label: str) -> None:
        try:
            with prepared(model, self._progress, build=build, label=label) as directory:
                if directory is None:
                    self.state = "not cached"
                    return
                self.state, t0 = "loading", time.monotonic()
                self.forward = CompiledForward(directory, self.n_pieces)
                self.load_seconds = time.monotonic() - t0
            self.state = "ready"
        except Exception as e:  # no C++ compiler, a full disk, an unwritable cache...: decoding stays eager
            self.error = f"{type(e).__name__}: {one_line(e)}"
            self.state = "failed"
        finally:
            self.seconds = time.monotonic() - self.started


def _die_with_parent(parent: int, work: Path) -> None:
    """In the compiler child: when the parent process is gone (however it ended) or SIGTERM comes, remove the
    build folder and end this process group (the child and inductor's compiler processes)."""
    def end(*_args) -> None:
        shutil.rmtree(work, ignore_errors=True)
        if hasattr(os, "killpg"):
            os.killpg(os.getpgid(0), signal.SIGKILL)
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.2)
        end()

    signal.signal(signal.SIGTERM, end)
    threading.Thread(target=watch, daemon=True).start()


def main(argv: list[str] | None = None) -> None:
    """The child of `build_in_child`: compile a checkpoint's pieces into a folder."""
    parser = argparse.ArgumentParser(prog="python -m gpt2.decode.compiled", description=main.__doc__)
    parser.add_argument("checkpoint", help="a checkpoint folder (GPT.save_pretrained)")
    parser.add_argument("out", help="the folder for the compiled pieces")
    parser.add_argument("dtype", help="the model's dtype, e.g. float32")
    parser.add_argument("--parent", type=int, help="end (and remove --work) when this process is gone")
    parser.add_argument("--work", help="the build folder to remove when ending early")
    args = parser.parse_args(argv)
    if args.parent:
        _die_with_parent(args.parent, Path(args.work))
    with contextlib.suppress(OSError, AttributeError):
        os.nice(10)  # decoding (eager, meanwhile) goes first on a busy machine
    model = GPT.from_pretrained(args.checkpoint).to(getattr(torch, args.dtype)).eval()
    build(model, Path(args.out), progress=lambda line: print(line, flush=True))
    status = Path("/proc/self/status")
    peak = next((ln.split()[1] for ln in status.read_text().splitlines() if ln.startswith("VmHWM:")), None) \
        if status.exists() else None
    if peak:  # compiling's memory, for whoever wonders why it runs apart from decoding
        print(f"  pieces compiled; the compiling process's peak memory was {int(peak) // 1024} MB", flush=True)


if __name__ == "__main__":
    main()
