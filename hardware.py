"""What this machine can do: which dtype to compute in, and its matmul peak for MFU.

CPUs differ more than GPUs here. Where the CPU has bf16 matrix units (AMX, AVX-512 BF16) a bf16 matmul
runs several times faster than float32; where it has none (AVX2-only CPUs such as AMD Zen 3, most
laptops) oneDNN has no bf16 kernel and the fallback runs about 60x *slower* than float32. So
`TRAINING_PRECISION=auto` (and `--dtype auto` in generate.py and hellaswag_utils.py, and bench.py's
bf16 rows) asks oneDNN whether it has native bf16 kernels for this CPU, and where it says yes,
confirms it with a short measured probe (a 512^3 matmul in each dtype, a few milliseconds).
`ONEDNN_MAX_CPU_ISA=AVX2` makes a CPU with bf16 units behave as one without, for tests.

MFU needs the device's peak FLOP/s. GPUs: the datasheet's dense figure for the exact product and dtype.
CPUs and unknown GPUs: a measured dense matmul, cached per machine and dtype in
~/.cache/llama3-trainer/matmul_peaks.json, so identical runs report identical MFU and start at once.
"""

from __future__ import annotations

import functools
import json
import os
from contextlib import nullcontext
import platform
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# bf16 counts as fast on a CPU when its matmul is at least this much faster than float32's (AMX: 4-8x).
FAST_BF16_RATIO = 1.2
PROBE_SIZE = 512
PROBE_ROUNDS = 5

# Dense datasheet peaks, FLOP/s, per exact product name as torch.cuda.get_device_name reports it (after the
# vendor prefix). bf16/fp16 tensor cores with float32 accumulation; "fp32" without tensor cores (TF32 is off
# by default in PyTorch). Names are matched whole: "L40" must not match "L4", nor PCIe the SXM figures.
GPU_PEAKS: list[tuple[str, float, float]] = [  # (name pattern, bf16/fp16, fp32)
    (r"H100( 80GB HBM3| SXM5?( 80GB)?)?", 989e12, 67e12),
    (r"H100 PCIe", 756e12, 51e12),
    (r"H100 NVL", 835e12, 60e12),
    (r"H200( SXM)?( 141GB)?( HBM3e)?", 989e12, 67e12),
    (r"H200 NVL", 835e12, 60e12),
    (r"A100[- ](SXM4?|PCIE|PCIe)?[- ]?(40GB|80GB)?( PCIe)?", 312e12, 19.5e12),
    (r"L40S", 362e12, 91.6e12),
    (r"L40", 181e12, 90.5e12),
    (r"L4", 121e12, 30.3e12),
    (r"(GeForce )?RTX 4090", 165e12, 82.6e12),
    (r"(GeForce )?RTX 3090", 71e12, 35.6e12),
    (r"V100[- ](SXM2|PCIE)[- ]\d+GB", 125e12, 15.7e12),
]


def gpu_product(name: str) -> str:
    """'NVIDIA H100 PCIe' -> 'H100 PCIe'; 'Tesla V100-SXM2-16GB' -> 'V100-SXM2-16GB'."""
    return re.sub(r"^(NVIDIA|Tesla)\s+", "", name.strip())


def datasheet_peak(device_name: str, precision: str) -> Optional[float]:
    """The dense peak of this exact GPU in this precision, or None when the product is not in the table."""
    product = gpu_product(device_name)
    for pattern, low_precision, fp32 in GPU_PEAKS:
        if re.fullmatch(pattern, product):
            return fp32 if precision == "fp32" else low_precision
    return None


# ---- measuring --------------------------------------------------------------------------------------
def matmul_flops(device: torch.device, dtype: torch.dtype, n: int, reps: int) -> float:
    """Best achieved FLOP/s of a dense n x n matmul in `dtype` over `reps` timed calls (after one untimed
    call). The best, not the mean: on a shared machine another process can steal any one call, never
    make one faster."""
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    a @ b
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def cpu_model() -> str:
    try:
        return re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M).group(1).strip()
    except (OSError, AttributeError):
        return platform.processor() or "unknown"


