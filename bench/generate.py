"""Greedy generation speed on CPU: gpt2-scratch (fp32 and int8) vs `transformers` generate vs ONNX Runtime (fp32 and
int8) vs llama.cpp (F32 and Q8_0), one run.

A random-weight GPT-2 124M is saved once in HF format and loaded by every implementation. Each generates
`--new-tokens` tokens greedily for `--prompt-len`-token prompts at each batch size (stop token disabled, so
all produce exactly the same number of tokens), in rounds that alternate the implementations so that other
load on the machine hits them alike; the fastest round of each is kept. Printed: the CPU model and its
vector extensions, one table of tokens/s (a column per implementation) and one of ratios (ours against each
implementation a user would run instead), ours with temperature sampling, the one-time cost, peak memory of ours
(fp32 and int8) against transformers (each in a fresh process), and checks: ours' greedy tokens equal
transformers' and ONNX Runtime's at batch 1, each batch row equals that prompt decoded alone, and int8's greedy
tokens agree with fp32's (ours and ONNX Runtime's; llama.cpp Q8_0's with its F32) at a share of positions (random
weights have many near-ties), as llama.cpp F32's agree with ours (at batch 1 with where they first differ and how
near a tie that was in our logits).

"ours" is the compiled decoder (`Decoder(model, compile=True)`: what `gpt2 chat`, `gpt2 serve` and
`gpt2 generate --compile` run; its pieces are compiled once per weights, torch and CPU and cached, see
`gpt2.compiled`); "eager" is the same decoder without compiling (`--no-compile`, and `generate()` called
without a decoder, as training's samples do); "ours int8" is `Decoder(model, weights_dtype="int8")`
(`--weights-dtype int8`: 8-bit weights, fbgemm's integer kernels). Memory is measured as the commands run it: a
start with the compiled pieces cached, the model's weights handed over (`release_weights`).

ONNX Runtime runs an ONNX export of the same fp32 weights: one graph taking the past keys/values as inputs
and returning them extended (the plain way to run GPT-2 with a KV cache there); "ORT int8" is that export with
its weight products as MatMul nodes, quantized by `onnxruntime.quantization.quantize_dynamic` (per-channel
symmetric int8 weights, as ours). It is an optional bench dependency (`pip install -e ".[bench]"`); without it
those columns say why they are missing.

llama.cpp runs the GGUF export of the same weights (`gpt2.export.gguf.write_gguf`, as `gpt2 export --format gguf
--outtype f32|q8_0` writes it; Q8_0: blocks of 32 weights with one scale each) through llama-cpp-python's
low-level API: every row of the batch is one sequence of one context, the prompts are one `llama_decode`, then
each step decodes one token per row in one `llama_decode` and takes the argmax of each row's logits (no sampler,
so no stop token and exactly `--new-tokens` tokens; no BOS), with the bench's threads and llama.cpp's default f16
K/V cache. It needs llama-cpp-python (`pip install -e ".[llama]"`); without it those columns say why they are
missing.

Another engine is one more `Column` in `columns()` (and, to compare against it, one more pair in `RATIOS`).

    python bench/generate.py [--batch-sizes 1 8 16] [--prompt-len 32] [--new-tokens 128] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
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


class _MatMulProjection(torch.nn.Module):
    """A `Projection` as `x @ W + b`, which ONNX exports as MatMul and Add (the model's `addmm` becomes Gemm, which
    ONNX Runtime's dynamic quantizer leaves in fp32)."""

    def __init__(self, projection):
        super().__init__()
        self.weight, self.bias = projection.weight, projection.bias

    def forward(self, x):
        return x @ self.weight + self.bias


class _MatMulHead(torch.nn.Module):
    """The tied head as `x @ W.T` (MatMul), for the same reason."""

    def __init__(self, weight):
        super().__init__()
        self.weight = weight

    def forward(self, x):
        return x @ self.weight.t()


def matmul_copy(model):
    """A copy of `model` whose weight products export as MatMul nodes (`_MatMulProjection`, `_MatMulHead`)."""
    import copy

    from gpt2.model import Projection

    out = copy.deepcopy(model)
    for name, module in list(out.named_modules()):
        if isinstance(module, Projection):
            out.set_submodule(name, _MatMulProjection(module))
    out.lm_head = _MatMulHead(out.transformer.wte.weight)
    return out


class OrtGreedy:
    """Greedy decoding with ONNX Runtime on an ONNX export of `model` (same weights, fp32); with `int8`, the export
    quantized by ONNX Runtime's `quantize_dynamic` (per-channel symmetric int8 weights)."""

    def __init__(self, model, threads: int, directory: str, int8: bool = False):
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
        path = os.path.join(directory, "gpt2_step_int8.onnx" if int8 else "gpt2_step.onnx")
        torch.onnx.export(_StepGraph(matmul_copy(model) if int8 else model).eval(), (ids, pos, mask, *past), path,
                          dynamo=False, input_names=["ids", "positions", "mask", *names],
                          output_names=["logits", *[f"present_{i}" for i in range(2 * self.L)]],
                          dynamic_axes=dyn, opset_version=17)
        if int8:
            from onnxruntime.quantization import QuantType, quantize_dynamic

            quantized = path.replace(".onnx", ".q.onnx")
            quantize_dynamic(path, quantized, per_channel=True, weight_type=QuantType.QInt8)
            path = quantized
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
        self.session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        self.names = names

    def generate_for(self, new_tokens: int) -> Callable[[torch.Tensor], list[list[int]]]:
        return lambda ids: self.generate(ids, new_tokens)

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


# ---------------------------------------------------------------------------------------------- llama.cpp


class LlamaGreedy:
    """Greedy decoding by llama.cpp on the GGUF export of `model` (`gpt2.export.gguf.write_gguf`, 2-D weights in
    `outtype`), through llama-cpp-python's low-level API: the prompts go in as one batch of B sequences (one
    sequence id per row), then each step decodes one token per row in one `llama_decode`, and the next token is
    the argmax of that row's logits (`llama_get_logits_ith`). No sampler: nothing stops a row early, and the ids go
    in as given (no BOS). The K/V cache is llama.cpp's default (f16), as its users run it."""

    def __init__(self, model, outtype: str, threads: int, directory: str):
        import llama_cpp
        import numpy as np

        from gpt2.export.gguf import write_gguf

        path = write_gguf(model, Path(directory) / f"gpt2-{outtype}.gguf", outtype, name="gpt2-bench",
                          progress=False)
        logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)  # its loader logs every tensor otherwise
        llama_cpp.llama_backend_init()
        self.lc, self.np, self.threads = llama_cpp, np, threads
        self.model = llama_cpp.llama_model_load_from_file(str(path).encode(), llama_cpp.llama_model_default_params())
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self.model))
        self.ctx, self.shape = None, (0, 0)

    def context(self, rows: int, length: int):
        """A context (and a batch) for `rows` sequences of `length` tokens: made anew when the shape changes (one
        batch size per table row), so batch 1 runs in a one-sequence context, as a user's would."""
        lc = self.lc
        if self.shape != (rows, length):
            if self.ctx is not None:
                lc.llama_batch_free(self.batch)
                lc.llama_free(self.ctx)
            params = lc.llama_context_default_params()
            # each sequence gets n_ctx / n_seq_max cells; llama.cpp pads its context to 256 cells (and warns
            # when the padded size no longer divides among the sequences)
            params.n_ctx = rows * -(-length // 256) * 256
            params.n_batch = params.n_ubatch = rows * length  # the whole prefill in one batch
            params.n_seq_max = rows
            params.n_threads = params.n_threads_batch = self.threads
            self.ctx = lc.llama_init_from_model(self.model, params)
            if not self.ctx:
                raise RuntimeError(f"llama.cpp could not make a context of {rows} x {length} tokens")
            self.batch, self.shape = lc.llama_batch_init(rows * length, 0, 1), (rows, length)
        lc.llama_memory_clear(lc.llama_get_memory(self.ctx), True)
        return self.ctx

    def generate_for(self, new_tokens: int) -> Callable[[torch.Tensor], list[list[int]]]:
        return lambda ids: self.generate(ids, new_tokens)

    def generate(self, ids: torch.Tensor, new_tokens: int) -> list[list[int]]:
        B, T = ids.shape
        ctx = self.context(B, T + new_tokens)
        prompts = ids.tolist()
        # (row, position, token, wants logits) for every prompt token; logits only at each row's last one
        nxt = self.decode(ctx, [(r, t, prompts[r][t], t == T - 1) for r in range(B) for t in range(T)])
        out = [nxt]
        for step in range(new_tokens - 1):
            nxt = self.decode(ctx, [(r, T + step, nxt[r], True) for r in range(B)])
            out.append(nxt)
        return [list(row) for row in zip(*out)]

    def decode(self, ctx, tokens: list[tuple[int, int, int, bool]]) -> list[int]:
        """One `llama_decode` of `tokens` (row = sequence id, position, token, wants logits); the argmax of each
        row's logits, in row order."""
        lc, batch = self.lc, self.batch
        batch.n_tokens = len(tokens)
        outputs = []
        for i, (row, pos, token, wanted) in enumerate(tokens):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, pos, 1, wanted
            batch.seq_id[i][0] = row
            if wanted:
                outputs.append(i)
        if (rc := lc.llama_decode(ctx, batch)) != 0:
            raise RuntimeError(f"llama_decode returned {rc}")
        return [int(self.np.ctypeslib.as_array(lc.llama_get_logits_ith(ctx, i), shape=(self.n_vocab,)).argmax())
                for i in outputs]


# ---------------------------------------------------------------------------------------------- peak memory


def peak_memory_child(impl: str, directory: str, batch: int, prompt_len: int, new_tokens: int) -> None:
    """In a fresh process: load, generate once, print the peak resident memory and the resident memory at the
    end (what a chat or server keeps while it runs) in MB."""
    torch.manual_seed(0)
    ids = torch.randint(0, 50257, (batch, prompt_len))
    if impl.startswith("ours"):
        from gpt2.decode import Decoder
        from gpt2.inference import generate
        from gpt2.model import GPT

        model = GPT.from_pretrained(directory).eval()
        decoder = {"ours": lambda: Decoder(model, compile=True, release_weights=True),
                   "ours-int8": lambda: Decoder(model, release_weights=True, weights_dtype="int8"),
                   "ours-eager": lambda: Decoder(model)}[impl]()
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
    p.add_argument("--peak-memory-of", choices=["ours", "ours-int8", "ours-eager", "transformers"],
                   help=argparse.SUPPRESS)
    p.add_argument("--checkpoint", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.peak_memory_of:
        return peak_memory_child(args.peak_memory_of, args.checkpoint, args.batch_sizes[0], args.prompt_len,
                                 args.new_tokens)

    import transformers

    from gpt2.decode import Decoder
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
    from gpt2.decode import compile_cache
    from gpt2.decode import compiled as aot

    cached = compile_cache.verify(compile_cache.cache_root() / aot.cache_key(ours)) is None
    compiled = Decoder(ours, compile=True)
    if not cached:
        print(f"one-time cost (ours: compiling the model's pieces, once per weights, torch and CPU): "
              f"{compiled.compile_seconds:.1f} s", flush=True)
        compiled = Decoder(ours, compile=True)
    print(f"start-up cost (ours: loading the compiled pieces from {compile_cache.cache_root()}, every chat/server "
          "start): "
          f"{compiled.compile_seconds:.1f} s", flush=True)
    t0 = time.perf_counter()
    int8 = Decoder(ours, weights_dtype="int8")
    print(f"start-up cost (ours int8: quantizing the weights, every start): {time.perf_counter() - t0:.1f} s")
    engines = {name: ort_session(ours, threads, tmp.name, int8=q) for name, q in (("ORT", False), ("ORT int8", True))}
    engines |= {f"llama.cpp {t.upper()}": llama_session(ours, t, threads, tmp.name) for t in ("f32", "q8_0")}
    cols = columns(ours, compiled, int8, hf, engines, args.new_tokens)
    names = [c.name for c in cols]
    print("\ntok/s (ours: the compiled pieces, as chat, serve and generate --compile run; eager: --no-compile; "
          "ours int8: --weights-dtype int8)")
    print("| batch | " + " | ".join(names) + " | ours sampled / greedy | checks |\n|---|" + "---|" * (len(names) + 2))
    ratios = []
    for B in args.batch_sizes:
        ratios.append((B, measure_batch(B, ours, cols, compiled, args)))
    print("\nratios (tokens/s of the first against the second, same run)\n| batch | "
          + " | ".join(f"{a} / {b}" for a, b in RATIOS) + " |\n|---|" + "---|" * len(RATIOS))
    for B, rate in ratios:
        cells = [f"{rate[a] / rate[b]:.2f}x" if a in rate and b in rate else "-" for a, b in RATIOS]
        print(f"| {B} | " + " | ".join(cells) + " |")
    mb = {impl: memory_use(impl, tmp.name, args) for impl in ("ours", "ours-int8", "ours-eager", "transformers")}
    for key, what in (("peak_mb", "peak memory"), ("resident_mb", "resident memory after generating")):
        hf_mb = mb["transformers"][key]
        parts = [f"{impl} {mb[impl][key]:.0f} MB ({mb[impl][key] / hf_mb:.2f}x)"
                 for impl in ("ours", "ours-int8", "ours-eager")]
        print(f"{what} at batch {max(args.batch_sizes)} (fresh process each; ours as a start with its compiled "
              f"pieces cached): {', '.join(parts)}, transformers {hf_mb:.0f} MB")
    tmp.cleanup()


@dataclass
class Column:
    """One implementation of the table: `run(ids)` decodes the prompts (B, T) greedily, returning the new tokens."""

    name: str
    run: Callable[[torch.Tensor], list[list[int]]]


# (ours, theirs) pairs printed as ratios of tokens/s; a pair whose column is missing prints "-"
RATIOS = [("ours", "ORT"), ("ours int8", "ORT int8"), ("ours int8", "ours"), ("ours", "HF"),
          ("ours", "llama.cpp F32"), ("ours int8", "llama.cpp Q8_0")]


def columns(ours, compiled, int8, hf, engines: dict[str, OrtGreedy | LlamaGreedy | None],
            new_tokens: int) -> list[Column]:
    """The table's implementations, in column order (ONNX Runtime's and llama.cpp's only where they could be set
    up)."""
    from gpt2.inference import generate

    def ours_with(decoder):
        return lambda ids: generate(ours, ids, torch.ones_like(ids), 0.0, new_tokens, eos_id=None, decoder=decoder)

    cols = [Column("ours", ours_with(compiled)), Column("ours int8", ours_with(int8)),
            Column("eager", ours_with(None)), Column("HF", lambda ids: hf_greedy(hf, ids, new_tokens))]
    cols += [Column(name, engine.generate_for(new_tokens)) for name, engine in engines.items() if engine is not None]
    return cols


def ort_session(model, threads: int, directory: str, int8: bool) -> OrtGreedy | None:
    """ONNX Runtime on an export of `model` (quantized with `int8`), or None with the reason printed."""
    return set_up("ONNX Runtime" + (" int8" if int8 else ""), "onnxruntime",
                  f"export{' + quantize' if int8 else ''} + session", "bench",
                  lambda: OrtGreedy(model, threads, directory, int8=int8))


def llama_session(model, outtype: str, threads: int, directory: str) -> LlamaGreedy | None:
    """llama.cpp on the GGUF export of `model` at `outtype`, or None with the reason printed."""
    return set_up(f"llama.cpp {outtype.upper()}", "llama_cpp", "GGUF export + load", "llama",
                  lambda: LlamaGreedy(model, outtype, threads, directory))


def set_up(label: str, package: str, what: str, extra: str, make: Callable[[], object]):
    """`make()` with its time and `package`'s version printed, or None with the reason printed: the package is
    absent (install the `extra`) or the export or load failed."""
    try:
        version = __import__(package).__version__
        t0 = time.perf_counter()
        engine = make()
        print(f"{label} ({package} {version}): {what} {time.perf_counter() - t0:.1f} s")
        return engine
    except Exception as e:  # ImportError when the extra is absent; an export failure says why
        print(f"{label} skipped: {type(e).__name__}: {str(e).splitlines()[0][:120]} (pip install -e '.[{extra}]')")
        return None


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """The share of positions where two greedy outputs have the same token."""
    return sum(x == y for ra, rb in zip(a, b) for x, y in zip(ra, rb)) / max(1, sum(len(r) for r in a))


def first_difference(model, ids: torch.Tensor, ours: list[int], theirs: list[int]) -> str:
    """Where a greedy row `theirs` first leaves `ours` (the continuation of the one prompt `ids`), and how near a
    tie that was in `model`'s own logits there: their token's logit below ours' top one."""
    k = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)
    if k is None:
        return " (all equal)"
    with torch.no_grad():
        logits = model(torch.cat([ids[0], torch.tensor(ours[:k], dtype=ids.dtype)])[None])[0, -1].float()
    return (f" (first difference at token {k + 1} of {len(ours)}, where ours' logit of their token is "
            f"{(logits[ours[k]] - logits[theirs[k]]).item():.4f} below its top one)")


def measure_batch(B: int, ours, cols: list[Column], compiled, args) -> dict[str, float]:
    """One table row: every column at batch B, alternated; returns tokens/s by column."""
    from gpt2.inference import generate

    ids = torch.randint(0, 50257, (B, args.prompt_len))
    mask = torch.ones_like(ids)
    runs: dict[str, Callable[[], object]] = {c.name: (lambda c=c: c.run(ids)) for c in cols}
    runs["sampled"] = lambda: generate(ours, ids, mask, args.temperature, args.new_tokens, eos_id=None,
                                       generator=torch.Generator().manual_seed(0), decoder=compiled)
    t, out = alternate(runs, args.rounds)
    rate = {k: B * args.new_tokens / v for k, v in t.items()}
    checks = []
    if B == 1:
        checks.append(f"greedy == HF: {out['ours'] == out['HF']}")
        if "ORT" in out:
            checks.append(f"== ORT: {out['ours'] == out['ORT']}")
    else:
        alone = [generate(ours, ids[i:i + 1], mask[i:i + 1], 0.0, args.new_tokens, eos_id=None,
                          decoder=compiled)[0] for i in range(B)]
        checks.append(f"rows == alone: {alone == out['ours']}")
    checks.append(f"int8 agrees with fp32 at {agreement(out['ours int8'], out['ours']):.0%}")
    if "ORT int8" in out and "ORT" in out:
        checks.append(f"ORT int8 with ORT at {agreement(out['ORT int8'], out['ORT']):.0%}")
    if "llama.cpp F32" in out:
        checks.append(f"llama.cpp F32 with ours at {agreement(out['llama.cpp F32'], out['ours']):.0%}"
                      + (first_difference(ours, ids, out["ours"][0], out["llama.cpp F32"][0]) if B == 1 else ""))
    if "llama.cpp Q8_0" in out and "llama.cpp F32" in out:
        checks.append(f"llama.cpp Q8_0 with F32 at {agreement(out['llama.cpp Q8_0'], out['llama.cpp F32']):.0%}")
    cells = [f"{rate[c.name]:.1f}" for c in cols]
    print(f"| {B} | " + " | ".join(cells) + f" | {rate['sampled'] / rate['ours']:.2f}x | {', '.join(checks)} |",
          flush=True)
    return rate


def hf_greedy(hf, ids: torch.Tensor, new_tokens: int) -> list[list[int]]:
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[:, ids.size(1):].tolist()


if __name__ == "__main__":
    main()
