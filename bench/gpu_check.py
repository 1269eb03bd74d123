"""Every GPU check of issue 16 in one call: correctness on CUDA, training speed and MFU, a real loss curve,
generation speed against transformers. Built for one short GPU session (< 8 minutes on one H200).

Each section runs in its own subprocess with its own time box: a failure or a timeout is reported and the
next section runs. The sections, in order (the ones that matter most first):

  parity     124M, random weights: CUDA fp32 logits == CPU fp32 to 1e-4 (TF32 off); bf16 autocast loss within
             1e-2 of fp32; greedy generation on the GPU (fp32) gives the CPU's tokens
  compile    compiled vs eager training losses, 10 steps of the real loop, bf16 (within 1e-2)
  torchrun   `torchrun --nproc_per_node=1 -m gpt2 pretrain`: process group init, train, teardown, exit 0
  resume     stop at step N, resume, == the straight run's losses (dropout on, so the CUDA RNG state counts)
  matmul     the measured bf16 matmul ceiling (8192^3) for MFU
  speed-*    124M preset through the real loop, micro batch 32 and 64 x 1024, eager and compiled, bf16, fused
             AdamW: tokens/s (median of >= 30 timed steps after warm-up), MFU against the measured ceiling and
             against 989 TFLOP/s, peak memory; and (compiled, 32) the same step without the loop (data on the
             GPU, no logging): 1 - bare/loop is the time spent outside forward/backward/optimizer
  generate   `gpt2.inference.generate` tokens/s at batch 1, 8, 64 against transformers `generate`, same weights
  curve      124M on tinyshakespeare for ~2 minutes at the seed's 2^19 tokens/step (64 x 1024 x 8), its
             metrics and loss.png

Data: the GPU machine receives only the repository, so the caller copies the text (and the tokenizer files)
into the ignored folder `.gpu/` first:

    mkdir -p .gpu && cp ../shared/data/tinyshakespeare.txt .gpu/ && cp -r ../shared/tiktoken_cache .gpu/
    PYTHONPATH=src python bench/gpu_check.py                      # on the GPU machine (carry .gpu)
    PYTHONPATH=src python bench/gpu_check.py --dry-run            # here: every section, tiny sizes, CPU

Output: progress and a table printed last; with $OUT set (or --out DIR), at most 7 files there: gpu_check.log
(every section's output), results.json, table.txt, curve_metrics.jsonl, loss.png, speed_metrics.jsonl,
torchrun.log. Needs only torch, numpy, tiktoken, safetensors, tqdm (transformers for `generate`'s baseline and
matplotlib for the PNG are optional: without matplotlib a plain PNG is drawn here).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATASHEET_TFLOPS = 989.0  # H100/H200 SXM dense bf16

# (name, time box in seconds on the GPU, on the CPU dry run)
# (CPU boxes are loose: a shared 2-core machine compiles a tiny model with inductor in minutes.)
SECTIONS = [("parity", 60, 300), ("compile", 110, 600), ("torchrun", 60, 300), ("resume", 50, 400),
            ("matmul", 20, 60), ("speed-32-eager", 35, 200), ("speed-32-compiled", 70, 600),
            ("speed-64-eager", 40, 200), ("speed-64-compiled", 80, 600), ("generate", 50, 300),
            ("curve", 180, 400)]


# ----------------------------------------------------------------------------- helpers used by sections


def _torch():
    import torch

    return torch


def model_config(args):
    """The 124M model on CUDA; the tiny preset (GPT-2 vocabulary, 4 x 128) for the CPU dry run."""
    from gpt2.model import PRESETS

    return PRESETS["tiny" if args.dry_run else "gpt2"]


def sizes(args) -> dict:
    """Batch shapes and step counts: the issue's on CUDA, tiny ones on the CPU dry run."""
    if args.dry_run:
        return dict(T=64, micro={32: 2, 64: 4}, timed=3, warm=2, check_steps=4, curve_accum=2,
                    curve_minutes=0.4, gen_new=8, gen_batches=[1, 8], parity_BT=(2, 32))
    return dict(T=1024, micro={32: 32, 64: 64}, timed=30, warm=5, check_steps=10, curve_accum=8,
                curve_minutes=2.0, gen_new=128, gen_batches=[1, 8, 64], parity_BT=(4, 256))


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
    out.mkdir(parents=True, exist_ok=True)
    write_shard(out / "shakespeare_val_000000.bin", tokens[cut:])
    write_shard(out / "shakespeare_train_000000.bin", tokens[:cut])
    return out


