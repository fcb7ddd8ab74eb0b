"""Tokenize a text corpus into uint32 token shards plus a manifest.json for pretraining.

    python load_pretrain_dataset.py                      # offline default: CPython's own documentation
    python load_pretrain_dataset.py --files books/ notes/*.jsonl
    python load_pretrain_dataset.py --dataset HuggingFaceFW/fineweb-edu --dataset_config sample-10BT \\
        --max_tokens 1_000_000_000
    python load_pretrain_dataset.py --mix mix.json       # [{"files": "books/", "weight": 2}, {"dataset": ...}]

Each document becomes `[bos] + tokens + [eos]`; the stream of documents is cut into shards of
--shard_size tokens (`train_000000.npy`, ...). About --val_fraction of the documents, chosen by a
hash of their text, go to `val_000000.npy`, ... (and every copy of the first document, so that there
always is a validation split; identical documents always share a split). Written to --out_dir (default PRETRAIN_DATA_DIR).
An interrupted run resumes from its last finished shard when started again with the same arguments.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib.util
import json
import os
import re
import sys
import sysconfig
import time
import zipfile
from concurrent.futures import ProcessPoolExecutor
from contextlib import closing
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
from tqdm import tqdm

from config import ConfigError, exit_on_config_error, load_config
from data_preparation_utils import DataPrepError, exit_on_prep_error, load_prep_tokenizer, write_jsonl_atomic
from data_sources import (
    EMPTY, MALFORMED, OK, SAMPLE_BY, Mixer, Source, classify, decode_errors_in, document_hash,
    keep_datasets_from_importing_torch, load_mix_file, open_source,
)
from shard_format import MANIFEST_FILE, TOKEN_DTYPE, VERSION, build_token_manifest
from shard_writer import (
    ShardedRun, ShardWriter, check_prep_settings, ordered_map, start_or_resume, with_byte_counts, worker_pool,
)
from tokenizer import Tokenizer, needs_cutting

DEFAULT_SHARD_SIZE = 10_000_000  # 40 MB per shard
HUGE_DOCUMENT_CHARS = 1_000_000  # counted in the stats: such documents are fine, just worth knowing about
BATCH_CHARS = 1_000_000  # text per worker task: large enough to amortize pickling, small enough to balance
BATCH_DOCUMENTS = 1024

# ---- the default corpus: English that ships with every CPython -----------------------------------

STDLIB_DIR = Path(sysconfig.get_paths()["stdlib"])
# tests are code more than prose; pydoc_data holds the topics, which are read from the module directly
SKIPPED_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "pydoc_data"}
MIN_PASSAGE_CHARS = 60  # docstrings and comments like "Return self." teach little


def cpython_documents(stdlib_dir: Path = STDLIB_DIR) -> Iterator[dict]:
    """`{"text", "source"}` rows, in a fixed order: the language reference topics of `pydoc_data`, then one
    document per module of the standard library (and of pip and setuptools, bundled for `ensurepip`)
    made of its docstrings and comments. About 5 million characters, 1.2 million tokens on CPython 3.11."""
    from pydoc_data.topics import topics

    for key in sorted(topics):
        yield {"text": topics[key], "source": f"pydoc_data.topics:{key}"}
    for path in _python_files(stdlib_dir):
        module = ".".join(path.relative_to(stdlib_dir).with_suffix("").parts)
        if text := module_document(module, path.read_bytes()):
            yield {"text": text, "source": f"stdlib:{module}"}
    for wheel in sorted((stdlib_dir / "ensurepip" / "_bundled").glob("*.whl")):
        with zipfile.ZipFile(wheel) as archive:
            names = sorted(n for n in archive.namelist() if n.endswith(".py") and not SKIPPED_DIRS & set(n.split("/")))
            for name in names:
                module = name[: -len(".py")].replace("/", ".")
                if text := module_document(module, archive.read(name)):
                    yield {"text": text, "source": f"{wheel.name}:{module}"}


def _python_files(root: Path) -> Iterator[Path]:
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if d not in SKIPPED_DIRS)  # sorted: os.walk's order is the disk's
        yield from (Path(directory) / f for f in sorted(files) if f.endswith(".py"))


def module_document(module: str, source: bytes) -> str:
    """A module's docstrings and comment blocks in source order, under its name ("" when it has none)."""
    try:
        tree = ast.parse(source)
        text = importlib.util.decode_source(source)
    except (SyntaxError, ValueError, UnicodeDecodeError):
        return ""  # Python 2 era or deliberately broken files
    passages = sorted(_docstrings(tree, module) + _comment_blocks(text))
    return "\n\n".join([module] + [p for _, p in passages]) if passages else ""


