"""Frozen-weight products and decoding attention for a CPU.

Design decisions:
- A decoding step multiplies a few rows (batch x new tokens) by every weight matrix once, so on a CPU it is
  bound by how fast the weights stream through the cores, not by arithmetic. Two ways to stream them faster,
  both fp32 throughout, tried in this order:
  - the native kernel of `gpt2.native` (C, compiled on first use): a layout packed for it and software
    prefetching; ~24 GB/s against ~19 for MKL at 8 rows on a 2-core Xeon, so used up to NATIVE_MAX_ROWS;
  - MKL's pre-packed sgemm (`cblas_sgemm_pack`, exposed by PyTorch as `torch.ops.mkl._mkl_reorder_linear_weight`
    / `_mkl_linear`, what inductor's CPU weight freezing uses): 10-30% faster than `addmm` for 8-40 rows.
  With the native kernels, a decoding step's attention also runs natively (`CausalSelfAttention.step_attention`):
  it writes the new keys and values and streams the cache once, prefetching; it needs no preparation.
- Greedy decoding needs only the argmax of the 50257 logits, not the logits. `FrozenHead.argmax` screens the
  vocabulary with an int8 copy of the head (a quarter of the bytes to stream; exact integer arithmetic via
  oneDNN's int8 linear or `torch._int_mm`, each checked against float64 once), bounds the screening error
  rigorously (Cauchy-Schwarz on the quantisation errors of both operands, plus a margin for fp32 rounding),
  and recomputes in fp32 only the tokens whose bound reaches the best one. The answer is the fp32 argmax;
  when the bound is too loose to leave a short list (large outlier activations), it falls back to the full
  fp32 product.
- Packing GPT-2 124M takes ~0.5 s, and the copies cost about as much memory as the weights. By default they
  are made per `generate` call, when the call is long enough to repay them (`PACK_MIN_WORK`), and dropped
  after it (the weights may change between calls: fine-tuning samples, PPO rollouts). An owner whose weights
  stay fixed (chat, server, benchmark) calls `freeze(model)` once to keep them.
- `frozen(model)` installs the replacements for the duration of a `with` block (decoding runs under
  `torch.inference_mode`; the packed ops have no autograd, and the model uses them only with autograd off).
  Without either packing (no compiler and a PyTorch without MKL), only the head gets a faster (transposed)
  copy; on a GPU nothing changes.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial

import torch
import torch.nn.functional as F

from gpt2 import native
from gpt2.model import GPT, CausalSelfAttention, KVCache, Projection

# Packing per call pays off from about this many rows x decoding steps (GPT-2 124M, 2 cores: ~0.6 s of
# packing against ~3 ms saved per step at batch 1 and ~13 ms at batch 8); a frozen model is always packed.
PACK_MIN_WORK = 1024

# Packed products win for few rows and lose for many (GPT-2 124M on 2 cores: 1.3x faster at 8 rows,
# 1.3x slower at 256), so prompts keep the plain kernels.
PACKED_MAX_ROWS = 64

# The native kernel (`gpt2.native`) beats both up to about this many rows; above it, plain `F.linear`.
NATIVE_MAX_ROWS = 32

Product = Callable[[torch.Tensor], torch.Tensor]  # (N, in) -> (N, out)

# An argmax screen that leaves more candidate tokens than this is not worth it: use the full product.
MAX_CANDIDATES = 4096
# Relative margin for fp32 rounding in any dot product of length <= 1600 (gamma_n = n * 2^-24 < 1e-4).
FP32_MARGIN = 1e-4


def mkl_packing_available() -> bool:
    return torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_linear")


def packed_product(weight_out_in: torch.Tensor, bias: torch.Tensor | None) -> Product:
    """x @ weight_out_in.T + bias through MKL's pre-packed sgemm for up to PACKED_MAX_ROWS rows (decoding),
    plain `F.linear` for more (a prompt). `weight_out_in` may be a transposed view."""
    packed = torch.ops.mkl._mkl_reorder_linear_weight(weight_out_in, 8)  # the 8 is only a size hint
    mkl_linear = torch.ops.mkl._mkl_linear.default  # the overload itself: skips resolving it on every call

    def product(x: torch.Tensor) -> torch.Tensor:
        if x.size(0) > PACKED_MAX_ROWS:
            return F.linear(x, weight_out_in, bias)
        return mkl_linear(x, packed, weight_out_in, bias, x.size(0))

    return product


def frozen_product(weight_in_out: torch.Tensor, bias: torch.Tensor | None) -> Product | None:
    """x @ weight_in_out + bias from a copy of the weight packed for few-row products: the native kernel
    where it is available (decoding, up to NATIVE_MAX_ROWS rows), else MKL's packed sgemm; the plain kernels
    on the live weight for more rows (a prompt). `weight_in_out` (in, out) may be a transposed view.
    None when neither packing is available."""
    if native.available() and native.can_pack(weight_in_out):
        fast = native.PackedLinear(weight_in_out, bias)

        def product(x: torch.Tensor) -> torch.Tensor:
            if x.size(0) > NATIVE_MAX_ROWS:
                return F.linear(x, weight_in_out.t(), bias)
            return fast(x)

        return product
    return packed_product(weight_in_out.t(), bias) if mkl_packing_available() else None


class Int8Product:
    """xq @ q.T for int8 rows q (V, C) with one scale each, exact integer arithmetic, scaled to fp32:
    (N, C) integer-valued floats in [-127, 127] and one scale per row (N, 1) -> (N, V) = x_b * s_j * (xq_b . q_j).

    Two kernels, tried in this order: oneDNN's int8 linear (what inductor's x86 quantisation calls; about twice
    as fast here) and `torch._int_mm`. Each is first checked against float64 arithmetic on full-range
    operands, because int8 kernels on CPUs without VNNI may saturate 16-bit intermediate sums; `exact` is
    False when neither passes, and the caller must not rely on the products."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor):
        self.q_t = q.t()  # (C, V), a view of the (V, C) rows: the layout `_int_mm` reads fastest
        self.scale = scale  # (V,)
        self.zero_points = torch.zeros(q.size(0), dtype=torch.long)
        g = torch.Generator().manual_seed(0)
        probe = torch.randint(-127, 128, (4, q.size(1)), generator=g).float()
        probe[0] = 127  # extremes, where saturation would show
        probe[1] = -127
        # Exact in fp32: every partial sum is an integer below 127 * 127 * C < 2^24 for C <= 1040, so no
        # rounding happens in any order (float64 beyond that; converting the head to float64 takes longer).
        exact_dtype = torch.float32 if 127 * 127 * q.size(1) < 2**24 else torch.float64
        expected = ((probe.to(exact_dtype) @ q.t().to(exact_dtype)).double() * scale.double()).float()  # (4, V)
        self.kernel = None
        for kernel in (self._onednn_prepacked(q), self._int_mm):
            try:
                # rounding of the fp32 result is fine (the bound's margin covers it), lost integer terms are not
                if kernel is not None and torch.allclose(kernel(probe, torch.ones(4, 1)), expected, rtol=1e-6,
                                                         atol=0):
                    self.kernel = kernel
                    break
            except RuntimeError:  # no int8 support for this shape on this CPU
                continue
        self.exact = self.kernel is not None

    def _onednn_prepacked(self, q: torch.Tensor):
        try:
            packed = torch.ops.onednn.qlinear_prepack(q, [8, q.size(1)])
        except (AttributeError, RuntimeError):  # op missing in this build
            return None

        def kernel(xq: torch.Tensor, x_scale: torch.Tensor) -> torch.Tensor:
            qx = (xq + 128).to(torch.uint8)  # oneDNN takes unsigned activations: zero point 128
            # its activation scale is per tensor: pass 1 and apply the per-row scales after
            return torch.ops.onednn.qlinear_pointwise(qx, 1.0, 128, packed, self.scale, self.zero_points, None,
                                                      1.0, 0, torch.float32, "none", [], "") * x_scale
        return kernel

    def _int_mm(self, xq: torch.Tensor, x_scale: torch.Tensor) -> torch.Tensor:
        return torch._int_mm(xq.to(torch.int8), self.q_t).float() * self.scale * x_scale

    def __call__(self, xq: torch.Tensor, x_scale: torch.Tensor) -> torch.Tensor:
        return self.kernel(xq, x_scale)


