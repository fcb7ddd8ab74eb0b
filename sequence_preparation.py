"""Preparing sequence shards for SFT and DPO: rows -> (tokens, mask) sequences -> shards.

The chat (load_instruct_dataset.py) and preference (load_dpo_dataset.py) scripts differ only in how a row
becomes sequences, which a `SequenceJob` supplies (a row function that runs in the worker processes);
reading and mixing (data_sources.py), workers, splitting, writing and resuming (shard_writer.py) are shared
here, and so are the two scripts' command-line arguments and summary.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import time
from contextlib import closing
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
from tqdm import tqdm

from conversations import ChatRenderer, RowError
from data_preparation_utils import DataPrepError, load_prep_tokenizer
from data_sources import ChatSource, Mixer, Source, decode_errors_in, load_mix_file, open_rows
from shard_format import (
    MANIFEST_FILE, MASK_DTYPE, SEQUENCE_FORMAT, TOKEN_DTYPE, VERSION, build_sequence_manifest,
)
from shard_writer import (
    SequenceShardWriter, ShardedRun, check_prep_settings, ordered_map, start_or_resume, with_byte_counts,
    worker_pool,
)

DEFAULT_SHARD_SIZE = 10_000_000  # tokens per shard (40 MB of tokens, 10 MB of mask)
DEFAULT_VAL_FRACTION = 0.01
TASKS_VAL_FRACTION = 0.06  # the embedded default: a few hundred held-out conversations of 6,400

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
                   tokens=np.concatenate([t for t, _ in sequences]) if sequences else np.empty(0, TOKEN_DTYPE),
                   mask=np.concatenate([m for _, m in sequences]) if sequences else np.empty(0, MASK_DTYPE),
                   lengths=np.array([len(t) for t, _ in sequences], dtype=np.int64),
                   hashes=np.array([r.content_hash for r in results if not r.skip], dtype=np.uint64))


RowFunction = Callable[[Any, int, Any], RowResult]  # (row settings, source index, row) -> what the row became


@dataclass
class SequenceJob:
    """What a sequence-data script supplies to `prepare_sequence_shards`."""

    kind: str  # the manifest's kind: "chat" | "preference"
    group_size: int  # sequences per written row: 1 (a conversation) or 2 (chosen, then rejected)
    row: RowFunction  # runs in a worker, as row(row_settings, source index, row)
    row_settings: Any  # picklable; gets the worker's ChatRenderer as `.renderer`
    settings: dict  # whatever else decides the output: fingerprinted, and written to the manifest
    max_seq_len: int
    exact_answers: bool = False  # every held-out conversation's final answer is one exact string
    finish: Callable[[Path, Any, dict], None] | None = None  # (out_dir, tokenizer, splits): e.g. eval.jsonl


def skipped_row(error: RowError | ValueError | TypeError) -> RowResult:
    """What an unusable row becomes: a RowError says why; a ValueError or TypeError (e.g. text the
    tokenizer refuses) is counted as unreadable: one row lost, not the run."""
    if isinstance(error, RowError):
        return RowResult(skip=error.reason, note=error.note)
    return RowResult(skip="unreadable", note=str(error)[:200])


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
        job = self.job
        manifest = build_sequence_manifest(
            tokenizer, job.kind, job.max_seq_len, job.exact_answers, shard_size, job.settings, splits, sources,
            {**dataclasses.asdict(stats), "seconds": round(self.seconds, 3)},
            datetime.now(timezone.utc).isoformat(timespec="seconds"))
        self._complete(manifest, splits, "pending_sequences")
        return manifest


# ---- worker processes -----------------------------------------------------------------------------


_worker: tuple[RowFunction, Any] | None = None  # this process's row function and settings (see `init_row_worker`)


def init_row_worker(tokenizer, row_function: RowFunction, settings: Any) -> None:
    """A worker's initializer: `render_rows` calls `row_function(settings, source, row)`, with this
    process's ChatRenderer in `settings.renderer`."""
    global _worker
    settings.renderer = ChatRenderer(tokenizer)
    _worker = (row_function, settings)


def render_rows(items: list[tuple[int, Any]]) -> SequenceBatch:
    """(source index, row) pairs -> one worker task's sequences; runs in a worker process."""
    row_function, settings = _worker
    return SequenceBatch.of([row_function(settings, source, row) for source, row in items])


