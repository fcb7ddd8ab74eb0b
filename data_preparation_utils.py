"""Building blocks that turn text datasets into token shards (pretraining now; SFT and DPO reuse them).

The pipeline, in the order this file reads:

    sources (local files or a `datasets` dataset)  --Mixer-->  one stream of raw text values
      --ordered_map-->  documents encoded in worker processes, results back in input order
      --ShardWriter-->  fixed-size uint32 `.npy` shards per split
      progress.json after every finished shard (resume) and manifest.json at the end

Nothing is ever half-written under a final name: files are written to `<name>.tmp` in the same
directory and renamed with `os.replace`, which is atomic. Bad input raises `DataPrepError`, whose
message is one line that the command-line scripts print before exiting with status 2.
"""

from __future__ import annotations

import atexit
import codecs
import dataclasses
import functools
import glob
import hashlib
import itertools
import json
import multiprocessing
import os
import pickle
import random
import signal
import threading
import time
from collections import deque
from contextlib import contextmanager
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable, Iterator

import numpy as np

from tokenizer import Tokenizer, load_tokenizer, needs_cutting

SHARD_DTYPE = np.uint32  # Llama 3's 128,256 ids need more than 16 bits
MANIFEST_FORMAT = "llama3-token-shards"
MANIFEST_VERSION = 1
MANIFEST_FILE = "manifest.json"
PROGRESS_FILE = "progress.json"
TMP_SUFFIX = ".tmp"
SPLITS = ("train", "val")
BUILDER_BY_SUFFIX = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
SAMPLE_BY = ("document", "paragraph", "line")  # what one document of a .txt file is
HUGE_DOCUMENT_CHARS = 1_000_000  # counted in the stats: such documents are fine, just worth knowing about
MIX_SEED = 0  # fixed, so changing the training SEED never invalidates prepared data
BATCH_CHARS = 1_000_000  # text per worker task: large enough to amortize pickling, small enough to balance
BATCH_DOCUMENTS = 1024
JSON_CHUNK_BYTES = 1 << 20  # what `datasets` parses per step of a .jsonl file
WRITER_BUFFER_TOKENS = 1 << 26  # a shard up to this size (256 MB) is buffered in one allocation; larger ones grow


class DataPrepError(Exception):
    """Bad input or settings. The message is one line naming the problem."""


def one_line(error: BaseException | str, limit: int = 300) -> str:
    """First line of an error message, shortened: library errors can span pages."""
    lines = str(error).strip().splitlines()
    text = lines[0] if lines else type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


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


# ---- sources --------------------------------------------------------------------------------


@dataclass
class Source:
    """Where documents come from: local `files` (paths, directories or globs) or a `datasets` `dataset`
    (a hub name such as HuggingFaceFW/fineweb-edu, or a local dataset directory)."""

    files: list[str] = field(default_factory=list)
    dataset: str = ""
    config: str | None = None
    split: str = "train"
    streaming: bool = True
    text_column: str = "text"
    sample_by: str = "document"
    weight: float = 1.0  # the next document comes from this source with probability weight / sum(weights)
    max_tokens: int = 0  # stop taking documents from this source after this many tokens (0: no limit)
    paths: list[Path] = field(default_factory=list)  # `files` resolved by `resolve()`

    @property
    def label(self) -> str:
        return self.dataset or " ".join(self.files)

    def resolve(self) -> "Source":
        """Check the source can be used and list its files; raises DataPrepError otherwise."""
        if bool(self.files) == bool(self.dataset):
            raise DataPrepError("a source needs exactly one of files or dataset")
        if self.sample_by not in SAMPLE_BY:
            raise DataPrepError(f"sample_by {self.sample_by!r} is invalid: expected one of {', '.join(SAMPLE_BY)}")
        if not self.weight > 0:
            raise DataPrepError(f"{self.label}: weight must be > 0, got {self.weight}")
        if self.max_tokens < 0:
            raise DataPrepError(f"{self.label}: max_tokens must be >= 0, got {self.max_tokens}")
        if self.files:
            self.paths = resolve_files(self.files)
        return self

    def describe(self) -> dict:
        """The manifest's description of this source (without counts)."""
        where = {"files": self.files, "num_files": len(self.paths)} if self.files else {
            "dataset": self.dataset, "config": self.config, "split": self.split, "streaming": self.streaming}
        return {**where, "text_column": self.text_column, "sample_by": self.sample_by,
                "weight": self.weight, "max_tokens": self.max_tokens}

    def fingerprint(self) -> dict:
        """What must not change between a run and its resumption: the settings and each file's size and mtime."""
        stats = [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in self.paths]
        return {**self.describe(), "file_stats": stats}


