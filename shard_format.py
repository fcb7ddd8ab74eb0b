"""The two on-disk formats of prepared data, defined once for the writers (the `load_*_dataset.py` scripts), the
loaders (dataloaders.py) and the tests.

    llama3-token-shards      pretraining: `train_000000.npy`, ... `val_000000.npy`, ...: 1-D uint32 token ids,
                             documents as [bos] + tokens + [eos], back to back
    llama3-sequence-shards   SFT ("chat") and DPO ("preference"): per shard `train_000000.tokens.npy` (uint32),
                             `.mask.npy` (uint8, 1 where a token is a training target, same length) and
                             `.offsets.npy` (int64: sequence j is tokens[offsets[j]:offsets[j+1]]); a preference
                             split holds pairs as sequences 2i (chosen) and 2i+1 (rejected)

Beside the shards: `manifest.json` (the contract: format, version, dtypes, tokenizer, splits and their shard
entries; read through `read_manifest`), `progress.json` while a preparation runs or resumes, `eval.jsonl` (chat
data: the held-out conversations as prompt and answer) and `reference_logps/` (preference data: the trainer's
precomputed reference log-probabilities, derived from the pairs).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from data_preparation_utils import write_json_atomic

TOKEN_FORMAT = "llama3-token-shards"
SEQUENCE_FORMAT = "llama3-sequence-shards"
VERSION = 1  # of both formats; a loader refuses any other
KINDS = ("chat", "preference")  # what a sequence-shards manifest's "kind" may be
TOKEN_DTYPE = np.uint32  # Llama 3's 128,256 ids need more than 16 bits
MASK_DTYPE = np.uint8
OFFSETS_DTYPE = np.int64
SPLITS = ("train", "val")

MANIFEST_FILE = "manifest.json"
PROGRESS_FILE = "progress.json"
EVAL_FILE = "eval.jsonl"  # chat data: {"messages": turns before the final answer, "answer": the final answer}
REFERENCE_LOGPS_DIR = "reference_logps"  # preference data: written by the trainer (stages.DPOStage)

# which script writes what, for the loaders' "no data here" errors
MAKE_DATA = {TOKEN_FORMAT: "run `python load_pretrain_dataset.py` first",
             "chat": "run `python load_instruct_dataset.py` first",
             "preference": "run `python load_dpo_dataset.py` first"}


class DataError(ValueError):
    """The data on disk cannot be used as asked. The message is one line naming the file and the fault."""


# ---- file names ---------------------------------------------------------------------------------


def token_shard_name(split: str, index: int) -> str:
    return f"{split}_{index:06d}.npy"


def sequence_shard_files(split: str, index: int) -> dict[str, str]:
    """A sequence shard's three files, keyed as its manifest entry names them."""
    stem = f"{split}_{index:06d}"
    return {"tokens": f"{stem}.tokens.npy", "mask": f"{stem}.mask.npy", "offsets": f"{stem}.offsets.npy"}


def pending_name(split: str, index: int) -> str:
    """Where a preparation keeps a split's tail between checkpoints until it becomes shard `index`."""
    return f"{split}_{index:06d}.pending"


def tokens_file(entry: dict) -> str:
    """The token ids' file of a shard entry of either format."""
    return entry["file"] if "file" in entry else entry["tokens"]


# ---- shard entries: what a manifest records per shard --------------------------------------------


def token_shard_entry(split: str, index: int, tokens: np.ndarray) -> dict:
    return {"file": token_shard_name(split, index), "num_tokens": int(len(tokens)), "max_token_id": int(tokens.max())}


def sequence_shard_sha256(tokens: np.ndarray, mask: np.ndarray, offsets: np.ndarray) -> str:
    """A sequence shard's content hash, recorded as its manifest entry's "sha256": the bytes of its tokens, mask
    and offsets as stored, in that order. What is derived from the data (DPO's precomputed reference
    log-probabilities) is keyed by it, so data prepared again under the same names and counts is told apart."""
    digest = hashlib.sha256()
    for array in (tokens, mask, offsets):
        digest.update(np.ascontiguousarray(array).data)
    return digest.hexdigest()


