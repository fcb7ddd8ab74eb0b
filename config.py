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

PROJECT_DIR = Path(__file__).resolve().parent
STAGE_ALIASES = {"instruct": "sft"}  # the original project's name for instruction tuning
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
DISTILLATION_LOSSES = ("forward_kl", "reverse_kl", "jsd")
DPO_LOSSES = ("sigmoid", "ipo")
WEIGHT_DTYPES = ("auto", "bf16", "fp32")


class ConfigError(ValueError):
    """A setting has a value it cannot take. The message names the key and what is expected."""


def _f(default, doc: str):
    return field(default=default, metadata={"doc": doc})


@dataclass
class Config:
    # ---- run -------------------------------------------------------------------------
    training_stage: str = _f("pretrain", "What to train: pretrain | sft (alias: instruct) | dpo | orpo | simpo. "
                                         "Distillation is not a stage: see IS_MODEL_DISTILLATION")
    run_dir: str = _f("", "Where checkpoints, metrics.jsonl and samples of this run are written (empty: runs/<stage>)")
    seed: int = _f(1337, "Seed for weights init, data order and sampling")
    device: str = _f("auto", "auto | cpu | cuda | cuda:N | mps (auto: cuda when available, else cpu)")
    tokenizer_path: str = _f("", "Llama 3 tokenizer.model or a Hugging Face tokenizer directory (empty: the one shipped in llama-models)")
    pretrain_data_dir: str = _f("data/pretrain", "Token shards + manifest.json written by load_pretrain_dataset.py")
    instruct_data_dir: str = _f("data/instruct", "Conversation shards written by load_instruct_dataset.py (sft)")
    dpo_data_dir: str = _f("data/dpo", "Preference-pair shards written by load_dpo_dataset.py (dpo)")

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
    training_precision: str = _f("auto", "auto | bf16 | fp16 (with loss scaling; GPUs only) | fp32: autocast dtype of "
                                         "the forward pass. auto: bf16 on GPUs that support it (else fp16), bf16 on "
                                         "CPUs that run it natively and fast (AMX / AVX-512 BF16), else fp32")
    compile: bool = _f(False, "torch.compile the model")
    activation_checkpointing: bool = _f(False, "Recompute each block in backward: less memory, ~1/3 more compute")

    # ---- instruction tuning (sft) --------------------------------------------------------------
    system_prompt: str = _f("", "System turn added to conversations that have none (empty: none); data prep")
    instruct_overflow: str = _f("truncate", "Conversations longer than MAX_SEQ_LEN: drop | truncate (whole trailing "
                                            "turns are cut so a row still ends after an assistant turn); data prep")
    packing: bool = _f(True, "Pack conversations into full rows (each sees only itself); false: one per row, padded")
    instruct_eval_examples: int = _f(100, "Held-out prompts answered greedily for exact-match accuracy at each "
                                          "validation (0: off)")

    # ---- LoRA (any stage) --------------------------------------------------------------------
    lora_enabled: bool = _f(False, "Train low-rank adapters instead of the full weights")
    lora_rank: int = _f(16, "Adapter rank r")
    lora_alpha: float = _f(32.0, "Adapter scale numerator: the update is (alpha / rank) * B A x")
    lora_dropout: float = _f(0.05, "Dropout on the adapter's input only")
    lora_target_modules: str = _f("wq,wk,wv,wo,w1,w2,w3", "Linear layers that get adapters, by name, from "
                                                         "wq,wk,wv,wo,w1,w2,w3 (a JSON list works too)")

    # ---- DPO ------------------------------------------------------------------------------------
    dpo_beta: float = _f(0.1, "DPO beta: strength of the pull towards the reference model")
    dpo_loss: str = _f("sigmoid", "sigmoid (DPO) | ipo")
    dpo_label_smoothing: float = _f(0.0, "Conservative DPO: assumed probability that a preference label is flipped")
    dpo_sft_weight: float = _f(0.0, "RPO: adds this times -log p(chosen) / (its tokens) to each pair's loss, averaged "
                                     "over pairs like the DPO loss, so the chosen answers stay likely (TRL's 'sft' "
                                     "averages over all chosen tokens of a batch: the same only for equal lengths)")
    dpo_precompute_reference: bool = _f(False, "Compute the reference log-probs once before training (stored beside "
                                               "the data) instead of holding a reference model")
    dpo_reference_dtype: str = _f("auto", "auto | bf16 | fp32: weights of the frozen reference copy (auto: fp32, "
                                          "as the policy's; bf16 halves its memory, adding noise to the rewards)")

    # ---- ORPO (preference pairs, no reference model) ----------------------------------------
    orpo_lambda: float = _f(0.1, "ORPO: weight of the odds-ratio term beside the chosen answers' NLL (TRL's beta)")

    # ---- SimPO (preference pairs, no reference model) ---------------------------------------
    simpo_beta: float = _f(2.0, "SimPO: an answer's reward is this times its mean log-probability per token")
    simpo_gamma: float = _f(1.0, "SimPO: the target margin between the chosen and the rejected answer's rewards")

    # ---- distillation (beside pretrain or sft) ---------------------------------------------
    is_model_distillation: bool = _f(False, "Learn from a teacher's token distributions as well as the labels")
    teacher_model_checkpoint: str = _f("", "Teacher: a checkpoint of this project, a Meta-format or a Hugging Face "
                                           "model directory")
    distillation_temperature: float = _f(2.0, "Softmax temperature T for both teacher and student")
    distillation_alpha: float = _f(0.5, "Loss = (1 - alpha) CE + alpha T^2 KL")
    distillation_loss: str = _f("forward_kl", "forward_kl (KL(teacher || student)) | reverse_kl | jsd")
    distillation_jsd_beta: float = _f(0.5, "Generalised JSD's beta (0: forward KL, 1: reverse KL); jsd only")
    teacher_dtype: str = _f("auto", "auto | bf16 | fp32: the teacher's weights (auto: bf16 when training in bf16)")

    # ---- evaluation, checkpoints, logging -----------------------------------------------
    validate_every_x_steps: int = _f(25, "Validation loss every N steps (0: never; also at the end)")
    validation_steps: int = _f(4, "Micro-batches per validation pass (per rank)")
    early_stopping_patience: int = _f(0, "Stop after this many validations without improvement (0: off)")
    generate_every_x_steps: int = _f(50, "Sample generations every N steps (0: only at the end)")
    generation_prompts_file: str = _f("", "One prompt per line for sample generations (user messages in sft and "
                                          "dpo); empty: prompts.txt, or chat_prompts.txt for sft and dpo")
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

    # ---- offload: models bigger than memory ----------------------------------------------------
    offload: str = _f("none", "none | disk: the weights (full fine-tuning: also their gradients and AdamW state) live "
                              "in OFFLOAD_DIR and stream through memory one block at a time, with the same result "
                              "as training in memory | cpu: host memory as the store for a GPU (not built yet)")
    offload_dir: str = _f("", "Where OFFLOAD=disk keeps its stores (scratch; empty: RUN_DIR/offload)")
    offload_activations: str = _f("memory", "memory | disk | all: what OFFLOAD=disk keeps between the forward and "
                                            "the backward pass: each block's input in memory or on disk "
                                            "(OFFLOAD_DIR/activations, for long sequences), the backward recomputing "
                                            "each block; all: every activation in memory as training in "
                                            "memory keeps them, no recompute (faster, more memory); exact every way")

    # ---- distributed --------------------------------------------------------------------
    parallelism: str = _f("ddp", "ddp (a full replica per rank) | fsdp (FSDP2: parameters, grads and optimizer state sharded)")
    ddp_backend: str = _f("auto", "auto (nccl on CUDA, gloo on CPU) | nccl | gloo")

    # ---- derived, not read from .env --------------------------------------------------------
    env_file: str = field(default="", metadata={"derived": True})
    sources: dict = field(default_factory=dict, metadata={"derived": True})  # KEY -> where its value came from

    @classmethod
    def keys(cls) -> list[str]:
        return [f.name.upper() for f in dataclasses.fields(cls) if not f.metadata.get("derived")]

    @property
    def offload_path(self) -> Path:
        return Path(self.offload_dir) if self.offload_dir else self.run_path / "offload"

    @property
    def run_path(self) -> Path:
        """RUN_DIR, or runs/<stage> when it is empty, so each stage writes its own run by default."""
        return Path(self.run_dir or f"runs/{self.training_stage}")

    def validate(self) -> "Config":
        """Check every constraint in one place; raises ConfigError naming the key. The stage's name, and whether
        a teacher can join it, are checked by stages.stage_class, where the stages are."""

        def bad(key: str, expected: str):
            value = getattr(self, key.lower())
            raise ConfigError(f"{key}={value!r} is invalid: expected {expected}" + self.where(key))

        if self.training_stage == "distill":
            bad("TRAINING_STAGE", "a stage (stages.py): distillation is not one, set IS_MODEL_DISTILLATION=true "
                                  "with TRAINING_STAGE=pretrain or sft")
        for key, allowed in (("TRAINING_PRECISION", PRECISIONS), ("WANDB_MODE", ("online", "offline", "disabled")),
                             ("PARALLELISM", ("ddp", "fsdp")), ("DDP_BACKEND", ("auto", "nccl", "gloo")),
                             ("INSTRUCT_OVERFLOW", ("drop", "truncate")), ("DPO_LOSS", DPO_LOSSES),
                             ("DISTILLATION_LOSS", DISTILLATION_LOSSES), ("TEACHER_DTYPE", WEIGHT_DTYPES),
                             ("DPO_REFERENCE_DTYPE", WEIGHT_DTYPES)):
            if getattr(self, key.lower()) not in allowed:
                bad(key, " | ".join(allowed))
        if not (self.device in ("auto", "cpu", "cuda", "mps") or self.device.startswith("cuda:")):
            bad("DEVICE", "auto | cpu | cuda | cuda:N | mps")
        for key in ("DIM", "N_LAYERS", "N_HEADS", "N_KV_HEADS", "MULTIPLE_OF", "MAX_SEQ_LEN", "TOTAL_BATCH_SIZE",
                    "MAX_BATCH_SIZE", "MAX_STEPS", "ROPE_ORIGINAL_MAX_SEQ_LEN", "VALIDATION_STEPS",
                    "GENERATION_MAX_NEW_TOKENS", "LOG_EVERY_X_STEPS", "KEEP_LAST_CHECKPOINTS", "LORA_RANK"):
            if getattr(self, key.lower()) < 1:
                bad(key, "a positive integer")
        for key in ("VOCAB_SIZE", "WARMUP_STEPS", "VALIDATE_EVERY_X_STEPS", "EARLY_STOPPING_PATIENCE",
                    "GENERATE_EVERY_X_STEPS", "SAVE_EVERY_X_STEPS", "HELLASWAG_EVERY_X_STEPS",
                    "HELLASWAG_NUMBER_OF_EXAMPLES", "INSTRUCT_EVAL_EXAMPLES"):
            if getattr(self, key.lower()) < 0:
                bad(key, "an integer >= 0")
        for key in ("MAX_LR", "NORM_EPS", "ROPE_THETA", "ADAM_EPS", "ROPE_SCALE_FACTOR", "LORA_ALPHA", "DPO_BETA",
                    "DISTILLATION_TEMPERATURE", "SIMPO_BETA"):
            if not getattr(self, key.lower()) > 0:
                bad(key, "a number > 0")
        for key in ("MIN_LR", "WEIGHT_DECAY", "GRAD_CLIP", "MFU_FLOPS_PEAK", "DPO_SFT_WEIGHT", "ORPO_LAMBDA",
                    "SIMPO_GAMMA"):
            if getattr(self, key.lower()) < 0:
                bad(key, "a number >= 0")
        if self.min_lr > self.max_lr:
            bad("MIN_LR", f"<= MAX_LR ({self.max_lr})")
        for key in ("BETA1", "BETA2", "LORA_DROPOUT"):
            if not 0 <= getattr(self, key.lower()) < 1:
                bad(key, "a number in [0, 1)")
        for key in ("DISTILLATION_ALPHA", "DISTILLATION_JSD_BETA"):
            if not 0 <= getattr(self, key.lower()) <= 1:
                bad(key, "a number in [0, 1]")
        if not 0 <= self.dpo_label_smoothing < 0.5:
            bad("DPO_LABEL_SMOOTHING", "a number in [0, 0.5)")
        if self.dpo_label_smoothing and self.dpo_loss == "ipo":
            bad("DPO_LABEL_SMOOTHING", "0 with DPO_LOSS=ipo (label smoothing is conservative DPO, a sigmoid loss)")
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
        if self.is_model_distillation and not self.teacher_model_checkpoint:
            bad("TEACHER_MODEL_CHECKPOINT", "a teacher checkpoint when IS_MODEL_DISTILLATION=true")
        self.validate_offload(bad)
        return self

    def validate_offload(self, bad) -> None:
        """The settings a streamed model cannot honour (offload.py), each refused in one line."""
        if self.offload not in ("none", "cpu", "disk"):
            bad("OFFLOAD", "none | disk (or cpu, not built yet)")
        if self.offload == "cpu":
            bad("OFFLOAD", "none | disk: cpu (host memory as the store for a GPU) needs a GPU and is not built yet")
        if self.offload_activations not in ("memory", "disk", "all"):
            bad("OFFLOAD_ACTIVATIONS", "memory | disk | all")
        if self.offload == "none":
            if self.offload_activations != "memory":
                bad("OFFLOAD_ACTIVATIONS", "memory without OFFLOAD=disk (disk and all are about a streamed model)")
            return
        for key, wrong, why in (
                ("COMPILE", True, "false: the streamed blocks change their weights under the compiled graph"),
                ("PARALLELISM", "fsdp", "ddp: FSDP shards weights that offload keeps on disk instead"),
                ("TRAINING_PRECISION", "fp16", "auto, bf16 or fp32: fp16 loss scaling is not built for the "
                                               "stored gradients"),
                ("DPO_PRECOMPUTE_REFERENCE", True, "false: the table is keyed by the weights in memory"),
                ("DPO_REFERENCE_DTYPE", "bf16", "auto or fp32: a streamed reference computes in float32")):
            if getattr(self, key.lower()) == wrong:
                raise ConfigError(f"{key}={wrong!r} is invalid with OFFLOAD={self.offload}: expected {why}"
                                  + self.where(key))

    def where(self, key: str) -> str:
        """Where a key's value came from, for error messages: the file, the environment, or the default."""
        source = self.sources.get(key)
        return f" (from {source})" if source else ""

    def to_dict(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "sources"}


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
    sources: dict[str, str] = {}
    for f in dataclasses.fields(Config):
        key = f.name.upper()
        if f.metadata.get("derived"):
            continue
        for source, table in (("an override", overrides or {}), ("the environment", os.environ),
                              (path, file_values)):
            if key in table:
                raw, sources[key] = table[key], source
                break
        else:
            continue
        try:
            values[f.name] = _parse(key, raw, _TYPES[f.name])
        except ConfigError as e:
            raise ConfigError(f"{e} (from {sources[key]})") from None
    stage = values.get("training_stage")
    if isinstance(stage, str):
        values["training_stage"] = STAGE_ALIASES.get(stage.strip().lower(), stage.strip().lower())
    return Config(**values, sources=sources).validate()


def exit_on_config_error(error: ConfigError) -> typing.NoReturn:
    """Entry points print a bad setting as one line, no traceback."""
    print(f"config error: {error}", file=sys.stderr)
    raise SystemExit(2)
