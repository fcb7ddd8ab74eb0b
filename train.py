"""Train a Llama 3 model. Settings come from `.env` (see .env.example and config.py).

    python train.py                                   # one process (CPU or one GPU)
    torchrun --nproc_per_node 8 train.py              # DDP (or PARALLELISM=fsdp) on one node
    python train.py --checkpoint runs/pretrain/checkpoints/step_000100.pt   # resume exactly

TRAINING_STAGE picks the stage: pretrain, sft (instruct), dpo, orpo or simpo (stages.py holds what differs
between them, one class each); IS_MODEL_DISTILLATION adds a teacher to pretrain or sft; LORA_ENABLED trains adapters in any stage.
A `--checkpoint` of the running stage with training state resumes it exactly; any other checkpoint, a
Meta-format or a Hugging Face directory only gives the starting weights (step 0, fresh optimizer, the data
from its start). `--pretrain_checkpoint`, `--instruct_checkpoint` and `--dpo_checkpoint` do the same and also
check that the checkpoint is of the stage they name.
"""

from __future__ import annotations

import argparse
import math
import random
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_optimizer_state_dict)
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP

import lora
import offload
from checkpoint import Checkpoint, CheckpointError, Provenance, TrainingState as SavedTraining, WeightSource, \
    local_model_path, unwrap
from config import Config, ConfigError, exit_on_config_error, load_config
from dataloaders import DataError, StepLoader
from distributed import DistInfo, all_reduce_sum, broadcast_object, setup_distributed, teardown_distributed
from generate import complete
from hardware import DTYPES, PrecisionChoice, autocast_context, choose_precision, peak_flops, plausible_mfu
from hellaswag_utils import HellaSwagDataError, as_metrics, format_result, load_examples
from hellaswag_utils import evaluate as hellaswag_evaluate
from metrics import RunLogger, format_step_line
from model import IGNORE_INDEX, ModelArgs, Transformer
from offload import AdamWSettings, OffloadError, RunOffload
from speedups import exit_without_teardown, keep_freed_memory_on_cpu, reordered_linears
from stages import TEXT_BYTES, TEXT_NATS, Distillation, Setting, Stage, build_stage, check_teacher, stage_class
from tokenizer import load_tokenizer

RESUME_FLAGS = {"pretrain": "pretrain_checkpoint", "sft": "instruct_checkpoint", "dpo": "dpo_checkpoint"}


class SetupError(ValueError):
    """A run that cannot start as configured; printed as one line."""


# ---- batch arithmetic, learning rate -----------------------------------------------------------------
@dataclass(frozen=True)
class BatchPlan:
    micro_batch: int  # sequences (pairs for DPO) per forward on one rank
    seq_len: int
    world_size: int
    grad_accum: int  # micro-batches per optimizer step on each rank

    @property
    def samples_per_step(self) -> int:
        return self.micro_batch * self.world_size * self.grad_accum

    @property
    def tokens_per_step(self) -> int:
        return self.samples_per_step * self.seq_len

    @classmethod
    def derive(cls, cfg: Config, world_size: int) -> "BatchPlan":
        per_micro_step = cfg.max_batch_size * cfg.max_seq_len * world_size
        if cfg.total_batch_size % per_micro_step:
            raise SetupError(
                f"TOTAL_BATCH_SIZE={cfg.total_batch_size} is not a multiple of MAX_BATCH_SIZE x MAX_SEQ_LEN x world "
                f"size = {cfg.max_batch_size} x {cfg.max_seq_len} x {world_size} = {per_micro_step}")
        return cls(cfg.max_batch_size, cfg.max_seq_len, world_size, cfg.total_batch_size // per_micro_step)

    def describe(self, unit: str) -> str:
        rows = "pairs" if unit == "pairs" else "seqs"
        return (f"batch: {self.tokens_per_step:,} token positions/step = {self.micro_batch} {rows} x {self.seq_len} "
                f"tokens x {self.world_size} ranks x {self.grad_accum} accumulation steps")


def lr_at(step: int, cfg: Config) -> float:
    """Learning rate of the optimizer step that follows `step` completed steps: linear warmup reaching
    MAX_LR on the WARMUP_STEPS-th step, then cosine decay to MIN_LR at MAX_STEPS."""
    if step < cfg.warmup_steps:
        return cfg.max_lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.max_lr - cfg.min_lr)


# ---- building blocks --------------------------------------------------------------------------------------
def model_args(cfg: Config, vocab_size: int) -> ModelArgs:
    return ModelArgs(
        dim=cfg.dim, n_layers=cfg.n_layers, n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads, vocab_size=vocab_size,
        multiple_of=cfg.multiple_of, ffn_dim_multiplier=cfg.ffn_dim_multiplier, norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta, use_scaled_rope=cfg.use_scaled_rope, rope_scale_factor=cfg.rope_scale_factor,
        rope_low_freq_factor=cfg.rope_low_freq_factor, rope_high_freq_factor=cfg.rope_high_freq_factor,
        rope_original_max_seq_len=cfg.rope_original_max_seq_len, max_seq_len=cfg.max_seq_len,
        tie_word_embeddings=cfg.tie_word_embeddings)


def build_model(cfg: Config, vocab_size: int, device: torch.device, args: Optional[ModelArgs] = None) -> Transformer:
    """Initialised directly on its device: no rank holds a host copy of the whole model on the way.
    The shape is the .env's unless `args` (a checkpoint's) is given."""
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    with torch.device(device):
        return Transformer(args or model_args(cfg, vocab_size))


def build_optimizer(model: torch.nn.Module, cfg: Config, device: torch.device) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; weight decay on matrices (and embeddings) only, never on norm gains."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    # one fused kernel per step: on CPU too it is 3x faster than the default, a loop over the
    # parameters (torch has no CPU foreach kernels): 42 vs 130 ms for 90M parameters on a 2-core VM
    fused = device.type in ("cuda", "cpu")
    return torch.optim.AdamW(groups, lr=cfg.max_lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps, fused=fused)


def describe_parameters(model: Transformer) -> str:
    total = model.num_params()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if trainable < total:
        return f"{total:,} parameters, {trainable:,} trainable ({100 * trainable / total:.2f}%: LoRA adapters)"
    embedding = model.tok_embeddings.weight.numel()
    if model.args.tie_word_embeddings:  # a tied embedding is also the output layer: "without" would subtract none
        return f"{total:,} parameters (of which {embedding:,} in the embedding, tied to the output layer)"
    return f"{total:,} parameters ({model.num_params(exclude_embeddings=True):,} without the input embedding)"


