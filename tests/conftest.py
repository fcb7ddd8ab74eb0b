"""Put the repository root on sys.path so tests can `import model`, `import tokenizer`, ..."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny matmuls gain nothing from threads, and spinning threads crawl on a busy 2-core box."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def one_rank_group(tmp_path):
    """A one-rank gloo group for in-process DDP/FSDP tests. The test's wrappers are collected before the
    group is destroyed: a reducer freed after its group, in a later test, can deadlock the run."""
    import gc

    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    yield
    gc.collect()
    dist.destroy_process_group()
