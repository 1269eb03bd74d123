"""8-bit weights for decoding on a CPU: a copy of a `GPT` whose weight matrices are int8 (`quantized`).

`gpt2.decode.Decoder(model, weights_dtype="int8")` decodes on it; so do `gpt2 chat`, `gpt2 serve` and `gpt2
generate` with `--weights-dtype int8`. The model (`gpt2.model`) knows nothing of it: the copy is the model's own
class running its own forward, with each `Projection`, the token embedding and the head replaced by the modules
below, so attention, the LayerNorms, the KV cache and the masks are the model's code unchanged.

Design decisions (the measurements behind them: docs/int8.md):
- **fbgemm's dynamic int8 linear** (`torch.ops.quantized.linear_dynamic` on a weight packed by
  `torch.ops.quantized.linear_prepack`: PyTorch's x86 quantized engine, the ops that
  `torch.ao.nn.quantized.dynamic.Linear` calls, called directly to skip that module's per-call lookups) multiplies
  8-bit activations by 8-bit weights in integer arithmetic, which needs AVX2 and nothing more. The alternatives
  measured slower than fp32 on an AVX2-only CPU: torchao's int8 configs run an integer matmul or a dequantised copy
  of the weight eagerly, and compiled, its dynamic-activation config lowers to oneDNN's int8 linear, which has no
  fast signed-activation kernel without VNNI; inductor's int8 weight-only GEMM template is matched for bfloat16
  activations only. `torch.ao.quantization` is deprecated in favour of torchao, whose CPU int8 kernels are not
  faster here; this module uses only those two ops and `torch.quantize_per_channel` (quantized tensors are
  deprecated as well: `quantized` silences their warning), and where a torch lacks them `quantized` says so in one
  line (a `UserError`: decode with another `--weights-dtype`).
- **Weights: per output channel, symmetric**, `round(w / s)` with `s = max|w| / 127` per output channel (per
  vocabulary row for the head), zero points 0. Biases stay fp32 and are added after the product.
- **Activations: per token, a fixed range.** fbgemm quantizes its input with one scale and zero point for the whole
  matrix, which would make a row's result depend on the other rows of its batch. So each token's activation vector
  is divided by its largest magnitude, two extra columns holding +1 and -1 (multiplied by two zero columns of the
  weight, so they add nothing) pin the matrix's range to exactly [-1, 1], and the output rows are multiplied back:
  every token is quantized alone (7 bits over its own range: the engine keeps `reduce_range`, which avoids 16-bit
  saturation on CPUs without VNNI), so a prompt's tokens are the same alone, in a batch and in the server, as in
  fp32 decoding. (Columns, not an extra row: at one token, fbgemm's product of one row is much faster than of two,
  and the integer sums are the same.)
- **The head and the token embedding are 8-bit too**, with the same per-row codes of the tied (vocab_size, C)
  matrix (its padding rows dropped): the head is an `Int8Linear` over it, the embedding looks rows up in a plain
  int8 copy (fbgemm's packed layout cannot be indexed) and scales them. Position embeddings, LayerNorms and biases are
  small and stay fp32.
"""

from __future__ import annotations

import copy
import warnings

import torch
import torch.nn as nn

from gpt2.errors import UserError
from gpt2.model import GPT, Projection

WEIGHTS_DTYPES = ("float32", "bfloat16", "float16", "int8")
_TINY = 1e-12  # a token whose activations are all zero divides by this instead of by zero
PIN_COLUMNS = 2  # the activations' extra columns, +1 and -1, that fix their range (see above)


def quantize_rows(w: torch.Tensor, pad: int = 0) -> torch.Tensor:
    """`w` (out, in) as a qint8 tensor quantized per row (output channel), symmetric: round(w / s) with
    s = max|w| / 127 per row, zero points 0; with `pad`, that many zero columns appended (the scales are `w`'s),
    made before quantizing so that no float copy of the quantized matrix is needed."""
    w = w.detach().float()
    scale = w.abs().amax(1).clamp_(min=_TINY).div_(127)  # (out,)
    if pad:
        w = torch.cat([w, w.new_zeros(w.size(0), pad)], 1)
    return torch.quantize_per_channel(w, scale.double(), torch.zeros(w.size(0), dtype=torch.long), 0, torch.qint8)