def pretrain_config(args, work: Path, out: str, **kw):
    """`gpt2 pretrain`'s config: the 124M preset (tiny on the dry run) on the shakespeare shards."""
    from gpt2.train.pretrain import PRETRAIN_PRESETS

    base = PRETRAIN_PRESETS["tiny" if args.dry_run else "gpt2-124m"]
    s = sizes(args)
    defaults = dict(data=str(prepare_shards(args, work)), out=str(work / out), device=args.device,
                    seq_len=s["T"], micro_batch=s["micro"][32], global_batch=s["micro"][32] * s["T"],
                    eval_every=0, save_every=0, progress=False, warmup_steps=5, val_tokens=s["micro"][32] * s["T"])
    return replace(base, **{**defaults, **kw})


def train_lines(run_dir: Path) -> list[dict]:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [x for x in lines if x.get("kind") == "train"]


def sync(device) -> None:
    torch = _torch()
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def max_diff(a: list[float], b: list[float]) -> float:
    return max((abs(x - y) for x, y in zip(a, b)), default=float("nan")) if len(a) == len(b) else float("inf")


# ----------------------------------------------------------------------------- sections (child processes)


def sec_parity(args, work: Path) -> dict:
    """CUDA vs CPU fp32 logits, bf16 vs fp32 loss, greedy tokens GPU vs CPU."""
    torch = _torch()
    from gpt2.inference import generate
    from gpt2.model import GPT

    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 here
    torch.backends.cudnn.allow_tf32 = False
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


def sec_compile(args, work: Path) -> dict:
    """Compiled vs eager: the real loop, same data and seed, bf16, `check_steps` steps."""
    from gpt2.train.pretrain import run

    steps = sizes(args)["check_steps"]
    got = {}
    for compiled in (False, True):
        cfg = pretrain_config(args, work, f"compile-{compiled}", max_steps=steps, compile=compiled,
                              dtype="bfloat16")
        run(cfg)
        got[compiled] = [x["loss"] for x in train_lines(Path(cfg.out))]
    diff = max_diff(got[False], got[True])
    return {"ok": diff <= 1e-2, "eager": got[False], "compiled": got[True], "max_abs_diff": diff,
            "summary": f"{steps} steps, max |compiled - eager| {diff:.2e} (<=1e-2)"}


def sec_torchrun(args, work: Path) -> dict:
    """`torchrun --standalone --nproc_per_node=1 -m gpt2 pretrain`: exit 0 with a checkpoint and metrics."""
    data = prepare_shards(args, work)
    out = work / "torchrun"
    s = sizes(args)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "-m", "gpt2",
           "pretrain", "--preset", "tiny", "--data", str(data), "--out", str(out), "--device", args.device,
           "--max-steps", "20", "--warmup-steps", "2", "--micro-batch", "4", "--seq-len", str(min(128, s["T"])),
           "--global-batch", str(4 * min(128, s["T"])), "--eval-every", "10", "--save-every", "10",
           "--val-tokens", "2048", "--no-progress"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    log = proc.stdout + proc.stderr
    if args.out:
        (Path(args.out) / "torchrun.log").write_text(" ".join(cmd) + "\n\n" + log)
    lines = train_lines(out) if (out / "metrics.jsonl").is_file() else []
    ok = proc.returncode == 0 and len(lines) == 20 and (out / "checkpoint.pt").is_file()
    backend = "nccl" if args.device.startswith("cuda") else "gloo"
    return {"ok": ok, "returncode": proc.returncode, "steps": len(lines), "seconds": time.perf_counter() - t0,
            "backend": backend, "log_tail": log[-2000:],
            "summary": f"{backend}: exit {proc.returncode}, {len(lines)}/20 steps, "
                       f"loss {lines[0]['loss']:.2f} -> {lines[-1]['loss']:.2f}" if lines else
                       f"exit {proc.returncode}, no metrics"}