def _docstrings(tree: ast.Module, module: str) -> list[tuple[int, str]]:
    found: list[tuple[int, str]] = []

    def visit(node: ast.AST, qualname: str) -> None:
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc and len(doc) >= MIN_PASSAGE_CHARS:
                found.append((getattr(node, "lineno", 0), doc if node is tree else f"{qualname}:\n{doc}"))
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                visit(child, f"{qualname}.{child.name}")
            elif isinstance(child, ast.stmt):  # definitions inside if/try/with blocks
                visit(child, qualname)

    visit(tree, module)
    return found


# Comments and string literals, leftmost first, as Python's tokenizer sees them: a `#` inside a string
# belongs to the string and a quote inside a comment to the comment. (Python 3.12 f-strings may nest
# quotes; the rare miss only costs a passage.) Far faster than walking every node of the AST.
_COMMENT_OR_STRING = re.compile(
    r"#[^\n]*"  # a comment, to the end of its line
    r'|"""(?:\\.|[^\\])*?"""'  # triple-quoted strings, which may span lines
    r"|'''(?:\\.|[^\\])*?'''"
    r'|"(?:\\.|[^"\\\n])*"'  # single-quoted strings
    r"|'(?:\\.|[^'\\\n])*'",
    re.DOTALL,
)


def _comment_blocks(text: str) -> list[tuple[int, str]]:
    """Runs of full-line `#` comments on consecutive lines, joined, with their first line number."""
    blocks: list[tuple[int, list[str]]] = []
    line, pos, last_line = 1, 0, -1
    for match in _COMMENT_OR_STRING.finditer(text):
        line += text.count("\n", pos, match.start())
        pos = match.start()
        comment = match.group()
        line_start = text.rfind("\n", 0, pos) + 1
        if not comment.startswith("#") or text[line_start:pos].strip():
            continue  # a string, or a comment after code
        if comment.startswith("#!") or (line <= 2 and "coding" in comment):
            continue
        if line != last_line + 1 or not blocks:
            blocks.append((line, []))
        blocks[-1][1].append(comment.lstrip("#").strip())
        last_line = line
    joined = [(start, "\n".join(lines).strip()) for start, lines in blocks]
    return [(start, passage) for start, passage in joined if len(passage) >= MIN_PASSAGE_CHARS]


def default_corpus_file(raw_dir: Path) -> Path:
    """The default corpus as JSON lines, written once (atomically) so that it goes through `datasets` like any file."""
    path = raw_dir / f"cpython-{sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro}-docs.jsonl"
    if not path.is_file():
        print(f"writing the default corpus (CPython's documentation) to {path}")
        raw_dir.mkdir(parents=True, exist_ok=True)
        write_jsonl_atomic(path, cpython_documents())
    return path


# ---- documents -> tokens, in worker processes ---------------------------------------------------------


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


_encoder = None  # the tokenizer `encode_documents` uses in this process (see `init_encoder`)


def init_encoder(tokenizer) -> None:
    global _encoder
    _encoder = tokenizer


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
    bos, eos = np.array([tokenizer.bos_id], TOKEN_DTYPE), np.array([tokenizer.eos_id], TOKEN_DTYPE)
    ids = [encode_text(tokenizer, text) for text in texts]
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids)) + 2
    tokens = np.concatenate([part for doc in ids for part in (bos, doc, eos)]) if ids else np.empty(0, TOKEN_DTYPE)
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
    return np.array(tokenizer.encode(text, bos=False, eos=False), dtype=TOKEN_DTYPE)


# ---- one run: documents in, shards out --------------------------------------------------------------


