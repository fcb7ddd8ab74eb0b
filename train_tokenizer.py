"""Train your own Llama 3 style tokenizer: a byte-level BPE on the text you will pretrain on.

    python train_tokenizer.py --out_dir tokenizers/cpython-8k            # the default corpus, 8,192 tokens
    python train_tokenizer.py --files books/ notes/*.jsonl --vocab_size 32000 --out_dir tokenizers/books
    python train_tokenizer.py --dataset HuggingFaceFW/fineweb-edu --dataset_config sample-10BT \\
        --max_bytes 2_000_000_000 --vocab_size 50000 --out_dir tokenizers/fineweb
    python train_tokenizer.py --mix mix.json --out_dir tokenizers/mix

The sources are read exactly as load_pretrain_dataset.py reads them (the default is the same CPython
documentation file). Hugging Face's `tokenizers` learns the merges; the text is split first by Llama 3's
pre-tokenizer pattern, so no token crosses what Meta's would not. The 256 byte tokens come first (rank =
byte value), the learned tokens follow in the order they were learned, and Llama 3's 256 special tokens
(`<|begin_of_text|>` ... `<|eot_id|>`, the reserved ones) follow those, in Meta's order: the chat format,
the SFT loss mask and the stop tokens work as with Meta's tokenizer. --vocab_size counts all three.

--out_dir receives `tokenizer.model` (the ranks, in Meta's tiktoken format: what the project reads),
`tokenizer.json`, `tokenizer_config.json` (Llama 3's chat template) and `special_tokens_map.json` (what
transformers' AutoTokenizer reads; the same ids). Use it with TOKENIZER_PATH=DIR for the data scripts,
train.py and generate.py; VOCAB_SIZE=0 takes its size.
"""

from __future__ import annotations

import argparse
import base64
import itertools
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from config import ConfigError, exit_on_config_error, load_config
from data_preparation_utils import DataPrepError, one_line, write_json_atomic
from data_sources import EMPTY, MALFORMED, Mixer, Source, classify, keep_datasets_from_importing_torch, open_source
from load_pretrain_dataset import add_source_arguments, sources_from_args
from tokenizer import NUM_RESERVED_SPECIAL_TOKENS, PAT_STR, Tokenizer

BYTE_TOKENS = 256
MIN_VOCAB_SIZE = BYTE_TOKENS + NUM_RESERVED_SPECIAL_TOKENS  # no merges at all
DEFAULT_VOCAB_SIZE = 8192
TOKENIZER_FILE = "tokenizer.model"
# transformers' VERY_LARGE_INTEGER: a tokenizer on its own sets no length limit (an exported model writes its context)
NO_MAX_LENGTH = int(1e30)


@dataclass
class CorpusStats:
    rows: int = 0
    documents: int = 0
    bytes: int = 0
    empty: int = 0  # empty or whitespace-only text
    malformed: int = 0  # not a string


def corpus_texts(sources: list[Source], max_bytes: int, stats: CorpusStats) -> Iterator[str]:
    """The documents of the mixed sources, in load_pretrain_dataset.py's order, until `max_bytes` of
    UTF-8 text (0: all of it); the last one is cut to fit, at a character boundary."""
    mixer = Mixer([open_source(s) for s in sources], [s.weight for s in sources])
    for _, _, value in mixer:
        stats.rows += 1
        status = classify(value)
        if status in (EMPTY, MALFORMED):
            stats.empty += status == EMPTY
            stats.malformed += status == MALFORMED
            continue
        size = len(value.encode("utf-8"))
        if max_bytes and stats.bytes + size > max_bytes:
            value = value.encode("utf-8")[: max_bytes - stats.bytes].decode("utf-8", errors="ignore")
            size = len(value.encode("utf-8"))
        stats.documents += 1
        stats.bytes += size
        yield value
        if max_bytes and stats.bytes >= max_bytes:
            return


