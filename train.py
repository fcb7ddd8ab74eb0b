"""Train a Llama 3 model. Settings come from `.env` (see .env.example and config.py).

    python train.py                                   # one process (CPU or one GPU)
    torchrun --nproc_per_node 8 train.py              # DDP on one node
    python train.py --pretrain_checkpoint runs/pretrain/checkpoints/step_000100.pt   # resume

TRAINING_STAGE=pretrain is implemented here; the other stages plug into the same loop.
"""

from __future__ import annotations

import argparse
import ctypes
import math
import os
import platform
import random
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_optimizer_state_dict)
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP

from checkpoint import CheckpointError, read_checkpoint, save_checkpoint
from config import Config, ConfigError, exit_on_config_error, load_config
from dataloaders import DataError, PretrainDataLoader
from distributed import DistInfo, all_reduce_sum, setup_distributed, teardown_distributed
from generate import complete
from hellaswag_utils import HellaSwagDataError, as_metrics, format_result, load_examples
from hellaswag_utils import evaluate as hellaswag_evaluate
from metrics import RunLogger, format_step_line
from model import IGNORE_INDEX, ModelArgs, Transformer
from tokenizer import load_tokenizer


class SetupError(ValueError):
    """A run that cannot start as configured; printed as one line."""


# ---- batch arithmetic, learning rate -----------------------------------------------------------------
@dataclass(frozen=True)
class BatchPlan:
    micro_batch: int  # sequences per forward on one rank
    seq_len: int
    world_size: int
    grad_accum: int  # micro-batches per optimizer step on each rank

    @property
    def tokens_per_step(self) -> int:
        return self.micro_batch * self.seq_len * self.world_size * self.grad_accum

    @classmethod
    def derive(cls, cfg: Config, world_size: int) -> "BatchPlan":
        per_micro_step = cfg.max_batch_size * cfg.max_seq_len * world_size
        if cfg.total_batch_size % per_micro_step:
            raise SetupError(
                f"TOTAL_BATCH_SIZE={cfg.total_batch_size} is not a multiple of MAX_BATCH_SIZE x MAX_SEQ_LEN x world "
                f"size = {cfg.max_batch_size} x {cfg.max_seq_len} x {world_size} = {per_micro_step}")
        return cls(cfg.max_batch_size, cfg.max_seq_len, world_size, cfg.total_batch_size // per_micro_step)

    def describe(self) -> str:
        return (f"batch: {self.tokens_per_step:,} tokens/step = {self.micro_batch} seqs x {self.seq_len} tokens"
                f" x {self.world_size} ranks x {self.grad_accum} accumulation steps")


def lr_at(step: int, cfg: Config) -> float:
    """Linear warmup to MAX_LR over WARMUP_STEPS, then cosine decay to MIN_LR at MAX_STEPS."""
    if step < cfg.warmup_steps:
        return cfg.max_lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.max_lr - cfg.min_lr)


# ---- building blocks --------------------------------------------------------------------------------------
def build_model(cfg: Config, vocab_size: int, device: torch.device) -> Transformer:
    args = ModelArgs(
        dim=cfg.dim, n_layers=cfg.n_layers, n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads, vocab_size=vocab_size,
        multiple_of=cfg.multiple_of, ffn_dim_multiplier=cfg.ffn_dim_multiplier, norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta, use_scaled_rope=cfg.use_scaled_rope, rope_scale_factor=cfg.rope_scale_factor,
        rope_low_freq_factor=cfg.rope_low_freq_factor, rope_high_freq_factor=cfg.rope_high_freq_factor,
        rope_original_max_seq_len=cfg.rope_original_max_seq_len, max_seq_len=cfg.max_seq_len,
        tie_word_embeddings=cfg.tie_word_embeddings,
    )
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = Transformer(args).to(device)
    model.activation_checkpointing = cfg.activation_checkpointing
    return model


