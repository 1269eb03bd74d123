"""The optional native decoding kernels (`gpt2.native`): exact against float64, built and refused cleanly,
and decoding through them gives the tokens of the pure-PyTorch path."""

from __future__ import annotations

import pytest
import torch

from gpt2 import kernels, native
from gpt2.inference import generate
from gpt2.model import GPT, GPTConfig

needs_native = pytest.mark.skipif(not native.available(),
                                  reason=f"native kernels unavailable here: {native.unavailable_reason()}")


@pytest.fixture
def fresh_load(monkeypatch, tmp_path):
    """Let a test rebuild the library under its own settings, and forget that build afterwards."""
    monkeypatch.setenv("GPT2_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("GPT2_NATIVE", raising=False)
    native._load.cache_clear()
    yield monkeypatch
    monkeypatch.undo()
    native._load.cache_clear()


@needs_native
@pytest.mark.parametrize("rows", [1, 2, 5, 8, 9, 16, 27, 40])
@pytest.mark.parametrize("with_bias", [True, False])
def test_packed_linear_equals_float64(rows, with_bias):
    g = torch.Generator().manual_seed(rows)
    K, N = 200, 96
    w = torch.randn(K, N, generator=g) * 0.05
    bias = torch.randn(N, generator=g) if with_bias else None
    x = torch.randn(rows, K, generator=g)
    expected = x.double() @ w.double() + (bias.double() if with_bias else 0)
    got = native.PackedLinear(w, bias)(x)
    assert got.shape == (rows, N)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


@needs_native
def test_packed_linear_is_a_frozen_copy_and_checks_its_input():
    w = torch.randn(64, 32)
    product = native.PackedLinear(w, None)
    x = torch.randn(2, 64)
    before = product(x)
    w.add_(1.0)  # the packed copy does not follow
    torch.testing.assert_close(product(x), before)
    with pytest.raises(ValueError, match=r"\(M, 64\)"):
        product(torch.randn(2, 63))
    with pytest.raises(ValueError, match="cannot pack"):
        native.PackedLinear(torch.randn(64, 33), None)  # columns not a multiple of 32


@needs_native
@pytest.mark.parametrize("head_size", [64, 32])
@pytest.mark.parametrize("padded", [False, True])
def test_attend_step_equals_float64_and_writes_the_cache(head_size, padded):
    g = torch.Generator().manual_seed(head_size + padded)
    B, H, S_max, slot = 4, 3, 40, 29
    qkv = torch.randn(B, 3 * H * head_size, generator=g)
    kv = torch.randn(2, B, H, S_max, head_size, generator=g)
    valid = None
    if padded:
        valid = torch.rand(B, S_max, generator=g) > 0.5
        valid[:, slot] = True
        kv.masked_fill_(~valid[None, :, None, :, None], float("nan"))  # padding holds garbage, never to be read
        kv[:, :, :, slot] = 0.0  # (the new slot is written before it is read)
    expected = native.reference_attend_step(qkv.double(), kv.double(), valid, slot)
    cache = kv.clone()
    got = native.attend_step(qkv, cache, valid, slot)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
    q, k_new, v_new = qkv.view(B, 3, H, head_size).unbind(1)
    assert torch.equal(cache[0, :, :, slot], k_new) and torch.equal(cache[1, :, :, slot], v_new)


@needs_native
def test_attend_step_rejects_what_the_c_code_cannot_check():
    kv = torch.zeros(2, 2, 3, 8, 16)
    with pytest.raises(ValueError, match="slot 8"):
        native.attend_step(torch.zeros(2, 3 * 3 * 16), kv, None, 8)  # past the cache's end
    with pytest.raises(ValueError, match="qkv"):
        native.attend_step(torch.zeros(2, 10), kv, None, 0)


def test_turned_off_by_environment(fresh_load):
    fresh_load.setenv("GPT2_NATIVE", "0")
    assert not native.available()
    assert "GPT2_NATIVE=0" in native.unavailable_reason()


def test_missing_compiler_is_a_reason_not_an_error(fresh_load):
    fresh_load.setenv("CC", "no-such-compiler-gpt2")
    assert not native.available()
    assert "no-such-compiler-gpt2" in native.unavailable_reason()


def test_failing_compiler_is_a_reason_not_an_error(fresh_load):
    fresh_load.setenv("CC", "false")  # exists, exits 1
    assert not native.available()
    assert "failed" in native.unavailable_reason()


@needs_native
def test_build_is_cached_by_source_and_flags(fresh_load, tmp_path):
    assert native.available()
    built = list((tmp_path / "native").glob("decode-*.so"))
    assert len(built) == 1 and not list((tmp_path / "native").glob("*.tmp"))
    native._load.cache_clear()
    assert native.available()  # the second process-level load reuses the file
    assert list((tmp_path / "native").glob("decode-*.so")) == built


@needs_native
@pytest.mark.parametrize("lengths", [[12, 12, 12], [3, 12, 7, 1]])
def test_decoding_through_native_kernels_gives_the_pure_pytorch_tokens(lengths, monkeypatch):
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, vocab_size=300, n_layer=2, n_head=2, n_embd=64)).eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(0, 300, (n,), generator=g)
        mask[i, :n] = 1
    kernels.freeze(model)
    try:
        assert model.transformer.h[0].attn.step_attention is not None
        fast = generate(model, ids, mask, 0.0, 40, eos_id=None)
    finally:
        kernels.unfreeze(model)
    monkeypatch.setattr(native, "available", lambda: False)
    kernels.freeze(model)  # MKL packing only, PyTorch attention
    try:
        assert model.transformer.h[0].attn.step_attention is None
        plain = generate(model, ids, mask, 0.0, 40, eos_id=None)
    finally:
        kernels.unfreeze(model)
    assert fast == plain