@dataclass(frozen=True)
class StepFlops:
    """Training FLOPs per token: `body` for every input position (the blocks, attention, the embedding's share of
    nothing), `head` for each position whose target meets the output layer (SFT and DPO skip the others).
    6N + attention as model.flops_per_token counts it, less the weight-gradient matmuls (2 per parameter and
    token) that frozen matrices skip: a LoRA step computes about 4N, not 6N."""
    body: float
    head: float

    @classmethod
    def of(cls, model: Transformer, seq_len: int) -> "StepFlops":
        frozen = sum(p.numel() for n, p in model.named_parameters()
                     if not p.requires_grad and p.dim() >= 2 and not n.startswith(("tok_embeddings", "output")))
        output = model.args.dim * model.args.vocab_size
        head = (6 if model.output.weight.requires_grad else 4) * output
        return cls(model.flops_per_token(seq_len) - 6 * output - 2 * frozen, head)

    def per_step(self, input_tokens: int, trained_tokens: int) -> float:
        return self.body * input_tokens + self.head * trained_tokens


def parallelize(model: Transformer, cfg: Config, d: DistInfo) -> torch.nn.Module:
    """DDP keeps a full replica per rank; FSDP2 shards every block and the root in place, so
    parameters, gradients and optimizer state are split over the ranks."""
    if d.world_size == 1 or isinstance(model, offload.StreamedTransformer):  # offload: RunOffload reduces instead
        return model
    if cfg.parallelism == "fsdp":
        for layer in model.layers:
            fully_shard(layer)
        fully_shard(model)
        return model
    return DDP(model, device_ids=[d.device.index] if d.device.type == "cuda" else None)


def gradient_sync(model: torch.nn.Module, enabled: bool):
    """Gradients are reduced across ranks only on the last micro-step of an optimizer step."""
    model = getattr(model, "_orig_mod", model)  # under COMPILE the wrapper is neither DDP nor FSDP
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(enabled)
        return nullcontext()
    if isinstance(model, DDP) and not enabled:
        return model.no_sync()
    return nullcontext()


# ---- where the weights come from ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Start:
    """What a run starts from: nothing, weights only (another stage's checkpoint, a Meta-format or Hugging Face
    directory, a checkpoint without training state such as a merged one), or a checkpoint of this stage,
    resumed exactly. `source` is the weights, opened once."""
    path: Optional[str] = None
    resume: bool = False
    flag: str = ""
    source: Optional[WeightSource] = None
    line: str = ""  # how the run starts from it: "resuming sft from PATH at step N" / "starting from the weights of ..."

    def __post_init__(self):  # a Start made from a path alone (tests, tools) opens it and describes it here
        if self.path is not None and self.source is None:
            object.__setattr__(self, "source", WeightSource.open(self.path))
        if self.source is not None and not self.line:
            object.__setattr__(self, "line", f"resuming {self.source.stage} from {self.path} at step "
                                             f"{self.source.record.training.step}" if self.resume else
                               f"starting from the weights of {self.source.describe()} {self.path}")

    @classmethod
    def from_args(cls, args: argparse.Namespace, cfg: Config) -> "Start":
        flags = ("checkpoint", *RESUME_FLAGS.values())
        given = [(flag, getattr(args, flag)) for flag in flags if getattr(args, flag, None)]
        if len(given) > 1:
            raise SetupError(f"give one starting point, not {' and '.join('--' + f for f, _ in given)}")
        if not given:
            return cls()
        flag, path = given[0]
        if not Path(path).exists():
            raise CheckpointError(f"--{flag} {path}: not found (expected a checkpoint file of this project, a "
                                  f"Meta-format directory or a Hugging Face model directory)")
        source = WeightSource.open(path)
        # --checkpoint: the recorded stage decides; a --<stage>_checkpoint must also be of that stage.
        flag_stage = next((stage for stage, f in RESUME_FLAGS.items() if f == flag), source.stage)
        if source.stage is not None and source.stage != flag_stage:
            raise SetupError(f"--{flag} {path}: this is a {source.stage} checkpoint; pass it as "
                             f"--{RESUME_FLAGS.get(source.stage, 'checkpoint')}")
        return cls(path, resume=source.stage == cfg.training_stage and source.resumable, flag=flag, source=source)


# The .env keys that build a dimension of a shape, and its name; every other dimension is its own key.
_BUILT_BY = {"ffn_hidden_dim": ("MULTIPLE_OF", "FFN_DIM_MULTIPLIER")}
_BUILT_NAME = {"ffn_hidden_dim": "an FFN hidden size of"}
_ROPE_SCALING = ("rope_scale_factor", "rope_low_freq_factor", "rope_high_freq_factor", "rope_original_max_seq_len")


def built_shape(args: ModelArgs, rope_scaling: bool) -> dict:
    """The dimensions a shape builds: the FFN hidden size rather than the rule that rounds to it (a Hugging Face
    import stores whatever multiple_of and multiplier give its intermediate_size), the rope scaling fields only
    where scaling is on (`rope_scaling`), and no context length (a training setting, not shape)."""
    shape = {k: v for k, v in asdict(args).items() if k not in ("multiple_of", "ffn_dim_multiplier", "max_seq_len")}
    shape["ffn_hidden_dim"] = args.ffn_hidden_dim
    return {k: v for k, v in shape.items() if rope_scaling or k not in _ROPE_SCALING}


def shape_conflicts(cfg: Config, saved: ModelArgs, vocab_size: int) -> str:
    """'DIM=128 (the .env) vs 64 (the checkpoint), ...' for the dimensions that keys the .env or the environment
    set explicitly build differently from the checkpoint's."""
    wanted, theirs = (built_shape(a, saved.use_scaled_rope) for a in (model_args(cfg, vocab_size), saved))
    conflicts = []
    for dim, value in wanted.items():
        keys = [k for k in _BUILT_BY.get(dim, (dim.upper(),)) if k in cfg.sources]
        if not keys or value == theirs[dim]:
            continue
        sources = ", ".join(sorted({cfg.sources[k] for k in keys}))
        if dim in _BUILT_BY:
            named = ", ".join(f"{k}={getattr(cfg, k.lower())}" for k in keys)
            conflicts.append(f"{named} ({sources}) build {_BUILT_NAME[dim]} {value} vs {theirs[dim]} (the checkpoint)")
        else:
            conflicts.append(f"{keys[0]}={value} ({sources}) vs {theirs[dim]} (the checkpoint)")
    return ", ".join(conflicts)


# The rotary settings a weights-only start takes from the .env or the environment where they are set there.
_ROTARY_KEYS = ("ROPE_THETA", "USE_SCALED_ROPE", "ROPE_SCALE_FACTOR", "ROPE_LOW_FREQ_FACTOR", "ROPE_HIGH_FREQ_FACTOR",
                "ROPE_ORIGINAL_MAX_SEQ_LEN")


def rotary_changes(cfg: Config, saved: ModelArgs) -> dict:
    """{field: the .env's value} for the rotary keys set explicitly (cfg.sources) that differ from `saved`; the
    scaling keys only where scaling is on after the change (otherwise they compute nothing)."""
    scaled = cfg.use_scaled_rope if "USE_SCALED_ROPE" in cfg.sources else saved.use_scaled_rope
    keys = [k for k in _ROTARY_KEYS if k in cfg.sources and (scaled or k in ("ROPE_THETA", "USE_SCALED_ROPE"))]
    return {k.lower(): getattr(cfg, k.lower()) for k in keys if getattr(cfg, k.lower()) != getattr(saved, k.lower())}


