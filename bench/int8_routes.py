"""Which way to run 8-bit weights on this CPU: the candidate routes against fp32, measured in one run.

Two levels, each in rounds that alternate the routes (the fastest round of each kept, so that other load on the
machine hits them alike), printed as milliseconds and as speed relative to fp32 eager:
- **linears**: 12 distinct 768 x 3072 linears (so their weights stream from memory, as a decoding step's do)
  at 1 and 8 rows: fp32 `x @ W` eagerly and compiled (inductor, frozen weights, GEMMs autotuned), fbgemm's
  dynamic int8 linear with its own per-matrix activation range and as `gpt2.decode.int8` runs it (each row on
  its own range), and torchao's int8 configs (dynamic-activation and weight-only), eagerly and compiled, when
  torchao is installed. `--no-compiled` skips the compiled ones (minutes of compiling).
- **decoding**: greedy decoding of a random-weight model (`--preset`, default 124M), `--prompt-len` tokens
  then `--new-tokens`, at each batch size: fp32 eager (`Decoder(model)`), fp32 compiled (`Decoder(model,
  compile=True)`: its pieces are compiled first if they are not cached, minutes) and int8 (`Decoder(model,
  weights_dtype="int8")`), with the share of greedy tokens int8 agrees on with fp32.

    python bench/int8_routes.py [--threads 2] [--rounds 5] [--batch-sizes 1 8] [--no-compiled]
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from generate import alternate, cpu_description  # noqa: E402  (bench/generate.py)

from gpt2.decode.int8 import Int8Linear, quantize_rows  # noqa: E402

IN, OUT, LAYERS = 768, 3072, 12
COMPILE_OPTIONS = {"freezing": True, "max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN"}


class Stack(nn.Module):
    """`LAYERS` linears applied to the same input (each output kept), weights given as nn.Linear (out, in)."""

    def __init__(self, linears: list[nn.Module]):
        super().__init__()
        self.linears = nn.ModuleList(linears)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [linear(x) for linear in self.linears]


class MatmulIn(nn.Module):
    """fp32 `x @ W + b` with W stored (in, out): how the model's projections run eagerly."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.weight = nn.Parameter(linear.weight.detach().t().contiguous())
        self.bias = nn.Parameter(linear.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.bias, x, self.weight)


class FbgemmPerMatrix(nn.Module):
    """fbgemm's dynamic int8 linear as `torch.ao.quantization.quantize_dynamic` makes it (one activation range
    for the whole input matrix)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.packed = torch.ops.quantized.linear_prepack(quantize_rows(linear.weight), None)
        self.bias = nn.Parameter(linear.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized.linear_dynamic(x, self.packed, True) + self.bias  # True: reduce_range


def fp32_linears() -> list[nn.Linear]:
    torch.manual_seed(0)
    out = []
    for _ in range(LAYERS):
        linear = nn.Linear(IN, OUT)
        nn.init.normal_(linear.weight, std=0.02)
        nn.init.normal_(linear.bias, std=0.02)
        out.append(linear.eval())
    return out


def torchao_stack(config_name: str) -> nn.Module:
    import torchao.quantization as tq

    model = Stack(fp32_linears()).eval()
    tq.quantize_(model, getattr(tq, config_name)())
    return model


def linear_routes(compiled: bool) -> dict[str, Callable[[torch.Tensor], object]]:
    """The routes of the linears level, by name (a route that cannot be made here is reported and left out)."""
    base = fp32_linears()
    routes: dict[str, Callable[[torch.Tensor], object]] = {
        "fp32 eager (x @ W)": Stack([MatmulIn(lin) for lin in base]).eval(),
        "int8 fbgemm, per-matrix range": Stack([FbgemmPerMatrix(lin) for lin in base]).eval(),
        "int8 fbgemm, per-token range (ours)":
            Stack([Int8Linear(lin.weight, lin.bias) for lin in base]).eval(),
    }
    makers: dict[str, Callable[[], nn.Module]] = {
        "torchao int8 dyn-act eager": lambda: torchao_stack("Int8DynamicActivationInt8WeightConfig"),
        "torchao int8 weight-only eager": lambda: torchao_stack("Int8WeightOnlyConfig"),
    }
    if compiled:
        makers["fp32 compiled"] = lambda: torch.compile(Stack([MatmulIn(lin) for lin in base]).eval(),
                                                        options=COMPILE_OPTIONS)
        makers["torchao int8 dyn-act compiled"] = lambda: torch.compile(
            torchao_stack("Int8DynamicActivationInt8WeightConfig"), options=COMPILE_OPTIONS)
        makers["torchao int8 weight-only compiled"] = lambda: torch.compile(
            torchao_stack("Int8WeightOnlyConfig"), options=COMPILE_OPTIONS)
    for name, make in makers.items():
        try:
            routes[name] = make()
        except Exception as e:  # torchao absent (ImportError), or a route this torch cannot build
            print(f"  {name}: skipped ({type(e).__name__}: {str(e).splitlines()[0][:100]})")
    return routes


def table(title: str, times: dict[str, dict[int, float]], unit: str) -> None:
    """Rows: routes; columns: each size's time and its speed relative to the first route."""
    sizes = sorted(next(iter(times.values())))
    base = next(iter(times.values()))
    print(f"\n{title}\n| route | " + " | ".join(f"{unit} {s}" for s in sizes) + " |")
    print("|---|" + "---|" * len(sizes))
    for name, t in times.items():
        cells = [f"{t[s] * 1000:.2f} ms ({base[s] / t[s]:.2f}x)" if s in t else "-" for s in sizes]
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