def resolve_files(patterns: list[str]) -> list[Path]:
    """Each pattern is a file, a directory (searched recursively for known file types) or a glob."""
    paths: list[Path] = []
    for pattern in patterns:
        path = Path(pattern)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in BUILDER_BY_SUFFIX)
            if not found:
                raise DataPrepError(f"directory {pattern} holds no {'/'.join(BUILDER_BY_SUFFIX)} files")
        elif path.is_file():
            found = [path]
        elif any(c in pattern for c in "*?["):
            found = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
            if not found:
                raise DataPrepError(f"glob {pattern!r} matches no files")
        else:
            raise DataPrepError(f"file not found: {pattern}")
        for p in found:
            if p.suffix not in BUILDER_BY_SUFFIX:
                raise DataPrepError(f"unsupported file type {p.suffix or '(none)'!r}: {p} "
                                    f"(expected {', '.join(BUILDER_BY_SUFFIX)})")
        paths.extend(p.resolve() for p in found)
    return paths


_decode_errors = 0  # the counter behind the codec error handler below (codecs has no per-call state)


def _count_and_replace(error: UnicodeDecodeError) -> tuple[str, int]:
    global _decode_errors
    _decode_errors += 1
    return "\ufffd", error.end


codecs.register_error("dataprep-count-replace", _count_and_replace)


def count_utf8_errors(path: Path, chunk_bytes: int = 1 << 24) -> int:
    """How many invalid UTF-8 sequences the readers will replace by U+FFFD in this text or JSON file."""
    global _decode_errors
    _decode_errors = 0
    decoder = codecs.getincrementaldecoder("utf-8")(errors="dataprep-count-replace")
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            decoder.decode(chunk)
    decoder.decode(b"", final=True)
    return _decode_errors


def decode_errors_in(sources: list[Source]) -> int:
    text_files = [p for s in sources for p in s.paths if BUILDER_BY_SUFFIX[p.suffix] != "parquet"]
    return sum(count_utf8_errors(p) for p in text_files)


# a mix entry spells out a Source: its keys and their JSON types
MIX_TYPES = {"files": (str, list), "dataset": str, "config": (str, type(None)), "split": str, "streaming": bool,
             "text_column": str, "sample_by": str, "weight": (int, float), "max_tokens": int}
assert set(MIX_TYPES) == {f.name for f in dataclasses.fields(Source)} - {"paths"}