@dataclass
class SourceProgress:
    rows: int = 0  # rows read from the source, skipped ones included: where a resumed run restarts
    documents: int = 0
    tokens: int = 0
    exhausted: bool = False  # its max_tokens is reached


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


class Preparation(ShardedRun):
    """Writes documents to the train/val shard writers, keeps the counts, and checkpoints after every shard."""

    progress_type, stats_type = SourceProgress, PrepStats

    def __init__(self, out_dir: Path, sources: list[Source], fingerprint: dict, shard_size: int,
                 val_fraction: float, max_tokens: int, saved: dict | None):
        super().__init__(out_dir, sources, fingerprint, val_fraction, max_tokens, saved,
                         lambda split, state: ShardWriter(out_dir, split, shard_size, **state))
        self.resumed_tokens = self.stats.tokens

    def consume(self, rows: list[Row], encoded: EncodedBatch, mixer: Mixer) -> None:
        """Take one worker task's rows, in order; `encoded` holds the tokens of the well-formed ones."""
        ends = np.cumsum(encoded.lengths)
        starts = ends - encoded.lengths
        ok = 0  # index of the next well-formed document in `encoded`
        for row in rows:
            if self.done:
                return
            tokens = doc_hash = None
            if row.status not in (EMPTY, MALFORMED):
                tokens, doc_hash = encoded.tokens[starts[ok] : ends[ok]], int(encoded.hashes[ok])
                ok += 1
            self._take(row, tokens, doc_hash, mixer)

    def _take(self, row: Row, tokens: np.ndarray | None, doc_hash: int | None, mixer: Mixer) -> None:
        if not self._read(row.source, row.pick):
            return
        if row.status == EMPTY:
            self.stats.empty_documents += 1
            return
        if row.status == MALFORMED:
            self.stats.malformed_rows += 1
            return
        split = self.splitter.split_of(doc_hash)
        finished_shards = self.writers[split].add(tokens)
        self._count(row, split, len(tokens))
        self._written(row.source, finished_shards, mixer)

    def _count(self, row: Row, split: str, num_tokens: int) -> None:
        progress = self.progress[row.source]
        progress.documents += 1
        progress.tokens += num_tokens
        self.stats.documents += 1
        self.stats.tokens += num_tokens
        self.stats.huge_documents += row.chars > HUGE_DOCUMENT_CHARS
        if split == "val":
            self.stats.val_documents += 1
        else:
            self.stats.train_documents += 1

    def finish(self, tokenizer, shard_size: int) -> dict:
        """Write the last shards, the manifest, and mark the run complete; returns the manifest."""
        if self.stats.documents == 0:
            raise DataPrepError(f"no usable documents: {sum(p.rows for p in self.progress)} rows read, "
                                f"{self.stats.empty_documents} empty, {self.stats.malformed_rows} malformed")
        splits = with_byte_counts(self.out_dir, {split: writer.finish() for split, writer in self.writers.items()},
                                  tokenizer)
        if splits["train"]["num_tokens"] == 0:
            raise DataPrepError(f"no training documents: all {self.stats.documents} went to validation; "
                                "add data or lower --val_fraction")
        sources = [{**s.describe(), "documents": p.documents, "tokens": p.tokens}
                   for s, p in zip(self.sources, self.progress)]
        stats = {**dataclasses.asdict(self.stats), "seconds": round(self.seconds, 3),
                 "tokens_per_second": round(self.stats.tokens / max(self.seconds, 1e-9))}
        manifest = build_token_manifest(tokenizer, shard_size, splits, sources, stats,
                                  datetime.now(timezone.utc).isoformat(timespec="seconds"))
        self._complete(manifest, splits, "pending_tokens")
        return manifest


