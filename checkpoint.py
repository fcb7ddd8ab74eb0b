"""Reading and writing weights: this project's checkpoints, Meta's distribution format and Hugging Face Llama
directories. `WeightSource.open(path)` takes any of them, and a LoRA run's adapter checkpoint (merged onto its base
in memory), identifies it once and loads it; `load_model(path)` does both at once.

Project format: a `Checkpoint` record (weights, model shape, stage, tokenizer identity, provenance, and for step
checkpoints the training state), written by `Checkpoint.write` and read by `Checkpoint.read`, the one writer and
the one reader. On disk it is a torch.save'd dict with a format name and a version: files of a version this code
does not read are refused, naming it. Files are written to a temporary name and renamed, so a crash while saving
leaves the previous checkpoint intact.

Meta format: a directory with `params.json`, `consolidated.00.pth ... consolidated.NN.pth`
(model-parallel shards) and `tokenizer.model`. Shards are opened memory-mapped and merged one
tensor at a time into a model built on the meta device, so an 8B load holds about one copy
of the weights in memory.

Hugging Face format: a directory with `config.json` (a `LlamaForCausalLM`) and `model.safetensors`
or shards with `model.safetensors.index.json`; weights only, memory-mapped, converted from HF's
names and rotary row order by hf_names.py.

Files may come from anywhere, so nothing here unpickles arbitrary objects: `.pt` files load with
`weights_only=True`, Hugging Face weights only from safetensors. A file that cannot be used stops
with one line (CheckpointError) naming the file and what was expected.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import BinaryIO, Callable, Optional

import torch

from hf_names import from_hf_state_dict, hf_name
from model import ModelArgs, Transformer
from safetensors_io import SafetensorsError, load_sharded, write_atomically
from tokenizer import load_tokenizer

CHECKPOINT_FORMAT = "llama3-trainer-checkpoint"
FORMAT_VERSION = 1  # what this code writes
READABLE_VERSIONS = (1,)  # what it reads
EXPECTED = ("expected a checkpoint .pt written by train.py, a Meta-format directory (params.json + "
            "consolidated.NN.pth) or a Hugging Face Llama directory (config.json + model.safetensors)")

# Meta's model-parallel layout (fairscale): column-parallel weights are split along the output
# dimension (dim 0), row-parallel ones along the input dimension (dim 1); norms are replicated.
_ROW_PARALLEL = re.compile(r"attention\.wo\.weight$|feed_forward\.w2\.weight$")
_COLUMN_PARALLEL = re.compile(
    r"^tok_embeddings\.weight$|^output\.weight$|attention\.w[qkv]\.weight$|feed_forward\.w[13]\.weight$"
)

# Llama 3.2 1B and 3B: params.json says use_scaled_rope but gives no factor, so Meta's reference code
# applies 8, yet the models were trained with 32 (Hugging Face's configs say 32.0; llama-models issues
# #166 and #241). Recognised by shape; every other Llama 3.1-style model (3.1, 3.2 vision, 3.3) uses 8.
_LLAMA_3_2_SHAPES = {(2048, 16): "Llama 3.2 1B", (3072, 28): "Llama 3.2 3B"}


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and the problem."""


def checkpoint_kind(path: str | Path) -> str:
    """"meta", "hf" or "project" for a path load_model can read; otherwise one line saying what it is."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory; {EXPECTED}")
    if path.is_dir():
        if (path / "params.json").is_file():
            return "meta"
        if (path / "config.json").is_file():
            return "hf"
        inside = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())
        listing = ", ".join(inside[:6]) + (", ..." if len(inside) > 6 else "") if inside else "nothing"
        raise CheckpointError(f"{path}: a directory with neither params.json nor config.json "
                              f"(it holds {listing}); {EXPECTED}")
    if path.suffix == ".safetensors":
        raise CheckpointError(f"{path}: a lone safetensors file has no model shape; pass the Hugging Face "
                              f"directory that holds it and its config.json")
    return "project"


# ---- Meta format --------------------------------------------------------------------------------
def is_meta_checkpoint_dir(path: str | Path) -> bool:
    path = Path(path)
    return path.is_dir() and (path / "params.json").is_file()


def meta_rope_scale_factor(params: dict, explicit: Optional[float] = None) -> tuple[float, str]:
    """The rope scaling factor for a params.json and where it comes from: an explicit value, the file,
    the model family recognised by its shape, or Llama 3.1's 8."""
    if explicit is not None:
        return float(explicit), "given explicitly"
    for key in ("rope_scale_factor", "rope_scaling_factor"):
        if key in params:
            return float(params[key]), f"from params.json ({key})"
    family = _LLAMA_3_2_SHAPES.get((params.get("dim"), params.get("n_layers")))
    if family:
        shape = f"dim {params['dim']}, {params['n_layers']} layers"
        return 32.0, f"{family} by its shape ({shape}); params.json gives none"
    return 8.0, "Llama 3.1's; params.json gives none"