def build_optimizer(model: torch.nn.Module, cfg: Config, device: torch.device) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices (and embeddings) only, never on norm gains."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    # one fused kernel per step: on CPU too it is 3x faster than the default, a loop over the
    # parameters (torch has no CPU foreach kernels): 42 vs 130 ms for 90M parameters on a 2-core VM
    fused = device.type in ("cuda", "cpu")
    return torch.optim.AdamW(groups, lr=cfg.max_lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps, fused=fused)


def describe_embedding(model: Transformer) -> str:
    """A tied embedding is also the output layer, so "without embeddings" would subtract nothing."""
    embedding = model.tok_embeddings.weight.numel()
    if model.args.tie_word_embeddings:
        return f"of which {embedding:,} in the embedding, tied to the output layer"
    return f"{model.num_params(exclude_embeddings=True):,} without the input embedding"


def parallelize(model: Transformer, cfg: Config, d: DistInfo) -> torch.nn.Module:
    """DDP keeps a full replica per rank; FSDP2 shards every block and the root in place, so
    parameters, gradients and optimizer state are split over the ranks."""
    if d.world_size == 1:
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


def build_loaders(cfg: Config, d: DistInfo, plan: "BatchPlan", tokenizer, vocab_size: int
                  ) -> tuple[PretrainDataLoader, PretrainDataLoader]:
    common = dict(batch_size=cfg.max_batch_size, seq_len=cfg.max_seq_len, rank=d.rank, world_size=d.world_size,
                  seed=cfg.seed, tokenizer_identity=tokenizer.identity(), vocab_size=vocab_size)
    train = PretrainDataLoader(cfg.pretrain_data_dir, "train", shuffle=True,
                               samples_per_step=plan.tokens_per_step // plan.seq_len, **common)
    val = PretrainDataLoader(cfg.pretrain_data_dir, "val", shuffle=False, **common)
    return train, val


def autocast_context(cfg: Config, device: torch.device):
    if cfg.training_precision == "fp32":
        return nullcontext()
    dtype = torch.bfloat16 if cfg.training_precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def keep_freed_memory_on_cpu() -> bool:
    """Ask glibc to serve big buffers from its heap and keep them when freed (up to 2 GiB).

    By default glibc maps every buffer over its mmap threshold (at most 32 MiB) afresh and unmaps it when
    freed, so each CPU training step page-faults its activations and logits chunks in again: measured with
    bench.py's small preset, the bf16 step runs about 2.3x faster without that (README, Benchmark).
    The cost is a higher resident set: freed memory stays with the process. Skipped when the user set any
    MALLOC_* variable (theirs win) and off glibc. Returns whether the setting took."""
    if platform.libc_ver()[0] != "glibc" or any(k.startswith("MALLOC_") for k in os.environ):
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # <malloc.h>
    libc = ctypes.CDLL(None)
    return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))


KNOWN_PEAK_FLOPS = {  # dense bf16/fp16 tensor-core peaks, FLOP/s (vendor datasheets)
    "H200": 989e12, "H100": 989e12, "A100": 312e12, "A10G": 125e12, "L40S": 362e12, "L4": 121e12,
    "RTX 4090": 165e12, "RTX 3090": 71e12, "V100": 125e12,
}


