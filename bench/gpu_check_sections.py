"""bench/gpu_check.py's sections: what each one runs and checks, their sizes, the size check (no GPU work) and
the checks derived from several sections' results. The runner (time boxes, child processes, the budget, the
result files) is bench/gpu_check.py; what each section proves is its docstring.

Each section is one entry of SECTIONS: its name, its expected time and time boxes, and the function that runs it
in a child process (`run(args, work) -> result dict` with at least "ok" and "summary"), or `needs` for a check
computed from other sections' results by `derive`. `args` holds device, dry_run, text (the tinyshakespeare
file) and out (the folder for extra outputs, or None).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMPARED_STEPS = 10  # the first steps whose losses the compile and fp16 checks compare
COMPILE_TOL = 3e-2
# fp16 against bf16, same seed, data and steps: the runs differ only by rounding, and bf16 (8 significand bits
# to fp16's 11) carries nearly all of it: the parity section bounds bf16's effect on the first loss at 1e-2,
# and the compiled-vs-eager check allows 3e-2 for part of the same rounding; the first steps' updates carry
# it on. A lost or doubled update moves the loss by a whole early step's drop, well above this.
FP16_TOL = 5e-2
MEMORY_TOL = 0.15  # the memory plan's goal: within 15% of the real peak
SMALLER_CARD = 78 * 2**30  # bytes a process gets on the smaller card the check runs on (H100 80 GB)


@dataclass(frozen=True)
class Section:
    """One row of SECTIONS. The times are in seconds, the process start included; on a GPU a section is started
    only while its expected time fits what the budget leaves, and is killed at its box."""

    name: str
    expected: int  # seconds expected on a GPU (estimated for one H200, a cold compile cache included)
    box: int  # its time box there
    cpu_box: int  # its time box on the CPU dry run (a shared 2-core machine compiles a tiny model in minutes)
    run: Callable[..., dict] | None = field(default=None, repr=False)  # run(args, work) in a child process
    needs: tuple[str, ...] = ()  # a check computed from these sections' results (no process of its own)
    uses: tuple[str, ...] = ()  # sections whose results this one's check compares with (--only adds them)
    env: tuple[tuple[str, str], ...] = ()  # environment variables its process needs from its start

    def box_for(self, args) -> int:
        return self.cpu_box if args.dry_run else self.box

# ----------------------------------------------------------------------------- sizes and configs


def _torch():
    import torch

    return torch


def model_config(args):
    """The 124M model on CUDA; the tiny preset (GPT-2 vocabulary, 4 x 128) for the CPU dry run."""
    from gpt2.model import PRESETS

    return PRESETS["tiny" if args.dry_run else "gpt2"]


def sizes(args) -> dict:
    """Batch shapes and step counts: the GPU's, or tiny ones for the CPU dry run."""
    if args.dry_run:
        return dict(T=64, micro={32: 2, 64: 4}, timed=3, warm=2, check_steps=4, curve_B=4, curve_steps=40,
                    curve_eval=10, curve_warmup=5, curve_val=16 * 4 * 64, curve_drop=(1.0, 0.3),
                    resume_BT=(4, 64), gen_new=8, gen_batches=[1, 8], parity_BT=(2, 32), matmul=(1024, 3),
                    mem_steps=3)
    return dict(T=1024, micro={32: 32, 64: 64}, timed=30, warm=5, check_steps=10, curve_B=32, curve_steps=120,
                curve_eval=9, curve_warmup=10, curve_val=10**9, curve_drop=(3.0, 2.0),  # val: the whole split
                resume_BT=(4, 256), gen_new=128, gen_batches=[1, 8, 64], parity_BT=(4, 256), matmul=(8192, 50),
                mem_steps=3)  # memory: AdamW's state appears at step 1's end, so step 2 on holds all of it


def prepare_shards(args, work: Path) -> Path:
    """tinyshakespeare -> train/val token shards (last 10% is val), once per call, in `work`."""
    import numpy as np

    from gpt2.data.shards import write_shard

    out = work / "shakespeare"
    if (out / "shakespeare_train_000000.bin").is_file():
        return out
    from gpt2.tokenizer import encode

    text = Path(args.text).read_text(encoding="utf-8")
    tokens = np.array(encode(text), dtype=np.uint16)
    cut = int(len(tokens) * 0.9)
    tmp = work / "shakespeare.tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    write_shard(tmp / "shakespeare_val_000000.bin", tokens[cut:])
    write_shard(tmp / "shakespeare_train_000000.bin", tokens[:cut])
    tmp.rename(out)  # whole or absent: sections may start while another is killed
    return out


def pretrain_config(args, work: Path, out: str, **kw):
    """`gpt2 pretrain`'s config: the 124M preset (tiny on the dry run) on the shakespeare shards, no eval and no
    checkpoint unless asked for."""
    from gpt2.commands.pretrain import PRETRAIN_PRESETS

    base = PRETRAIN_PRESETS["tiny" if args.dry_run else "gpt2-124m"]
    s = sizes(args)
    defaults = dict(data=str(prepare_shards(args, work)), out=str(work / out), device=args.device,
                    seq_len=s["T"], micro_batch=s["micro"][32], global_batch=s["micro"][32] * s["T"],
                    eval_every=0, save_every=0, save_final=False, progress=False, warmup_steps=5,
                    val_tokens=s["micro"][32] * s["T"])
    return replace(base, **{**defaults, **kw})


def speed_config(args, work: Path, micro_key: int, compiled: bool):
    s = sizes(args)
    B, T = s["micro"][micro_key], s["T"]
    return pretrain_config(args, work, f"speed-{micro_key}-{compiled}", micro_batch=B, global_batch=B * T,
                           max_steps=s["warm"] + s["timed"], compile=compiled, dtype="bfloat16")


