"""bfloat16 training on CPUs: `--dtype auto` picks bf16 autocast in training where the CPU has native bf16 (read
from /proc/cpuinfo's flags) and float32 elsewhere and in evaluation; `--dtype bfloat16` trains on any CPU, close
to float32."""

from __future__ import annotations

import pytest
import torch
from test_pretrain import pretrain, shards, train_losses  # noqa: F401 (shards: a fixture)

from gpt2.precision import autocast_dtype, cpu_has_native_bf16

pytestmark = pytest.mark.usefixtures("one_thread")

CPU = torch.device("cpu")


@pytest.mark.parametrize(("flags", "native"), [
    ("fpu sse avx2 fma", False),  # Zen 2/3: AVX2 only
    ("fpu avx2 avx512f avx512_vnni avx512_bf16", True),  # Zen 4, Cooper Lake
    ("fpu avx2 avx512f amx_tile amx_bf16 amx_int8", True),  # Sapphire Rapids and later
    ("fpu avx2 avx512f avx512_vnni", False),  # Ice Lake, Skylake-SP
])
def test_native_bf16_is_read_from_cpuinfo_flags(tmp_path, flags, native):
    info = tmp_path / "cpuinfo"
    info.write_text(f"processor\t: 0\nmodel name\t: X\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: {flags}\n")
    assert cpu_has_native_bf16(info) is native


def test_no_cpuinfo_means_no_native_bf16(tmp_path):
    assert cpu_has_native_bf16(tmp_path / "absent") is False


def test_auto_on_a_cpu_trains_in_bf16_only_with_native_bf16():
    assert autocast_dtype("auto", CPU, training=True, native_bf16=True) is torch.bfloat16
    assert autocast_dtype("auto", CPU, training=True, native_bf16=False) is None
    assert autocast_dtype("auto", CPU, training=False, native_bf16=True) is None  # evaluation stays fp32
    assert autocast_dtype("float32", CPU, training=True, native_bf16=True) is None
    assert autocast_dtype("bfloat16", CPU, training=True, native_bf16=False) is torch.bfloat16


def test_pretrain_auto_says_when_it_trains_in_bf16(shards, tmp_path, capsys):  # noqa: F811
    """Through the command, on whatever CPU runs the test: the note appears exactly where the CPU has native bf16."""
    pretrain(shards, tmp_path / "auto", "--max-steps", "1")
    said = "trains in bfloat16 autocast on this CPU" in capsys.readouterr().out
    assert said is cpu_has_native_bf16()


def test_pretrain_bfloat16_on_a_cpu_is_close_to_float32(shards, tmp_path):  # noqa: F811
    """bf16 autocast rounds the matmuls' inputs to 8 bits of mantissa (relative 2**-9 each) over fp32 master
    weights: on this tiny model four steps' losses stay within 0.1% of fp32's with a wide margin (emulated or
    native bf16 round alike), far from the gap a wrong dtype path would open."""
    pretrain(shards, tmp_path / "fp32", "--dtype", "float32")
    pretrain(shards, tmp_path / "bf16", "--dtype", "bfloat16")
    fp32, bf16 = train_losses(tmp_path / "fp32"), train_losses(tmp_path / "bf16")
    assert len(fp32) == len(bf16) == 4
    assert bf16 == pytest.approx(fp32, rel=1e-3)
    assert bf16 != fp32  # autocast did run in bf16


def test_bench_train_compare_dtypes_prints_both_curves_and_the_verdict(shared_data):
    """`python bench/train.py --compare-dtypes`, as a user runs it (two steps, a short evaluation): both curves at
    every evaluated step, each relative gap the one its two columns give, and the verdict on the final step's."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "bench" / "train.py"
    proc = subprocess.run([sys.executable, str(script), "--compare-dtypes", "--steps", "2", "--val-tokens", "2048",
                           "--threads", "1", "--text", str(shared_data / "tinyshakespeare.txt")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert f"(native bf16: {cpu_has_native_bf16()})" in out, out
    rows = [(int(s), float(f), float(b), float(r)) for s, f, b, r in
            re.findall(r"^\s+(\d+)\s+([\d.]+)\s+([\d.]+)\s+([+-][\d.]+)%$", out, re.MULTILINE)]
    assert [r[0] for r in rows] == [0, 2], out
    for _, fp32, bf16, relative in rows:
        assert 5 < fp32 < 12 and relative == pytest.approx((bf16 / fp32 - 1) * 100, abs=0.01)
    final = re.search(r"final val loss: bfloat16 ([+-][\d.]+)% against float32 \((within|outside) the 1% tolerance",
                      out)
    assert final and float(final[1]) == rows[-1][3], out
    assert final[2] == ("within" if abs(float(final[1])) <= 1 else "outside")


def test_bench_train_steps_must_be_positive():
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "bench" / "train.py"
    proc = subprocess.run([sys.executable, str(script), "--compare-dtypes", "--steps", "0"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.splitlines()[-1].endswith("--steps: '0': give a whole number above "
                                                                           "zero"), proc.stderr