def load_mix_file(path: str) -> list[Source]:
    """A JSON list of sources, e.g. `[{"files": "books/", "weight": 2}, {"dataset": "HuggingFaceFW/fineweb-edu",
    "config": "sample-10BT", "max_tokens": 1000000}]`. Relative file paths are relative to the mix file."""
    try:
        entries = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataPrepError(f"mix file not found: {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataPrepError(f"mix file {path}: not readable JSON ({one_line(e)})") from None
    if not isinstance(entries, list) or not entries:
        raise DataPrepError(f"mix file {path}: expected a non-empty JSON list of sources")
    return [_mix_entry(entry, f"mix file {path}, source {i}", Path(path).parent) for i, entry in enumerate(entries)]


def _mix_entry(entry: Any, where: str, base: Path) -> Source:
    if not isinstance(entry, dict):
        raise DataPrepError(f"{where}: expected an object like {{\"files\": ..., \"weight\": ...}}")
    unknown = sorted(set(entry) - set(MIX_TYPES))
    if unknown:
        raise DataPrepError(f"{where}: unknown key(s) {', '.join(unknown)} (known: {', '.join(MIX_TYPES)})")
    for key, value in entry.items():
        if not isinstance(value, MIX_TYPES[key]) or (isinstance(value, bool) and key in ("weight", "max_tokens")):
            raise DataPrepError(f"{where}: {key} has the wrong type ({type(value).__name__})")
    files = entry.get("files", [])
    files = [files] if isinstance(files, str) else files
    if not all(isinstance(f, str) for f in files):
        raise DataPrepError(f"{where}: files must be a path or a list of paths")
    entry = {**entry, "files": [str(base / f) for f in files]}
    try:
        return Source(**entry).resolve()
    except DataPrepError as e:
        raise DataPrepError(f"{where}: {e}") from None


def keep_datasets_from_importing_torch() -> None:
    """Only for the process of a data-preparation command: `datasets` imports torch whenever it is
    installed (about a second of start-up), which data preparation never needs. USE_TORCH=0 also
    tells transformers that torch is missing, so library code must not set it. A value the user set wins."""
    os.environ.setdefault("USE_TORCH", "0")


def _datasets():
    """`datasets` takes about a second to import; worker processes and argument errors never need it."""
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # we report its errors ourselves, in one line
    return datasets


def open_source(source: Source, skip_rows: int = 0) -> Iterator[Any]:
    """The values of the text column, in a fixed order (str when well-formed), after `skip_rows` rows.

    Opening checks the column exists, so a typo fails before any work starts.
    """
    if source.dataset:
        streams = [_column_values(_load_dataset(source), source.text_column, source.label)]
    else:
        # consecutive files of one type are one `load_dataset` call; chaining the calls keeps file order
        groups = itertools.groupby(source.paths, key=lambda p: BUILDER_BY_SUFFIX[p.suffix])
        streams = [_column_values(_load_files(builder, list(paths), source),
                                  "text" if builder == "text" else source.text_column, source.label)
                   for builder, paths in groups]
    return itertools.islice(_reraise_as_prep_error(itertools.chain.from_iterable(streams), source.label),
                            skip_rows, None)


def _load_dataset(source: Source):
    datasets = _datasets()
    try:
        return datasets.load_dataset(source.dataset, source.config, split=source.split, streaming=source.streaming)
    except Exception as e:  # network, unknown name/config/split: all reported the same way
        raise DataPrepError(f"cannot load dataset {source.dataset!r}: {one_line(e)}") from None


def _load_files(builder: str, paths: list[Path], source: Source):
    options: dict[str, Any] = {}
    if builder == "text":
        options = {"sample_by": source.sample_by, "encoding_errors": "replace"}
    elif builder == "json":
        # the json builder only re-decodes (with our error handling) when the encoding is not spelled "utf-8";
        # datasets' default 10 MB chunk costs about 0.07 s before the first row: the first chunk is parsed
        # line by line twice (a scan for mixed types) before the real read
        options = {"encoding": "utf8", "encoding_errors": "replace", "chunksize": JSON_CHUNK_BYTES}
    try:
        return _datasets().load_dataset(builder, data_files=[str(p) for p in paths], split="train",
                                        streaming=True, **options)
    except Exception as e:
        raise DataPrepError(f"cannot read {paths[0]}: {one_line(e)}") from None


def _column_values(dataset, column: str, label: str) -> Iterator[Any]:
    if dataset.column_names is not None:  # parquet and hub datasets know their columns before reading
        _check_column(column, dataset.column_names, label)
        dataset = dataset.select_columns([column])  # skip decoding the other columns (urls, scores, ...)
    batches = iter(dataset.iter(batch_size=256))
    try:
        first = next(batches, None)  # json files only reveal their columns once read
    except Exception as e:
        raise DataPrepError(f"reading {label} failed: {one_line(e)}") from None
    if first is not None:
        _check_column(column, list(first), label)
    return (value for batch in itertools.chain([first] if first else [], batches) for value in batch[column])


def _check_column(column: str, columns: list[str], label: str) -> None:
    if column not in columns:
        raise DataPrepError(f"column {column!r} not found in {label} (columns: {', '.join(columns)}); "
                            "choose one with --text_column")


def _reraise_as_prep_error(values: Iterator[Any], label: str) -> Iterator[Any]:
    try:
        yield from values
    except DataPrepError:
        raise
    except Exception as e:  # a broken line or a dropped connection halfway: one clear line, resumable
        raise DataPrepError(f"reading {label} failed: {one_line(e)}") from None


# ---- mixing sources into one stream of documents ------------------------------------------------

OK, EMPTY, MALFORMED = "ok", "empty", "malformed"


def classify(value: Any) -> str:
    """A row's text is well-formed when it is a str, and worth a document when not just whitespace."""
    if not isinstance(value, str):
        return MALFORMED
    return EMPTY if not value or value.isspace() else OK


_END = object()


class Mixer:
    """Interleaves sources: each next row comes from source i with probability weight_i / sum(weights).

    The sequence of picks depends only on MIX_SEED. A pick of a finished source (out of rows, or its
    token budget reached) is skipped, so which documents are written never depends on how far the
    reading runs ahead of the writing (the number of workers), and a resumed run replays the picks.
    """

    def __init__(self, streams: list[Iterator[Any]], weights: list[float], start_pick: int = 0,
                 finished: Iterable[int] = ()):
        self.streams, self.weights = streams, weights
        self.finished = set(finished)
        self.rng = random.Random(MIX_SEED)
        self.pick = 0
        while self.pick < start_pick:
            self._draw()

    def _draw(self) -> int:
        self.pick += 1
        if len(self.streams) == 1:
            return 0
        return self.rng.choices(range(len(self.streams)), weights=self.weights)[0]

    def finish(self, source_index: int) -> None:
        """Take no more rows from this source (the writer found its budget full)."""
        self.finished.add(source_index)

    def __iter__(self) -> Iterator[tuple[int, int, Any]]:
        """Yields (pick number, source index, raw value)."""
        while len(self.finished) < len(self.streams):
            source_index = self._draw()
            if source_index in self.finished:
                continue
            value = next(self.streams[source_index], _END)
            if value is _END:
                self.finished.add(source_index)
                continue
            yield self.pick - 1, source_index, value


@dataclass
class Row:
    """What the main process keeps about one row while its text is being encoded elsewhere."""

    pick: int
    source: int
    status: str
    chars: int


def batch_rows(rows: Iterable[tuple[int, int, Any]]) -> Iterator[tuple[list[Row], list[str]]]:
    """Group rows into worker tasks: (every row's bookkeeping, the texts to encode)."""
    metas: list[Row] = []
    texts: list[str] = []
    chars = 0
    for pick, source, value in rows:
        status = classify(value)
        metas.append(Row(pick, source, status, len(value) if status == OK else 0))
        if status == OK:
            texts.append(value)
            chars += len(value)
        if chars >= BATCH_CHARS or len(metas) >= BATCH_DOCUMENTS:
            yield metas, texts
            metas, texts, chars = [], [], 0
    if metas:
        yield metas, texts


# ---- encoding in worker processes ---------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def cached_tokenizer(path: str | None):
    """One tokenizer per process and path: loading one takes about a second."""
    return load_tokenizer(path)


_encoder = None  # the tokenizer `encode_documents` uses in this process (see `init_encoder`)


def init_encoder(tokenizer) -> None:
    global _encoder
    _encoder = tokenizer


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


@dataclass
class EncodedBatch:
    tokens: np.ndarray  # every document's [bos] + ids + [eos], concatenated (uint32)
    lengths: np.ndarray  # tokens per document (int64)
    hashes: np.ndarray  # a content hash per document (uint64), which decides train vs val


def encode_documents(texts: list[str]) -> EncodedBatch:
    """Frame each text as `[bos] + tokens + [eos]`; runs in a worker process (see `init_encoder`).

    One tokenizer call per text: `encode_batch(num_threads=1)` builds a thread pool per call, which
    makes it about 1.5x slower. The result is numpy arrays, ready to write: they pickle as one buffer
    each, where lists of ints would cost the main process, which shares the cores, time per token.
    """
    tokenizer = _encoder
    bos, eos = np.array([tokenizer.bos_id], SHARD_DTYPE), np.array([tokenizer.eos_id], SHARD_DTYPE)
    ids = [encode_text(tokenizer, text) for text in texts]
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids)) + 2
    tokens = np.concatenate([part for doc in ids for part in (bos, doc, eos)]) if ids else np.empty(0, SHARD_DTYPE)
    hashes = np.fromiter(map(document_hash, texts), dtype=np.uint64, count=len(texts))
    return EncodedBatch(tokens, lengths, hashes)