def train_bpe(texts: Iterable[str], vocab_size: int, show_progress: bool):
    """A `tokenizers` BPE trained on `texts` after Llama 3's split, with `vocab_size - 256` tokens
    (the special tokens are added later, after every learned one)."""
    from tokenizers import Regex, Tokenizer as HFTokenizer, models, pre_tokenizers, trainers

    bpe = HFTokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PAT_STR), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - NUM_RESERVED_SPECIAL_TOKENS, show_progress=show_progress,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(texts, trainer=trainer)
    return bpe


def learned_ranks(bpe) -> dict[bytes, int]:
    """The trained vocabulary as tiktoken ranks: each byte its own value, then the merged tokens in the
    order the trainer made them (its ids), which is the order tiktoken must merge them in."""
    from hf_convert import bytes_to_unicode

    byte_of_char = {c: b for b, c in bytes_to_unicode().items()}
    learned = sorted(bpe.get_vocab().items(), key=lambda kv: kv[1])
    ranks = {bytes([b]): b for b in range(BYTE_TOKENS)}
    for piece, _ in learned:
        token = bytes(byte_of_char[c] for c in piece)
        if len(token) > 1:
            ranks[token] = len(ranks)
    assert len(ranks) == len(learned), "the trainer's alphabet is not the 256 bytes"
    return ranks


def write_ranks(path: Path, ranks: dict[bytes, int]) -> None:
    """Meta's `tokenizer.model` format: `base64(token) rank` per line, by rank."""
    lines = b"".join(base64.b64encode(t) + b" %d\n" % r for t, r in sorted(ranks.items(), key=lambda kv: kv[1]))
    path.write_bytes(lines)


def write_tokenizer_directory(ranks: dict[bytes, int], out_dir: Path, overwrite: bool) -> None:
    """The ranks as tokenizer.model plus transformers' files, all in a temporary directory that replaces
    `out_dir` only when complete."""
    from hf_convert import tokenizer_config, write_tokenizer_files

    check_out_dir(out_dir, overwrite)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        write_ranks(tmp / TOKENIZER_FILE, ranks)
        write_tokenizer_files(Tokenizer(tmp / TOKENIZER_FILE), tmp, NO_MAX_LENGTH)
        config = tokenizer_config(NO_MAX_LENGTH)
        write_json_atomic(tmp / "special_tokens_map.json", {k: config[k] for k in ("bos_token", "eos_token")})
        if out_dir.exists():
            out_dir.rename(old)
        tmp.rename(out_dir)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_out_dir(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise DataPrepError(f"--out_dir {out_dir} is a file; expected a directory to write the tokenizer to")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise DataPrepError(f"--out_dir {out_dir} is not empty; choose a new directory or pass --overwrite")


def check_settings(vocab_size: int, max_bytes: int) -> None:
    if vocab_size < MIN_VOCAB_SIZE:
        raise DataPrepError(f"--vocab_size {vocab_size} is too small: it counts the {BYTE_TOKENS} byte tokens and "
                            f"the {NUM_RESERVED_SPECIAL_TOKENS} special tokens, so at least {MIN_VOCAB_SIZE}")
    if max_bytes < 0:
        raise DataPrepError(f"--max_bytes must be >= 0 (0: no limit), got {max_bytes}")


def train_tokenizer(sources: list[Source], out_dir: str | Path, *, vocab_size: int = DEFAULT_VOCAB_SIZE,
                    max_bytes: int = 0, overwrite: bool = False, show_progress: bool = True) -> dict:
    """Train on `sources` and write the tokenizer directory `out_dir`; returns {"tokenizer" (loaded from
    it), "corpus" (CorpusStats), "seconds"}. Raises DataPrepError on bad input, before any writing."""
    out_dir = Path(out_dir)
    check_settings(vocab_size, max_bytes)
    check_out_dir(out_dir, overwrite)
    sources = [s.resolve() for s in sources]
    started = time.perf_counter()
    stats = CorpusStats()
    texts = corpus_texts(sources, max_bytes, stats)
    first = next(texts, None)  # an empty corpus stops here, before the trainer starts
    if first is None:
        raise DataPrepError(f"no text to train on in {', '.join(s.label for s in sources)}: {stats.rows} rows read, "
                            f"{stats.empty} empty, {stats.malformed} not text")
    # the trainer's own progress bars: documents read, then words, pairs and merges
    bpe = train_bpe(itertools.chain([first], texts), vocab_size, show_progress)
    write_tokenizer_directory(learned_ranks(bpe), out_dir, overwrite)
    return {"tokenizer": Tokenizer(out_dir / TOKENIZER_FILE), "corpus": stats, "seconds": time.perf_counter() - started}


# ---- command line ----------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_source_arguments(parser, "a JSON list of sources, as load_pretrain_dataset.py reads it (weights apply; "
                         "max_tokens do not: there are no tokens yet)")
    parser.add_argument("--vocab_size", type=int, default=DEFAULT_VOCAB_SIZE,
                        help=f"all tokens: 256 bytes + learned + 256 special (at least {MIN_VOCAB_SIZE})")
    parser.add_argument("--max_bytes", type=int, default=0,
                        help="train on at most this many bytes of UTF-8 text (0: all of it)")
    parser.add_argument("--out_dir", required=True, help="the directory to write (new or empty)")
    parser.add_argument("--overwrite", action="store_true", help="replace what --out_dir holds")
    parser.add_argument("--env_file", default=None,
                        help="settings file (default: .env when present); PRETRAIN_DATA_DIR holds the default corpus")
    return parser.parse_args(argv)


