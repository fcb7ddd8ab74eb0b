"""Training and running models bigger than memory: the weights live on disk and stream through one block at a time.

The store (BlockStore) is a directory of safetensors files, one per unit: `tok_embeddings`, `layers.0` ...
`layers.N-1`, `norm`, `output` (absent when tied to the embedding), each in the dtype its source gave, plus
`manifest.json` naming the shape, every file's sha256 and a content hash over all of them. It is written from a
Transformer or from any weight source checkpoint.load_model reads (Meta, HF, project), one unit at a time, after
a free-space check; a restart re-hashes the files instead of trusting their names (BlockStore.open + verify).

StreamedTransformer is a Transformer whose stored weights are meta tensors except while in use:

    forward   embed; blocks 0..N-1 each loaded (block i+1 read by a background thread while block i computes),
              upcast to the compute dtype, run, released; only each block's input and RNG state are kept
    backward  blocks N-1..0 each loaded again, recomputed from its saved input under the same RNG state and
              autocast settings (LoRA dropout replays the masks the forward drew: DropoutTape),
              back-propagated, released; the gradient w.r.t. its input goes down to the next

That is a custom autograd Function around the blocks, so `loss.backward()` does all of it and every stage's
`loss(model, batch)`, which calls `model(tokens, head=...)`, runs unchanged: Transformer.forward is inherited,
only hidden_states streams. Parameters that require grad and are not stored (LoRA adapters) live in memory inside
the streamed blocks and collect their gradients as usual; the optimizer and clip_grad_norm_ see them as always.

Full fine-tuning (train_base=True): each streamed unit's gradient goes to `grads/<unit>.safetensors` as soon as
its backward is done, added to what earlier micro-batches left there (the same a + b as autograd's .grad
accumulation). `clip_and_step` then makes the update in-memory training makes: sweep 1 takes every gradient's
norm (stored ones and in-memory ones, ordered as clip_grad_norm_ orders them) for the global norm; sweep 2,
unit by unit, scales the gradient by the same clamped coefficient and applies torch.optim.AdamW with the unit's
stored state (`adamw/<unit>.safetensors`); AdamW is elementwise per parameter, so one optimizer per unit gives
what one optimizer over the whole model gives. Gradient, AdamW and (once trained) weight files are scratch,
updated in place through writable mappings rather than rewritten each step; a trained store's manifest then no
longer vouches for its content, and a restart rebuilds it from the last checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections import Counter, deque
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

from model import KVCache, ModelArgs, Transformer, rope_cos_sin, rope_frequencies
from safetensors_io import MappedPages, load_file, save_file, sharded_files, write_atomically
from speedups import HeapTrimmer, release_freed_memory

STORE_FORMAT = "llama3-trainer-offload-store"
MANIFEST = "manifest.json"
_HASH_CHUNK = 16 << 20


class OffloadError(ValueError):
    """A store or setting that cannot be used; the message is one line naming what is wrong."""


# ---- units: which weights share a file --------------------------------------------------------------------
def unit_of(name: str) -> str:
    """`layers.3.attention.wq.weight` -> `layers.3`; `tok_embeddings.weight` -> `tok_embeddings`."""
    parts = name.split(".")
    return ".".join(parts[:2]) if parts[0] == "layers" else parts[0]


def stored_names(args: ModelArgs) -> dict[str, list[str]]:
    """unit -> the Meta names it holds, in state-dict order (the order parameters() yields them)."""
    with torch.device("meta"):
        names = list(Transformer(args).state_dict())
    units: dict[str, list[str]] = {}
    for name in names:
        if not (args.tie_word_embeddings and name == "output.weight"):
            units.setdefault(unit_of(name), []).append(name)
    return units


def free_bytes(directory: Path) -> int:
    return shutil.disk_usage(directory).free


def check_free_space(directory: Path, needed: int, what: str, setting: str = "OFFLOAD_DIR") -> None:
    """One line naming `directory` if its disk (that of its nearest existing parent) has less than `needed`."""
    free = free_bytes(next(p for p in (directory, *directory.parents) if p.exists()))
    if free < needed:
        raise OffloadError(f"{directory}: {what} needs {needed / 1e9:.2f} GB, only {free / 1e9:.2f} GB free; "
                           f"free some space or set {setting} to a larger disk")


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _layout(tensors: dict[str, torch.Tensor]) -> list:
    return [(n, tuple(t.shape), t.dtype) for n, t in tensors.items()]


def _content_sha256(args: dict, hashes: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps([args, sorted(hashes.items())], sort_keys=True).encode()).hexdigest()


# ---- the store -----------------------------------------------------------------------------------------------
class BlockStore:
    """A model's weights on disk, one safetensors file per unit, and (full fine-tuning) their gradients and
    AdamW state beside them. Weights are read with `load`, which copies them into memory in the dtype asked."""

    def __init__(self, directory: Path, manifest: dict):
        self.directory, self.manifest = Path(directory), manifest
        self.args = ModelArgs(**manifest["model_args"])
        self.units: dict[str, list[str]] = {u: e["names"] for u, e in manifest["units"].items()}
        self._grads_present: set[str] = set()
        self._grad_layout: dict[str, list] = {}  # the names, shapes and dtypes each unit's gradient file holds

    @property
    def content_sha256(self) -> str:
        return self.manifest["content_sha256"]

    @property
    def source(self) -> Optional[str]:
        return self.manifest.get("source")

    @property
    def pristine(self) -> bool:
        """The weights are still those it was written with (full fine-tuning updates them in place)."""
        return self.content_sha256 is not None and self.content_sha256 == self.manifest.get("written_content_sha256")

    def path(self, kind: str, unit: str) -> Path:
        return self.directory / kind / f"{unit}.safetensors"

    # ---- opening ------------------------------------------------------------------------------------------
    @classmethod
    def open(cls, directory: str | Path, verify: bool = True) -> "BlockStore":
        directory = Path(directory)
        try:
            manifest = json.loads((directory / MANIFEST).read_text())
            if manifest.get("format") != STORE_FORMAT:
                raise ValueError
        except (OSError, ValueError):
            raise OffloadError(f"{directory}: not an offload store (no readable {MANIFEST} of format "
                               f"{STORE_FORMAT})") from None
        store = cls(directory, manifest)
        if verify:
            store.verify()
        return store

    def verify(self) -> None:
        """Every weight file hashes as the manifest says: a store is trusted by content, not by file names."""
        if self.content_sha256 is None:
            raise OffloadError(f"{self.directory}: its weights were trained in place and not hashed since (a full "
                               f"fine-tuning run's scratch); rebuild it from a checkpoint (delete {self.directory})")
        for unit, entry in self.manifest["units"].items():
            path = self.path("weights", unit)
            if not path.is_file():
                raise OffloadError(f"{path}: missing from the offload store; rebuild it (delete {self.directory})")
            if _sha256_file(path) != entry["sha256"]:
                raise OffloadError(f"{path}: its content differs from the store's manifest (an interrupted update "
                                   f"or another model's file); rebuild the store (delete {self.directory})")

    # ---- weights ------------------------------------------------------------------------------------------
    def load(self, unit: str, dtype: Optional[torch.dtype] = None, device: torch.device | str = "cpu",
             ) -> dict[str, torch.Tensor]:
        """The unit's tensors copied off the file into (device) memory, cast to `dtype` (their own if None)."""
        mapped = load_file(self.path("weights", unit))
        return {n: t.to(device=device, dtype=dtype or t.dtype, copy=True) for n, t in mapped.items()}

    def mapped(self, unit: str, pages: Optional[MappedPages] = None, writable: bool = False,
               ) -> dict[str, torch.Tensor]:
        """The unit's tensors memory-mapped: pages are read when touched (an embedding lookup reads its rows).
        `writable` (after `mark_trained`): updates made to them in place are the file's new content."""
        return load_file(self.path("weights", unit), pages=pages, writable=writable)

    def mark_trained(self) -> None:
        """Before the first in-place update: the manifest stops vouching for the files' content. Hashing every
        updated weight each step would cost more than the update (0.76 s a step for a 320M model), and a trained
        store is never reused: a restart rebuilds it from the last checkpoint."""
        if self.content_sha256 is not None:
            for entry in self.manifest["units"].values():
                entry["sha256"] = None
            self.commit()

    def commit(self) -> None:
        """Write the manifest for the weights as they are now (content hash None once trained in place)."""
        hashes = {u: e["sha256"] for u, e in self.manifest["units"].items()}
        trained = any(h is None for h in hashes.values())
        self.manifest["content_sha256"] = None if trained else _content_sha256(self.manifest["model_args"], hashes)
        text = (json.dumps(self.manifest, indent=1) + "\n").encode()
        write_atomically(self.directory / MANIFEST, lambda f: f.write(text))

    # ---- gradients and optimizer state (full fine-tuning) -----------------------------------------------------
    # Gradient and AdamW files are scratch written once and then updated in place through writable mappings:
    # rewriting them whole each step (new pages, the old file's freed) cost three times the update itself.
    def accumulate_grads(self, unit: str, grads: dict[str, torch.Tensor]) -> None:
        """Add to the unit's stored gradients; the step's first micro-batch overwrites what the last step left."""
        path = self.path("grads", unit)
        if path.is_file() and self._grad_layout.get(unit) == _layout(grads):
            stored = load_file(path, writable=True)
            adding = unit in self._grads_present
            for n, g in grads.items():  # stored + new, as autograd's .grad += new
                stored[n].add_(g) if adding else stored[n].copy_(g)
        else:
            if unit in self._grads_present:
                raise OffloadError(f"{path}: a micro-batch's gradients of {unit} differ in names or shapes "
                                   f"from the step's first")
            path.parent.mkdir(exist_ok=True)
            save_file({n: g.detach().cpu() for n, g in grads.items()}, path, durable=False)
            self._grad_layout[unit] = _layout(grads)
        self._grads_present.add(unit)

    def grads(self, unit: str) -> Optional[dict[str, torch.Tensor]]:
        """This step's gradients of the unit, mapped writable (scaling or reducing them in place is fine: the
        next step overwrites them), or None."""
        if unit not in self._grads_present:
            return None
        return load_file(self.path("grads", unit), writable=True)

    def clear_grads(self) -> None:
        """Forget this step's gradients; their files stay, to be overwritten by the next step's."""
        self._grads_present.clear()

    def optimizer_state(self, unit: str) -> Optional[dict[str, torch.Tensor]]:
        """The unit's AdamW state mapped writable (the step updates it in place), or None before its first step."""
        path = self.path("adamw", unit)
        return load_file(path, writable=True) if path.is_file() else None

    def write_optimizer_state(self, unit: str, state: dict[str, torch.Tensor]) -> None:
        self.path("adamw", unit).parent.mkdir(exist_ok=True)
        save_file(state, self.path("adamw", unit), durable=False)


