"""Writing shards: worker processes whose results come back in input order, the writers of both shard formats
(see shard_format.py), progress.json and resuming, and the state a preparation run keeps.

    worker_pool + ordered_map   rows encoded or rendered in worker processes, results back in input order
    ShardWriter                 one split's token stream cut into fixed-size uint32 shards (pretraining)
    SequenceShardWriter         one split's whole sequences with their loss masks and offsets (SFT, DPO)
    start_or_resume             progress.json after every finished shard: a run with the same settings resumes
    ShardedRun                  per-source progress, stats, the train/val split, a writer per split, checkpoints

load_pretrain_dataset.py and sequence_preparation.py drive these with their own row types.
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import multiprocessing
import os
import pickle
import signal
import threading
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from data_preparation_utils import TMP_SUFFIX, DataPrepError, atomic_write, one_line, save_npy_atomic, write_json_atomic
from data_sources import HashSplit, Mixer, Source
from shard_format import (
    EVAL_FILE, MANIFEST_FILE, MASK_DTYPE, OFFSETS_DTYPE, PROGRESS_FILE, SPLITS, TOKEN_DTYPE, pending_name,
    sequence_shard_entry, sequence_shard_files, shard_is_intact, token_shard_entry, tokens_file, write_manifest,
)
from tokenizer import token_byte_lengths

WRITER_BUFFER_TOKENS = 1 << 26  # a shard up to this size (256 MB) is buffered in one allocation; larger ones grow


# ---- worker processes -------------------------------------------------------------------------------


def _init_worker_process(init_file: Path) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle, once
    threading.Thread(target=_exit_when_orphaned, args=(os.getppid(),), daemon=True).start()
    # A worker holds nothing to flush or clean up; skipping the interpreter's teardown (freeing the
    # tokenizer and every module: about 0.1 s of CPU) keeps it off the cores while the last shard is written.
    atexit.register(os._exit, 0)
    initializer, initargs = pickle.loads(init_file.read_bytes())
    initializer(*initargs)


def _exit_when_orphaned(parent_pid: int) -> None:
    """A worker whose parent was killed (kill -9, the OOM killer) would wait forever on its result pipe."""
    while os.getppid() == parent_pid:
        time.sleep(1.0)
    os._exit(1)


@contextmanager
def worker_pool(num_workers: int, initializer: Callable, initargs: tuple,
                scratch_dir: Path) -> Iterator[ProcessPoolExecutor | None]:
    """`num_workers` worker processes, started at once, each first running `initializer(*initargs)`;
    None for 0 (the work then runs in this process, initialized the same way).

    Start them before opening the sources: a spawned worker needs about half a second (a fresh
    interpreter, imports, the tokenizer), which then overlaps with the main process's own set-up.
    The initargs (a tokenizer: about 2 MB pickled) reach the workers through a file in `scratch_dir`:
    passed to the executor, each start would block until the worker before it had finished its
    imports and read them. Given the main process's tokenizer, a worker skips parsing tokenizer.model.
    """
    if num_workers == 0:
        initializer(*initargs)
        yield None
        return
    init_file = scratch_dir / ("worker_init.pickle" + TMP_SUFFIX)  # a crash leaves it to start_or_resume
    init_file.write_bytes(pickle.dumps((initializer, initargs)))
    # spawn: forking a process that holds pyarrow/datasets threads can deadlock
    pool = ProcessPoolExecutor(num_workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_init_worker_process, initargs=(init_file,))
    try:
        for _ in range(num_workers):
            pool.submit(os.getpid)  # the executor starts a process per task submitted, up to num_workers
        yield pool
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # milliseconds: workers skip the interpreter's teardown
        init_file.unlink(missing_ok=True)  # must not mask the error that brought us here


def ordered_map(fn: Callable, items: Iterable[tuple[Any, Any]], pool: ProcessPoolExecutor | None,
                max_in_flight: int) -> Iterator[tuple[Any, Any]]:
    """Yield (key, fn(payload)) for each (key, payload) item, in input order, computed by `pool`'s workers
    (see `worker_pool`; None: in this process).

    Like `Pool.imap`, but at most `max_in_flight` tasks are read ahead (imap would read the whole input
    into memory), and a worker that dies raises instead of hanging.
    """
    if pool is None:
        yield from ((key, fn(payload)) for key, payload in items)
        return
    window: deque = deque()
    try:
        for key, payload in items:
            window.append((key, pool.submit(fn, payload)))
            if len(window) >= max_in_flight:
                key, future = window.popleft()
                yield key, future.result()
        while window:
            key, future = window.popleft()
            yield key, future.result()
    except BrokenProcessPool:
        raise DataPrepError("a worker process died (out of memory?); run again to resume, "
                            "perhaps with fewer --num_workers") from None
    finally:
        for _, future in window:
            future.cancel()  # the caller stopped early (a token budget, Ctrl-C): skip what has not started


# ---- shard writers -------------------------------------------------------------------------------


def pending_path(directory: Path, split: str, shard_index: int) -> Path:
    """Where a split's tail waits between checkpoints until it becomes shard `shard_index`."""
    return directory / pending_name(split, shard_index)


