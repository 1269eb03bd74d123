"""Greedy generation speed on CPU: gpt2-scratch vs `transformers` generate vs ONNX Runtime, one run.

A random-weight GPT-2 124M is saved once in HF format and loaded by every implementation. Each generates
`--new-tokens` tokens greedily for `--prompt-len`-token prompts at each batch size (stop token disabled, so
all produce exactly the same number of tokens), in rounds that alternate the implementations so that other
load on the machine hits them alike; the fastest round of each is kept. Printed: the CPU model and its
vector extensions, tokens/s of each and ours' ratio to each, ours with temperature sampling, the one-time
cost, peak memory of ours against transformers (each in a fresh process), and two checks: ours' greedy
tokens equal transformers' at batch 1, and each batch row equals that prompt decoded alone.

"ours" is the compiled decoder (`Decoder(model, compile=True)`: what `gpt2 chat`, `gpt2 serve` and
`gpt2 generate --compile` run; its pieces are compiled once per weights, torch and CPU and cached, see
`gpt2.compiled`); "eager" is the same decoder without compiling (`--no-compile`, and `generate()` called
without a decoder, as training's samples do). Its memory is measured as the commands run it: a start with the
compiled pieces cached, the model's weights handed over to them (`release_weights`).

ONNX Runtime runs an ONNX export of the same fp32 weights: one graph taking the past keys/values as inputs
and returning them extended (the plain way to run GPT-2 with a KV cache there). It is an optional bench
dependency (`pip install -e ".[bench]"`); without it that column says why it is missing.

    python bench/generate.py [--batch-sizes 1 8 16] [--prompt-len 32] [--new-tokens 128] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

SRC = Path(__file__).resolve().parents[1] / "src"
sys.path.insert(0, str(SRC))


def cpu_description() -> str:
    """The CPU model and the vector extensions that matter for fp32 matmuls."""
    model, flags = platform.processor() or "unknown CPU", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    ext = [f for f in ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile") if f in flags]
    return f"{model} ({', '.join(ext) or 'no AVX2'}), {os.cpu_count()} logical CPUs"


def alternate(runs: dict[str, Callable[[], object]], rounds: int) -> tuple[dict[str, float], dict[str, object]]:
    """Fastest of `rounds` alternated timings of each run (after one untimed warm-up each)."""
    outs = {name: fn() for name, fn in runs.items()}
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(rounds):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            outs[name] = fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best, outs


# ---------------------------------------------------------------------------------------------- ONNX Runtime


class _ConcatCache:
    """A `gpt2.model.KVStore` for the export: past keys/values in, the extended ones collected."""

    def __init__(self, past: tuple[torch.Tensor, ...]):
        self.past, self.present = past, []

    def update(self, layer, k, v):
        k = torch.cat([self.past[2 * layer], k], dim=2)
        v = torch.cat([self.past[2 * layer + 1], v], dim=2)
        self.present += [k, v]
        return k, v


class _StepGraph(torch.nn.Module):
    """(ids (B, T), positions (B, T), additive mask (B, 1, T, P+T), past k/v per layer) -> (last logits, present)"""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids, positions, mask, *past):
        cache = _ConcatCache(past)
        hidden = self.model.hidden_states(ids, positions, mask, cache)
        return (self.model.logits(hidden[:, -1]), *cache.present)


class OrtGreedy:
    """Greedy decoding with ONNX Runtime on an ONNX export of `model` (same weights, fp32)."""

    def __init__(self, model, threads: int, directory: str):
        import numpy as np
        import onnxruntime as ort

        self.np, cfg = np, model.config
        self.L, self.nh, self.hs = cfg.n_layer, cfg.n_head, cfg.head_dim
        names = [f"past_{i}" for i in range(2 * self.L)]
        ids, pos = torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, 2, dtype=torch.long)
        mask = torch.zeros(1, 1, 2, 5)
        past = tuple(torch.zeros(1, self.nh, 3, self.hs) for _ in names)
        dyn = {"ids": {0: "B", 1: "T"}, "positions": {0: "B", 1: "T"}, "mask": {0: "B", 2: "T", 3: "S"},
               **{n: {0: "B", 2: "P"} for n in names}, "logits": {0: "B"},
               **{f"present_{i}": {0: "B", 2: "S"} for i in range(2 * self.L)}}
        path = os.path.join(directory, "gpt2_step.onnx")
        torch.onnx.export(_StepGraph(model).eval(), (ids, pos, mask, *past), path, dynamo=False,
                          input_names=["ids", "positions", "mask", *names],
                          output_names=["logits", *[f"present_{i}" for i in range(2 * self.L)]],
                          dynamic_axes=dyn, opset_version=17)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
        self.session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        self.names = names

    def generate(self, ids: torch.Tensor, new_tokens: int) -> list[list[int]]:
        np = self.np
        B, T = ids.shape
        x = ids.numpy()
        pos = np.broadcast_to(np.arange(T), (B, T)).copy()
        causal = np.triu(np.full((T, T), -np.inf, dtype=np.float32), 1)
        mask = np.broadcast_to(causal, (B, 1, T, T)).copy()
        past = [np.zeros((B, self.nh, 0, self.hs), np.float32) for _ in self.names]
        out = []
        for _ in range(new_tokens):
            logits, *past = self.session.run(None, {"ids": x, "positions": pos, "mask": mask,
                                                    **dict(zip(self.names, past))})
            nxt = logits.argmax(-1)
            out.append(nxt)
            x, pos = nxt[:, None].astype(np.int64), pos[:, -1:] + 1
            mask = np.zeros((B, 1, 1, past[0].shape[2] + 1), np.float32)
        return np.stack(out, 1).tolist()


# ---------------------------------------------------------------------------------------------- peak memory


def peak_memory_child(impl: str, directory: str, batch: int, prompt_len: int, new_tokens: int) -> None:
    """In a fresh process: load, generate once, print the peak resident memory and the resident memory at the
    end (what a chat or server keeps while it runs) in MB."""
    torch.manual_seed(0)
    ids = torch.randint(0, 50257, (batch, prompt_len))
    if impl.startswith("ours"):
        from gpt2.decoder import Decoder
        from gpt2.inference import generate
        from gpt2.model import GPT

        model = GPT.from_pretrained(directory).eval()
        decoder = Decoder(model, compile=True, release_weights=True) if impl == "ours" else Decoder(model)
        generate(model, ids, torch.ones_like(ids), 0.0, new_tokens, eos_id=None, decoder=decoder)
    else:
        import transformers

        model = transformers.GPT2LMHeadModel.from_pretrained(directory).eval()
        with torch.no_grad():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
    print(json.dumps({"peak_mb": rss_mb("VmHWM"), "resident_mb": rss_mb("VmRSS")}))


def rss_mb(field: str) -> float:
    """This process's peak (VmHWM) or current (VmRSS) resident memory; ru_maxrss would include the forking
    parent's on Linux, so it is only the fallback where /proc is absent (then for both)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def memory_use(impl: str, directory: str, args) -> dict[str, float]:
    """Peak and final resident memory (MB) of `impl` generating once, in a fresh process."""
    cmd = [sys.executable, __file__, "--peak-memory-of", impl, "--checkpoint", directory,
           "--batch-sizes", str(max(args.batch_sizes)), "--prompt-len", str(args.prompt_len),
           "--new-tokens", str(args.new_tokens)] + (["--threads", str(args.threads)] if args.threads else [])
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------- main


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="gpt2", help="model size preset (gpt2 = 124M)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 16],
                   help="batch sizes to measure (16 = `gpt2 serve`'s default --max-batch-size)")
    p.add_argument("--prompt-len", type=int, default=32, help="tokens per prompt")
    p.add_argument("--new-tokens", type=int, default=128, help="tokens generated per prompt")
    p.add_argument("--rounds", type=int, default=2, help="alternated timed rounds per batch size (best kept)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for every implementation "
                                                              "(default: torch's choice)")
    p.add_argument("--temperature", type=float, default=0.8, help="temperature of ours' sampled row")
    p.add_argument("--peak-memory-of", choices=["ours", "ours-eager", "transformers"], help=argparse.SUPPRESS)
    p.add_argument("--checkpoint", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.peak_memory_of:
        return peak_memory_child(args.peak_memory_of, args.checkpoint, args.batch_sizes[0], args.prompt_len,
                                 args.new_tokens)

    import transformers

    from gpt2.decoder import Decoder
    from gpt2.model import GPT, PRESETS

    torch.manual_seed(0)
    ours = GPT(PRESETS[args.preset]).eval()
    tmp = tempfile.TemporaryDirectory()
    ours.save_pretrained(tmp.name)
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp.name).eval()
    threads = torch.get_num_threads()
    print(f"CPU: {cpu_description()}")
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, threads {threads}, "
          f"{args.preset} ({ours.num_params() / 1e6:.1f}M params, fp32), prompt {args.prompt_len}, "
          f"new {args.new_tokens}, greedy, best of {args.rounds} alternated rounds")
    from gpt2 import compile_cache
    from gpt2 import compiled as aot

    cached = compile_cache.verify(compile_cache.cache_root() / aot.cache_key(ours)) is None
    compiled = Decoder(ours, compile=True)
    if not cached:
        print(f"one-time cost (ours: compiling the model's pieces, once per weights, torch and CPU): "
              f"{compiled.compile_seconds:.1f} s", flush=True)
        compiled = Decoder(ours, compile=True)
    print(f"start-up cost (ours: loading the compiled pieces from {compile_cache.cache_root()}, every chat/server "
          "start): "
          f"{compiled.compile_seconds:.1f} s", flush=True)
    try:
        import onnxruntime

        t0 = time.perf_counter()
        ort = OrtGreedy(ours, threads, tmp.name)
        print(f"ONNX Runtime {onnxruntime.__version__}: export + session {time.perf_counter() - t0:.1f} s")
    except Exception as e:  # ImportError when the bench extra is absent; an export failure says why
        ort, why = None, f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
        print(f"ONNX Runtime skipped: {why} (pip install -e '.[bench]')")

    header = (f"{'batch':>5} {'ours':>7} {'HF':>7} {'ORT':>7} {'vs HF':>6} {'vs ORT':>6} "
              f"{'sampled':>8} {'/greedy':>7} {'eager':>7}  checks")
    print("tok/s (ours: the compiled pieces, as chat, serve and generate --compile run; eager: --no-compile)\n"
          + header)
    for B in args.batch_sizes:
        measure_batch(B, ours, compiled, hf, ort, args)
    mb = {impl: memory_use(impl, tmp.name, args) for impl in ("ours", "ours-eager", "transformers")}
    for key, what in (("peak_mb", "peak memory"), ("resident_mb", "resident memory after generating")):
        ours, eager, hf = mb["ours"][key], mb["ours-eager"][key], mb["transformers"][key]
        print(f"{what} at batch {max(args.batch_sizes)} (fresh process each; ours as a start with its compiled "
              f"pieces cached): ours {ours:.0f} MB "
              f"({ours / hf:.2f}x), eager {eager:.0f} MB ({eager / hf:.2f}x), transformers {hf:.0f} MB")
    tmp.cleanup()


