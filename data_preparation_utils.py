"""Building blocks that turn datasets into shards: token shards for pretraining, sequence shards for SFT and DPO.

The pipeline, in the order this file reads:

    sources (local files or a `datasets` dataset)  --Mixer-->  one stream of raw text values (or whole rows)
      --ordered_map-->  documents encoded in worker processes, results back in input order
      --ShardWriter-->  fixed-size uint32 `.npy` shards per split (pretraining), or
      --SequenceShardWriter-->  whole sequences with their loss masks and offsets (chat and preference data)
      progress.json after every finished shard (resume) and manifest.json at the end

Pretraining's driver is load_pretrain_dataset.py; the sequence-data scripts supply a `SequenceJob` (how a
row becomes sequences) to `prepare_sequence_shards` at the end of this file, which does the rest. Both keep
a run's counts, budgets and checkpoints in a `ShardedRun`.

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
import sys
import threading
import time
from collections import deque
from contextlib import closing, contextmanager
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable, Iterator

import numpy as np
from tqdm import tqdm

from tokenizer import Tokenizer, load_tokenizer, needs_cutting, token_byte_lengths

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

    @classmethod
    def mix_types(cls) -> dict:
        """The keys a mix file's entry may give for this kind of source, and their JSON types."""
        return MIX_TYPES

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


def load_mix_file(path: str, source_class: type[Source] = Source) -> list[Source]:
    """A JSON list of sources, e.g. `[{"files": "books/", "weight": 2}, {"dataset": "HuggingFaceFW/fineweb-edu",
    "config": "sample-10BT", "max_tokens": 1000000}]`. Relative file paths are relative to the mix file.
    Each entry becomes a `source_class` (a subclass may accept other keys: see `Source.mix_types`)."""
    try:
        entries = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataPrepError(f"mix file not found: {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataPrepError(f"mix file {path}: not readable JSON ({one_line(e)})") from None
    if not isinstance(entries, list) or not entries:
        raise DataPrepError(f"mix file {path}: expected a non-empty JSON list of sources")
    return [_mix_entry(entry, f"mix file {path}, source {i}", Path(path).parent, source_class)
            for i, entry in enumerate(entries)]


def _mix_entry(entry: Any, where: str, base: Path, source_class: type[Source]) -> Source:
    if not isinstance(entry, dict):
        raise DataPrepError(f"{where}: expected an object like {{\"files\": ..., \"weight\": ...}}")
    types = source_class.mix_types()
    unknown = sorted(set(entry) - set(types))
    if unknown:
        raise DataPrepError(f"{where}: unknown key(s) {', '.join(unknown)} (known: {', '.join(types)})")
    for key, value in entry.items():
        if not isinstance(value, types[key]) or (isinstance(value, bool) and key in ("weight", "max_tokens")):
            raise DataPrepError(f"{where}: {key} has the wrong type ({type(value).__name__})")
    files = entry.get("files", [])
    files = [files] if isinstance(files, str) else files
    if not all(isinstance(f, str) for f in files):
        raise DataPrepError(f"{where}: files must be a path or a list of paths")
    entry = {**entry, "files": [str(base / f) for f in files]}
    try:
        return source_class(**entry).resolve()
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


def open_rows(source: Source, skip_rows: int = 0) -> Iterator[dict]:
    """Whole rows as dicts (column -> value; a column a row lacks is None), in a fixed order, after
    `skip_rows` rows: for data whose rows have structure (conversations, preference pairs), where
    `open_source` reads one text column."""
    if source.dataset:
        streams = [_row_dicts(_load_dataset(source))]
    else:
        groups = itertools.groupby(source.paths, key=lambda p: BUILDER_BY_SUFFIX[p.suffix])
        streams = [_row_dicts(_load_files(builder, list(paths), source)) for builder, paths in groups]
    return itertools.islice(_reraise_as_prep_error(itertools.chain.from_iterable(streams), source.label),
                            skip_rows, None)


def _row_dicts(dataset) -> Iterator[dict]:
    for batch in dataset.iter(batch_size=256):
        columns = list(batch)
        for values in zip(*(batch[c] for c in columns)):
            yield dict(zip(columns, values))


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


def pending_path(directory: Path, split: str, shard_index: int) -> Path:
    """Where a split's tail waits between checkpoints until it becomes shard `shard_index`."""
    return directory / f"{split}_{shard_index:06d}.pending"


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
        self._buffer = np.empty(0, SHARD_DTYPE)
        self._buffered = 0  # tokens held in memory, not yet in a shard
        self._persisted = 0  # how many of them are in the pending file already
        if pending_tokens:
            self._restore_pending(pending_tokens)

    @property
    def num_tokens(self) -> int:
        return sum(s["num_tokens"] for s in self.shards) + self._buffered

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

    def finish(self) -> dict:
        """Write the last, shorter shard; returns this split's manifest entry."""
        if self._buffered:
            self._write_shard(self._buffer[: self._buffered])
        self._buffer, self._buffered, self._persisted = np.empty(0, SHARD_DTYPE), 0, 0
        return {"num_tokens": self.num_tokens, "shards": list(self.shards)}


def shard_is_intact(path: Path, num_tokens: int) -> bool:
    """A shard can be trusted if it loads as a 1-D uint32 array of the recorded length."""
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError):
        return False
    return array.dtype == SHARD_DTYPE and array.ndim == 1 and len(array) == num_tokens