class SplitWriter:
    """What both shard writers share: one split's finished `shards` and the pending file of the next one."""

    directory: Path
    split: str
    shards: list[dict]

    def _pending_path(self) -> Path:
        return pending_path(self.directory, self.split, len(self.shards))

    def remove_stale_pending(self) -> None:
        """Pending files of shards now finished; call once progress.json no longer refers to them."""
        current = self._pending_path()
        for path in self.directory.glob(f"{self.split}_*.pending"):
            if path != current:
                path.unlink()

    def remove_pending(self) -> None:
        for path in self.directory.glob(f"{self.split}_*.pending"):
            path.unlink()


class ShardWriter(SplitWriter):
    """Cuts one split's token stream into `shard_size`-token shards `{split}_000000.npy`, ... (the last shorter).

    Tokens not yet in a finished shard are appended, at each checkpoint, to `{split}_NNNNNN.pending`
    (raw uint32, NNNNNN being the shard they will become), so a resumed run continues from exactly
    the last checkpoint without re-encoding anything that was already in a shard.
    """

    def __init__(self, directory: Path, split: str, shard_size: int, shards: Iterable[dict] = (),
                 pending_tokens: int = 0):
        self.directory, self.split, self.shard_size = directory, split, shard_size
        self.shards: list[dict] = list(shards)
        # The shard being filled, allocated at first use and reused for every shard: each document is
        # copied in as it comes, so the batches it came in are freed at once (no 40 MB concatenation
        # into fresh memory at the end, which the run waits for)
        self._buffer = np.empty(0, TOKEN_DTYPE)
        self._buffered = 0  # tokens held in memory, not yet in a shard
        self._persisted = 0  # how many of them are in the pending file already
        if pending_tokens:
            self._restore_pending(pending_tokens)

    @property
    def num_tokens(self) -> int:
        return sum(s["num_tokens"] for s in self.shards) + self._buffered

    def _restore_pending(self, count: int) -> None:
        path = self._pending_path()
        tokens = np.fromfile(path, dtype="<u4", count=count).astype(TOKEN_DTYPE)
        if len(tokens) != count:
            raise DataPrepError(f"{path} holds fewer than the {count} tokens progress.json expects")
        with open(path, "r+b") as f:
            f.truncate(count * 4)  # drop tokens appended after the last checkpoint
        self._append(tokens)
        self._persisted = count

    def add(self, tokens: np.ndarray) -> int:
        """Append one document's tokens; returns how many shards this finished."""
        finished = 0
        while self._buffered + len(tokens) >= self.shard_size:
            room = self.shard_size - self._buffered
            self._append(tokens[:room])
            self._write_shard(self._buffer[: self.shard_size])
            tokens, self._buffered, self._persisted = tokens[room:], 0, 0
            finished += 1
        self._append(tokens)
        return finished

    def _append(self, tokens: np.ndarray) -> None:
        end = self._buffered + len(tokens)
        if end > len(self._buffer):  # first use, or a shard larger than WRITER_BUFFER_TOKENS
            grown = np.empty(min(self.shard_size, max(end, 2 * len(self._buffer), WRITER_BUFFER_TOKENS)), TOKEN_DTYPE)
            grown[: self._buffered] = self._buffer[: self._buffered]
            self._buffer = grown
        self._buffer[self._buffered : end] = tokens
        self._buffered = end

    def _write_shard(self, tokens: np.ndarray) -> None:
        entry = token_shard_entry(self.split, len(self.shards), tokens)
        save_npy_atomic(self.directory / entry["file"], tokens.astype(TOKEN_DTYPE, copy=False))
        self.shards.append(entry)

    def checkpoint(self) -> dict:
        """Make the unfinished tail durable; returns this split's part of progress.json."""
        with open(self._pending_path(), "ab" if self._persisted else "wb") as f:
            self._buffer[self._persisted : self._buffered].astype("<u4").tofile(f)
            f.flush()
            os.fsync(f.fileno())
        self._persisted = self._buffered
        return {"shards": list(self.shards), "pending_tokens": self._persisted}

    def finish(self) -> dict:
        """Write the last, shorter shard; returns this split's manifest entry."""
        if self._buffered:
            self._write_shard(self._buffer[: self._buffered])
        self._buffer, self._buffered, self._persisted = np.empty(0, TOKEN_DTYPE), 0, 0
        return {"num_tokens": self.num_tokens, "shards": list(self.shards)}