class TransposedHead:
    """The tied output projection from a transposed (C, V) copy, ~0.1 s to make for GPT-2 124M: few-row
    products run ~1.3x faster on CPU in this layout than against (V, C). For decoding too short to repay
    `FrozenHead`'s preparation."""

    def __init__(self, weight: torch.Tensor, vocab_size: int):
        self.vocab_size = vocab_size
        self.weight_t = weight.t().contiguous()  # (C, V_padded)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight_t

    def argmax(self, x: torch.Tensor) -> torch.Tensor:
        return self(x)[:, : self.vocab_size].argmax(dim=1)


class FrozenHead:
    """The tied output projection with frozen weights: `head(x)` gives fp32 logits (N, padded vocab) through
    MKL's packed sgemm, and `head.argmax(x)` the greedy tokens (N,), screened in int8 as described in the
    module docstring. Preparing it takes ~0.4 s for GPT-2 124M."""

    def __init__(self, weight: torch.Tensor, vocab_size: int):
        self.weight = weight[:vocab_size]  # (V, C): the padding rows are never a token
        self.product = frozen_product(weight.t(), None) or TransposedHead(weight, vocab_size)
        q = torch.empty(self.weight.shape, dtype=torch.int8)
        scale = torch.empty(vocab_size)
        norms, error_norms = torch.empty(vocab_size), torch.empty(vocab_size)
        for rows in torch.arange(vocab_size).split(4096):  # in chunks that stay in cache: 4 passes over each
            w = self.weight[rows[0]: rows[-1] + 1]
            s = torch.linalg.vector_norm(w, float("inf"), dim=1).clamp_(min=1e-30) / 127  # one scale per token
            qw = torch.round(w / s[:, None])  # integers in [-127, 127]
            q[rows] = qw.to(torch.int8)
            scale[rows], norms[rows] = s, w.norm(dim=1)
            error_norms[rows] = (w - qw.mul_(s[:, None])).norm(dim=1)
        self.int8 = Int8Product(q, scale)
        self.max_norm = float(norms.max())  # max_j ||W_j||
        self.max_error_norm = float(error_norms.max())  # max_j ||W_j - Wq_j||

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.product(x)

    def argmax(self, x: torch.Tensor) -> torch.Tensor:
        """argmax_j of x @ W_j in fp32 for each row of x (N, C), the first index on ties, like torch.argmax.
        Without an exact int8 kernel on this CPU, the full fp32 product decides.

        With x = xq + ex and W_j = Wq_j + eW_j (int8 parts and their errors),
        x.W_j - xq.Wq_j = ex.W_j + xq.eW_j, so |error| <= ||ex|| max||W|| + ||xq|| max||eW|| =: bound.
        A token can only win its row if its screened logit is within 2 * bound of the row's best one. The
        candidates of all rows are scored exactly together: any set that holds a row's winner gives it."""
        if not self.int8.exact:
            return self._full_argmax(x)
        x_scale = x.abs().amax(dim=1, keepdim=True).clamp(min=1e-30) / 127  # (N, 1): one scale per row
        xq = torch.round(x / x_scale)  # (N, C) integers in [-127, 127]
        x_hat = xq * x_scale
        bound = ((x - x_hat).norm(dim=1) * self.max_norm + x_hat.norm(dim=1) * self.max_error_norm
                 + FP32_MARGIN * x.norm(dim=1) * self.max_norm)  # (N,)
        screened = self.int8(xq, x_scale)  # (N, V)
        floor = screened.amax(dim=1) - 2 * bound  # (N,) at or below each row's winner
        # a token is a candidate if it reaches the floor in some row (one max over rows: cheaper than any())
        reach = screened.sub_(floor[:, None]).amax(dim=0)  # (V,)
        candidates = (reach >= 0).nonzero().squeeze(1)  # (u,) ascending token ids
        if candidates.numel() > MAX_CANDIDATES:  # the bound is too loose to help
            return self._full_argmax(x)
        exact = x @ self.weight[candidates].t()  # (N, u)
        return candidates[exact.argmax(dim=1)]

    def _full_argmax(self, x: torch.Tensor) -> torch.Tensor:
        return self.product(x)[:, : self.weight.size(0)].argmax(dim=1)