def sec_resume(args, work: Path) -> dict:
    """Straight 8 steps vs stop at 4 + resume, dropout 0.1 (RNG state), accumulation 2."""
    from gpt2.train.pretrain import run

    kw = dict(max_steps=8, dropout=0.1, micro_batch=4, seq_len=min(256, sizes(args)["T"]), save_every=0)
    kw["global_batch"] = 2 * kw["micro_batch"] * kw["seq_len"]
    straight = pretrain_config(args, work, "resume-straight", **kw)
    run(straight)
    part = pretrain_config(args, work, "resume-part", stop_at_step=4, **kw)
    run(part)
    run(replace(part, stop_at_step=None, resume=True))
    a, b = [x["loss"] for x in train_lines(Path(straight.out))], [x["loss"] for x in train_lines(Path(part.out))]
    diff = max_diff(a, b)
    return {"ok": diff <= 1e-6, "bit_exact": a == b, "straight": a, "resumed": b, "max_abs_diff": diff,
            "summary": f"stop at 4 of 8 + resume: bit-exact {a == b}, max diff {diff:.1e}"}


def sec_matmul(args, work: Path) -> dict:
    """The bf16 matmul ceiling measured on this device (the MFU denominator that is achievable)."""
    torch = _torch()
    dev = torch.device(args.device)
    n = 1024 if args.dry_run else 8192
    a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync(dev)
    reps = 3 if args.dry_run else 50
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(dev)
    tflops = 2 * n ** 3 * reps / (time.perf_counter() - t0) / 1e12
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    return {"ok": True, "tflops": tflops, "n": n, "device_name": name,
            "summary": f"{name}: bf16 {n}^3 matmul {tflops:.3g} TFLOP/s"}