def measured_matmul_peak(device: torch.device, dtype: torch.dtype, n: int = 2048) -> float:
    """Achievable dense matmul FLOP/s on this device and dtype (the MFU denominator where no
    datasheet figure applies, e.g. CPUs)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    reps, start = 5, time.perf_counter()
    for _ in range(reps):
        a @ b
    sync()
    return 2 * n**3 * reps / (time.perf_counter() - start)


def peak_flops(cfg: Config, device: torch.device) -> float:
    if cfg.mfu_flops_peak:
        return cfg.mfu_flops_peak
    if device.type == "cuda" and cfg.training_precision != "fp32":
        name = torch.cuda.get_device_name(device)
        for key, value in KNOWN_PEAK_FLOPS.items():
            if key in name:
                return value
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[cfg.training_precision]
    return measured_matmul_peak(device, dtype)


# ---- run state, checkpoints, signals -----------------------------------------------------------------------
@dataclass
class TrainState:
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


def checkpoint_dir(cfg: Config) -> Path:
    return cfg.run_path / "checkpoints"


FULL_STATE = StateDictOptions(full_state_dict=True, cpu_offload=True)


def save_training_checkpoint(cfg: Config, state: TrainState, model, optimizer, scaler, train_loader,
                             tokenizer, plan: BatchPlan, d: DistInfo) -> Optional[Path]:
    """Called on every rank: FSDP gathers the full weights and optimizer state (rank 0 receives
    them); rank 0 writes one file that loads under DDP, FSDP or a single process alike."""
    model_state = get_model_state_dict(model, options=FULL_STATE)
    optim_state = get_optimizer_state_dict(model, optimizer, options=FULL_STATE)
    if not d.is_main:
        return None
    path = checkpoint_dir(cfg) / f"step_{state.step:06d}.pt"
    save_checkpoint(
        path, model, model_state=model_state,
        optimizer=optim_state, scaler=scaler.state_dict(), step=state.step,
        best_val_loss=state.best_val_loss, validations_without_improvement=state.validations_without_improvement,
        wandb_run_id=state.wandb_run_id, dataloader=train_loader.state_dict(), rng=rng_state(),
        config=cfg.to_dict(), tokenizer=tokenizer.identity(), tokenizer_path=str(tokenizer.path),
        world_size=plan.world_size, tokens_per_step=plan.tokens_per_step,
    )
    old = sorted(checkpoint_dir(cfg).glob("step_*.pt"))[: -cfg.keep_last_checkpoints]
    for stale in old:
        stale.unlink(missing_ok=True)
    return path


def load_weights(path: str, model: Transformer, tokenizer, reset_optimizer: bool) -> dict:
    """Read a checkpoint and load its weights into the bare model, before any wrapping or sharding."""
    ckpt = read_checkpoint(path)
    if ckpt.get("tokenizer", {}).get("sha256") != tokenizer.identity()["sha256"]:
        raise CheckpointError(f"{path}: trained with another tokenizer than TOKENIZER_PATH gives")
    saved_args = ModelArgs.from_dict(ckpt["model_args"])
    if saved_args != model.args:
        raise CheckpointError(f"{path}: model shape {saved_args} differs from the .env's {model.args}")
    if not reset_optimizer and "optimizer" not in ckpt:
        raise CheckpointError(f"{path}: holds no optimizer state; pass --reset-optimizer to start a fresh one")
    model.load_state_dict(ckpt["model"])
    return ckpt


def restore_training_state(ckpt: dict, model, optimizer, scaler, train_loader, reset_optimizer: bool
                           ) -> TrainState:
    """Optimizer (sharded again under FSDP), loss scaler, data position and RNG from a checkpoint."""
    if not reset_optimizer:
        set_optimizer_state_dict(model, optimizer, ckpt["optimizer"],
                                 options=StateDictOptions(full_state_dict=True))
        scaler.load_state_dict(ckpt["scaler"])
    if "dataloader" in ckpt:
        train_loader.load_state_dict(ckpt["dataloader"])
    if "rng" in ckpt:
        set_rng_state(ckpt["rng"])
    return TrainState(step=int(ckpt.get("step", 0)), best_val_loss=float(ckpt.get("best_val_loss", float("inf"))),
                      validations_without_improvement=int(ckpt.get("validations_without_improvement", 0)),
                      wandb_run_id=ckpt.get("wandb_run_id"))


class StopRequest:
    """SIGINT/SIGTERM set a flag; the loop agrees on it across ranks at the end of a step,
    saves a checkpoint and exits, so preemption loses at most one step."""

    def __init__(self):
        self.requested = False
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.requested:  # second Ctrl-C: the user really means it
            raise KeyboardInterrupt
        self.requested = True


# ---- the step ---------------------------------------------------------------------------------------------
def train_step(model, optimizer, scaler, batches, cfg: Config, d: DistInfo, lr: float, stop_flag: bool
               ) -> tuple[dict, bool]:
    """One optimizer step over this rank's micro-batches.

    The loss is normalised by the number of target tokens over all micro-batches and ranks
    (not averaged per micro-batch), so masked data and uneven micro-batches weigh correctly.
    """
    # One host sync per step for both figures: the global target count and the stop vote.
    n_valid_local = torch.stack([(y != IGNORE_INDEX).sum() for _, y in batches]).sum().float()
    counts = all_reduce_sum(torch.stack([n_valid_local, torch.tensor(float(stop_flag), device=d.device)]))
    n_valid, stop_votes = counts.tolist()
    stop_all = stop_votes > 0
    for group in optimizer.param_groups:
        group["lr"] = lr

    loss_sum = torch.zeros((), device=d.device)
    for i, (x, y) in enumerate(batches):
        last = i == len(batches) - 1
        with gradient_sync(model, enabled=last):
            with autocast_context(cfg, d.device):
                _, loss = model(x, y, loss_reduction="sum", return_logits=False)
            # DDP averages gradients over ranks, hence the world_size factor.
            scaler.scale(loss * (d.world_size / max(n_valid, 1.0))).backward()
        loss_sum += loss.detach().float()

    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
    if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP
        grad_norm = grad_norm.full_tensor()
    if torch.isfinite(grad_norm) or scaler.is_enabled():
        scaler.step(optimizer)  # with fp16 loss scaling the scaler itself skips non-finite steps
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    mean_loss = all_reduce_sum(loss_sum).item() / max(n_valid, 1.0)
    return {"loss": mean_loss, "lr": lr, "grad_norm": grad_norm.item(), "tokens": int(n_valid)}, stop_all


def next_batches(loader: PretrainDataLoader, n: int, device: torch.device) -> list:
    pin = device.type == "cuda"
    out = []
    for _ in range(n):
        batch = loader.next_batch()
        x, y = batch["tokens"], batch["targets"]
        if pin:
            x, y = x.pin_memory(), y.pin_memory()
        out.append((x.to(device, non_blocking=pin), y.to(device, non_blocking=pin)))
    return out


@torch.no_grad()
def validation_loss(model: Transformer, loader: PretrainDataLoader, steps: int, cfg: Config, d: DistInfo) -> float:
    """Mean token loss over the same `steps` validation batches every time, summed over ranks."""
    loader.reset()
    model.eval()
    totals = torch.zeros(2, device=d.device)
    for x, y in next_batches(loader, steps, d.device):
        with autocast_context(cfg, d.device):
            _, loss = model(x, y, loss_reduction="sum", return_logits=False)
        totals += torch.stack([loss.float(), (y != IGNORE_INDEX).sum().float()])
    model.train()
    totals = all_reduce_sum(totals)
    return (totals[0] / totals[1]).item()


def read_prompts(cfg: Config) -> list[str]:
    path = Path(cfg.generation_prompts_file)
    if not path.is_file():
        raise SetupError(f"GENERATION_PROMPTS_FILE={cfg.generation_prompts_file!r}: file not found "
                         "(one prompt per line)")
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise SetupError(f"GENERATION_PROMPTS_FILE={cfg.generation_prompts_file!r} holds no prompt")
    return prompts


def sample_generations(model: Transformer, tokenizer, prompts: list[str], cfg: Config, step: int,
                       logger: RunLogger) -> None:
    model.eval()
    samples = []
    for prompt in prompts:
        with autocast_context(cfg, model.tok_embeddings.weight.device):
            text = complete(model, tokenizer, prompt, cfg.generation_max_new_tokens, temperature=0.8, top_k=50,
                            seed=cfg.seed + step)
        samples.append({"prompt": prompt, "completion": text})
        logger.print(f"  sample | {prompt}{text!r}")
    model.train()
    logger.log(step, {"samples": samples})


# ---- main ---------------------------------------------------------------------------------------------------
def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--env_file", default=None, help="settings file (default: ./.env if present)")
    p.add_argument("--pretrain_checkpoint", default=None, help="resume from this checkpoint file")
    p.add_argument("--reset-optimizer", "--reset_optimizer", dest="reset_optimizer", action="store_true",
                   help="when resuming, keep the weights but start a fresh optimizer")
    p.add_argument("--start-step", "--start_step", dest="start_step", type=int, default=None,
                   help="step to continue from (learning-rate schedule position); default: the checkpoint's")
    p.add_argument("--stop-step", "--stop_step", dest="stop_step", type=int, default=None,
                   help="save and stop after this step without changing the schedule (time-boxed jobs)")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.env_file)
    except ConfigError as e:
        exit_on_config_error(e)
    if cfg.training_stage != "pretrain":
        print(f"error: TRAINING_STAGE={cfg.training_stage} is not implemented yet; only 'pretrain' is",
              file=sys.stderr)
        return 2
    d = setup_distributed(cfg.device, cfg.ddp_backend)
    if d.device.type == "cpu":
        keep_freed_memory_on_cpu()
    try:
        return pretrain(cfg, args, d)
    except (SetupError, DataError, CheckpointError, HellaSwagDataError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        teardown_distributed()


def check_precision_fits_device(cfg: Config, device: torch.device) -> None:
    """fp16 with loss scaling is for GPUs without bf16. CPUs have no fast float16 matmul: on this
    project's 2-core AMD VM it runs at 2.3 GFLOP/s against 140 in float32, so a run would crawl."""
    if device.type == "cpu" and cfg.training_precision == "fp16":
        raise SetupError("TRAINING_PRECISION=fp16 is invalid on CPU, which has no fast float16 matmul "
                         "(tens of times slower than float32): expected bf16 or fp32")


