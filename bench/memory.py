"""Peak memory of a training step with and without activation checkpointing, against the memory plan's estimate.

Each configuration runs in a fresh process (so one's peak never hides another's): a GPT of the chosen preset,
random tokens, a few AdamW steps of `--rows` x `--seq-len` on the CPU (peak resident memory, `ru_maxrss`) or on
CUDA (`torch.cuda.max_memory_allocated`). Printed per configuration: the measured peak, the plan's total, and
the ratio of checkpointing's peak to the plain run's, measured in the same run.

    python bench/memory.py [--preset gpt2] [--rows 4] [--seq-len 512] [--steps 2] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

from train import cpu_name  # bench/train.py's

SRC = Path(__file__).resolve().parents[1] / "src"


def measure(preset: str, rows: int, seq_len: int, steps: int, device: str, checkpointing: bool) -> dict:
    """In this process: train `steps` steps and return the peak bytes and the plan's estimate."""
    sys.path.insert(0, str(SRC))
    import torch

    from gpt2.model import GPT, PRESETS
    from gpt2.train.memory import plan_memory
    from gpt2.train.parallel import checkpoint_activations

    torch.manual_seed(0)
    dev = torch.device(device)
    model = GPT(PRESETS[preset]).to(dev).train()
    if checkpointing:
        checkpoint_activations(model)
    amp = torch.bfloat16 if dev.type == "cuda" else None
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    x = torch.randint(0, model.config.vocab_size, (rows, seq_len), device=dev)
    for _ in range(steps):
        with torch.autocast(dev.type, dtype=amp, enabled=amp is not None):
            loss = model.loss(x, x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated(dev)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    plan = plan_memory(model, rows, seq_len, amp, checkpointing)
    return {"peak": peak, "plan": plan.total}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="gpt2", help="model size (gpt2.model.PRESETS)")
    p.add_argument("--rows", type=int, default=4, help="micro batch rows")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per row")
    p.add_argument("--steps", type=int, default=2, help="optimizer steps (the first allocates AdamW's state)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to train")
    p.add_argument("--child", choices=["plain", "checkpointed"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(measure(args.preset, args.rows, args.seq_len, args.steps, args.device,
                                 args.child == "checkpointed")))
        return
    where = cpu_name() if args.device == "cpu" else "CUDA"
    print(f"bench/memory.py: {args.preset}, micro batch {args.rows} x {args.seq_len}, {args.steps} AdamW steps on "
          f"{args.device} ({where}); peak = {'resident memory' if args.device == 'cpu' else 'allocated'}")
    out = {}
    for kind in ("plain", "checkpointed"):
        cmd = [sys.executable, __file__, "--child", kind, "--preset", args.preset, "--rows", str(args.rows),
               "--seq-len", str(args.seq_len), "--steps", str(args.steps), "--device", args.device]
        out[kind] = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
        print(f"  {kind:>12}: peak {out[kind]['peak'] / 1e9:.2f} GB, plan {out[kind]['plan'] / 1e9:.2f} GB")
    print(f"activation checkpointing: peak {out['checkpointed']['peak'] / out['plain']['peak']:.2f}x the plain "
          f"run's (plan {out['checkpointed']['plan'] / out['plain']['plan']:.2f}x)")


if __name__ == "__main__":
    main()
