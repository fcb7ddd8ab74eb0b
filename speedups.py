"""The speed tricks that go beyond plain PyTorch, all in one place, each switched on by an explicit call
from an entry point (generate.py's main and complete, serve.py's start-up, train.py's main, bench.py).
model.py, generate.py's decode loop and batching.py compute with plain nn.Linear: without these calls
they give the same answers, only slower (or, for the allocator, with more page faults).

Figures are from the 2-core AMD EPYC (Zen 4, AVX-512 BF16) this project is developed on. Which precision
`auto` picks (bf16 only where the CPU runs it natively) is a decision, not a trick, and lives with the
other facts about the machine in hardware.py.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys
from contextlib import contextmanager
from typing import Callable, Iterator, NoReturn, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

Kernel = Callable[[torch.Tensor], torch.Tensor]


# ---- the CPU allocator ---------------------------------------------------------------------------------
def keep_freed_memory_on_cpu() -> bool:
    """Ask glibc to serve big buffers from its heap and keep them when freed (up to 2 GiB).

    By default glibc maps every buffer over its mmap threshold (at most 32 MiB) afresh and unmaps it when
    freed, so each CPU training step page-faults its activations and logits chunks in again. Measured when
    this was added: 12 steps of the default `.env` went from 524 to 1,379 tok/s, peak RSS 2.09 -> 2.89 GB
    (BENCHMARKS.md, "The CPU allocator"). The cost is that higher resident set: freed memory stays with the
    process. Skipped when the user set any MALLOC_* variable (theirs win) and off glibc. Returns whether
    the setting took."""
    if platform.libc_ver()[0] != "glibc" or any(k.startswith("MALLOC_") for k in os.environ):
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # <malloc.h>
    libc = ctypes.CDLL(None)
    return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))


def release_freed_memory() -> None:
    """Hand the memory glibc keeps (see keep_freed_memory_on_cpu) back to the system, after a phase whose
    buffers the rest of the process does not reuse: writing an offload store with that setting on left a
    unit's copies behind (1.7 GB of an 8B-shaped model's, measured), counted in every later resident set."""
    if platform.libc_ver()[0] == "glibc":
        ctypes.CDLL(None).malloc_trim(0)


class HeapTrimmer:
    """Called between phases that free most of what they allocated (a streamed model calls it after each block
    whose activations it freed): hands glibc's freed heap memory back whenever the resident set has grown by `slack`
    bytes since it last did.

    glibc keeps the holes that short-lived buffers leave between longer-lived ones on its heap, resident, and
    reuses them only where a later buffer fits: an 8B-shaped LoRA step streamed in fp32 (each block's
    activations freed between its adapters' gradients and dropout masks, kept) grew from 4.6 to 7.9 GB resident
    over one step; with this the whole run peaked at 5.42 GiB. Trimming after every block bounds it too, but the
    next block then page-faults its buffers in again (+11-15% a step of a 1B shape); trimming once the slack is
    used up cost 4-7% and held 0.16 GiB more (2-core AMD EPYC Zen 3, fp32, BENCHMARKS.md "Offloaded runs and
    the heap")."""

    def __init__(self, slack: int = 256 * 2**20):
        self.slack = slack
        self.works = platform.libc_ver()[0] == "glibc" and os.path.exists("/proc/self/statm")
        self.floor = self._resident() if self.works else 0
        self.trims = 0

    @staticmethod
    def _resident() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __call__(self) -> None:
        if not self.works:
            return
        resident = self._resident()
        if resident <= self.floor + self.slack:
            self.floor = min(self.floor, resident)
            return
        release_freed_memory()
        self.floor, self.trims = self._resident(), self.trims + 1


# ---- process exit -----------------------------------------------------------------------------------
def exit_without_teardown(code: int) -> NoReturn:
    """End a command whose main returned: flush what it printed and leave without the interpreter's teardown.

    Tearing down an interpreter that imported torch (finalizing about 1,850 modules and libtorch's static
    objects) took 0.8-1.7 s on a 2-core AMD EPYC Zen 3, after the command's work was done. Only for a main that
    has closed what it opened (files, W&B, the process group): buffered output still unwritten would be lost.
    Pages written through shared mappings (the offload store) are the kernel's already and are kept."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


# ---- reordered linear weights for decoding -------------------------------------------------------------
def reordered_linear(weight: torch.Tensor, rows: int) -> Optional[Kernel]:
    """x -> x @ weight.T from a copy of `weight` reordered for products of about `rows` rows, or None where
    this build or dtype has no such kernel.

    A decode step multiplies one row (or one per sequence) by every weight matrix, so on a CPU it is bound
    by reading the weights, and the 128k x dim output layer is most of them in a small Llama 3. Reordered
    once into the layout the CPU kernels stream best, the same products run faster. Measured on the quick
    start's output layer (128,256 x 256), one thread (the machine was shared), best of 30, ms per product
    of 1 / 8 rows:
        float32  plain F.linear 18.8 / 36.6   MKL packed for 1 row 7.2 / 33.0   oneDNN for 8 rows 11.7 / 12.3
        bf16     plain F.linear 10.0 / 12.0   oneDNN for 1 row      6.5 /  6.9   oneDNN for 8 rows  6.1 /  8.2
    So one float32 row goes through MKL (fastest for one row, 2.7x slower than oneDNN at 8) and every
    other case through oneDNN. Reordering this matrix takes 245 ms (float32, MKL), 148 ms (float32,
    oneDNN) or 60 ms (bf16). Whole greedy decoding at the quick start's shapes (64 tokens after 16, one
    thread, load average 4): float32 18.6 -> 33.8 tok/s, bf16 30.1 -> 50.1 tok/s. In bf16 on this
    project's shapes oneDNN's reordered product gives the plain linear's bits (tests/test_speedups.py)."""
    if weight.device.type != "cpu":
        return None
    try:
        if weight.dtype == torch.float32 and rows == 1:
            if not torch.backends.mkl.is_available():
                return None
            mkl_packed = torch.ops.mkl._mkl_reorder_linear_weight(weight, 1)
            kernel: Kernel = lambda x: torch.ops.mkl._mkl_linear(x, mkl_packed, weight, None, 1)  # noqa: E731
        elif weight.dtype in (torch.bfloat16, torch.float32) and torch.backends.mkldnn.is_available():
            packed = torch.ops.mkldnn._reorder_linear_weight(weight, rows)
            kernel = lambda x: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")  # noqa: E731
        else:
            return None
        probe = torch.randn(2, weight.shape[1], generator=torch.Generator().manual_seed(0)).to(weight.dtype)
        # PyTorch's internal ops (what inductor's weight prepacking emits): trusted only after they
        # reproduce F.linear here.
        if not torch.allclose(kernel(probe).float(), F.linear(probe, weight).float(), rtol=1e-2, atol=1e-3):
            return None
        return kernel
    except (AttributeError, RuntimeError):
        return None


def _fits_in_memory(nbytes: int) -> bool:
    """True when `nbytes` is under half of MemAvailable (Linux) or of free memory (other POSIX)."""
    try:
        with open("/proc/meminfo") as f:
            available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return False
    return nbytes < available // 2


def _reorderable_linears(model: nn.Module) -> list[nn.Linear]:
    """The plain bias-free CPU linears not already routed elsewhere (an outer block, a test's own forward)."""
    if torch.is_autocast_enabled("cpu") or hasattr(model, "_orig_mod"):
        return []  # autocast picks its own dtype per op; inductor packs weights itself
    if getattr(model, "streams_weights", False):
        return []  # its point is memory: a copy of its output layer alone was 2.1 GB of an 8B's fp32 run
    return [m for m in model.modules() if type(m) is nn.Linear and m.bias is None and m.weight.device.type == "cpu"
            and not isinstance(m.weight, DTensor)  # FSDP shards: each forward gathers them anew
            and "forward" not in m.__dict__]


@contextmanager
def reordered_linears(model: nn.Module, rows: int = 1) -> Iterator[int]:
    """While inside, every plain bias-free CPU nn.Linear of `model` multiplies by a copy of its weight
    reordered for `rows` rows (`reordered_linear`); yields how many. Leaving restores the plain linears
    and frees the copies.

    The copies are made from the weights as they are on entering and die on leaving, so none can outlive
    an optimizer step (the fused AdamW updates weights in place without bumping their version counters,
    so nothing cheaper could tell a copy is stale): enter it around generation, never around training.
    Does nothing on other devices, under autocast, for a torch.compile'd model, for a model streaming its
    weights from disk (offload.StreamedTransformer: each decoded token reads every block from the store, so the
    copies would buy little and cost memory), or when the copies would take over half the free memory (they
    cost one more copy of the linear weights). Linears an outer block already routes are left to it."""
    linears = _reorderable_linears(model)
    if not _fits_in_memory(sum(m.weight.nbytes for m in linears)):
        linears = []
    patched = []
    with torch.no_grad():
        for m in linears:
            if (kernel := reordered_linear(m.weight.detach(), rows)) is not None:
                m.forward = kernel
                patched.append(m)
    try:
        yield len(patched)
    finally:
        for m in patched:
            m.__dict__.pop("forward", None)