# ---- sequence shards (chat and preference data) ----------------------------------------------------

SEQUENCE_FORMAT = "llama3-sequence-shards"
MASK_DTYPE = np.uint8  # 1 where a token is a training target
OFFSETS_DTYPE = np.int64


def sequence_shard_sha256(tokens: np.ndarray, mask: np.ndarray, offsets: np.ndarray) -> str:
    """A sequence shard's content hash, recorded as its manifest entry's "sha256": the bytes of its tokens, mask
    and offsets as stored, in that order. What is derived from the data (DPO's precomputed reference
    log-probabilities) is keyed by it, so data prepared again under the same names and counts is told apart."""
    digest = hashlib.sha256()
    for array in (tokens, mask, offsets):
        digest.update(np.ascontiguousarray(array).data)
    return digest.hexdigest()


def sequence_shard_files(split: str, index: int) -> dict[str, str]:
    stem = f"{split}_{index:06d}"
    return {"tokens": f"{stem}.tokens.npy", "mask": f"{stem}.mask.npy", "offsets": f"{stem}.offsets.npy"}


class SequenceShardWriter(SplitWriter):
    """Cuts one split's sequences into shards of whole groups (a group: one conversation, or the two
    sequences of a preference pair, which a shard never splits) of at most `shard_size` tokens; a
    group larger than that gets a shard of its own. A shard is three files: the sequences' tokens
    concatenated (uint32), their loss mask (uint8, same length) and the offsets where each sequence
    starts (int64, one more than the sequences: sequence j is tokens[offsets[j]:offsets[j+1]]); its manifest
    entry records their content hash (`sequence_shard_sha256`).

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
        self._tokens, self._masks = [tokens[:total].astype(SHARD_DTYPE)], [mask[:total].astype(MASK_DTYPE)]
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
            self._tokens.append(np.array(tokens, SHARD_DTYPE))
            self._masks.append(np.array(mask, MASK_DTYPE))
            self._lengths.append(len(tokens))
        self._buffered_tokens += size
        return finished

    def _write_shard(self) -> None:
        files = sequence_shard_files(self.split, len(self.shards))
        tokens = np.concatenate(self._tokens).astype(SHARD_DTYPE, copy=False)
        mask = np.concatenate(self._masks).astype(MASK_DTYPE, copy=False)
        offsets = np.concatenate([[0], np.cumsum(self._lengths)]).astype(OFFSETS_DTYPE)
        for key, array in (("tokens", tokens), ("mask", mask), ("offsets", offsets)):
            save_npy_atomic(self.directory / files[key], array)
        entry = {**files, "num_sequences": len(self._lengths), "num_tokens": int(len(tokens)),
                 "num_trained_tokens": int(mask.sum()), "max_token_id": int(tokens.max()),
                 "sha256": sequence_shard_sha256(tokens, mask, offsets)}
        if self.group_size > 1:
            entry["num_pairs"] = len(self._lengths) // self.group_size
        self.shards.append(entry)
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


def sequence_shard_is_intact(directory: Path, shard: dict) -> bool:
    """Its three files load as 1-D arrays of the recorded dtypes and lengths, the offsets spanning the tokens."""
    try:
        tokens, mask, offsets = (np.load(directory / shard[key], mmap_mode="r", allow_pickle=False)
                                 for key in ("tokens", "mask", "offsets"))
    except (OSError, ValueError, KeyError):
        return False
    n, t = shard["num_sequences"], shard["num_tokens"]
    return (tokens.dtype == SHARD_DTYPE and mask.dtype == MASK_DTYPE and offsets.dtype == OFFSETS_DTYPE
            and tokens.shape == (t,) and mask.shape == (t,) and offsets.shape == (n + 1,)
            and offsets[0] == 0 and offsets[-1] == t)


# ---- resuming ------------------------------------------------------------------------------------

EVAL_FILE = "eval.jsonl"  # chat data: the held-out conversations as prompt and answer
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
            intact = (shard_is_intact(directory / shard["file"], shard["num_tokens"]) if "file" in shard
                      else sequence_shard_is_intact(directory, shard))  # token shards, or sequence shards
            if not intact:
                return False
        pending = pending_path(directory, split, len(state["shards"]))
        needed_bytes = 4 * state.get("pending_tokens", 0)
        if needed_bytes and (not pending.is_file() or pending.stat().st_size < needed_bytes):
            return False
        if state.get("pending_sequences") and not pending.is_file():
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
            tokens = np.load(directory / shard.get("file", shard.get("tokens")), mmap_mode="r")
            for start in range(0, len(tokens), BYTE_COUNT_CHUNK):
                num_bytes += int(table[tokens[start : start + BYTE_COUNT_CHUNK]].sum())
        counted[split] = {**entry, "num_bytes": num_bytes,
                          "bytes_per_token": round(num_bytes / entry["num_tokens"], 4) if entry["num_tokens"] else 0.0}
    return counted


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


def check_prep_settings(shard_size: int, val_fraction: float, max_tokens: int, num_workers: int) -> None:
    if shard_size < 1:
        raise DataPrepError(f"--shard_size must be >= 1, got {shard_size}")
    if not 0 <= val_fraction < 1:
        raise DataPrepError(f"--val_fraction must be in [0, 1), got {val_fraction}")
    if max_tokens < 0:
        raise DataPrepError(f"--max_tokens must be >= 0 (0: no limit), got {max_tokens}")
    if num_workers < 0:
        raise DataPrepError(f"--num_workers must be >= 0 (0: tokenize in this process), got {num_workers}")


def load_prep_tokenizer(path: str | None):
    try:
        return cached_tokenizer(path)
    except (FileNotFoundError, ImportError, ValueError) as e:
        raise DataPrepError(f"cannot load the tokenizer: {one_line(e)}") from None


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
        write_json_atomic(self.out_dir / MANIFEST_FILE, manifest)
        done = {split: {"shards": s["shards"], pending_key: 0} for split, s in splits.items()}
        write_json_atomic(self.out_dir / PROGRESS_FILE, self._progress_file(done, complete=True))
        for writer in self.writers.values():
            writer.remove_pending()  # only now: until progress says complete, a crash resumes from them


# ---- preparing sequence shards: rows -> (tokens, mask) sequences -> shards ----------------------------
#
# The chat (SFT) and preference (DPO) scripts differ only in how a row becomes sequences, which a
# `SequenceJob` supplies; reading, mixing, workers, splitting, writing and resuming are shared here.

BATCH_ROWS = 256  # rows per worker task: chat rows are often kilobytes each
SKIPPED_EXAMPLES = 5  # skipped rows shown, with why, in the summary and the manifest


@dataclass
class RowResult:
    """What one row became in a worker: its sequences, or why it was skipped."""

    sequences: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)  # (tokens, mask) each
    content_hash: int = 0  # decides the split: equal prompts, so equal rows, share one
    skip: str = ""  # why the row was skipped (a stats key); "" when written
    note: str = ""  # the detail of a skip, shown for the first few
    changes: dict[str, int] = field(default_factory=dict)  # what was changed to make it fit, e.g. {"truncated": 1}


@dataclass
class SequenceBatch:
    """One worker task's results, ready to pickle: per-row fields, and the written rows' sequences
    concatenated (a handful of arrays pickle far faster than many small ones)."""

    skips: list[str]
    notes: list[str]
    changes: list[dict[str, int]]
    tokens: np.ndarray  # uint32
    mask: np.ndarray  # uint8, same length
    lengths: np.ndarray  # int64, tokens per sequence; the written rows' sequences in order
    hashes: np.ndarray  # uint64, one per written row

    @classmethod
    def of(cls, results: list[RowResult]) -> "SequenceBatch":
        sequences = [seq for r in results for seq in r.sequences]
        return cls(skips=[r.skip for r in results], notes=[r.note for r in results],
                   changes=[r.changes for r in results],
                   tokens=np.concatenate([t for t, _ in sequences]) if sequences else np.empty(0, SHARD_DTYPE),
                   mask=np.concatenate([m for _, m in sequences]) if sequences else np.empty(0, MASK_DTYPE),
                   lengths=np.array([len(t) for t, _ in sequences], dtype=np.int64),
                   hashes=np.array([r.content_hash for r in results if not r.skip], dtype=np.uint64))


@dataclass
class SequenceJob:
    """What a sequence-data script supplies to `prepare_sequence_shards`."""

    kind: str  # the manifest's kind: "chat" | "preference"
    group_size: int  # sequences per written row: 1 (a conversation) or 2 (chosen, then rejected)
    render: Callable[[list[tuple[int, Any]]], SequenceBatch]  # in a worker: (source index, row) pairs -> batch
    init: Callable[..., None]  # the worker's initializer: init(tokenizer, *init_args)
    init_args: tuple
    settings: dict  # whatever else decides the output: fingerprinted, and written to the manifest
    max_seq_len: int
    exact_answers: bool = False  # every held-out conversation's final answer is one exact string
    finish: Callable[[Path, Any, dict], None] | None = None  # (out_dir, tokenizer, splits): e.g. eval.jsonl


@dataclass
class SourceCounts:
    rows: int = 0  # rows read, skipped ones included: where a resumed run restarts
    kept: int = 0
    tokens: int = 0
    exhausted: bool = False  # its max_tokens is reached


@dataclass
class SequenceStats:
    """Counts over every row read; written to the manifest's "stats"."""

    rows: int = 0
    kept: int = 0  # conversations, or pairs, written
    train: int = 0
    val: int = 0
    sequences: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    decode_errors: int = 0  # invalid UTF-8 sequences in local files, read as U+FFFD
    skipped: dict[str, int] = field(default_factory=dict)  # why -> rows
    changed: dict[str, int] = field(default_factory=dict)  # what was changed to fit (truncated, turns_cut, ...)
    skipped_examples: list[str] = field(default_factory=list)  # the first few skipped rows, with why


