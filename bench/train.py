"""Training throughput: `gpt2 pretrain`'s step against a plain fp32 nanoGPT-style step, same run.

CPU (default): the tiny preset (4 layers, 128 wide, GPT-2 vocabulary) at micro batch 8 x 128 tokens, no
accumulation. "ours" is the real trainer: `gpt2.commands.pretrain.run` on a temporary shard of random tokens
(ShardLoader -> loop -> chunked fused lm_head+CE loss -> fused AdamW), its tokens/s read from the run's
metrics.jsonl. "baseline" is nanoGPT's model and training step written out below: fp32, full logits +
F.cross_entropy, AdamW as nanoGPT configures it off-GPU (no fused kernel). Both start from the same random
tokens; rounds alternate so that other load on the machine hits both alike; the best step of each is
compared (and the median is printed too).

    python bench/train.py [--steps 8] [--rounds 2] [--threads N] [--dtype float32|bfloat16] [--compile]
    python bench/train.py --device cuda    # 124M preset, micro batch 32 x 1024, bf16 + compile: tok/s, MFU

Learning, not speed (`--compare-nanogpt`): on tinyshakespeare split as nanoGPT splits it (first 90% of the
characters train, last 10% val, GPT-2 BPE), `gpt2 pretrain` (its default shuffled window order) against a
minimal nanoGPT-style trainer written below: each step draws B windows at uniformly random offsets, with
replacement, as nanoGPT's `get_batch` does. Everything else is the same: the model (our `GPT`, the same
seed and so the same initial weights), AdamW (0.9, 0.95), weight decay 0.1 on 2-D weights, warmup +
cosine LR, clipping at 1.0, 4 layers x 128 wide, context 128, 1,024 tokens per step, 300 steps. Both are
scored by the same function on the same tokens (every 8 x 128 window of the val split, in order) every
50 steps; the curves and their difference are printed. Target: our final val loss <= the reference's.

    python bench/train.py --compare-nanogpt [--steps 300] [--text ../shared/data/tinyshakespeare.txt]

Optimizers (`--compare-muon`): the same data, model and schedule shape; AdamW's LR and Muon's are each swept (the
best final val loss kept; Muon's AdamW part uses AdamW's best LR); printed: the step at which Muon first reaches
AdamW's final val loss (goal: within two thirds of the steps) and the ratio of their times per step (goal:
at most 1.3x).

    python bench/train.py --compare-muon [--steps 300] [--adamw-lrs 2e-3 4e-3] [--muon-lrs 0.02 0.04]

Precision (`--compare-dtypes`): the same `gpt2 pretrain` run on tinyshakespeare in plain float32 and in bfloat16
autocast, same seed and data: both val-loss curves, the final val loss's relative difference (goal: within 1%, the
tolerance under which `--dtype auto` trains in bf16 on CPUs with native bf16; the largest gap along the curve is
printed too: where the loss falls fastest, a step's lag is a large relative gap) and the ratio of their times per
step (on a CPU with native bf16 the speed-up; elsewhere bf16 is emulated and slower).

    python bench/train.py --compare-dtypes [--steps 300] [--val-tokens N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# ----------------------------------------------------------------------------- nanoGPT-style baseline


class NanoAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int):
        super().__init__()
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)
        self.n_head = n_head

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class NanoBlock(nn.Module):
    def __init__(self, n_embd: int, n_head: int):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(n_embd), nn.LayerNorm(n_embd)
        self.attn = NanoAttention(n_embd, n_head)
        self.c_fc, self.c_proj = nn.Linear(n_embd, 4 * n_embd), nn.Linear(4 * n_embd, n_embd)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.c_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class NanoGPT(nn.Module):
    def __init__(self, vocab: int, block: int, n_layer: int, n_head: int, n_embd: int):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, n_embd), nn.Embedding(block, n_embd)
        self.h = nn.ModuleList([NanoBlock(n_embd, n_head) for _ in range(n_layer)])
        self.ln_f = nn.LayerNorm(n_embd)
        self.lm_head = nn.Linear(n_embd, vocab, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, idx, targets):
        x = self.wte(idx) + self.wpe(torch.arange(idx.size(1), device=idx.device))
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)


def nanogpt_optimizer(model: nn.Module, lr: float, weight_decay: float, betas, device: str):
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    extra = {"fused": True} if device == "cuda" else {}  # nanoGPT: fused only on CUDA
    return torch.optim.AdamW(groups, lr=lr, betas=betas, **extra)


def baseline_step_times(cfg, tokens: np.ndarray, steps: int, device: str) -> list[float]:
    torch.manual_seed(cfg.seed)
    model = NanoGPT(cfg.vocab_size, cfg.block_size, cfg.n_layer, cfg.n_head, cfg.n_embd).to(device)
    opt = nanogpt_optimizer(model, cfg.lr, cfg.weight_decay, tuple(cfg.betas), device)
    B, T = cfg.micro_batch, cfg.seq_len
    times = []
    for s in range(steps + 1):  # +1: the first step warms up allocators and kernels, not timed
        buf = torch.from_numpy(tokens[s * B * T: (s + 1) * B * T + 1].astype(np.int64))
        x, y = buf[:-1].view(B, T).to(device), buf[1:].view(B, T).to(device)
        t0 = time.perf_counter()
        loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()
        if device == "cuda":
            torch.cuda.synchronize()
        if s:
            times.append(time.perf_counter() - t0)
    return times


# ----------------------------------------------------------------------------- nanoGPT-style data order


def random_window_trainer(cfg, train_tokens: np.ndarray, score, steps: int, eval_every: int) -> dict[int, float]:
    """nanoGPT's training loop, minimal: B windows at random offsets per step (with replacement), one
    micro-batch per step, our model, AdamW groups and LR schedule. Returns {step: val loss}."""
    from gpt2.model import GPT
    from gpt2.train.optim import lr_at

    torch.manual_seed(cfg.seed)  # the same initial weights as `gpt2 pretrain` (which seeds, then builds)
    model = GPT(cfg.model_config())
    opt = nanogpt_optimizer(model, cfg.lr, cfg.weight_decay, tuple(cfg.betas), "cpu")
    data = torch.from_numpy(train_tokens.astype(np.int64))
    gen = torch.Generator().manual_seed(cfg.seed)
    B, T = cfg.micro_batch, cfg.seq_len
    curve = {0: score(model)}
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        ix = torch.randint(len(data) - T, (B,), generator=gen)
        x = torch.stack([data[i:i + T] for i in ix])  # (B, T)
        y = torch.stack([data[i + 1:i + 1 + T] for i in ix])  # (B, T)
        model.loss(x, y).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            curve[step + 1] = score(model)
    return curve


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def shakespeare(text_path: Path, workdir: Path, steps: int, eval_every: int):
    """(train tokens, val tokens, the tiny pretraining config on them): tinyshakespeare split as nanoGPT splits
    it, 4 layers x 128 wide, context 128, 1,024 tokens per step, warmup 30 then cosine to lr / 10."""
    from dataclasses import replace

    from gpt2.commands.pretrain import PRETRAIN_PRESETS
    from gpt2.data.shards import shard_name, write_shard
    from gpt2.tokenizer import encode

    if not text_path.is_file():
        raise SystemExit(f"bench/train.py: --text {text_path}: no such file")
    text = text_path.read_text(encoding="utf-8")
    cut = int(len(text) * 0.9)  # nanoGPT's shakespeare split: characters, 90/10
    train_tokens, val_tokens = (np.array(encode(t), dtype=np.uint16) for t in (text[:cut], text[cut:]))
    data = workdir / "shakespeare"
    data.mkdir()
    write_shard(data / shard_name("shakespeare", "train", 1), train_tokens)
    write_shard(data / shard_name("shakespeare", "val", 0), val_tokens)
    cfg = replace(PRETRAIN_PRESETS["tiny"], data=str(data), out=str(workdir / "ours"), device="cpu", dtype="float32",
                  micro_batch=8, seq_len=128, global_batch=8 * 128, max_steps=steps, warmup_steps=30, lr=2e-3,
                  min_lr=2e-4, eval_every=eval_every, save_every=0, val_tokens=len(val_tokens), progress=False)
    return train_tokens, val_tokens, cfg


def run_curve(cfg) -> tuple[dict[int, float], float]:
    """`gpt2 pretrain` on cfg: (val loss by step, median seconds per step)."""
    from gpt2.commands.pretrain import run

    run(cfg)
    lines = [json.loads(x) for x in (Path(cfg.out) / "metrics.jsonl").read_text().splitlines()]
    curve = {r["step"]: r["val_loss"] for r in lines if r["kind"] == "eval"}
    step_s = statistics.median(cfg.global_batch / r["tokens_per_s"] for r in lines if r["kind"] == "train")
    return curve, step_s


def compare_muon(text_path: Path, steps: int, workdir: Path, adamw_lrs: list[float], muon_lrs: list[float]) -> None:
    """Muon against AdamW on tinyshakespeare: each optimizer's LR from a small sweep (best final val loss), then
    the first evaluated step at which Muon reaches AdamW's final val loss, and their times per step."""
    from dataclasses import replace

    _, _, base = shakespeare(text_path, workdir, steps, eval_every=20)
    base = replace(base, val_tokens=16 * base.micro_batch * base.seq_len)  # the same 16 val batches every time
    print(f"bench/train.py --compare-muon: CPU {cpu_name()}, {torch.get_num_threads()} threads, torch "
          f"{torch.__version__}; tinyshakespeare, {base.n_layer} layers x {base.n_embd} wide, context "
          f"{base.seq_len}, {base.global_batch:,} tokens/step, {steps} steps, val loss on {base.val_tokens:,} "
          "tokens every 20 steps", flush=True)
    runs = {}
    for lr in adamw_lrs:
        runs[("adamw", lr)] = run_curve(replace(base, out=str(workdir / f"adamw-{lr}"), lr=lr, min_lr=lr / 10))
        print(f"  adamw lr {lr:g}: final val loss {runs[('adamw', lr)][0][steps]:.4f}", flush=True)
    best_adamw = min(adamw_lrs, key=lambda lr: runs[("adamw", lr)][0][steps])
    for mlr in muon_lrs:  # AdamW keeps the embeddings, head, biases and LayerNorms at its best LR
        cfg = replace(base, out=str(workdir / f"muon-{mlr}"), optimizer="muon", muon_lr=mlr, lr=best_adamw,
                      min_lr=best_adamw / 10)
        runs[("muon", mlr)] = run_curve(cfg)
        print(f"  muon lr {mlr:g} (adamw lr {best_adamw:g}): final val loss {runs[('muon', mlr)][0][steps]:.4f}",
              flush=True)
    best_muon = min(muon_lrs, key=lambda lr: runs[("muon", lr)][0][steps])
    (a_curve, a_step), (m_curve, m_step) = runs[("adamw", best_adamw)], runs[("muon", best_muon)]
    target = a_curve[steps]
    reached = next((s for s in sorted(m_curve) if s > 0 and m_curve[s] <= target), None)
    print(f"{'step':>6} {'adamw':>8} {'muon':>8}")
    for s in sorted(a_curve):
        if s % 60 == 0:
            print(f"{s:>6} {a_curve[s]:>8.4f} {m_curve[s]:>8.4f}")
    where = f"at step {reached}" if reached else f"not within {steps} steps"
    print(f"AdamW (lr {best_adamw:g}) final val loss {target:.4f}; Muon (lr {best_muon:g}) reaches it {where} "
          f"(goal: <= {2 * steps // 3}); time per step Muon / AdamW {m_step / a_step:.2f}x (goal: <= 1.3x)")