def fp16_config(args, work: Path):
    """speed-32-eager's run in float16: same seed, data and steps, so its losses compare with that run's."""
    return replace(speed_config(args, work, 32, False), dtype="float16", out=str(work / "fp16"))


def memory_configs(args, work: Path) -> list[tuple[str, object]]:
    """(a label, the config) for micro batch 32 and 64, without and with activation checkpointing: a few eager
    bf16 steps each."""
    steps = sizes(args)["mem_steps"]
    return [(f"b{key}{'+ckpt' if ckpt else ''}",
             replace(speed_config(args, work, key, False), max_steps=steps, warmup_steps=steps,
                     activation_checkpointing=ckpt, out=str(work / f"memory-{key}-{ckpt}")))
            for key in (32, 64) for ckpt in (False, True)]


def memory_plan(cfg, device):
    """The plan the trainer prints before step 1 for `cfg` (the loop's check_memory: its model, micro batch,
    autocast dtype and checkpointing, one process), from the model on the meta device."""
    from gpt2.precision import autocast_dtype
    from gpt2.train.memory import plan_memory

    return plan_memory(_meta_model(cfg.model_config()), cfg.micro_batch, cfg.seq_len,
                       autocast_dtype(cfg.dtype, device), cfg.activation_checkpointing)


def curve_config(args, work: Path):
    s = sizes(args)
    B, T = s["curve_B"], s["T"]
    box = BY_NAME["curve"].box_for(args)
    return pretrain_config(args, work, "curve", micro_batch=B, global_batch=B * T, max_steps=s["curve_steps"],
                           warmup_steps=s["curve_warmup"], eval_every=s["curve_eval"], val_tokens=s["curve_val"],
                           compile=False, dtype="bfloat16", max_minutes=max(0.5, (box - 45) / 60))


def resume_configs(args, work: Path):
    """(straight, straight again, stopped at 4 + resumed): 8 steps, dropout 0.1, accumulation 2, eager."""
    B, T = sizes(args)["resume_BT"]
    kw = dict(max_steps=8, dropout=0.1, micro_batch=B, seq_len=T, global_batch=2 * B * T, compile=False)
    straight = pretrain_config(args, work, "resume-straight", **kw)
    again = pretrain_config(args, work, "resume-again", **kw)
    part = pretrain_config(args, work, "resume-part", stop_at_step=4, save_final=True, **kw)
    return straight, again, part


def torchrun_argv(args, work: Path) -> list[str]:
    """`gpt2 pretrain`'s flags under torchrun: the tiny model, eager, 20 steps, two evaluations and saves."""
    T = min(128, sizes(args)["T"])
    return ["pretrain", "--preset", "tiny", "--data", str(prepare_shards(args, work)), "--out",
            str(work / "torchrun"), "--device", args.device, "--max-steps", "20", "--warmup-steps", "2",
            "--micro-batch", "4", "--seq-len", str(T), "--global-batch", str(4 * T), "--eval-every", "10",
            "--save-every", "10", "--val-tokens", "2048", "--no-compile", "--no-progress"]


def configs_of(name: str, args, work: Path) -> list[tuple[str, object, int]]:
    """The `gpt2 pretrain` configs section `name` runs: (a label, the config, its number of processes)."""
    if name.startswith("speed-") or name == "bare-32":
        micro, compiled = (32, True) if name == "bare-32" else (int(name.split("-")[1]), name.endswith("compiled"))
        return [("", speed_config(args, work, micro, compiled), 1)]
    if name == "curve":
        return [("", curve_config(args, work), 1)]
    if name == "fp16":
        return [("", fp16_config(args, work), 1)]
    if name == "memory":
        return [(f"{label}: ", cfg, 1) for label, cfg in memory_configs(args, work)]
    if name == "resume":
        straight, again, part = resume_configs(args, work)
        return [("straight (twice): ", straight, 1), ("stop at 4 + resume: ", part, 1)]
    if name == "torchrun":
        from gpt2.cli import build_parser
        from gpt2.config import build_config

        ns = build_parser().parse_args(torchrun_argv(args, work))
        return [("", build_config(ns._command.config, ns, ns._command.presets), 1)]
    return []


def train_lines(run_dir: Path) -> list[dict]:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [x for x in lines if x.get("kind") == "train"]


def sync(device) -> None:
    torch = _torch()
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def max_diff(a: list[float], b: list[float]) -> float:
    return max((abs(x - y) for x, y in zip(a, b)), default=float("nan")) if len(a) == len(b) else float("inf")


def device_peak(device) -> tuple[str, float | None, str]:
    """(the card's CUDA name, its dense bf16 peak in TFLOP/s or None, a few words on where it comes from)."""
    torch = _torch()
    from gpt2.train.runtime import peak_entry

    if device.type != "cuda":
        return "cpu", None, "no peak for a CPU"
    name = torch.cuda.get_device_name(device)
    entry = peak_entry(name)
    if entry is None:
        return name, None, f"{name} is not in gpt2.train.runtime's peak table"
    return name, entry[1], f"{entry[0]}: {entry[1]:g} TFLOP/s, {entry[2]}"


# ----------------------------------------------------------------------------- the size check (no GPU work)


