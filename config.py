"""Every setting, read from `.env` into one typed `Config`.

Precedence: real environment variables > the `.env` file > the defaults below.
Each field's key is its name upper-cased (`max_lr` <- `MAX_LR`). Validation lives in one
place (`Config.validate`); a bad value raises `ConfigError`, which the command-line entry
points print as a single line.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from dotenv import dotenv_values

STAGES = ("pretrain", "sft", "dpo", "distill")
PRECISIONS = ("bf16", "fp16", "fp32")


class ConfigError(ValueError):
    """A setting has a value it cannot take. The message names the key and what is expected."""


def _f(default, doc: str):
    return field(default=default, metadata={"doc": doc})


@dataclass
class Config:
    # ---- run -------------------------------------------------------------------------
    training_stage: str = _f("pretrain", "What to train: pretrain | sft | dpo | distill")
    run_dir: str = _f("runs/pretrain", "Where checkpoints, metrics.jsonl and samples of this run are written")
    seed: int = _f(1337, "Seed for weights init, data order and sampling")
    device: str = _f("auto", "auto | cpu | cuda | cuda:N | mps (auto: cuda when available, else cpu)")
    tokenizer_path: str = _f("", "Llama 3 tokenizer.model or a Hugging Face tokenizer directory (empty: the one shipped in llama-models)")
    pretrain_data_dir: str = _f("data/pretrain", "Token shards + manifest.json written by load_pretrain_dataset.py")

    # ---- model shape (Meta's params.json names) -----------------------------------------
    dim: int = _f(256, "Model width")
    n_layers: int = _f(4, "Number of transformer blocks")
    n_heads: int = _f(8, "Attention heads")
    n_kv_heads: int = _f(4, "Key/value heads for grouped-query attention (divides N_HEADS)")
    vocab_size: int = _f(0, "Vocabulary size (0: the tokenizer's, 128256 for Llama 3)")
    multiple_of: int = _f(256, "SwiGLU hidden size is rounded up to a multiple of this")
    ffn_dim_multiplier: typing.Optional[float] = _f(None, "Optional SwiGLU hidden-size multiplier (Llama 3 8B: 1.3)")
    norm_eps: float = _f(1e-5, "RMSNorm epsilon")
    rope_theta: float = _f(500000.0, "Rotary embedding base")
    use_scaled_rope: bool = _f(False, "Llama 3.1 rotary frequency scaling")
    rope_scale_factor: float = _f(8.0, "Llama 3.1 rope scaling: factor")
    rope_low_freq_factor: float = _f(1.0, "Llama 3.1 rope scaling: low-frequency factor")
    rope_high_freq_factor: float = _f(4.0, "Llama 3.1 rope scaling: high-frequency factor")
    rope_original_max_seq_len: int = _f(8192, "Llama 3.1 rope scaling: original context length")
    max_seq_len: int = _f(256, "Training sequence length (tokens per row)")
    tie_word_embeddings: bool = _f(True, "Share input embedding and output weights (as Llama 3.2 1B/3B)")

    # ---- batch and optimizer ----------------------------------------------------------
    total_batch_size: int = _f(4096, "Tokens per optimizer step, over all ranks and accumulation steps")
    max_batch_size: int = _f(8, "Sequences per forward pass on one rank (micro-batch)")
    max_lr: float = _f(3e-3, "Peak learning rate, reached after warmup")
    min_lr: float = _f(3e-4, "Learning rate at the end of the cosine decay")
    warmup_steps: int = _f(10, "Linear warmup steps")
    max_steps: int = _f(100, "Optimizer steps to train for")
    weight_decay: float = _f(0.1, "AdamW weight decay (applied to matrices only)")
    beta1: float = _f(0.9, "AdamW beta1")
    beta2: float = _f(0.95, "AdamW beta2")
    adam_eps: float = _f(1e-8, "AdamW epsilon")
    grad_clip: float = _f(1.0, "Clip the global gradient norm to this (0: off)")
    training_precision: str = _f("bf16", "bf16 | fp16 (with loss scaling; GPUs only) | fp32 — autocast dtype of the forward pass")
    compile: bool = _f(False, "torch.compile the model")
    activation_checkpointing: bool = _f(False, "Recompute each block in backward: less memory, ~1/3 more compute")

    # ---- evaluation, checkpoints, logging -----------------------------------------------
    validate_every_x_steps: int = _f(25, "Validation loss every N steps (0: never; also at the end)")
    validation_steps: int = _f(4, "Micro-batches per validation pass (per rank)")
    early_stopping_patience: int = _f(0, "Stop after this many validations without improvement (0: off)")
    generate_every_x_steps: int = _f(50, "Sample generations every N steps (0: only at the end)")
    generation_prompts_file: str = _f("prompts.txt", "One prompt per line, used for sample generations")
    generation_max_new_tokens: int = _f(32, "Tokens to sample per prompt")
    hellaswag_every_x_steps: int = _f(0, "HellaSwag accuracy every N steps, on all ranks (0: off)")
    hellaswag_number_of_examples: int = _f(500, "HellaSwag items scored during training (0: all 10,042)")
    hellaswag_path: str = _f("", "Local hellaswag_val.jsonl (empty: download once to ~/.cache/llama3-trainer)")
    save_every_x_steps: int = _f(50, "Checkpoint every N steps (0: only at the end)")
    keep_last_checkpoints: int = _f(3, "How many step checkpoints to keep on disk")
    log_every_x_steps: int = _f(1, "Console line every N steps")
    mfu_flops_peak: float = _f(0.0, "Peak FLOP/s of one device for MFU (0: known GPU table, else measured matmul peak)")
    wandb_enabled: bool = _f(False, "Log to Weights & Biases")
    wandb_project: str = _f("llama3-pretrain", "W&B project")
    wandb_run_name: str = _f("", "W&B run name (empty: the run directory's name)")
    wandb_mode: str = _f("online", "online | offline | disabled")

    # ---- distributed --------------------------------------------------------------------
    parallelism: str = _f("ddp", "ddp (a full replica per rank) | fsdp (FSDP2: parameters, grads and optimizer state sharded)")
    ddp_backend: str = _f("auto", "auto (nccl on CUDA, gloo on CPU) | nccl | gloo")

    # ---- derived, not read from .env --------------------------------------------------------
    env_file: str = field(default="", metadata={"derived": True})

    @classmethod
    def keys(cls) -> list[str]:
        return [f.name.upper() for f in dataclasses.fields(cls) if not f.metadata.get("derived")]

    def validate(self) -> "Config":
        """Check every constraint in one place; raises ConfigError naming the key."""

        def bad(key: str, expected: str):
            value = getattr(self, key.lower())
            raise ConfigError(f"{key}={value!r} is invalid: expected {expected}" + self._where())

        if self.training_stage not in STAGES:
            bad("TRAINING_STAGE", " | ".join(STAGES))
        if self.training_precision not in PRECISIONS:
            bad("TRAINING_PRECISION", " | ".join(PRECISIONS))
        if self.wandb_mode not in ("online", "offline", "disabled"):
            bad("WANDB_MODE", "online | offline | disabled")
        if self.parallelism not in ("ddp", "fsdp"):
            bad("PARALLELISM", "ddp | fsdp")
        if self.ddp_backend not in ("auto", "nccl", "gloo"):
            bad("DDP_BACKEND", "auto | nccl | gloo")
        if not (self.device in ("auto", "cpu", "cuda", "mps") or self.device.startswith("cuda:")):
            bad("DEVICE", "auto | cpu | cuda | cuda:N | mps")
        for key in ("DIM", "N_LAYERS", "N_HEADS", "N_KV_HEADS", "MULTIPLE_OF", "MAX_SEQ_LEN", "TOTAL_BATCH_SIZE",
                    "MAX_BATCH_SIZE", "MAX_STEPS", "ROPE_ORIGINAL_MAX_SEQ_LEN", "VALIDATION_STEPS",
                    "GENERATION_MAX_NEW_TOKENS", "LOG_EVERY_X_STEPS", "KEEP_LAST_CHECKPOINTS"):
            if getattr(self, key.lower()) < 1:
                bad(key, "a positive integer")
        for key in ("VOCAB_SIZE", "WARMUP_STEPS", "VALIDATE_EVERY_X_STEPS", "EARLY_STOPPING_PATIENCE",
                    "GENERATE_EVERY_X_STEPS", "SAVE_EVERY_X_STEPS", "HELLASWAG_EVERY_X_STEPS",
                    "HELLASWAG_NUMBER_OF_EXAMPLES"):
            if getattr(self, key.lower()) < 0:
                bad(key, "an integer >= 0")
        for key in ("MAX_LR", "NORM_EPS", "ROPE_THETA", "ADAM_EPS", "ROPE_SCALE_FACTOR"):
            if not getattr(self, key.lower()) > 0:
                bad(key, "a number > 0")
        for key in ("MIN_LR", "WEIGHT_DECAY", "GRAD_CLIP", "MFU_FLOPS_PEAK"):
            if getattr(self, key.lower()) < 0:
                bad(key, "a number >= 0")
        if self.min_lr > self.max_lr:
            bad("MIN_LR", f"<= MAX_LR ({self.max_lr})")
        for key in ("BETA1", "BETA2"):
            if not 0 <= getattr(self, key.lower()) < 1:
                bad(key, "a number in [0, 1)")
        if self.ffn_dim_multiplier is not None and self.ffn_dim_multiplier <= 0:
            bad("FFN_DIM_MULTIPLIER", "a number > 0, or empty")
        if self.dim % self.n_heads:
            bad("DIM", f"a multiple of N_HEADS ({self.n_heads})")
        if (self.dim // self.n_heads) % 2:
            bad("DIM", f"DIM / N_HEADS even, for rotary embeddings (got head size {self.dim // self.n_heads})")
        if self.n_heads % self.n_kv_heads:
            bad("N_KV_HEADS", f"a divisor of N_HEADS ({self.n_heads})")
        if self.rope_high_freq_factor <= self.rope_low_freq_factor:
            bad("ROPE_HIGH_FREQ_FACTOR", f"> ROPE_LOW_FREQ_FACTOR ({self.rope_low_freq_factor})")
        if self.warmup_steps > self.max_steps:
            bad("WARMUP_STEPS", f"<= MAX_STEPS ({self.max_steps})")
        if self.hellaswag_path and not Path(self.hellaswag_path).is_file():
            bad("HELLASWAG_PATH", "an existing .jsonl file in HellaSwag's schema")
        if self.tokenizer_path and not Path(self.tokenizer_path).exists():
            bad("TOKENIZER_PATH", "an existing tokenizer.model file or tokenizer directory")
        return self

    def _where(self) -> str:
        return f" (from {self.env_file})" if self.env_file else ""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _parse(key: str, raw: str, annotation) -> object:
    """Turn the text of one setting into the field's type; ConfigError names the key on failure."""
    optional = False
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        annotation, optional = args[0], True
    text = raw.strip()
    if optional and text.lower() in ("", "none", "null"):
        return None
    try:
        if annotation is bool:
            lowered = text.lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if annotation is int:
            return int(text)
        if annotation is float:
            return float(text)
        return text
    except ValueError:
        expected = {bool: "true or false", int: "an integer", float: "a number"}[annotation]
        raise ConfigError(f"{key}={raw!r} is invalid: expected {expected}") from None