def encode_text(tokenizer, text: str) -> np.ndarray:
    """`tokenizer.encode(text, bos=False, eos=False)` as a uint32 array.

    Meta's tokenizer encodes most texts in one tiktoken call, which can fill a numpy array directly,
    with no Python int per token (about 15% faster). Texts that Meta cuts into pieces first (very
    long ones, or ones with very long runs), and any other tokenizer, take the plain path.
    """
    if isinstance(tokenizer, Tokenizer) and not needs_cutting(text):
        return tokenizer.model.encode_to_numpy(text, disallowed_special=())
    return np.array(tokenizer.encode(text, bos=False, eos=False), dtype=SHARD_DTYPE)


def document_hash(text: str) -> int:
    """64 bits of BLAKE2b of the text: identical documents always land in the same split."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def is_validation(doc_hash: int, val_fraction: float) -> bool:
    return doc_hash < val_fraction * 2.0**64


@dataclass
class HashSplit:
    """Train or val by a hash of the content, so identical content always lands in the same split.

    About `val_fraction` of hashes are validation. So that even a small dataset has a validation
    split, the hash of the first item is validation too: every copy of that item, wherever it comes,
    not only the first one. `anchor` is saved with the progress so a resumed run keeps the rule.
    """

    val_fraction: float
    anchor: int | None = None  # the first item's hash

    def split_of(self, content_hash: int) -> str:
        if self.val_fraction == 0:
            return "train"
        if self.anchor is None:
            self.anchor = content_hash
        return "val" if content_hash == self.anchor or is_validation(content_hash, self.val_fraction) else "train"


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


# ---- shards --------------------------------------------------------------------------------------


def shard_name(split: str, index: int) -> str:
    return f"{split}_{index:06d}.npy"


class ShardWriter:
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
        self._buffer = np.empty(0, SHARD_DTYPE)
        self._buffered = 0  # tokens held in memory, not yet in a shard
        self._persisted = 0  # how many of them are in the pending file already
        if pending_tokens:
            self._restore_pending(pending_tokens)

    @property
    def num_tokens(self) -> int:
        return sum(s["num_tokens"] for s in self.shards) + self._buffered

    def _pending_path(self) -> Path:
        return self.directory / f"{self.split}_{len(self.shards):06d}.pending"

    def _restore_pending(self, count: int) -> None:
        path = self._pending_path()
        tokens = np.fromfile(path, dtype="<u4", count=count).astype(SHARD_DTYPE)
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
            grown = np.empty(min(self.shard_size, max(end, 2 * len(self._buffer), WRITER_BUFFER_TOKENS)), SHARD_DTYPE)
            grown[: self._buffered] = self._buffer[: self._buffered]
            self._buffer = grown
        self._buffer[self._buffered : end] = tokens
        self._buffered = end

    def _write_shard(self, tokens: np.ndarray) -> None:
        name = shard_name(self.split, len(self.shards))
        save_npy_atomic(self.directory / name, tokens.astype(SHARD_DTYPE, copy=False))
        self.shards.append({"file": name, "num_tokens": int(len(tokens)), "max_token_id": int(tokens.max())})

    def checkpoint(self) -> dict:
        """Make the unfinished tail durable; returns this split's part of progress.json."""
        with open(self._pending_path(), "ab" if self._persisted else "wb") as f:
            self._buffer[self._persisted : self._buffered].astype("<u4").tofile(f)
            f.flush()
            os.fsync(f.fileno())
        self._persisted = self._buffered
        return {"shards": list(self.shards), "pending_tokens": self._persisted}

    def remove_stale_pending(self) -> None:
        """Pending files of shards now finished; call once progress.json no longer refers to them."""
        current = self._pending_path()
        for path in self.directory.glob(f"{self.split}_*.pending"):
            if path != current:
                path.unlink()

    def finish(self) -> dict:
        """Write the last, shorter shard; returns this split's manifest entry."""
        if self._buffered:
            self._write_shard(self._buffer[: self._buffered])
        self._buffer, self._buffered, self._persisted = np.empty(0, SHARD_DTYPE), 0, 0
        return {"num_tokens": self.num_tokens, "shards": list(self.shards)}

    def remove_pending(self) -> None:
        for path in self.directory.glob(f"{self.split}_*.pending"):
            path.unlink()


