"""Low-rank adapters (LoRA) for the Transformer's block linears, adapter checkpoints, and merging.

A frozen linear y = W x becomes

    y = W x + (alpha / r) * B A dropout(x)        W: (out, in), A: (r, in), B: (out, r)

Only A and B train: r * (in + out) numbers instead of in * out. B starts at zero, so the adapted
model starts as the base model exactly. The update B A has rank r; scaling it by alpha / r keeps
its size about the same when r changes, so a new rank needs little retuning (Hu et al. 2021, 4.1).
A draws from a Kaiming-uniform distribution as PEFT's (and nn.Linear's) default. Dropout applies
to the adapter's input only; the frozen path sees x as it is. The update is never added to W in
the forward pass (that would build an (out, in) matrix per call); `merge_lora` folds it in once.

Targets are the block linears by Meta's names: wq, wk, wv, wo (attention), w1, w2, w3 (SwiGLU).
The output layer takes no adapter: the chunked loss reads `output.weight` directly.

From the trainer, three calls that each do their whole part (`settings = LoRASettings.from_config(cfg)`):

    model = with_new_adapters(base_model, settings, seed)      # a start: fresh adapters on loaded weights
    model = resumed_adapted_model(record, settings, device, n)  # a resume: base checked by hash, adapters loaded
    weights, adapters = adapter_weights(model, settings, base)  # saving: the record's weights and Adapters

The first two build the bare model, before DDP / fully_shard / compile / the optimizer, which then takes the
parameters that require grad (the adapters); under FSDP every rank calls adapter_weights (it gathers). DPO's reference is the same module with adapters off (no second
copy of the weights), under no_grad: `with adapters_disabled(model), torch.no_grad(): ...`. Errors are LoRAError
(a ValueError) with a one-line message.

An adapter checkpoint is a project checkpoint (checkpoint.Checkpoint) whose weights are only the adapter
tensors and whose provenance carries `Adapters(settings, base)`, the base recorded by content hash; when the
base weights came from no file (LoRA from scratch), base is None and the weights hold every tensor.
`adapted_model` rebuilds the adapted model from such a record; checkpoint.load_model (and so every tool) reads
an adapter checkpoint as its base with the adapters merged in memory; `python lora.py merge` writes that merged
model once, as a plain checkpoint:

    python lora.py merge --checkpoint ADAPTERS.pt [--base BASE] --out MERGED.pt [--overwrite]

Works under DDP without find_unused_parameters (every adapter is used in every forward), under
FSDP2 (frozen and trainable parameters in one group), with torch.compile (switching adapters off
recompiles once), with autocast and with activation checkpointing (dropout masks are replayed).
"""

from __future__ import annotations

import argparse
import hashlib
import math
import re
import sys
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from checkpoint import Adapters, Checkpoint, CheckpointError, Provenance, load_model, unwrap
from model import ModelArgs, Transformer
from speedups import exit_without_teardown

VALID_TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
_BLOCK_LINEAR = re.compile(r"^layers\.\d+\.(attention\.w[qkvo]|feed_forward\.w[123])$")
_ADAPTER_KEY = re.compile(r"\.lora_[ab]\.weight$")
_HASH_CHUNK = 16 << 20  # bytes read at a time while hashing base weights


class LoRAError(ValueError):
    """Adapters that cannot be applied, loaded or merged as asked; the message is one line."""


# ---- settings ---------------------------------------------------------------------------------------
def _valid_names() -> str:
    return ", ".join(VALID_TARGETS)


def parse_target_modules(text: str) -> list[str]:
    """`wq,wk,w1` or the original project's JSON-ish `["wq", "wk", "w1"]` -> names in canonical order."""
    inner = text.strip()
    if inner.startswith("[") and inner.endswith("]"):
        inner = inner[1:-1]
    names = [part.strip().strip("\"'").strip() for part in inner.split(",")]
    names = [n for n in names if n]
    unknown = [n for n in names if n not in VALID_TARGETS]
    if unknown or not names:
        what = f"unknown module(s) {', '.join(unknown)}" if unknown else "names no module"
        raise LoRAError(f"LORA_TARGET_MODULES={text!r}: {what}; valid names: {_valid_names()} "
                        "(the output layer takes no adapter)")
    return [n for n in VALID_TARGETS if n in names]


