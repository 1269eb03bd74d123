"""Training throughput: `gpt2 pretrain`'s step against a plain fp32 nanoGPT-style step, same run.

CPU (default): the tiny preset (4 layers, 128 wide, GPT-2 vocabulary) at micro batch 8 x 128 tokens, no
accumulation. "ours" is the real trainer: `gpt2.train.pretrain.run` on a temporary shard of random tokens
(ShardLoader -> loop -> chunked fused lm_head+CE loss -> fused AdamW), its tokens/s read from the run's
metrics.jsonl. "baseline" is nanoGPT's model and training step written out below: fp32, full logits +
F.cross_entropy, AdamW as nanoGPT configures it off-GPU (no fused kernel). Both start from the same random
tokens; rounds alternate so that other load on the machine hits both alike; the best step of each is
compared (and the median is printed too).

    python bench/train.py [--steps 8] [--rounds 2] [--threads N] [--dtype float32|bfloat16] [--compile]
    python bench/train.py --device cuda    # 124M preset, micro batch 32 x 1024, bf16 + compile: tok/s, MFU
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


# ----------------------------------------------------------------------------- ours: the real trainer


def ours(cfg, steps: int, workdir: Path, tag: str) -> list[dict]:
    """Run `gpt2 pretrain` for `steps` steps; its metrics.jsonl train lines (first step dropped: warm-up
    and, on CUDA, compilation)."""
    from dataclasses import replace

    from gpt2.train.pretrain import run

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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="cpu: tiny preset vs baseline; "
                   "cuda: 124M preset tokens/s and MFU")
    p.add_argument("--steps", type=int, default=None, help="timed steps per round (default: 8 cpu, 20 cuda)")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds of baseline and ours (cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="our autocast dtype (auto: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile our training forward (default: on for CUDA, off on CPU)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from gpt2.train.pretrain import PRETRAIN_PRESETS

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