class SequenceShardWriter(SplitWriter):
    """Cuts one split's sequences into shards of whole groups (a group: one conversation, or the two
    sequences of a preference pair, which a shard never splits) of at most `shard_size` tokens; a
    group larger than that gets a shard of its own. A shard is three files: the sequences' tokens
    concatenated (uint32), their loss mask (uint8, same length) and the offsets where each sequence
    starts (int64, one more than the sequences: sequence j is tokens[offsets[j]:offsets[j+1]]); its manifest
    entry records their content hash (`shard_format.sequence_shard_sha256`).

    At each checkpoint the sequences not yet in a finished shard are saved to `{split}_NNNNNN.pending`
    (an .npz of tokens, mask and lengths, NNNNNN being the shard they will become), rewritten whole
    and atomically. Until that shard is written the pending sequences only grow, so a resumed run
    takes the first `pending_sequences` of them, as progress.json recorded, and drops any later ones.
    """

    def __init__(self, directory: Path, split: str, shard_size: int, group_size: int, shards: Iterable[dict] = (),
                 pending_sequences: int = 0):
        self.directory, self.split, self.shard_size, self.group_size = directory, split, shard_size, group_size
        self.shards: list[dict] = list(shards)
        self._tokens: list[np.ndarray] = []
        self._masks: list[np.ndarray] = []
        self._lengths: list[int] = []
        self._buffered_tokens = 0
        if pending_sequences:
            self._restore_pending(pending_sequences)

    def _restore_pending(self, count: int) -> None:
        path = self._pending_path()
        try:
            with np.load(path, allow_pickle=False) as pending:
                lengths, tokens, mask = pending["lengths"], pending["tokens"], pending["mask"]
        except (OSError, ValueError, KeyError) as e:
            raise DataPrepError(f"{path} is not readable ({one_line(e)}); pass --overwrite to start afresh") from None
        if len(lengths) < count:
            raise DataPrepError(f"{path} holds fewer than the {count} sequences progress.json expects")
        total = int(lengths[:count].sum())
        self._tokens, self._masks = [tokens[:total].astype(TOKEN_DTYPE)], [mask[:total].astype(MASK_DTYPE)]
        self._lengths, self._buffered_tokens = [int(n) for n in lengths[:count]], total

    def add(self, sequences: list[tuple[np.ndarray, np.ndarray]]) -> int:
        """Append one group of (tokens, mask) sequences; returns how many shards this finished (0 or 1)."""
        size = sum(len(tokens) for tokens, _ in sequences)
        finished = 0
        if self._lengths and self._buffered_tokens + size > self.shard_size:
            self._write_shard()
            finished = 1
        for tokens, mask in sequences:
            # copies: views would keep each worker's whole batch alive until this shard is written
            self._tokens.append(np.array(tokens, TOKEN_DTYPE))
            self._masks.append(np.array(mask, MASK_DTYPE))
            self._lengths.append(len(tokens))
        self._buffered_tokens += size
        return finished

    def _write_shard(self) -> None:
        files = sequence_shard_files(self.split, len(self.shards))
        tokens = np.concatenate(self._tokens).astype(TOKEN_DTYPE, copy=False)
        mask = np.concatenate(self._masks).astype(MASK_DTYPE, copy=False)
        offsets = np.concatenate([[0], np.cumsum(self._lengths)]).astype(OFFSETS_DTYPE)
        for key, array in (("tokens", tokens), ("mask", mask), ("offsets", offsets)):
            save_npy_atomic(self.directory / files[key], array)
        self.shards.append(sequence_shard_entry(self.split, len(self.shards), tokens, mask, offsets, self.group_size))
        self._tokens, self._masks, self._lengths, self._buffered_tokens = [], [], [], 0

    def checkpoint(self) -> dict:
        """Make the unfinished tail durable; returns this split's part of progress.json."""
        if self._lengths:
            lengths = np.array(self._lengths, dtype=OFFSETS_DTYPE)
            tokens, mask = np.concatenate(self._tokens), np.concatenate(self._masks)
            atomic_write(self._pending_path(),
                         lambda f: np.savez(f, tokens=tokens, mask=mask, lengths=lengths))
        return {"shards": list(self.shards), "pending_sequences": len(self._lengths)}

    def finish(self) -> dict:
        """Write the last, smaller shard; returns this split's manifest entry."""
        if self._lengths:
            self._write_shard()
        entry = {key: sum(s[key] for s in self.shards)
                 for key in ("num_sequences", "num_tokens", "num_trained_tokens")}
        if self.group_size > 1:
            entry["num_pairs"] = entry["num_sequences"] // self.group_size
        return {**entry, "shards": list(self.shards)}