def store_bytes(args: ModelArgs, dtype_bytes: dict[str, int] | int) -> int:
    """Bytes of a store's weight files (tensor data; headers are a few KB)."""
    units = stored_names(args)
    with torch.device("meta"):
        state = Transformer(args).state_dict()
    per = (lambda n: dtype_bytes) if isinstance(dtype_bytes, int) else dtype_bytes.__getitem__
    return sum(state[n].numel() * per(n) for names in units.values() for n in names)


def write_store(directory: str | Path, args: ModelArgs, units: Iterable[tuple[str, dict[str, torch.Tensor]]],
                source: Optional[str] = None, needed_bytes: Optional[int] = None,
                dtype: Optional[torch.dtype] = None) -> BlockStore:
    """Write a store from (unit, tensors) pairs, each dropped once written, cast to `dtype` (None: as given).
    `needed_bytes` is checked against the free space first; `source` (e.g. the source files' fingerprint) is
    recorded for the caller to compare."""
    directory = Path(directory)
    if (directory / MANIFEST).exists():
        raise OffloadError(f"{directory}: already holds an offload store; open it, or delete it to rebuild")
    (directory / "weights").mkdir(parents=True, exist_ok=True)
    if needed_bytes is not None:
        check_free_space(directory, needed_bytes, "the offload store")
    expected = stored_names(args)
    entries = {}
    for unit, tensors in units:
        if list(tensors) != expected.get(unit):
            raise OffloadError(f"{directory}: unit {unit} holds {list(tensors)[:3]}, the shape expects "
                               f"{expected.get(unit, [])[:3]}")
        path = directory / "weights" / f"{unit}.safetensors"
        save_file({n: t.detach().to("cpu", dtype or t.dtype).contiguous() for n, t in tensors.items()}, path)
        entries[unit] = {"names": list(tensors), "sha256": _sha256_file(path)}
    missing = sorted(set(expected) - set(entries))
    if missing:
        raise OffloadError(f"{directory}: the source gave no {', '.join(missing[:3])}")
    manifest = {"format": STORE_FORMAT, "version": 1, "model_args": asdict(args), "source": source,
                "units": {u: entries[u] for u in expected}}
    store = BlockStore(directory, manifest)
    store.commit()
    store.manifest["written_content_sha256"] = store.content_sha256
    store.commit()
    return store


def model_units(model: Transformer) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
    """A Transformer's stored units (its LoRA adapters left out: they are trained, not stored)."""
    state = model.state_dict()
    for unit, names in stored_names(model.args).items():
        yield unit, {n: state[n] for n in names}


def write_store_from_model(directory: str | Path, model: Transformer, source: Optional[str] = None) -> BlockStore:
    bytes_by_name = {n: t.element_size() for n, t in model.state_dict().items()}
    return write_store(directory, model.args, model_units(model), source, store_bytes(model.args, bytes_by_name))


def checkpoint_units(path: str | Path, args: ModelArgs) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
    """A Meta or Hugging Face directory's units, each file opened memory-mapped for that unit only, so at
    most one unit's pages are in memory. Other sources (project checkpoints) load memory-mapped whole."""
    import checkpoint
    from hf_names import from_hf_state_dict, hf_name

    kind = checkpoint.checkpoint_kind(path)
    units = stored_names(args)
    if kind == "hf":
        files = sharded_files(path)
        for unit, names in units.items():
            tensors = {}
            for name in names:
                tensors.update(load_file(files[hf_name(name)], [hf_name(name)]))
            yield unit, {n: t.clone() for n, t in from_hf_state_dict(tensors, args).items()}
    elif kind == "meta" and len(list(Path(path).glob("consolidated.*.pth"))) == 1:
        shard = Path(path) / "consolidated.00.pth"
        for unit, names in units.items():
            state = torch.load(shard, map_location="cpu", weights_only=True, mmap=True)
            yield unit, {n: state[n].clone() for n in names}
            del state
    else:  # model-parallel Meta shards and project checkpoints: merged by checkpoint.py, memory-mapped
        yield from model_units(checkpoint.load_model(path))