def cpu_has_native_bf16() -> bool:
    """oneDNN's own answer: does it have bf16 kernels for this CPU (honours ONEDNN_MAX_CPU_ISA)?"""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


@dataclass(frozen=True)
class Bf16Check:
    fast: bool
    how: str  # what decided it, for the start-up line
    speedup: Optional[float] = None  # bf16 / fp32 matmul throughput, when measured


def cpu_flags() -> set[str]:
    """The instruction-set flags the kernel reports for this CPU (empty where /proc/cpuinfo is not)."""
    try:
        line = re.search(r"^flags\s*:(.*)$", Path("/proc/cpuinfo").read_text(), re.M)
    except OSError:
        return set()
    return set(line.group(1).split()) if line else set()


def check_cpu_bf16(native: Optional[bool] = None, flags: Optional[set[str]] = None) -> Bf16Check:
    """Whether bf16 matmuls are native and fast on this CPU. oneDNN's capability check first; then bf16
    matrix instructions (AMX, AVX-512 BF16) decide it. Without them (oneDNN emulates bf16 with plain
    AVX-512; other architectures name their flags otherwise) a short probe says whether bf16 beats
    float32. No timing decides on a CPU that has the instructions: a probe while another job runs can
    measure anything (0.18x on a CPU where bf16 runs 2-3x float32). Decided once per process, so that
    every choice a run makes agrees. `native` and `flags` override what the machine says (tests)."""
    if native is None and flags is None:
        return _this_machine_bf16()
    native = cpu_has_native_bf16() if native is None else native
    return _decide_cpu_bf16(native, flags or set())


@functools.cache
def _this_machine_bf16() -> Bf16Check:
    return _decide_cpu_bf16(cpu_has_native_bf16(), cpu_flags())


BF16_MATRIX_FLAGS = ("amx_bf16", "avx512_bf16")


def _decide_cpu_bf16(native: bool, flags: set[str]) -> Bf16Check:
    if not native:
        return Bf16Check(False, "no native bf16 on this CPU (oneDNN has no bf16 kernels for it)")
    found = [f for f in BF16_MATRIX_FLAGS if f in flags]
    if found and not os.environ.get("ONEDNN_MAX_CPU_ISA"):  # a capped ISA may leave only the emulation
        return Bf16Check(True, f"bf16 instructions on this CPU: {found[0]}")
    return _probe_cpu_bf16()


def _probe_cpu_bf16() -> Bf16Check:
    device = torch.device("cpu")
    bf16 = fp32 = 0.0
    for _ in range(PROBE_ROUNDS):  # alternated, best of each: a busy moment cannot decide for one dtype alone
        bf16 = max(bf16, matmul_flops(device, torch.bfloat16, PROBE_SIZE, 2))
        fp32 = max(fp32, matmul_flops(device, torch.float32, PROBE_SIZE, 2))
    speedup = bf16 / fp32
    if speedup >= FAST_BF16_RATIO:
        return Bf16Check(True, f"bf16 kernels on this CPU, measured {speedup:.1f}x fp32's matmul speed", speedup)
    return Bf16Check(False, f"bf16 matmul measured at only {speedup:.2f}x fp32's on this CPU", speedup)


def measure_bf16_slowdown(probe_size: int = 256) -> float:
    """How many times slower than float32 a bf16 matmul runs here (small: it is slow where it matters)."""
    device = torch.device("cpu")
    return matmul_flops(device, torch.float32, probe_size, 2) / matmul_flops(device, torch.bfloat16, probe_size, 2)


# ---- choosing the precision ---------------------------------------------------------------------------
@dataclass(frozen=True)
class PrecisionChoice:
    precision: str  # bf16 | fp16 | fp32
    reason: str  # one phrase for the start-up line
    warning: Optional[str] = None  # printed once: an explicit choice that will be slow here

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.precision]

    def describe(self) -> str:
        return f"{self.precision} ({self.reason})"


