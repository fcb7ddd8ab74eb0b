"""Training batches from the shards written by the `load_*_dataset.py` scripts, one loader per stage.

Every loader walks one global order of samples shared by all ranks (what a sample is differs per stage):

    pretrain  PretrainDataLoader  a window of T + 1 tokens of the split's token stream
    sft       ChatDataLoader      a row of T positions packed with whole conversations (or one, padded)
    dpo       PairDataLoader      a preference pair: a chosen and a rejected sequence

Epoch e visits its samples in `np.random.default_rng([seed, e]).permutation(n)` (or in order without
shuffle). One position in that order is shared by every rank: a call on rank r takes
order[pos + r*B : pos + (r+1)*B] and moves pos on by B*world_size, so 2 ranks x 1 call see exactly the
samples of 1 rank x 2 calls, and ranks never overlap within an epoch. An optimizer step takes
`samples_per_step` samples (B x world x accumulation); a new epoch starts at the start of a step when
fewer than that are left (the remainder is dropped). Since the decision is taken at each step's start
and the position counts samples, not calls, a saved position resumes exactly under any world size and
any batch geometry: the next samples in the same order, epochs wrapping where they should.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from shard_format import (
    MAKE_DATA, MANIFEST_FILE, SEQUENCE_FORMAT, TOKEN_FORMAT, DataError, open_sequence_shard, open_token_shard,
    read_manifest, sequence_shard_sha256,
)

SCAN_CHUNK = 1 << 24  # tokens per np.max call when scanning a shard: 64 MiB of uint32 at a time
IGNORE_INDEX = -100  # as model.IGNORE_INDEX; not imported, so data loading never imports the model


# ---- checking the files against the trainer (the format's own checks: shard_format.py) -------------
def check_tokenizer(manifest_path: Path, recorded: dict, expected: dict) -> None:
    """Tokens are only meaningful under the tokenizer that produced them: same file, same vocabulary."""
    if recorded.get("sha256") != expected.get("sha256") or recorded.get("n_words") != expected.get("n_words"):
        raise DataError(
            f"{manifest_path} was tokenized with {recorded.get('name')} "
            f"(sha256 {recorded.get('sha256')}, n_words {recorded.get('n_words')}) but the trainer uses "
            f"{expected.get('name')} (sha256 {expected.get('sha256')}, n_words {expected.get('n_words')}); "
            f"prepare the data again with this tokenizer")


def max_token_id(tokens: np.ndarray, chunk: int = SCAN_CHUNK) -> int:
    """Largest id in a shard, read in chunks so a memory-mapped shard never lands in RAM whole. -1 if empty."""
    largest = -1
    for start in range(0, len(tokens), chunk):
        largest = max(largest, int(np.max(tokens[start : start + chunk])))
    return largest


def check_recorded_max(path: Path, tokens: np.ndarray, recorded_max: Optional[int], vocab_size: int) -> None:
    """The manifest records each shard's largest id at preparation: trust it at start-up (no rank scans the
    data), and let `check_ids` verify every batch as it is read. Old manifests without it are scanned."""
    largest = recorded_max if recorded_max is not None else max_token_id(tokens)
    if largest >= vocab_size:
        raise DataError(f"shard {path} has token id {largest} >= vocab_size {vocab_size}"
                        + (" (per manifest.json)" if recorded_max is not None else ""))


def check_ids(path: Path, piece: np.ndarray, vocab_size: Optional[int]) -> None:
    """The lazy half of the check: ids actually read, against the embedding's size (cheap, per batch)."""
    if vocab_size is not None and len(piece) and int(piece.max()) >= vocab_size:
        raise DataError(f"shard {path} has token id {int(piece.max())} >= vocab_size {vocab_size} although "
                        f"manifest.json says it has none (corrupt?)")


def fingerprint(entries: list) -> str:
    """Names and sizes identify the data cheaply; a resumed run must see the same samples."""
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()