def _read_json(path: Path) -> dict:
    try:
        obj = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


def meta_model_args(ckpt_dir: Path, max_seq_len: int, rope_scale_factor: Optional[float] = None) -> ModelArgs:
    params = _read_json(Path(ckpt_dir) / "params.json")
    params["rope_scale_factor"] = meta_rope_scale_factor(params, rope_scale_factor)[0]
    try:
        return ModelArgs.from_dict(params, max_seq_len=max_seq_len)
    except (TypeError, AssertionError) as e:
        raise CheckpointError(f"{ckpt_dir}/params.json: not a Llama 3 shape ({e})") from None


def _meta_shard_paths(ckpt_dir: Path) -> list[Path]:
    paths = sorted(ckpt_dir.glob("consolidated.*.pth"))
    if not paths:
        raise CheckpointError(f"{ckpt_dir}: no consolidated.NN.pth weight files beside params.json")
    return paths


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
                         dtype: Optional[torch.dtype] = None, max_seq_len: int = 8192,
                         rope_scale_factor: Optional[float] = None) -> Transformer:
    """Load a Meta-format directory into a Transformer on `device` (dtype: the checkpoint's if None)."""
    ckpt_dir = Path(ckpt_dir)
    if not is_meta_checkpoint_dir(ckpt_dir):
        raise CheckpointError(f"{ckpt_dir}: not a Meta checkpoint directory (no params.json)")
    paths = _meta_shard_paths(ckpt_dir)
    args = meta_model_args(ckpt_dir, max_seq_len, rope_scale_factor)
    # weights_only: never unpickle arbitrary objects; mmap: the shards stay on disk until used.
    shards = [_torch_load(p) for p in paths]
    if "output.weight" not in shards[0]:
        args.tie_word_embeddings = True
    with torch.device("meta"):
        model = Transformer(args)
    expected = set(model.state_dict())
    missing = expected - set(shards[0])
    if missing - ({"output.weight"} if args.tie_word_embeddings else set()):
        raise CheckpointError(f"{paths[0]}: missing weights {sorted(missing)[:5]} for the shape in params.json")
    state = {key: _merge_shards(key, shards, args) for key in sorted(expected & set(shards[0]))}
    return _assign(model, state, device, dtype, f"{ckpt_dir}: weights do not fit params.json")


def _assign(model: Transformer, state: dict[str, torch.Tensor], device, dtype: Optional[torch.dtype],
            context: str) -> Transformer:
    """Move `state` into the meta-device `model` (tying output to the embedding where the shape says so)."""
    state = {k: v.to(device=device, dtype=dtype or v.dtype) for k, v in state.items()}
    if model.args.tie_word_embeddings:
        state["output.weight"] = state["tok_embeddings.weight"]
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        detail = [line.strip() for line in str(e).splitlines()[1:] if line.strip()]
        raise CheckpointError(f"{context}: {detail[0] if detail else e}") from None
    if model.args.tie_word_embeddings:
        model.output.weight = model.tok_embeddings.weight  # assign=True broke the tie
    return model.eval()


# ---- Hugging Face format ------------------------------------------------------------------------
def is_hf_model_dir(path: str | Path) -> bool:
    """A directory with a config.json (and no params.json, which would make it Meta's format)."""
    path = Path(path)
    return path.is_dir() and (path / "config.json").is_file() and not (path / "params.json").is_file()