def choose_precision(requested: str, device: torch.device, native_bf16: Optional[bool] = None) -> PrecisionChoice:
    """Resolve `auto`, and judge an explicit choice against what the device runs fast."""
    if device.type == "cuda":
        if requested != "auto":
            return PrecisionChoice(requested, "as set")
        if torch.cuda.is_bf16_supported():
            return PrecisionChoice("bf16", "auto: this GPU supports bf16")
        return PrecisionChoice("fp16", "auto: this GPU has no bf16, fp16 with loss scaling")
    if device.type != "cpu":
        return PrecisionChoice("fp32" if requested == "auto" else requested, "auto" if requested == "auto" else "as set")
    if requested == "fp32":
        return PrecisionChoice("fp32", "as set")
    if requested == "fp16":
        return PrecisionChoice("fp16", "as set")
    check = check_cpu_bf16(native_bf16)
    if requested == "auto":
        return PrecisionChoice("bf16" if check.fast else "fp32", f"auto: {check.how}")
    if check.fast or (check.speedup or 0) >= 1.0:
        return PrecisionChoice("bf16", "as set")
    slowdown = 1 / check.speedup if check.speedup else measure_bf16_slowdown()
    return PrecisionChoice("bf16", "as set, not native here", warning=(
        f"warning: bf16 was asked for, but {check.how}: a bf16 matmul runs {slowdown:.0f}x slower than fp32 here "
        f"(measured), so training will crawl; set TRAINING_PRECISION=auto or fp32"))


def weights_dtype(requested: str, device: torch.device) -> torch.dtype:
    """generate.py / hellaswag_utils.py `--dtype`: auto keeps float32 on CPUs without fast bf16."""
    if requested in ("bf16", "bfloat16"):
        return torch.bfloat16
    if requested in ("fp16", "float16"):
        return torch.float16
    if requested in ("fp32", "float32"):
        return torch.float32
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and check_cpu_bf16().fast:
        return torch.bfloat16
    return torch.float32


def autocast_context(precision: str, device: torch.device):
    """The forward pass's autocast for a resolved precision (fp32: none)."""
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[precision])


# ---- the MFU denominator ------------------------------------------------------------------------------
def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "llama3-trainer"


def _machine_key(device: torch.device, precision: str) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()
    return "|".join([device.type, name, f"threads={torch.get_num_threads()}", torch.__version__, precision,
                     os.environ.get("ONEDNN_MAX_CPU_ISA", "")])


def measured_peak(device: torch.device, precision: str, cache: Optional[Path] = None) -> float:
    """Dense matmul FLOP/s in this precision, measured once per machine and cached."""
    path = (cache or cache_dir()) / "matmul_peaks.json"
    key = _machine_key(device, precision)
    try:
        table = json.loads(path.read_text())
    except (OSError, ValueError):
        table = {}
    if isinstance(table.get(key), (int, float)):
        return float(table[key])
    n, reps = (8192, 10) if device.type == "cuda" else (2048, 3)
    if device.type == "cpu" and precision != "fp32" and not check_cpu_bf16().fast:
        n, reps = 256, 2  # emulated low precision: a big matmul would take minutes
    value = matmul_flops(device, DTYPES[precision], n, reps)
    table[key] = value
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(table, indent=1))
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only home: measure again next time
    return value


def peak_flops(device: torch.device, precision: str, override: float = 0.0) -> tuple[float, str]:
    """(peak FLOP/s of one device, where the figure comes from)."""
    if override:
        return override, "MFU_FLOPS_PEAK"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        sheet = datasheet_peak(name, precision)
        if sheet:
            return sheet, f"{gpu_product(name)} datasheet, {precision}"
    return measured_peak(device, precision), f"measured {precision} matmul, cached"


def plausible_mfu(achieved_flops: float, peak: float) -> Optional[float]:
    """MFU, or None when the peak cannot be the denominator: a model cannot run faster than the dense matmul
    peak, so a ratio over 1 means the peak was mismeasured (e.g. emulated bf16 measured on another shape)."""
    if peak <= 0:
        return None
    mfu = achieved_flops / peak
    return mfu if mfu <= 1.0 else None