def print_summary(report: dict, out_dir: str, asked: int) -> None:
    tok, corpus = report["tokenizer"], report["corpus"]
    print(f"trained in {report['seconds']:.1f} s on {corpus.bytes:,} bytes ({corpus.documents:,} documents; "
          f"skipped {corpus.empty:,} empty, {corpus.malformed:,} not text)")
    if tok.n_words < asked:
        print(f"  note: the corpus gave only {tok.n_words - MIN_VOCAB_SIZE:,} merges: {tok.n_words:,} tokens, "
              f"not the {asked:,} asked for")
    sample = "def tokenize(text): return text.split()  # 1234567"
    print(f"  {tok.n_words:,} tokens (256 bytes, {tok.n_words - MIN_VOCAB_SIZE:,} learned, 256 special) -> {out_dir}; "
          f"{len(tok.encode(sample, bos=False, eos=False))} tokens for {sample!r}")
    print(f"  use it with TOKENIZER_PATH={out_dir} (load_*_dataset.py, train.py, generate.py; VOCAB_SIZE=0 takes "
          f"its size)")


def main(argv: list[str] | None = None) -> None:
    keep_datasets_from_importing_torch()
    args = parse_args(argv)
    try:
        config = load_config(args.env_file)
    except ConfigError as e:
        exit_on_config_error(e)
    try:
        check_settings(args.vocab_size, args.max_bytes)  # before the default corpus is written
        check_out_dir(Path(args.out_dir), args.overwrite)
        sources = sources_from_args(args, Path(config.pretrain_data_dir))
        if any(s.max_tokens for s in sources):
            print("note: the mix's max_tokens are not applied (they count tokens of a tokenizer not yet trained); "
                  "--max_bytes limits the corpus", file=sys.stderr)
        report = train_tokenizer(sources, args.out_dir, vocab_size=args.vocab_size, max_bytes=args.max_bytes,
                                 overwrite=args.overwrite)
    except DataPrepError as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        raise SystemExit(2)
    except KeyboardInterrupt:
        print(f"\ninterrupted; {args.out_dir} was not written", file=sys.stderr)
        raise SystemExit(130)
    print_summary(report, args.out_dir, args.vocab_size)


if __name__ == "__main__":
    main()
