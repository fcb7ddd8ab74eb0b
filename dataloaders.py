"""Pretraining batches from the token shards written by `load_pretrain_dataset.py`.

A split is one virtual token stream: its shards concatenated in manifest order, memory-mapped
so nothing is read before it is needed. Sample i is the window `stream[i*T : i*T + T + 1]`
(T = seq_len); x is the window without its last token and y without its first, so
`num_samples = (num_tokens - 1) // T`. Windows may run across shard boundaries.

Epoch e visits the samples in `np.random.default_rng([seed, e]).permutation(num_samples)`
(or 0, 1, 2, ... without shuffle). One position in that order is shared by every rank: a call
on rank r takes order[pos + r*B : pos + (r+1)*B] and moves pos on by B*world_size. Hence
2 ranks x 1 call see exactly the samples of 1 rank x 2 calls, ranks never overlap within an
epoch, and a saved position resumes correctly under any world size. When fewer than
B*world_size samples are left, the remainder is dropped and the next epoch starts.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

FORMAT = "llama3-token-shards"
VERSION = 1
DTYPE = "uint32"
SCAN_CHUNK = 1 << 24  # tokens per np.max call when scanning a shard: 64 MiB of uint32 at a time
MAKE_DATA = "run `python load_pretrain_dataset.py` first"


class DataError(ValueError):
    """The data on disk cannot be used as asked. The message is one line naming the file and the fault."""


# ---- reading and checking the files ---------------------------------------------------------


def read_manifest(data_dir: Path) -> dict:
    """Parse `manifest.json` and check it describes a format this loader reads."""
    if not data_dir.is_dir():
        raise DataError(f"data directory {data_dir} does not exist; {MAKE_DATA}")
    path = data_dir / "manifest.json"
    if not path.is_file():
        raise DataError(f"no manifest.json in {data_dir}; {MAKE_DATA}")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{path} is not readable JSON ({e}); {MAKE_DATA}") from None
    for key in ("format", "version", "dtype", "tokenizer", "splits"):
        if key not in manifest:
            raise DataError(f"{path} has no '{key}' entry; {MAKE_DATA}")
    if manifest["format"] != FORMAT or manifest["version"] != VERSION:
        raise DataError(
            f"{path} is format {manifest['format']!r} version {manifest['version']!r}; "
            f"this loader reads {FORMAT!r} version {VERSION}"
        )
    if manifest["dtype"] != DTYPE:
        raise DataError(f"{path} declares dtype {manifest['dtype']!r}; this loader reads {DTYPE}")
    return manifest


def check_tokenizer(manifest_path: Path, recorded: dict, expected: dict) -> None:
    """Tokens are only meaningful under the tokenizer that produced them: same file, same vocabulary."""
    if recorded.get("sha256") != expected.get("sha256") or recorded.get("n_words") != expected.get("n_words"):
        raise DataError(
            f"{manifest_path} was tokenized with {recorded.get('name')} "
            f"(sha256 {recorded.get('sha256')}, n_words {recorded.get('n_words')}) but the trainer uses "
            f"{expected.get('name')} (sha256 {expected.get('sha256')}, n_words {expected.get('n_words')}); "
            f"re-run `python load_pretrain_dataset.py` with this tokenizer"
        )


def open_shard(path: Path, num_tokens: int) -> np.ndarray:
    """Memory-map one shard and check it is the 1-D uint32 array of the length the manifest promises."""
    if not path.is_file():
        raise DataError(f"shard {path} listed in manifest.json is missing; {MAKE_DATA}")
    try:
        tokens = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise DataError(f"shard {path} is not a readable .npy file ({e}); {MAKE_DATA}") from None
    if tokens.dtype != np.uint32 or tokens.ndim != 1:
        raise DataError(f"shard {path} holds {tokens.dtype} of shape {tokens.shape}; expected 1-D uint32")
    if len(tokens) != num_tokens:
        raise DataError(f"shard {path} has {len(tokens)} tokens but manifest.json says {num_tokens} (truncated?)")
    return tokens


def max_token_id(tokens: np.ndarray, chunk: int = SCAN_CHUNK) -> int:
    """Largest id in a shard, read in chunks so a memory-mapped shard never lands in RAM whole. -1 if empty."""
    largest = -1
    for start in range(0, len(tokens), chunk):
        largest = max(largest, int(np.max(tokens[start : start + chunk])))
    return largest


def check_token_ids(path: Path, tokens: np.ndarray, recorded_max: int | None, vocab_size: int) -> None:
    """Every id must index the embedding table; the manifest's max is checked first (free), then the data."""
    if recorded_max is not None and recorded_max >= vocab_size:
        raise DataError(f"shard {path} has token id {recorded_max} >= vocab_size {vocab_size} (per manifest.json)")
    actual = max_token_id(tokens)
    if actual >= vocab_size:
        raise DataError(f"shard {path} has token id {actual} >= vocab_size {vocab_size}")
    if recorded_max is not None and actual != recorded_max:
        raise DataError(f"shard {path} has max token id {actual} but manifest.json says {recorded_max} (corrupt?)")


