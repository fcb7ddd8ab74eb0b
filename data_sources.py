"""Where rows come from, and in which order: sources (local files or a `datasets` dataset), mix files naming
several, the Mixer that interleaves them into one stream, and the hash that splits it into train and val.

    Source / ChatSource  --open_source (one text column) / open_rows (whole rows)-->  an iterator per source
      --Mixer-->  (pick, source index, value), the same sequence on every run and every resumption

Bad input raises DataPrepError with one line naming the source and the fault.
"""

from __future__ import annotations

import codecs
import dataclasses
import glob
import hashlib
import itertools
import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from data_preparation_utils import DataPrepError, one_line

BUILDER_BY_SUFFIX = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
SAMPLE_BY = ("document", "paragraph", "line")  # what one document of a .txt file is
MIX_SEED = 0  # fixed, so changing the training SEED never invalidates prepared data
JSON_CHUNK_BYTES = 1 << 20  # what `datasets` parses per step of a .jsonl file


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


@dataclass
class ChatSource(Source):
    """A source of conversations or preference pairs: rows of a known shape, not one text column."""

    format: str = "auto"  # the row shape; load_instruct_dataset.py and load_dpo_dataset.py name the ones they know

    @classmethod
    def mix_types(cls) -> dict:
        types = {**Source.mix_types(), "format": str}
        del types["text_column"], types["sample_by"]  # conversations are whole rows, never plain text
        return types

    def resolve(self) -> "ChatSource":
        super().resolve()
        for path in self.paths:
            if BUILDER_BY_SUFFIX[path.suffix] == "text":
                raise DataPrepError(f"{path}: conversations need .jsonl, .json or .parquet rows, not plain text")
        return self

    def describe(self) -> dict:
        described = super().describe()
        del described["text_column"], described["sample_by"]
        return {**described, "format": self.format}


# ---- opening sources ------------------------------------------------------------------------------


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



# ---- train or val ----------------------------------------------------------------------------


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