def extend_context(model: Transformer, cfg: Config, saved_max_seq_len: Optional[int]) -> str:
    """A weights-only start trains at MAX_SEQ_LEN with the rotary settings the .env or the environment set
    explicitly (rotary_changes), in place of the checkpoint's: a model pretrained at 256 tokens fine-tuned at
    1,024 with a larger ROPE_THETA, say. The frequencies are computed from model.args at every forward, so
    changing them is all it takes, and the next checkpoint records them. Returns the line that says
    old -> new ('' when nothing changed); `saved_max_seq_len`: the context the checkpoint records, if any."""
    changes = rotary_changes(cfg, model.args)
    parts = [f"MAX_SEQ_LEN {saved_max_seq_len} -> {cfg.max_seq_len} ({cfg.sources.get('MAX_SEQ_LEN', 'default')})"] \
        if saved_max_seq_len not in (None, cfg.max_seq_len) else []
    parts += [f"{k.upper()} {getattr(model.args, k)} -> {v} ({cfg.sources[k.upper()]})" for k, v in changes.items()]
    model.args = replace(model.args, **changes)
    return f"context: {', '.join(parts)}" if parts else ""


@dataclass
class Initial:
    """The model to train and what it came from."""
    model: Transformer
    ckpt: Optional[Checkpoint]  # the resumed checkpoint (training state), or None
    init: Optional[dict]  # {"path", "sha256"} of the starting weights (a LoRA base, a DPO reference), None: scratch
    note: str


def starting_weights(source: WeightSource, device: torch.device, max_seq_len: int,
                     dtype: torch.dtype = torch.float32) -> Transformer:
    """Any loadable weights, in float32 by default (master weights); a LoRA run's checkpoint gives its base with
    the adapters merged in (WeightSource.load_model)."""
    return source.load_model(device=device, dtype=dtype, max_seq_len=max_seq_len)


def initial_model(cfg: Config, start: Start, tokenizer, vocab_size: int, device: torch.device,
                  settings: Optional[lora.LoRASettings], offloaded: Optional[RunOffload] = None) -> Initial:
    """Build the model for a fresh, weights-only or resumed start, with LoRA adapters when enabled; `offloaded`:
    a streamed model whose weights it puts in the offload store instead of memory."""
    if start.resume:
        return resumed_model(cfg, start, tokenizer, vocab_size, device, settings, offloaded)
    reference = None  # the starting weights' content reference, where the run needs one
    if start.path is None:
        model, init, note = build_model(cfg, vocab_size, device), None, ""
        if offloaded:
            model = offloaded.from_model("policy", model)
    else:
        source = start.source
        tokenizer_note = source.check_tokenizer(tokenizer)
        if offloaded:  # the store is keyed by the weights' content: computed once, also for the run's record
            reference = lora.base_reference(start.path)
            model = offloaded.from_source("policy", start.path, source.model_args(cfg.max_seq_len),
                                          reference["sha256"])
        else:
            model = starting_weights(source, device, cfg.max_seq_len).train()
        changes = rotary_changes(cfg, model.args)
        if settings and changes:
            raise SetupError(f"{', '.join(k.upper() for k in changes)}: changing the rotary settings of a LoRA run "
                             f"is not supported (its adapters are loaded onto the base's own); train without LoRA, "
                             f"or unset them to keep the checkpoint's")
        rope = source.rope_note() if "rope_scale_factor" not in changes else None
        context = extend_context(model, cfg, source.saved_max_seq_len)
        if model.args.vocab_size < tokenizer.n_words:
            raise CheckpointError(f"{start.path}: its vocabulary has {model.args.vocab_size} tokens, fewer than the "
                                  f"tokenizer's {tokenizer.n_words}")
        # A content hash where the run will need these weights again (LoRA's base, DPO's reference). An adapter
        # checkpoint is recorded as it is: it records its own base by hash, and load_model merges the chain.
        init = ((reference or lora.base_reference(start.path)) if settings or stage_class(cfg).needs_starting_weights
                else {"path": str(Path(start.path).resolve())})
        note = (f"{start.line} (step 0, fresh optimizer, the data from its start"
                f"{', best validation reset' if source.record else ''}); the model shape is theirs")
        if source.adapters:
            note += f"; its LoRA adapters merged onto {(source.adapters.base or {}).get('path', 'the weights it holds')}"
        if shape_conflicts(cfg, model.args, vocab_size):
            note += f" ({shape_conflicts(cfg, model.args, vocab_size)}: ignored)"
        note += f"; {rope}" if rope and model.args.use_scaled_rope else ""
        note += f"\n{context}" if context else ""
        note += f"\n{tokenizer_note}" if tokenizer_note else ""
    if settings and offloaded:
        offloaded.add_adapters(model, settings, cfg.seed)
    elif settings:
        lora.with_new_adapters(model, settings, cfg.seed)  # adapters start identical on every rank
    model.activation_checkpointing = cfg.activation_checkpointing
    return Initial(model.train(), None, init, note)


def resumed_model(cfg: Config, start: Start, tokenizer, vocab_size: int, device: torch.device,
                  settings: Optional[lora.LoRASettings], offloaded: Optional[RunOffload] = None) -> Initial:
    record = start.source.record
    start.source.check_tokenizer(tokenizer)
    saved_args = replace(record.model_args, max_seq_len=cfg.max_seq_len)
    if shape_conflicts(cfg, saved_args, vocab_size):
        raise CheckpointError(f"{start.path}: model shape differs: {shape_conflicts(cfg, saved_args, vocab_size)}; "
                              f"a resumed run keeps its checkpoint's shape and rotary settings (a later stage "
                              f"started from its weights takes the .env's)")
    if record.model_args.max_seq_len != cfg.max_seq_len:
        raise CheckpointError(f"{start.path}: MAX_SEQ_LEN={cfg.max_seq_len} ({cfg.sources.get('MAX_SEQ_LEN', 'default')}"
                              f") vs {record.model_args.max_seq_len} (the checkpoint); a resumed run keeps its context "
                              f"(a later stage started from its weights takes the .env's)")
    adapters = record.provenance.adapters
    if (adapters is not None) != bool(settings):
        raise CheckpointError(f"{start.path}: {'a LoRA' if adapters else 'not a LoRA'} run; set LORA_ENABLED="
                              f"{'true' if adapters else 'false'} to resume it")
    if settings and offloaded:
        model = offloaded.resumed_lora(record, settings, cfg.max_seq_len)
    elif settings:
        model = lora.resumed_adapted_model(record, settings, device, cfg.max_seq_len)
    elif offloaded:
        model = offloaded.from_weights("policy", record.weights, saved_args)
    else:
        model = build_model(cfg, vocab_size, device, saved_args)
        model.load_state_dict(record.weights)
    model.activation_checkpointing = cfg.activation_checkpointing
    return Initial(model, record, record.provenance.init, "")


