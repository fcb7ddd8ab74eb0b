"""Choosing the compute dtype from what the CPU can really do, and an honest MFU denominator."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import hardware
from hardware import choose_precision, datasheet_peak, measured_peak, plausible_mfu

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


@pytest.mark.parametrize("name, precision, expected", [  # vendors' datasheets, dense (no sparsity)
    ("NVIDIA H100 80GB HBM3", "bf16", 989e12),  # SXM
    ("NVIDIA H100 PCIe", "bf16", 756e12),
    ("NVIDIA H100 NVL", "bf16", 835e12),
    ("NVIDIA H100 PCIe", "fp32", 51e12),
    ("NVIDIA H200", "bf16", 989e12),
    ("NVIDIA A100-SXM4-80GB", "bf16", 312e12),
    ("NVIDIA A100 80GB PCIe", "bf16", 312e12),
    ("NVIDIA L40", "bf16", 181e12),  # not the L4's figure
    ("NVIDIA L4", "bf16", 121e12),
    ("NVIDIA L40S", "bf16", 362e12),
    ("Tesla V100-SXM2-16GB", "fp16", 125e12),
    ("NVIDIA GeForce RTX 4090", "bf16", 165e12),
    ("NVIDIA B300 SXM6 AC", "bf16", None),  # unknown: measured instead, never a neighbour's figure
])
def test_gpu_peaks_match_the_exact_product_and_dtype(name, precision, expected):
    assert datasheet_peak(name, precision) == expected


def test_auto_is_fp32_on_a_cpu_without_native_bf16_and_says_why():
    choice = choose_precision("auto", CPU, native_bf16=False)
    assert choice.precision == "fp32" and choice.warning is None
    assert "no native bf16" in choice.describe()


def test_explicit_bf16_without_native_support_warns_with_the_measured_slowdown(monkeypatch):
    monkeypatch.setattr(hardware, "measure_bf16_slowdown", lambda: 57.3)
    choice = choose_precision("bf16", CPU, native_bf16=False)
    assert choice.precision == "bf16"
    assert "57x slower than fp32" in choice.warning and "TRAINING_PRECISION=auto or fp32" in choice.warning


def test_auto_takes_bf16_only_when_the_probe_finds_it_faster(monkeypatch):
    speeds = {torch.bfloat16: 400e9, torch.float32: 100e9}
    monkeypatch.setattr(hardware, "matmul_flops", lambda device, dtype, n, reps: speeds[dtype])
    assert choose_precision("auto", CPU, native_bf16=True).precision == "bf16"
    speeds[torch.bfloat16] = 90e9  # oneDNN claims support, but the kernels are no faster here
    slow = choose_precision("auto", CPU, native_bf16=True)
    assert slow.precision == "fp32" and "0.90x" in slow.describe()


def _no_probe(*args):
    raise AssertionError("no matmul should be timed")


def test_bf16_instructions_decide_without_a_timed_probe(monkeypatch):
    """A probe while another job runs measured 0.18x on a CPU where bf16 runs 2-3x fp32: the flags decide."""
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.setattr(hardware, "matmul_flops", _no_probe)
    for flag in ("avx512_bf16", "amx_bf16"):
        check = hardware.check_cpu_bf16(native=True, flags={"avx2", "avx512f", flag})
        assert check.fast and flag in check.how
    assert not hardware.check_cpu_bf16(native=False, flags={"avx512_bf16"}).fast  # oneDNN has no kernels


def test_without_bf16_instructions_or_under_an_isa_cap_the_probe_decides(monkeypatch):
    speeds = {torch.bfloat16: 60e9, torch.float32: 100e9}  # AVX-512 emulation: slower than fp32
    monkeypatch.setattr(hardware, "matmul_flops", lambda device, dtype, n, reps: speeds[dtype])
    assert not hardware.check_cpu_bf16(native=True, flags={"avx512f", "avx512bw"}).fast
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE")
    assert not hardware.check_cpu_bf16(native=True, flags={"avx512_bf16"}).fast


def test_the_machine_is_checked_once_per_process(monkeypatch):
    calls = []
    hardware._this_machine_bf16.cache_clear()
    monkeypatch.setattr(hardware, "cpu_has_native_bf16", lambda: True)
    monkeypatch.setattr(hardware, "cpu_flags", set)
    monkeypatch.setattr(hardware, "matmul_flops",
                        lambda device, dtype, n, reps: calls.append(dtype) or (300e9 if dtype == torch.bfloat16 else 100e9))
    first = hardware.check_cpu_bf16()
    probes = len(calls)
    assert first.fast and probes > 0
    assert hardware.check_cpu_bf16() is first and len(calls) == probes  # every later choice agrees with it
    hardware._this_machine_bf16.cache_clear()  # the fake machine must not outlive this test


def test_cpu_flags_are_read_from_the_kernel():
    flags = hardware.cpu_flags()
    if not Path("/proc/cpuinfo").is_file():
        pytest.skip("no /proc/cpuinfo here")
    out = subprocess.run(["grep", "-m1", "^flags", "/proc/cpuinfo"], capture_output=True, text=True).stdout
    assert flags == (set(out.split(":", 1)[1].split()) if out else set())  # ARM says "Features": none


@pytest.mark.e2e
def test_onednn_isa_cap_imitates_a_cpu_without_bf16():
    """What the tests and the README's non-bf16 figures rely on: oneDNN honours ONEDNN_MAX_CPU_ISA=AVX2."""
    code = "import hardware, torch; print(hardware.cpu_has_native_bf16(), " \
           "hardware.choose_precision('auto', torch.device('cpu')).precision)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                         env={**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2"})
    assert out.stdout.split() == ["False", "fp32"], out.stderr


def test_measured_peak_is_cached_per_machine_and_dtype(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(hardware, "matmul_flops", lambda device, dtype, n, reps: calls.append(dtype) or 123e9)
    assert measured_peak(CPU, "fp32", cache=tmp_path) == 123e9
    assert measured_peak(CPU, "fp32", cache=tmp_path) == 123e9
    assert calls == [torch.float32]  # measured once, then read back


def test_mfu_over_one_is_reported_as_unknown():
    assert plausible_mfu(50e9, 100e9) == 0.5
    assert plausible_mfu(324e9, 100e9) is None  # the 324% a wrong peak gave