# ---- resuming ------------------------------------------------------------------------------------

OUTPUT_PATTERNS = ("train_*.npy", "val_*.npy", "*.pending", "*" + TMP_SUFFIX, MANIFEST_FILE, PROGRESS_FILE, EVAL_FILE)


def remove_outputs(directory: Path) -> None:
    """Delete what these scripts write (shards, pending tails, temporaries, manifest, progress), nothing else."""
    for pattern in OUTPUT_PATTERNS:
        for path in directory.glob(pattern):
            path.unlink()


def start_or_resume(directory: Path, fingerprint: dict, overwrite: bool) -> dict | None:
    """The saved progress of an earlier run with the same settings, or None to start afresh.

    Output of a run with other settings, or not made by these scripts, is never deleted
    without `overwrite`.
    """
    for path in directory.glob("*" + TMP_SUFFIX):
        path.unlink()  # left by an interrupted write: never complete
    fingerprint = json.loads(json.dumps(fingerprint))  # compare as saved: tuples become lists
    if overwrite:
        remove_outputs(directory)
        return None
    progress_path = directory / PROGRESS_FILE
    if not progress_path.is_file():
        if (directory / MANIFEST_FILE).exists() or any(directory.glob("train_*.npy")):
            raise DataPrepError(f"{directory} already holds token shards not made by this run; "
                                "pass --overwrite to replace them or choose another --out_dir")
        remove_outputs(directory)  # stray pending files
        return None
    try:
        progress = json.loads(progress_path.read_text())
    except (OSError, json.JSONDecodeError):
        progress = None
    if progress is None or progress.get("fingerprint") is None:
        raise DataPrepError(f"{progress_path} is damaged; pass --overwrite to start afresh")
    if progress["fingerprint"] != fingerprint:
        changed = sorted(k for k in set(fingerprint) | set(progress["fingerprint"])
                         if fingerprint.get(k) != progress["fingerprint"].get(k))
        raise DataPrepError(f"{directory} holds output of a run with other settings (changed: {', '.join(changed)}); "
                            "pass --overwrite to replace it or choose another --out_dir")
    if not _outputs_intact(directory, progress):
        print(f"{directory}: some shards listed in {PROGRESS_FILE} are missing or damaged; starting afresh")
        remove_outputs(directory)
        return None
    return progress