def sequence_shard_entry(split: str, index: int, tokens: np.ndarray, mask: np.ndarray, offsets: np.ndarray,
                         group_size: int) -> dict:
    """`group_size`: sequences per row of the data (2 for preference pairs, which the entry then counts)."""
    entry = {**sequence_shard_files(split, index), "num_sequences": len(offsets) - 1, "num_tokens": int(len(tokens)),
             "num_trained_tokens": int(mask.sum()), "max_token_id": int(tokens.max()),
             "sha256": sequence_shard_sha256(tokens, mask, offsets)}
    if group_size > 1:
        entry["num_pairs"] = entry["num_sequences"] // group_size
    return entry


# ---- the manifest -------------------------------------------------------------------------------


def build_token_manifest(tokenizer, shard_size: int, splits: dict, sources: list[dict], stats: dict,
                         created: str) -> dict:
    """Pretraining data: shard files, their sizes and the tokenizer they need."""
    return {
        "format": TOKEN_FORMAT,
        "version": VERSION,
        "dtype": np.dtype(TOKEN_DTYPE).name,
        "tokenizer": tokenizer.identity(),
        "bos_id": tokenizer.bos_id,
        "eos_id": tokenizer.eos_id,
        "shard_size": shard_size,
        "splits": splits,
        "sources": sources,
        "stats": stats,
        "created": created,
    }


def build_sequence_manifest(tokenizer, kind: str, max_seq_len: int, exact_answers: bool, shard_size: int,
                            settings: dict, splits: dict, sources: list[dict], stats: dict, created: str) -> dict:
    """SFT or DPO data; `exact_answers`: every held-out conversation's final answer is one exact string."""
    return {
        "format": SEQUENCE_FORMAT,
        "version": VERSION,
        "kind": kind,
        "dtype": np.dtype(TOKEN_DTYPE).name,
        "mask_dtype": np.dtype(MASK_DTYPE).name,
        "offsets_dtype": np.dtype(OFFSETS_DTYPE).name,
        "tokenizer": tokenizer.identity(),
        "bos_id": tokenizer.bos_id,
        "eos_id": tokenizer.eos_id,
        "eot_id": tokenizer.eot_id,
        "max_seq_len": max_seq_len,
        "exact_answers": exact_answers,
        "shard_size": shard_size,
        "settings": settings,
        "splits": splits,
        "sources": sources,
        "stats": stats,
        "created": created,
    }


def write_manifest(directory: Path, manifest: dict) -> None:
    write_json_atomic(directory / MANIFEST_FILE, manifest)


REQUIRED = ("format", "version", "dtype", "tokenizer", "splits")
SPLIT_FIELDS = {TOKEN_FORMAT: ("num_tokens", "shards"), SEQUENCE_FORMAT: ("shards",)}
SHARD_FIELDS = {TOKEN_FORMAT: ("file", "num_tokens"),
                SEQUENCE_FORMAT: ("tokens", "mask", "offsets", "num_sequences", "num_tokens")}
DTYPE_FIELDS = {"dtype": TOKEN_DTYPE, "mask_dtype": MASK_DTYPE, "offsets_dtype": OFFSETS_DTYPE}


@dataclass
class Manifest:
    """A checked manifest.json: the fields every loader needs, and the whole record in `data`."""

    path: Path
    format: str
    kind: Optional[str]  # sequence shards: "chat" or "preference"
    tokenizer: dict
    splits: dict
    data: dict

    def split(self, name: str) -> dict:
        if name not in self.splits:
            raise DataError(f"{self.path} has no split {name!r} (it has {sorted(self.splits)})")
        return self.splits[name]