def prepare_pretrain_dataset(sources: list[Source], out_dir: str | Path, *, tokenizer_path: str | None = None,
                             shard_size: int = DEFAULT_SHARD_SIZE, val_fraction: float = 0.01, max_tokens: int = 0,
                             num_workers: int = 0, overwrite: bool = False, show_progress: bool = True) -> dict:
    """Tokenize `sources` into shards under `out_dir`, resuming an interrupted run with the same settings.

    Returns {"manifest", "already_done" (nothing to do), "resumed_shards" (finished before this call),
    "session_tokens" (encoded by this call), "seconds" (this call), "start_up" (seconds and tokens
    until every worker had returned its first batch: what every run pays before it runs at full speed)}.
    """
    check_prep_settings(shard_size, val_fraction, max_tokens, num_workers)
    sources = [s.resolve() for s in sources]
    tokenizer = load_prep_tokenizer(tokenizer_path)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fingerprint = {"version": VERSION, "tokenizer": tokenizer.identity(), "shard_size": shard_size,
                   "val_fraction": val_fraction, "max_tokens": max_tokens,
                   "sources": [s.fingerprint() for s in sources]}
    saved = start_or_resume(out_dir, fingerprint, overwrite)
    started = time.perf_counter()
    if saved and saved["complete"]:
        print(f"{out_dir} is already prepared with these settings; nothing to do (--overwrite to redo)")
        manifest = json.loads((out_dir / MANIFEST_FILE).read_text())
        return {"manifest": manifest, "already_done": True, "resumed_shards": 0, "session_tokens": 0, "seconds": 0.0,
                "start_up": {"seconds": 0.0, "tokens": 0}}

    run = Preparation(out_dir, sources, fingerprint, shard_size, val_fraction, max_tokens, saved)
    with worker_pool(num_workers, init_encoder, (tokenizer,), out_dir) as pool:  # first: workers start while we read
        mixer = run.open_mixer(open_source)
        run.stats.decode_errors = decode_errors_in(sources)
        if run.resumed_shards:
            print(f"resuming: {run.resumed_shards} shard(s), {run.resumed_tokens:,} tokens already done")
        start_up = encode_all(run, mixer, pool, num_workers, max_tokens, show_progress, started)
    manifest = run.finish(tokenizer, shard_size)
    return {"manifest": manifest, "already_done": False, "resumed_shards": run.resumed_shards,
            "session_tokens": run.stats.tokens - run.resumed_tokens, "seconds": time.perf_counter() - started,
            "start_up": start_up}


def encode_all(run: Preparation, mixer: Mixer, pool: ProcessPoolExecutor | None, num_workers: int,
               max_tokens: int, show_progress: bool, started: float) -> dict:
    """Feed the mixed rows through the workers and the results, in order, to the shard writers.

    Returns the start-up: seconds since `started` and tokens written once every worker has returned a
    batch (the workers start at once, so until then each was busy starting or on its first batch).
    A throughput that leaves it out is what a long run gets."""
    def elapsed() -> dict:
        return {"seconds": time.perf_counter() - started, "tokens": run.stats.tokens - run.resumed_tokens}

    start_up = None
    results = ordered_map(encode_documents, batch_rows(mixer), pool, 2 * num_workers + 2)
    with closing(results), tqdm(total=max_tokens or None, initial=run.stats.tokens, unit="tok", unit_scale=True,
                                desc="tokenizing", disable=not show_progress, mininterval=0.5) as bar:
        for batches, (rows, encoded) in enumerate(results, start=1):
            tokens_before = run.stats.tokens
            run.consume(rows, encoded, mixer)
            bar.update(run.stats.tokens - tokens_before)
            bar.set_postfix(docs=run.stats.documents, refresh=False)
            if batches == max(num_workers, 1):
                start_up = elapsed()
            if run.done:
                break
    return start_up or elapsed()  # fewer batches than workers: the whole run was start-up


def print_summary(report: dict, out_dir: Path, num_workers: int) -> None:
    if report["already_done"]:
        return
    manifest, seconds = report["manifest"], report["seconds"]
    stats, splits = manifest["stats"], manifest["splits"]
    rate = report["session_tokens"] / max(seconds, 1e-9)
    resumed = f" (resumed after {report['resumed_shards']} shard(s))" if report["resumed_shards"] else ""
    print(f"done in {seconds:.1f} s{resumed}: {report['session_tokens']:,} tokens encoded at {rate:,.0f} tokens/s "
          f"with {num_workers} worker(s); {report['start_up']['seconds']:.1f} s of it start-up (until every worker "
          "had returned a batch)")
    print(f"  documents {stats['documents']:,} (train {stats['train_documents']:,}, val {stats['val_documents']:,}); "
          f"skipped {stats['empty_documents']:,} empty, {stats['malformed_rows']:,} malformed; "
          f"{stats['decode_errors']:,} decode errors replaced; {stats['huge_documents']:,} huge documents")
    print("  " + ", ".join(f"{name} {split['num_tokens']:,} tokens in {len(split['shards'])} shard(s)"
                           for name, split in splits.items()) + f" -> {out_dir / MANIFEST_FILE}")