def initial_weights_fn(cfg: Config, init: Optional[dict], vocab_size: int, device: torch.device,
                       policy: ModelArgs, offloaded: Optional[RunOffload] = None) -> Callable[[], Transformer]:
    """A fresh copy of the weights the run started from (DPO's reference without LoRA), with the policy's rotary
    settings: those of a context-extended start (extend_context) are not in the file it started from.
    `offloaded`: streamed from a store of its own (OFFLOAD_DIR/reference)."""
    def load() -> Transformer:
        if init is None:
            model = build_model(cfg, vocab_size, device)
            if offloaded:
                model = offloaded.from_model("reference", model)
        else:
            path = lora.verify_base(init) if init.get("sha256") else init["path"]
            source = WeightSource.open(path)
            model = offloaded.from_source("reference", path, source.model_args(cfg.max_seq_len),
                                          init.get("sha256") or lora.base_reference(path)["sha256"]) \
                if offloaded else starting_weights(source, device, cfg.max_seq_len)
        model.args = replace(model.args, **{k.lower(): getattr(policy, k.lower()) for k in _ROTARY_KEYS})
        return model
    return load


def load_teacher(cfg: Config, tokenizer, vocab_size: int, precision: PrecisionChoice, d: DistInfo,
                 offloaded: Optional[RunOffload] = None) -> tuple[Transformer, Optional[str]]:
    """Frozen, eval mode, on the student's device; bf16 when asked (or when training in bf16). Under FSDP its
    blocks are sharded over the ranks (the root stays whole: the loss reads its output weight directly).
    Also returns a note when the teacher carries no tokenizer to compare with the student's."""
    auto = torch.bfloat16 if precision.precision == "bf16" else torch.float32
    dtype = {"auto": auto, "bf16": torch.bfloat16, "fp32": torch.float32}[cfg.teacher_dtype]
    path = agreed(lambda: local_model_path(cfg.teacher_model_checkpoint), d)  # a hub name: rank 0 downloads
    source = WeightSource.open(local_model_path(path))  # the other ranks find it in the hub's cache
    note = source.check_tokenizer(tokenizer, f"TEACHER_MODEL_CHECKPOINT={cfg.teacher_model_checkpoint}")
    if offloaded:  # streamed from OFFLOAD_DIR/teacher, computed in the teacher's dtype
        teacher = offloaded.from_source("teacher", path, source.model_args(cfg.max_seq_len),
                                        lora.base_reference(path)["sha256"], compute_dtype=dtype)
    else:
        teacher = starting_weights(source, d.device, cfg.max_seq_len, dtype)
    check_teacher(teacher, vocab_size, tokenizer, cfg.teacher_model_checkpoint)
    teacher.requires_grad_(False).eval()
    if d.world_size > 1 and cfg.parallelism == "fsdp":
        for layer in teacher.layers:
            fully_shard(layer)
    return teacher, note


# ---- run state, checkpoints, signals -----------------------------------------------------------------------
@dataclass
class Progress:
    step: int = 0  # optimizer steps completed
    best_val_loss: float = float("inf")
    validations_without_improvement: int = 0
    wandb_run_id: Optional[str] = None
    extra: dict = field(default_factory=dict)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        # This rank's device only: the state of every visible GPU would not restore on a machine with
        # fewer, and reading it creates a CUDA context on each.
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    cuda = state.get("cuda")
    if isinstance(cuda, (list, tuple)):  # checkpoints written before: one state per visible GPU
        cuda = cuda[0] if cuda else None
    if cuda is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda)


def step_of(path: Path) -> int:
    return int(path.stem.split("_", 1)[1])


class CheckpointKeeper:
    """Step checkpoints of one run directory, kept by write order: the last KEEP_LAST_CHECKPOINTS written stay,
    the one just written always among them. Files already there when the run starts were written before any
    of this run's (train.py refuses to start where it would overwrite one), so they come first by step."""

    def __init__(self, directory: Path, keep: int):
        self.directory, self.keep = directory, keep
        self.written = sorted(directory.glob("step_*.pt"), key=step_of) if directory.is_dir() else []

    def path_for(self, step: int) -> Path:
        return self.directory / f"step_{step:06d}.pt"

    def saved(self, path: Path) -> None:
        self.written = [p for p in self.written if p != path] + [path]
        for stale in self.written[: -self.keep]:
            stale.unlink(missing_ok=True)
        self.written = self.written[-self.keep:]


def check_run_dir(cfg: Config, start: Start, first_step: int, overwrite: bool) -> list[str]:
    """Never overwrite another run's files without being told to: a fresh run needs an empty RUN_DIR, a resumed
    one must not write over checkpoints after its starting step. Returns the lines to print; with --overwrite
    the files in the way are removed (saying so)."""
    ckpt_dir = cfg.run_path / "checkpoints"
    existing = sorted(ckpt_dir.glob("step_*.pt"), key=step_of) if ckpt_dir.is_dir() else []
    metrics = cfg.run_path / "metrics.jsonl"
    if start.resume and Path(start.path).resolve().parent == ckpt_dir.resolve():  # this run, continued
        in_the_way = [p for p in existing if step_of(p) > first_step]
        what = f"checkpoints after step {first_step} ({in_the_way[-1].name} ...)" if in_the_way else ""
    else:
        in_the_way = existing + ([metrics] if metrics.is_file() and metrics.stat().st_size else [])
        what = f"a run ({', '.join(p.name for p in in_the_way[-2:])})" if in_the_way else ""
    if not in_the_way:
        return []
    if not overwrite:
        hint = (f"resume it with --checkpoint {existing[-1]}, " if existing and not start.resume
                else "")
        raise SetupError(f"RUN_DIR {cfg.run_path} already holds {what}, which this run would overwrite: {hint}"
                         f"set another RUN_DIR, or pass --overwrite to replace them")
    for path in in_the_way:
        path.unlink()
    return [f"--overwrite: removed {len(in_the_way)} file(s) of an earlier run from {cfg.run_path}"]


FULL_STATE = StateDictOptions(full_state_dict=True, cpu_offload=True)


def restore_training_state(ckpt: Checkpoint, model: Transformer, optimizer: Optional[torch.optim.Optimizer],
                           scaler: torch.amp.GradScaler, loader: StepLoader, reset_optimizer: bool,
                           offloaded: Optional[RunOffload] = None) -> Progress:
    """Optimizer (sharded again under FSDP; into the offload store for offloaded full fine-tuning), loss scaler,
    data position and RNG from a checkpoint."""
    saved = ckpt.training
    if not reset_optimizer:
        if saved.optimizer is None:
            raise CheckpointError("the checkpoint holds no optimizer state; pass --reset-optimizer to start a fresh one")
        if optimizer is None:
            offloaded.load_optimizer_state(saved.optimizer)
        else:
            set_optimizer_state_dict(model, optimizer, saved.optimizer, options=StateDictOptions(full_state_dict=True))
        scaler.load_state_dict(saved.scaler)
    if saved.dataloader is not None:
        loader.load_state_dict(saved.dataloader)
    if saved.rng is not None:
        set_rng_state(saved.rng)
    return Progress(step=int(saved.step), best_val_loss=float(saved.best_val_loss),
                    validations_without_improvement=int(saved.validations_without_improvement),
                    wandb_run_id=saved.wandb_run_id)