def _outputs_intact(directory: Path, progress: dict) -> bool:
    if progress.get("complete") and not (directory / MANIFEST_FILE).is_file():
        return False
    for split, state in progress["splits"].items():
        for shard in state["shards"]:
            if not shard_is_intact(directory, shard):
                return False
        pending = pending_path(directory, split, len(state["shards"]))
        needed_bytes = 4 * state.get("pending_tokens", 0)
        if needed_bytes and (not pending.is_file() or pending.stat().st_size < needed_bytes):
            return False
        if state.get("pending_sequences") and not pending.is_file():
            return False
    return True


# ---- what a finished run records --------------------------------------------------------------------


BYTE_COUNT_CHUNK = 1 << 24  # tokens looked up at a time: a 10B-token split is counted in 128 MiB steps


def with_byte_counts(directory: Path, splits: dict, tokenizer) -> dict:
    """Each split's entry with `num_bytes`, the UTF-8 bytes of the text its tokens stand for (special tokens
    stand for none: tokenizer.token_byte_lengths), and `bytes_per_token`, so runs with different tokenizers can
    be compared in bits per byte. Optional fields: manifests written before them load as they are. One pass
    over the finished shards, memory-mapped (about a second per GB of shards)."""
    table = np.asarray(token_byte_lengths(tokenizer), dtype=np.int64)
    counted = {}
    for split, entry in splits.items():
        num_bytes = 0
        for shard in entry["shards"]:
            tokens = np.load(directory / tokens_file(shard), mmap_mode="r")
            for start in range(0, len(tokens), BYTE_COUNT_CHUNK):
                num_bytes += int(table[tokens[start : start + BYTE_COUNT_CHUNK]].sum())
        counted[split] = {**entry, "num_bytes": num_bytes,
                          "bytes_per_token": round(num_bytes / entry["num_tokens"], 4) if entry["num_tokens"] else 0.0}
    return counted


def check_prep_settings(shard_size: int, val_fraction: float, max_tokens: int, num_workers: int) -> None:
    if shard_size < 1:
        raise DataPrepError(f"--shard_size must be >= 1, got {shard_size}")
    if not 0 <= val_fraction < 1:
        raise DataPrepError(f"--val_fraction must be in [0, 1), got {val_fraction}")
    if max_tokens < 0:
        raise DataPrepError(f"--max_tokens must be >= 0 (0: no limit), got {max_tokens}")
    if num_workers < 0:
        raise DataPrepError(f"--num_workers must be >= 0 (0: tokenize in this process), got {num_workers}")


# ---- one run's state: counts, budgets, checkpoints ------------------------------------------------