# ---- command line ----------------------------------------------------------------------------------


def add_source_arguments(parser: argparse.ArgumentParser, mix_help: str) -> None:
    """The text sources, as this command and train_tokenizer.py take them."""
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--files", nargs="+", metavar="PATH",
                        help=".txt/.jsonl/.json/.parquet files, directories or globs (default: CPython's docs)")
    source.add_argument("--dataset", help="a Hugging Face dataset, e.g. HuggingFaceFW/fineweb-edu, "
                        "or a local dataset directory")
    source.add_argument("--mix", metavar="FILE.json", help=mix_help)
    parser.add_argument("--dataset_config", default=None, help="the dataset's configuration, e.g. sample-10BT")
    parser.add_argument("--split", default="train", help="the dataset's split to read")
    parser.add_argument("--streaming", action=argparse.BooleanOptionalAction, default=True,
                        help="stream the dataset instead of downloading it first")
    parser.add_argument("--text_column", default="text", help="the column holding the documents (json/parquet/hub)")
    parser.add_argument("--sample_by", choices=SAMPLE_BY, default="document",
                        help="one document per .txt file, per blank-line-separated paragraph, or per line")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_source_arguments(parser, "a JSON list of sources, each with files or dataset, and optionally weight, "
                         "max_tokens, text_column, config, split, streaming, sample_by")
    parser.add_argument("--max_tokens", type=int, default=0, help="stop after about this many tokens (0: no limit)")
    parser.add_argument("--out_dir", default=None, help="where shards go (default: PRETRAIN_DATA_DIR of the config)")
    parser.add_argument("--shard_size", type=int, default=DEFAULT_SHARD_SIZE, help="tokens per shard")
    parser.add_argument("--val_fraction", type=float, default=0.01,
                        help="fraction of documents held out for validation")
    parser.add_argument("--num_workers", type=int, default=min(os.cpu_count() or 1, 8),
                        help="tokenizer processes (0: tokenize in the main process)")
    parser.add_argument("--overwrite", action="store_true", help="discard earlier output in --out_dir and start afresh")
    parser.add_argument("--env_file", default=None, help="settings file (default: .env when present)")
    return parser.parse_args(argv)


def sources_from_args(args: argparse.Namespace, out_dir: Path) -> list[Source]:
    if args.mix:
        return load_mix_file(args.mix)
    if args.dataset:
        return [Source(dataset=args.dataset, config=args.dataset_config, split=args.split, streaming=args.streaming,
                       text_column=args.text_column)]
    if args.dataset_config:
        raise DataPrepError("--dataset_config needs --dataset")
    files = args.files or [str(default_corpus_file(out_dir / "raw"))]
    return [Source(files=files, text_column=args.text_column, sample_by=args.sample_by)]


def main(argv: list[str] | None = None) -> None:
    keep_datasets_from_importing_torch()  # about 1 s of the 2 s of start-up
    args = parse_args(argv)
    try:
        config = load_config(args.env_file)
    except ConfigError as e:
        exit_on_config_error(e)
    out_dir = Path(args.out_dir or config.pretrain_data_dir)
    with exit_on_prep_error():
        report = prepare_pretrain_dataset(
            sources_from_args(args, out_dir), out_dir, tokenizer_path=config.tokenizer_path or None,
            shard_size=args.shard_size, val_fraction=args.val_fraction, max_tokens=args.max_tokens,
            num_workers=args.num_workers, overwrite=args.overwrite)
    print_summary(report, out_dir, args.num_workers)


if __name__ == "__main__":
    main()