def measure_batch(B: int, ours, compiled, hf, ort: OrtGreedy | None, args) -> None:
    """One table row: all implementations at batch B, alternated."""
    from gpt2.inference import generate

    ids = torch.randint(0, 50257, (B, args.prompt_len))
    mask = torch.ones_like(ids)
    runs: dict[str, Callable[[], object]] = {
        "ours": lambda: generate(ours, ids, mask, 0.0, args.new_tokens, eos_id=None, decoder=compiled),
        "sampled": lambda: generate(ours, ids, mask, args.temperature, args.new_tokens, eos_id=None,
                                    generator=torch.Generator().manual_seed(0), decoder=compiled),
        "eager": lambda: generate(ours, ids, mask, 0.0, args.new_tokens, eos_id=None),
        "hf": lambda: hf_greedy(hf, ids, mask, args.new_tokens),
    }
    if ort is not None:
        runs["ort"] = lambda: ort.generate(ids, args.new_tokens)
    t, out = alternate(runs, args.rounds)
    n = B * args.new_tokens
    rate = {k: n / v for k, v in t.items()}
    checks = []
    if B == 1:
        checks.append(f"greedy == HF: {out['ours'] == out['hf']}")
        if ort is not None:
            checks.append(f"== ORT: {out['ours'] == out['ort']}")
    else:
        alone = [generate(ours, ids[i:i + 1], mask[i:i + 1], 0.0, args.new_tokens, eos_id=None,
                          decoder=compiled)[0] for i in range(B)]
        checks.append(f"rows == alone: {alone == out['ours']}")
    ort_rate = f"{rate['ort']:>7.1f}" if ort is not None else f"{'-':>7}"
    ort_ratio = f"{rate['ours'] / rate['ort']:>5.2f}x" if ort is not None else f"{'-':>6}"
    print(f"{B:>5} {rate['ours']:>7.1f} {rate['hf']:>7.1f} {ort_rate} {rate['ours'] / rate['hf']:>5.2f}x "
          f"{ort_ratio} {rate['sampled']:>8.1f} {rate['sampled'] / rate['ours']:>6.2f}x {rate['eager']:>7.1f}  "
          f"{', '.join(checks)}",
          flush=True)


def hf_greedy(hf, ids: torch.Tensor, mask: torch.Tensor, new_tokens: int) -> list[list[int]]:
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                          do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[:, ids.size(1):].tolist()


if __name__ == "__main__":
    main()
