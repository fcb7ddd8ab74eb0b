"""The glibc settings training makes on CPU: in memory and for offloaded full fine-tuning
(speedups.keep_freed_memory_on_cpu) freed big buffers stay with the process, so the next step does not
page-fault them in again, checked by counting page faults in a fresh interpreter; for an offloaded LoRA run
glibc's defaults, and (speedups.HeapTrimmer) freed heap memory goes back to the system once the resident set
has grown by the trimmer's slack, checked by reading the resident set."""

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Allocate and free a 64 MiB tensor ten times; report the minor page faults of the last nine. After train's
# imports, as train.py's main makes the setting: in an interpreter that imported only torch and speedups the
# setting did not stop the faults on this machine (a fault per page in 7 of 9 buffers, 2026-12-02; importing
# tokenizer.py alone, which loads tiktoken, was enough to make it hold; the cause is not pinned down).
FAULTS = r"""
import json, resource, sys, torch
import train, speedups
from config import Config
mode = sys.argv[1]
if mode.startswith("run:"):  # the settings train.py's main makes for a run: OFFLOAD, LORA_ENABLED
    offload, lora_enabled = mode[4:].split(",")
    took = train.choose_cpu_allocator(Config(offload=offload, lora_enabled=lora_enabled == "lora"),
                                      torch.device("cpu"))
else:
    took = speedups.keep_freed_memory_on_cpu() if mode == "tuned" else False
torch.empty(16 * 2**20).fill_(1.0)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(9):
    torch.empty(16 * 2**20).fill_(1.0)
print(json.dumps({"took": took, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="a glibc setting")


def faults(mode: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    proc = subprocess.run([sys.executable, "-c", FAULTS, mode], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.e2e
def test_freed_big_buffers_are_reused_without_page_faults():
    default, tuned = faults("default"), faults("tuned")
    pages = 9 * 64 * 2**20 // 4096
    assert default["faults"] >= pages // 2  # glibc maps each 64 MiB buffer afresh: a fault per page
    # kept: at most the heap's growth once or twice, not a fault per page per buffer
    assert tuned["took"] and tuned["faults"] <= pages // 4


@pytest.mark.e2e
def test_training_keeps_freed_buffers_except_offloaded_lora_which_is_for_memory():
    pages = 9 * 64 * 2**20 // 4096
    for run in ("none,full", "none,lora", "disk,full"):
        kept = faults(f"run:{run}")
        assert kept["took"] and kept["faults"] <= pages // 4, (run, kept)
    lora = faults("run:disk,lora")  # glibc's defaults: the 8B LoRA's 6 GiB depend on them
    assert not lora["took"] and lora["faults"] >= pages // 2, lora


def test_a_users_malloc_variable_wins(monkeypatch):
    import speedups

    monkeypatch.setenv("MALLOC_PERTURB_", "0")  # returns before touching this process's allocator
    assert speedups.keep_freed_memory_on_cpu() is False


# 1 MiB buffers from the heap (MALLOC_MMAP_THRESHOLD_ below keeps glibc from mapping them), each followed by a
# small one that outlives it: freed, the big ones are holes between live chunks, which glibc keeps resident.
HOLES = r"""
import json, sys, torch
from speedups import HeapTrimmer
resident = HeapTrimmer._resident
before = resident()
roomy, tight = HeapTrimmer(slack=2**30), HeapTrimmer(slack=64 * 2**20)
big, small = [], []
for _ in range(400):
    big.append(torch.ones(2**18))
    small.append(torch.ones(64))
del big
held = resident()
roomy()
after_roomy = resident()
tight()
print(json.dumps({"before": before, "held": held, "after_roomy": after_roomy, "after_tight": resident(),
                  "trims": [roomy.trims, tight.trims]}))
"""


def test_the_heap_trimmer_returns_freed_holes_once_the_resident_set_grew_by_its_slack():
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}, "MALLOC_MMAP_THRESHOLD_": str(2**22)}
    proc = subprocess.run([sys.executable, "-c", HOLES], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    mib = 2**20
    assert r["held"] - r["before"] >= 300 * mib, r  # glibc kept the 400 freed MiB resident
    assert r["trims"] == [0, 1], r  # 400 MiB of growth: within the roomy slack, past the tight one
    assert abs(r["after_roomy"] - r["held"]) < 16 * mib, r
    assert r["after_tight"] - r["before"] < 64 * mib, r  # the holes went back