def bare_step_time(args, cfg, steps: int, warm: int) -> float:
    """Seconds per step of forward + backward + clip + fused AdamW alone: the loop's own model, loss and
    compile, data already on the device, no logging and one sync at the end."""
    torch = _torch()
    from gpt2.model import GPT
    from gpt2.train.loop import TrainConfig, _TaskLoss, build_optimizer

    dev = torch.device(args.device)
    torch.manual_seed(0)
    model = GPT(cfg.model_config()).to(dev)
    opt = build_optimizer(model, TrainConfig(), dev)
    fwd = torch.compile(_TaskLoss(model, lambda m, b: (m.loss(*b), {})))
    x = torch.randint(0, 50257, (cfg.micro_batch, cfg.seq_len + 1), device=dev)
    batch = (x[:, :-1], x[:, 1:])
    t0 = 0.0
    for i in range(warm + steps):
        if i == warm:
            sync(dev)
            t0 = time.perf_counter()
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            loss, _ = fwd(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    sync(dev)
    return (time.perf_counter() - t0) / steps


def sec_speed(args, work: Path, micro_key: int, compiled: bool) -> dict:
    """Tokens/s, MFU and peak memory of the real loop (`gpt2 pretrain`, accumulation 1, bf16, fused AdamW)."""
    torch = _torch()
    from gpt2.train.pretrain import run

    s = sizes(args)
    B, T = s["micro"][micro_key], s["T"]
    cfg = pretrain_config(args, work, f"speed-{micro_key}-{compiled}", micro_batch=B, global_batch=B * T,
                          max_steps=s["warm"] + s["timed"], compile=compiled, dtype="bfloat16")
    dev = torch.device(args.device)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    run(cfg)
    peak_gb = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None
    lines = train_lines(Path(cfg.out))
    if args.out:
        with open(Path(args.out) / "speed_metrics.jsonl", "a") as f:
            for x in lines:
                f.write(json.dumps({"config": f"{B}x{T} compiled={compiled}", **x}) + "\n")
    timed = lines[s["warm"]:]
    # wall time between the first and last timed step's log lines: everything the loop does between steps
    # (logging, fetching, the host sync) counts, unlike the per-step tokens_per_s of metrics.jsonl
    tps = B * T * (len(timed) - 1) / (timed[-1]["time"] - timed[0]["time"])
    from gpt2.model import GPT

    with torch.device("meta"):
        fpt = GPT(cfg.model_config()).flops_per_token(T)
    achieved = tps * fpt / 1e12
    res = {"ok": True, "micro_batch": B, "seq_len": T, "compiled": compiled, "tokens_per_s": tps,
           "step_s": B * T / tps, "achieved_tflops": achieved, "mfu_datasheet": achieved / DATASHEET_TFLOPS,
           "peak_mem_gb": peak_gb, "timed_steps": len(timed)}
    if compiled and micro_key == 32:
        bare = bare_step_time(args, cfg, s["timed"], s["warm"])
        res["bare_step_s"] = bare
        res["outside_fwd_bwd_opt"] = max(0.0, 1 - bare / res["step_s"])
    mem = f", peak {peak_gb:.1f} GB" if peak_gb is not None else ""
    out = f", outside fwd/bwd/opt {res['outside_fwd_bwd_opt']:.1%}" if "bare_step_s" in res else ""
    res["summary"] = (f"{B}x{T} {'compiled' if compiled else 'eager'}: {tps:,.0f} tok/s, {achieved:.3g} TFLOP/s, "
                      f"MFU {res['mfu_datasheet']:.1%} of {DATASHEET_TFLOPS:.0f}{mem}{out}")
    return res


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


def sec_curve(args, work: Path) -> dict:
    """124M on tinyshakespeare at 2^19 tokens/step for ~2 minutes: loss falls, no NaN, no spike."""
    from gpt2.train.pretrain import run

    s = sizes(args)
    B, T, accum = s["micro"][64], s["T"], s["curve_accum"]
    minutes = args.curve_minutes if args.curve_minutes is not None else s["curve_minutes"]
    cfg = pretrain_config(args, work, "curve", micro_batch=B, global_batch=B * T * accum, max_steps=200,
                          warmup_steps=20, max_minutes=minutes, eval_every=25, val_tokens=B * T,
                          dtype="bfloat16")
    run(cfg)
    run_dir = Path(cfg.out)
    lines = train_lines(run_dir)
    losses = [x["loss"] for x in lines]
    finite = all(math.isfinite(v) for v in losses)
    # a spike: a step's loss more than 0.5 above the best loss of the 5 steps before it
    spikes = [i for i in range(5, len(losses)) if losses[i] > min(losses[i - 5:i]) + 0.5]
    png = run_dir / "loss.png"
    if not png.is_file():
        draw_png(losses, png)
    if args.out:
        shutil.copy(run_dir / "metrics.jsonl", Path(args.out) / "curve_metrics.jsonl")
        shutil.copy(png, Path(args.out) / "loss.png")
    evals = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if '"eval"' in x]
    drop = 0.1 if args.dry_run else 1.0  # a few CPU steps only start the descent
    ok = finite and not spikes and len(losses) >= 5 and losses[-1] < losses[0] - drop
    val = evals[-1].get("val_loss") if evals else None
    return {"ok": ok, "steps": len(losses), "tokens_per_step": B * T * accum, "first_loss": losses[0],
            "last_loss": losses[-1], "val_loss": val, "spikes": spikes, "finite": finite,
            "tokens_per_s": statistics.median(x["tokens_per_s"] for x in lines[1:]) if len(lines) > 1 else None,
            "summary": f"{len(losses)} steps x {B * T * accum:,} tokens: loss {losses[0]:.2f} -> {losses[-1]:.2f}"
                       + (f", val {val:.2f}" if val is not None else "") + f", spikes {len(spikes)}"}