# ---- the shared walk over a global order ------------------------------------------------------------
class StepLoader:
    """Endless batches of one split for one rank; see the module docstring for the order.

    Subclasses say how many samples an epoch has (`_plan_epoch`, which may pack anew per epoch) and
    turn sample ids into a batch dict of CPU tensors (`batch_of`): "tokens" and "targets" (B, T),
    "input_tokens" (the real, unpadded input positions, for throughput), "trained_rows" where only some
    positions have targets, and what the stage needs besides.
    """

    state_keys: tuple[str, ...] = ("split", "seed", "shuffle", "tokenizer_sha256", "fingerprint")

    def __init__(self, data_dir: str, split: str, batch_size: int, rank: int, world_size: int, seed: int,
                 shuffle: bool, samples_per_step: Optional[int]):
        """`samples_per_step`: global samples one optimizer step consumes (B x world x accumulation).
        Default: one call's worth, B x world_size."""
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"bad loader shape: batch_size={batch_size} rank={rank} world_size={world_size}")
        self.data_dir = Path(data_dir)
        self.split, self.batch_size, self.rank, self.world_size = split, batch_size, rank, world_size
        self.seed, self.shuffle = seed, shuffle
        self.samples_per_step = samples_per_step or batch_size * world_size
        if self.samples_per_step % (batch_size * world_size):
            raise ValueError(f"samples_per_step={samples_per_step} is not a multiple of batch_size*world_size")
        self.calls_per_step = self.samples_per_step // (batch_size * world_size)
        self._epoch, self._position, self._calls_in_step = 0, 0, 0

    def _start(self) -> None:
        """Called by subclasses once their data is open."""
        self._order = self._epoch_order(0)
        if len(self._order) < self.samples_per_step:
            raise DataError(f"split {self.split!r} in {self.data_dir} has {self._size()}, fewer than one step needs: "
                            f"{self._need()}")

    unit = "sample"

    def _size(self) -> str:
        return f"{len(self._order)} {self.unit}s"

    def _need(self) -> str:
        return f"samples_per_step = {self.samples_per_step} {self.unit}s"

    def _plan_epoch(self, epoch: int, order: np.ndarray) -> np.ndarray:
        """The epoch's samples given the shuffled item order; identity where a sample is an item."""
        return order

    def _num_items(self) -> int:
        raise NotImplementedError

    def batch_of(self, samples: np.ndarray) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _epoch_order(self, epoch: int) -> np.ndarray:
        n = self._num_items()
        order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
        return self._plan_epoch(epoch, order)

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def num_samples(self) -> int:
        """Samples in the current epoch."""
        return len(self._order)

    def next_batch(self) -> dict[str, torch.Tensor]:
        """This rank's next micro-batch."""
        if self._calls_in_step == 0 and self._position + self.samples_per_step > len(self._order):
            self._epoch, self._position = self._epoch + 1, 0
            self._order = self._epoch_order(self._epoch)
        first = self._position + self.rank * self.batch_size
        samples = self._order[first : first + self.batch_size]
        self._position += self.batch_size * self.world_size
        self._calls_in_step = (self._calls_in_step + 1) % self.calls_per_step
        return self.batch_of(samples)

    def next_step(self) -> list[dict[str, torch.Tensor]]:
        """This rank's micro-batches of one optimizer step."""
        return [self.next_batch() for _ in range(self.calls_per_step)]

    def __iter__(self) -> "StepLoader":
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        return self.next_batch()

    def reset(self) -> None:
        """Back to the first batch of epoch 0, so every validation pass sees the same samples."""
        self._epoch, self._position, self._calls_in_step = 0, 0, 0
        self._order = self._epoch_order(0)

    # ---- checkpointing ----
    def state_dict(self) -> dict:
        """Where the global order stands; the same on every rank, independent of batch size and world size."""
        state = {key: getattr(self, key) for key in self.state_keys}
        return state | {"epoch": self._epoch, "position": self._position}

    def load_state_dict(self, state: dict) -> None:
        """Continue where `state` left off; refuse if the samples or their order would differ."""
        for key in self.state_keys:
            if state.get(key) != getattr(self, key):
                raise DataError(
                    f"data loader state for {self.data_dir / MANIFEST_FILE} has {key}={state.get(key)!r} "
                    f"but this loader has {key}={getattr(self, key)!r}; resuming would skip or repeat data")
        epoch, position = state.get("epoch"), state.get("position")
        if not (isinstance(epoch, int) and epoch >= 0 and isinstance(position, int) and position >= 0):
            raise DataError(f"data loader state has epoch={epoch!r} position={position!r}; "
                            f"expected integers >= 0")
        self._epoch, self._position, self._calls_in_step = epoch, position, 0
        self._order = self._epoch_order(epoch)
        if position > len(self._order):
            raise DataError(f"data loader state has position={position} but epoch {epoch} of split "
                            f"{self.split!r} has only {len(self._order)} {self.unit}s; resuming would skip data")


