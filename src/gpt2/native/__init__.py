"""Optional native (C) kernels for decoding on a CPU, compiled on first use.

Design decisions:
- Everything in gpt2-scratch runs on plain PyTorch; this module only makes CPU decoding faster. A decoding
  step is bound by streaming the weights from memory, and at 1-32 rows the BLAS kernels PyTorch calls leave
  a fifth to a quarter of the memory bandwidth unused (measured on a 2-core Xeon: 19 GB/s against 24 for the
  kernel in `decode.c`). Closing that gap needs a loop that prefetches ahead of itself, which no PyTorch op
  offers, so `decode.c` is one small C function.
- It is compiled with the machine's C compiler (`$CC`, else `cc`; gcc and clang both work) for the machine it
  runs on (`-march=native`), once, into a cache folder keyed by the source, the flags and the CPU, and loaded
  with ctypes. No build step at install time, no PyTorch headers (a PyTorch extension takes a minute to
  compile; this takes a second).
- It parallelises with OpenMP and is loaded after PyTorch, so it shares PyTorch's OpenMP runtime (and its
  thread count). If another OpenMP runtime got loaded instead, the two thread pools would fight over the
  cores: the kernels are then not used.
- Anything that goes wrong (no compiler, no OpenMP, a failed self-check against float64, a non-x86/Linux
  machine that builds differently) leaves `available()` False with the reason in `unavailable_reason()`, and
  callers keep the pure-PyTorch path. `GPT2_NATIVE=0` turns the kernels off; `GPT2_CACHE_DIR` moves the cache.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("decode.c")
FLAGS = ["-O3", "-march=native", "-ffp-contract=fast", "-fopenmp", "-shared", "-fPIC"]
BLOCK_COLUMNS = 32  # BN in decode.c: the packed layout is [N / 32][K][32]; checked against the library


class _Unavailable(Exception):
    pass


@cache
def _load() -> tuple[ctypes.CDLL | None, str]:
    """(library, "") or (None, why not). Built and checked once per process."""
    if os.environ.get("GPT2_NATIVE", "1") == "0":
        return None, "turned off by GPT2_NATIVE=0"
    try:
        lib = ctypes.CDLL(str(_build()))
        lib.gpt2_linear.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int] * 3
        lib.gpt2_linear.restype = None
        lib.gpt2_attend_step.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int] * 5 + [ctypes.c_float]
        lib.gpt2_attend_step.restype = None
        if lib.gpt2_block_columns() != BLOCK_COLUMNS:
            raise _Unavailable(f"{SOURCE.name} packs {lib.gpt2_block_columns()} columns, this module {BLOCK_COLUMNS}")
        _check_one_openmp_runtime()
        _self_check(lib)
        return lib, ""
    except (_Unavailable, OSError) as e:
        return None, str(e)


def available() -> bool:
    return _load()[0] is not None


def unavailable_reason() -> str:
    return _load()[1]


def _cpu_signature() -> str:
    """What `-march=native` depends on: the CPU's model and feature flags."""
    try:
        info = Path("/proc/cpuinfo").read_text()
        lines = [ln for ln in info.splitlines() if ln.startswith(("model name", "flags", "Features"))]
        return "\n".join(dict.fromkeys(lines))
    except OSError:
        return platform.processor() or platform.machine()