def pretrain(cfg: Config, args: argparse.Namespace, d: DistInfo) -> int:
    check_precision_fits_device(cfg, d.device)
    tokenizer = load_tokenizer(cfg.tokenizer_path or None)
    vocab_size = cfg.vocab_size or tokenizer.n_words
    if vocab_size < tokenizer.n_words:
        raise SetupError(f"VOCAB_SIZE={cfg.vocab_size} is smaller than the tokenizer's {tokenizer.n_words} tokens")
    plan = BatchPlan.derive(cfg, d.world_size)
    prompts = read_prompts(cfg)
    hellaswag = load_examples(cfg.hellaswag_path or None, cfg.hellaswag_number_of_examples or None) \
        if cfg.hellaswag_every_x_steps else None
    train_loader, val_loader = build_loaders(cfg, d, plan, tokenizer, vocab_size)
    model = build_model(cfg, vocab_size, d.device)
    flops_per_token, n_params = model.flops_per_token(cfg.max_seq_len), model.num_params()
    ckpt = load_weights(args.pretrain_checkpoint, model, tokenizer, args.reset_optimizer) \
        if args.pretrain_checkpoint else None
    train_model = parallelize(model, cfg, d)
    sharded = isinstance(model, FSDPModule)
    optimizer = build_optimizer(model, cfg, d.device)
    scaler = torch.amp.GradScaler(d.device.type, enabled=cfg.training_precision == "fp16")
    state = TrainState()
    if ckpt is not None:
        state = restore_training_state(ckpt, model, optimizer, scaler, train_loader, args.reset_optimizer)
        del ckpt
    resumed_from = state.step
    if args.start_step is not None:
        state.step = args.start_step
    stop_step = min(cfg.max_steps, args.stop_step if args.stop_step is not None else cfg.max_steps)

    logger = RunLogger(cfg, d.is_main, resume_step=resumed_from if args.pretrain_checkpoint else 0,
                       wandb_run_id=state.wandb_run_id, initial_step=state.step)
    state.wandb_run_id = logger.wandb_run_id
    peak = peak_flops(cfg, d.device)
    logger.print(f"model: {n_params:,} parameters ({describe_embedding(model)}), "
                 f"{flops_per_token / 1e6:.1f} MFLOP/token | device {d.device} x {d.world_size}"
                 f"{' (fsdp)' if sharded else ''} | {cfg.training_precision}")
    logger.print(plan.describe())
    logger.print(f"data: {train_loader.num_tokens:,} train tokens ({train_loader.num_tokens / plan.tokens_per_step:.1f}"
                 f" steps/epoch), {val_loader.num_tokens:,} validation tokens")
    if args.pretrain_checkpoint:
        logger.print(f"resumed from {args.pretrain_checkpoint} at step {resumed_from}"
                     + (f", continuing as step {state.step}" if state.step != resumed_from else "")
                     + (", fresh optimizer" if args.reset_optimizer else ""))

    if cfg.compile:
        train_model = torch.compile(train_model)
    eval_model = torch.compile(model) if cfg.compile else model

    stop = StopRequest()
    reason = "finished"
    while state.step < stop_step:
        t0 = time.perf_counter()
        batches = next_batches(train_loader, plan.grad_accum, d.device)
        t_data = time.perf_counter() - t0
        metrics, stop_all = train_step(train_model, optimizer, scaler, batches, cfg, d, lr_at(state.step, cfg),
                                       stop.requested)
        state.step += 1
        step_time = time.perf_counter() - t0
        tokens_per_s = metrics["tokens"] / step_time
        metrics.update(tokens_per_s=tokens_per_s, step_time_s=step_time, data_share=t_data / step_time,
                       mfu=flops_per_token * tokens_per_s / (peak * d.world_size), epoch=train_loader.epoch)
        logger.advance()
        logger.log(state.step, metrics, format_step_line(state.step, cfg.max_steps, metrics)
                   if state.step % cfg.log_every_x_steps == 0 else None)
        if not math.isfinite(metrics["loss"]):
            logger.print(f"warning: non-finite loss at step {state.step}")

        last = state.step >= stop_step
        if cfg.validate_every_x_steps and state.step % cfg.validate_every_x_steps == 0 or last:
            if evaluate_and_check_patience(eval_model, val_loader, cfg, d, state, logger):
                reason = f"early stopping: no validation improvement in {cfg.early_stopping_patience} validations"
                last = True
        if hellaswag and (state.step % cfg.hellaswag_every_x_steps == 0 or last):
            run_hellaswag(model, tokenizer, hellaswag, cfg, d, state.step, logger, sharded)
        # Sharded weights are gathered collectively, so under FSDP every rank generates (the same text).
        if (d.is_main or sharded) and (cfg.generate_every_x_steps and state.step % cfg.generate_every_x_steps == 0 or last):
            sample_generations(model, tokenizer, prompts, cfg, state.step, logger)
        if stop_all:
            reason, last = "stopped by signal", True
        if (cfg.save_every_x_steps and state.step % cfg.save_every_x_steps == 0) or last:
            path = save_training_checkpoint(cfg, state, model, optimizer, scaler, train_loader, tokenizer, plan, d)
            if path:
                logger.print(f"checkpoint: {path}")
        if last:
            break
    logger.print(f"{reason} at step {state.step}")
    logger.close()
    return 0


