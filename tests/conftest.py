"""Put the repository root on sys.path so tests can `import model`, `import tokenizer`, ..."""

import os
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# pytest-xdist runs one worker per core (pytest.ini): each worker's torch gets its share of the cores, as
# torchrun's ranks do, instead of every worker spinning a thread per core.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


def pytest_collection_modifyitems(config, items):
    """Files with the most end-to-end tests run first, each file's tests in their own order: with a file per worker
    (pytest.ini's --dist loadfile) the long files start early and the workers finish together, instead of one
    idling while the other works through a long file that happened to sort last."""
    first_seen = {path: i for i, path in enumerate(dict.fromkeys(item.path for item in items))}
    e2e = Counter(item.path for item in items if item.get_closest_marker("e2e"))
    items.sort(key=lambda item: (-e2e[item.path], first_seen[item.path]))


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


@pytest.fixture(scope="session")
def tok():
    """Meta's Llama 3 tokenizer (from the llama-models package), read once per test process."""
    from tokenizer import Tokenizer

    return Tokenizer()