def _cache_dir() -> Path:
    base = os.environ.get("GPT2_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "gpt2-scratch")
    return Path(base) / "native"


def _build() -> Path:
    """Compile decode.c into the cache (once per source, compiler, flags and CPU); return the library's path."""
    compiler = os.environ.get("CC", "cc")
    if shutil.which(compiler) is None:
        raise _Unavailable(f"no C compiler ({compiler!r} not found; set CC)")
    source = SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([source, compiler.encode(), " ".join(FLAGS).encode(),
                                     _cpu_signature().encode()])).hexdigest()[:16]
    out_dir = _cache_dir()
    target = out_dir / f"decode-{key}.so"
    if target.exists():
        return target
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _Unavailable(f"cannot create the kernel cache {out_dir}: {e}") from e
    # compile under a temporary name and rename: concurrent processes never load half a library
    fd, tmp = tempfile.mkstemp(dir=out_dir, suffix=".so.tmp")
    os.close(fd)
    try:
        try:
            result = subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", tmp], capture_output=True, text=True,
                                    timeout=120)
        except subprocess.TimeoutExpired as e:
            raise _Unavailable(f"{compiler} took over 120 s on {SOURCE.name}") from e
        if result.returncode != 0:
            raise _Unavailable(f"{compiler} failed on {SOURCE.name}: {result.stderr.strip()[-500:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return target


def _check_one_openmp_runtime() -> None:
    """The library must have bound to PyTorch's OpenMP runtime, not brought a second one (Linux only)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return
    runtimes = {line.split()[-1] for line in maps.splitlines()
                if any(name in line for name in ("libgomp", "libiomp", "libomp"))}
    if len(runtimes) > 1:
        raise _Unavailable(f"two OpenMP runtimes would share the cores: {sorted(runtimes)}")


def _self_check(lib: ctypes.CDLL) -> None:
    """Both kernels against float64 arithmetic: the product on every row count it specialises for and more,
    attention with and without padding."""
    g = torch.Generator().manual_seed(0)
    K, N = 96, 2 * BLOCK_COLUMNS
    w, bias = torch.randn(K, N, generator=g), torch.randn(N, generator=g)
    for b in (bias, None):
        product = PackedLinear(w, b, lib)
        for rows in (1, 3, 8, 11):
            x = torch.randn(rows, K, generator=g)
            expected = x.double() @ w.double() + (b.double() if b is not None else 0)
            _expect_close(product(x), expected, f"product of {rows} rows")
    B, H, S_max, slot = 3, 2, 9, 6
    for D in (64, 16):
        qkv, kv = torch.randn(B, 3 * H * D, generator=g), torch.randn(2, B, H, S_max, D, generator=g)
        valid = torch.rand(B, S_max, generator=g) > 0.3
        valid[:, slot] = True
        for mask in (None, valid):
            expected = reference_attend_step(qkv.double(), kv.double(), mask, slot)
            _expect_close(attend_step(qkv, kv.clone(), mask, slot, lib), expected, f"attention, head size {D}")


def _expect_close(got: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    if not torch.allclose(got.double(), expected, rtol=1e-5, atol=1e-5):
        raise _Unavailable(f"self-check failed: {what} (max error {(got - expected).abs().max().item():.2e})")


def reference_attend_step(qkv: torch.Tensor, kv: torch.Tensor, valid: torch.Tensor | None, slot: int,
                          ) -> torch.Tensor:
    """What `attend_step` computes, in plain PyTorch (any dtype): the oracle for its checks and tests."""
    _, B, H, S_max, D = kv.shape
    q, k_new, v_new = qkv.view(B, 3, H, D).unbind(1)  # each (B, H, D)
    keys, values = kv[0, :, :, : slot + 1].clone(), kv[1, :, :, : slot + 1].clone()  # (B, H, S, D)
    keys[:, :, slot], values[:, :, slot] = k_new, v_new
    scores = torch.einsum("bhd,bhsd->bhs", q, keys) * D ** -0.5
    if valid is not None:  # padding is left out, not weighted by 0: it may hold NaN garbage
        left_out = ~valid[:, None, : slot + 1]  # (B, 1, S)
        scores = scores.masked_fill(left_out, float("-inf"))
        values = values.masked_fill(left_out[..., None], 0.0)
    return torch.einsum("bhs,bhsd->bhd", scores.softmax(-1), values).reshape(B, H * D)



def can_pack(weight_in_out: torch.Tensor) -> bool:
    return (weight_in_out.dim() == 2 and weight_in_out.size(1) % BLOCK_COLUMNS == 0
            and weight_in_out.dtype == torch.float32 and weight_in_out.device.type == "cpu")


class PackedLinear:
    """`x @ weight + bias` for fp32 CPU rows x (M, K) through `gpt2_linear`, weight (K, N) copied once into the
    kernel's layout, (N / 32, K, 32). Frozen: later changes to the weight are not seen."""

    def __init__(self, weight_in_out: torch.Tensor, bias: torch.Tensor | None, lib: ctypes.CDLL | None = None):
        lib = lib or _load()[0]
        if lib is None:
            raise RuntimeError(f"native kernels unavailable: {unavailable_reason()}")
        if not can_pack(weight_in_out):
            raise ValueError(f"cannot pack a {weight_in_out.dtype} weight of shape {tuple(weight_in_out.shape)} "
                             f"(fp32 on CPU, columns a multiple of {BLOCK_COLUMNS})")
        self.n_in, self.n_out = weight_in_out.shape
        # clone, not contiguous(): with one block of columns the permuted view is already contiguous, and the
        # "copy" would alias the live weight
        blocks = weight_in_out.detach().reshape(self.n_in, -1, BLOCK_COLUMNS).permute(1, 0, 2)
        self.packed = blocks.clone(memory_format=torch.contiguous_format)  # (N / 32, K, 32)
        self.bias = bias.detach().float().clone() if bias is not None else None
        if self.bias is not None and self.bias.shape != (self.n_out,):
            raise ValueError(f"bias {tuple(self.bias.shape)} does not match {self.n_out} columns")
        self._kernel = lib.gpt2_linear
        self._w = self.packed.data_ptr()
        self._b = self.bias.data_ptr() if self.bias is not None else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32 or x.dim() != 2 or x.size(1) != self.n_in:
            raise ValueError(f"expected fp32 rows (M, {self.n_in}), got {x.dtype} {tuple(x.shape)}")
        x = x.contiguous()
        y = torch.empty(x.size(0), self.n_out)
        self._kernel(x.data_ptr(), self._w, self._b, y.data_ptr(), x.size(0), self.n_in, self.n_out)
        return y


def attend_step(qkv: torch.Tensor, kv: torch.Tensor, valid: torch.Tensor | None, slot: int,
                lib: ctypes.CDLL | None = None) -> torch.Tensor:
    """One decoding step of one layer's attention (see `gpt2_attend_step` in decode.c): writes this step's
    keys and values from qkv (B, 3C) into slot `slot` of kv (2, B, nh, S_max, hs), then attends each row's
    query to its slots 0..slot, leaving out those that `valid` (B, S_max) marks False. Returns (B, C)."""
    lib = lib or _load()[0]
    if lib is None:
        raise RuntimeError(f"native kernels unavailable: {unavailable_reason()}")
    _, B, H, S_max, D = kv.shape
    if (qkv.shape != (B, 3 * H * D) or qkv.dtype != torch.float32 or kv.dtype != torch.float32
            or not (qkv.is_contiguous() and kv.is_contiguous()) or not 0 <= slot < S_max
            or (valid is not None and (valid.shape != (B, S_max) or valid.dtype != torch.bool
                                       or not valid.is_contiguous()))):
        raise ValueError(f"attend_step: qkv {tuple(qkv.shape)} {qkv.dtype}, cache {tuple(kv.shape)} {kv.dtype}, "
                         f"slot {slot}: shapes, dtypes (fp32) or layouts (contiguous) do not fit")
    y = torch.empty(B, H * D)
    lib.gpt2_attend_step(qkv.data_ptr(), kv.data_ptr(), valid.data_ptr() if valid is not None else None,
                         y.data_ptr(), B, H, D, S_max, slot, D ** -0.5)
    return y
