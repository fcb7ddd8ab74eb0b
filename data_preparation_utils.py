"""What every data-preparation module shares: the one-line error, atomic writes, and the tokenizer a run uses.

The pipeline that turns datasets into shards, one module per part:

    data_sources.py          local files or a `datasets` dataset, opened as rows; mix files; the Mixer that
                             interleaves sources into one stream; the hash split into train and val
    shard_writer.py          worker processes with results back in input order; the token and sequence shard
                             writers; progress.json, resuming; a run's counts, budgets and checkpoints
    shard_format.py          the formats themselves: names, dtypes, the manifest, integrity checks
    load_pretrain_dataset.py documents -> uint32 token shards (pretraining)
    sequence_preparation.py  rows -> (tokens, mask) sequences -> sequence shards, for the two scripts below
    conversations.py         turns: read from rows, checked, rendered in Llama 3's chat format with a loss mask
    load_instruct_dataset.py, load_dpo_dataset.py  conversations (SFT) and preference pairs (DPO)

Nothing is ever half-written under a final name: files are written to `<name>.tmp` in the same
directory and renamed with `os.replace`, which is atomic. Bad input raises `DataPrepError`, whose
message is one line that the command-line scripts print before exiting with status 2.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable, Iterator

import numpy as np

from tokenizer import load_tokenizer

TMP_SUFFIX = ".tmp"


class DataPrepError(Exception):
    """Bad input or settings. The message is one line naming the problem."""


def one_line(error: BaseException | str, limit: int = 300) -> str:
    """First line of an error message, shortened: library errors can span pages."""
    lines = str(error).strip().splitlines()
    text = lines[0] if lines else type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


@contextmanager
def exit_on_prep_error() -> Iterator[None]:
    """For the command-line scripts: bad input ends the run with its one-line message and status 2,
    Ctrl-C with how to resume and status 130; no traceback either way."""
    try:
        yield
    except DataPrepError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
    except KeyboardInterrupt:
        print("\ninterrupted; run the same command again to resume from the last finished shard", file=sys.stderr)
        raise SystemExit(130)


# ---- atomic writes -----------------------------------------------------------------------


def atomic_write(path: Path, write: Callable[[BinaryIO], Any]) -> None:
    """Write `path` through a temporary file in the same directory, then rename it into place."""
    tmp = path.with_name(path.name + TMP_SUFFIX)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())  # the data must be on disk before the name points at it
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_npy_atomic(path: Path, array: np.ndarray) -> None:
    # np.save on a file object: given a name it would append ".npy" to our temporary name
    atomic_write(path, lambda f: np.save(f, array, allow_pickle=False))


def write_json_atomic(path: Path, obj: Any) -> None:
    atomic_write(path, lambda f: f.write((json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode()))


def write_jsonl_atomic(path: Path, rows: Iterable[dict]) -> None:
    def write(f: BinaryIO) -> None:
        for row in rows:
            f.write((json.dumps(row, ensure_ascii=False) + "\n").encode())

    atomic_write(path, write)


def write_jsonl_if_changed(path: Path, rows: Iterable[dict]) -> bool:
    """Write generated rows unless `path` already holds exactly them; returns whether it wrote. An
    unchanged file keeps its modification time, so a run over it still resumes or is already done."""
    data = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode()
    if path.is_file() and path.read_bytes() == data:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: f.write(data))
    return True


# ---- the tokenizer ---------------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def cached_tokenizer(path: str | None):
    """One tokenizer per process and path: loading one takes about a second."""
    return load_tokenizer(path)


def load_prep_tokenizer(path: str | None):
    try:
        return cached_tokenizer(path)
    except (FileNotFoundError, ImportError, ValueError) as e:
        raise DataPrepError(f"cannot load the tokenizer: {one_line(e)}") from None