def draw_png(values: list[float], path: Path, w: int = 640, h: int = 360) -> None:
    """A plain line plot of `values` as a PNG, for a machine without matplotlib (gray axes, blue line)."""
    img = bytearray(b"\xff" * (w * h * 3))
    pad = 30

    def put(x: int, y: int, rgb) -> None:
        if 0 <= x < w and 0 <= y < h:
            img[(y * w + x) * 3:(y * w + x) * 3 + 3] = bytes(rgb)

    for x in range(pad, w - pad):
        put(x, h - pad, (128, 128, 128))
    for y in range(pad, h - pad):
        put(pad, y, (128, 128, 128))
    finite = [v for v in values if math.isfinite(v)]
    if len(finite) > 1:
        lo, hi = min(finite), max(finite)
        pts = [(pad + i * (w - 2 * pad) // (len(values) - 1),
                h - pad - int((v - lo) / (hi - lo or 1) * (h - 2 * pad))) for i, v in enumerate(values)
               if math.isfinite(v)]
        for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
            n = max(abs(x1 - x0), abs(y1 - y0), 1)
            for k in range(n + 1):
                put(x0 + (x1 - x0) * k // n, y0 + (y1 - y0) * k // n, (31, 119, 180))
    raw = b"".join(b"\x00" + bytes(img[y * w * 3:(y + 1) * w * 3]) for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))
    path.write_bytes(png)


def run_section(name: str, args, work: Path) -> dict:
    if name.startswith("speed-"):
        _, micro, kind = name.split("-")
        return sec_speed(args, work, int(micro), kind == "compiled")
    return globals()[f"sec_{name}"](args, work)


# ----------------------------------------------------------------------------- the driver (parent process)


def row_for(name: str, res: dict) -> str:
    status = "ok" if res.get("ok") else res.get("status", "FAIL")
    return f"{name:<18} {status:<8} {res.get('seconds', 0):>5.0f}s  {res.get('summary', res.get('error', ''))}"


