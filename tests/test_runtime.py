"""The per-device peak table that MFU is measured against (`gpt2.train.runtime`)."""

from __future__ import annotations

import pytest
import torch

from gpt2.train.runtime import BF16_PEAK_TFLOPS, peak_entry, peak_flops, peak_tflops


@pytest.mark.parametrize("name, tflops", [
    ("NVIDIA H100 80GB HBM3", 989), ("NVIDIA H100 PCIe", 756), ("NVIDIA H100 NVL", 835),
    ("NVIDIA H200", 989), ("NVIDIA H200 NVL", 835), ("NVIDIA GH200 480GB", 989), ("NVIDIA H20", 148),
    ("NVIDIA A100-SXM4-80GB", 312), ("NVIDIA A100 80GB PCIe", 312), ("NVIDIA A10G", 70), ("NVIDIA A10", 125),
    ("NVIDIA L4", 121), ("NVIDIA L40", 181), ("NVIDIA L40S", 362), ("NVIDIA GeForce RTX 4090", 165.2),
    ("NVIDIA GeForce RTX 5090", 209.5), ("NVIDIA RTX 6000 Ada Generation", 364.2), ("NVIDIA RTX A6000", 154.8),
    ("NVIDIA B200", 2250), ("NVIDIA GB200", 2500)])
def test_known_cards(name, tflops):
    assert peak_tflops(name) == tflops


@pytest.mark.parametrize("name", ["Tesla V100-SXM2-16GB", "Tesla T4", "NVIDIA RTX A1000 6GB Laptop GPU",
                                  "NVIDIA GeForce RTX 5080", "NVIDIA H2000", "", "cpu"])
def test_unknown_cards_have_no_peak(name):
    assert peak_tflops(name) is None  # whole words only: "A100" is not in "A1000", nor "H200" in "H2000"


def test_the_longest_matching_key_wins():
    assert peak_entry("NVIDIA H200 NVL")[0] == "H200 NVL"
    assert peak_entry("NVIDIA H100 PCIe")[0] == "H100 PCIe"
    assert peak_entry("NVIDIA A10G")[0] == "A10G"
    assert peak_entry("nvidia h200 nvl")[0] == "H200 NVL"  # case does not matter
    assert all(source for _, source in BF16_PEAK_TFLOPS.values())  # every figure names where it comes from


def test_peak_flops_of_a_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200 NVL")
    assert peak_flops(torch.device("cuda", 0)) == 835e12
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100-SXM2-16GB")
    assert peak_flops(torch.device("cuda", 0)) is None  # no bf16 peak known: the loop logs mfu None
    assert peak_flops(torch.device("cpu")) is None
    from gpt2.train.loop import peak_flops as from_loop

    assert from_loop is peak_flops  # the loop's old name still works


def test_tf32_is_set_through_one_api_only():
    # torch 2.11 (the GPU machine's) raises when the legacy allow_tf32 flags, which the loop sets, are read after
    # the new fp32_precision / set_float32_matmul_precision API was used: the code must use the legacy one only
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    mixed = [str(p.relative_to(repo)) for d in ("src", "bench") for p in (repo / d).rglob("*.py")
             if "fp32_precision" in p.read_text() or "set_float32_matmul_precision" in p.read_text()]
    assert mixed == []