def check_sizes(args, work: Path, names: list[str]) -> dict[str, dict]:
    """Each section's data and batch arithmetic at the sizes it will run at, on the CPU and meta tensors: the
    config's own checks, tokens per step and accumulation, train steps per epoch, every val batch one
    evaluation reads, one step's train batches, a forward + backward on the meta device, checkpoint bytes
    against free disk. Returns {section: {"ok", "summary" or "error"}}; a size error shows here, not there."""
    out = {}
    for name in names:
        try:
            out[name] = {"ok": True, "summary": _check_section(name, args, work)}
        except Exception as e:  # reported per section; the others are still checked
            out[name] = {"ok": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
    return out


_META_MODELS: dict[str, object] = {}


def _meta_model(model_cfg):
    """The model on the meta device (shapes only, no memory), one per config."""
    torch = _torch()
    from gpt2.model import GPT

    key = repr(model_cfg)
    if key not in _META_MODELS:
        with torch.device("meta"):
            _META_MODELS[key] = GPT(model_cfg)
    return _META_MODELS[key]


def _meta_step(model_cfg, B: int, T: int) -> None:
    """Forward + backward of one (B, T) micro batch on the meta device: shapes only, no arithmetic."""
    torch = _torch()

    model = _meta_model(model_cfg)
    x = torch.zeros((B, T), dtype=torch.long, device="meta")
    model.loss(x, x).backward()
    model.zero_grad(set_to_none=True)


def _state_bytes(model_cfg) -> tuple[int, int]:
    """(checkpoint bytes: fp32 weights + AdamW's two moments, HF export bytes: fp32 weights), tied once."""
    weights = sum(p.numel() * 4 for p in _meta_model(model_cfg).parameters())
    return 3 * weights, weights


def _check_section(name: str, args, work: Path) -> str:
    torch = _torch()
    from gpt2.distributed import DistInfo
    from gpt2.train.pretrain import PretrainTask, grad_accum_steps

    s = sizes(args)
    block = model_config(args).block_size
    if name == "parity":
        B, T = s["parity_BT"]
        assert T <= block and 12 + s["gen_new"] <= block, f"{T} or 12 + {s['gen_new']} > block {block}"
        return f"logits {B} x {T}; greedy 4 rows x (12 + {s['gen_new']}) <= block {block}"
    if name == "matmul":
        n, reps = s["matmul"]
        return f"{n}^3 bf16 x {reps}: {3 * n * n * 2 / 2**30:.2f} GiB"
    if name == "generate":
        assert 32 + s["gen_new"] <= block
        return f"prompt 32 + {s['gen_new']} new <= block {block}; batches {s['gen_batches']}"
    if name == "compile":
        assert s["check_steps"] <= s["warm"] + s["timed"]
        return f"losses of the first {s['check_steps']} of {s['warm'] + s['timed']} steps compared"
    parts, seen = [], set()
    for label, cfg, world in configs_of(name, args, work):
        cfg.validate()
        accum = grad_accum_steps(cfg.global_batch, cfg.micro_batch, cfg.seq_len, world)
        task = PretrainTask(cfg, DistInfo(0, 0, world, torch.device("meta")))  # raises if the train split is short
        train = task.loader
        steps_epoch = train.steps_per_epoch / accum  # optimizer steps per epoch
        updates, _ = task.step_batches(accum)
        assert all(tuple(x.shape) == (cfg.micro_batch, cfg.seq_len) for x, _ in updates[0])
        text = (f"{label}{cfg.micro_batch} x {cfg.seq_len} x {accum} accum x {world} proc = {cfg.global_batch:,} "
                f"tokens/step; {cfg.max_steps} steps = {cfg.max_steps / steps_epoch:.2f} epochs of "
                f"{train.num_tokens:,} tokens ({steps_epoch:g} steps/epoch)")
        if cfg.eval_every:
            val, val_steps = task.val_loader()
            for _ in range(val_steps):
                val.next_batch()
            text += (f"; val every {cfg.eval_every}: {val_steps} x {val.batch_size} x {cfg.seq_len} of "
                     f"{val.num_windows} windows")
        if (repr(cfg.model_config()), cfg.micro_batch, cfg.seq_len) not in seen:
            seen.add((repr(cfg.model_config()), cfg.micro_batch, cfg.seq_len))
            _meta_step(cfg.model_config(), cfg.micro_batch, cfg.seq_len)
        end = cfg.stop_at_step or cfg.max_steps
        n_saves = len(set(range(cfg.save_every, end + 1, cfg.save_every) if cfg.save_every else [])
                      | ({end} if cfg.save_final else set()))
        if n_saves:
            ckpt, export = _state_bytes(cfg.model_config())
            free = shutil.disk_usage(work).free
            assert free > 2 * (ckpt + export), f"{free / 1e9:.1f} GB free, a save needs {2 * (ckpt + export) / 1e9:.1f}"
            text += f"; {n_saves} save(s) of {ckpt / 1e9:.2f} GB + HF export {export / 1e9:.2f} GB"
        parts.append(text)
    cfg = configs_of(name, args, work)[0][1]
    if name.startswith("speed-") or name == "bare-32":
        vocab = cfg.model_config().padded_vocab_size
        parts.append(f"logits {cfg.micro_batch * cfg.seq_len * vocab * 2 / 2**30:.1f} GiB in bf16")
    if name == "fp16":
        parts.append(f"losses of the first {min(COMPARED_STEPS, cfg.max_steps)} steps (to the first skipped one) "
                     f"against speed-32-eager's within {FP16_TOL:g}")
    if name == "memory":
        parts.append(_check_memory_plans(args, work))
    return "; ".join(parts)


def _check_memory_plans(args, work: Path) -> str:
    """Every memory run's plan must fit the smaller card, or the trainer's own check refuses it there."""
    from gpt2.train.memory import CUDA_RESERVE, GB

    plans = [(label, memory_plan(cfg, _torch().device(args.device))) for label, cfg in memory_configs(args, work)]
    room = SMALLER_CARD - CUDA_RESERVE
    over = [label for label, plan in plans if plan.total > room]
    assert not over, f"plans of {', '.join(over)} exceed {room / GB:.1f} GB"
    return ("plans " + ", ".join(f"{label} {plan.total / GB:.2f}" for label, plan in plans)
            + f" GB, each within {room / GB:.1f} GB (an H100)")


# ----------------------------------------------------------------------------- sections (child processes)


def sec_parity(args, work: Path) -> dict:
    """CUDA vs CPU fp32 logits, bf16 vs fp32 loss, greedy tokens GPU vs CPU."""
    torch = _torch()
    from gpt2.inference import generate
    from gpt2.model import GPT

    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 here; the loop's legacy flags only (torch
    torch.backends.cudnn.allow_tf32 = False  # 2.11 refuses to read them once the newer precision API was used)
    torch.manual_seed(0)
    cpu = GPT(model_config(args)).eval()
    dev = torch.device(args.device)
    gpu = GPT(model_config(args)).eval()
    gpu.load_state_dict(cpu.state_dict())
    gpu.to(dev)
    B, T = sizes(args)["parity_BT"]
    x = torch.randint(0, 50257, (B, T + 1), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = cpu(x[:, :-1])
        got = gpu(x[:, :-1].to(dev)).cpu()
        logits_diff = (ref - got).abs().max().item()
        loss32 = gpu.loss(x[:, :-1].to(dev), x[:, 1:].to(dev)).item()
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            loss16 = gpu.loss(x[:, :-1].to(dev), x[:, 1:].to(dev)).item()
    # greedy generation: right-padded prompts of different lengths, fp32 on both
    ids = torch.randint(0, 50257, (4, 12), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    mask[3, 5:] = 0
    new = sizes(args)["gen_new"]
    tok_cpu = generate(cpu, ids, mask, 0.0, new, eos_id=None)
    tok_gpu = generate(gpu, ids, mask, 0.0, new, eos_id=None)
    same = tok_cpu == tok_gpu
    ok = logits_diff <= 1e-4 and abs(loss16 - loss32) <= 1e-2 and same
    return {"ok": ok, "logits_max_abs_diff": logits_diff, "loss_fp32": loss32, "loss_bf16": loss16,
            "bf16_loss_diff": abs(loss16 - loss32), "greedy_tokens_equal": same,
            "summary": f"logits {logits_diff:.1e} (<=1e-4), bf16 loss {abs(loss16 - loss32):.1e} (<=1e-2), "
                       f"greedy equal {same}"}


def sec_matmul(args, work: Path) -> dict:
    """The bf16 matmul ceiling measured on this device (the MFU denominator that is achievable)."""
    torch = _torch()
    dev = torch.device(args.device)
    n, reps = sizes(args)["matmul"]
    a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync(dev)
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(dev)
    tflops = 2 * n ** 3 * reps / (time.perf_counter() - t0) / 1e12
    name, peak, _ = device_peak(dev)
    of_peak = f", {tflops / peak:.0%} of the datasheet's {peak:g}" if peak else ""
    return {"ok": True, "tflops": tflops, "n": n, "device_name": name, "datasheet_tflops": peak,
            "summary": f"{name}: bf16 {n}^3 matmul {tflops:.3g} TFLOP/s{of_peak}"}


def reset_peak(device) -> None:
    if device.type == "cuda":
        _torch().cuda.reset_peak_memory_stats(device)


def peak_bytes(device) -> int | None:
    """The most bytes tensors held on `device` since reset_peak; None off CUDA (no such count)."""
    return _torch().cuda.max_memory_allocated(device) if device.type == "cuda" else None


def loop_tokens_per_s(lines: list[dict], tokens_per_step: int, warm: int) -> float:
    """Tokens/s over the steps after the first `warm`: the wall time between the first and last timed step's
    log lines, so everything the loop does between steps (logging, fetching, the host sync) counts, unlike the
    per-step tokens_per_s of metrics.jsonl."""
    timed = lines[warm:]
    return tokens_per_step * (len(timed) - 1) / (timed[-1]["time"] - timed[0]["time"])


def save_speed_lines(args, lines: list[dict], config: str) -> None:
    """A run's train lines into speed_metrics.jsonl, each tagged with its config."""
    if args.out:
        with open(Path(args.out) / "speed_metrics.jsonl", "a") as f:
            for x in lines:
                f.write(json.dumps({"config": config, **x}) + "\n")


def sec_speed(args, work: Path, micro_key: int, compiled: bool) -> dict:
    """Tokens/s, MFU and peak memory of the real loop (`gpt2 pretrain`, accumulation 1, bf16, fused AdamW)."""
    torch = _torch()
    from gpt2.commands.pretrain import run
    from gpt2.model import GPT

    s = sizes(args)
    cfg = speed_config(args, work, micro_key, compiled)
    B, T = cfg.micro_batch, cfg.seq_len
    dev = torch.device(args.device)
    reset_peak(dev)
    run(cfg)
    peak_mem = peak_bytes(dev)
    peak_gb = peak_mem / 2**30 if peak_mem is not None else None
    lines = train_lines(Path(cfg.out))
    save_speed_lines(args, lines, f"{B}x{T} compiled={compiled}")
    tps = loop_tokens_per_s(lines, B * T, s["warm"])
    with torch.device("meta"):
        fpt = GPT(cfg.model_config()).flops_per_token(T)
    achieved = tps * fpt / 1e12
    name, peak, peak_text = device_peak(dev)
    mfu = achieved / peak if peak else None
    res = {"ok": True, "micro_batch": B, "seq_len": T, "compiled": compiled, "tokens_per_s": tps,
           "step_s": B * T / tps, "achieved_tflops": achieved, "device_name": name, "datasheet_tflops": peak,
           "peak_source": peak_text, "mfu_datasheet": mfu, "peak_mem_gb": peak_gb, "peak_mem_bytes": peak_mem,
           "timed_steps": len(lines) - s["warm"], "first_step_s": lines[0]["time"],
           "losses": [x["loss"] for x in lines]}
    mem = f", peak {peak_gb:.1f} GB" if peak_gb is not None else ""
    mfu_text = f"MFU {mfu:.1%} of {peak:g}" if mfu is not None else f"MFU unknown ({peak_text})"
    res["summary"] = (f"{B}x{T} {'compiled' if compiled else 'eager'}: {tps:,.0f} tok/s, {achieved:.3g} TFLOP/s, "
                      f"{mfu_text}{mem}, first step {lines[0]['time']:.0f} s")
    return res


def sec_bare(args, work: Path) -> dict:
    """Seconds per step of forward + backward + clip + fused AdamW alone: the loop's own model, loss and
    compile, data already on the device, no logging and one sync at the end (compiled, 32 x T)."""
    torch = _torch()
    from gpt2.model import GPT
    from gpt2.train.loop import TrainConfig, _TaskLoss
    from gpt2.train.optim import build_optimizer

    s = sizes(args)
    cfg = speed_config(args, work, 32, True)
    dev = torch.device(args.device)
    torch.manual_seed(0)
    model = GPT(cfg.model_config()).to(dev)
    opt = build_optimizer(model, TrainConfig(), dev)
    fwd = torch.compile(_TaskLoss(model, lambda m, b: (m.loss(*b), {})))
    x = torch.randint(0, 50257, (cfg.micro_batch, cfg.seq_len + 1), device=dev)
    batch = (x[:, :-1], x[:, 1:])
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # as the loop sets them
        torch.backends.cudnn.allow_tf32 = True
    t0 = 0.0
    for i in range(s["warm"] + s["timed"]):
        if i == s["warm"]:
            sync(dev)
            t0 = time.perf_counter()
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            loss, _ = fwd(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    sync(dev)
    step = (time.perf_counter() - t0) / s["timed"]
    return {"ok": True, "bare_step_s": step, "tokens_per_s": cfg.micro_batch * cfg.seq_len / step,
            "summary": f"{cfg.micro_batch}x{cfg.seq_len} compiled, no loop: {step * 1e3:.1f} ms/step"}


def sec_curve(args, work: Path) -> dict:
    """124M on tinyshakespeare: train and val loss fall far below ln(vocab); see bench/gpu_check.py's docstring."""
    from gpt2.commands.pretrain import run

    s = sizes(args)
    cfg = curve_config(args, work)
    run(cfg)
    run_dir = Path(cfg.out)
    lines = train_lines(run_dir)
    losses = [x["loss"] for x in lines]
    evals = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if '"eval"' in x]
    vals = [(e["step"], e["val_loss"]) for e in evals if "val_loss" in e]
    finite = all(math.isfinite(v) for v in losses + [v for _, v in vals])
    png = loss_png(run_dir)
    if args.out:
        shutil.copy(run_dir / "metrics.jsonl", Path(args.out) / "curve_metrics.jsonl")
        if png is not None:
            shutil.copy(png, Path(args.out) / "loss.png")
    drop_train, drop_val = s["curve_drop"]
    tail = statistics.mean(losses[-5:]) if len(losses) >= 5 else float("nan")
    best_step, best_val = min(vals, key=lambda sv: sv[1]) if vals else (None, float("nan"))
    first_val = vals[0][1] if vals else float("nan")
    # no divergence: no step's loss above the first one's + 0.5 (a loss that climbs past where it started)
    diverged = any(v > losses[0] + 0.5 for v in losses[1:])
    ok = (finite and len(losses) >= 10 and tail < losses[0] - drop_train and best_val < first_val - drop_val
          and not diverged)
    loader_epoch = cfg.global_batch  # tokens a step
    return {"ok": ok, "steps": len(losses), "tokens_per_step": loader_epoch, "first_loss": losses[0],
            "last5_loss": tail, "first_val": first_val, "best_val": best_val, "best_val_step": best_step,
            "last_val": vals[-1][1] if vals else None, "evals": vals, "finite": finite, "diverged": diverged,
            "loss_png": png is not None,
            "criteria": f"mean of the last 5 losses < first - {drop_train}, best val < first val - {drop_val}, "
                        "no loss above the first + 0.5",
            "tokens_per_s": statistics.median(x["tokens_per_s"] for x in lines[1:]) if len(lines) > 1 else None,
            "summary": f"{len(losses)} steps x {loader_epoch:,} tokens: loss {losses[0]:.2f} -> {tail:.2f}, val "
                       f"{first_val:.2f} -> best {best_val:.2f} (step {best_step})"
                       + (f" -> {vals[-1][1]:.2f}" if vals else "")}


def loss_png(run_dir: Path) -> Path | None:
    """The run's loss graph: the loop draws RUN_DIR/loss.png with gpt2.plots at every evaluation; drawn here
    with the same plot_run when it is missing. None without matplotlib (the loop warned in the log): the
    curve's numbers are in curve_metrics.jsonl and results.json either way."""
    png = run_dir / "loss.png"
    if png.is_file():
        return png
    from gpt2.errors import UserError
    from gpt2.plots import plot_run

    try:
        return plot_run(run_dir)
    except (ImportError, UserError, OSError, ValueError) as e:
        print(f"gpu_check: loss.png not drawn: {e}", file=sys.stderr)
        return None


def sec_memory(args, work: Path) -> dict:
    """The memory plan against the real peak at micro batch 32 and 64, without and with activation
    checkpointing (eager, bf16); the compiled peaks are added by derive() from the speed sections."""
    torch = _torch()
    dev = torch.device(args.device)
    rows = [measure_memory(label, cfg, dev) for label, cfg in memory_configs(args, work)]
    savings = checkpointing_savings(rows)
    ratios = [r["ratio"] for r in rows if r["ratio"] is not None]
    within = sum(bool(r["within"]) for r in rows)
    errors = [f"{r['label']}: {r['error']}" for r in rows if "error" in r]
    if ratios:
        measured = ", ".join(f"{r['label']} {r['plan_bytes'] / 1e9:.2f}/{r['real_bytes'] / 1e9:.2f} ({r['ratio']:.2f})"
                             for r in rows if r["ratio"] is not None)
        text = f"eager bf16, plan/real GB: {measured}; plan within {MEMORY_TOL:.0%}: {within}/{len(ratios)}"
    else:
        planned = ", ".join(f"{r['label']} {r['plan_bytes'] / 1e9:.3f}" for r in rows)
        text = f"eager bf16, plan GB (no CUDA peak on {dev.type}): {planned}"
    text += "; checkpointing saves " + ", ".join(
        (f"{x['real']:.0%} (plan {x['plan']:.0%})" if x["real"] is not None else f"{x['plan']:.0%} (plan)")
        + f" at {x['label']}" for x in savings)
    return {"ok": not errors, "compiled": False, "dtype": "bfloat16", "rows": rows, "savings": savings,
            "tolerance": MEMORY_TOL, "plan_within_tolerance": (within == len(ratios)) if ratios else None,
            "summary": text + ("; " + "; ".join(errors) if errors else "")}


def measure_memory(label: str, cfg, device) -> dict:
    """One run's plan and real peak: the most bytes its tensors held on the device, above what was held before
    it started (an earlier run's leftovers). An error (the trainer's plan refusing to start, or out of memory
    inside a step) is a finding for this row, not the end of the section."""
    import gc

    torch = _torch()
    from gpt2.commands.pretrain import run
    from gpt2.errors import UserError

    plan = memory_plan(cfg, device)
    row = {"label": label, "micro_batch": cfg.micro_batch, "checkpointing": cfg.activation_checkpointing,
           "plan_bytes": plan.total, "plan": plan.describe(), "real_bytes": None, "ratio": None, "within": None}
    gc.collect()  # the earlier run's model and optimizer sit in reference cycles
    before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    reset_peak(device)
    try:
        run(cfg)
    except UserError as e:
        row["error"] = str(e).splitlines()[0][:300]
        return row
    peak = peak_bytes(device)
    if peak is not None:
        row["real_bytes"] = peak - before
        row["ratio"] = plan.total / row["real_bytes"]
        row["within"] = abs(row["ratio"] - 1) <= MEMORY_TOL
    return row


def checkpointing_savings(rows: list[dict]) -> list[dict]:
    """For each micro batch: the share of the peak activation checkpointing saves, real (None without a CUDA
    peak) and planned."""
    out = []
    for plain in (r for r in rows if not r["checkpointing"]):
        ckpt = next(r for r in rows if r["checkpointing"] and r["micro_batch"] == plain["micro_batch"])
        real = (1 - ckpt["real_bytes"] / plain["real_bytes"]) if plain["real_bytes"] and ckpt["real_bytes"] else None
        out.append({"label": plain["label"], "micro_batch": plain["micro_batch"], "real": real,
                    "plan": 1 - ckpt["plan_bytes"] / plain["plan_bytes"]})
    return out


def sec_fp16(args, work: Path) -> dict:
    """speed-32-eager's run in float16 with the gradient scaler: skipped steps, the loss scale, tokens/s. Its
    losses are set against speed-32-eager's bf16 ones by derive()."""
    from gpt2.commands.pretrain import run

    cfg = fp16_config(args, work)
    B, T = cfg.micro_batch, cfg.seq_len
    run(cfg)
    lines = train_lines(Path(cfg.out))
    save_speed_lines(args, lines, f"{B}x{T} compiled=False float16")
    losses = [x["loss"] for x in lines]
    skipped_at = [x["step"] for x in lines if x["skipped"]]
    tps = loop_tokens_per_s(lines, B * T, sizes(args)["warm"])
    scale = lines[-1]["loss_scale"]
    # it learns, and the scaler settles: one that overflows on most steps leaves fp16 untrained
    run_ok = all(math.isfinite(v) for v in losses) and losses[-1] < losses[0] and len(skipped_at) < len(lines) / 2
    return {"ok": run_ok, "run_ok": run_ok, "micro_batch": B, "seq_len": T, "compiled": False, "steps": len(lines),
            "losses": losses, "skipped_steps": len(skipped_at), "skipped_at": skipped_at, "loss_scale": scale,
            "tokens_per_s": tps,
            "summary": f"{B}x{T} eager fp16: {tps:,.0f} tok/s, {len(skipped_at)}/{len(lines)} steps skipped, "
                       f"loss scale {scale:g} at the end, loss {losses[0]:.2f} -> {losses[-1]:.2f}"}


def sec_resume(args, work: Path) -> dict:
    """Straight 8 steps (twice) vs stop at 4 + resume: dropout 0.1, accumulation 2, eager, deterministic."""
    import warnings

    torch = _torch()
    from gpt2.commands.pretrain import run

    torch.use_deterministic_algorithms(True, warn_only=True)  # CUBLAS_WORKSPACE_CONFIG: the table's env
    straight, again, part = resume_configs(args, work)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t0 = time.perf_counter()
        run(straight)
        t_straight = time.perf_counter() - t0
        run(again)
        t0 = time.perf_counter()
        run(part)
        t_part = time.perf_counter() - t0
        t0 = time.perf_counter()
        run(replace(part, stop_at_step=None, resume=True, save_final=False))
        t_resumed = time.perf_counter() - t0
    nondet = sorted({str(w.message).split(".")[0][:160] for w in caught if "deterministic" in str(w.message)})
    a, a2 = [x["loss"] for x in train_lines(Path(straight.out))], [x["loss"] for x in train_lines(Path(again.out))]
    b = [x["loss"] for x in train_lines(Path(part.out))]
    spread, diff = max_diff(a, a2), max_diff(a, b)
    ok = diff <= 1e-6 if spread == 0 else diff <= 3 * spread
    rule = "bit-exact runs: <= 1e-6" if spread == 0 else f"runs differ by {spread:.1e}: <= 3x that"
    return {"ok": ok, "bit_exact": a == b, "straight_runs_bit_exact": spread == 0, "spread": spread,
            "max_abs_diff": diff, "straight": a, "again": a2, "resumed": b, "nondeterministic_warnings": nondet,
            "seconds_straight": t_straight, "seconds_part_with_save": t_part, "seconds_resume_with_load": t_resumed,
            "summary": f"stop at 4 of 8 + resume: max diff {diff:.1e} ({rule}), bit-exact {a == b}; "
                       f"save run {t_part:.0f} s, resumed run {t_resumed:.0f} s"
                       + (f"; {len(nondet)} nondeterministic op(s) warned" if nondet else "")}


def sec_torchrun(args, work: Path) -> dict:
    """`torchrun --standalone --nproc_per_node=1 -m gpt2 pretrain`: exit 0 with a checkpoint and metrics. The
    launcher stays in this process's group, so the runner's kill of the section reaches it; torchrun starts its
    workers in sessions of their own and stops them itself on SIGTERM, so SIGTERM goes first, SIGKILL later."""
    out = work / "torchrun"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "-m", "gpt2",
           *torchrun_argv(args, work)]
    limit = BY_NAME["torchrun"].box_for(args) - 15
    t0 = time.perf_counter()
    log_path = work / "torchrun.log"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            rc = proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGTERM)  # torchrun's agent ends its workers on SIGTERM
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            rc = None
    log_text = log_path.read_text(errors="replace")
    if args.out:
        (Path(args.out) / "torchrun.log").write_text(" ".join(cmd) + "\n\n" + log_text)
    lines = train_lines(out) if (out / "metrics.jsonl").is_file() else []
    ok = rc == 0 and len(lines) == 20 and (out / "checkpoint.pt").is_file()
    backend = "nccl" if args.device.startswith("cuda") else "gloo"
    status = f"exit {rc}" if rc is not None else f"stopped after {limit} s (SIGTERM, then SIGKILL)"
    return {"ok": ok, "returncode": rc, "steps": len(lines), "seconds": time.perf_counter() - t0,
            "backend": backend, "log_tail": log_text[-2000:],
            "summary": (f"{backend}, 1 process (launcher and env path, no collective): {status}, {len(lines)}/20 "
                        f"steps" + (f", loss {lines[0]['loss']:.2f} -> {lines[-1]['loss']:.2f}" if lines else ""))}


def sec_generate(args, work: Path) -> dict:
    """Greedy tokens/s of `gpt2.inference.generate` vs transformers `generate`, same weights, fp32."""
    torch = _torch()
    from gpt2.inference import generate
    from gpt2.model import GPT

    dev = torch.device(args.device)
    torch.manual_seed(0)
    ours = GPT(model_config(args)).eval()
    try:
        import transformers

        d = work / "hf"
        ours.save_pretrained(d)
        hf = transformers.GPT2LMHeadModel.from_pretrained(d).eval().to(dev)
    except ImportError:
        hf = None
    ours.to(dev)
    s, rows, prompt = sizes(args), [], 32
    for B in s["gen_batches"]:
        ids = torch.randint(0, 50257, (B, prompt), generator=torch.Generator().manual_seed(B))
        mask = torch.ones_like(ids)
        n = B * s["gen_new"]

        def timed(fn, n=n):
            fn()  # warm-up
            sync(dev)
            t0 = time.perf_counter()
            out = fn()
            sync(dev)
            return n / (time.perf_counter() - t0), out

        ours_tps, tok_ours = timed(lambda ids=ids, mask=mask: generate(ours, ids, mask, 0.0, s["gen_new"],
                                                                       eos_id=None))
        row = {"batch": B, "ours_tokens_per_s": ours_tps}
        if hf is not None:
            def run_hf(ids=ids, mask=mask):
                with torch.no_grad():
                    out = hf.generate(ids.to(dev), attention_mask=mask.to(dev), max_new_tokens=s["gen_new"],
                                      min_new_tokens=s["gen_new"], do_sample=False, eos_token_id=None,
                                      pad_token_id=0)
                return out[:, prompt:].tolist()
            hf_tps, tok_hf = timed(run_hf)
            row.update(hf_tokens_per_s=hf_tps, ratio=ours_tps / hf_tps, same_tokens=tok_ours == tok_hf)
        rows.append(row)
    text = "; ".join(f"b{r['batch']} {r['ours_tokens_per_s']:,.0f} tok/s"
                     + (f" ({r['ratio']:.2f}x HF)" if "ratio" in r else "") for r in rows)
    return {"ok": True, "rows": rows, "summary": text + ("" if hf is not None else " (no transformers)")}


def derive(results: dict) -> None:
    """The checks computed from other sections' results, redone whenever those change: compiled == eager
    losses, MFU against the measured matmul ceiling, the share of the loop's step outside fwd/bwd/opt, fp16
    against bf16 losses, the memory plan against the compiled peaks."""
    eager, compiled = results.get("speed-32-eager", {}), results.get("speed-32-compiled", {})
    if eager.get("losses") and compiled.get("losses"):
        n = min(len(eager["losses"]), len(compiled["losses"]), COMPARED_STEPS)
        diff = max_diff(eager["losses"][:n], compiled["losses"][:n])
        results["compile"] = {"ok": diff <= COMPILE_TOL, "max_abs_diff": diff, "steps": n, "seconds": 0,
                              "summary": f"{n} steps, max |compiled - eager| loss {diff:.2e} (<= {COMPILE_TOL:g})"}
    ceiling = results.get("matmul", {}).get("tflops")
    for name, res in results.items():
        if name.startswith("speed-") and res.get("ok") and ceiling:
            res["mfu_measured"] = res["achieved_tflops"] / ceiling
            res["summary"] = res["summary"].split(" | ")[0] + f" | {res['mfu_measured']:.1%} of measured {ceiling:.3g}"
    bare, loop = results.get("bare-32", {}), results.get("speed-32-compiled", {})
    if bare.get("ok") and loop.get("ok"):
        bare["outside_fwd_bwd_opt"] = max(0.0, 1 - bare["bare_step_s"] / loop["step_s"])
        bare["summary"] = (bare["summary"].split(" | ")[0] + f" | loop {loop['step_s'] * 1e3:.1f} ms: "
                           f"{bare['outside_fwd_bwd_opt']:.1%} outside fwd/bwd/opt")
    derive_fp16(results)
    derive_memory(results)


def derive_fp16(results: dict) -> None:
    """fp16's losses against speed-32-eager's bf16 ones (same seed, data and steps) over the first steps, up to
    and including the first skipped step: its loss comes before the skip, the next ones a step behind."""
    fp16, bf16 = results.get("fp16", {}), results.get("speed-32-eager", {})
    if "run_ok" not in fp16:
        return
    own = fp16["summary"].split(" | ")[0]
    if not bf16.get("losses"):
        fp16.update(ok=False, summary=own + " | no bf16 losses to compare: speed-32-eager did not run")
        return
    first_skip = fp16["skipped_at"][0] if fp16["skipped_at"] else COMPARED_STEPS  # a 1-based step
    n = min(len(fp16["losses"]), len(bf16["losses"]), COMPARED_STEPS, first_skip)
    diff = max_diff(fp16["losses"][:n], bf16["losses"][:n])
    speed = fp16["tokens_per_s"] / bf16["tokens_per_s"] if bf16.get("tokens_per_s") else None
    fp16.update(ok=fp16["run_ok"] and diff <= FP16_TOL, max_abs_diff_vs_bf16=diff, steps_compared=n,
                tolerance=FP16_TOL, tokens_per_s_vs_bf16=speed)
    fp16["summary"] = (own + f" | first {n} steps: max |fp16 - bf16| loss {diff:.2e} (<= {FP16_TOL:g})"
                       + (f"; {speed:.2f}x bf16's tok/s" if speed else ""))


def derive_memory(results: dict) -> None:
    """The memory section's plans (no checkpointing) against the compiled speed sections' real peaks."""
    mem = results.get("memory", {})
    if not mem.get("rows"):
        return
    plans = {r["micro_batch"]: r["plan_bytes"] for r in mem["rows"] if not r["checkpointing"]}
    compiled = []
    for key in (32, 64):
        speed = results.get(f"speed-{key}-compiled", {})
        if speed.get("ok") and speed.get("peak_mem_bytes") and speed.get("micro_batch") in plans:
            plan, real = plans[speed["micro_batch"]], speed["peak_mem_bytes"]
            compiled.append({"micro_batch": speed["micro_batch"], "plan_bytes": plan, "real_bytes": real,
                             "ratio": plan / real, "within": abs(plan / real - 1) <= MEMORY_TOL})
    mem["compiled_peaks"] = compiled
    mem["summary"] = mem["summary"].split(" | ")[0] + (
        " | compiled plan/real: " + ", ".join(f"b{c['micro_batch']} {c['ratio']:.2f}" for c in compiled)
        if compiled else "")


# ----------------------------------------------------------------------------- the table


SECTIONS = [  # most important first; the order the runner starts them in
    Section("parity", 30, 75, 300, sec_parity),
    Section("matmul", 15, 30, 60, sec_matmul),
    Section("speed-32-compiled", 90, 180, 900, partial(sec_speed, micro_key=32, compiled=True)),
    Section("speed-32-eager", 25, 60, 200, partial(sec_speed, micro_key=32, compiled=False)),
    Section("compile", 0, 0, 0, needs=("speed-32-compiled", "speed-32-eager")),
    Section("curve", 55, 120, 300, sec_curve),
    Section("memory", 35, 90, 300, sec_memory),
    Section("fp16", 25, 60, 200, sec_fp16, uses=("speed-32-eager",)),
    # cuBLAS's deterministic workspace: set before the process's first CUDA call
    Section("resume", 50, 120, 400, sec_resume, env=(("CUBLAS_WORKSPACE_CONFIG", ":4096:8"),)),
    Section("torchrun", 30, 60, 300, sec_torchrun),
    Section("speed-64-compiled", 80, 150, 900, partial(sec_speed, micro_key=64, compiled=True)),
    Section("generate", 40, 75, 300, sec_generate),
    Section("bare-32", 30, 75, 900, sec_bare),
    Section("speed-64-eager", 30, 60, 200, partial(sec_speed, micro_key=64, compiled=False)),
]
BY_NAME = {s.name: s for s in SECTIONS}