# ---- pretraining: windows of one token stream ---------------------------------------------------------
class PretrainDataLoader(StepLoader):
    """Sample i is the window `stream[i*T : i*T + T + 1]` of the split's shards concatenated in manifest
    order (memory-mapped; windows may run across shards): x without its last token, y without its first."""

    state_keys = StepLoader.state_keys + ("seq_len", "num_tokens")

    def __init__(self, data_dir: str, split: str, batch_size: int, seq_len: int, rank: int = 0,
                 world_size: int = 1, seed: int = 0, shuffle: bool = True, tokenizer_identity: dict | None = None,
                 vocab_size: int | None = None, samples_per_step: int | None = None):
        super().__init__(data_dir, split, batch_size, rank, world_size, seed, shuffle, samples_per_step)
        if seq_len < 1:
            raise ValueError(f"bad loader shape: seq_len={seq_len}")
        self.seq_len, self.vocab_size = seq_len, vocab_size
        manifest = read_manifest(self.data_dir, TOKEN_FORMAT)
        recorded = manifest.split(split)
        if tokenizer_identity is not None:
            check_tokenizer(manifest.path, manifest.tokenizer, tokenizer_identity)
        self.tokenizer_sha256 = manifest.tokenizer.get("sha256")

        entries = recorded["shards"]
        self._paths = [self.data_dir / e["file"] for e in entries]
        self._shards = []
        for path, entry in zip(self._paths, entries):
            tokens = open_token_shard(self.data_dir, entry, MAKE_DATA[TOKEN_FORMAT])
            if vocab_size is not None:
                check_recorded_max(path, tokens, entry.get("max_token_id"), vocab_size)
            self._shards.append(tokens)
        lengths = np.array([len(s) for s in self._shards], dtype=np.int64)
        self._ends = np.cumsum(lengths)  # stream offset just past each shard
        self._starts = self._ends - lengths
        self.num_tokens = int(lengths.sum())
        if self.num_tokens != recorded["num_tokens"]:
            raise DataError(f"{manifest.path}: split {split!r} says {recorded['num_tokens']} "
                            f"tokens but its shards hold {self.num_tokens}")
        self.fingerprint = fingerprint([[e["file"], e["num_tokens"]] for e in entries])
        self._windows = max(0, (self.num_tokens - 1) // seq_len)
        self._start()

    def _num_items(self) -> int:
        return self._windows

    def _size(self) -> str:
        return f"{self.num_tokens} tokens"

    def _need(self) -> str:
        return (f"samples_per_step*seq_len+1 = {self.samples_per_step}*{self.seq_len}+1 = "
                f"{self.samples_per_step * self.seq_len + 1}")

    @property
    def batches_per_epoch(self) -> int:
        """Calls per epoch on each rank (the remainder that does not fill a whole step is dropped)."""
        return self._windows // self.samples_per_step * self.calls_per_step

    @property
    def tokens_per_epoch(self) -> int:
        """Tokens of x trained on per epoch, summed over all ranks."""
        return self.batches_per_epoch * self.batch_size * self.world_size * self.seq_len

    def describe(self) -> str:
        return f"{self.num_tokens:,} {self.split} tokens"

    def _read(self, start: int, out: np.ndarray) -> None:
        """Fill `out` with stream[start : start + len(out)], crossing into later shards as needed."""
        shard = int(np.searchsorted(self._ends, start, side="right"))  # 'right' skips empty shards
        filled = 0
        while filled < len(out):
            offset = start + filled - int(self._starts[shard])
            piece = self._shards[shard][offset : offset + len(out) - filled]
            check_ids(self._paths[shard], piece, self.vocab_size)
            out[filled : filled + len(piece)] = piece
            filled += len(piece)
            shard += 1

    def batch_of(self, samples: np.ndarray) -> dict[str, torch.Tensor]:
        T = self.seq_len
        windows = np.empty((len(samples), T + 1), dtype=np.uint32)  # (B, T+1)
        for row, sample in enumerate(samples):  # one slice copy per row: a window is contiguous in the stream
            self._read(int(sample) * T, windows[row])
        windows = torch.from_numpy(windows.astype(np.int64))
        return {"tokens": windows[:, :-1].contiguous(), "targets": windows[:, 1:].contiguous(),  # (B, T) each
                "input_tokens": torch.tensor(len(samples) * T)}


# ---- sequences: conversations and preference pairs -------------------------------------------------------
class SequenceShards:
    """The sequences of one split of `llama3-sequence-shards` data: tokens, loss mask and offsets per shard,
    memory-mapped. Sequence j's targets: token k+1 where mask[k+1] is 1, IGNORE_INDEX elsewhere."""

    def __init__(self, data_dir: Path, split: str, kind: str, tokenizer_identity: Optional[dict],
                 vocab_size: Optional[int]):
        manifest = read_manifest(data_dir, SEQUENCE_FORMAT, kind)
        entries = manifest.split(split)["shards"]
        if tokenizer_identity is not None:
            check_tokenizer(manifest.path, manifest.tokenizer, tokenizer_identity)
        self.manifest, self.vocab_size = manifest.data, vocab_size
        self.tokenizer_sha256 = manifest.tokenizer.get("sha256")
        hint = MAKE_DATA[kind]
        self.recorded_sha256 = [e.get("sha256") for e in entries]  # None in manifests written before it was
        self.paths, self.tokens, self.masks, self.offsets, starts, lengths, shard_of = [], [], [], [], [], [], []
        for i, e in enumerate(entries):
            path = data_dir / e["tokens"]
            tokens, mask, offsets = open_sequence_shard(data_dir, e, hint)
            if vocab_size is not None:
                check_recorded_max(path, tokens, e.get("max_token_id"), vocab_size)
            self.paths.append(path)
            self.tokens.append(tokens)
            self.masks.append(mask)
            self.offsets.append(offsets)
            starts.append(offsets[:-1])
            lengths.append(np.diff(offsets))
            shard_of.append(np.full(e["num_sequences"], i, dtype=np.int32))
        self.starts = np.concatenate(starts) if starts else np.zeros(0, np.int64)
        self.lengths = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
        self.shard_of = np.concatenate(shard_of) if shard_of else np.zeros(0, np.int32)
        self.fingerprint = fingerprint([[e["tokens"], e["num_tokens"], e["num_sequences"]] for e in entries])

    def __len__(self) -> int:
        return len(self.lengths)

    def content_sha256(self) -> list[str]:
        """Each shard's content hash, as its manifest entry records it; for data prepared before entries
        recorded one, computed here (reading every byte)."""
        return [recorded or sequence_shard_sha256(tokens, mask, offsets) for recorded, tokens, mask, offsets
                in zip(self.recorded_sha256, self.tokens, self.masks, self.offsets)]

    def read(self, j: int) -> tuple[np.ndarray, np.ndarray]:
        """(x, y) of sequence j: its tokens but the last, and the next-token targets (int64, masked)."""
        shard, start, length = int(self.shard_of[j]), int(self.starts[j]), int(self.lengths[j])
        tokens = np.asarray(self.tokens[shard][start : start + length], dtype=np.int64)
        check_ids(self.paths[shard], tokens, self.vocab_size)
        trained = np.asarray(self.masks[shard][start + 1 : start + length], dtype=bool)
        return tokens[:-1], np.where(trained, tokens[1:], IGNORE_INDEX)


def trained_rows(targets: np.ndarray) -> torch.Tensor:
    """Flat indices of the positions that have a target (SFT trains about a tenth of its positions, DPO its
    responses): the losses multiply only these rows by the output layer. Found here, on the host, so the
    device never has to report a count back in the middle of a step."""
    return torch.from_numpy(np.flatnonzero(targets.reshape(-1) != IGNORE_INDEX))


def pad_width(longest: int, limit: int, multiple: int = 8) -> int:
    """Rows padded to the batch's longest sequence, rounded up (fewer distinct shapes), at most `limit`."""
    return min(limit, -(-longest // multiple) * multiple)


class ChatDataLoader(StepLoader):
    """SFT rows of T positions. Packed (default): whole conversations, in this epoch's shuffled order, fill a
    row until the next one does not fit; each position carries its conversation's index in the row and its
    position within the conversation, so attention stays inside a conversation and RoPE restarts. Unpacked:
    one conversation per row, right-padded to the batch's longest. Padding is never trained."""

    state_keys = StepLoader.state_keys + ("seq_len", "packing")
    unit = "row"

    def __init__(self, data_dir: str, split: str, batch_size: int, seq_len: int, rank: int = 0,
                 world_size: int = 1, seed: int = 0, shuffle: bool = True, packing: bool = True,
                 tokenizer_identity: dict | None = None, vocab_size: int | None = None,
                 samples_per_step: int | None = None):
        super().__init__(data_dir, split, batch_size, rank, world_size, seed, shuffle, samples_per_step)
        self.seq_len, self.packing = seq_len, packing
        self.data = SequenceShards(self.data_dir, split, "chat", tokenizer_identity, vocab_size)
        self.tokenizer_sha256, self.fingerprint = self.data.tokenizer_sha256, self.data.fingerprint
        # A conversation of L tokens fills L - 1 positions (its last token is only a target).
        self._fits = np.flatnonzero((self.data.lengths >= 2) & (self.data.lengths - 1 <= seq_len))
        self.too_long = len(self.data) - len(self._fits)
        self._start()

    def _num_items(self) -> int:
        return len(self._fits)

    def _size(self) -> str:
        return (f"{len(self._order)} rows of {self.seq_len} positions ({len(self.data)} conversations, "
                f"{self.too_long} longer than MAX_SEQ_LEN)")

    def _plan_epoch(self, epoch: int, order: np.ndarray) -> np.ndarray:
        """Row r holds conversations self._members[self._row_start[r] : self._row_start[r + 1]]."""
        convs = self._fits[order]
        if not self.packing:
            self._members, self._row_start = convs, np.arange(len(convs) + 1)
            return np.arange(len(convs))
        widths = self.data.lengths[convs] - 1
        row_start, used = [0], 0
        for i, width in enumerate(widths.tolist()):  # next-fit: a conversation never splits
            if used + width > self.seq_len:
                row_start.append(i)
                used = 0
            used += width
        row_start.append(len(convs))
        self._members, self._row_start = convs, np.array(row_start)
        return np.arange(len(row_start) - 1)

    def describe(self) -> str:
        skipped = f", {self.too_long:,} longer than MAX_SEQ_LEN skipped" if self.too_long else ""
        rows = f" in {self.num_samples:,} packed rows" if self.packing else ""
        return f"{len(self._fits):,} {self.split} conversations{rows}{skipped}"

    def batch_of(self, samples: np.ndarray) -> dict[str, torch.Tensor]:
        rows = [[self.data.read(int(j)) for j in self._members[self._row_start[r] : self._row_start[r + 1]]]
                for r in samples]
        width = self.seq_len if self.packing else pad_width(max(len(x) for row in rows for x, _ in row), self.seq_len)
        B = len(rows)
        tokens = np.zeros((B, width), np.int64)
        targets = np.full((B, width), IGNORE_INDEX, np.int64)
        positions = np.zeros((B, width), np.int64)
        document = np.full((B, width), -1, np.int64)  # padding: its own document, which no real token sees
        for b, row in enumerate(rows):
            at = 0
            for d, (x, y) in enumerate(row):
                span = slice(at, at + len(x))
                tokens[b, span], targets[b, span] = x, y
                positions[b, span], document[b, span] = np.arange(len(x)), d
                at += len(x)
        batch = {"tokens": torch.from_numpy(tokens), "targets": torch.from_numpy(targets),
                 "input_tokens": torch.tensor(int((document >= 0).sum())), "trained_rows": trained_rows(targets)}
        if self.packing:  # unpacked rows are one conversation, right-padded: the causal mask suffices
            batch |= {"positions": torch.from_numpy(positions), "document_ids": torch.from_numpy(document)}
        return batch


class PairDataLoader(StepLoader):
    """DPO: a sample is a preference pair (sequences 2i = chosen, 2i+1 = rejected, same prompt). A batch of B
    pairs is 2B rows, the chosen ones first, right-padded to the longest; only response tokens are targets.
    `pair_index` (B,) numbers each pair (its index in the split + index_offset): precomputed reference
    log-probs are kept by it."""

    state_keys = StepLoader.state_keys + ("seq_len",)
    unit = "pair"

    def __init__(self, data_dir: str, split: str, batch_size: int, seq_len: int, rank: int = 0,
                 world_size: int = 1, seed: int = 0, shuffle: bool = True, tokenizer_identity: dict | None = None,
                 vocab_size: int | None = None, samples_per_step: int | None = None, index_offset: int = 0):
        """`index_offset` is added to `pair_index` (validation pairs numbered after the training pairs)."""
        super().__init__(data_dir, split, batch_size, rank, world_size, seed, shuffle, samples_per_step)
        self.seq_len, self.index_offset = seq_len, index_offset
        self.data = SequenceShards(self.data_dir, split, "preference", tokenizer_identity, vocab_size)
        self.tokenizer_sha256, self.fingerprint = self.data.tokenizer_sha256, self.data.fingerprint
        if len(self.data) % 2:
            raise DataError(f"{self.data_dir / MANIFEST_FILE}: split {split!r} holds {len(self.data)} sequences, "
                            f"not whole pairs (corrupt?)")
        longest = np.maximum(self.data.lengths[0::2], self.data.lengths[1::2])
        self.fitting_pairs = np.flatnonzero(longest - 1 <= seq_len)
        self.num_pairs, self.too_long = len(self.data) // 2, len(self.data) // 2 - len(self.fitting_pairs)
        self._start()

    def _num_items(self) -> int:
        return len(self.fitting_pairs)

    def _plan_epoch(self, epoch: int, order: np.ndarray) -> np.ndarray:
        return self.fitting_pairs[order]

    def describe(self) -> str:
        skipped = f", {self.too_long:,} longer than MAX_SEQ_LEN skipped" if self.too_long else ""
        return f"{len(self.fitting_pairs):,} {self.split} pairs{skipped}"

    def batch_of(self, samples: np.ndarray) -> dict[str, torch.Tensor]:
        sequences = [self.data.read(2 * int(p) + side) for side in (0, 1) for p in samples]  # chosen, then rejected
        width = pad_width(max(len(x) for x, _ in sequences), self.seq_len)
        tokens = np.zeros((len(sequences), width), np.int64)
        targets = np.full((len(sequences), width), IGNORE_INDEX, np.int64)
        for row, (x, y) in enumerate(sequences):
            tokens[row, : len(x)], targets[row, : len(y)] = x, y
        return {"tokens": torch.from_numpy(tokens), "targets": torch.from_numpy(targets),
                "pair_index": torch.from_numpy(np.asarray(samples, dtype=np.int64) + self.index_offset),
                "input_tokens": torch.tensor(sum(len(x) for x, _ in sequences)), "trained_rows": trained_rows(targets)}