def compare_dtypes(text_path: Path, steps: int, workdir: Path, val_tokens: int | None) -> None:
    """float32 against bfloat16 autocast, the same `gpt2 pretrain` run otherwise (see the module docstring), each
    evaluated on `val_tokens` of the validation split (None: all of it)."""
    from dataclasses import replace

    from gpt2.precision import cpu_has_native_bf16

    _, _, base = shakespeare(text_path, workdir, steps, eval_every=50)
    base = replace(base, val_tokens=val_tokens or base.val_tokens)
    print(f"bench/train.py --compare-dtypes: CPU {cpu_name()} (native bf16: {cpu_has_native_bf16()}), "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}; tinyshakespeare, {base.n_layer} layers x "
          f"{base.n_embd} wide, context {base.seq_len}, {base.global_batch:,} tokens/step, {steps} steps", flush=True)
    (f_curve, f_step), (b_curve, b_step) = (run_curve(replace(base, out=str(workdir / d), dtype=d))
                                            for d in ("float32", "bfloat16"))
    print(f"{'step':>6} {'float32':>9} {'bfloat16':>9} {'relative':>9}")
    for step in sorted(f_curve):
        print(f"{step:>6} {f_curve[step]:>9.4f} {b_curve[step]:>9.4f} {b_curve[step] / f_curve[step] - 1:>+9.2%}")
    final = b_curve[steps] / f_curve[steps] - 1
    worst = max(f_curve, key=lambda s: abs(b_curve[s] / f_curve[s] - 1))
    print(f"final val loss: bfloat16 {final:+.2%} against float32 ({'within' if abs(final) <= 0.01 else 'outside'} "
          f"the 1% tolerance; largest gap {b_curve[worst] / f_curve[worst] - 1:+.2%} at step {worst}); time per step "
          f"float32 {f_step * 1000:.0f} ms, bfloat16 {b_step * 1000:.0f} ms: bf16 runs {f_step / b_step:.2f}x "
          "float32's speed")