def _hf_rope_args(path: Path, c: dict, explicit_factor: Optional[float]) -> dict:
    """ModelArgs' rope fields from config.json: legacy `rope_theta` + `rope_scaling` or transformers 5's
    `rope_parameters`, read in the order transformers reads them."""
    rope = c.get("rope_scaling") or c.get("rope_parameters") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "llama3"):
        raise CheckpointError(f"{path}: rope type {rope_type!r} is not supported (expected llama3 or none)")
    theta = float(c.get("rope_theta", rope.get("rope_theta", 10000.0)))
    if rope_type == "default":
        return dict(rope_theta=theta, use_scaled_rope=False)
    try:
        return dict(rope_theta=theta, use_scaled_rope=True,
                    rope_scale_factor=float(explicit_factor or rope["factor"]),
                    rope_low_freq_factor=float(rope["low_freq_factor"]),
                    rope_high_freq_factor=float(rope["high_freq_factor"]),
                    rope_original_max_seq_len=int(rope["original_max_position_embeddings"]))
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: rope scaling of type llama3 lacks a valid {e}") from None


def hf_model_args(directory: Path, max_seq_len: Optional[int] = None,
                  rope_scale_factor: Optional[float] = None) -> ModelArgs:
    """ModelArgs from a Hugging Face config.json, refusing anything our Llama would compute differently."""
    path = Path(directory) / "config.json"
    c = _read_json(path)
    archs = c.get("architectures") or []
    if c.get("model_type") != "llama" or archs not in ([], ["LlamaForCausalLM"]):
        raise CheckpointError(f"{path}: model_type {c.get('model_type')!r} ({', '.join(archs) or 'no architectures'})"
                              f" is not a Llama; expected model_type 'llama' and LlamaForCausalLM")
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
        if not isinstance(c.get(key), int):
            raise CheckpointError(f"{path}: {key} missing or not an integer")
    dim, n_heads, hidden = c["hidden_size"], c["num_attention_heads"], c["intermediate_size"]
    for key, default, supported in (("hidden_act", "silu", "silu"), ("attention_bias", False, False),
                                    ("mlp_bias", False, False), ("head_dim", None, dim // n_heads)):
        if c.get(key, default) not in (supported, None):
            raise CheckpointError(f"{path}: {key} is {c[key]!r}; this Llama supports only {supported!r}")
    try:
        return ModelArgs(
            dim=dim, n_layers=c["num_hidden_layers"], n_heads=n_heads,
            n_kv_heads=c.get("num_key_value_heads") or n_heads, vocab_size=c["vocab_size"],
            # Meta's FFN rule rounds int(ffn_dim_multiplier * int(8 * dim / 3)) up to a multiple of multiple_of;
            # these two values make it give exactly intermediate_size, whatever rule built the model.
            multiple_of=hidden, ffn_dim_multiplier=hidden / int(2 * (4 * dim) / 3),
            norm_eps=float(c.get("rms_norm_eps", 1e-6)), **_hf_rope_args(path, c, rope_scale_factor),
            max_seq_len=max_seq_len or int(c.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(c.get("tie_word_embeddings", False)))
    except AssertionError as e:
        raise CheckpointError(f"{path}: not a valid Llama shape ({e})") from None


def load_hf_model_dir(directory: str | Path, device: str | torch.device = "cpu",
                      dtype: Optional[torch.dtype] = None, max_seq_len: Optional[int] = None,
                      rope_scale_factor: Optional[float] = None) -> Transformer:
    """A Hugging Face `LlamaForCausalLM` directory (single or sharded safetensors) -> Transformer, weights only."""
    directory = Path(directory)
    args = hf_model_args(directory, max_seq_len, rope_scale_factor)
    with torch.device("meta"):
        model = Transformer(args)
    if not any(directory.glob("*.safetensors")) and any(directory.glob("pytorch_model*.bin")):
        raise CheckpointError(f"{directory}: holds pytorch_model.bin, which is never read (a pickle can run code); "
                              f"expected safetensors weights: re-save with save_pretrained(safe_serialization=True)")
    try:
        tensors = load_sharded(directory)
    except SafetensorsError as e:
        raise CheckpointError(str(e)) from None
    expected = {hf_name(k): v.shape for k, v in model.state_dict().items()}
    if args.tie_word_embeddings:
        expected.pop("lm_head.weight")
        tensors.pop("lm_head.weight", None)  # transformers may store the tied copy; the embedding is used
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(k for k in set(tensors) - set(expected) if not k.endswith("rotary_emb.inv_freq"))
    for problem, names in (("missing tensors", missing), ("tensors a Llama of this config does not have", extra)):
        if names:
            more = f" and {len(names) - 3} more" if len(names) > 3 else ""
            raise CheckpointError(f"{directory}: {problem}: {', '.join(names[:3])}{more}")
    for name, shape in expected.items():
        if tensors[name].shape != shape:
            raise CheckpointError(f"{directory}: {name} has shape {tuple(tensors[name].shape)}, "
                                  f"config.json implies {tuple(shape)}")
    state = from_hf_state_dict({k: tensors[k] for k in expected}, args)
    return _assign(model, state, device, dtype, f"{directory}: weights do not fit config.json")


# ---- project format: writing ----------------------------------------------------------------------
def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The bare Transformer under DDP (`module`) and torch.compile (`_orig_mod`) wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


class _AfterEachWrite:
    """A file that calls `after` once each write is done (torch.save writes a tensor's bytes in one write)."""

    def __init__(self, f: BinaryIO, after: Callable[[], None]):
        self.f, self.after = f, after

    def write(self, data) -> int:
        written = self.f.write(data)
        self.after()
        return written

    def flush(self) -> None:
        self.f.flush()


def atomic_torch_save(obj: dict, path: Path, after_each_write: Optional[Callable[[], None]] = None) -> None:
    """Write to a temporary file in the same directory, fsync, rename over `path`, and fsync the directory.
    `after_each_write`: called after each tensor is written (an offloaded run drops the store pages it read)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, lambda f: torch.save(obj, _AfterEachWrite(f, after_each_write) if after_each_write else f))
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


# ---- project format: the record -----------------------------------------------------------------------
@dataclass
class TrainingState:
    """What resuming a run needs besides the weights; a step checkpoint of train.py holds all of it."""
    step: int  # optimizer steps completed
    optimizer: Optional[dict] = None  # full (unsharded) optimizer state dict
    scaler: Optional[dict] = None  # the loss scaler's state
    dataloader: Optional[dict] = None  # the training loader's position
    rng: Optional[dict] = None  # train.rng_state()
    best_val_loss: float = float("inf")
    validations_without_improvement: int = 0
    wandb_run_id: Optional[str] = None
    config: Optional[dict] = None  # the run's Config.to_dict(), for the record
    world_size: Optional[int] = None
    tokens_per_step: Optional[int] = None


@dataclass
class Adapters:
    """A LoRA run's: `settings` as lora.LoRASettings.to_dict(); `base` the content reference of the weights the
    adapters go onto ({"path", "sha256", "files"}), None when there was no base file and the weights hold every
    tensor, the frozen base included."""
    settings: dict
    base: Optional[dict]


@dataclass
class Provenance:
    """Where the weights came from."""
    init: Optional[dict] = None  # the run's starting weights: {"path"} or a content reference; None: from scratch
    adapters: Optional[Adapters] = None  # a LoRA run: the weights are its adapters (see Adapters)
    merged_from: Optional[dict] = None  # `lora.py merge`: the adapters, base and settings merged into these weights


@dataclass
class Checkpoint:
    """This project's checkpoint. On disk: a flat dict (version 1), torch.save'd, whose keys are these fields'
    (`model` for the weights; the provenance's and training state's at the top level, `lora` and `base` for the
    adapters'); files written before the record existed are version 1 too, so they load as they are."""
    weights: dict[str, torch.Tensor]  # the unwrapped model's state dict (a LoRA run's: see Adapters)
    model_args: ModelArgs
    stage: str = "pretrain"  # the TRAINING_STAGE that wrote it (files without one are pretraining's)
    tokenizer: Optional[dict] = None  # Tokenizer.identity(): name, sha256, ...
    tokenizer_path: Optional[str] = None
    provenance: Provenance = field(default_factory=Provenance)
    training: Optional[TrainingState] = None  # None: weights only (merged, exported, hand-made)

    @property
    def resumable(self) -> bool:
        return self.training is not None

    def to_dict(self) -> dict:
        """The on-disk layout: every field present, so a resume restores exactly what was saved."""
        out = {"format": CHECKPOINT_FORMAT, "version": FORMAT_VERSION, "model_args": asdict(self.model_args),
               "model": self.weights, "stage": self.stage}
        out |= {k: v for k, v in (("tokenizer", self.tokenizer), ("tokenizer_path", self.tokenizer_path)) if v is not None}
        p = self.provenance
        if p.adapters is not None:
            out |= {"lora": p.adapters.settings, "base": p.adapters.base}
        if p.merged_from is not None:
            out["merged_from"] = p.merged_from
        if self.training is not None or p.init is not None:
            out["init"] = p.init
        if self.training is not None:  # not asdict: that deep-copies the optimizer's tensors
            out |= {f.name: getattr(self.training, f.name) for f in fields(TrainingState)}
        return out

    @classmethod
    def from_dict(cls, d: dict, where: str | Path = "checkpoint") -> "Checkpoint":
        """A version-1 dict (as read_checkpoint returns it) -> the record."""
        missing = [k for k in ("model", "model_args") if k not in d]
        if missing:
            raise CheckpointError(f"{where}: a checkpoint of this project without {' or '.join(missing)}")
        training = TrainingState(**{f.name: d[f.name] for f in fields(TrainingState) if f.name in d}) \
            if "step" in d else None
        adapters = Adapters(d["lora"], d.get("base")) if "lora" in d else None
        return cls(weights=d["model"], model_args=ModelArgs.from_dict(d["model_args"]), stage=d.get("stage", "pretrain"),
                   tokenizer=d.get("tokenizer"), tokenizer_path=d.get("tokenizer_path"),
                   provenance=Provenance(d.get("init"), adapters, d.get("merged_from")), training=training)

    @classmethod
    def read(cls, path: str | Path) -> "Checkpoint":
        return cls.from_dict(read_checkpoint(path), path)

    def write(self, path: str | Path, after_each_write: Optional[Callable[[], None]] = None) -> None:
        """Atomically: a crash while saving leaves the previous file at `path` intact."""
        atomic_torch_save(self.to_dict(), Path(path), after_each_write)


def read_checkpoint(path: str | Path) -> dict:
    """The file's dict as stored (Checkpoint.read gives the record), after checking it is this project's
    checkpoint in a version this code reads."""
    path = Path(path)
    if checkpoint_kind(path) != "project":
        raise CheckpointError(f"{path}: a directory; expected a checkpoint .pt written by train.py")
    ckpt = _torch_load(path)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        hint = " (a bare state dict: pass the Meta directory holding it and params.json)" \
            if isinstance(ckpt, dict) and ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()) else ""
        raise CheckpointError(f"{path}: a PyTorch file, but not a checkpoint written by this project{hint}")
    if ckpt.get("version") not in READABLE_VERSIONS:
        raise CheckpointError(f"{path}: checkpoint format version {ckpt.get('version')!r}; this code reads version "
                              f"{', '.join(map(str, READABLE_VERSIONS))} (a newer llama3-trainer wrote it?)")
    return ckpt


def save_checkpoint(path: Path, model: torch.nn.Module, model_state: Optional[dict] = None, **fields_) -> None:
    """Save the model's shape and weights plus any Checkpoint field given by its on-disk key (stage, tokenizer,
    step, optimizer, lora, base, ...): the record's writer for callers that hold a model.

    `model_state`: a full (unsharded) state dict gathered beforehand, as FSDP needs; by default
    the unwrapped model's own state_dict(), without `module.` or `_orig_mod.` prefixes.
    """
    bare = unwrap(model)
    known = {"stage", "tokenizer", "tokenizer_path", "init", "lora", "base", "merged_from",
             *(f.name for f in fields(TrainingState))}
    unknown = sorted(set(fields_) - known)
    if unknown:
        raise TypeError(f"save_checkpoint: {', '.join(unknown)} is not a checkpoint field ({', '.join(sorted(known))})")
    d = {"format": CHECKPOINT_FORMAT, "version": FORMAT_VERSION, "model_args": asdict(bare.args),
         "model": model_state if model_state is not None else bare.state_dict(), **fields_}
    Checkpoint.from_dict(d, path).write(path)


def _torch_load(path: Path):
    """torch.load without unpickling arbitrary objects, memory-mapped; failures as one line."""
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"PK\x03\x04":  # torch.save writes a zip archive
        raise CheckpointError(f"{path}: not a PyTorch checkpoint (torch.save writes a zip archive; this file "
                              f"starts with {magic!r}); {EXPECTED}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 -- torch raises many kinds, all meaning "unusable"
        if "Weights only load failed" in str(e):
            raise CheckpointError(f"{path}: refused: it holds Python objects other than tensors and plain data, "
                                  f"which are never unpickled (weights_only)") from None
        first_line = str(e).splitlines()[0][:160] if str(e) else ""
        raise CheckpointError(f"{path}: damaged or truncated ({type(e).__name__}: {first_line})") from None


# ---- any format: a weight source ----------------------------------------------------------------------------
_KIND_NAMES = {"meta": "a Meta-format directory", "hf": "a Hugging Face directory"}


class WeightSource:
    """Weights to start from, opened and identified once: a project checkpoint (its record read once), a LoRA
    adapter checkpoint, a Meta-format directory or a Hugging Face Llama directory. Everything a start asks (shape,
    stage, tokenizer, rope scaling, adapters) is answered from what was read at `open`."""

    def __init__(self, path: Path, kind: str, record: Optional[Checkpoint]):
        self.path, self.kind, self.record = path, kind, record
        self._handed_out = False  # the record's tensors went to a model: later models get copies
        self._meta_tied: Optional[bool] = None

    @classmethod
    def open(cls, path: str | Path) -> "WeightSource":
        kind = checkpoint_kind(path)
        return cls(Path(path), kind, Checkpoint.read(path) if kind == "project" else None)

    def close(self) -> None:
        """Let go of the record (its tensors, an optimizer's state) once the run holds what it needs of it."""
        self.record = None

    @property
    def stage(self) -> Optional[str]:
        """The stage that wrote a project checkpoint; None for Meta and Hugging Face directories."""
        return self.record.stage if self.record else None

    @property
    def resumable(self) -> bool:
        return self.record is not None and self.record.resumable

    @property
    def adapters(self) -> Optional[Adapters]:
        return self.record.provenance.adapters if self.record else None

    def describe(self) -> str:
        """'a sft checkpoint', 'a Meta-format directory', ...: what it is, for the start-up line."""
        return _KIND_NAMES.get(self.kind) or \
            f"a {self.stage} checkpoint{'' if self.resumable else ' without training state'}"

    def model_args(self, max_seq_len: Optional[int] = None, rope_scale_factor: Optional[float] = None) -> ModelArgs:
        """The shape (no weights read). max_seq_len: the context to build for (default: the source's; 8192 for
        Meta directories); rope_scale_factor: overrides whatever the source says or implies."""
        if self.kind == "meta":
            args = meta_model_args(self.path, max_seq_len or 8192, rope_scale_factor)
            if self._meta_tied is None:
                self._meta_tied = "output.weight" not in _torch_load(_meta_shard_paths(self.path)[0])
            args.tie_word_embeddings = self._meta_tied
            return args
        if self.kind == "hf":
            return hf_model_args(self.path, max_seq_len, rope_scale_factor)
        overrides = {"max_seq_len": max_seq_len, "rope_scale_factor": rope_scale_factor}
        return replace(self.record.model_args, **{k: v for k, v in overrides.items() if v is not None})

    @property
    def saved_max_seq_len(self) -> Optional[int]:
        """The context a project checkpoint was trained at; None for directories (theirs is a publication's)."""
        return self.record.model_args.max_seq_len if self.record else None

    def rope_note(self, rope_scale_factor: Optional[float] = None) -> Optional[str]:
        """One line saying which rope scaling factor load_model(rope_scale_factor=...) uses and why, for callers
        to print; None when the model has no rope scaling."""
        if self.kind == "meta":  # from params.json alone: the shards need not be opened
            params = _read_json(self.path / "params.json")
            factor, source = meta_rope_scale_factor(params, rope_scale_factor)
            scaled = bool(params.get("use_scaled_rope"))
        else:
            args = self.model_args(rope_scale_factor=rope_scale_factor)
            factor, scaled = args.rope_scale_factor, args.use_scaled_rope
            source = "given explicitly" if rope_scale_factor is not None else \
                "from config.json" if self.kind == "hf" else "from the checkpoint"
        return f"rope scaling factor {factor:g} ({source})" if scaled else None

    def load_model(self, device: str | torch.device = "cpu", dtype: Optional[torch.dtype] = None,
                   max_seq_len: Optional[int] = None, rope_scale_factor: Optional[float] = None) -> Transformer:
        """The Transformer in eval mode (dtype: as stored if None), weights only.

        A LoRA adapter checkpoint gives its base (checked against the content hash it records) with the adapters
        merged in memory, as PEFT's merge_and_unload does; a base that is itself an adapter checkpoint (a LoRA run
        started from another's adapters) is read the same way, so every earlier update is merged in order."""
        if self.kind == "meta":
            return load_meta_checkpoint(self.path, device, dtype, max_seq_len or 8192, rope_scale_factor)
        if self.kind == "hf":
            return load_hf_model_dir(self.path, device, dtype, max_seq_len, rope_scale_factor)
        record = self.record
        if self._handed_out:  # the first model may train its tensors in place
            record = replace(record, weights={k: v.clone() for k, v in record.weights.items()})
        self._handed_out = True
        if record.provenance.adapters is not None:
            import lora  # here: lora.py builds on this module

            try:
                adapted = lora.adapted_model(record, self.path, device=device, dtype=dtype, max_seq_len=max_seq_len,
                                             rope_scale_factor=rope_scale_factor)
            except lora.LoRAError as e:
                raise CheckpointError(f"{self.path}: {e}") from None
            return lora.merge_lora(adapted).eval()
        with torch.device("meta"):
            model = Transformer(self.model_args(max_seq_len, rope_scale_factor))
        return _assign(model, dict(record.weights), device, dtype, f"{self.path}: weights do not fit its model_args")

    # -- the tokenizer the weights were trained with --
    def tokenizer_path(self) -> Optional[str]:
        """Meta directories carry their own tokenizer.model, Hugging Face directories a tokenizer.json; project
        checkpoints record the one used (None when that file no longer exists)."""
        if self.kind == "meta":
            return str(self.path / "tokenizer.model") if (self.path / "tokenizer.model").is_file() else None
        if self.kind == "hf":
            return str(self.path) if (self.path / "tokenizer.json").is_file() else None
        recorded = self.record.tokenizer_path or None
        return recorded if recorded and Path(recorded).exists() else None

    def check_tokenizer(self, tokenizer, where: Optional[str] = None) -> Optional[str]:
        """Weights only mean something with the tokenizer they were trained with: same ids for the same text.

        A project checkpoint records its tokenizer's sha256, which must be `tokenizer`'s; a Meta or Hugging Face
        directory carries its tokenizer file, which must give every id of `tokenizer` the same bytes (its sha256
        may differ: a tokenizer.json exported from a tokenizer.model reads ids the same way). CheckpointError (one
        line, starting with `where`, default the path) when they differ; a one-line note when it carries none."""
        where = where or str(self.path)
        fix = "set TOKENIZER_PATH to the tokenizer these weights were trained with (and prepare the data with it)"
        if self.record is not None:
            recorded = (self.record.tokenizer or {}).get("sha256")
            if recorded is None:
                return f"{where} records no tokenizer; assuming it was trained with the run's ({tokenizer.path})"
            if recorded != tokenizer.identity()["sha256"]:
                raise CheckpointError(f"{where}: trained with another tokenizer ({self.record.tokenizer_path or '?'}, "
                                      f"sha256 {recorded[:12]}) than the run's ({tokenizer.path}, sha256 "
                                      f"{tokenizer.identity()['sha256'][:12]}); {fix}")
            return None
        carried = self.tokenizer_path()
        if carried is None:
            return f"{where} carries no tokenizer; assuming it was trained with the run's ({tokenizer.path})"
        try:
            theirs = load_tokenizer(carried)
        except (ValueError, OSError) as e:
            raise CheckpointError(f"{where}: its tokenizer {carried} cannot be read as a Llama 3 tokenizer "
                                  f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
        if theirs.identity()["sha256"] == tokenizer.identity()["sha256"]:
            return None
        ours, other = _token_bytes(tokenizer), _token_bytes(theirs)
        other += [None] * (len(ours) - len(other))
        differ = [i for i, b in enumerate(ours) if other[i] != b]
        if differ:
            i = differ[0]
            raise CheckpointError(f"{where}: its tokenizer ({theirs.path}) gives {len(differ)} of the run's "
                                  f"{len(ours)} token ids other bytes than the run's ({tokenizer.path}), e.g. id {i}: "
                                  f"{other[i]!r} there, {ours[i]!r} here; {fix}")
        return None

    def checked_tokenizer(self, tokenizer_override: Optional[str | Path] = None):
        """The tokenizer for these weights: `tokenizer_override`, else the one it records or carries, else Meta's
        default. A project checkpoint records the sha256 of the tokenizer it was trained with; whichever one is
        picked must match it, or CheckpointError names both."""
        tokenizer = load_tokenizer(tokenizer_override or self.tokenizer_path())
        if self.record is None:
            return tokenizer  # Meta and HF directories record no tokenizer hash
        want, got = (self.record.tokenizer or {}).get("sha256"), tokenizer.identity()["sha256"]
        if want and want != got:
            recorded = self.record.tokenizer_path or self.record.tokenizer.get("name", "?")
            gone = "" if Path(recorded).exists() else ", no longer there"
            raise CheckpointError(f"{self.path} was trained with tokenizer {recorded} (sha256 {want[:12]}{gone}) but "
                                  f"{tokenizer.path} has sha256 {got[:12]}; pass the original with --tokenizer")
        return tokenizer


def _token_bytes(tokenizer) -> list[Optional[bytes]]:
    """Each id's bytes (None for an id the tokenizer lacks): two tokenizers with equal tables read the same ids
    as the same text."""
    table = []
    for i in range(tokenizer.n_words):
        try:
            table.append(tokenizer.decode_token_bytes(i))
        except (KeyError, ValueError):
            table.append(None)
    return table


# The same questions for callers that ask one of them once (generate.py, serve.py, hf_convert.py, tests).
def load_model(path: str | Path, device: str | torch.device = "cpu", dtype: Optional[torch.dtype] = None,
               max_seq_len: Optional[int] = None, rope_scale_factor: Optional[float] = None) -> Transformer:
    """A project checkpoint file, a LoRA adapter checkpoint, a Meta-format directory or a Hugging Face Llama
    directory -> Transformer in eval mode (WeightSource.load_model)."""
    return WeightSource.open(path).load_model(device, dtype, max_seq_len, rope_scale_factor)


def model_args_for(path: str | Path, max_seq_len: Optional[int] = None,
                   rope_scale_factor: Optional[float] = None) -> ModelArgs:
    return WeightSource.open(path).model_args(max_seq_len, rope_scale_factor)


def rope_scaling_note(path: str | Path, rope_scale_factor: Optional[float] = None) -> Optional[str]:
    return WeightSource.open(path).rope_note(rope_scale_factor)


def tokenizer_path_for(path: str | Path) -> Optional[str]:
    return WeightSource.open(path).tokenizer_path()


def check_trained_tokenizer(path: str | Path, tokenizer, where: Optional[str] = None) -> Optional[str]:
    return WeightSource.open(path).check_tokenizer(tokenizer, where)


def checked_tokenizer(path: str | Path, tokenizer_override: Optional[str | Path] = None):
    return WeightSource.open(path).checked_tokenizer(tokenizer_override)

# ---- hub names -----------------------------------------------------------------------------------
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def local_model_path(name_or_path: str) -> str:
    """A local path as it is; a Hugging Face hub name ("meta-llama/Llama-3.2-1B") that is not a local path is
    downloaded once into the hub's cache (weights, config and tokenizer files only) and its directory returned.
    Needs the network (and for gated models a token, as `huggingface-cli login` stores it)."""
    if Path(name_or_path).exists() or not _HUB_NAME.match(name_or_path):
        return name_or_path
    from huggingface_hub import snapshot_download  # installed with `datasets`

    try:
        return snapshot_download(name_or_path, allow_patterns=["*.json", "*.safetensors", "tokenizer*"])
    except Exception as e:  # offline, unknown repository, gated without a token
        raise CheckpointError(f"{name_or_path}: not a local path, and downloading it from the Hugging Face hub "
                              f"failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