class Int8Linear(nn.Module):
    """`x @ W.T + b` (W (out, in)) with W in int8 and each token's activations quantized on their own range."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = weight.shape  # weight: (out, in), float
        # fbgemm's packed weight (its dynamic linear's own op, as `torch.ao.nn.quantized.dynamic.Linear` calls
        # it, without that module's per-call attribute lookups), with the zero columns the pin multiplies
        self.packed = torch.ops.quantized.linear_prepack(quantize_rows(weight, pad=PIN_COLUMNS), None)
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self.register_buffer("pin", torch.tensor([[1.0, -1.0]]))  # (1, PIN_COLUMNS): the range's two ends

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)  # (N, in), float32
        # few operations, each chosen for speed at a few rows: at one row they are a visible share of the product
        amax = flat.abs().amax(1, keepdim=True).clamp_(min=_TINY)  # (N, 1)
        pinned = torch.cat([flat / amax, self.pin.expand(flat.size(0), PIN_COLUMNS)], 1)  # (N, in + 2)
        y = torch.ops.quantized.linear_dynamic(pinned, self.packed, True)  # (N, out); True: reduce_range
        y = y.mul_(amax) if self.bias is None else torch.addcmul(self.bias, y, amax)
        return y.view(*x.shape[:-1], self.out_features)


class Int8Embedding(nn.Module):
    """Rows of an int8 table, each times its scale: the token embedding from the head's quantized matrix."""

    def __init__(self, qweight: torch.Tensor):
        super().__init__()
        self.register_buffer("q", qweight.int_repr())  # (V, C) int8
        self.register_buffer("scale", qweight.q_per_channel_scales().float())  # (V,)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.q[idx].float() * self.scale[idx].unsqueeze(-1)


def check_supported(model: GPT) -> None:
    """Raises `UserError` where `quantized(model)` cannot run: a model off the CPU, or no int8 engine for this
    torch and CPU."""
    if model.lm_head.weight.device.type != "cpu":
        raise UserError(f"--weights-dtype int8 decodes on a CPU only (the model is on "
                        f"{model.lm_head.weight.device.type}); use bfloat16 or float16 there")
    engines = torch.backends.quantized.supported_engines
    ops = all(hasattr(torch.ops.quantized, op) for op in ("linear_prepack", "linear_dynamic"))
    if not ops or not {"fbgemm", "x86"} & set(engines) or torch.backends.cpu.get_cpu_capability() == "DEFAULT":
        raise UserError("--weights-dtype int8 needs PyTorch's x86 int8 engine (fbgemm) and a CPU with AVX2, which "
                        "this build or CPU lacks; decode with --weights-dtype float32")


def quantizing_note(model: GPT) -> str:
    """The line a command says before `quantized(model)`, whose seconds grow with the model."""
    return (f"note: quantizing the weights to int8 ({model.num_params() / 1e6:.1f}M parameters, at each start; "
            "nothing is cached)")


def quantized(model: GPT) -> GPT:
    """A copy of `model` (any float dtype, on the CPU) with int8 weights, computing in fp32; `model` is unchanged.
    Raises `UserError` where this torch has no int8 engine for this CPU (`check_supported`)."""
    check_supported(model)
    config = model.config
    with torch.device("meta"):
        out = GPT(config).eval()
    with warnings.catch_warnings():  # quantized tensors' deprecation (see the module docstring)
        warnings.simplefilter("ignore")
        for name, module in model.named_modules():
            if isinstance(module, Projection):
                out.set_submodule(name, Int8Linear(module.weight.t(), module.bias))  # weight stored (in, out)
            elif isinstance(module, (nn.LayerNorm, nn.Embedding)) and module is not model.transformer.wte:
                out.set_submodule(name, copy.deepcopy(module).float())  # position embeddings, LayerNorms
        head = model.transformer.wte.weight[: config.vocab_size]  # the same codes in both: padding adds columns
        out.transformer.wte = Int8Embedding(quantize_rows(head))
        out.lm_head = Int8Linear(head, None)
    left = [k for k, v in [*out.named_parameters(), *out.named_buffers()] if v.is_meta]  # (state_dict() would
    # unpack every fbgemm weight)
    if left:  # a module kind this function does not know of: fail here, not in the first forward
        raise TypeError(f"quantized: no int8 or fp32 copy made of {left[:3]}")
    return out