class StopRequest:
    """SIGINT/SIGTERM set a flag, acknowledged at once; the ranks agree on it at the end of the step in
    progress, which is then saved, so preemption loses nothing and never runs a step more."""

    def __init__(self, say: Callable[[str], None]):
        self.requested, self.say = False, say
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.requested:  # second Ctrl-C: the user really means it
            raise KeyboardInterrupt
        self.requested = True
        self.say(f"{signal.Signals(signum).name}: stopping after this step, saving a checkpoint... "
                 f"(again to quit at once)")


# ---- the step ---------------------------------------------------------------------------------------------
@dataclass
class OptimizerStep:
    """One optimizer step over this rank's micro-batches, through `model` (the bare model or its DDP, FSDP or
    compiled wrapper) and the stage's loss.

    The loss is the stage's summed loss divided by the number of units it trains (target tokens, pairs) over
    all micro-batches and ranks, not averaged per micro-batch, so masked data and uneven micro-batches weigh
    correctly; the stage's extra figures are averaged the same way. A step whose batches train nothing
    updates nothing."""
    model: torch.nn.Module
    stage: Stage
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    cfg: Config
    d: DistInfo
    offload: Optional[RunOffload] = None  # OFFLOAD=disk: gradients reduced over ranks by it; full fine-tuning's
    # gradients and AdamW state are stored, and it makes the update

    def __call__(self, batches: list[dict], lr: float, stop: StopRequest) -> tuple[Optional[dict], bool]:
        """(figures, stop after this step), or (None, True) when the ranks agree to stop before it. Two host
        syncs: one before the backward passes, for the global counts and a stop vote (a signal that came after
        the last step's vote stops the run before this step starts), one after, for the figures and a second
        vote (a signal during this step stops after it)."""
        counts, stop_votes = self.all_reduced([self.local_counts(batches)], stop)
        n_units, n_inputs, n_trained = counts.tolist()
        if stop_votes:
            return None, True
        sums = self.backward(batches, n_units)
        grad_norm = self.update(lr, n_units)
        names = list(sums)
        totals, stop_votes = self.all_reduced([sums[k] for k in names], stop)
        metrics = {k: v / max(n_units, 1.0) for k, v in zip(names, totals.tolist())}
        metrics.update(lr=lr, grad_norm=grad_norm, units=int(n_units), input_tokens=int(n_inputs),
                       trained_tokens=int(n_trained))
        return metrics, stop_votes

    def local_counts(self, batches: list[dict]) -> torch.Tensor:
        """(3,) units trained, input tokens (for throughput) and target tokens of this rank's micro-batches."""
        return torch.stack([torch.stack([self.stage.count(b).float(), b["input_tokens"].float(),
                                         (b["targets"] != IGNORE_INDEX).sum().float()]) for b in batches]).sum(0)

    def all_reduced(self, values: list[torch.Tensor], stop: StopRequest) -> tuple[torch.Tensor, bool]:
        """The values summed over ranks, and whether any rank has been asked to stop."""
        vote = torch.tensor([float(stop.requested)], device=self.d.device)
        totals = all_reduce_sum(torch.cat([v.reshape(-1).float() for v in values] + [vote]))
        return totals[:-1], bool(totals[-1] > 0)

    def backward(self, batches: list[dict], n_units: float) -> dict[str, torch.Tensor]:
        """Gradients of the step's loss, accumulated over the micro-batches; returns the summed figures."""
        sums: dict[str, torch.Tensor] = {}
        for i, batch in enumerate(batches):
            with gradient_sync(self.model, enabled=i == len(batches) - 1):
                with autocast_context(self.cfg.training_precision, self.d.device):
                    loss, extras = self.stage.loss(self.model, batch)
                # DDP averages gradients over ranks, hence the world_size factor.
                self.scaler.scale(loss * (self.d.world_size / max(n_units, 1.0))).backward()
            for name, value in {"loss": loss, **extras}.items():
                sums[name] = sums.get(name, 0) + value.detach().float()
        return sums

    def update(self, lr: float, n_units: float) -> float:
        """Clip, step and clear the gradients; returns their global norm before clipping."""
        clip = self.cfg.grad_clip if self.cfg.grad_clip > 0 else math.inf
        if self.offload is not None and self.offload.train_base:  # the same clip and AdamW, unit by unit
            return self.offload.update(lr, clip, n_units)
        if self.offload is not None:
            self.offload.reduce_memory_grads()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP
            grad_norm = grad_norm.full_tensor()
        if n_units > 0 and (torch.isfinite(grad_norm) or self.scaler.is_enabled()):
            self.scaler.step(self.optimizer)  # with fp16 loss scaling the scaler itself skips non-finite steps
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm.item()


def to_device(batch: dict, device: torch.device) -> dict:
    pin = device.type == "cuda"
    return {k: (v.pin_memory() if pin else v).to(device, non_blocking=pin) for k, v in batch.items()}



@torch.no_grad()
def validate(model, stage: Stage, loader: StepLoader, cfg: Config, d: DistInfo) -> dict:
    """The stage's loss and figures over the same VALIDATION_STEPS micro-batches every time, summed over ranks
    (in float64) and divided by the global count of trained units.

    Stages whose loss is a cross-entropy over text (pretraining, SFT, distillation's `ce`) also give `val_bpb`:
    the summed loss of the targets that stand for text over all micro-batches and ranks, in bits, divided by
    the UTF-8 bytes of those targets (stages.text_sums), so runs with different tokenizers compare."""
    loader.reset()
    was_training = model.training
    model.eval()
    sums: dict[str, torch.Tensor] = {}
    count = torch.zeros((), dtype=torch.float64, device=d.device)
    for _ in range(cfg.validation_steps):
        batch = to_device(loader.next_batch(), d.device)
        with autocast_context(cfg.training_precision, d.device):
            loss, extras = stage.validation_loss(model, batch)
        for name, value in {"loss": loss, **extras}.items():
            sums[name] = sums.get(name, 0) + value.double()
        count += stage.count(batch).double()
    model.train(was_training)
    names = list(sums)
    totals = dict(zip(names + ["count"], all_reduce_sum(torch.stack([sums[k] for k in names] + [count])).tolist()))
    nats, nbytes = totals.pop(TEXT_NATS, None), totals.pop(TEXT_BYTES, None)
    count = max(totals.pop("count"), 1.0)
    figures = {"val_loss": totals.pop("loss") / count}
    if nbytes is not None:
        figures["val_bpb"] = nats / math.log(2) / nbytes if nbytes else float("nan")
    return figures | {f"val_{k}": v / count for k, v in totals.items()}