class ShardedRun:
    """What a pretraining run and a sequence-data run share: per-source progress, run-wide stats, the mixer
    picks consumed, the train/val split, a writer per split, the clock, and progress.json, written after
    every finished shard so that a crash resumes from there. A subclass names its counters (`progress_type`
    with rows, tokens and exhausted; `stats_type` with tokens) and takes rows in its own `_take`."""

    progress_type: type
    stats_type: type

    def __init__(self, out_dir: Path, sources: list[Source], fingerprint: dict, val_fraction: float,
                 max_tokens: int, saved: dict | None, new_writer: Callable[[str, dict], SplitWriter]):
        """`new_writer(split, saved state)` makes a split's writer; `saved` is `start_or_resume`'s progress."""
        self.out_dir, self.sources, self.fingerprint = out_dir, sources, fingerprint
        self.max_tokens = max_tokens
        saved = saved or {}
        self.splitter = HashSplit(val_fraction, saved.get("val_anchor"))
        self.progress = [self.progress_type(**p) for p in saved.get("sources", [{} for _ in sources])]
        self.picks: int = saved.get("picks", 0)  # mixer picks consumed: a resumed run replays them
        self.stats = self.stats_type(**saved.get("stats", {}))
        self.seconds_before: float = saved.get("seconds", 0.0)
        self.started = time.perf_counter()
        self.writers = {split: new_writer(split, saved.get("splits", {}).get(split, {})) for split in SPLITS}
        self.resumed_shards = sum(len(w.shards) for w in self.writers.values())
        self.done = False  # the global token budget is reached

    def open_mixer(self, open_rows: Callable[..., Iterator[Any]]) -> Mixer:
        """The sources opened where this run stands: each past the rows it has read, the picks replayed."""
        streams = [open_rows(s, skip_rows=p.rows) for s, p in zip(self.sources, self.progress)]
        return Mixer(streams, [s.weight for s in self.sources], start_pick=self.picks,
                     finished=[i for i, p in enumerate(self.progress) if p.exhausted])

    def _read(self, source: int, pick: int) -> bool:
        """Count a row as read; False for one to ignore."""
        progress = self.progress[source]
        if progress.exhausted:
            return False  # read ahead before its budget was known to be full: as if never read
        progress.rows += 1
        self.picks = pick + 1
        return True

    def _written(self, source: int, finished_shards: int, mixer: Mixer) -> None:
        """After a row's tokens went to a writer and into the counts: a source stops at its budget, the
        run at the global one, and a finished shard is a checkpoint."""
        progress = self.progress[source]
        budget = self.sources[source].max_tokens
        if budget and progress.tokens >= budget:
            progress.exhausted = True
            mixer.finish(source)
        self.done = bool(self.max_tokens) and self.stats.tokens >= self.max_tokens
        if finished_shards:
            self.checkpoint()

    @property
    def seconds(self) -> float:
        return self.seconds_before + time.perf_counter() - self.started

    def _progress_file(self, splits: dict, complete: bool) -> dict:
        return {"fingerprint": self.fingerprint, "complete": complete, "splits": splits,
                "sources": [dataclasses.asdict(p) for p in self.progress], "picks": self.picks,
                "val_anchor": self.splitter.anchor, "stats": dataclasses.asdict(self.stats), "seconds": self.seconds}

    def checkpoint(self) -> None:
        """Everything up to the current row becomes durable; a crash after this resumes from here."""
        splits = {split: writer.checkpoint() for split, writer in self.writers.items()}
        write_json_atomic(self.out_dir / PROGRESS_FILE, self._progress_file(splits, complete=False))
        for writer in self.writers.values():
            writer.remove_stale_pending()

    def _complete(self, manifest: dict, splits: dict, pending_key: str) -> None:
        """Write the manifest, then mark the run complete (`pending_key`: the writers' pending count)."""
        write_manifest(self.out_dir, manifest)
        done = {split: {"shards": s["shards"], pending_key: 0} for split, s in splits.items()}
        write_json_atomic(self.out_dir / PROGRESS_FILE, self._progress_file(done, complete=True))
        for writer in self.writers.values():
            writer.remove_pending()  # only now: until progress says complete, a crash resumes from them