# Models whose weights their owner declared frozen (`freeze`), with their products. Weak keys: the copies go
# with the model; kept off the model itself so that copy.deepcopy(model) never meets MKL's packed tensors.
_FROZEN: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


Head = TransposedHead | FrozenHead
# What to install: (module, attribute) -> replacement (`Projection.product`,
# `CausalSelfAttention.step_attention`), and the head.
Hooks = dict[tuple[torch.nn.Module, str], Callable]
Products = tuple[Hooks, Head | None]


def _native_step_attention(qkv: torch.Tensor, cache: KVCache, layer: int, masked: bool) -> torch.Tensor:
    return native.attend_step(qkv, cache.layers[layer], cache.valid if masked else None, cache.length)


def _build(model: GPT, pack: bool) -> Products:
    """The replacements to install. Native decoding attention whenever the native kernels are available (it
    needs no preparation); with `pack`, packed projections and a `FrozenHead`, else a `TransposedHead`.
    Nothing off CPU or fp32."""
    weight = model.lm_head.weight.detach()  # (V_padded, C)
    if weight.device.type != "cpu" or weight.dtype != torch.float32:
        return {}, None
    hooks: Hooks = {}
    if native.available():
        for m in model.modules():
            if isinstance(m, CausalSelfAttention):
                # a fresh wrapper per install, so that uninstalling removes exactly what this install put there
                hooks[m, "step_attention"] = partial(_native_step_attention)
    if not (pack and (native.available() or mkl_packing_available())):
        return hooks, TransposedHead(weight, model.config.vocab_size)
    for m in model.modules():
        if isinstance(m, Projection) and (product := frozen_product(m.weight.detach(), m.bias.detach())):
            hooks[m, "product"] = product
    return hooks, FrozenHead(weight, model.config.vocab_size)