def read_prompts(stage: Stage, tokenizer) -> list[str]:
    """Sample-generation prompts (user messages for chat stages), checked against the context now: a prompt
    too long would otherwise fail at the last step, before its checkpoint."""
    path, cfg, chat = stage.prompts_path(), stage.cfg, stage.chat
    if not path.is_file():
        raise SetupError(f"GENERATION_PROMPTS_FILE={str(path)!r}: file not found (one prompt per line)")
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise SetupError(f"GENERATION_PROMPTS_FILE={str(path)!r} holds no prompt")
    for number, prompt in enumerate(prompts, 1):
        ids = (tokenizer.encode_chat([{"role": "user", "content": prompt}]) if chat
               else tokenizer.encode(prompt, bos=True, eos=False))
        if len(ids) >= cfg.max_seq_len:
            raise SetupError(f"GENERATION_PROMPTS_FILE={str(path)!r}: prompt {number} has "
                             f"{len(ids)} tokens, but MAX_SEQ_LEN={cfg.max_seq_len} leaves no room to generate")
    return prompts



# ---- the run ----------------------------------------------------------------------------------------------
def resolved_precision(cfg: Config, d: DistInfo) -> tuple[Config, PrecisionChoice]:
    """The run's settings with TRAINING_PRECISION resolved once (checkpoints record what ran), and the choice."""
    precision = choose_precision(cfg.training_precision, d.device)
    check_precision_fits_device(precision, d.device)
    return replace(cfg, training_precision=precision.precision), precision


def tokenizer_and_vocab(cfg: Config) -> tuple[object, int]:
    tokenizer = load_tokenizer(cfg.tokenizer_path or None)
    vocab_size = cfg.vocab_size or tokenizer.n_words
    if vocab_size < tokenizer.n_words:
        raise SetupError(f"VOCAB_SIZE={cfg.vocab_size} is smaller than the tokenizer's {tokenizer.n_words} tokens")
    return tokenizer, vocab_size


def resume_lines(start: Start, args: argparse.Namespace, resumed_from: int, step: int,
                 saved_tokens_per_step: Optional[int], tokens_per_step: int) -> list[str]:
    """What a resumed run says about where it continues, and a batch geometry that changed."""
    lines = [start.line + (f", continuing as step {step}" if step != resumed_from else "")
             + (", fresh optimizer" if args.reset_optimizer else "")]
    if saved_tokens_per_step and saved_tokens_per_step != tokens_per_step:
        lines.append(f"batch geometry changed: {saved_tokens_per_step:,} -> {tokens_per_step:,} token "
                     f"positions per step; the data continues from the same sample position")
    return lines