def batch_items(rows: Iterable[tuple[int, int, Any]], size: int) -> Iterator[tuple[list[tuple[int, int]], list]]:
    """Group mixed rows into worker tasks: ((pick, source) per row, (source, row) per row)."""
    rows = iter(rows)  # one iterator throughout: islice on the Mixer itself would start a new one per chunk
    for chunk in iter(lambda: list(itertools.islice(rows, size)), []):
        yield [(pick, source) for pick, source, _ in chunk], [(source, row) for _, source, row in chunk]


class SequencePreparation(ShardedRun):
    """Sends each written row's sequences to the train/val writers, keeps the counts, and checkpoints
    after every finished shard (see `start_or_resume`)."""

    progress_type, stats_type = SourceCounts, SequenceStats

    def __init__(self, out_dir: Path, sources: list[Source], job: SequenceJob, fingerprint: dict, shard_size: int,
                 val_fraction: float, max_tokens: int, saved: dict | None):
        super().__init__(out_dir, sources, fingerprint, val_fraction, max_tokens, saved,
                         lambda split, state: SequenceShardWriter(out_dir, split, shard_size, job.group_size, **state))
        self.job = job
        self.resumed_rows = self.stats.rows

    def consume(self, rows: list[tuple[int, int]], batch: SequenceBatch, mixer: Mixer) -> None:
        ends = np.cumsum(batch.lengths)
        starts = ends - batch.lengths
        g, written = self.job.group_size, 0  # written: index of the next written row's sequences in `batch`
        for (pick, source), skip, note, changes in zip(rows, batch.skips, batch.notes, batch.changes):
            if self.done:
                return
            group, content_hash = [], 0
            if not skip:
                group = [(batch.tokens[starts[j] : ends[j]], batch.mask[starts[j] : ends[j]])
                         for j in range(written * g, written * g + g)]
                content_hash = int(batch.hashes[written])
                written += 1
            self._take(pick, source, skip, note, changes, group, content_hash, mixer)

    def _take(self, pick: int, source: int, skip: str, note: str, changes: dict, group: list,
              content_hash: int, mixer: Mixer) -> None:
        progress, stats = self.progress[source], self.stats
        if not self._read(source, pick):
            return
        stats.rows += 1
        if skip:
            stats.skipped[skip] = stats.skipped.get(skip, 0) + 1
            if len(stats.skipped_examples) < SKIPPED_EXAMPLES:
                stats.skipped_examples.append(f"{self.sources[source].label} row {progress.rows - 1}: {skip}"
                                              + (f" ({note})" if note else ""))
            return
        for key, count in changes.items():
            stats.changed[key] = stats.changed.get(key, 0) + count
        split = self.splitter.split_of(content_hash)
        finished_shards = self.writers[split].add(group)
        num_tokens = sum(len(tokens) for tokens, _ in group)
        progress.kept += 1
        progress.tokens += num_tokens
        stats.kept += 1
        setattr(stats, split, getattr(stats, split) + 1)
        stats.sequences += len(group)
        stats.tokens += num_tokens
        stats.trained_tokens += sum(int(mask.sum()) for _, mask in group)
        self._written(source, finished_shards, mixer)

    def finish(self, tokenizer, shard_size: int) -> dict:
        """Write the last shards, the job's extra files, the manifest, and mark the run complete."""
        stats = self.stats
        if stats.kept == 0:
            reasons = ", ".join(f"{n:,} {why}" for why, n in sorted(stats.skipped.items())) or "none"
            raise DataPrepError(f"no usable rows: {stats.rows:,} read, skipped: {reasons}"
                                + (f"; first: {stats.skipped_examples[0]}" if stats.skipped_examples else ""))
        splits = {split: writer.finish() for split, writer in self.writers.items()}
        if splits["train"]["num_sequences"] == 0:
            raise DataPrepError(f"no training rows: all {stats.kept} went to validation; "
                                "add data or lower --val_fraction")
        if self.job.finish:
            self.job.finish(self.out_dir, tokenizer, splits)
        splits = with_byte_counts(self.out_dir, splits, tokenizer)
        sources = [{**s.describe(), "rows": p.rows, "kept": p.kept, "tokens": p.tokens}
                   for s, p in zip(self.sources, self.progress)]
        manifest = build_sequence_manifest(
            tokenizer, self.job, shard_size, splits, sources,
            {**dataclasses.asdict(stats), "seconds": round(self.seconds, 3)},
            datetime.now(timezone.utc).isoformat(timespec="seconds"))
        self._complete(manifest, splits, "pending_sequences")
        return manifest


