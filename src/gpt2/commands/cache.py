"""`gpt2 cache list|remove|build`: the compiled decoding pieces kept on disk (`gpt2.decode.compile_cache`)."""

from __future__ import annotations

import time
from dataclasses import dataclass

from gpt2.checkpoint import load_model
from gpt2.commands import Command
from gpt2.config import arg
from gpt2.decode import WEIGHTS_DTYPE_HELP, WEIGHTS_DTYPE_METAVAR, load_dtype
from gpt2.decode import compile_cache as cc
from gpt2.decode.compiled import load
from gpt2.errors import UserError


@dataclass
class ListConfig:
    pass


@dataclass
class RemoveConfig:
    keys: list[str] = arg(None, factory=list, positional=True, help="entries to remove (their KEY, as listed)")
    all: bool = arg(False, help="remove every entry")


@dataclass
class BuildConfig:
    model: str = arg("gpt2", help="training run directory, Hugging Face checkpoint directory or hub name")
    weights_dtype: str = arg("float32", help=WEIGHTS_DTYPE_HELP + ", as chat or serve will load them",
                             metavar=WEIGHTS_DTYPE_METAVAR, aliases=("--dtype",))


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


def run_list(cfg: ListConfig) -> list[cc.Entry]:
    root = cc.check_settings()
    found = cc.entries(root)
    print(f"{root}: {len(found)} entries, {_gb(sum(e.bytes for e in found))} (bound: {_gb(cc.max_bytes())}, "
          "$GPT2_COMPILE_CACHE_MAX_GB)")
    for e in reversed(found):  # most recently used first
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(e.created))
        print(f"  {e.key}  {_gb(e.bytes):>9}  built {when}  {e.params / 1e6:.1f}M  {e.model}")
    return found


def run_remove(cfg: RemoveConfig) -> list[str]:
    root = cc.cache_root()
    known = {e.key for e in cc.entries(root)}
    if not cfg.all and not cfg.keys:
        raise UserError("name the entries to remove (KEY as `gpt2 cache list` shows it), or pass --all")
    unknown = [k for k in cfg.keys if k not in known]
    if unknown:
        raise UserError(f"no cache entry {unknown[0]} in {root} (see `gpt2 cache list`)")
    removed = [k for k in (sorted(known) if cfg.all else cfg.keys) if cc.remove(root, k)]
    busy = len(known if cfg.all else cfg.keys) - len(removed)
    print(f"removed {len(removed)} entries" + (f"; {busy} in use by another process kept" if busy else ""))
    return removed


def run_build(cfg: BuildConfig):
    dtype = load_dtype(cfg.weights_dtype)
    if cfg.weights_dtype == "int8":
        raise UserError("--weights-dtype int8: int8 weights are never compiled (they run fbgemm's integer kernels "
                        "as they are), so there is nothing to build; chat and serve quantize them at start")
    model = load_model(cfg.model, "cpu", dtype).eval()
    t0 = time.perf_counter()
    load(model, label=cfg.model, progress=lambda line: print(line, flush=True))
    print(f"compiled pieces of {cfg.model} ready in {time.perf_counter() - t0:.0f} s", flush=True)


COMMANDS = [
    Command("cache list", "list the compiled decoding pieces kept on disk (model, size, date)", ListConfig,
            run_list),
    Command("cache remove", "remove compiled decoding pieces from the disk cache", RemoveConfig, run_remove),
    Command("cache build", "compile a model's decoding pieces for this CPU ahead of time (what chat and serve "
            "otherwise do in the background)", BuildConfig, run_build),
]