def write_store_from_checkpoint(directory: str | Path, path: str | Path, source: Optional[str] = None) -> BlockStore:
    import checkpoint

    args = checkpoint.model_args_for(path)
    first = next(checkpoint_units(path, args))[1]
    itemsize = next(iter(first.values())).element_size()
    return write_store(directory, args, checkpoint_units(path, args), source or str(path), store_bytes(args, itemsize))


# ---- the streamed model ----------------------------------------------------------------------------------------
def _set_tensor(root: nn.Module, name: str, tensor: torch.Tensor, requires_grad: bool) -> nn.Parameter:
    module_name, _, leaf = name.rpartition(".")
    param = nn.Parameter(tensor, requires_grad=requires_grad)
    root.get_submodule(module_name)._parameters[leaf] = param
    return param


def _rng_state(device: torch.device) -> tuple:
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


@contextmanager
def _replayed(rng: tuple, device: torch.device, autocast: tuple):
    """Inside: the global RNG as it was (rng), autocast as it was; outside, the RNG as before."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type=device.type if devices else "cuda"):
        torch.set_rng_state(rng[0])
        if rng[1] is not None:
            torch.cuda.set_rng_state(rng[1], device)
        enabled, dtype, cache = autocast
        with torch.autocast(device.type, dtype=dtype, enabled=enabled, cache_enabled=cache):
            yield


class DropoutTape:
    """The LoRA dropout masks of one block's forward, kept for its recompute: replaying them costs nothing, where
    drawing them again from the replayed RNG took a quarter of a LoRA step (CPU random numbers are slow). Bool
    masks: a byte per adapter input element (10 MB per block of an 8B model at 256 tokens)."""

    def __init__(self):
        self.masks: Optional[deque] = None  # None: dropout draws as nn.Dropout does, keeping nothing
        self.replaying = False

    @contextmanager
    def recording(self) -> Iterator[deque]:
        self.masks, self.replaying = deque(), False
        try:
            yield self.masks
        finally:
            self.masks = None

    @contextmanager
    def replaying_from(self, masks: deque):
        self.masks, self.replaying = masks, True
        try:
            yield
        finally:
            self.masks, self.replaying = None, False


class TapedDropout(nn.Module):
    """nn.Dropout as a streamed model's adapters use it: the same masks and the same arithmetic (F.dropout on the
    CPU is `x * bernoulli(1 - p) / (1 - p)`), recorded on a DropoutTape in the forward and replayed by the
    recompute."""

    def __init__(self, p: float, tape: DropoutTape):
        super().__init__()
        self.p, self.tape = p, tape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        masks = self.tape.masks
        if not self.training or masks is None:
            return F.dropout(x, self.p, self.training)
        if self.tape.replaying:
            noise = masks.popleft().to(x.dtype)
        else:
            noise = torch.empty_like(x).bernoulli_(1 - self.p)
            masks.append(noise.bool())
        return x * noise.div_(1 - self.p)


class _StreamedBlocks(torch.autograd.Function):
    """h (B, T, dim) -> the last block's output, keeping only each block's input (see the module doc)."""

    @staticmethod
    def forward(ctx, h, anchor, model, cos, sin, mask):
        ctx.model, ctx.cos, ctx.sin, ctx.mask = model, cos, sin, mask
        ctx.autocast = (torch.is_autocast_enabled(h.device.type), torch.get_autocast_dtype(h.device.type),
                        torch.is_autocast_cache_enabled())
        ctx.inputs, ctx.rng, ctx.masks = [], [], []
        for i, block in model.streamed_blocks(range(model.args.n_layers), trainable=False):
            ctx.inputs.append(model.keep_input(i, h))
            ctx.rng.append(_rng_state(h.device))
            with model.dropout_tape.recording() as masks:
                h = block(h, cos, sin, 0, mask)
            ctx.masks.append(masks)
        return h

    @staticmethod
    def backward(ctx, grad):
        model = ctx.model
        for i, block in model.streamed_blocks(reversed(range(model.args.n_layers)), trainable=model.train_base):
            x = model.kept_input(ctx.inputs[i]).detach().requires_grad_(True)
            with torch.enable_grad(), _replayed(ctx.rng[i], x.device, ctx.autocast), \
                    model.dropout_tape.replaying_from(ctx.masks[i]):
                out = block(x, ctx.cos, ctx.sin, 0, ctx.mask)
            ctx.masks[i] = None
            torch.autograd.backward(out, grad)
            grad, ctx.inputs[i] = x.grad, None
            del out, x
            if model.train_base:
                with model._io():
                    model.store.accumulate_grads(f"layers.{i}", model.take_grads(block, f"layers.{i}."))
        return grad, None, None, None, None, None


@dataclass(frozen=True)
class AdamWSettings:
    """torch.optim.AdamW's arguments; weight decay on matrices (and embeddings) only, as train.build_optimizer."""
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.01
    fused: Optional[bool] = None
    foreach: Optional[bool] = None

    def optimizer(self, params: list[nn.Parameter], lr: float) -> torch.optim.AdamW:
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": self.weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=self.betas, eps=self.eps,
                                 fused=self.fused, foreach=self.foreach)