def build_sequence_manifest(tokenizer, job: SequenceJob, shard_size: int, splits: dict, sources: list[dict],
                            stats: dict, created: str) -> dict:
    """The contract with the SFT and DPO loaders (see `SequenceShardWriter` for the files)."""
    return {
        "format": SEQUENCE_FORMAT,
        "version": MANIFEST_VERSION,
        "kind": job.kind,
        "dtype": np.dtype(SHARD_DTYPE).name,
        "mask_dtype": np.dtype(MASK_DTYPE).name,
        "offsets_dtype": np.dtype(OFFSETS_DTYPE).name,
        "tokenizer": tokenizer.identity(),
        "bos_id": tokenizer.bos_id,
        "eos_id": tokenizer.eos_id,
        "eot_id": tokenizer.eot_id,
        "max_seq_len": job.max_seq_len,
        "exact_answers": job.exact_answers,
        "shard_size": shard_size,
        "settings": job.settings,
        "splits": splits,
        "sources": sources,
        "stats": stats,
        "created": created,
    }


def prepare_sequence_shards(job: SequenceJob, sources: list[Source], out_dir: str | Path, *,
                            tokenizer_path: str | None = None, shard_size: int, val_fraction: float,
                            max_tokens: int = 0, num_workers: int = 0, overwrite: bool = False,
                            show_progress: bool = True) -> dict:
    """Turn the rows of `sources` into sequence shards under `out_dir` as `job` says, resuming an
    interrupted run with the same settings.

    Returns {"manifest", "already_done" (nothing to do), "resumed_shards" (finished before this call),
    "session_rows" (rows read by this call), "seconds" (this call)}.
    """
    check_prep_settings(shard_size, val_fraction, max_tokens, num_workers)
    sources = [s.resolve() for s in sources]
    tokenizer = load_prep_tokenizer(tokenizer_path)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fingerprint = {"version": MANIFEST_VERSION, "format": SEQUENCE_FORMAT, "kind": job.kind,
                   "tokenizer": tokenizer.identity(), "shard_size": shard_size, "val_fraction": val_fraction,
                   "max_tokens": max_tokens, "max_seq_len": job.max_seq_len, "exact_answers": job.exact_answers,
                   "settings": job.settings, "sources": [s.fingerprint() for s in sources]}
    saved = start_or_resume(out_dir, fingerprint, overwrite)
    started = time.perf_counter()
    if saved and saved["complete"]:
        print(f"{out_dir} is already prepared with these settings; nothing to do (--overwrite to redo)")
        manifest = json.loads((out_dir / MANIFEST_FILE).read_text())
        return {"manifest": manifest, "already_done": True, "resumed_shards": 0, "session_rows": 0, "seconds": 0.0}

    run = SequencePreparation(out_dir, sources, job, fingerprint, shard_size, val_fraction, max_tokens, saved)
    with worker_pool(num_workers, job.init, (tokenizer, *job.init_args), out_dir) as pool:
        mixer = run.open_mixer(open_rows)
        run.stats.decode_errors = decode_errors_in(sources)
        if run.resumed_shards:
            print(f"resuming: {run.resumed_shards} shard(s), {run.resumed_rows:,} rows already done")
        results = ordered_map(job.render, batch_items(mixer, BATCH_ROWS), pool, 2 * num_workers + 2)
        with closing(results), tqdm(initial=run.stats.rows, unit="row", unit_scale=True, desc="rendering",
                                    disable=not show_progress, mininterval=0.5) as bar:
            for rows, batch in results:
                rows_before = run.stats.rows
                run.consume(rows, batch, mixer)
                bar.update(run.stats.rows - rows_before)
                bar.set_postfix(kept=run.stats.kept, refresh=False)
                if run.done:
                    break
    manifest = run.finish(tokenizer, shard_size)
    return {"manifest": manifest, "already_done": False, "resumed_shards": run.resumed_shards,
            "session_rows": run.stats.rows - run.resumed_rows, "seconds": time.perf_counter() - started}