def compare_nanogpt(text_path: Path, steps: int, workdir: Path) -> None:
    from gpt2.commands.pretrain import run
    from gpt2.data.loader import ShardLoader
    from gpt2.evaluate import val_loss

    eval_every = 50
    train_tokens, val_tokens, cfg = shakespeare(text_path, workdir, steps, eval_every)
    data = Path(cfg.data)

    def score(model) -> float:  # every window of the val split, in order: what `gpt2 pretrain` evaluates too
        loader = ShardLoader(data, "val", cfg.micro_batch, cfg.seq_len)
        return val_loss(model, (loader.next_batch() for _ in range(loader.steps_per_epoch)))

    print(f"bench/train.py --compare-nanogpt: CPU {cpu_name()}, {torch.get_num_threads()} threads, torch "
          f"{torch.__version__}; tinyshakespeare {len(train_tokens):,} train / {len(val_tokens):,} val tokens; "
          f"{cfg.n_layer} layers x {cfg.n_embd} wide, context {cfg.seq_len}, {cfg.global_batch:,} tokens/step, "
          f"{steps} steps", flush=True)
    t0 = time.perf_counter()
    run(cfg)
    ours_curve = {r["step"]: r["val_loss"] for r in map(json.loads, (workdir / "ours" / "metrics.jsonl").read_text()
                                                           .splitlines()) if r["kind"] == "eval"}
    t1 = time.perf_counter()
    ref_curve = random_window_trainer(cfg, train_tokens, score, steps, eval_every)
    t2 = time.perf_counter()
    print(f"{'step':>6} {'ours (shuffled windows)':>24} {'nanoGPT-style (random windows)':>31} {'ours - ref':>11}")
    for step in sorted(ref_curve):
        ours_loss, ref_loss = ours_curve[step], ref_curve[step]
        print(f"{step:>6} {ours_loss:>24.4f} {ref_loss:>31.4f} {ours_loss - ref_loss:>+11.4f}")
    final = ours_curve[steps] - ref_curve[steps]
    print(f"final val loss: ours {ours_curve[steps]:.4f}, reference {ref_curve[steps]:.4f}, difference {final:+.4f} "
          f"({'meets' if final <= 0 else 'misses'} the target ours <= reference); wall time ours {t1 - t0:.0f} s, "
          f"reference {t2 - t1:.0f} s")


