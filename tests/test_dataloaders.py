"""The loaders against real shard files in tmp_path: PretrainDataLoader checked with plain numpy slicing, the
pair loader with Meta's tokenizer."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from dataloaders import DataError, PretrainDataLoader, max_token_id

VOCAB = 1000
TOKENIZER = {"kind": "tiktoken", "name": "tokenizer.model", "sha256": "ab" * 32, "n_words": VOCAB}


def write_shards(data_dir: Path, splits: dict[str, list[np.ndarray]]) -> Path:
    """Write shards and a manifest the way load_pretrain_dataset.py lays them out."""
    data_dir.mkdir(parents=True, exist_ok=True)
    manifest_splits = {}
    for split, arrays in splits.items():
        entries = []
        for i, tokens in enumerate(arrays):
            name = f"{split}_{i:06d}.npy"
            np.save(data_dir / name, tokens.astype(np.uint32))
            entries.append({"file": name, "num_tokens": len(tokens), "max_token_id": int(tokens.max())})
        manifest_splits[split] = {"num_tokens": sum(len(a) for a in arrays), "shards": entries}
    manifest = {
        "format": "llama3-token-shards", "version": 1, "dtype": "uint32", "tokenizer": TOKENIZER,
        "bos_id": 998, "eos_id": 999, "shard_size": 64, "splits": manifest_splits,
        "sources": [], "stats": {}, "created": "2025-01-01T00:00:00",
    }
    (data_dir / "manifest.json").write_text(json.dumps(manifest))
    return data_dir


def counting_data(tmp_path: Path, num_tokens: int = 201, shard_len: int = 50) -> Path:
    """Token k is k, so a window starting at sample s begins with token s*T: ids can be read off x."""
    stream = np.arange(num_tokens)
    return write_shards(tmp_path / "data", {"train": np.split(stream, range(shard_len, num_tokens, shard_len))})


def xy(loader) -> tuple[torch.Tensor, torch.Tensor]:
    batch = loader.next_batch()
    return batch["tokens"], batch["targets"]


def sample_ids(x: torch.Tensor, seq_len: int) -> list[int]:
    return (x[:, 0] // seq_len).tolist()


def test_every_window_is_the_concatenated_stream_slice_across_shard_boundaries(tmp_path):
    # Shards of 3 and 2 tokens are shorter than one window; several windows straddle 2-3 shards.
    rng = np.random.default_rng(0)
    shards = [rng.integers(0, VOCAB, n) for n in (13, 3, 2, 20, 7, 16)]
    stream = np.concatenate(shards)
    T = 5
    data = write_shards(tmp_path / "data", {"train": shards})
    loader = PretrainDataLoader(str(data), "train", batch_size=1, seq_len=T, shuffle=False)
    assert loader.num_samples == (len(stream) - 1) // T == 12
    for i in range(loader.num_samples):
        x, y = xy(loader)
        assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (1, T)
        assert x[0].tolist() == stream[i * T : i * T + T].tolist()
        assert y[0].tolist() == stream[i * T + 1 : i * T + T + 1].tolist()


def test_shuffled_order_is_the_documented_permutation_and_unshuffled_is_sequential(tmp_path):
    data, T, B = counting_data(tmp_path), 4, 5
    shuffled = PretrainDataLoader(str(data), "train", batch_size=B, seq_len=T, seed=7)
    expected = np.random.default_rng([7, 0]).permutation(50)
    assert sample_ids(xy(shuffled)[0], T) == expected[:B].tolist()
    assert sample_ids(xy(shuffled)[0], T) == expected[B : 2 * B].tolist()
    sequential = PretrainDataLoader(str(data), "train", batch_size=B, seq_len=T, shuffle=False)
    assert sample_ids(xy(sequential)[0], T) == [0, 1, 2, 3, 4]
    assert sample_ids(xy(sequential)[0], T) == [5, 6, 7, 8, 9]


def test_same_seed_repeats_the_order_and_another_seed_changes_it(tmp_path):
    data = counting_data(tmp_path)

    def first_batches(seed: int) -> list[list[int]]:
        loader = PretrainDataLoader(str(data), "train", batch_size=4, seq_len=4, seed=seed)
        return [xy(loader)[0].tolist() for _ in range(3)]

    assert first_batches(1) == first_batches(1)
    assert first_batches(1) != first_batches(2)


def test_two_ranks_together_equal_one_rank_taking_two_batches(tmp_path):
    data, T, B = counting_data(tmp_path), 4, 3
    ranks = [PretrainDataLoader(str(data), "train", B, T, rank=r, world_size=2, seed=3) for r in range(2)]
    single = PretrainDataLoader(str(data), "train", B, T, seed=3)
    seen = [set(), set()]
    for _ in range(8):  # one epoch: 50 // (3*2) = 8 steps
        (x0, y0), (x1, y1) = xy(ranks[0]), xy(ranks[1])
        (xa, ya), (xb, yb) = xy(single), xy(single)
        assert torch.equal(torch.cat([x0, x1]), torch.cat([xa, xb]))
        assert torch.equal(torch.cat([y0, y1]), torch.cat([ya, yb]))
        seen[0].update(sample_ids(x0, T))
        seen[1].update(sample_ids(x1, T))
    assert not seen[0] & seen[1]
    assert len(seen[0]) == len(seen[1]) == 8 * B


def test_an_epoch_sees_every_sample_once_then_reshuffles(tmp_path):
    data, T, B = counting_data(tmp_path), 4, 4  # 50 samples: 12 batches, 2 samples dropped
    loader = PretrainDataLoader(str(data), "train", B, T, seed=0)
    assert loader.tokens_per_epoch == 12 * B * T
    epoch0 = [i for _ in range(12) for i in sample_ids(xy(loader)[0], T)]
    assert len(epoch0) == len(set(epoch0)) == 48 and set(epoch0) <= set(range(50))
    assert loader.epoch == 0
    epoch1 = [i for _ in range(12) for i in sample_ids(xy(loader)[0], T)]
    assert loader.epoch == 1
    assert len(set(epoch1)) == 48 and epoch1 != epoch0
    assert epoch1 == np.random.default_rng([0, 1]).permutation(50)[:48].tolist()


def test_reset_restarts_from_the_first_batch(tmp_path):
    loader = PretrainDataLoader(str(counting_data(tmp_path)), "train", 4, 4, seed=5)
    first = xy(loader)[0]
    for _ in range(20):  # past an epoch boundary
        xy(loader)
    loader.reset()
    assert loader.epoch == 0 and torch.equal(xy(loader)[0], first)


def test_resumed_loader_continues_with_exactly_the_next_batches(tmp_path):
    data = counting_data(tmp_path)
    original = PretrainDataLoader(str(data), "train", 4, 4, seed=9)
    for _ in range(10):
        xy(original)
    state = json.loads(json.dumps(original.state_dict()))  # must survive a JSON/checkpoint round trip
    resumed = PretrainDataLoader(str(data), "train", 4, 4, seed=9)
    resumed.load_state_dict(state)
    for _ in range(6):  # crosses into epoch 1
        assert torch.equal(xy(resumed)[0], xy(original)[0])
    assert resumed.epoch == original.epoch == 1


def test_state_saved_by_two_ranks_resumes_on_one_rank(tmp_path):
    data, T, B = counting_data(tmp_path), 4, 3
    ranks = [PretrainDataLoader(str(data), "train", B, T, rank=r, world_size=2, seed=4) for r in range(2)]
    for _ in range(3):
        for loader in ranks:
            xy(loader)
    single = PretrainDataLoader(str(data), "train", B, T, seed=4)
    single.load_state_dict(ranks[0].state_dict())
    for _ in range(4):
        expected = torch.cat([xy(ranks[0])[0], xy(ranks[1])[0]])
        assert torch.equal(torch.cat([xy(single)[0], xy(single)[0]]), expected)


@pytest.mark.parametrize("change", [{"seq_len": 5}, {"seed": 1}, {"shuffle": False}, {"data": "longer"}])
def test_state_from_different_settings_or_data_is_refused(tmp_path, change):
    saved = PretrainDataLoader(str(counting_data(tmp_path / "a")), "train", 2, 4).state_dict()
    data = counting_data(tmp_path / "b", num_tokens=251 if change.get("data") else 201)
    settings = {"seq_len": 4, "seed": 0, "shuffle": True} | {k: v for k, v in change.items() if k != "data"}
    loader = PretrainDataLoader(str(data), "train", 2, **settings)
    with pytest.raises(DataError, match="skip or repeat"):
        loader.load_state_dict(saved)


# ---- bad data is refused at construction, naming the file -------------------------------------


def test_missing_manifest_says_how_to_make_the_data(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"manifest\.json.*load_pretrain_dataset\.py"):
        PretrainDataLoader(str(tmp_path / "empty"), "train", 1, 4)
    with pytest.raises(DataError, match="load_pretrain_dataset.py"):
        PretrainDataLoader(str(tmp_path / "nowhere"), "train", 1, 4)


def test_unknown_split_is_refused(tmp_path):
    with pytest.raises(DataError, match=r"manifest\.json has no split 'val'"):
        PretrainDataLoader(str(counting_data(tmp_path)), "val", 1, 4)


def test_other_tokenizer_is_refused_naming_both(tmp_path):
    other = TOKENIZER | {"name": "other.model", "sha256": "cd" * 32}
    with pytest.raises(DataError) as error:
        PretrainDataLoader(str(counting_data(tmp_path)), "train", 1, 4, tokenizer_identity=other)
    assert "manifest.json" in str(error.value) and "ab" * 32 in str(error.value) and "cd" * 32 in str(error.value)
    PretrainDataLoader(str(counting_data(tmp_path)), "train", 1, 4, tokenizer_identity=dict(TOKENIZER))


def test_missing_shard_is_named(tmp_path):
    data = counting_data(tmp_path)
    (data / "train_000002.npy").unlink()
    with pytest.raises(DataError, match=r"train_000002\.npy.*missing"):
        PretrainDataLoader(str(data), "train", 1, 4)


@pytest.mark.parametrize(
    "damage",
    [
        lambda path: np.save(path, np.arange(30, dtype=np.uint32)),  # fewer tokens than the manifest says
        lambda path: np.save(path, np.arange(50, dtype=np.int64)),  # wrong dtype
        lambda path: path.write_bytes(path.read_bytes()[:-40]),  # cut off mid-file
        lambda path: path.write_bytes(b"\x00garbage" * 40),  # not an .npy at all
    ],
)
def test_damaged_shard_is_named(tmp_path, damage):
    data = counting_data(tmp_path)
    damage(data / "train_000001.npy")
    with pytest.raises(DataError, match=r"train_000001\.npy"):
        PretrainDataLoader(str(data), "train", 1, 4)


def test_token_id_beyond_vocab_is_refused_from_the_manifest_at_start(tmp_path):
    tokens = np.arange(100)
    tokens[77] = 600
    data = write_shards(tmp_path / "data", {"train": [np.arange(100), tokens]})
    with pytest.raises(DataError, match=r"train_000001\.npy has token id 600 >= vocab_size 500 \(per manifest"):
        PretrainDataLoader(str(data), "train", 1, 4, vocab_size=500)


def test_start_up_trusts_the_manifests_max_id_instead_of_scanning_every_shard(tmp_path, monkeypatch):
    import dataloaders

    data = counting_data(tmp_path)
    monkeypatch.setattr(dataloaders, "max_token_id", lambda *a, **k: pytest.fail("scanned a shard at start-up"))
    PretrainDataLoader(str(data), "train", 1, 4, vocab_size=VOCAB)


def test_a_manifest_that_understates_the_max_id_is_caught_when_the_batch_is_read(tmp_path):
    tokens = np.arange(100)
    tokens[77] = 600
    data = write_shards(tmp_path / "data", {"train": [np.arange(100), tokens]})
    manifest = json.loads((data / "manifest.json").read_text())
    manifest["splits"]["train"]["shards"][1]["max_token_id"] = 99  # lies
    (data / "manifest.json").write_text(json.dumps(manifest))
    loader = PretrainDataLoader(str(data), "train", 1, 4, vocab_size=500, shuffle=False)
    for _ in range(100 // 4 + 77 // 4):  # every window before the one holding stream position 177
        xy(loader)
    with pytest.raises(DataError, match=r"train_000001\.npy has token id 600 >= vocab_size 500"):
        xy(loader)


def test_chunked_scan_finds_the_max_wherever_it_sits():
    rng = np.random.default_rng(0)
    for where in (0, 6, 7, 99):  # first, chunk end, chunk start, last
        tokens = rng.integers(0, 50, 100).astype(np.uint32)
        tokens[where] = 70
        assert max_token_id(tokens, chunk=7) == int(np.max(tokens)) == 70


def test_split_too_small_for_one_global_batch_is_refused(tmp_path):
    data = counting_data(tmp_path)  # 201 tokens, T=4: 50 samples
    message = rf"split 'train' in {re.escape(str(data))} has 201 tokens, fewer than one step needs.* 209"
    with pytest.raises(DataError, match=message):
        PretrainDataLoader(str(data), "train", 13, 4, world_size=4)
    PretrainDataLoader(str(data), "train", 25, 4, world_size=2)  # exactly one batch fits


def test_two_ranks_equal_one_rank_with_two_calls_across_epoch_boundaries(tmp_path):
    # 50 samples, steps of 2 x 7 = 14: 8 samples are left over per epoch, enough for one more
    # single-rank call of 7. Epochs must still end between steps for both layouts alike.
    data = counting_data(tmp_path)
    two = [PretrainDataLoader(str(data), "train", 7, 4, rank=r, world_size=2, seed=3, samples_per_step=14)
           for r in range(2)]
    one = PretrainDataLoader(str(data), "train", 7, 4, seed=3, samples_per_step=14)
    for _ in range(10):  # 3 steps per epoch: into the fourth epoch
        ranks = torch.cat([xy(loader)[0] for loader in two])
        single = torch.cat([xy(one)[0], xy(one)[0]])
        assert torch.equal(ranks, single)
    assert one.epoch == two[0].epoch == 3


@pytest.mark.parametrize("before,after", [(4, 16), (16, 4), (6, 10)])
def test_a_changed_batch_geometry_continues_from_the_same_global_sample_position(tmp_path, before, after):
    """Resuming with another samples-per-step sees the samples the uninterrupted order holds next, whole
    steps of them, and epochs wrap between steps as they should (the old loader wrapped mid-step)."""
    data = counting_data(tmp_path, num_tokens=401)  # 100 samples of T=4
    old = PretrainDataLoader(str(data), "train", 2, 4, seed=5, samples_per_step=before)
    for _ in range(7 * before // 2):  # 7 steps
        xy(old)
    new = PretrainDataLoader(str(data), "train", 2, 4, seed=5, samples_per_step=after)
    new.load_state_dict(json.loads(json.dumps(old.state_dict())))
    position, epoch, seen = 0, 0, []
    for _ in range(7):  # where the old geometry stood, by the documented rule computed by hand
        position, epoch = (0, epoch + 1) if position + before > 100 else (position, epoch)
        position += before
    for _ in range(40):  # 40 steps of the new geometry: several epochs
        step = torch.cat([xy(new)[0] for _ in range(after // 2)])
        if position + after > 100:
            position, epoch = 0, epoch + 1
        expected = np.random.default_rng([5, epoch]).permutation(100)[position:position + after]
        assert sample_ids(step, 4) == expected.tolist() and new.epoch == epoch
        position += after
        seen.append(len(step))
    assert set(seen) == {after}  # never a short step


def test_state_with_a_position_past_the_epoch_is_refused(tmp_path):
    loader = PretrainDataLoader(str(counting_data(tmp_path)), "train", 2, 4)
    state = loader.state_dict() | {"position": 51}
    with pytest.raises(DataError, match="position=51 but epoch 0 .* has only 50"):
        loader.load_state_dict(state)


# ---- preference pairs --------------------------------------------------------------------------------------
def test_the_pair_loader_puts_each_pairs_chosen_response_first_and_its_rejected_one_second(tmp_path):
    """Asymmetric on purpose: a loader that read the rejected sequence first would train the opposite preference
    while every symmetric check (log 2 at the start, resume, 2 ranks = 1) still passed. The responses are
    tokenized independently, by Meta's own tokenizer."""
    from llama_models.llama3.tokenizer import Tokenizer as MetaTokenizer

    from dataloaders import PairDataLoader
    from load_dpo_dataset import prepare_dpo_dataset
    from data_sources import ChatSource

    rows = [{"prompt": f"Name colour number {i}.", "chosen": f"Colour {i} is blue", "rejected": f"red {i}"}
            for i in range(12)]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    prepare_dpo_dataset([ChatSource(files=[str(tmp_path / "pairs.jsonl")])], tmp_path / "dpo", max_seq_len=64,
                        val_fraction=0.0, show_progress=False)
    meta = MetaTokenizer.get_instance()
    response = lambda text: tuple(meta.encode(text, bos=False, eos=False) + [meta.special_tokens["<|eot_id|>"]])
    expected = sorted((response(r["chosen"]), response(r["rejected"])) for r in rows)

    loader = PairDataLoader(str(tmp_path / "dpo"), "train", 1, 64, shuffle=False)  # val_fraction 0: all of them
    got = []
    for _ in range(loader.num_samples):
        chosen, rejected = loader.next_batch()["targets"]  # (2, T): the pair's chosen row, then its rejected row
        got.append((tuple(chosen[chosen != -100].tolist()), tuple(rejected[rejected != -100].tolist())))
    assert sorted(got) == expected