class StreamedTransformer(Transformer):
    """A Transformer computing with weights streamed from a BlockStore; build it with `open_streamed`."""

    streams_weights = True  # speedups.reordered_linears makes no copies of its weights

    def attach(self, store: BlockStore, compute_dtype: torch.dtype, device: torch.device | str, train_base: bool,
               autocast_dtype: Optional[torch.dtype] = None):
        self.store, self.compute_dtype, self.train_base = store, compute_dtype, train_base
        # Frozen weights stored in the dtype autocast computes in stay in it: autocast would cast them to it for
        # every product anyway, and a norm's weight promotes exactly, so the arithmetic is the same and a bf16
        # 8B model holds half the bytes. Trained weights are the fp32 master copy.
        self.held_dtype = None if train_base else autocast_dtype
        self.device = torch.device(device)
        self.io_wait_seconds = 0.0  # time spent waiting for a unit to arrive (the step line's I/O share)
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="offload-read")
        self._anchor = torch.zeros((), requires_grad=True)  # makes backward run when nothing below requires grad
        self._outer: Optional[str] = None  # how the embedding, norm and output are loaded: "frozen", "trained"
        self._block_buffers: tuple[dict, dict] = ({}, {})  # two sets of one block's weights, in the compute dtype
        self._buffer_holds: list[Optional[int]] = [None, None]  # the block each set holds (None: being written)
        self.keep_activations = False  # OFFLOAD_ACTIVATIONS=all: no recompute, see _blocks_keeping_activations
        self._incomplete_grads: Counter[str] = Counter()  # blocks whose gradients autograd has not all made yet
        self._backward_read: Optional[tuple[int, Future]] = None  # the block _weight_for_backward reads ahead
        self._memory_optimizer: Optional[torch.optim.AdamW] = None
        self.reduce_grads: Callable[[list[torch.Tensor]], None] = lambda grads: None  # over ranks (RunOffload)
        self.activation_dir: Optional[Path] = None  # OFFLOAD_ACTIVATIONS=disk: where block inputs wait for backward
        self._kept = 0
        self.dropout_tape = DropoutTape()  # the adapters' dropout masks between a block's forward and its recompute
        self.trim_heap = HeapTrimmer()  # after each block whose activations were freed: see streamed_blocks
        # The meta placeholders say whether a stored weight trains, so that counting trainable parameters
        # (and FLOPs) reads the streamed model as it reads a model in memory.
        for name, p in self.named_parameters():
            if unit_of(name) in store.units and not _is_adapter(name):
                p.requires_grad_(train_base)

    @contextmanager
    def _io(self):
        """Store reads and writes on the computing thread count as time waiting for I/O."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self.io_wait_seconds += time.perf_counter() - started

    # ---- loading and releasing ----------------------------------------------------------------------------
    def _dtype_for(self, stored: torch.dtype) -> torch.dtype:
        """The dtype a weight is held in while in use: its stored one when autocast computes in that, else the
        compute dtype (fp32 on a CPU without bf16: each block upcast as it arrives)."""
        return stored if stored == self.held_dtype else self.compute_dtype

    def _read(self, unit: str) -> dict[str, torch.Tensor]:
        """A unit's weights on the device in the dtype they are held in: where that is the stored one on the CPU,
        the mapped file itself (read, never written: the mapping is private), with no copy."""
        return {n: t.to(self.device, self._dtype_for(t.dtype)) for n, t in self.store.mapped(unit).items()}

    def _block_dtype(self, t: torch.Tensor) -> torch.dtype:
        """A frozen block matrix is only ever a linear layer's weight, which autocast casts to its dtype for
        every product (forward and the input gradient alike): casting it once as it is read gives the same
        numbers, takes the cast off the computing thread and halves the copy. Norm weights (vectors) stay as
        _dtype_for says: a norm multiplies in float32."""
        if self.held_dtype is not None and t.dim() == 2:
            return self.held_dtype
        return self._dtype_for(t.dtype)

    def _read_block(self, i: int) -> dict[str, torch.Tensor]:
        """Block i's weights, cast into buffer set i % 2. Every block has the same shapes, so two sets serve all:
        block i+1 fills one while block i computes with the other, and no block allocates memory of its own
        (fresh buffers per block would page-fault each time, and glibc, freeing them from another thread than
        the one that allocated them, keeps most of them: resident memory grew by a block per block)."""
        prefix = f"layers.{i}."
        buffers = self._block_buffers[i % 2]
        self._buffer_holds[i % 2] = None
        out = {}
        for name, t in self.store.mapped(f"layers.{i}").items():
            local = name.removeprefix(prefix)
            if local not in buffers:
                buffers[local] = torch.empty(t.shape, dtype=self._block_dtype(t), device=self.device)
            out[name] = buffers[local].copy_(t)
        self._buffer_holds[i % 2] = i
        return out

    def _release(self, names: Iterable[str]) -> None:
        for name in names:
            module_name, _, leaf = name.rpartition(".")
            module = self.get_submodule(module_name)
            old = module._parameters[leaf]
            module._parameters[leaf] = nn.Parameter(torch.empty(old.shape, dtype=old.dtype, device="meta"),
                                                    requires_grad=self.train_base and not _is_adapter(name))

    def streamed_blocks(self, order: Iterable[int], trainable: bool, frees_activations: bool = True,
                        ) -> Iterator[tuple[int, nn.Module]]:
        """Each block of `order` with its weights in place, the next one read meanwhile; released after use, and
        the heap trimmed where the caller freed the block's activations, which glibc would keep resident: the
        README's 8B LoRA command in fp32 peaked at 6.45 GiB trimming after the backward's blocks only, 5.39 GiB
        after the forward's too (2-core AMD EPYC Zen 4). Not while every activation is kept
        (OFFLOAD_ACTIVATIONS=all): the heap then grows by what stays alive, and trimming as it grew took a 320M
        model's full fine-tuning from 1.36x to 1.54x the in-memory step."""
        order = list(order)
        pending: Optional[Future] = self._reader.submit(self._read_block, order[0]) if order else None
        for k, i in enumerate(order):
            started = time.perf_counter()
            tensors = pending.result()
            self.io_wait_seconds += time.perf_counter() - started
            pending = self._reader.submit(self._read_block, order[k + 1]) if k + 1 < len(order) else None
            for name, t in tensors.items():
                _set_tensor(self, name, t, trainable)
            del t, tensors
            try:
                yield i, self.layers[i]
            finally:
                self._release(self.store.units[f"layers.{i}"])
                if frees_activations:
                    self.trim_heap()

    def keep_input(self, i: int, h: torch.Tensor) -> torch.Tensor | Path:
        """Block i's input until its backward: the tensor, or with `activation_dir` a file holding it (named by a
        running count: a stage may run several forwards before one backward)."""
        if self.activation_dir is None:
            return h
        self._kept += 1
        path = self.activation_dir / f"input-{self._kept}-block{i}.safetensors"
        with self._io():
            save_file({"h": h}, path, durable=False)
        return path

    def kept_input(self, kept: torch.Tensor | Path) -> torch.Tensor:
        if isinstance(kept, torch.Tensor):
            return kept
        with self._io():
            h = load_file(kept)["h"].to(self.device, copy=True)
            kept.unlink()
        return h

    def take_grads(self, module: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
        """The gradients of a loaded unit's stored weights, by full name (the adapters' stay where they are)."""
        return {prefix + n: p.grad for n, p in module.named_parameters()
                if not _is_adapter(n) and p.grad is not None}

    def _load_outer(self, trainable: bool) -> None:
        """Embedding, final norm and output layer. Frozen: the embedding stays memory-mapped in its stored dtype
        (a lookup touches only its rows) and is cast after the lookup; all stay in place across calls. Trained:
        fresh leaves each forward, their gradients sent to the store as soon as autograd has summed them."""
        if self._outer == "frozen" and not trainable:
            return
        if trainable:
            for unit in ("tok_embeddings", "norm", "output"):
                if unit in self.store.units:
                    for name, t in self._read(unit).items():
                        param = _set_tensor(self, name, t, True)
                        param.register_post_accumulate_grad_hook(self._outer_grad_hook(name))
        else:  # requires_grad as the placeholders say (counting reads it); no gradient is taken this way
            _set_tensor(self, "tok_embeddings.weight", self.store.mapped("tok_embeddings")["tok_embeddings.weight"],
                        self.train_base)
            for unit in ("norm", "output"):
                if unit in self.store.units:
                    for name, t in self._read(unit).items():
                        _set_tensor(self, name, t, self.train_base)
        if self.args.tie_word_embeddings:
            tied = self.tok_embeddings.weight
            self.output._parameters["weight"] = tied if trainable else \
                nn.Parameter(tied.to(self.device, self._dtype_for(tied.dtype), copy=True), requires_grad=self.train_base)
        self._outer = "trained" if trainable else "frozen"

    def _outer_grad_hook(self, name: str):
        def hook(param: torch.Tensor) -> None:
            with self._io():
                self.store.accumulate_grads(unit_of(name), {name: param.grad})
            param.grad = None
        return hook

    def release(self) -> None:
        """Drop the embedding, norm and output layer too (between uses, or before writing a checkpoint)."""
        names = [n for u in ("tok_embeddings", "norm", "output") for n in self.store.units.get(u, [])]
        self._release(names)
        if self.args.tie_word_embeddings:
            self._release(["output.weight"])
        self._outer = None

    def load_outer(self) -> None:
        """Embedding, norm and output layer in place (frozen), so that callers reading
        `tok_embeddings.weight.device` (generation, evaluation) find a real device."""
        self._load_outer(trainable=False)

    def setup_cache(self, batch_size: int, max_seq_len: int, dtype: Optional[torch.dtype] = None):
        """Caches in the compute dtype on the compute device; decoding then streams every block per token."""
        self.load_outer()
        for layer in self.layers:
            layer.attention.cache = KVCache(batch_size, max_seq_len, self.args.n_kv_heads, self.args.head_dim,
                                            dtype or self.compute_dtype, self.device)

    # ---- forward ----------------------------------------------------------------------------------------------
    def hidden_states(self, tokens: torch.Tensor, *, start_pos: int = 0, attn_mask: Optional[torch.Tensor] = None,
                      positions: Optional[torch.Tensor] = None) -> torch.Tensor:
        training = torch.is_grad_enabled() and (self.train_base or any(p.requires_grad for p in self.parameters()))
        cached = any(layer.attention.cache is not None for layer in self.layers)
        if training and (start_pos != 0 or cached):
            raise OffloadError("a streamed model trains without a KV cache (start_pos 0)")
        self._load_outer(trainable=training and self.train_base)
        seqlen = tokens.shape[1]
        table = self.tok_embeddings.weight  # gathered where it lives, then cast: as casting the table first would
        h = self.tok_embeddings(tokens.to(table.device)).to(self.device, self.compute_dtype)
        if positions is None:
            positions = torch.arange(start_pos, start_pos + seqlen, device=tokens.device)
        cos, sin = rope_cos_sin(rope_frequencies(self.args, tokens.device), positions)
        mask = self._attention_mask(seqlen, start_pos, attn_mask, tokens.device)
        if training and self.keep_activations:
            h = self._blocks_keeping_activations(h, cos, sin, mask)
        elif training:
            h = _StreamedBlocks.apply(h, self._anchor, self, cos, sin, mask)
        else:  # evaluation and decoding: with a KV cache, each new token streams every block once
            for _, block in self.streamed_blocks(range(self.args.n_layers), trainable=False):
                h = block(h, cos, sin, start_pos, mask)
        return self.norm(h)

    def _blocks_keeping_activations(self, h: torch.Tensor, cos, sin, mask) -> torch.Tensor:
        """The blocks under plain autograd, every activation kept in memory as training in memory keeps it (no
        recompute: the in-memory step's arithmetic, with its activation memory). Only the block weights autograd
        saves are swapped for tokens naming them (block, weight, view), and the backward resolves each token from
        the store as it reaches that block (_weight_for_backward), reading the block below ahead.

        Full fine-tuning: each block's weights are fresh leaves over the shared buffers (a gradient node holds its
        leaf, not the leaf's data, so later blocks may overwrite them); under autocast their matrices are cast here
        rather than by autocast, so that the saved bf16 copies are known and swapped for tokens too (the same cast
        autocast makes, so the same numbers); a block's gradients go to the store once autograd has them all."""
        cast = torch.get_autocast_dtype(h.device.type) if torch.is_autocast_enabled(h.device.type) else None
        for i, block in self.streamed_blocks(range(self.args.n_layers), trainable=self.train_base,
                                             frees_activations=False):
            tokens: dict[int, tuple[str, bool]] = {}  # storage -> (weight name, saved as its autocast cast)
            leaves: dict[str, nn.Parameter] = {}
            for name in self.store.units[f"layers.{i}"]:
                module_name, _, leaf = name.rpartition(".")
                module = self.get_submodule(module_name)
                leaves[name] = weight = module._parameters[leaf]
                tokens[weight.untyped_storage().data_ptr()] = (name, False)
                if self.train_base and cast is not None and weight.dim() == 2:
                    module._parameters[leaf] = weight.to(cast)  # autograd sees the cast; the leaf gets its gradient
                    tokens[module._parameters[leaf].untyped_storage().data_ptr()] = (name, True)
            if self.train_base:
                self._send_grads_when_complete(f"layers.{i}", leaves)

            def pack(t: torch.Tensor, i=i, tokens=tokens):
                found = tokens.get(t.untyped_storage().data_ptr()) if t.device == self.device else None
                return t if found is None else (i, *found, t.dtype, t.shape, t.stride(), t.storage_offset())

            with torch.autograd.graph.saved_tensors_hooks(pack, self._unpack_saved):
                h = block(h, cos, sin, 0, mask)
        return h

    def _send_grads_when_complete(self, unit: str, leaves: dict[str, nn.Parameter]) -> None:
        """A block's leaves hand their gradients to the store as one unit, as soon as autograd has made the last."""
        names = list(leaves)
        grads: dict[str, torch.Tensor] = {}
        self._incomplete_grads[unit] += 1

        def hook(param: torch.Tensor, name: str) -> None:
            grads[name], param.grad = param.grad, None
            if len(grads) == len(names):
                with self._io():
                    self.store.accumulate_grads(unit, {n: grads[n] for n in names})
                grads.clear()
                self._incomplete_grads[unit] -= 1

        for name, leaf in leaves.items():
            leaf.register_post_accumulate_grad_hook(lambda p, name=name: hook(p, name))

    def _unpack_saved(self, saved):
        if isinstance(saved, torch.Tensor):
            return saved
        i, name, was_cast, dtype, size, stride, offset = saved
        weight = self._weight_for_backward(i)[name]
        return (weight.to(dtype) if was_cast else weight).as_strided(size, stride, offset)

    def _weight_for_backward(self, i: int) -> dict[str, torch.Tensor]:
        """Block i's weights in its buffer set (i % 2), read now if the set holds another block, and block i-1
        read ahead into the other set. The backward reaches block i only once every node of block i+1 is done
        (they all lie between its input and output), so the set being overwritten is no longer used."""
        if self._backward_read is not None and self._backward_read[0] % 2 == i % 2:  # it writes the set i needs
            started = time.perf_counter()
            self._backward_read[1].result()
            self.io_wait_seconds += time.perf_counter() - started
            self._backward_read = None
        if self._buffer_holds[i % 2] != i:
            with self._io():
                self._read_block(i)
        if i > 0 and self._backward_read is None and self._buffer_holds[(i - 1) % 2] != i - 1:
            self._backward_read = (i - 1, self._reader.submit(self._read_block, i - 1))
        prefix = f"layers.{i}."
        return {prefix + local: t for local, t in self._block_buffers[i % 2].items()}

    # ---- the update (full fine-tuning) ---------------------------------------------------------------------------
    def zero_grad_streamed(self) -> None:
        self.store.clear_grads()

    @torch.no_grad()
    def clip_and_step(self, lr: float, max_norm: float, settings: AdamWSettings,
                      should_step: Callable[[torch.Tensor], bool] = lambda total: True) -> torch.Tensor:
        """clip_grad_norm_(all trainable parameters, max_norm) and one AdamW step, as in memory; returns the
        total norm before clipping. `should_step(total)` False (a non-finite norm, a step that trained nothing)
        skips the update, as train.py skips optimizer.step. Stored gradients are cleared, in-memory ones set to
        None; the embedding, norm and output layer are left in place, frozen, as they are after the update."""
        self.release()  # the last forward's embedding and output leaves; the next forward reads the updated ones
        if any(self._incomplete_grads.values()):
            raise OffloadError(f"the backward left {', '.join(sorted(+self._incomplete_grads))} without every "
                               f"gradient; a step must back-propagate each forward before it updates")
        order = self._grad_order()
        norms = {}
        for unit, names in self.store.units.items():  # sweep 1: every stored gradient's norm
            grads = self._reduced_grads(unit)  # averaged over the ranks in place: sweep 2 reads them so
            if grads is not None:
                norms.update(zip(names, torch._foreach_norm([grads[n] for n in names], 2.0)))
        memory = [(n, p) for n, p in self.named_parameters() if p.requires_grad and p.grad is not None]
        if memory:
            self.reduce_grads([p.grad for _, p in memory])
            norms.update(zip([n for n, _ in memory], torch._foreach_norm([p.grad for _, p in memory], 2.0)))
        if not norms:
            self.load_outer()
            return torch.tensor(0.0)
        total = torch.linalg.vector_norm(torch.stack([norms[n] for n in order if n in norms]), 2.0)
        if not should_step(total):
            self.store.clear_grads()
            if memory:
                for _, p in memory:
                    p.grad = None
            self.load_outer()
            return total
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        self.store.mark_trained()
        for unit, names in self.store.units.items():  # sweep 2: the update, unit by unit
            with self._io():
                grads = self.store.grads(unit)
            if grads is not None:
                self._step_unit(unit, names, grads, coef, lr, settings)
        if memory:
            torch._foreach_mul_([p.grad for _, p in memory], coef)
            if self._memory_optimizer is None:
                self._memory_optimizer = settings.optimizer([p for _, p in memory], lr)
            for group in self._memory_optimizer.param_groups:
                group["lr"] = lr
            self._memory_optimizer.step()
            self._memory_optimizer.zero_grad(set_to_none=True)
        self.store.clear_grads()
        self.load_outer()
        return total

    def _reduced_grads(self, unit: str) -> Optional[dict[str, torch.Tensor]]:
        """A unit's stored gradients, averaged in place over the ranks when there are several (each rank stores
        its own)."""
        with self._io():
            grads = self.store.grads(unit)
        if grads is not None:
            self.reduce_grads(list(grads.values()))
        return grads

    def _grad_order(self) -> list[str]:
        """Names in the order clip_grad_norm_ stacks their norms: grouped by (device, dtype) in order of first
        appearance, parameter order within a group."""
        groups: dict[tuple, list[str]] = {}
        stored_dtype = self.compute_dtype
        for name, p in self.named_parameters():
            key = (str(self.device), stored_dtype) if unit_of(name) in self.store.units and not _is_adapter(name) \
                else (str(p.device), p.dtype)
            groups.setdefault(key, []).append(name)
        return [n for names in groups.values() for n in names]

    def _step_unit(self, unit: str, names: list[str], grads: dict[str, torch.Tensor], coef: torch.Tensor, lr: float,
                   settings: AdamWSettings) -> None:
        """AdamW on the unit's mapped weights and state: the step writes the files in place."""
        with self._io():
            weights, state = self.store.mapped(unit, writable=True), self.store.optimizer_state(unit)
        params = [nn.Parameter(weights[n]) for n in names]
        torch._foreach_mul_([grads[n] for n in names], coef)
        for p, n in zip(params, names):
            p.grad = grads[n]
        optimizer = settings.optimizer(params, lr)
        if state is not None:
            for p, n in zip(params, names):
                optimizer.state[p] = {"step": state[f"{n}.step"], "exp_avg": state[f"{n}.exp_avg"],
                                      "exp_avg_sq": state[f"{n}.exp_avg_sq"]}
        optimizer.step()
        if state is None:  # the unit's first step: AdamW made its state; from now on it is updated in place
            with self._io():
                self.store.write_optimizer_state(unit, {f"{n}.{k}": optimizer.state[p][k] for n, p in
                                                        zip(names, params) for k in ("step", "exp_avg", "exp_avg_sq")})

    def stored_state_dict(self) -> dict[str, torch.Tensor]:
        """Every stored weight, read from the store (for tests and small models: a checkpoint writer should go
        unit by unit)."""
        return {n: t for unit in self.store.units for n, t in self.store.load(unit).items()}


def _is_adapter(name: str) -> bool:
    return ".lora_a." in name or ".lora_b." in name


def open_streamed(store: BlockStore, compute_dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                  train_base: bool = False, autocast_dtype: Optional[torch.dtype] = None) -> StreamedTransformer:
    """A StreamedTransformer of the store's shape, all weights on the meta device until used. Apply LoRA to it
    (lora.apply_lora) and then `materialize_adapters` for adapters in memory. `autocast_dtype`: the dtype the
    caller's autocast computes in, if any (frozen weights stored in it are then held in it)."""
    with torch.device("meta"):
        model = StreamedTransformer(store.args)
    model.attach(store, compute_dtype, device, train_base, autocast_dtype)
    return model


def materialize_adapters(model: StreamedTransformer) -> None:
    """Adapters applied to a meta-device model get memory and their initial values, drawn from the global RNG
    in module order exactly as apply_lora draws them on a model in memory; their dropout keeps its masks on the
    model's DropoutTape for the recompute."""
    from lora import LoRALinear

    for module in model.modules():
        if isinstance(module, LoRALinear) and module.lora_a.weight.is_meta:
            module.lora_a.to_empty(device=model.device)
            module.lora_b.to_empty(device=model.device)
            module.reset_adapters()
            if isinstance(module.dropout, nn.Dropout):
                module.dropout = TapedDropout(module.dropout.p, model.dropout_tape)


# ---- a training run's offload (train.py) ---------------------------------------------------------------------
def _size(nbytes: float) -> str:
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e9 else f"{nbytes / 1e6:.1f} MB"


class RunOffload:
    """What an offloaded training run (OFFLOAD=disk) holds beside its streamed models: where their stores are and
    whether a store can be reused, the full fine-tuning update, and the state a checkpoint takes from the store.

    Stores live in OFFLOAD_DIR/<name> (`policy`, and `reference` or `teacher` when a stage needs one). A store is
    reused only when its manifest names the same source (the weights' content fingerprint and the stored dtype),
    its weights are still those it was written with, and every file hashes as the manifest says; otherwise it
    is rebuilt, saying why. Full fine-tuning always rebuilds (its store is scratch that training rewrites); the
    checkpoints, not the store, are what is kept."""

    def __init__(self, directory: Path, device: torch.device, train_base: bool, adamw: AdamWSettings,
                 autocast_dtype: Optional[torch.dtype] = None, world_size: int = 1, activations: str = "memory"):
        self.directory, self.device, self.train_base, self.adamw = Path(directory), device, train_base, adamw
        self.autocast_dtype = autocast_dtype  # the run's autocast (None: fp32), for open_streamed
        self.world_size, self.activations = world_size, activations  # OFFLOAD_ACTIVATIONS: memory, disk or all
        self.pages = MappedPages()  # the store's files a checkpoint being written maps
        self.notes: list[str] = []
        self.model: Optional[StreamedTransformer] = None  # the policy
        self.others: list[StreamedTransformer] = []  # a frozen reference or a teacher, streamed too

    # ---- stores --------------------------------------------------------------------------------------------
    def _store(self, name: str, args: ModelArgs, units: Callable[[], Iterable[tuple[str, dict]]],
               identity: Optional[str], dtype: Optional[torch.dtype], itemsize: int) -> BlockStore:
        directory = self.directory / name
        parameters = sum(n for n in _unit_numels(args).values())
        scratch = 3 * 4 * parameters if name == "policy" and self.train_base else 0  # grads + AdamW's two
        reason = "none there"
        if (directory / MANIFEST).is_file():
            try:
                store = BlockStore.open(directory, verify=False)  # hashed below only if it would be reused
                if identity is not None and store.source == identity and store.pristine and store.args == args:
                    store.verify()
                    directory.mkdir(parents=True, exist_ok=True)
                    check_free_space(directory, scratch, "full fine-tuning's gradients and AdamW state")
                    self.notes.append(f"{name} store {directory} reused (content verified)")
                    return store
                reason = "written from other weights" if store.pristine else "its weights were trained since"
            except OffloadError as e:
                reason = str(e).split(": ", 1)[-1]
        elif directory.is_dir() and any(directory.iterdir()):
            raise OffloadError(f"{directory}: holds files but no offload store ({MANIFEST}); set OFFLOAD_DIR to "
                               f"another directory or empty this one")
        if directory.exists():
            shutil.rmtree(directory)
            self.notes.append(f"{name} store {directory} rebuilt ({reason})")
        else:
            self.notes.append(f"{name} store {directory} written")
        directory.mkdir(parents=True)
        needed = store_bytes(args, itemsize) + scratch
        try:
            return write_store(directory, args, units(), identity, needed, dtype)
        except BaseException:
            shutil.rmtree(directory, ignore_errors=True)  # half a store is no store: the next start writes it
            raise
        finally:
            release_freed_memory()

    def _open(self, name: str, args: ModelArgs, units: Callable, identity: Optional[str], itemsize: int,
              compute_dtype: torch.dtype = torch.float32) -> StreamedTransformer:
        trains = name == "policy" and self.train_base
        dtype = torch.float32 if trains else None  # full fine-tuning's store holds the fp32 master weights
        if identity is not None:
            identity = f"{identity} {dtype or 'as stored'}"
        store = self._store(name, args, units, None if trains else identity, dtype, 4 if trains else itemsize)
        model = open_streamed(store, compute_dtype, self.device, train_base=trains, autocast_dtype=self.autocast_dtype)
        if name == "policy":
            self.model = model
            if self.world_size > 1:
                model.reduce_grads = self.mean_over_ranks
            model.keep_activations = self.activations == "all"
            if self.activations == "disk":
                model.activation_dir = self.directory / "activations"
                shutil.rmtree(model.activation_dir, ignore_errors=True)  # an interrupted step's: never read again
                model.activation_dir.mkdir(parents=True)
        else:
            self.others.append(model)
        return model

    def from_source(self, name: str, path: str | Path, args: ModelArgs, fingerprint: str,
                    compute_dtype: torch.dtype = torch.float32) -> StreamedTransformer:
        """Weights of a Meta, Hugging Face or project checkpoint, copied into the store unit by unit."""
        itemsize = next(iter(next(checkpoint_units(path, args))[1].values())).element_size()
        return self._open(name, args, lambda: checkpoint_units(path, args), fingerprint, itemsize, compute_dtype)

    def from_model(self, name: str, model: Transformer) -> StreamedTransformer:
        """A model built in memory (a fresh initialisation), which the caller then drops."""
        itemsize = model.tok_embeddings.weight.element_size()
        return self._open(name, model.args, lambda: model_units(model), None, itemsize)

    def from_weights(self, name: str, weights: dict[str, torch.Tensor], args: ModelArgs) -> StreamedTransformer:
        """A checkpoint's state dict (memory-mapped; LoRA adapters in it are left out)."""
        units = lambda: ((u, {n: weights[n] for n in names}) for u, names in stored_names(args).items())  # noqa
        return self._open(name, args, units, None, weights["tok_embeddings.weight"].element_size())

    # ---- LoRA ---------------------------------------------------------------------------------------------------
    @staticmethod
    def add_adapters(model: StreamedTransformer, settings, seed: int) -> None:
        """Adapters as lora.with_new_adapters draws them on a model in memory (the same values)."""
        from lora import apply_lora

        torch.manual_seed(seed)
        apply_lora(model, settings)
        materialize_adapters(model)

    def resumed_lora(self, record, settings, max_seq_len: int) -> StreamedTransformer:
        """lora.resumed_adapted_model, streamed: the recorded base (verified by its hash) or the weights the
        checkpoint holds, with the checkpoint's adapters."""
        from dataclasses import replace

        import lora

        lora.check_settings_match(record.provenance.adapters.settings, settings)
        args = replace(record.model_args, max_seq_len=max_seq_len)
        base = record.provenance.adapters.base
        if base is not None:
            model = self.from_source("policy", lora.verify_base(base), args, base["sha256"])
        else:
            model = self.from_weights("policy", record.weights, args)
        self.add_adapters(model, settings, 0)  # drawn, then overwritten by the checkpoint's
        lora.load_lora_state_dict(model, {k: v for k, v in record.weights.items() if lora.is_adapter_key(k)})
        return model

    # ---- several ranks ------------------------------------------------------------------------------------------
    def mean_over_ranks(self, grads: list[torch.Tensor]) -> None:
        """Each gradient replaced by its mean over the ranks, as DDP reduces them (there is no DDP wrapper around a
        streamed model: its stored gradients reach the store inside backward, out of DDP's reach)."""
        import torch.distributed as dist

        for g in grads:
            dist.all_reduce(g, op=dist.ReduceOp.SUM)
            g.div_(self.world_size)

    def reduce_memory_grads(self) -> None:
        """A LoRA run's adapter gradients averaged over the ranks, before clipping and the optimizer step."""
        if self.world_size > 1 and not self.train_base:
            self.mean_over_ranks([p.grad for p in self.model.parameters() if p.requires_grad and p.grad is not None])

    # ---- the full fine-tuning update and its state -------------------------------------------------------------
    def update(self, lr: float, max_norm: float, n_units: float) -> float:
        """Global-norm clipping and AdamW over the stored gradients (StreamedTransformer.clip_and_step); a step
        that trains nothing or has a non-finite norm updates nothing, as in memory."""
        total = self.model.clip_and_step(lr, max_norm, self.adamw,
                                         should_step=lambda t: n_units > 0 and bool(torch.isfinite(t)))
        self._lr = lr
        return total.item()

    def checkpoint_weights(self) -> dict[str, torch.Tensor]:
        """The stored weights by their state-dict names, memory-mapped from the store's files: torch.save reads
        them unit by unit from the page cache, so the checkpoint never needs the whole model in memory."""
        store = self.model.store
        mapped = {n: t for unit in store.units for n, t in store.mapped(unit, self.pages).items()}
        with torch.device("meta"):
            names = list(Transformer(store.args).state_dict())
        return {n: mapped.get(n, mapped["tok_embeddings.weight"]) for n in names}  # a tied output: the embedding

    def optimizer_state(self, lr: float) -> dict:
        """The store's AdamW state in the layout get_optimizer_state_dict(full_state_dict=True) gives for
        train.build_optimizer's two groups, so an in-memory run resumes an offloaded checkpoint and back."""
        store = self.model.store
        state = {}
        for unit, names in store.units.items():
            path = store.path("adamw", unit)
            if path.is_file():
                saved = load_file(path, pages=self.pages)
                state.update({n: {k: saved[f"{n}.{k}"] for k in ("step", "exp_avg", "exp_avg_sq")} for n in names})
        with torch.device("meta"):
            params = dict(Transformer(store.args).named_parameters())
        groups = self.adamw.optimizer(list(params.values()), lr).param_groups
        names_of = {id(p): n for n, p in params.items()}
        return {"state": state, "param_groups": [{**{k: v for k, v in g.items() if k != "params"},
                                                  "params": [names_of[id(p)] for p in g["params"]]} for g in groups]}

    def load_optimizer_state(self, saved: dict) -> None:
        store = self.model.store
        for unit, names in store.units.items():
            present = [n for n in names if n in saved["state"]]
            if present:
                store.write_optimizer_state(unit, {f"{n}.{k}": saved["state"][n][k].to(torch.float32)
                                                   if k != "step" else saved["state"][n][k]
                                                   for n in present for k in ("step", "exp_avg", "exp_avg_sq")})

    def checkpoint_state(self, settings, init: Optional[dict], optimizer, options) -> tuple[dict, object, dict]:
        """(weights, LoRA Adapters or None, optimizer state) for train.Run.save; what they map from the store is
        in `self.pages`, for the checkpoint writer to release as it goes (release_pages)."""
        self.pages = MappedPages()
        import lora
        from checkpoint import Adapters
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        if self.train_base:
            return self.checkpoint_weights(), None, self.optimizer_state(getattr(self, "_lr", 0.0))
        optim_state = get_optimizer_state_dict(self.model, optimizer, options=options)
        if init is not None:
            return (*lora.adapter_weights(self.model, settings, init), optim_state)
        # no base file (a LoRA run from scratch): every weight, the frozen base read from the store
        weights = {n: t for unit in self.model.store.units for n, t in self.model.store.mapped(unit, self.pages).items()}
        if self.model.args.tie_word_embeddings:
            weights["output.weight"] = weights["tok_embeddings.weight"]
        return weights | lora.lora_state_dict(self.model), Adapters(settings.to_dict(), None), optim_state

    def release_pages(self) -> None:
        self.pages.release()

    # ---- what the run says ---------------------------------------------------------------------------------------
    def io_seconds(self) -> float:
        return sum(m.io_wait_seconds for m in [self.model, *self.others])

    def check_checkpoint_space(self, directory: Path) -> None:
        """Refuse at start, not at the first save hours later, a run whose checkpoint cannot fit: a fully
        fine-tuned one holds every weight in float32 and AdamW's two moments, 12 bytes a parameter (39 GB for a 3B
        model); a LoRA run's adapters are small beside the store it has already written."""
        if self.train_base:
            needed = 12 * sum(_unit_numels(self.model.store.args).values())
            check_free_space(directory, needed, "a checkpoint of this run", "RUN_DIR")

    def describe(self, micro_batches: int, micro_batch: int, seq_len: int) -> str:
        """The start-up line: what streams, the bytes each step reads and writes, and the peak memory expected
        for weights, gradients, optimizer state, activations and the heap's slack (beyond the process's own)."""
        model, store = self.model, self.model.store
        sizes = {u: sum(f.stat().st_size for f in [store.path("weights", u)]) for u in store.units}
        blocks = sum(v for u, v in sizes.items() if u.startswith("layers."))
        outer = sum(v for u, v in sizes.items() if not u.startswith("layers."))
        numels = _unit_numels(store.args)
        params = sum(numels.values())
        c = model.compute_dtype.itemsize
        matrix = next(t for t in store.mapped("layers.0").values() if t.dim() == 2)
        stored, held_dtype = matrix.dtype, model._block_dtype(matrix)
        held = held_dtype.itemsize
        cast = f"{'up' if held > stored.itemsize else ''}cast to {str(held_dtype).removeprefix('torch.')}"
        holding = "held as stored" if held_dtype == stored else f"{cast} as each block arrives"
        a = store.args
        tokens = micro_batch * seq_len
        block_params = numels["layers.0"]
        block_activations = tokens * (6 * a.dim + 3 * a.ffn_hidden_dim) * 4 * 2  # one block's, and their gradients
        activations = (a.n_layers * block_activations if model.keep_activations  # all kept: no recompute
                       else a.n_layers * tokens * a.dim * c + block_activations)
        taped = [m for m in model.modules() if isinstance(getattr(m, "dropout", None), TapedDropout)]
        masks = 0 if model.keep_activations else tokens * sum(m.weight.shape[1] for m in taped)  # a byte an input
        peak = 2 * block_params * held + activations + masks + model.trim_heap.slack  # freed, not yet trimmed
        if self.train_base:
            read = micro_batches * (2 * blocks + outer) + (micro_batches + 1) * 4 * params + 3 * 4 * params + outer
            written = micro_batches * 4 * params + 3 * 4 * params
            peak += 2 * 4 * (numels.get("tok_embeddings", 0) + numels.get("output", 0)) + 4 * 4 * max(numels.values())
            what = "every weight, its gradient and its AdamW state"
        else:
            read, written = micro_batches * 2 * blocks, 0  # also keeping activations: the backward reads them back
            adapters = sum(p.numel() for p in model.parameters() if p.requires_grad and not p.is_meta)
            peak += held * a.vocab_size * a.dim + 4 * 4 * adapters
            what = "the frozen weights (adapters and their AdamW state in memory)"
        extra = f"; {', '.join(m.store.directory.name for m in self.others)} streamed too" if self.others else ""
        return (f"offload: disk, {store.directory.parent}: {what}, {len(store.units)} units, {_size(blocks + outer)}"
                f" of weights on disk ({str(stored).removeprefix('torch.')}, {holding}), "
                f"{'every activation kept (no recompute)' if model.keep_activations else 'activations'} in "
                f"{str(model.compute_dtype).removeprefix('torch.')} on {self.device}{extra} | per step: ~{_size(read)} read, ~{_size(written)} written | "
                f"expected peak memory ~{_size(peak)} beyond the process's own | {'; '.join(self.notes)}")


def _unit_numels(args: ModelArgs) -> dict[str, int]:
    with torch.device("meta"):
        state = Transformer(args).state_dict()
    return {u: sum(state[n].numel() for n in names) for u, names in stored_names(args).items()}