def _install(hooks: Hooks) -> None:
    for (m, name), fn in hooks.items():
        setattr(m, name, fn)


def _uninstall(hooks: Hooks) -> None:
    """Remove these replacements, and only these: another user may have installed its own since."""
    for (m, name), fn in hooks.items():
        if getattr(m, name) is fn:
            setattr(m, name, None)


def freeze(model: GPT) -> None:
    """Declare that the model's weights will not change (a chat, a server, a benchmark), so its packed
    copies are made once, now, installed for every later inference-mode forward, and reused by every
    `frozen(model)` until `unfreeze(model)`. Changing the weights in between gives wrong results in decoding:
    PyTorch's fused optimizers update parameters without bumping their version counters, so a change cannot
    be detected cheaply. (Forward passes with autograd on always use the live weights.)"""
    unfreeze(model)
    _FROZEN[model] = products = _build(model, pack=True)
    _install(products[0])


def unfreeze(model: GPT) -> None:
    """Forget the packed copies (free their memory); later decoding prepares its products per call."""
    products = _FROZEN.pop(model, None)
    if products is not None:
        _uninstall(products[0])


@contextmanager
def frozen(model: GPT, work: int = 0) -> Iterator[Head | None]:
    """Run the model's projections through frozen-weight products inside the block; yields the head to pass
    to `GPT.logits` and to take greedy argmaxes with (None off CPU: use the model's own).
    A `freeze`d model already has its products installed, so concurrent users (the server's thread and a
    `generate` call) never touch the modules. Otherwise `work` (rows x decoding steps) decides whether
    packing pays for itself within this call; the products are installed for the block unless another call
    has installed its own (same weights, so either serves). The weights must not change inside the block."""
    if model in _FROZEN:
        yield _FROZEN[model][1]
        return
    hooks, head = _build(model, pack=work >= PACK_MIN_WORK)
    mine = {(m, name): fn for (m, name), fn in hooks.items() if getattr(m, name) is None}
    _install(mine)
    try:
        yield head
    finally:
        _uninstall(mine)