class Run:
    """A training run, built once by `Run.start` from the settings, the command line and the ranks: the model
    and how it steps, the stage and its data, where figures and checkpoints go, and how far it has come."""

    def __init__(self, cfg: Config, d: DistInfo, model: Transformer, optimizer_step: OptimizerStep,
                 loaders: tuple[StepLoader, StepLoader], tokenizer, plan: BatchPlan, progress: Progress):
        self.cfg, self.d, self.model, self.optimizer_step = cfg, d, model, optimizer_step
        self.stage, self.optimizer, self.scaler = optimizer_step.stage, optimizer_step.optimizer, optimizer_step.scaler
        self.train_loader, self.val_loader = loaders
        self.tokenizer, self.plan, self.progress = tokenizer, plan, progress
        self.sharded = isinstance(model, FSDPModule)
        self.eval_model = torch.compile(model) if cfg.compile else model
        self.keeper = CheckpointKeeper(cfg.run_path / "checkpoints", cfg.keep_last_checkpoints)
        self.settings: Optional[lora.LoRASettings] = None  # set by start: LoRA's settings
        self.init: Optional[dict] = None  # the starting weights' reference
        self.prompts: list[str] = []
        self.hellaswag: Optional[tuple[list, int]] = None
        self.logger: Optional[RunLogger] = None
        self.offload: Optional[RunOffload] = None  # OFFLOAD=disk: the stores, the I/O accounting
        self.figures = self.stage.figures  # what the step line shows beyond the loss
        self.flops, self.peak = StepFlops.of(model, cfg.max_seq_len), 0.0

    @classmethod
    def start(cls, cfg: Config, args: argparse.Namespace, d: DistInfo) -> tuple["Run", int]:
        """Everything the loop needs, checked before the first step; returns the run and its last step."""
        cfg, precision = resolved_precision(cfg, d)
        tokenizer, vocab_size = tokenizer_and_vocab(cfg)
        plan = BatchPlan.derive(cfg, d.world_size)
        settings = lora.LoRASettings.from_config(cfg) if cfg.lora_enabled else None
        start = Start.from_args(args, cfg)
        hellaswag = load_examples(cfg.hellaswag_path or None, cfg.hellaswag_number_of_examples or None) \
            if cfg.hellaswag_every_x_steps else None

        offloaded = start_offload(cfg, d)
        initial = initial_model(cfg, start, tokenizer, vocab_size, d.device, settings, offloaded)
        model = initial.model
        first_step = args.start_step if args.start_step is not None else \
            (int(initial.ckpt.training.step) if initial.ckpt else 0)
        removed = agreed(lambda: check_run_dir(cfg, start, first_step, args.overwrite), d)
        stage = build_stage(Setting(cfg, d, plan.samples_per_step, tokenizer, vocab_size,
                                    initial_weights_fn(cfg, initial.init, vocab_size, d.device, model.args, offloaded)))
        if cfg.is_model_distillation:
            teacher, teacher_note = load_teacher(cfg, tokenizer, vocab_size, precision, d, offloaded)
            stage = Distillation(stage, teacher)
            initial.note = "\n".join(filter(None, [initial.note, teacher_note]))
        prompts = read_prompts(stage, tokenizer)
        loaders = stage.loaders()
        stage.setup(model)

        train_model = parallelize(model, cfg, d)
        optimizer = None if offloaded and offloaded.train_base else build_optimizer(model, cfg, d.device)
        scaler = torch.amp.GradScaler(d.device.type, enabled=precision.precision == "fp16")
        progress = Progress()
        if initial.ckpt is not None:
            progress = restore_training_state(initial.ckpt, model, optimizer, scaler, loaders[0], args.reset_optimizer,
                                              offloaded)
        resumed_from = progress.step
        saved_tokens_per_step = initial.ckpt.training.tokens_per_step if initial.ckpt else None
        initial.ckpt = None
        if start.source:
            start.source.close()  # what it held now lives in the model and the optimizer
        progress.step = first_step

        step = OptimizerStep(torch.compile(train_model) if cfg.compile else train_model, stage, optimizer, scaler,
                             cfg, d, offloaded)
        run = cls(cfg, d, model, step, loaders, tokenizer, plan, progress)
        if offloaded:
            agreed(lambda: offloaded.check_checkpoint_space(cfg.run_path / "checkpoints"), d)
            run.offload, run.figures = offloaded, stage.figures | {"io_share": "io {:.0%}"}
        run.settings, run.init, run.prompts, run.hellaswag = settings, initial.init, prompts, hellaswag
        run.logger = RunLogger(cfg, d.is_main, resume_step=resumed_from if start.resume else 0,
                               wandb_run_id=progress.wandb_run_id, initial_step=progress.step)
        progress.wandb_run_id = run.logger.wandb_run_id
        run.peak, _ = peak_flops(d.device, precision.precision, cfg.mfu_flops_peak)

        lines = [*removed, precision.warning, *run.describe(precision), initial.note]
        if start.resume:
            lines += resume_lines(start, args, resumed_from, progress.step, saved_tokens_per_step, plan.tokens_per_step)
        for line in filter(None, lines):
            run.logger.print(line)
        stop_step = min(cfg.max_steps, args.stop_step if args.stop_step is not None else cfg.max_steps)
        return run, stop_step

    def describe(self, precision: PrecisionChoice) -> list[str]:
        """The start-up lines: the model and where it runs, the stage and its batch, the data and the outputs."""
        cfg, d, stage = self.cfg, self.d, self.stage
        teacher = f" + distillation from {cfg.teacher_model_checkpoint}" if cfg.is_model_distillation else ""
        adapters = f" + LoRA {self.settings.to_dict()}" if self.settings else ""
        return [f"model: {describe_parameters(self.model)}, {(self.flops.body + self.flops.head) / 1e6:.1f} MFLOP/token"
                f" | device {d.device} x {d.world_size}{' (fsdp)' if self.sharded else ''} | {precision.describe()}",
                f"stage: {stage.name}{teacher}{adapters} | {self.plan.describe(stage.unit)}",
                self.offload.describe(self.plan.grad_accum, self.plan.micro_batch, self.plan.seq_len)
                if self.offload else "",
                f"data: {self.train_loader.describe()}, {self.val_loader.describe()} | metrics: {self.logger.path} | "
                f"checkpoints: {self.keeper.directory}"]

    def step(self, stop: StopRequest) -> tuple[Optional[dict], bool]:
        """The next optimizer step, logged; (None, True) when the ranks stopped before it (its batches go back,
        for the checkpoint to resume from them)."""
        t0 = time.perf_counter()
        io_before = self.offload.io_seconds() if self.offload else 0.0
        position = self.train_loader.state_dict()
        batches = [to_device(b, self.d.device) for b in self.train_loader.next_step()]
        t_data = time.perf_counter() - t0
        metrics, stop_all = self.optimizer_step(batches, lr_at(self.progress.step, self.cfg), stop)
        if metrics is None:
            self.train_loader.load_state_dict(position)
            return None, True
        self.progress.step += 1
        step_time = time.perf_counter() - t0
        flops = self.flops.per_step(metrics["input_tokens"], metrics["trained_tokens"])
        metrics.update(tokens_per_s=metrics["input_tokens"] / step_time, step_time_s=step_time,
                       data_share=t_data / step_time, mfu=plausible_mfu(flops / step_time, self.peak * self.d.world_size),
                       epoch=self.train_loader.epoch)
        if self.offload:  # time the step waited for the store (prefetch not done, gradients and updates written)
            metrics["io_share"] = (self.offload.io_seconds() - io_before) / step_time
        step = self.progress.step
        self.logger.advance()
        self.logger.log(step, metrics, format_step_line(step, self.cfg.max_steps, metrics, self.figures)
                        if step % self.cfg.log_every_x_steps == 0 else None)
        if not math.isfinite(metrics["loss"]):
            self.logger.print(f"warning: non-finite loss at step {step}")
        return metrics, stop_all

    def validate(self) -> bool:
        """Log the validation figures; True when early stopping's patience has run out."""
        cfg, progress = self.cfg, self.progress
        figures = validate(self.eval_model, self.stage, self.val_loader, cfg, self.d)
        with autocast_context(cfg.training_precision, self.d.device):
            figures |= {f"val_{k}": v for k, v in self.stage.evaluate(self.model, progress.step, self.sharded).items()}
        val = figures["val_loss"]
        if val < progress.best_val_loss:
            progress.best_val_loss, progress.validations_without_improvement = val, 0
        else:
            progress.validations_without_improvement += 1
        bpb = f" | val_bpb {figures['val_bpb']:.4f}" if "val_bpb" in figures else ""
        extra = "".join(f" | {k[4:]} {v:.4f}" for k, v in figures.items()
                        if k not in ("val_loss", "val_bpb") and isinstance(v, float))
        self.logger.log(progress.step, figures | {"val_perplexity": math.exp(min(val, 50))},
                        f"validation | step {progress.step} | val_loss {val:.4f}{bpb} | "
                        f"best {progress.best_val_loss:.4f}{extra}")
        patience = cfg.early_stopping_patience
        return bool(patience) and progress.validations_without_improvement >= patience

    def save(self) -> None:
        """Called on every rank: FSDP gathers the full weights and optimizer state (rank 0 receives them); rank 0
        writes one file that loads under DDP, FSDP or a single process alike. A LoRA run's checkpoint holds the
        adapters and a reference to its base weights (every weight when there is no base file)."""
        if self.offload:  # the weights (full fine-tuning: and optimizer state) read from the store, unit by unit
            weights, adapters, optim_state = self.offload.checkpoint_state(self.settings, self.init, self.optimizer,
                                                                           FULL_STATE)
        elif self.settings:
            weights, adapters = lora.adapter_weights(self.model, self.settings, self.init)
        else:
            weights, adapters = get_model_state_dict(self.model, options=FULL_STATE), None
        if not self.offload:
            optim_state = get_optimizer_state_dict(self.model, self.optimizer, options=FULL_STATE)
        if not self.d.is_main:
            return
        progress, path = self.progress, self.keeper.path_for(self.progress.step)
        training = SavedTraining(
            step=progress.step, optimizer=optim_state, scaler=self.scaler.state_dict(),
            dataloader=self.train_loader.state_dict(), rng=rng_state(), best_val_loss=progress.best_val_loss,
            validations_without_improvement=progress.validations_without_improvement,
            wandb_run_id=progress.wandb_run_id, config=self.cfg.to_dict(), world_size=self.plan.world_size,
            tokens_per_step=self.plan.tokens_per_step)
        Checkpoint(weights, unwrap(self.model).args, self.cfg.training_stage, self.tokenizer.identity(),
                   str(self.tokenizer.path), Provenance(init=self.init, adapters=adapters), training).write(
            path, self.offload.release_pages if self.offload else None)
        self.keeper.saved(path)
        self.logger.print(f"checkpoint: {path}")

    def score_hellaswag(self) -> None:
        """Every rank scores its share of the items (none waits idle for another); counts are all-reduced.
        Under FSDP each forward is collective, so every rank scores all items in lockstep instead."""
        examples, skipped = self.hellaswag
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.cfg.training_precision)
        rank, world = (0, 1) if self.sharded else (self.d.rank, self.d.world_size)
        result = hellaswag_evaluate(self.model, self.tokenizer, examples, max(1, self.cfg.max_batch_size // 4), rank,
                                    world, autocast_dtype=dtype)
        self.logger.log(self.progress.step, as_metrics(result, skipped), format_result(result, skipped))

    def generate_samples(self) -> None:
        """One completion per prompt, each its own seeded draw; the reordered decode kernels are made once for
        the round (speedups.reordered_linears) and dropped before training goes on."""
        model, cfg, step = self.model, self.cfg, self.progress.step
        model.eval()
        samples = []
        with autocast_context(cfg.training_precision, model.tok_embeddings.weight.device), reordered_linears(model):
            for number, prompt in enumerate(self.prompts):
                text = complete(model, self.tokenizer, prompt, cfg.generation_max_new_tokens, chat=self.stage.chat,
                                temperature=0.8, top_k=50, seed=cfg.seed + 1000 * step + number)
                samples.append({"prompt": prompt, "completion": text})
                self.logger.print(f"  sample {number + 1} | {prompt!r} -> {text!r}")
        model.train()
        self.logger.log(step, {"samples": samples})

    def due(self, every: int) -> bool:
        return bool(every) and self.progress.step % every == 0


# ---- main ---------------------------------------------------------------------------------------------------
def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--env_file", default=None, help="settings file (default: ./.env if present)")
    p.add_argument("--checkpoint", default=None,
                   help="start from this checkpoint, Meta-format or Hugging Face directory: a checkpoint of "
                        "TRAINING_STAGE with training state resumes exactly, anything else gives the weights")
    p.add_argument("--pretrain_checkpoint", default=None,
                   help="resume pretraining from this checkpoint (other stages: start from its weights)")
    p.add_argument("--instruct_checkpoint", "--sft_checkpoint", dest="instruct_checkpoint", default=None,
                   help="resume SFT from this checkpoint (DPO: start from its weights)")
    p.add_argument("--dpo_checkpoint", default=None, help="resume DPO from this checkpoint")
    p.add_argument("--reset-optimizer", "--reset_optimizer", dest="reset_optimizer", action="store_true",
                   help="when resuming, keep the weights but start a fresh optimizer")
    p.add_argument("--start-step", "--start_step", dest="start_step", type=int, default=None,
                   help="step to continue from (learning-rate schedule position); default: the checkpoint's")
    p.add_argument("--stop-step", "--stop_step", dest="stop_step", type=int, default=None,
                   help="save and stop after this step without changing the schedule (time-boxed jobs)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier run's checkpoints and metrics in RUN_DIR instead of refusing")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.env_file)
        stage_class(cfg)
    except ConfigError as e:
        exit_on_config_error(e)
    try:
        d = setup_distributed(cfg.device, cfg.ddp_backend)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    choose_cpu_allocator(cfg, d.device)
    try:
        return train(cfg, args, d)
    except (SetupError, DataError, CheckpointError, HellaSwagDataError, lora.LoRAError, OffloadError,
            FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        teardown_distributed()


def choose_cpu_allocator(cfg: Config, device: torch.device) -> bool:
    """glibc keeps freed big buffers for the next step (speedups.keep_freed_memory_on_cpu) in memory and for
    offloaded full fine-tuning, whose logits and embedding gradients are a few fixed GB a step: under glibc's
    defaults each step page-faulted them in again, 6.2 s against 4.0 s a step of bench.py's 320M row (bf16, every
    activation kept; peak 3.2 against 5.9 GB, flat over 8 steps; 2-core AMD EPYC Zen 4). Offloaded LoRA keeps
    glibc's defaults: its frozen base allocates little per step, and it is how an 8B fits in 6 GiB; there the
    streamed model trims the heap (speedups.HeapTrimmer). Returns whether it kept them."""
    keep = cfg.offload == "none" or not cfg.lora_enabled
    return device.type == "cpu" and keep and keep_freed_memory_on_cpu()


def start_offload(cfg: Config, d: DistInfo) -> Optional[RunOffload]:
    """OFFLOAD=disk: where the run's stores go and how full fine-tuning steps (the optimizer's settings)."""
    if cfg.offload == "none":
        return None
    adamw = AdamWSettings(betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps, weight_decay=cfg.weight_decay,
                          fused=d.device.type in ("cuda", "cpu"))  # as build_optimizer: the same kernel
    autocast = None if cfg.training_precision == "fp32" else DTYPES[cfg.training_precision]
    directory = cfg.offload_path if d.world_size == 1 else cfg.offload_path / f"rank{d.rank}"  # a store per rank
    return RunOffload(directory, d.device, train_base=not cfg.lora_enabled, adamw=adamw, autocast_dtype=autocast,
                      world_size=d.world_size, activations=cfg.offload_activations)


def check_precision_fits_device(precision: PrecisionChoice, device: torch.device) -> None:
    """fp16 with loss scaling is for GPUs without bf16. CPUs have no fast float16 matmul: on this
    project's 2-core AMD VM it runs at 2.3 GFLOP/s against 140 in float32, so a run would crawl."""
    if device.type == "cpu" and precision.precision == "fp16":
        raise SetupError("TRAINING_PRECISION=fp16 is invalid on CPU, which has no fast float16 matmul "
                         "(tens of times slower than float32): expected auto, bf16 or fp32")


def agreed(check: Callable[[], object], d: DistInfo):
    """Run a file-system or network step on rank 0 only and let every rank fail (or go on) alike."""
    outcome = None
    if d.is_main:
        try:
            outcome = ("ok", check())
        except (SetupError, CheckpointError, OffloadError) as e:
            outcome = ("error", str(e))
    kind, value = broadcast_object(outcome)
    if kind == "error":
        raise SetupError(value)
    return value


def train(cfg: Config, args: argparse.Namespace, d: DistInfo) -> int:
    run, stop_step = Run.start(cfg, args, d)
    cfg, stop = run.cfg, StopRequest(run.logger.print)
    reason = "finished"
    if run.progress.step == 0 and cfg.validate_every_x_steps:  # where a fresh run starts from (SFT: exact match)
        run.validate()
    run.logger.start_progress()
    while run.progress.step < stop_step:
        metrics, stop_all = run.step(stop)
        if metrics is None:  # stopped before this step: the last step's state is saved
            reason = "stopped by signal"
            run.save()
            break
        # Validation, HellaSwag and samples happen on their schedule and at the end of the whole run, never at
        # the end of a --stop-step box or a signal: a run split into boxes logs what the whole run logs.
        end = run.progress.step >= cfg.max_steps
        if (run.due(cfg.validate_every_x_steps) or end) and run.validate():
            reason = f"early stopping: no validation improvement in {cfg.early_stopping_patience} validations"
            end = True
        if stop_all:
            reason = "stopped by signal"
        last = end or stop_all or run.progress.step >= stop_step
        if run.due(cfg.save_every_x_steps) or last:
            run.save()  # before anything else that could still fail
        if run.hellaswag and (run.due(cfg.hellaswag_every_x_steps) or end):
            run.score_hellaswag()
        # Sharded weights are gathered collectively, so under FSDP every rank generates (the same text).
        if (d.is_main or run.sharded) and (run.due(cfg.generate_every_x_steps) or end):
            run.generate_samples()
        if last:
            break
    run.logger.print(f"{reason} at step {run.progress.step}")
    run.logger.close()
    return 0


if __name__ == "__main__":
    exit_without_teardown(main())
