"""Reading and writing weights: Meta's distribution format and this project's training checkpoints.

Meta format: a directory with `params.json`, `consolidated.00.pth ... consolidated.NN.pth`
(model-parallel shards) and `tokenizer.model`. Shards are opened memory-mapped and merged one
tensor at a time into a model built on the meta device, so an 8B load holds about one copy
of the weights in memory.

Project format: one `.pt` file holding the unwrapped model's state dict, the model shape, and
(for training checkpoints) optimizer, step, data-loader and RNG state. Files are written to a
temporary name and renamed, so a crash while saving leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import torch

from model import ModelArgs, Transformer

CHECKPOINT_FORMAT = "llama3-trainer-checkpoint"

# Meta's model-parallel layout (fairscale): column-parallel weights are split along the output
# dimension (dim 0), row-parallel ones along the input dimension (dim 1); norms are replicated.
_ROW_PARALLEL = re.compile(r"attention\.wo\.weight$|feed_forward\.w2\.weight$")
_COLUMN_PARALLEL = re.compile(
    r"^tok_embeddings\.weight$|^output\.weight$|attention\.w[qkv]\.weight$|feed_forward\.w[13]\.weight$"
)


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and the problem."""


# ---- Meta format --------------------------------------------------------------------------------
def is_meta_checkpoint_dir(path: str | Path) -> bool:
    path = Path(path)
    return path.is_dir() and (path / "params.json").is_file()


def meta_model_args(ckpt_dir: Path, max_seq_len: int) -> ModelArgs:
    params = json.loads((ckpt_dir / "params.json").read_text())
    # Meta's reference code applies rope scaling with factor 8 unless params.json says otherwise.
    if "rope_scaling_factor" in params:
        params["rope_scale_factor"] = params.pop("rope_scaling_factor")
    return ModelArgs.from_dict(params, max_seq_len=max_seq_len)


def _merge_shards(key: str, shards: list[dict[str, torch.Tensor]], args: ModelArgs) -> torch.Tensor:
    tensors = [s[key] for s in shards]
    if len(tensors) == 1 or _ROW_PARALLEL.search(key) is None and _COLUMN_PARALLEL.search(key) is None:
        return tensors[0]
    if _ROW_PARALLEL.search(key):
        return torch.cat(tensors, dim=1)
    if re.search(r"attention\.w[kv]\.weight$", key) and len(tensors) > args.n_kv_heads:
        # With more shards than kv heads Meta repeats each kv head on consecutive shards: keep one.
        tensors = tensors[:: len(tensors) // args.n_kv_heads]
    return torch.cat(tensors, dim=0)


def load_meta_checkpoint(ckpt_dir: str | Path, device: str | torch.device = "cpu",
                         dtype: Optional[torch.dtype] = None, max_seq_len: int = 8192) -> Transformer:
    """Load a Meta-format directory into a Transformer on `device` (dtype: the checkpoint's if None)."""
    ckpt_dir = Path(ckpt_dir)
    if not is_meta_checkpoint_dir(ckpt_dir):
        raise CheckpointError(f"{ckpt_dir}: not a Meta checkpoint directory (no params.json)")
    paths = sorted(ckpt_dir.glob("consolidated.*.pth"))
    if not paths:
        raise CheckpointError(f"{ckpt_dir}: no consolidated.NN.pth weight files")
    args = meta_model_args(ckpt_dir, max_seq_len)
    # weights_only: never unpickle arbitrary objects; mmap: the shards stay on disk until used.
    shards = [torch.load(p, map_location="cpu", weights_only=True, mmap=True) for p in paths]
    if "output.weight" not in shards[0]:
        args.tie_word_embeddings = True
    with torch.device("meta"):
        model = Transformer(args)
    expected = set(model.state_dict())
    missing = expected - set(shards[0])
    if missing - ({"output.weight"} if args.tie_word_embeddings else set()):
        raise CheckpointError(f"{paths[0]}: missing weights {sorted(missing)[:5]} for the shape in params.json")
    state = {}
    for key in sorted(expected & set(shards[0])):
        tensor = _merge_shards(key, shards, args)
        state[key] = tensor.to(device=device, dtype=dtype or tensor.dtype)
    if args.tie_word_embeddings:
        state["output.weight"] = state["tok_embeddings.weight"]
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        raise CheckpointError(f"{ckpt_dir}: weights do not fit params.json: {str(e).splitlines()[1].strip()}") from None
    if args.tie_word_embeddings:
        model.output.weight = model.tok_embeddings.weight  # assign=True broke the tie
    return model.eval()


# ---- project format -----------------------------------------------------------------------------
def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The bare Transformer under DDP (`module`) and torch.compile (`_orig_mod`) wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def atomic_torch_save(obj: dict, path: Path) -> None:
    """Write to a temporary file in the same directory, fsync, then rename over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def save_checkpoint(path: Path, model: torch.nn.Module, model_state: Optional[dict] = None, **extra) -> None:
    """Save the model's shape and weights plus any training state passed in `extra`.

    `model_state`: a full (unsharded) state dict gathered beforehand, as FSDP needs; by default
    the unwrapped model's own state_dict(), without `module.` or `_orig_mod.` prefixes.
    """
    bare = unwrap(model)
    atomic_torch_save(
        {"format": CHECKPOINT_FORMAT, "version": 1, "model_args": asdict(bare.args),
         "model": model_state if model_state is not None else bare.state_dict(), **extra},
        path,
    )


def read_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # truncated or not a torch file
        raise CheckpointError(f"{path}: cannot be read as a checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not a checkpoint written by this project")
    return ckpt


def load_model(path: str | Path, device: str | torch.device = "cpu", dtype: Optional[torch.dtype] = None,
               max_seq_len: Optional[int] = None) -> Transformer:
    """A Meta-format directory or a project checkpoint file -> Transformer in eval mode."""
    if is_meta_checkpoint_dir(path):
        return load_meta_checkpoint(path, device, dtype, max_seq_len=max_seq_len or 8192)
    ckpt = read_checkpoint(path)
    args = ModelArgs.from_dict(ckpt["model_args"], **({"max_seq_len": max_seq_len} if max_seq_len else {}))
    with torch.device("meta"):
        model = Transformer(args)
    state = {k: v.to(device=device, dtype=dtype or v.dtype) for k, v in ckpt["model"].items()}
    model.load_state_dict(state, strict=True, assign=True)
    if args.tie_word_embeddings:
        model.output.weight = model.tok_embeddings.weight
    return model.eval()


def tokenizer_path_for(path: str | Path) -> Optional[str]:
    """Meta directories carry their own tokenizer.model; project checkpoints record the one used."""
    path = Path(path)
    if is_meta_checkpoint_dir(path) and (path / "tokenizer.model").is_file():
        return str(path / "tokenizer.model")
    if path.is_file():
        recorded = read_checkpoint(path).get("tokenizer_path") or None
        return recorded if recorded and Path(recorded).exists() else None
    return None
