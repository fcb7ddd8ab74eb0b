"""The one definition of the shard formats: manifests the loaders refuse (one line each), the shard checks a
resumed preparation trusts, and the tests' own shards written through it."""

import json
from pathlib import Path

import numpy as np
import pytest

import shard_format
from dataloaders import ChatDataLoader, DataError, PretrainDataLoader
from trainer_runs import make_token_data

TOKENIZER = {"kind": "tiktoken", "name": "tokenizer.model", "sha256": "ab" * 32, "n_words": 1000}


def token_data(directory: Path, **changes) -> Path:
    """One train shard of 100 tokens and a manifest as load_pretrain_dataset.py writes it, written out by
    hand (not through shard_format), with `changes` applied to its top level (None deletes a key)."""
    directory.mkdir(parents=True, exist_ok=True)
    np.save(directory / "train_000000.npy", np.arange(100, dtype=np.uint32))
    manifest = {"format": "llama3-token-shards", "version": 1, "dtype": "uint32", "tokenizer": TOKENIZER,
                "bos_id": 998, "eos_id": 999, "shard_size": 100,
                "splits": {"train": {"num_tokens": 100, "shards": [
                    {"file": "train_000000.npy", "num_tokens": 100, "max_token_id": 99}]}},
                "sources": [], "stats": {}, "created": "2025-01-01T00:00:00"}
    for key, value in changes.items():
        if value is None:
            del manifest[key]
        else:
            manifest[key] = value
    (directory / "manifest.json").write_text(json.dumps(manifest))
    return directory


def refusal(make_loader) -> str:
    with pytest.raises(DataError) as error:
        make_loader()
    message = str(error.value)
    assert "\n" not in message
    return message


def test_a_manifest_of_an_unknown_version_is_refused_in_one_line(tmp_path):
    data = token_data(tmp_path / "data", version=2)
    message = refusal(lambda: PretrainDataLoader(str(data), "train", 1, 4))
    assert "version 2" in message and "reads 'llama3-token-shards' version 1" in message
    assert "load_pretrain_dataset.py" in message  # and how to make data it reads


def test_a_manifest_of_another_format_is_refused_in_one_line(tmp_path):
    data = token_data(tmp_path / "data")  # pretraining data given to the SFT loader
    message = refusal(lambda: ChatDataLoader(str(data), "train", 1, 8))
    assert "format 'llama3-token-shards'" in message and "reads 'llama3-sequence-shards'" in message
    assert "load_instruct_dataset.py" in message


@pytest.mark.parametrize("missing, named", [("splits", "has no 'splits' entry"), ("tokenizer", "has no 'tokenizer'")])
def test_a_manifest_missing_a_field_is_refused_naming_it(tmp_path, missing, named):
    data = token_data(tmp_path / "data", **{missing: None})
    assert named in refusal(lambda: PretrainDataLoader(str(data), "train", 1, 4))


def test_a_shard_entry_missing_a_field_is_refused_naming_the_split_shard_and_field(tmp_path):
    data = token_data(tmp_path / "data", splits={"train": {"num_tokens": 100, "shards": [{"file": "train_000000.npy"}]}})
    message = refusal(lambda: PretrainDataLoader(str(data), "train", 1, 4))
    assert "split 'train' shard 0 has no 'num_tokens' entry" in message


def test_a_manifest_that_is_no_object_is_refused_in_one_line(tmp_path):
    data = token_data(tmp_path / "data")
    (data / "manifest.json").write_text("[1, 2]")
    assert "not an object" in refusal(lambda: PretrainDataLoader(str(data), "train", 1, 4))


@pytest.mark.parametrize("damage", ["intact", "empty file", "truncated", "other dtype", "missing"])
def test_a_token_shard_is_intact_only_as_its_entry_describes_it(tmp_path, damage):
    entry = {"file": "train_000000.npy", "num_tokens": 50, "max_token_id": 49}
    path = tmp_path / entry["file"]
    np.save(path, np.arange(50, dtype=np.uint32))
    if damage == "empty file":  # a crash between creating and writing it
        path.write_bytes(b"")
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:-40])
    elif damage == "other dtype":
        np.save(path, np.arange(50, dtype=np.uint16))
    elif damage == "missing":
        path.unlink()
    assert shard_format.shard_is_intact(tmp_path, entry) == (damage == "intact")


def test_a_sequence_shard_whose_offsets_do_not_span_its_tokens_is_not_intact(tmp_path):
    entry = {**shard_format.sequence_shard_files("val", 0), "num_sequences": 2, "num_tokens": 6}
    np.save(tmp_path / entry["tokens"], np.arange(6, dtype=np.uint32))
    np.save(tmp_path / entry["mask"], np.ones(6, dtype=np.uint8))
    np.save(tmp_path / entry["offsets"], np.array([0, 2, 6], dtype=np.int64))
    assert shard_format.shard_is_intact(tmp_path, entry)
    np.save(tmp_path / entry["offsets"], np.array([0, 4, 2], dtype=np.int64))  # ends short, runs backwards
    assert not shard_format.shard_is_intact(tmp_path, entry)


def test_the_tests_token_data_is_written_through_shard_format(tmp_path, monkeypatch):
    """make_token_data (the end-to-end runs' pretraining data) takes the format from shard_format, so a change
    there reaches it; as it is, the loader reads it and its tokens are the documents it encoded."""
    monkeypatch.setattr(shard_format, "VERSION", 7)
    monkeypatch.setattr(shard_format, "TOKEN_FORMAT", "another-format")
    manifest = json.loads((make_token_data(tmp_path / "patched", documents=8) / "manifest.json").read_text())
    assert (manifest["format"], manifest["version"]) == ("another-format", 7)
    monkeypatch.undo()

    data = make_token_data(tmp_path / "data", documents=8)
    manifest = json.loads((data / "manifest.json").read_text())
    assert set(manifest) == {"format", "version", "dtype", "tokenizer", "bos_id", "eos_id", "shard_size",
                             "splits", "sources", "stats", "created"}
    loader = PretrainDataLoader(str(data), "val", 1, 16, shuffle=False)
    stream = np.concatenate([np.load(data / s["file"]) for s in manifest["splits"]["val"]["shards"]])
    assert loader.num_tokens == len(stream) == manifest["splits"]["val"]["num_tokens"]
    assert stream[0] == manifest["bos_id"] and np.count_nonzero(stream == manifest["eos_id"]) == 6