def shard_is_intact(path: Path, num_tokens: int) -> bool:
    """A shard can be trusted if it loads as a 1-D uint32 array of the recorded length."""
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError):
        return False
    return array.dtype == SHARD_DTYPE and array.ndim == 1 and len(array) == num_tokens


# ---- resuming ------------------------------------------------------------------------------------

OUTPUT_PATTERNS = ("train_*.npy", "val_*.npy", "*.pending", "*" + TMP_SUFFIX, MANIFEST_FILE, PROGRESS_FILE)


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
            if not shard_is_intact(directory / shard["file"], shard["num_tokens"]):
                return False
        pending = directory / f"{split}_{len(state['shards']):06d}.pending"
        needed_bytes = 4 * state["pending_tokens"]
        if needed_bytes and (not pending.is_file() or pending.stat().st_size < needed_bytes):
            return False
    return True


# ---- manifest and stats --------------------------------------------------------------------------


@dataclass
class PrepStats:
    """Counts over every row read; written to the manifest's "stats"."""

    documents: int = 0
    train_documents: int = 0
    val_documents: int = 0
    empty_documents: int = 0  # empty or whitespace-only text: skipped
    malformed_rows: int = 0  # text missing (null) or not a string: skipped
    decode_errors: int = 0  # invalid UTF-8 sequences in local files, read as U+FFFD
    huge_documents: int = 0  # documents of more than HUGE_DOCUMENT_CHARS characters (kept)
    tokens: int = 0


def build_manifest(tokenizer, shard_size: int, splits: dict, sources: list[dict], stats: dict, created: str) -> dict:
    """The contract with the dataloader: shard files, their sizes and the tokenizer they need."""
    return {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "dtype": np.dtype(SHARD_DTYPE).name,
        "tokenizer": tokenizer.identity(),
        "bos_id": tokenizer.bos_id,
        "eos_id": tokenizer.eos_id,
        "shard_size": shard_size,
        "splits": splits,
        "sources": sources,
        "stats": stats,
        "created": created,
    }