# ----------------------------------------------------------------------------- ours: the real trainer


def ours(cfg, steps: int, workdir: Path, tag: str) -> list[dict]:
    """Run `gpt2 pretrain` for `steps` steps; its metrics.jsonl train lines (first step dropped: warm-up
    and, on CUDA, compilation)."""
    from dataclasses import replace

    from gpt2.commands.pretrain import run

    out = workdir / f"run-{tag}"
    run(replace(cfg, out=str(out), max_steps=steps + 1, eval_every=0, save_every=0, progress=False))
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [x for x in lines if x["kind"] == "train"][1:]


def write_random_shards(workdir: Path, vocab: int, n_tokens: int) -> tuple[Path, np.ndarray]:
    from gpt2.data.shards import write_shard

    data = workdir / "shards"
    data.mkdir()
    tokens = np.random.default_rng(0).integers(0, vocab, n_tokens, dtype=np.int64).astype(np.uint16)
    write_shard(data / f"bench_train_{1:06d}.bin", tokens)
    return data, tokens


def positive(text: str) -> int:
    """argparse type: an integer above zero."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give a whole number above zero")
    return value


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="cpu: tiny preset vs baseline; "
                   "cuda: 124M preset tokens/s and MFU")
    p.add_argument("--steps", type=positive, default=None, help="timed steps per round (default: 8 cpu, 20 cuda)")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds of baseline and ours (cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="our autocast dtype (auto: what `gpt2 pretrain --dtype auto` picks: bfloat16 on CUDA and "
                   "on a CPU with native bf16, else float32)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile our training forward (default: on for CUDA, off on CPU)")
    p.add_argument("--compare-nanogpt", action="store_true", help="val-loss curves of gpt2 pretrain vs a "
                   "nanoGPT-style random-window trainer on tinyshakespeare, same model/optimizer/steps")
    p.add_argument("--compare-muon", action="store_true", help="val-loss curves of --optimizer muon vs adamw on "
                   "tinyshakespeare, each with its LR swept: the step at which Muon reaches AdamW's final loss")
    p.add_argument("--compare-dtypes", action="store_true", help="val-loss curves and time per step of gpt2 "
                   "pretrain in float32 vs bfloat16 autocast on tinyshakespeare, same run otherwise")
    p.add_argument("--val-tokens", type=positive, default=None, help="--compare-dtypes: validation tokens per "
                   "evaluation (default: the whole validation split)")
    p.add_argument("--adamw-lrs", type=float, nargs="+", default=[2e-3, 4e-3], help="--compare-muon: "
                   "AdamW's peak LRs to sweep")
    p.add_argument("--muon-lrs", type=float, nargs="+", default=[0.02, 0.04], help="--compare-muon: Muon's "
                   "peak LRs to sweep")
    p.add_argument("--text", type=Path, default=Path(__file__).resolve().parents[1].parent / "shared" / "data" /
                   "tinyshakespeare.txt", help="corpus for --compare-nanogpt, --compare-muon and --compare-dtypes "
                   "(default: ../shared/data/tinyshakespeare.txt)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.compare_nanogpt:
        with tempfile.TemporaryDirectory() as tmp:
            compare_nanogpt(args.text, args.steps or 300, Path(tmp))
        return
    if args.compare_dtypes:
        with tempfile.TemporaryDirectory() as tmp:
            compare_dtypes(args.text, args.steps or 300, Path(tmp), args.val_tokens)
        return
    if args.compare_muon:
        with tempfile.TemporaryDirectory() as tmp:
            compare_muon(args.text, args.steps or 300, Path(tmp), args.adamw_lrs, args.muon_lrs)
        return
    from gpt2.commands.pretrain import PRETRAIN_PRESETS

    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("bench/train.py --device cuda: no CUDA device")
    steps = args.steps or (20 if cuda else 8)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        if cuda:
            base = PRETRAIN_PRESETS["gpt2-124m"]
            cfg_kw = dict(micro_batch=32, seq_len=1024, global_batch=524_288)
        else:
            base = PRETRAIN_PRESETS["tiny"]
            cfg_kw = dict(micro_batch=8, seq_len=128, global_batch=8 * 128)
        n_tokens = (steps + 2) * cfg_kw["global_batch"] + 1
        data, tokens = write_random_shards(workdir, base.vocab_size, n_tokens)
        from dataclasses import replace

        cfg = replace(base, data=str(data), device=args.device, dtype=args.dtype, compile=args.compile,
                      warmup_steps=2, **cfg_kw)
        print(f"bench/train.py: {args.device}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
              f"{cfg.n_layer} layers x {cfg.n_embd} wide, micro batch {cfg.micro_batch} x {cfg.seq_len}, "
              f"{cfg.global_batch:,} tokens/step")
        if cuda:
            lines = ours(cfg, steps, workdir, "cuda")
            tps = [x["tokens_per_s"] for x in lines]
            mfu = [x["mfu"] for x in lines if x["mfu"] is not None]
            mfu_text = f"MFU {statistics.median(mfu):.1%}" if mfu else "MFU unknown (GPU not in the peak table)"
            print(f"ours (gpt2 pretrain, 124M, dtype {cfg.dtype}, compile {cfg.compile}): median "
                  f"{statistics.median(tps):,.0f} tokens/s, best {max(tps):,.0f}; {mfu_text}")
            print(f"device: {torch.cuda.get_device_name()}")
            return
        ours_tps, base_tps = [], []
        for r in range(args.rounds):
            base_tps += [cfg.micro_batch * cfg.seq_len / t for t in baseline_step_times(cfg, tokens, steps, "cpu")]
            ours_tps += [x["tokens_per_s"] for x in ours(cfg, steps, workdir, str(r))]
        b_best, o_best = max(base_tps), max(ours_tps)
        b_med, o_med = statistics.median(base_tps), statistics.median(ours_tps)
        print(f"baseline (nanoGPT-style fp32 step): best {b_best:,.0f} tokens/s, median {b_med:,.0f}")
        print(f"ours (gpt2 pretrain step, dtype {args.dtype}, compile {bool(args.compile)}): best {o_best:,.0f} "
              f"tokens/s, median {o_med:,.0f}")
        print(f"ratio ours / baseline: best {o_best / b_best:.2f}x, median {o_med / b_med:.2f}x "
              "(target >= 1.5x)")


if __name__ == "__main__":
    main()