def add_ratios(results: dict) -> None:
    """MFU against the measured matmul ceiling, once both are known."""
    ceiling = results.get("matmul", {}).get("tflops")
    for name, res in results.items():
        if name.startswith("speed-") and res.get("ok") and ceiling:
            res["mfu_measured"] = res["achieved_tflops"] / ceiling
            res["summary"] += f", {res['mfu_measured']:.1%} of measured {ceiling:.3g}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    p.add_argument("--dry-run", action="store_true", help="every section at tiny sizes on the CPU (--device cpu)")
    p.add_argument("--text", default=None, help="tinyshakespeare text (default: .gpu/tinyshakespeare.txt, else "
                   "../shared/data/tinyshakespeare.txt)")
    p.add_argument("--out", default=os.environ.get("OUT"), help="folder for logs, JSON and loss.png (default: $OUT)")
    p.add_argument("--sections", nargs="+", default=None, help="run only these sections (default: all)")
    p.add_argument("--budget", type=float, default=None, help="seconds for the whole call; a section that would "
                   "not fit is skipped (default: 470 on CUDA, none on the dry run)")
    p.add_argument("--curve-minutes", type=float, default=None, help="training minutes of the curve section")
    p.add_argument("--section", help=argparse.SUPPRESS)  # child mode: run one section
    p.add_argument("--work", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args()
    torch = _torch()
    if args.dry_run:
        args.device = "cpu"
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("bench/gpu_check.py: --device cuda but CUDA is not available (try --dry-run)")
    if args.text is None:
        local = ROOT / ".gpu" / "tinyshakespeare.txt"
        args.text = str(local if local.is_file() else ROOT.parent / "shared" / "data" / "tinyshakespeare.txt")
    if "TIKTOKEN_CACHE_DIR" not in os.environ:
        for cand in (ROOT / ".gpu" / "tiktoken_cache", ROOT.parent / "shared" / "tiktoken_cache"):
            if cand.is_dir():
                os.environ["TIKTOKEN_CACHE_DIR"] = str(cand)
                break

    if args.section:  # child
        t0 = time.perf_counter()
        try:
            res = run_section(args.section, args, Path(args.work))
        except BaseException as e:  # reported in the table; the parent goes on
            import traceback

            traceback.print_exc()
            res = {"ok": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]}
        res["seconds"] = time.perf_counter() - t0
        Path(args.result).write_text(json.dumps(res, default=str))
        return

    if not Path(args.text).is_file():
        raise SystemExit(f"bench/gpu_check.py: {args.text} not found: copy tinyshakespeare.txt into .gpu/ "
                         "(see --help) or pass --text")
    budget = args.budget if args.budget is not None else (None if args.dry_run else 470.0)
    out = Path(args.out) if args.out else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
    names = [s for s in SECTIONS if args.sections is None or s[0] in args.sections]
    work = Path(tempfile.mkdtemp(prefix="gpu_check."))
    log_path = (out / "gpu_check.log") if out else work / "gpu_check.log"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    header = (f"gpu_check: device {args.device}"
              f"{' (' + torch.cuda.get_device_name() + ')' if args.device.startswith('cuda') else ''}, torch "
              f"{torch.__version__}, {'dry run (tiny sizes)' if args.dry_run else 'full sizes'}, budget "
              f"{budget or 'none'} s, work {work}")
    print(header, flush=True)
    start = time.perf_counter()
    results: dict[str, dict] = {}
    with open(log_path, "w") as log:
        log.write(header + "\n")
        for name, box_gpu, box_cpu in names:
            box = box_cpu if args.dry_run else box_gpu
            left = None if budget is None else budget - (time.perf_counter() - start)
            if left is not None and left < min(box, 30):
                results[name] = {"ok": False, "status": "skipped", "summary": f"out of time ({left:.0f} s left)"}
                print(row_for(name, results[name]), flush=True)
                continue
            if name == "curve" and left is not None and args.curve_minutes is None:
                args.curve_minutes = max(0.5, min(2.5, (left - 60) / 60))  # what is left, less start-up
                box = int(args.curve_minutes * 60 + 60)
            box = int(box if left is None else min(box, left))
            result_file = work / f"{name}.json"
            cmd = [sys.executable, __file__, "--section", name, "--work", str(work), "--result", str(result_file),
                   "--device", args.device, "--text", args.text] + (["--dry-run"] if args.dry_run else []) \
                + (["--out", str(out)] if out else []) \
                + (["--curve-minutes", str(args.curve_minutes)] if args.curve_minutes else [])
            log.write(f"\n===== {name} (time box {box} s)\n")
            log.flush()
            t0 = time.perf_counter()
            try:
                subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=box, cwd=ROOT)
                res = json.loads(result_file.read_text()) if result_file.is_file() else {
                    "ok": False, "error": "the section died without a result (see gpu_check.log)"}
            except subprocess.TimeoutExpired:
                res = {"ok": False, "status": "TIMEOUT", "summary": f"over its {box} s time box"}
            res.setdefault("seconds", time.perf_counter() - t0)
            results[name] = res
            print(row_for(name, res), flush=True)
    add_ratios(results)
    total = time.perf_counter() - start
    table = "\n".join([header, f"{'section':<18} {'status':<8} {'time':>6}  result"]
                      + [row_for(n, r) for n, r in results.items()]
                      + [f"total {total:.0f} s; {sum(bool(r.get('ok')) for r in results.values())}/{len(results)} ok"])
    print("\n" + table, flush=True)
    if out:
        (out / "table.txt").write_text(table + "\n")
        (out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