_TYPES = typing.get_type_hints(Config)


def load_config(env_file: str | None = None, overrides: dict[str, str] | None = None) -> Config:
    """Read `.env` (or `env_file`), let real environment variables win, and validate.

    `env_file=None` reads `./.env` when it exists; a named file that does not exist is an error.
    `overrides` (KEY -> text) win over everything; tests use them.
    """
    if env_file is not None and not Path(env_file).is_file():
        raise ConfigError(f"--env_file {env_file!r}: file not found")
    path = env_file if env_file is not None else (".env" if Path(".env").is_file() else None)
    file_values = {k: v for k, v in (dotenv_values(path) if path else {}).items() if v is not None}

    keys = set(Config.keys())
    for unknown in sorted(set(file_values) - keys):
        print(f"warning: {path}: unknown key {unknown} is ignored (typo?)", file=sys.stderr)

    values: dict[str, object] = {"env_file": path or ""}
    for f in dataclasses.fields(Config):
        key = f.name.upper()
        if f.metadata.get("derived"):
            continue
        raw = (overrides or {}).get(key, os.environ.get(key, file_values.get(key)))
        if raw is not None:
            try:
                values[f.name] = _parse(key, raw, _TYPES[f.name])
            except ConfigError as e:
                raise ConfigError(f"{e}{f' (from {path})' if path and key in file_values else ''}") from None
    return Config(**values).validate()


def exit_on_config_error(error: ConfigError) -> typing.NoReturn:
    """Entry points print a bad setting as one line, no traceback."""
    print(f"config error: {error}", file=sys.stderr)
    raise SystemExit(2)
