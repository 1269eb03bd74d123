"""Greedy generation speed on CPU: gpt2-scratch vs `transformers` generate, same weights, same run.

A random-weight GPT-2 124M is saved once in HF format and loaded by both implementations. Each generates
`--new-tokens` tokens greedily for `--prompt-len`-token prompts at batch 1 and batch 8 (stop token disabled
so both produce exactly the same number of tokens). Prints tokens/s for each, the ratio, and whether the
greedy tokens are identical.

Ours is timed twice: "frozen", after `gpt2.kernels.freeze(model)` packed the weights for decoding once (how
the chat and the server run; the one-time packing is printed), and "per call", packing inside every
`generate` call (how a one-off `gpt2 generate` runs). Set GPT2_NATIVE=0 to time ours without the native C
kernels (`gpt2.native`), on plain PyTorch alone.

    python bench/generate.py [--batch-sizes 1 8] [--prompt-len 32] [--new-tokens 128] [--repeats 3]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable

import torch


def best_times(runs: list[tuple[Callable[[], object], Callable[[], object]]], repeats: int,
               ) -> tuple[list[float], list]:
    """Fastest of `repeats` runs of each (setup, fn) pair (after one warm-up each; only fn is timed),
    interleaved so that other load on the machine hits every implementation alike."""
    outs = [setup() or fn() for setup, fn in runs]
    best = [float("inf")] * len(runs)
    for _ in range(repeats):
        for i, (setup, fn) in enumerate(runs):
            setup()
            t0 = time.perf_counter()
            outs[i] = fn()
            best[i] = min(best[i], time.perf_counter() - t0)
    return best, outs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="gpt2", help="model size preset (gpt2 = 124M)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8], help="batch sizes to measure")
    p.add_argument("--prompt-len", type=int, default=32, help="tokens per prompt")
    p.add_argument("--new-tokens", type=int, default=128, help="tokens generated per prompt")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (best is kept)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = p.parse_args()

    import transformers

    from gpt2 import native
    from gpt2.inference import generate
    from gpt2.kernels import freeze, unfreeze
    from gpt2.model import GPT, PRESETS

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    ours = GPT(PRESETS[args.preset]).eval()
    with tempfile.TemporaryDirectory() as d:
        ours.save_pretrained(d)
        hf = transformers.GPT2LMHeadModel.from_pretrained(d).eval()
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, threads {torch.get_num_threads()}, "
          f"{args.preset} ({ours.num_params() / 1e6:.1f}M params), prompt {args.prompt_len}, new {args.new_tokens}")
    print("native kernels: " + ("on" if native.available() else f"off ({native.unavailable_reason()})"))
    t0 = time.perf_counter()
    freeze(ours)
    unfreeze(ours)
    print(f"packing the weights for decoding (once per model with freeze): {time.perf_counter() - t0:.2f} s")
    print(f"{'batch':>5} {'frozen tok/s':>13} {'per call':>9} {'HF tok/s':>9} {'ratio':>6} {'per call':>9}  identical")
    for B in args.batch_sizes:
        ids = torch.randint(0, 50257, (B, args.prompt_len))
        mask = torch.ones_like(ids)

        def run_ours(ids=ids, mask=mask):
            return generate(ours, ids, mask, 0.0, args.new_tokens, eos_id=None)

        def run_hf(ids=ids, mask=mask):
            with torch.no_grad():
                out = hf.generate(ids, attention_mask=mask, max_new_tokens=args.new_tokens,
                                  min_new_tokens=args.new_tokens, do_sample=False, eos_token_id=None,
                                  pad_token_id=0)
            return out[:, args.prompt_len:].tolist()

        runs = [(lambda: freeze(ours), run_ours), (lambda: unfreeze(ours), run_ours), (lambda: None, run_hf)]
        (t_frozen, t_ours, t_hf), (tok_frozen, tok_ours, tok_hf) = best_times(runs, args.repeats)
        n = B * args.new_tokens
        print(f"{B:>5} {n / t_frozen:>13.1f} {n / t_ours:>9.1f} {n / t_hf:>9.1f} {t_hf / t_frozen:>5.2f}x "
              f"{t_hf / t_ours:>8.2f}x  {tok_frozen == tok_ours == tok_hf}")


if __name__ == "__main__":
    main()