@dataclass(frozen=True)
class LoRASettings:
    """What an adapter checkpoint records; the defaults are the .env defaults."""

    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    targets: tuple[str, ...] = VALID_TARGETS

    def __post_init__(self):
        if not (isinstance(self.rank, int) and self.rank >= 1):
            raise LoRAError(f"LoRA rank {self.rank!r}: expected a positive integer")
        if not self.alpha > 0:
            raise LoRAError(f"LoRA alpha {self.alpha!r}: expected a number > 0")
        if not 0 <= self.dropout < 1:
            raise LoRAError(f"LoRA dropout {self.dropout!r}: expected a number in [0, 1)")
        parse_target_modules(",".join(self.targets))  # raises on unknown names

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @classmethod
    def from_config(cls, cfg) -> "LoRASettings":
        return cls(int(cfg.lora_rank), float(cfg.lora_alpha), float(cfg.lora_dropout),
                   tuple(parse_target_modules(cfg.lora_target_modules)))

    def to_dict(self) -> dict:
        return {**asdict(self), "targets": list(self.targets)}

    @classmethod
    def from_dict(cls, d: dict) -> "LoRASettings":
        missing = [k for k in ("rank", "alpha", "dropout", "targets") if k not in d]
        if missing:
            raise LoRAError(f"LoRA settings lack {', '.join(missing)}: expected rank, alpha, dropout, targets")
        return cls(int(d["rank"]), float(d["alpha"]), float(d["dropout"]),
                   tuple(parse_target_modules(",".join(d["targets"]))))


def check_settings_match(saved: dict, settings: LoRASettings) -> None:
    """A checkpoint's adapters only fit (and mean the same) with the same rank, alpha and targets:
    a changed alpha would silently rescale every update. Dropout may change."""
    old = LoRASettings.from_dict(saved)
    def differs(field: str) -> bool:  # the order targets are listed in means nothing
        a, b = getattr(old, field), getattr(settings, field)
        return set(a) != set(b) if field == "targets" else a != b

    diffs = [f"{key} {_show(getattr(old, field))} in the checkpoint, {_show(getattr(settings, field))} now"
             for field, key in (("rank", "LORA_RANK"), ("alpha", "LORA_ALPHA"), ("targets", "LORA_TARGET_MODULES"))
             if differs(field)]
    if diffs:
        raise LoRAError("LoRA settings differ from the checkpoint's: " + "; ".join(diffs))


def _show(value) -> str:
    return ",".join(value) if isinstance(value, tuple) else str(value)


# ---- the adapter module -----------------------------------------------------------------------------
class LoRALinear(nn.Module):
    """A bias-free linear with a frozen weight and a trainable low-rank update (see the module doc).

    `weight` is the wrapped nn.Linear's own Parameter (no copy; its state-dict key is unchanged);
    the adapters are `lora_a` (rank x in) and `lora_b` (out x rank). Adapters are kept in float32
    (float64 for a float64 base) like PEFT's, so a bf16 base still trains float32 adapters; the
    adapter path casts its input to that dtype and its output back.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float):
        super().__init__()
        if base.bias is not None:
            raise LoRAError("LoRALinear wraps bias-free linears only (the Llama blocks have no biases)")
        out_features, in_features = base.weight.shape
        self.weight = base.weight
        self.weight.requires_grad_(False)
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        dtype = torch.promote_types(base.weight.dtype, torch.float32)
        # Built on the meta device and then materialised, so construction draws no random numbers
        # that reset_adapters would overwrite anyway.
        self.lora_a = nn.Linear(in_features, rank, bias=False, device="meta", dtype=dtype)
        self.lora_b = nn.Linear(rank, out_features, bias=False, device="meta", dtype=dtype)
        self.lora_a.to_empty(device=base.weight.device)
        self.lora_b.to_empty(device=base.weight.device)
        self.disabled = False  # True: compute the base linear alone (adapters_disabled)
        self.reset_adapters()

    @torch.no_grad()
    def reset_adapters(self) -> None:
        nn.init.kaiming_uniform_(self.lora_a.weight, a=math.sqrt(5))  # PEFT's default init of A
        nn.init.zeros_(self.lora_b.weight)  # B = 0: the update starts at zero

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight)  # (..., out), as the wrapped nn.Linear computed it
        if self.disabled:
            return out
        a = self.dropout(x.to(self.lora_a.weight.dtype))
        update = self.lora_b(self.lora_a(a)) * self.scale  # (..., rank) -> (..., out)
        return out + update.to(out.dtype)

    @torch.no_grad()
    def merged_linear(self) -> nn.Linear:
        """A plain nn.Linear holding W + scale * B A, summed in float32 and cast to W's dtype."""
        w = self.weight
        delta = self.lora_b.weight.float() @ self.lora_a.weight.float()  # (out, rank) @ (rank, in)
        linear = nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")
        linear.weight = nn.Parameter((w.float() + self.scale * delta).to(w.dtype))
        return linear

    def extra_repr(self) -> str:
        out_features, in_features = self.weight.shape
        return (f"in_features={in_features}, out_features={out_features}, rank={self.rank}, alpha={self.alpha}, "
                f"disabled={self.disabled}")