def read_manifest(data_dir: Path, expected: str = TOKEN_FORMAT, kind: Optional[str] = None) -> Manifest:
    """Parse `manifest.json` and check it describes the format (and kind) the caller reads, with every field
    a loader uses; anything else raises DataError in one line saying what is wrong and how to make the data."""
    hint = MAKE_DATA[kind or expected]
    if not data_dir.is_dir():
        raise DataError(f"data directory {data_dir} does not exist; {hint}")
    path = data_dir / MANIFEST_FILE
    if not path.is_file():
        raise DataError(f"no {MANIFEST_FILE} in {data_dir}; {hint}")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{path} is not readable JSON ({e}); {hint}") from None
    if not isinstance(manifest, dict):
        raise DataError(f"{path} holds a JSON {type(manifest).__name__}, not an object; {hint}")
    for key in REQUIRED:
        if key not in manifest:
            raise DataError(f"{path} has no '{key}' entry; {hint}")
    if manifest["format"] != expected or manifest["version"] != VERSION:
        raise DataError(f"{path} is format {manifest['format']!r} version {manifest['version']!r}; "
                        f"this loader reads {expected!r} version {VERSION} ({hint})")
    if kind is not None and manifest.get("kind") != kind:
        raise DataError(f"{path} holds {manifest.get('kind')!r} data; this stage reads {kind!r} data ({hint})")
    for key, dtype in DTYPE_FIELDS.items():  # mask and offsets dtypes: sequence shards only
        if key in manifest and manifest[key] != np.dtype(dtype).name:
            raise DataError(f"{path} declares {key} {manifest[key]!r}; this loader reads {np.dtype(dtype).name}")
    _check_splits(path, manifest["splits"], expected, hint)
    return Manifest(path, expected, manifest.get("kind"), manifest["tokenizer"], manifest["splits"], manifest)


def _check_splits(path: Path, splits, fmt: str, hint: str) -> None:
    if not isinstance(splits, dict):
        raise DataError(f"{path}: 'splits' is a {type(splits).__name__}, expected an object of splits; {hint}")
    for name, split in splits.items():
        missing = [k for k in SPLIT_FIELDS[fmt] if not isinstance(split, dict) or k not in split]
        if missing:
            raise DataError(f"{path}: split {name!r} has no '{missing[0]}' entry; {hint}")
        for i, entry in enumerate(split["shards"]):
            missing = [k for k in SHARD_FIELDS[fmt] if not isinstance(entry, dict) or k not in entry]
            if missing:
                raise DataError(f"{path}: split {name!r} shard {i} has no '{missing[0]}' entry; {hint}")


# ---- integrity: shards as their entries describe them ----------------------------------------------


def open_array(path: Path, length: int, dtype: np.dtype, hint: str) -> np.ndarray:
    """Memory-map one .npy file and check it is the 1-D array of the dtype and length the manifest promises."""
    if not path.is_file():
        raise DataError(f"shard {path} listed in {MANIFEST_FILE} is missing; {hint}")
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise DataError(f"shard {path} is not a readable .npy file ({e}); {hint}") from None
    if array.dtype != dtype or array.ndim != 1:
        raise DataError(f"shard {path} holds {array.dtype} of shape {array.shape}; expected 1-D {np.dtype(dtype)}")
    if len(array) != length:
        raise DataError(f"shard {path} has {len(array)} entries but {MANIFEST_FILE} says {length} (truncated?)")
    return array


def open_token_shard(directory: Path, entry: dict, hint: str) -> np.ndarray:
    return open_array(directory / entry["file"], entry["num_tokens"], TOKEN_DTYPE, hint)


def open_sequence_shard(directory: Path, entry: dict, hint: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tokens, mask, offsets), tokens and mask memory-mapped, the offsets in memory and checked to split
    exactly the shard's tokens into its sequences."""
    tokens = open_array(directory / entry["tokens"], entry["num_tokens"], TOKEN_DTYPE, hint)
    mask = open_array(directory / entry["mask"], entry["num_tokens"], MASK_DTYPE, hint)
    offsets = np.asarray(open_array(directory / entry["offsets"], entry["num_sequences"] + 1, OFFSETS_DTYPE, hint))
    if offsets[0] != 0 or offsets[-1] != entry["num_tokens"] or np.any(np.diff(offsets) < 0):
        raise DataError(f"shard {directory / entry['offsets']} does not split its {entry['num_tokens']} tokens into "
                        f"{entry['num_sequences']} sequences (corrupt?)")
    return tokens, mask, offsets


def shard_is_intact(directory: Path, entry: dict) -> bool:
    """Whether a shard of either format (told apart by its entry) is on disk as its entry describes it."""
    try:
        if "file" in entry:
            open_token_shard(directory, entry, "")
        else:
            open_sequence_shard(directory, entry, "")
    except (DataError, KeyError, TypeError):
        return False
    return True
