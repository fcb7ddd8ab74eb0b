"""Data preparation: token shards against a plain `tokenizer.encode` loop, on real files read by `datasets`."""

import hashlib
import json
import multiprocessing
import os
import random
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may touch the network (read when datasets is imported)

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import load_pretrain_dataset as lpd
import shard_writer
from data_preparation_utils import DataPrepError
from data_sources import Source, document_hash, load_mix_file
from prep_helpers import REPO, disk_full_at_save, run_script, write_jsonl
from tokenizer import load_tokenizer

WORDS = "the model reads every token of a document once and learns which one comes next é 中文 🙂".split()


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(None)


def make_docs(n: int, seed: int = 0, prefix: str = "doc") -> list[str]:
    rng = random.Random(seed)
    return [f"{prefix} {i}: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 60))) for i in range(n)]


def blake2b_64(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def expected_split(doc: str, first: str, val_fraction: float) -> str:
    """The documented rule: every copy of the first document, and those whose BLAKE2b-64 falls below the
    fraction, are val."""
    return "val" if doc == first or blake2b_64(doc) < val_fraction * 2**64 else "train"


def reference_shards(tok, docs: list[str], shard_size: int, val_fraction: float) -> dict[str, list[np.ndarray]]:
    """The expected output, computed the plain way: frame each document, assign it to a split, cut."""
    streams: dict[str, list[int]] = {"train": [], "val": []}
    for doc in docs:
        split = expected_split(doc, docs[0], val_fraction)
        streams[split] += [tok.bos_id] + tok.encode(doc, bos=False, eos=False) + [tok.eos_id]
    return {s: [np.array(t[i : i + shard_size], dtype=np.uint32) for i in range(0, len(t), shard_size)]
            for s, t in streams.items()}


def assert_matches_reference(out_dir: Path, manifest: dict, expected: dict[str, list[np.ndarray]]) -> None:
    for split, shards in expected.items():
        entry = manifest["splits"][split]
        assert [s["file"] for s in entry["shards"]] == [f"{split}_{i:06d}.npy" for i in range(len(shards))]
        assert entry["num_tokens"] == sum(len(s) for s in shards)
        for want, meta in zip(shards, entry["shards"]):
            got = np.load(out_dir / meta["file"])
            assert got.dtype == np.uint32
            np.testing.assert_array_equal(got, want)
            assert meta["num_tokens"] == len(got) and meta["max_token_id"] == int(got.max())


def prepare(sources, out_dir, **kw):
    kw = {"shard_size": 300, "val_fraction": 0.2, "num_workers": 0, "show_progress": False, **kw}
    return lpd.prepare_pretrain_dataset(sources, out_dir, **kw)


def output_files(out_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out_dir.glob("*.npy"))}


def stable(manifest: dict) -> dict:
    """The manifest without what changes from run to run (time, and the paths of the inputs)."""
    stats = {k: v for k, v in manifest["stats"].items() if k not in ("seconds", "tokens_per_second")}
    sources = [{k: v for k, v in s.items() if k != "files"} for s in manifest["sources"]]
    return {**manifest, "created": None, "stats": stats, "sources": sources}


# ---- shards equal the plain loop -------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["txt", "jsonl", "parquet", "dataset_dir"])
def test_shards_equal_plain_encode_loop(tmp_path, tok, kind):
    docs = make_docs(40)
    data = tmp_path / "data"
    data.mkdir()
    if kind == "txt":  # one document per file, in sorted file order
        for i, doc in enumerate(docs):
            (data / f"part{i:03d}.txt").write_text(doc)
        source = Source(files=[str(data)])
    elif kind == "jsonl":
        source = Source(files=[str(write_jsonl(data / "a.jsonl", [{"text": d, "id": i} for i, d in enumerate(docs)]))])
    else:
        pq.write_table(pa.table({"content": docs}), data / "part-0.parquet")
        source = (Source(files=[str(data / "*.parquet")], text_column="content") if kind == "parquet"
                  else Source(dataset=str(data), text_column="content"))  # the hub code path, on a local dataset
    report = prepare([source], tmp_path / "out")
    assert_matches_reference(tmp_path / "out", report["manifest"], reference_shards(tok, docs, 300, 0.2))
    stats = report["manifest"]["stats"]
    assert stats["documents"] == 40 and stats["val_documents"] >= 1
    assert stats["tokens"] == sum(report["manifest"]["splits"][s]["num_tokens"] for s in ("train", "val"))


def test_manifest_has_the_agreed_schema(tmp_path, tok):
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": d} for d in make_docs(10)])
    manifest = prepare([Source(files=[str(path)])], tmp_path / "out")["manifest"]
    assert json.loads((tmp_path / "out" / "manifest.json").read_text()) == manifest
    assert set(manifest) == {"format", "version", "dtype", "tokenizer", "bos_id", "eos_id", "shard_size",
                             "splits", "sources", "stats", "created"}
    assert (manifest["format"], manifest["version"], manifest["dtype"]) == ("llama3-token-shards", 1, "uint32")
    assert manifest["tokenizer"] == tok.identity()
    assert (manifest["bos_id"], manifest["eos_id"], manifest["shard_size"]) == (tok.bos_id, tok.eos_id, 300)
    for key in ("documents", "empty_documents", "malformed_rows", "decode_errors", "tokens"):
        assert isinstance(manifest["stats"][key], int)
    assert manifest["sources"][0]["documents"] == 10 and manifest["sources"][0]["weight"] == 1.0


def test_worker_count_and_batch_size_do_not_change_output(tmp_path, monkeypatch):
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": d} for d in make_docs(300)])
    runs = {}
    for workers in (1, 2):
        runs[workers] = prepare([Source(files=[str(path)])], tmp_path / f"w{workers}", num_workers=workers)
    monkeypatch.setattr(lpd, "BATCH_DOCUMENTS", 7)
    runs["small batches"] = prepare([Source(files=[str(path)])], tmp_path / "small")
    assert runs[1]["manifest"]["splits"]["val"]["num_tokens"] > 0
    assert output_files(tmp_path / "w1") == output_files(tmp_path / "w2") == output_files(tmp_path / "small")
    assert not list(tmp_path.glob("*/*.tmp"))  # the workers' start-up file is gone too
    assert stable(runs[1]["manifest"]) == stable(runs[2]["manifest"]) == stable(runs["small batches"]["manifest"])


@pytest.mark.parametrize("workers", [0, 2])
def test_report_gives_the_start_up_until_every_worker_returned_a_batch(tmp_path, tok, monkeypatch, workers):
    docs = make_docs(30)
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": d} for d in docs])
    monkeypatch.setattr(lpd, "BATCH_DOCUMENTS", 7)
    report = prepare([Source(files=[str(path)])], tmp_path / "out", num_workers=workers)
    start_up = report["start_up"]
    first_batches = docs[: 7 * max(workers, 1)]
    assert start_up["tokens"] == sum(len(tok.encode(d, bos=True, eos=True)) for d in first_batches)
    assert 0 < start_up["seconds"] < report["seconds"]


def test_workers_started_early_are_stopped_when_opening_the_sources_fails(tmp_path):
    """Workers start before the sources are opened (their start-up overlaps the reading); an error
    there must still leave no process behind."""
    path = write_jsonl(tmp_path / "a.jsonl", [{"body": d} for d in make_docs(20)])
    with pytest.raises(DataPrepError, match="column 'text' not found"):
        prepare([Source(files=[str(path)])], tmp_path / "out", num_workers=2)
    assert multiprocessing.active_children() == [] and not list((tmp_path / "out").glob("*.tmp"))


def test_worker_encoding_equals_tokenizer_encode_on_every_path(tok):
    """Workers take tiktoken's numpy path where Meta's tokenizer would not cut the text; every text must
    still get exactly `tok.encode`'s ids, including those that are cut."""
    texts = ["plain prose, é 中文 🙂", "<|end_of_text|> is text here, not a special token",
             "x" * 30_000 + " tail",  # a run Meta cuts at 25,000 characters
             "a" + " " * 26_000 + "b",  # the same for whitespace
             "many words " * 40_000]  # over tiktoken's 400,000-character limit
    lpd.init_encoder(tok)
    batch = lpd.encode_documents(texts)
    expected = [tok.encode(t, bos=True, eos=True) for t in texts]
    assert batch.tokens.dtype == np.uint32 and batch.lengths.tolist() == [len(e) for e in expected]
    np.testing.assert_array_equal(batch.tokens, np.concatenate([np.array(e, dtype=np.uint32) for e in expected]))
    assert batch.hashes.tolist() == [document_hash(t) for t in texts]
    assert len(lpd.encode_documents([]).tokens) == 0  # a task of only empty or malformed rows


def test_copies_of_the_first_document_never_straddle_train_and_val(tmp_path, tok):
    """The first document goes to val (so there is a validation split); its copies later on must too,
    even though their hash alone would send them to train."""
    docs = make_docs(30)
    first = next(d for d in docs if blake2b_64(d) >= 0.2 * 2**64)  # a document the hash sends to train
    docs.remove(first)
    docs = [first] + docs[:10] + [first] + docs[10:] + [first]
    report = prepare([Source(files=[str(write_jsonl(tmp_path / "a.jsonl", [{"text": d} for d in docs]))])],
                     tmp_path / "out")
    texts = {}
    for split in ("train", "val"):
        tokens = np.concatenate([np.load(tmp_path / "out" / s["file"]) for s in report["manifest"]["splits"][split]["shards"]])
        texts[split] = [t.removeprefix("<|begin_of_text|>") for t in tok.decode(tokens.tolist()).split("<|end_of_text|>")[:-1]]
    assert texts["val"].count(first) == 3 and first not in texts["train"]
    assert not set(texts["train"]) & set(texts["val"])


def test_a_resumed_run_keeps_copies_of_the_first_document_in_val(tmp_path, tok):
    docs = make_docs(120)
    first = next(d for d in docs if blake2b_64(d) >= 0.2 * 2**64)
    docs.remove(first)
    docs = [first] + docs + [first]
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": d} for d in docs])
    with disk_full_at_save(3), pytest.raises(OSError):  # the third shard
        prepare([Source(files=[str(path)])], tmp_path / "out")
    report = prepare([Source(files=[str(path)])], tmp_path / "out")
    assert report["resumed_shards"] >= 1
    assert_matches_reference(tmp_path / "out", report["manifest"], reference_shards(tok, docs, 300, 0.2))


# ---- messy input ------------------------------------------------------------------------------------


def test_messy_rows_are_counted_and_skipped(tmp_path, tok):
    data = tmp_path / "data"
    data.mkdir()
    rows = [{"text": "first good document"}, {"text": ""}, {"text": "   \n\t"}, {"text": None}, {"text": 42},
            {"other": "no text here"}, {"text": ["a", "list"]}, {"text": "second good document"}]
    write_jsonl(data / "a.jsonl", rows)
    huge = "a long document " * 125_000  # 2 million characters
    (data / "b.txt").write_bytes(b"caf\xe9 latin-1, then \xff\xfe bytes that are no UTF-8")
    (data / "c.txt").write_text(huge)
    report = prepare([Source(files=[str(data)])], tmp_path / "out", shard_size=100_000)
    stats = report["manifest"]["stats"]
    assert (stats["empty_documents"], stats["malformed_rows"], stats["decode_errors"]) == (2, 4, 3)
    assert (stats["documents"], stats["huge_documents"]) == (4, 1)
    docs = ["first good document", "second good document",
            "caf\ufffd latin-1, then \ufffd\ufffd bytes that are no UTF-8", huge]
    assert_matches_reference(tmp_path / "out", report["manifest"], reference_shards(tok, docs, 100_000, 0.2))


def test_invalid_utf8_in_json_lines_is_replaced_and_counted(tmp_path, tok):
    path = tmp_path / "a.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "bad \xc3 byte"}\n')
    report = prepare([Source(files=[str(path)])], tmp_path / "out")
    assert report["manifest"]["stats"]["decode_errors"] == 1
    expected = reference_shards(tok, ["ok", "bad \ufffd byte"], 300, 0.2)
    assert_matches_reference(tmp_path / "out", report["manifest"], expected)


# ---- interruption and resumption ----------------------------------------------------------------------


@pytest.mark.parametrize("mixed", [False, True], ids=["one source", "mix"])
def test_crash_leaves_no_partial_shard_and_rerun_resumes_identically(tmp_path, tok, monkeypatch, mixed):
    docs = make_docs(120)
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": d} for d in docs])
    pq.write_table(pa.table({"text": make_docs(80, seed=5, prefix="beta")}), tmp_path / "b.parquet")

    def sources():  # the mix also checks that a resumed run replays the mixer's random picks
        if not mixed:
            return [Source(files=[str(path)])]
        return [Source(files=[str(path)], weight=2, max_tokens=2500), Source(files=[str(tmp_path / "b.parquet")])]

    clean = prepare(sources(), tmp_path / "clean")
    out = tmp_path / "out"
    with disk_full_at_save(3, torn=b"\x93NUMPY half a shard"), pytest.raises(OSError, match="disk full"):
        prepare(sources(), out)  # the third shard is half written when the disk fills

    written = sorted(out.glob("*.npy"))
    assert len(written) == 2 and not list(out.glob("*.tmp"))  # the third never got its final name
    for p in written:  # what has a final name is a complete, correct shard
        np.testing.assert_array_equal(np.load(p), np.load(tmp_path / "clean" / p.name))

    encoded: list[str] = []
    encode = lpd.encode_documents
    def recording_encode(texts):
        encoded.extend(texts)
        return encode(texts)

    monkeypatch.setattr(lpd, "encode_documents", recording_encode)
    report = prepare(sources(), out)

    assert output_files(out) == output_files(tmp_path / "clean")
    assert stable(report["manifest"]) == stable(clean["manifest"])
    assert report["resumed_shards"] >= 1 and 0 < report["session_tokens"] < clean["manifest"]["stats"]["tokens"]
    assert not list(out.glob("*.pending"))
    if not mixed:  # documents wholly inside the first train shard were not encoded again
        train_docs = [d for d in docs if expected_split(d, docs[0], 0.2) == "train"]
        ends = np.cumsum([len(tok.encode(d, bos=True, eos=True)) for d in train_docs])
        in_first_shard = [d for d, end in zip(train_docs, ends) if end <= 300]
        assert encoded and in_first_shard and not set(in_first_shard) & set(encoded)


@pytest.mark.parametrize("buffer_tokens", [1 << 26, 3], ids=["one allocation", "growing buffer"])
def test_shard_writer_resumes_from_its_last_recorded_checkpoint(tmp_path, monkeypatch, buffer_tokens):
    """A checkpoint whose progress.json write was lost left extra tokens in the pending file: they must go."""
    monkeypatch.setattr(shard_writer, "WRITER_BUFFER_TOKENS", buffer_tokens)
    chunks = [np.arange(7 * i, 7 * i + 7, dtype=np.uint32) for i in range(12)]
    writer = shard_writer.ShardWriter(tmp_path, "train", shard_size=40)
    for c in chunks[:6]:
        writer.add(c)  # one shard of 40, 2 tokens pending
    recorded = writer.checkpoint()
    writer.add(chunks[6])
    writer.checkpoint()  # appended, but progress.json never heard of it (crash)
    writer = shard_writer.ShardWriter(tmp_path, "train", 40, **recorded)
    for c in chunks[6:8]:
        writer.add(c)
    recorded = writer.checkpoint()
    writer = shard_writer.ShardWriter(tmp_path, "train", 40, **recorded)
    for c in chunks[8:]:
        writer.add(c)
    entry = writer.finish()
    np.testing.assert_array_equal(np.concatenate([np.load(tmp_path / s["file"]) for s in entry["shards"]]),
                                  np.concatenate(chunks))
    assert [s["num_tokens"] for s in entry["shards"]] == [40, 40, 4]


def test_damaged_shard_is_not_trusted_on_resume(tmp_path, tok, monkeypatch):
    docs = make_docs(60)
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": d} for d in docs])
    monkeypatch.setattr(lpd.Preparation, "finish", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        prepare([Source(files=[str(path)])], tmp_path / "out")
    monkeypatch.undo()
    np.save(tmp_path / "out" / "train_000000.npy", np.zeros(5, dtype=np.uint32))  # wrong length
    report = prepare([Source(files=[str(path)])], tmp_path / "out")
    assert not report["already_done"] and report["resumed_shards"] == 0  # started afresh
    assert_matches_reference(tmp_path / "out", report["manifest"], reference_shards(tok, docs, 300, 0.2))


def test_rerun_with_other_settings_is_refused_unless_overwrite(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": d} for d in make_docs(20)])
    prepare([Source(files=[str(path)])], tmp_path / "out")
    again = prepare([Source(files=[str(path)])], tmp_path / "out")
    assert again["already_done"] and again["session_tokens"] == 0
    with pytest.raises(DataPrepError, match="shard_size"):
        prepare([Source(files=[str(path)])], tmp_path / "out", shard_size=500)
    report = prepare([Source(files=[str(path)])], tmp_path / "out", shard_size=500, overwrite=True)
    files = {s["file"] for split in report["manifest"]["splits"].values() for s in split["shards"]}
    assert report["manifest"]["shard_size"] == 500 and {p.name for p in (tmp_path / "out").glob("*.npy")} == files


# ---- budgets and mixes ----------------------------------------------------------------------------------


def test_max_tokens_stops_after_the_document_that_reaches_it(tmp_path, tok):
    docs = make_docs(100)
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": d} for d in docs])
    manifest = prepare([Source(files=[str(path)])], tmp_path / "out", max_tokens=1000)["manifest"]
    lengths = np.cumsum([len(tok.encode(d, bos=True, eos=True)) for d in docs])
    taken = int(np.searchsorted(lengths, 1000)) + 1  # documents up to the one that reaches the budget
    assert manifest["stats"]["documents"] == taken and manifest["stats"]["tokens"] == lengths[taken - 1]


def test_mix_interleaves_sources_and_respects_source_budgets(tmp_path, tok):
    a_docs, b_docs = make_docs(200, seed=1, prefix="alpha"), make_docs(200, seed=2, prefix="beta")
    write_jsonl(tmp_path / "a.jsonl", [{"body": d} for d in a_docs])
    pq.write_table(pa.table({"text": b_docs}), tmp_path / "b.parquet")
    mix = tmp_path / "mix.json"
    mix.write_text(json.dumps([{"files": "a.jsonl", "text_column": "body", "max_tokens": 2000, "weight": 3},
                               {"files": ["b.parquet"], "weight": 1}]))
    manifest = prepare(load_mix_file(str(mix)), tmp_path / "out", val_fraction=0.0, shard_size=10**6)["manifest"]
    tokens = np.load(tmp_path / "out" / "train_000000.npy")
    docs = tok.decode(tokens.tolist()).split("<|end_of_text|>")[:-1]
    texts = [d.removeprefix("<|begin_of_text|>") for d in docs]
    from_a = [t for t in texts if t.startswith("alpha")]
    assert from_a == a_docs[: len(from_a)] and [t for t in texts if t.startswith("beta")] == b_docs
    a = manifest["sources"][0]
    assert 2000 <= a["tokens"] < 2000 + max(len(tok.encode(d, bos=True, eos=True)) for d in a_docs)
    assert texts.index(b_docs[0]) < texts.index(from_a[-1])  # interleaved, not one source after the other


@pytest.mark.parametrize("entry, message", [
    ({"files": "a.jsonl", "wieght": 2}, "unknown key"),
    ({"files": "a.jsonl", "dataset": "x"}, "exactly one of"),
    ({"files": "a.jsonl", "weight": -1}, "weight must be > 0"),
    ({"files": "missing.jsonl"}, "file not found"),
])
def test_bad_mix_entries_are_named(tmp_path, entry, message):
    write_jsonl(tmp_path / "a.jsonl", [{"text": "x"}])
    (tmp_path / "mix.json").write_text(json.dumps([entry]))
    with pytest.raises(DataPrepError, match=message):
        load_mix_file(str(tmp_path / "mix.json"))


# ---- the command line ------------------------------------------------------------------------------------


def run_cli(tmp_path, *args):
    return run_script("load_pretrain_dataset.py", tmp_path, "--out_dir", str(tmp_path / "out"), "--num_workers", "0",
                      *args)


@pytest.mark.e2e
@pytest.mark.parametrize("case", ["missing file", "empty glob", "unknown column", "bad mix file"])
def test_bad_input_is_one_line_error_and_exit_2(tmp_path, case):
    write_jsonl(tmp_path / "a.jsonl", [{"content": "hello"}])
    (tmp_path / "mix.json").write_text("[{\"files\": \"a.jsonl\",}]")
    args, named = {
        "missing file": (["--files", "nope.txt"], "nope.txt"),
        "empty glob": (["--files", "data/*.jsonl"], "data/*.jsonl"),
        "unknown column": (["--files", "a.jsonl"], "'text'"),
        "bad mix file": (["--mix", "mix.json"], "mix.json"),
    }[case]
    result = run_cli(tmp_path, *args)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and named in lines[0], result.stderr


@pytest.mark.e2e
def test_cli_prepares_files_and_prints_a_summary(tmp_path, tok):
    docs = make_docs(30)
    write_jsonl(tmp_path / "a.jsonl", [{"text": d} for d in docs])
    result = run_cli(tmp_path, "--files", "a.jsonl", "--shard_size", "300", "--val_fraction", "0.2")
    assert result.returncode == 0, result.stderr
    assert "tokens/s" in result.stdout and "documents 30" in result.stdout
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert_matches_reference(tmp_path / "out", manifest, reference_shards(tok, docs, 300, 0.2))


@pytest.mark.e2e
def test_cli_does_not_import_torch(tmp_path):
    """`datasets` imports torch (about a second) whenever it is installed; preparing data never uses it."""
    write_jsonl(tmp_path / "a.jsonl", [{"text": d} for d in make_docs(5)])
    code = "import sys, load_pretrain_dataset as l; l.main(sys.argv[1:]); print('torch imported:', 'torch' in sys.modules)"
    env = {k: v for k, v in os.environ.items() if k != "USE_TORCH"}
    env |= {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", code, "--files", "a.jsonl", "--out_dir", "out", "--num_workers", "1"],
                            cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "documents 5" in result.stdout and "torch imported: False" in result.stdout


# ---- the default corpus --------------------------------------------------------------------------------


@pytest.mark.e2e  # tokenizes the whole default corpus: 12 s, a run's worth
def test_default_corpus_is_over_a_million_tokens_of_prose(tok):
    docs = [d["text"] for d in lpd.cpython_documents()]
    assert sum(map(len, docs)) > 4_000_000
    assert sum(map(len, tok.encode_batch(docs, bos=False, eos=False))) > 1_000_000
    assert any("tokenize" in d for d in docs) and not any(d.startswith("test.") for d in docs)


def test_default_corpus_does_not_depend_on_directory_listing_order(monkeypatch):
    root = lpd.STDLIB_DIR / "xml"  # four subpackages, several modules each: enough for the order to matter
    normal = list(lpd.cpython_documents(root))
    real_walk = os.walk

    def reversed_walk(top):
        for directory, subdirs, files in real_walk(top):
            subdirs.reverse()
            files.reverse()
            yield directory, subdirs, files

    monkeypatch.setattr(os, "walk", reversed_walk)
    assert list(lpd.cpython_documents(root)) == normal
    assert len([d for d in normal if d["source"].startswith("stdlib:")]) > 10


def test_module_document_keeps_docstrings_and_comments_not_strings():
    source = b'''"""Module doc that is long enough to be kept in the corpus, by design of the builder."""
# A comment block explaining why the code below exists, which is long enough to keep.
TEMPLATE = """
# not a comment: this line is inside a string and is long enough to be mistaken for one
"""
def f():
    """Function doc that is long enough to be kept in the corpus, by design of the builder."""
'''
    text = lpd.module_document("pkg.mod", source)
    assert text.startswith("pkg.mod\n\nModule doc") and "A comment block explaining why" in text
    assert "pkg.mod.f:\nFunction doc" in text and "not a comment" not in text