# ---- the loader -----------------------------------------------------------------------------


class PretrainDataLoader:
    """Endless (x, y) batches of one split for one rank; see the module docstring for the order."""

    def __init__(
        self,
        data_dir: str,
        split: str,
        batch_size: int,
        seq_len: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        tokenizer_identity: dict | None = None,
        vocab_size: int | None = None,
        samples_per_step: int | None = None,
    ):
        """`samples_per_step`: global samples one optimizer step consumes (B x world x accumulation).
        Epochs then end only between steps, so how a step is split over ranks and micro-batches
        never changes which samples it sees. Default: one call's worth, B x world_size."""
        if batch_size < 1 or seq_len < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(
                f"bad loader shape: batch_size={batch_size} seq_len={seq_len} rank={rank} world_size={world_size}"
            )
        self.data_dir = Path(data_dir)
        self.split = split
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.shuffle = shuffle
        self.samples_per_step = samples_per_step or batch_size * world_size
        if self.samples_per_step % (batch_size * world_size):
            raise ValueError(f"samples_per_step={samples_per_step} is not a multiple of batch_size*world_size")

        manifest = read_manifest(self.data_dir)
        manifest_path = self.data_dir / "manifest.json"
        if split not in manifest["splits"]:
            raise DataError(f"{manifest_path} has no split {split!r} (it has {sorted(manifest['splits'])})")
        if tokenizer_identity is not None:
            check_tokenizer(manifest_path, manifest["tokenizer"], tokenizer_identity)
        self.tokenizer_sha256 = manifest["tokenizer"].get("sha256")

        entries = manifest["splits"][split]["shards"]
        self._shards = []
        for entry in entries:
            path = self.data_dir / entry["file"]
            tokens = open_shard(path, entry["num_tokens"])
            if vocab_size is not None:
                check_token_ids(path, tokens, entry.get("max_token_id"), vocab_size)
            self._shards.append(tokens)
        lengths = np.array([len(s) for s in self._shards], dtype=np.int64)
        self._ends = np.cumsum(lengths)  # stream offset just past each shard
        self._starts = self._ends - lengths
        self.num_tokens = int(lengths.sum())
        if self.num_tokens != manifest["splits"][split]["num_tokens"]:
            raise DataError(
                f"{manifest_path}: split {split!r} says {manifest['splits'][split]['num_tokens']} tokens "
                f"but its shards hold {self.num_tokens}"
            )
        # Names and sizes identify the data cheaply; a resumed run must see the same stream.
        listing = json.dumps([[e["file"], e["num_tokens"]] for e in entries])
        self.fingerprint = hashlib.sha256(listing.encode()).hexdigest()

        self.num_samples = max(0, (self.num_tokens - 1) // seq_len)
        if self.num_samples < self.samples_per_step:
            need = self.samples_per_step * seq_len + 1
            raise DataError(
                f"split {split!r} in {self.data_dir} has {self.num_tokens} tokens, fewer than one step needs: "
                f"samples_per_step*seq_len+1 = {self.samples_per_step}*{seq_len}+1 = {need}"
            )
        self._epoch = 0
        self._position = 0  # global, in samples within the epoch's order; identical on every rank
        self._order = self._epoch_order(0)

    # ---- order ----

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_samples)
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def batches_per_epoch(self) -> int:
        """Calls per epoch on each rank (the remainder that does not fill a whole step is dropped)."""
        steps = self.num_samples // self.samples_per_step
        return steps * self.samples_per_step // (self.batch_size * self.world_size)

    @property
    def tokens_per_epoch(self) -> int:
        """Tokens of x trained on per epoch, summed over all ranks."""
        return self.batches_per_epoch * self.batch_size * self.world_size * self.seq_len

    # ---- batches ----

    def _read(self, start: int, out: np.ndarray) -> None:
        """Fill `out` with stream[start : start + len(out)], crossing into later shards as needed."""
        shard = int(np.searchsorted(self._ends, start, side="right"))  # 'right' skips empty shards
        filled = 0
        while filled < len(out):
            offset = start + filled - int(self._starts[shard])
            piece = self._shards[shard][offset : offset + len(out) - filled]
            out[filled : filled + len(piece)] = piece
            filled += len(piece)
            shard += 1

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's next (x, y), both int64 (batch_size, seq_len) on CPU; y[:, t] is the token after x[:, t]."""
        B, T = self.batch_size, self.seq_len
        step = B * self.world_size
        # Decided only at step boundaries, with global sizes, so a state saved under another world
        # size or accumulation still resumes exactly.
        at_step_start = self._position % self.samples_per_step == 0
        if at_step_start and self._position + self.samples_per_step > self.num_samples:
            self._epoch += 1
            self._position = 0
            self._order = self._epoch_order(self._epoch)
        first = self._position + self.rank * B
        samples = self._order[first : first + B]
        self._position += step

        windows = np.empty((B, T + 1), dtype=np.uint32)  # (B, T+1)
        # One slice copy per row (not per token): a window is contiguous in the stream.
        for row, sample in enumerate(samples):
            self._read(int(sample) * T, windows[row])
        windows = torch.from_numpy(windows.astype(np.int64))
        return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()  # (B, T), (B, T)

    def __iter__(self) -> PretrainDataLoader:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.next_batch()

    def reset(self) -> None:
        """Back to the first batch of epoch 0, so every validation pass sees the same samples."""
        self._epoch = 0
        self._position = 0
        self._order = self._epoch_order(0)

    # ---- checkpointing ----

    def state_dict(self) -> dict:
        """Where the global order stands; the same on every rank, and independent of batch size and world size."""
        return {
            "split": self.split,
            "epoch": self._epoch,
            "position": self._position,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "shuffle": self.shuffle,
            "num_tokens": self.num_tokens,
            "tokenizer_sha256": self.tokenizer_sha256,
            "fingerprint": self.fingerprint,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue where `state` left off; refuse if the samples or their order would differ."""
        mine = self.state_dict()
        for key in ("split", "seq_len", "seed", "shuffle", "num_tokens", "tokenizer_sha256", "fingerprint"):
            if state.get(key) != mine[key]:
                raise DataError(
                    f"data loader state for {self.data_dir / 'manifest.json'} has {key}={state.get(key)!r} "
                    f"but this loader has {key}={mine[key]!r}; resuming would skip or repeat data"
                )
        epoch, position = state.get("epoch"), state.get("position")
        if not (isinstance(epoch, int) and epoch >= 0 and isinstance(position, int) and 0 <= position <= self.num_samples):
            raise DataError(
                f"data loader state has epoch={epoch!r} position={position!r}; "
                f"expected epoch >= 0 and 0 <= position <= {self.num_samples}"
            )
        self._epoch = epoch
        self._position = position
        self._order = self._epoch_order(epoch)