def is_adapter_key(name: str) -> bool:
    """True for adapter parameter names (`...wq.lora_a.weight`); filters a gathered full state dict too."""
    return _ADAPTER_KEY.search(name) is not None


def lora_modules(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    return [(n, m) for n, m in unwrap(model).named_modules() if isinstance(m, LoRALinear)]


# ---- applying, switching, merging ------------------------------------------------------------------
def apply_lora(model: nn.Module, settings: LoRASettings) -> list[str]:
    """Wrap the target linears of every block in place, freeze everything else; returns their names.

    Call it on the bare model before DDP, fully_shard, torch.compile and the optimizer are built.
    A is drawn from the global RNG, in module order, so equally seeded ranks get equal adapters.
    """
    model = unwrap(model)
    if lora_modules(model):
        raise LoRAError("the model already has adapters; apply_lora once per model")
    if any(isinstance(p, DTensor) for p in model.parameters()):
        raise LoRAError("apply_lora: the model is already sharded; apply adapters before fully_shard")
    wrapped = []
    for name, module in list(model.named_modules()):
        parent_name, _, leaf = name.rpartition(".")
        if leaf in settings.targets and _BLOCK_LINEAR.match(name) and isinstance(module, nn.Linear):
            adapter = LoRALinear(module, settings.rank, settings.alpha, settings.dropout)
            setattr(model.get_submodule(parent_name), leaf, adapter)
            wrapped.append(name)
    unmatched = [t for t in settings.targets if not any(n.endswith("." + t) for n in wrapped)]
    if unmatched:
        raise LoRAError(f"LoRA target(s) {', '.join(unmatched)} match no linear layer of the model's blocks; "
                        f"valid names: {_valid_names()}")
    for name, p in model.named_parameters():  # a tied embedding/output weight is listed once, frozen once
        p.requires_grad_(is_adapter_key(name))
    return wrapped


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Inside, the model computes exactly the base model (no adapter, no dropout); then as before."""
    layers = [m for _, m in lora_modules(model)]
    if not layers:
        raise LoRAError("adapters_disabled: the model has no adapters")
    before = [m.disabled for m in layers]
    for m in layers:
        m.disabled = True
    try:
        yield
    finally:
        for m, state in zip(layers, before):
            m.disabled = state


@torch.no_grad()
def merge_lora(model: nn.Module) -> Transformer:
    """In place: every LoRALinear becomes a plain nn.Linear with W + scale * B A. Returns the bare
    model, a plain Transformer whose parameters all require grad again, like any loaded model."""
    model = unwrap(model)
    for name, module in lora_modules(model):
        if isinstance(module.weight, DTensor):
            raise LoRAError("merge_lora: merge the unsharded model (load it without FSDP)")
        parent_name, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent_name), leaf, module.merged_linear())
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; a tied weight counts once, a sharded one at full size."""
    params = list(unwrap(model).parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


# ---- adapter state ------------------------------------------------------------------------------------
def _full_cpu(t: torch.Tensor, copy: bool) -> torch.Tensor:
    """A full plain tensor on CPU; under FSDP gathering a DTensor is collective (every rank calls)."""
    if isinstance(t, DTensor):
        t = t.full_tensor()
    return t.detach().to("cpu", copy=copy)


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of the adapter tensors (small), with the bare model's names, on CPU; later training steps do
    not change it. Under FSDP call it on every rank."""
    return {k: _full_cpu(v, copy=True) for k, v in unwrap(model).state_dict().items() if is_adapter_key(k)}


@torch.no_grad()
def load_lora_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy adapter tensors into the model's adapters; every adapter must be given, nothing else."""
    params = {k: p for k, p in unwrap(model).named_parameters() if is_adapter_key(k)}
    missing, unexpected = sorted(set(params) - set(state)), sorted(set(state) - set(params))
    if missing or unexpected:
        parts = ([f"missing {len(missing)} adapter tensor(s) such as {missing[0]}"] if missing else []) + \
                ([f"{len(unexpected)} unexpected tensor(s) such as {unexpected[0]}"] if unexpected else [])
        raise LoRAError("adapter weights do not fit the model's adapters: " + "; ".join(parts))
    for key, p in params.items():
        value = state[key]
        if tuple(value.shape) != tuple(p.shape):
            raise LoRAError(f"adapter {key}: shape {tuple(value.shape)} in the weights, {tuple(p.shape)} in the model")
        if isinstance(p, DTensor):  # sharded under FSDP: every rank holds the full tensor, keeps its shard
            value = distribute_tensor(value.to(device=p.device, dtype=p.dtype), p.device_mesh, p.placements)
        p.copy_(value)


# ---- base weights: a content hash ---------------------------------------------------------------------
def base_weight_files(path: str | Path) -> list[Path]:
    """The files holding a base model's weights, in name order."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise LoRAError(f"base weights not found: {path}")
    if (path / "params.json").is_file():
        files = sorted(path.glob("consolidated.*.pth"))
    elif (path / "config.json").is_file():
        files = sorted(path.glob("*.safetensors"))
    else:
        raise LoRAError(f"{path}: not a base model; expected a checkpoint file, a Meta directory (params.json + "
                        "consolidated.*.pth) or a Hugging Face directory (config.json + *.safetensors)")
    if not files:
        raise LoRAError(f"{path}: holds no weight files (consolidated.*.pth or *.safetensors)")
    return files


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    buf = bytearray(_HASH_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):  # streamed: weight files run to many GB
            h.update(view[:n])
    return h.hexdigest()


def _fingerprint(path: Path, files: dict[str, str]) -> str:
    """One file: its sha256. A directory: the sha256 of `sha256sum`'s output over its weight files."""
    if path.is_file():
        return next(iter(files.values()))
    listing = "".join(f"{digest}  {name}\n" for name, digest in files.items())
    return hashlib.sha256(listing.encode()).hexdigest()


def base_reference(path: str | Path) -> dict:
    """{"path": absolute path, "sha256": fingerprint, "files": {name: sha256}}: what an adapter checkpoint
    records about its base. Hashing reads every byte; compute it once per run."""
    path = Path(path)
    files = {f.name: _sha256_file(f) for f in base_weight_files(path)}
    return {"path": str(path.resolve()), "sha256": _fingerprint(path, files), "files": files}


def base_fingerprint(path: str | Path) -> str:
    """Content hash of a base model's weights: `sha256sum FILE` for a checkpoint file; for a Meta or
    Hugging Face directory, the sha256 of the `sha256sum` lines of its weight files in name order."""
    return base_reference(path)["sha256"]


def verify_base(recorded: dict, path: Optional[str | Path] = None) -> Path:
    """The base to load (`path`, else the recorded one), checked against the recorded hash."""
    path = Path(path or recorded["path"])
    now = base_reference(path)
    if now["sha256"] == recorded["sha256"]:
        return path
    old_files = recorded.get("files", {})
    if path.is_file():
        which = str(path)
    else:
        changed = sorted(n for n in set(old_files) | set(now["files"]) if old_files.get(n) != now["files"].get(n))
        which = ", ".join(str(path / n) for n in changed) or str(path)
    raise LoRAError(f"base weights changed since the adapters were trained: {which} (sha256 "
                    f"{recorded['sha256'][:16]}... recorded, {now['sha256'][:16]}... now)")


# ---- the trainer's three calls, and adapter checkpoints ----------------------------------------------------
def with_new_adapters(model: Transformer, settings: LoRASettings, seed: int) -> Transformer:
    """Fresh adapters on a model holding its starting weights, drawn from `seed` so every rank gets the same."""
    torch.manual_seed(seed)
    apply_lora(model, settings)
    return model


def resumed_adapted_model(record: Checkpoint, settings: LoRASettings, device: torch.device,
                          max_seq_len: int) -> Transformer:
    """The model an adapter checkpoint of a run being resumed trains, in float32 (master weights), train mode:
    its base, which must hash as recorded (or the weights it holds when there was no base file), with its
    adapters. Refuses other settings than the checkpoint's (rank, alpha, targets) in one line."""
    adapters = record.provenance.adapters
    if adapters is None:
        raise LoRAError("not a LoRA run's checkpoint: it holds no adapters")
    check_settings_match(adapters.settings, settings)
    if adapters.base is not None:
        model = load_model(verify_base(adapters.base), device=device, dtype=torch.float32,
                           max_seq_len=max_seq_len).train()
    else:
        with torch.device(device):  # its init is overwritten by the weights the checkpoint holds
            model = Transformer(replace(record.model_args, max_seq_len=max_seq_len))
    apply_lora(model, settings)
    load_adapter_weights(model, record)
    return model


def adapter_weights(model: nn.Module, settings: LoRASettings, base: str | Path | dict | None
                    ) -> tuple[dict[str, torch.Tensor], Adapters]:
    """What a LoRA run's checkpoint records: (weights, Adapters).

    base: the base weights' path, or base_reference(path) computed once (saves re-hashing), or None
    when the base came from no file: then every weight is saved, the frozen base included.
    Under FSDP call it on every rank (tensors are gathered collectively).
    """
    layers = lora_modules(model)
    if not layers:
        raise LoRAError("adapter_weights: the model has no adapters")
    if any(m.rank != settings.rank or m.alpha != settings.alpha for _, m in layers):
        raise LoRAError("adapter_weights: the settings differ from those the model's adapters were made with")
    if base is None:
        # every weight: not copied on CPU (the caller saves it at once), as state_dict() does
        state, ref = {k: _full_cpu(v, copy=False) for k, v in unwrap(model).state_dict().items()}, None
    else:
        state, ref = lora_state_dict(model), base if isinstance(base, dict) else base_reference(base)
    return state, Adapters(settings.to_dict(), ref)


def adapter_checkpoint_fields(model: nn.Module, settings: LoRASettings, base: str | Path | dict | None) -> dict:
    """adapter_weights as keyword arguments for checkpoint.save_checkpoint(path, model, **fields, ...)."""
    state, adapters = adapter_weights(model, settings, base)
    return {"model_state": state, "lora": adapters.settings, "base": adapters.base}


def load_adapter_weights(model: nn.Module, record: Checkpoint) -> None:
    """An adapter checkpoint's weights into a model that apply_lora wrapped with the same settings:
    the adapters, or every weight when the checkpoint has no base file. Load before sharding."""
    if record.provenance.adapters.base is not None:
        load_lora_state_dict(model, record.weights)
        return
    try:
        unwrap(model).load_state_dict(record.weights, strict=True)
    except RuntimeError as e:
        raise LoRAError(f"weights do not fit the model: {str(e).splitlines()[1].strip()}") from None


def adapted_model(record: Checkpoint, where: str | Path, base: Optional[str | Path] = None,
                  device: str | torch.device = "cpu", dtype: Optional[torch.dtype] = None,
                  max_seq_len: Optional[int] = None, rope_scale_factor: Optional[float] = None) -> Transformer:
    """An adapter checkpoint's record (read from `where`) -> the adapted Transformer in eval mode.

    The base comes from `base` or the recorded path and must hash as recorded; an adapter checkpoint as the base
    is loaded with its own adapters merged (checkpoint.load_model). `dtype` applies to the base weights; adapters
    stay float32 (see LoRALinear). `max_seq_len` and `rope_scale_factor` override the recorded shape's."""
    adapters = record.provenance.adapters
    if adapters is None:
        raise LoRAError(f"{where}: not an adapter checkpoint (no 'lora' settings); load it with checkpoint.load_model")
    settings = LoRASettings.from_dict(adapters.settings)
    overrides = {"max_seq_len": max_seq_len, "rope_scale_factor": rope_scale_factor}
    args = replace(record.model_args, **{k: v for k, v in overrides.items() if v is not None})
    if adapters.base is None:
        if base is not None:
            raise LoRAError(f"{where}: holds its own base weights (trained from no base file); drop --base")
        model = _adapted_from_full_state(record.weights, args, settings, device, dtype)
    else:
        base_path = verify_base(adapters.base, base)
        model = load_model(base_path, device=device, dtype=dtype, max_seq_len=args.max_seq_len,
                           rope_scale_factor=rope_scale_factor)
        if model.args != args:
            diffs = [f"{k} {v} vs {getattr(model.args, k)}" for k, v in asdict(args).items()
                     if getattr(model.args, k) != v]
            raise LoRAError(f"{where}: trained on a model of another shape than {base_path}: {'; '.join(diffs)}")
        # A's random init is overwritten at once: keep the caller's RNG stream as it was.
        with torch.random.fork_rng(devices=[torch.device(device)] if torch.device(device).type == "cuda" else []):
            apply_lora(model, settings)
        load_lora_state_dict(model, record.weights)
    return model.eval()


def load_adapter_checkpoint(path: str | Path, base: Optional[str | Path] = None, device: str | torch.device = "cpu",
                            dtype: Optional[torch.dtype] = None, max_seq_len: Optional[int] = None,
                            rope_scale_factor: Optional[float] = None) -> Transformer:
    """adapted_model for the adapter checkpoint at `path`."""
    return adapted_model(Checkpoint.read(path), path, base, device, dtype, max_seq_len, rope_scale_factor)


def _adapted_from_full_state(state: dict, args: ModelArgs, settings: LoRASettings, device, dtype) -> Transformer:
    with torch.device("meta"):
        model = Transformer(args)
        apply_lora(model, settings)
    state = {k: v.to(device=device, dtype=v.dtype if is_adapter_key(k) or dtype is None else dtype)
             for k, v in state.items()}
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        raise LoRAError(f"weights do not fit the recorded shape: {str(e).splitlines()[1].strip()}") from None
    if args.tie_word_embeddings:
        model.output.weight = model.tok_embeddings.weight  # assign=True broke the tie
    return model


# ---- CLI ---------------------------------------------------------------------------------------------------
def weights_read_by_merge(checkpoint: str | Path, base: Optional[str | Path] = None) -> list[Path]:
    """The adapter checkpoint and the base under it, and that base's own base when it is an adapter checkpoint
    too (a LoRA run started from another's adapters), and so on: every file or directory a merge reads."""
    paths, record = [Path(checkpoint)], Checkpoint.read(checkpoint)
    below = base or _recorded_base_path(record)
    while below:
        paths.append(Path(below))
        below = _recorded_base_path(Checkpoint.read(below)) if Path(below).is_file() else None
    return paths


def _recorded_base_path(record: Checkpoint) -> Optional[str]:
    adapters = record.provenance.adapters
    return (adapters.base or {}).get("path") if adapters else None


def merge_command(checkpoint: str, base: Optional[str], out: str, overwrite: bool = False) -> Path:
    """Adapters + base -> a plain project checkpoint (weights, shape, tokenizer fields). Never writes over what
    it reads (a base written over would make every later resume or merge of the adapters fail), nor over any
    other existing file unless `overwrite`."""
    target = Path(out).resolve()
    for read in weights_read_by_merge(checkpoint, base):
        read = read.resolve()
        if target == read or read.is_dir() and target.is_relative_to(read):
            raise LoRAError(f"--out {out} would write over {read}, which this merge reads (the adapters or a base "
                            f"under them); choose another file")
    if Path(out).exists() and not overwrite:
        raise LoRAError(f"--out {out} already exists; choose another file, or pass --overwrite to replace it")
    record = Checkpoint.read(checkpoint)
    model = merge_lora(adapted_model(record, checkpoint, base))
    adapters = record.provenance.adapters
    # The stage it came from (a later run names it by its flag); no step or optimizer: it starts runs as weights.
    merged_from = {"adapters": str(Path(checkpoint).resolve()), "base": adapters.base, "lora": adapters.settings}
    Checkpoint(model.state_dict(), model.args, record.stage, record.tokenizer, record.tokenizer_path,
               Provenance(merged_from=merged_from)).write(out)
    return Path(out)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description="LoRA adapters: merge an adapter checkpoint into its base.")
    sub = p.add_subparsers(dest="command", required=True)
    merge = sub.add_parser("merge", help="write base + adapters as one plain checkpoint")
    merge.add_argument("--checkpoint", required=True, help="adapter checkpoint written by a LoRA run")
    merge.add_argument("--base", default=None, help="base weights (default: the path the checkpoint records)")
    merge.add_argument("--out", required=True, help="merged checkpoint to write (.pt)")
    merge.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    args = p.parse_args(argv)
    try:
        out = merge_command(args.checkpoint, args.base, args.out, args.overwrite)
    except (LoRAError, CheckpointError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"merged {args.checkpoint} into {out}")
    return 0


if __name__ == "__main__":
    exit_without_teardown(main())