def run_hellaswag(model: Transformer, tokenizer, hellaswag: tuple[list, int], cfg: Config, d: DistInfo, step: int,
                  logger: RunLogger, sharded: bool) -> None:
    """Every rank scores its share of the items (none waits idle for another); counts are all-reduced.
    Under FSDP each forward is collective, so every rank scores all items in lockstep instead."""
    examples, skipped = hellaswag
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.training_precision)
    rank, world = (0, 1) if sharded else (d.rank, d.world_size)
    result = hellaswag_evaluate(model, tokenizer, examples, max(1, cfg.max_batch_size // 4), rank, world,
                                autocast_dtype=dtype)
    logger.log(step, as_metrics(result, skipped), format_result(result, skipped))


def evaluate_and_check_patience(model, val_loader, cfg: Config, d: DistInfo, state: TrainState,
                                logger: RunLogger) -> bool:
    """Log validation loss; True when early stopping's patience has run out."""
    val = validation_loss(model, val_loader, cfg.validation_steps, cfg, d)
    improved = val < state.best_val_loss
    if improved:
        state.best_val_loss, state.validations_without_improvement = val, 0
    else:
        state.validations_without_improvement += 1
    logger.log(state.step, {"val_loss": val, "val_perplexity": math.exp(min(val, 50))},
               f"validation | step {state.step} | val_loss {val:.4f} | best {state.best_val_loss:.4f}")
    return bool(cfg.early_stopping_patience) and state.validations_without_improvement >= cfg.early_stopping_patience


if __name__ == "__main__":
    raise SystemExit(main())