@torch.inference_mode()
def measure_linears(args) -> None:
    routes = linear_routes(args.compiled)
    times: dict[str, dict[int, float]] = {name: {} for name in routes}
    for rows in (1, 8):
        x = torch.randn(rows, IN)
        t0 = time.perf_counter()
        best, _ = alternate({name: (lambda f=f, x=x: f(x)) for name, f in routes.items()}, args.rounds * 4)
        for name, seconds in best.items():
            times[name][rows] = seconds
        print(f"  rows {rows}: warm-up and {args.rounds * 4} rounds in {time.perf_counter() - t0:.0f} s", flush=True)
    table(f"{LAYERS} linears {IN} x {OUT}, streaming (best of {args.rounds * 4} alternated rounds; x: speed "
          "relative to fp32 eager)", times, "rows")


def measure_decoding(args) -> None:
    from gpt2.decode import Decoder
    from gpt2.inference import generate
    from gpt2.model import GPT, PRESETS

    torch.manual_seed(0)  # the model bench/generate.py measures: they share compiled pieces
    model = GPT(PRESETS[args.preset]).eval()
    t0 = time.perf_counter()
    decoders = {"fp32 eager": Decoder(model)}
    if args.compiled:
        decoders["fp32 compiled"] = Decoder(model, compile=True)
    print(f"  fp32 decoders ready in {time.perf_counter() - t0:.0f} s", flush=True)
    t0 = time.perf_counter()
    decoders["int8 (ours)"] = Decoder(model, weights_dtype="int8")
    print(f"  int8 weights made in {time.perf_counter() - t0:.1f} s", flush=True)
    times: dict[str, dict[int, float]] = {name: {} for name in decoders}
    for B in args.batch_sizes:
        ids = torch.randint(0, model.config.vocab_size, (B, args.prompt_len))
        mask = torch.ones_like(ids)
        runs = {name: (lambda d=d, ids=ids, mask=mask: generate(model, ids, mask, 0.0, args.new_tokens, eos_id=None,
                                                                decoder=d))
                for name, d in decoders.items()}
        best, outs = alternate(runs, args.rounds)
        for name, seconds in best.items():
            times[name][B] = seconds / args.new_tokens  # per step
        ref, got = outs["fp32 eager"], outs["int8 (ours)"]
        agree = sum(a == b for r, g in zip(ref, got) for a, b in zip(r, g)) / sum(len(r) for r in ref)
        print(f"  batch {B}: int8's greedy tokens equal fp32 eager's at {agree:.0%} of positions (random "
              "weights: near-ties are common)", flush=True)
    table(f"decoding, {args.preset} ({model.num_params() / 1e6:.0f}M), prompt {args.prompt_len}, "
          f"{args.new_tokens} new tokens, greedy: time per step (best of {args.rounds} alternated rounds; x: "
          "speed relative to fp32 eager)", times, "batch")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2, help="CPU threads for every route")
    p.add_argument("--rounds", type=int, default=5, help="alternated timed rounds (linears: 4x as many)")
    p.add_argument("--preset", default="gpt2", help="model size of the decoding level (gpt2 = 124M)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8], help="decoding batch sizes")
    p.add_argument("--prompt-len", type=int, default=32, help="tokens per prompt")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens generated per prompt")
    p.add_argument("--no-compiled", dest="compiled", action="store_false",
                   help="leave out the compiled routes (their compiling takes minutes)")
    p.add_argument("--level", choices=["linears", "decoding", "both"], default="both", help="what to measure")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")  # torch.ao's and torchao's deprecation notes, once per module made
    print(f"CPU: {cpu_description()}; torch {torch.__version__}, {args.threads} threads, quantized engine "
          f"{torch.backends.quantized.engine}")
    if args.level in ("linears", "both"):
        measure_linears(args)
    if args.level in ("decoding", "both"):
        measure_decoding(args)


if __name__ == "__main__":
    main()