def test_pairs_prepared_before_shards_recorded_their_hash_load_alike_and_get_it_computed(tmp_path):
    """The manifest's per-shard "sha256" is optional: an older manifest without it loads, resumes under the same
    fingerprint, and its content hash is computed from the files instead."""
    from dataloaders import PairDataLoader
    from load_dpo_dataset import prepare_dpo_dataset
    from data_sources import ChatSource

    rows = [{"prompt": f"Question {i}?", "chosen": f"answer {i}", "rejected": f"no {i}"} for i in range(30)]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    manifest = prepare_dpo_dataset([ChatSource(files=[str(tmp_path / "pairs.jsonl")])], tmp_path / "dpo",
                                   max_seq_len=64, val_fraction=0.0, shard_size=300, show_progress=False)["manifest"]
    current = PairDataLoader(str(tmp_path / "dpo"), "train", 2, 64)
    for shard in manifest["splits"]["train"]["shards"]:
        del shard["sha256"]
    (tmp_path / "dpo" / "manifest.json").write_text(json.dumps(manifest))
    older = PairDataLoader(str(tmp_path / "dpo"), "train", 2, 64)
    assert len(current.data.content_sha256()) > 1 and older.data.content_sha256() == current.data.content_sha256()
    older.load_state_dict(current.state_dict())
    assert torch.equal(older.next_batch()["tokens"], current.next_batch()["tokens"])