# ---- one run ---------------------------------------------------------------------------------------


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
    fingerprint = {"version": VERSION, "format": SEQUENCE_FORMAT, "kind": job.kind,
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
    with worker_pool(num_workers, init_row_worker, (tokenizer, job.row, job.row_settings), out_dir) as pool:
        mixer = run.open_mixer(open_rows)
        run.stats.decode_errors = decode_errors_in(sources)
        if run.resumed_shards:
            print(f"resuming: {run.resumed_shards} shard(s), {run.resumed_rows:,} rows already done")
        results = ordered_map(render_rows, batch_items(mixer, BATCH_ROWS), pool, 2 * num_workers + 2)
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


# ---- the command line of both scripts --------------------------------------------------------------


def check_format(fmt: str, known: tuple[str, ...]) -> str:
    if fmt not in known:
        raise DataPrepError(f"format {fmt!r} is invalid: expected one of {', '.join(known)}")
    return fmt


def print_summary(report: dict, out_dir: Path, noun: str) -> None:
    """What was written and what was skipped or changed, and why."""
    if report["already_done"]:
        return
    manifest = report["manifest"]
    stats, splits = manifest["stats"], manifest["splits"]
    resumed = f" (resumed after {report['resumed_shards']} shard(s))" if report["resumed_shards"] else ""
    skipped = sum(stats["skipped"].values())
    print(f"done in {report['seconds']:.1f} s{resumed}: {stats['rows']:,} rows read, {stats['kept']:,} {noun} kept "
          f"(train {stats['train']:,}, val {stats['val']:,}), {skipped:,} skipped")
    if skipped:
        print("  skipped: " + ", ".join(f"{n:,} {why}" for why, n in sorted(stats["skipped"].items())))
        for example in stats["skipped_examples"]:
            print(f"    {example}")
    if stats["changed"]:
        print("  changed: " + ", ".join(f"{n:,} {what}" for what, n in sorted(stats["changed"].items())))
    if stats["decode_errors"]:
        print(f"  {stats['decode_errors']:,} invalid UTF-8 sequences read as U+FFFD")
    print("  " + ", ".join(f"{name} {s['num_sequences']:,} sequences, {s['num_tokens']:,} tokens "
                           f"({s['num_trained_tokens']:,} trained) in {len(s['shards'])} shard(s)"
                           for name, s in splits.items()) + f" -> {out_dir / MANIFEST_FILE}")


def add_common_arguments(parser: argparse.ArgumentParser, formats: tuple[str, ...], data_dir_key: str) -> None:
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--files", nargs="+", metavar="PATH",
                        help=".jsonl/.json/.parquet files, directories or globs (default: the embedded tasks)")
    source.add_argument("--dataset", help="a Hugging Face dataset, or a local dataset directory")
    source.add_argument("--mix", metavar="FILE.json", help="a JSON list of sources, each with files or dataset, and "
                        "optionally weight, max_tokens, format, config, split, streaming")
    parser.add_argument("--dataset_config", default=None, help="the dataset's configuration")
    parser.add_argument("--split", default="train", help="the dataset's split to read")
    parser.add_argument("--streaming", action=argparse.BooleanOptionalAction, default=True,
                        help="stream the dataset instead of downloading it first")
    parser.add_argument("--format", choices=formats, default="auto", help="the row shape (auto: recognised per row)")
    parser.add_argument("--max_seq_len", type=int, default=None, help="tokens per sequence (default: MAX_SEQ_LEN)")
    parser.add_argument("--max_tokens", type=int, default=0, help="stop after about this many tokens (0: no limit)")
    parser.add_argument("--out_dir", default=None, help=f"where shards go (default: {data_dir_key} of the config)")
    parser.add_argument("--shard_size", type=int, default=DEFAULT_SHARD_SIZE, help="tokens per shard, at most")
    parser.add_argument("--val_fraction", type=float, default=None,
                        help=f"fraction held out for validation (default: {DEFAULT_VAL_FRACTION}; "
                             f"{TASKS_VAL_FRACTION} for the embedded default)")
    parser.add_argument("--num_workers", type=int, default=None,
                        help="tokenizer processes (default: none for the embedded default, else up to 8)")
    parser.add_argument("--overwrite", action="store_true", help="discard earlier output in --out_dir and start afresh")
    parser.add_argument("--env_file", default=None, help="settings file (default: .env when present)")


def sources_from_args(args: argparse.Namespace, default_file: Path | None) -> list[ChatSource]:
    """The sources the arguments name; `default_file` (the embedded default) when they name none."""
    if args.mix:
        sources = load_mix_file(args.mix, ChatSource)
        for s in sources:
            s.format = s.format if s.format != "auto" else args.format
        return sources
    if args.dataset:
        return [ChatSource(dataset=args.dataset, config=args.dataset_config, split=args.split,
                           streaming=args.streaming, format=args.format)]
    if args.dataset_config:
        raise DataPrepError("--dataset_config needs --dataset")
    return [ChatSource(files=args.files or [str(default_file)], format=args.format)]


def resolved_defaults(args: argparse.Namespace) -> tuple[bool, float, int]:
    """(embedded default?, val_fraction, num_workers): the embedded default is small enough that worker
    processes would cost more to start than they save, and needs a larger share held out."""
    embedded = not (args.files or args.dataset or args.mix)
    val_fraction = args.val_fraction if args.val_fraction is not None else (
        TASKS_VAL_FRACTION if embedded else DEFAULT_VAL_FRACTION)
    num_workers = args.num_workers if args.num_workers is not None else (0 if embedded else min(os.cpu_count() or 1, 8))
    return embedded, val_fraction, num_workers
