"""Benchmark this project against Hugging Face `transformers` on the same model, weights and batch.

    python bench.py                                         # CPU, `small` preset: about 10 minutes on 2 cores
    python bench.py --device cuda --preset 1b --precisions bf16 --skip variants,data_prep --decode_batches 1,16
    python bench.py --preset tiny --quick --json out.json   # seconds: checks that the tool works
    python bench.py --only offload --json offload.json      # the offload row alone: about 6 minutes on 2 cores

What is measured, printed as one table and written with the environment to --json:

- training step (forward, backward, AdamW) of our `Transformer` and of `LlamaForCausalLM` holding the
  same weights, on the same batch, in fp32 and under bf16 autocast: tokens/s, ratio, peak memory, MFU;
- generation: greedy decoding with our KV cache against `transformers`' `generate`, fp32 and bf16 weights,
  batch 1 (generate.py's loop) and any --decode_batches (our KV-cache forward in a batched loop);
- training variants of ours on the same shape against plain pretraining rows: packed SFT rows, LoRA, DPO with
  a live and a precomputed reference, distillation from a wider teacher (tokens/s and peak memory), each
  through its stage's own loss in stages.py, on a batch laid out as that stage's loader lays it out;
- offload: train.py's SFT step on a model that fits in memory (OFFLOAD_PRESETS: 320M parameters for `small`), in
  memory and streamed from an OFFLOAD=disk store whose files are in the page cache, for full fine-tuning and LoRA:
  seconds per step, their ratio, the share of the offloaded step spent waiting for the store, and whether both
  trained through the same losses and gradient norms (they are exact, so anything else means other work);
- data preparation: the shard writer (`prepare_pretrain_dataset`) with 1 and 2 worker processes against
  a plain single-process tiktoken loop over the same documents, and that loop split over 2 processes
  (the most 2 processes get out of the machine: the ceiling for the writer's scaling).

Method
- Each model lives in its own spawned process, so each peak memory is its own: on CPU the peak resident
  set (VmHWM, reset once the model, optimizer and batch exist) minus the resident set right after the
  imports; on CUDA `torch.cuda.max_memory_allocated`. Each training precision gets a fresh pair.
- After warm-up, the parent alternates the processes run by run, swapping who goes first every round,
  so that other jobs on a shared machine slow both alike; figures are medians over the rounds.
- MFU = flops_per_token x tokens/s / peak. flops_per_token = 6 N + 12 n_layers dim seq_len, with N the
  parameters without the embedding lookup but with the output layer even when tied (the second term
  is attention's scores and weighted values; PaLM, appendix B). The peak is (a) a dense square matmul
  in the same dtype, timed in the same rounds, and (b) on a GPU, its datasheet figure.
- HF is given `shift_labels=y`, so it scores the same T positions as ours without its internal shift
  (older `transformers` without it get a T+1 window and score T positions: see `hf_loss_positions`),
  and `use_cache=False`, as in any training loop. Ours runs `model(x, y, return_logits=False)`, the
  trainer's fused chunked output layer + cross-entropy. Both use the trainer's `build_optimizer`.
- Generation: tokens/s = new tokens (all rows) / wall time of the whole call, prompt included, eager. The
  first call is timed apart: ours reorders its weights for the CPU kernels then, once per set of weights.
- Offload: both sides are train.py's own objects (initial_model, start_offload, OptimizerStep: the clipped AdamW
  update, through the store's clip_and_step for offloaded full fine-tuning) with train.py's allocator setting, on
  packed SFT rows, one pair of processes per precision running the methods in turn (so no peak memory: the
  README measures offloaded runs' memory whole); the I/O share is RunOffload.io_seconds (the streamed model's
  waits) over the step. The store lives in the system's temporary directory (TMPDIR); how much of it is in the
  page cache is read with mincore before and after the timed steps and printed.
- Data preparation runs in its own interpreter; see DATA_PREP_RUN for what is on the clock. Its
  "after start-up" ratio counts each writer run from the moment every worker has returned a batch.
- On CPU the allocator matters: glibc maps tensors above its mmap threshold (at most 32 MB) afresh and
  unmaps them when freed, so every step page-faults its big buffers again. Settings such as
  MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=<bytes> reach the model processes through the environment
  and are recorded under environment.allocator_env.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import inspect
import itertools
import json
import mmap
import multiprocessing
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch

from config import Config
from dataloaders import trained_rows
from distributed import DistInfo
from generate import generate_tokens
from hf_convert import to_hf
import lora
from losses import IGNORE_INDEX
from model import PRESETS as MODEL_PRESETS
from model import ModelArgs, Transformer
from stages import Distillation, DPOStage, Setting, SFTStage, Stage
import hardware
from hardware import datasheet_peak, plausible_mfu
from speedups import reordered_linears
from train import OptimizerStep, Start, build_optimizer, choose_cpu_allocator, initial_model, start_offload, to_device

ROOT = Path(__file__).resolve().parent
SEED = 1234
KINDS = ("ours", "hf")
PRECISIONS = ("fp32", "bf16")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
SECTIONS = ("train", "generate", "variants", "offload", "data_prep")


# ---- presets -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Preset:
    model: dict  # ModelArgs fields; the vocabulary is always Llama 3's 128,256 tokens
    batch: int
    seq_len: int


LLAMA3_VOCAB = 128256
PRESETS: dict[str, Preset] = {
    # seconds on a laptop: for the test
    "tiny": Preset(dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=32, tie_word_embeddings=True),
                   batch=2, seq_len=64),
    # a model a CPU steps in seconds; the 128k vocabulary is most of its weights, as in every small Llama 3
    "small": Preset(dict(dim=512, n_layers=8, n_heads=8, n_kv_heads=4, multiple_of=256, tie_word_embeddings=True),
                    batch=4, seq_len=256),
    # Llama 3.2 1B, for GPUs. Batch 2 because both models share the GPU: by estimate HF's fp32 step (~40 GB)
    # then fits beside the other model's idle weights and AdamW state (~15 GB) in 80 GB. --batch changes it.
    "1b": Preset(MODEL_PRESETS["llama3.2-1b"], batch=2, seq_len=2048),
}
# The offload row's model for each preset: one that also fits in memory, so that both ways can train it. For `small`
# a few hundred million parameters: 320M (1024 wide, 16 blocks; the tied 128k embedding is 131M of them), SFT rows of
# 256 tokens. None for `1b`: offloaded full fine-tuning moves about 45 GB through the store per step at that size;
# train.py with OFFLOAD=disk measures it (README).
OFFLOAD_PRESETS: dict[str, Preset] = {
    "tiny": PRESETS["tiny"],
    "small": Preset(dict(dim=1024, n_layers=16, n_heads=16, n_kv_heads=8, multiple_of=256, tie_word_embeddings=True),
                    batch=2, seq_len=256),
}


@dataclass(frozen=True)
class Plan:
    """Everything a model process needs to build its side of the comparison."""
    preset: str
    device: str
    batch: int
    seq_len: int
    compile: bool
    prompt_len: int
    new_tokens: int
    offload_micro_batches: int = 1  # the offload row's gradient accumulation: micro-batches per optimizer step

    def model_args(self) -> ModelArgs:
        max_seq_len = max(self.seq_len, self.prompt_len + self.new_tokens)
        return ModelArgs(**PRESETS[self.preset].model, vocab_size=LLAMA3_VOCAB, max_seq_len=max_seq_len)


@dataclass(frozen=True)
class Rounds:
    train_warmup: int
    train: int
    generate_warmup: int
    generate: int
    data_prep: int
    corpus_chars: int  # the data-preparation corpus: CPython's documentation, repeated up to this size
    corpus_source_chars: Optional[int] = None  # how much of the documentation is read before repeating (None: all)


# 40M characters are about 9.3M tokens. A full CPU run of the small preset takes about 4 minutes.
FULL = Rounds(train_warmup=2, train=5, generate_warmup=1, generate=5, data_prep=5, corpus_chars=40_000_000)
# QUICK: no warm-up, two steps (the second after an update, so the offload row's losses compare updates), and a
# corpus of a few worker batches, so the rate after start-up has something to measure, made of the documentation's
# first 500k characters (reading 3M of it takes 8 s: every module's docstrings and comments are parsed).
QUICK = Rounds(train_warmup=0, train=2, generate_warmup=1, generate=2, data_prep=1, corpus_chars=3_000_000,
               corpus_source_chars=500_000)


def hf_takes_shift_labels() -> bool:
    from transformers.loss.loss_utils import ForCausalLMLoss
    return "shift_labels" in inspect.signature(ForCausalLMLoss).parameters


# ---- memory and timing helpers -------------------------------------------------------------------------
def _status_kib(field: str) -> int:
    return int(re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1))


def reset_peak_memory(device: torch.device) -> bool:
    """Start a new peak here; False when the CPU peak cannot be reset (then it includes set-up)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM := VmRSS
        return True
    except OSError:
        return False


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_flops(device: torch.device, dtype: torch.dtype) -> float:
    """Achieved FLOP/s of a dense square matmul: the machine's practical peak in this dtype."""
    n, reps = (8192, 10) if device.type == "cuda" else (2048, 3)
    return hardware.matmul_flops(device, dtype, n, reps)


def autocast(precision: str, device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()


# ---- one model in one process ------------------------------------------------------------------------------
class ModelRunner:
    """Lives in a model process: builds ours or HF's model and runs the timed work on request."""

    def __init__(self, kind: str, plan: Plan):
        self.kind, self.plan = kind, plan
        self.device = torch.device(plan.device)
        if kind == "hf":  # its lazily loaded modules must not count as the model's memory
            import transformers
            from transformers import LlamaForCausalLM  # noqa: F401

            transformers.logging.set_verbosity_error()  # config and generation notices would drown the table
        self.hf_shift_labels = kind == "hf" and hf_takes_shift_labels()
        self.rss_after_imports = _status_kib("VmRSS") * 1024
        self.model: Optional[torch.nn.Module] = None
        self.optimizer: Optional[torch.optim.Optimizer] = None
        self.peak_resettable = True
        self.first_loss: Optional[float] = None  # before any update: shows both start from the same point
        self.generation_precision: Optional[str] = None
        self.decode_kernels: Optional[ExitStack] = None  # ours: the generation model's reordered weights, while held

    def _build(self) -> torch.nn.Module:
        """The same weights in both processes: our seeded initialisation, converted for HF."""
        with torch.device(self.device):
            torch.manual_seed(SEED)
            ours = Transformer(self.plan.model_args())
            return ours if self.kind.startswith("ours") else to_hf(ours, attn_implementation="sdpa")

    # ---- training ----
    def setup_training(self, precision: str) -> dict:
        self.precision = precision
        self._drop_decode_kernels()
        self.model = self._build().train()
        self.step_model = torch.compile(self.model) if self.plan.compile else self.model
        self.optimizer = build_optimizer(self.model, Config(), self.device)
        window = torch.randint(0, LLAMA3_VOCAB, (self.plan.batch, self.plan.seq_len + 1),
                               generator=torch.Generator().manual_seed(SEED + 1)).to(self.device)
        if self.kind == "hf" and not self.hf_shift_labels:
            self.x = self.y = window  # HF shifts internally: T+1 tokens in, T positions scored
        else:
            self.x, self.y = window[:, :-1].contiguous(), window[:, 1:].contiguous()
        info = {"params": sum(p.numel() for p in self.model.parameters())}
        if self.kind == "ours":
            info["flops_per_token"] = self.model.flops_per_token(self.plan.seq_len)
        else:
            info["hf_loss_positions"] = "shift_labels" if self.hf_shift_labels else "T+1 window"
        gc.collect()
        self.peak_resettable = reset_peak_memory(self.device)
        return info

    def _loss(self) -> torch.Tensor:
        if self.kind == "ours":
            return self.step_model(self.x, self.y, return_logits=False)[1]
        if self.hf_shift_labels:
            return self.step_model(input_ids=self.x, labels=self.y, shift_labels=self.y, use_cache=False).loss
        return self.step_model(input_ids=self.x, labels=self.y, use_cache=False).loss

    def _step(self) -> float:
        with autocast(self.precision, self.device):
            loss = self._loss()
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        loss_value = loss.item()  # waits for the device
        if self.first_loss is None:
            self.first_loss = loss_value
        return loss_value

    def train_step(self) -> dict:
        """One timed step. On CUDA both models share one GPU, which cannot hold both activation peaks
        of the 1b preset: each turn gives its cached blocks back at the end, so it starts with an
        untimed step that takes them again from the driver, and times the next."""
        if self.device.type == "cuda":
            self._step()
        sync(self.device)
        start = time.perf_counter()
        loss_value = self._step()
        seconds = time.perf_counter() - start
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return {"seconds": seconds, "loss": loss_value}

    def finish_training(self) -> dict:
        """Peak memory since set-up, in bytes; then frees the model and optimizer."""
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            peak = _status_kib("VmHWM") * 1024 - self.rss_after_imports
        first_loss, self.first_loss = self.first_loss, None
        self.model = self.step_model = self.optimizer = None
        gc.collect()
        return {"peak_bytes": peak, "includes_setup": not self.peak_resettable, "first_loss": first_loss}

    # ---- generation ----
    def setup_generation(self, precision: str, batch: int = 1) -> None:
        if self.model is None or self.generation_precision != precision:  # a new batch size keeps the weights
            self._drop_decode_kernels()
            self.model = None
            gc.collect()
            self.model, self.generation_precision = self._build().to(DTYPES[precision]).eval(), precision
        self.prompts = torch.randint(0, LLAMA3_VOCAB, (batch, self.plan.prompt_len),
                                     generator=torch.Generator().manual_seed(SEED + 2)).to(self.device)

    def _drop_decode_kernels(self) -> None:
        if self.decode_kernels is not None:
            self.decode_kernels.close()
            self.decode_kernels = None

    def generate(self) -> dict:
        """Greedy decoding of exactly `new_tokens` tokens (no stop token) after each prompt. Ours: generate.py's
        loop for one sequence; for a batch, the same KV-cache forward in a batched loop (`greedy_batch`)."""
        n = self.plan.new_tokens
        sync(self.device)
        start = time.perf_counter()
        if self.kind == "ours" and self.decode_kernels is None:  # as generate.py's main: once for these weights
            self.decode_kernels = ExitStack()
            self.decode_kernels.enter_context(reordered_linears(self.model))
        if self.kind == "ours" and len(self.prompts) == 1:
            ids = [list(generate_tokens(self.model, self.prompts[0].tolist(), n, stop_ids=[]))]
        elif self.kind == "ours":
            ids = greedy_batch(self.model, self.prompts, n).tolist()
        else:
            out = self.model.generate(self.prompts, attention_mask=torch.ones_like(self.prompts), max_new_tokens=n,
                                      min_new_tokens=n, do_sample=False, pad_token_id=0)
            ids = out[:, self.prompts.shape[1]:].tolist()
        sync(self.device)
        return {"seconds": time.perf_counter() - start, "new_tokens": sum(map(len, ids)), "ids": ids}


@torch.inference_mode()
def greedy_batch(model: Transformer, prompts: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """(B, P) prompts -> (B, new_tokens) greedy ids through the model's KV cache, with no stop token: what a
    server decoding B requests at once runs (generate.py decodes one sequence at a time)."""
    B, P = prompts.shape
    model.setup_cache(batch_size=B, max_seq_len=P + new_tokens)
    try:
        logits, _ = model(prompts, start_pos=0, logits_to_keep=1)
        ids = []
        for pos in range(P, P + new_tokens):
            ids.append(logits[:, -1].argmax(-1))  # (B,)
            if len(ids) < new_tokens:
                logits, _ = model(ids[-1][:, None], start_pos=pos)
        return torch.stack(ids, dim=1)
    finally:
        model.clear_cache()


# Training variants of ours on the same shape, each against plain pretraining rows: what a stage costs. Each
# runs its stage's own loss from stages.py (the trainer's code path) on a batch laid out as its loader lays it.
VARIANTS = {
    "packed": "packed SFT rows (document mask)",
    "lora": "LoRA r=16, packed SFT rows",
    "dpo": "DPO, live reference copy",
    "dpo_precomputed": "DPO, precomputed reference",
    "distill": "distillation, teacher 2x wider",
}
CONVERSATION_LENGTHS = (37, 90, 18, 111, 64, 25)  # packed into each row until it is full
# The share of a conversation's positions that have a target (its answer and closing <|eot_id|>): the embedded
# default data's, 19k of 173k tokens. Only these meet the output layer in SFT.
ANSWER_SHARE = 0.11


def packed_row(seq_len: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(positions, document ids, trained) of one row of conversations of CONVERSATION_LENGTHS, cycled; each
    conversation's last ANSWER_SHARE of positions is trained."""
    positions, documents, trained, lengths = [], [], [], itertools.cycle(CONVERSATION_LENGTHS)
    doc = 0
    while len(positions) < seq_len:
        n = min(next(lengths), seq_len - len(positions))
        answer = max(1, round(ANSWER_SHARE * n))
        positions += list(range(n))
        documents += [doc] * n
        trained += [False] * (n - answer) + [True] * answer
        doc += 1
    return torch.tensor(positions), torch.tensor(documents), torch.tensor(trained)


def packed_sft(tokens: torch.Tensor, targets: torch.Tensor) -> tuple[dict, torch.Tensor]:
    """(B, T) rows laid out as the SFT loader packs conversations (packed_row): (the model's inputs, the targets,
    kept on the answers only). Positions restart and the document id changes at each conversation."""
    B, T = tokens.shape
    positions, documents, trained = packed_row(T)
    targets = targets.clone()
    targets[:, ~trained.to(targets.device)] = IGNORE_INDEX
    return {"tokens": tokens, "positions": positions.expand(B, T), "document_ids": documents.expand(B, T)}, targets


class VariantRunner(ModelRunner):
    """Ours, set up as one of VARIANTS ("ours:packed", ...): the same weights, the batch that variant's loader
    would make of the same shape, and its stage's loss (stages.py), divided by the stage's count as the
    trainer divides it."""

    def setup_training(self, precision: str) -> dict:
        info = super().setup_training(precision)
        self.variant = self.kind.split(":", 1)[1]
        B, T = self.x.shape
        cfg = Config(training_precision=precision, instruct_eval_examples=0)  # no held-out prompts to read
        setting = Setting(cfg, DistInfo(0, 0, 1, self.device), samples_per_step=B, tokenizer=None,
                          vocab_size=LLAMA3_VOCAB, starting_weights=self._build)
        batch, targets = {"tokens": self.x}, self.y.clone()
        if self.variant in ("packed", "lora"):
            batch, targets = packed_sft(self.x, self.y)
            self.stage: Stage = SFTStage(setting)
        elif self.variant.startswith("dpo"):
            if B % 2:
                raise ValueError(f"the DPO variants need an even batch (pairs: chosen rows, then rejected), not {B}")
            targets[:, : T // 2] = IGNORE_INDEX  # the prompt half of each row is not scored
            batch["pair_index"] = torch.arange(B // 2)
            self.stage = DPOStage(setting)
        else:
            wide = {**asdict(self.plan.model_args()), "dim": 2 * self.plan.model_args().dim}
            with torch.device(self.device):
                torch.manual_seed(SEED + 3)
                teacher = Transformer(ModelArgs(**wide)).to(DTYPES[precision]).eval().requires_grad_(False)
            self.stage = Distillation(Stage(setting), teacher)
        if self.variant != "distill":  # SFT and DPO loaders list the positions that have a target
            batch["trained_rows"] = trained_rows(targets.cpu().numpy())
        self.batch = {k: v.to(self.device) for k, v in {**batch, "targets": targets}.items()}
        if self.variant == "lora":
            torch.manual_seed(SEED)
            lora.apply_lora(self.model, lora.LoRASettings(rank=16, alpha=32.0, dropout=0.05,
                                                          targets=list(lora.VALID_TARGETS)))
            self.optimizer = build_optimizer(self.model, Config(), self.device)
        if self.variant == "dpo_precomputed":  # what DPO_PRECOMPUTE_REFERENCE reads back for these pairs
            self.stage.table = torch.zeros(B // 2, 2)
        else:
            self.stage.setup(self.model)  # DPO: its frozen reference copy, in the trainer's default dtype
        if self.variant == "dpo":
            info["reference_dtype"] = DTYPE_NAMES[self.stage.reference.tok_embeddings.weight.dtype]
        gc.collect()
        self.peak_resettable = reset_peak_memory(self.device)
        info["trainable"] = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        return info

    def _loss(self) -> torch.Tensor:
        loss, _ = self.stage.loss(self.step_model, self.batch)
        return loss / self.stage.count(self.batch)


# ---- the offload row: train.py's step in memory and streamed from disk ---------------------------------------------
# LoRA: the trainer's default adapter settings; -all: offloaded with OFFLOAD_ACTIVATIONS=all (no recompute)
OFFLOAD_METHODS = {"full": "full fine-tuning", "full-all": "full, activations kept", "lora": "LoRA r=16",
                   "lora-all": "LoRA r=16, activations kept"}


def offload_config(preset: str, device: str, precision: str, method: str, where: str, directory: str,
                   micro_batches: int = 1) -> Config:
    """The .env of an SFT run of the offload row's shape: `method` one of OFFLOAD_METHODS, `where` memory
    (OFFLOAD=none) or disk (OFFLOAD=disk, its stores in `directory`), `micro_batches` per step; every other
    setting the trainer's default."""
    shape = OFFLOAD_PRESETS[preset]
    return Config(**shape.model, max_seq_len=shape.seq_len, max_batch_size=shape.batch,
                  total_batch_size=shape.batch * shape.seq_len * micro_batches, training_stage="sft",
                  training_precision=precision,
                  instruct_eval_examples=0, lora_enabled=method.startswith("lora"),
                  offload="disk" if where == "disk" else "none", offload_dir=directory, device=device,
                  offload_activations="all" if method.endswith("-all") and where == "disk" else "memory").validate()


class _NeverStop:
    """OptimizerStep's stop request, never made (train.py's StopRequest would take over the signals)."""
    requested = False


class OffloadRunner(ModelRunner):
    """One side of the offload row, kind "offload:memory" or "offload:disk": for the method it is set up for, the
    model, stage and optimizer step train.py builds for an SFT run of the row's shape, in memory or streamed from an
    OFFLOAD=disk store, stepping one batch of packed SFT rows. Every step's loss and gradient norm is kept, warm-up
    included. A process serves one method (train.py's allocator settings depend on it); no peak memory is taken (an
    offloaded peak would count the store's mapped pages)."""

    def __init__(self, kind: str, plan: Plan):
        super().__init__(kind, plan)
        self.where = kind.split(":")[1]

    def setup_training(self, precision: str, method: str, directory: str) -> dict:
        self.precision = precision
        cfg = offload_config(self.plan.preset, self.plan.device, precision, method, self.where, directory,
                             self.plan.offload_micro_batches)
        # train.py's main does this first: each side allocates as a user's run allocates (a process per method)
        self.keeps_freed_memory = choose_cpu_allocator(cfg, self.device)
        d = DistInfo(0, 0, 1, self.device)
        settings = lora.LoRASettings.from_config(cfg) if cfg.lora_enabled else None
        self.offloaded = start_offload(cfg, d)  # None in memory
        self.model = initial_model(cfg, Start(), None, LLAMA3_VOCAB, self.device, settings, self.offloaded).model
        stage = SFTStage(Setting(cfg, d, cfg.max_batch_size, tokenizer=None, vocab_size=LLAMA3_VOCAB))
        stage.setup(self.model)
        streamed = self.offloaded if self.offloaded and self.offloaded.train_base else None
        self.optimizer = None if streamed else build_optimizer(self.model, cfg, self.device)
        scaler = torch.amp.GradScaler(self.device.type, enabled=False)  # fp16 only, which the row does not run
        self.optimizer_step = OptimizerStep(self.model, stage, self.optimizer, scaler, cfg, d, streamed)
        self.lr = cfg.max_lr
        self.batches = [self._micro_batch(cfg, SEED + 1 + k) for k in range(self.plan.offload_micro_batches)]
        self.losses: list[float] = []
        self.grad_norms: list[float] = []
        info = {"trainable": sum(p.numel() for p in self.model.parameters() if p.requires_grad),
                "keeps_freed_memory": self.keeps_freed_memory, "grad_clip": cfg.grad_clip, "lr": cfg.max_lr}
        if self.offloaded:  # the run's start-up line: what streams, bytes read and written per step
            info["offload_line"] = self.offloaded.describe(len(self.batches), cfg.max_batch_size, cfg.max_seq_len)
        return info

    def _micro_batch(self, cfg: Config, seed: int) -> dict:
        window = torch.randint(0, LLAMA3_VOCAB, (cfg.max_batch_size, cfg.max_seq_len + 1),
                               generator=torch.Generator().manual_seed(seed))
        inputs, targets = packed_sft(window[:, :-1].contiguous(), window[:, 1:].contiguous())
        return to_device(inputs | {"targets": targets, "trained_rows": trained_rows(targets.numpy()),
                                   "input_tokens": torch.tensor(targets.numel())}, self.device)

    def io_seconds(self) -> float:
        return self.offloaded.io_seconds() if self.offloaded else 0.0

    def _step(self) -> float:
        figures, _ = self.optimizer_step(self.batches, self.lr, _NeverStop())
        self.losses.append(figures["loss"])
        self.grad_norms.append(figures["grad_norm"])
        return figures["loss"]

    def train_step(self) -> dict:
        """One timed step, and the seconds of it spent waiting for the store (as train.py's io_share)."""
        sync(self.device)
        io_before, start = self.io_seconds(), time.perf_counter()
        loss = self._step()
        seconds = time.perf_counter() - start
        return {"seconds": seconds, "loss": loss, "io_seconds": self.io_seconds() - io_before}

    def finish_training(self) -> dict:
        out = {"losses": self.losses, "grad_norms": self.grad_norms}
        self.model = self.optimizer = self.optimizer_step = self.offloaded = None
        gc.collect()
        return out


def _serve(conn, kind: str, plan: Plan) -> None:
    """A model process's loop: (method, args) in, (ok, result or traceback) out, None to stop."""
    runner = (VariantRunner if kind.startswith("ours:") else OffloadRunner if kind.startswith("offload:")
              else ModelRunner)(kind, plan)
    conn.send((True, None))
    while (request := conn.recv()) is not None:
        method, args = request
        try:
            conn.send((True, getattr(runner, method)(*args)))
        except Exception:
            conn.send((False, traceback.format_exc()))
    conn.close()
    if not plan.compile:  # compiled: a normal exit, which lets inductor's compile workers release their semaphores
        os._exit(0)  # nothing left to flush; tearing down an interpreter that holds torch takes seconds


class ModelProcess:
    """One model in its own spawned process; `call` runs a `ModelRunner` method there."""

    def __init__(self, kind: str, plan: Plan):
        ctx = multiprocessing.get_context("spawn")  # fresh interpreter: its memory is the model's alone
        self.kind = kind
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_serve, args=(child, kind, plan), daemon=True)
        self.process.start()
        child.close()

    def call(self, method: str, *args):
        self.send(method, *args)
        return self.receive(method)

    def send(self, method: str, *args) -> None:
        self.conn.send((method, args))

    def receive(self, what: str):
        try:
            ok, result = self.conn.recv()
        except EOFError:
            raise RuntimeError(f"the {self.kind} model process died (out of memory?)") from None
        if not ok:
            raise RuntimeError(f"{self.kind} model process, {what}:\n{result}")
        return result

    def stop(self) -> None:
        """Ask the process to exit (once: a stopped process is left alone)."""
        if self.process.is_alive() and not self.conn.closed:
            self.conn.send(None)
            self.conn.close()


@contextmanager
def model_processes(plan: Plan, kinds: tuple[str, ...] = KINDS) -> Iterator[dict[str, ModelProcess]]:
    procs = {kind: ModelProcess(kind, plan) for kind in kinds}
    try:
        for p in procs.values():
            p.receive("start-up")  # both import in parallel; wait until both are ready
        yield procs
    finally:
        for p in procs.values():
            p.stop()
        for p in procs.values():  # both exit at once; the next measurement starts on an idle machine
            p.process.join(timeout=60)


def call_both(procs: dict[str, ModelProcess], method: str, *args) -> dict:
    """Run `method` in both processes at once (set-up, never timed work)."""
    for p in procs.values():
        p.send(method, *args)
    return {kind: p.receive(method) for kind, p in procs.items()}


def alternate(runs: dict[str, Callable[[], object]], warmup: int, rounds: int) -> dict[str, list]:
    """Call each function `warmup` times, then `rounds` times in turn, reversing the order every other
    round (A B C, C B A, ...) so that neither always runs just after the other. Returns the results."""
    for _ in range(warmup):
        for fn in runs.values():
            fn()
    results: dict[str, list] = {name: [] for name in runs}
    names = list(runs)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            results[name].append(runs[name]())
    return results


# ---- the three benchmarks ------------------------------------------------------------------------------
def nominal_peak(device: torch.device, precision: str) -> Optional[float]:
    return datasheet_peak(torch.cuda.get_device_name(device), precision) if device.type == "cuda" else None


def precisions_to_run(device: torch.device) -> dict[str, Optional[str]]:
    """precision -> None when it runs, else why not: bf16 needs native support (on a CPU without it a bf16
    matmul runs about 60x slower than float32, so its rows would take hours and say nothing)."""
    if device.type == "cpu":
        check = hardware.check_cpu_bf16()
        return {"fp32": None, "bf16": None if check.fast else check.how}
    return {"fp32": None, "bf16": None}


def bench_training(procs: dict[str, ModelProcess], plan: Plan, precision: str, rounds: Rounds) -> dict:
    device, dtype = torch.device(plan.device), DTYPES[precision]
    info = call_both(procs, "setup_training", precision)
    runs = alternate({"ours": lambda: procs["ours"].call("train_step"),
                      "hf": lambda: procs["hf"].call("train_step"),
                      "matmul": lambda: matmul_flops(device, dtype)},
                     rounds.train_warmup, rounds.train)
    memory = call_both(procs, "finish_training")

    tokens_per_step = plan.batch * plan.seq_len
    flops_per_token = info["ours"]["flops_per_token"]
    measured_peak = statistics.median(runs["matmul"])
    nominal = nominal_peak(device, precision)
    out = {"matmul_peak_flops": measured_peak, "matmul_peak_runs": runs["matmul"], "nominal_peak_flops": nominal,
           "flops_per_token": flops_per_token, "tokens_per_step": tokens_per_step}
    for kind in KINDS:
        seconds = [r["seconds"] for r in runs[kind]]
        tokens_per_s = tokens_per_step / statistics.median(seconds)
        achieved = flops_per_token * tokens_per_s
        out[kind] = {
            "tokens_per_s": tokens_per_s, "step_seconds": seconds, "first_step_loss": memory[kind]["first_loss"],
            "losses": [r["loss"] for r in runs[kind]],
            "params": info[kind]["params"], "peak_memory_mib": memory[kind]["peak_bytes"] / 2**20,
            "peak_includes_setup": memory[kind]["includes_setup"],
            "mfu_measured_peak": plausible_mfu(achieved, measured_peak),
            "mfu_nominal_peak": plausible_mfu(achieved, nominal) if nominal else None,
        }
    out["hf_loss_positions"] = info["hf"]["hf_loss_positions"]
    out["ratio"] = out["ours"]["tokens_per_s"] / out["hf"]["tokens_per_s"]
    out["memory_ratio"] = out["ours"]["peak_memory_mib"] / out["hf"]["peak_memory_mib"]
    return out


def bench_generation(procs: dict[str, ModelProcess], plan: Plan, precision: str, rounds: Rounds,
                     batch: int = 1) -> dict:
    call_both(procs, "setup_generation", precision, batch)
    # The first call is a warm-up, timed on its own: ours reorders its weights for the CPU kernels there
    # (speedups.reordered_linears, held until the weights change), a one-time cost that later calls skip.
    first = {kind: p.call("generate") for kind, p in procs.items()}
    runs = alternate({kind: (lambda p=p: p.call("generate")) for kind, p in procs.items()},
                     rounds.generate_warmup - 1, rounds.generate)
    out: dict = {"prompt_tokens": plan.prompt_len, "new_tokens": plan.new_tokens, "batch": batch,
                 "precision": precision}
    for kind in KINDS:
        seconds = [r["seconds"] for r in runs[kind]]
        out[kind] = {"tokens_per_s": batch * plan.new_tokens / statistics.median(seconds), "seconds": seconds,
                     "first_call_seconds": first[kind]["seconds"]}
    out["ratio"] = out["ours"]["tokens_per_s"] / out["hf"]["tokens_per_s"]
    # Greedy on identical weights: identical ids in fp32 show both decoded the same thing.
    out["same_tokens"] = runs["ours"][0]["ids"] == runs["hf"][0]["ids"]
    return out


def generation_key(precision: str, batch: int) -> str:
    """report["generate"]'s key: the precision alone for batch 1 (as every saved report has it)."""
    return precision if batch == 1 else f"{precision}_batch{batch}"


def bench_variants(plan: Plan, precision: str, rounds: Rounds) -> dict:
    """Each variant against plain pretraining rows of the same shape: tokens/s (of the rows' positions) and peak
    memory, each as a ratio to the rows'. Each variant has a fresh process of its own, alternated with one process
    of plain rows that serves them all (set up once, its model goes on training; its peak is over all the rounds).
    All start together, so their imports share the cores, and each variant's process ends once it is measured,
    before the next one builds its model."""
    kinds = ("ours", *(f"ours:{variant}" for variant in VARIANTS))
    measured = {}
    with model_processes(plan, kinds) as procs:
        rows = procs["ours"]
        rows_info = rows.call("setup_training", precision)
        for variant in VARIANTS:
            print(f"variant {variant}, {precision} ...", file=sys.stderr)
            process = procs[f"ours:{variant}"]
            info = process.call("setup_training", precision)
            runs = alternate({"ours": lambda: rows.call("train_step"), variant: lambda: process.call("train_step")},
                             rounds.train_warmup, rounds.train)
            measured[variant] = info, runs, process.call("finish_training")
            process.stop()
            process.process.join(timeout=60)
        rows_memory = rows.call("finish_training")["peak_bytes"] / 2**20
    out: dict = {"precision": precision, "code_path": "stages.py", "baseline": "one process for all variants"}
    tokens_per_step = plan.batch * plan.seq_len
    for variant, (info, runs, memory) in measured.items():
        base, other = (tokens_per_step / statistics.median(r["seconds"] for r in runs[k]) for k in ("ours", variant))
        out[variant] = {"tokens_per_s": other, "baseline_tokens_per_s": base, "speed_ratio": other / base,
                        "peak_memory_mib": memory["peak_bytes"] / 2**20, "baseline_peak_memory_mib": rows_memory,
                        "trainable": info["trainable"], "params": rows_info["params"]}
        out[variant]["memory_ratio"] = out[variant]["peak_memory_mib"] / rows_memory
        if variant == "dpo":
            out[variant]["reference_dtype"] = info["reference_dtype"]
    return out


def page_cache_share(directory: Path) -> float:
    """The share of the pages of the files under `directory` that are in the page cache (Linux mincore: each
    file is mapped, not read, so measuring changes nothing)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    resident = total = 0
    for path in sorted(p for p in Path(directory).rglob("*") if p.is_file() and p.stat().st_size):
        size = path.stat().st_size
        pages = -(-size // mmap.PAGESIZE)
        with open(path, "rb") as f:
            address = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, f.fileno(), 0)
        if address in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), f"mmap of {path} failed")
        try:
            vector = (ctypes.c_ubyte * pages)()
            if libc.mincore(ctypes.c_void_p(address), size, vector):
                raise OSError(ctypes.get_errno(), f"mincore of {path} failed")
        finally:
            libc.munmap(ctypes.c_void_p(address), size)
        resident += sum(v & 1 for v in vector)
        total += pages
    if not total:
        raise ValueError(f"{directory}: no files to look for in the page cache")
    return resident / total


def filesystem_type(path: str) -> Optional[str]:
    """The type of the filesystem holding `path` (ext4, tmpfs, ...) from /proc/mounts; None off Linux."""
    try:
        mounts = [line.split()[1:3] for line in Path("/proc/mounts").read_text().splitlines()]
    except OSError:
        return None
    resolved = os.path.realpath(path)
    inside = [(point, kind) for point, kind in mounts
              if resolved == point or resolved.startswith(point.rstrip("/") + "/")]
    return max(inside, key=lambda m: len(m[0]))[1] if inside else None


def bench_offload_precision(plan: Plan, precision: str, rounds: Rounds) -> dict:
    """Each method in memory against offloaded, alternated step by step (rounds as the training step's); each
    method's store lives in a temporary directory that outlives its processes."""
    out: dict = {}
    with tempfile.TemporaryDirectory(prefix="bench-offload-") as tmp:
        for method in OFFLOAD_METHODS:
            out[method] = _bench_offload_method(plan, precision, method, Path(tmp) / method, rounds)
    return out


def _bench_offload_method(plan: Plan, precision: str, method: str, store: Path, rounds: Rounds) -> dict:
    """One method's pair of fresh processes: each picks the allocator settings train.py would for the method."""
    kinds = {"memory": "offload:memory", "disk": "offload:disk"}
    with model_processes(plan, tuple(kinds.values())) as procs:
        print(f"offload, {method}, {precision} ...", file=sys.stderr)
        info = call_both(procs, "setup_training", precision, method, str(store))
        runs = {kind: (lambda p=p: p.call("train_step")) for kind, p in procs.items()}
        alternate(runs, rounds.train_warmup, 0)
        cached_before = page_cache_share(store)
        steps = alternate(runs, 0, rounds.train)
        cached_after = page_cache_share(store)
        done = call_both(procs, "finish_training")
    shutil.rmtree(store)
    figures = offload_figures({where: (info[k], steps[k], done[k]) for where, k in kinds.items()})
    figures["page_cache_share"] = {"before": cached_before, "after": cached_after}
    return figures


def offload_figures(sides: dict[str, tuple[dict, list, dict]]) -> dict:
    """memory / disk: (set-up info, timed steps, every step's loss and gradient norm) -> the row's figures."""
    out: dict = {}
    for where, (info, steps, done) in sides.items():
        seconds = [s["seconds"] for s in steps]
        out[where] = {"seconds_per_step": statistics.median(seconds), "step_seconds": seconds,
                      "io_seconds": [s["io_seconds"] for s in steps], **done, **info}
    memory, disk = out["memory"], out["disk"]
    out["ratio_per_round"] = [d / m for m, d in zip(memory["step_seconds"], disk["step_seconds"])]
    out["ratio"] = statistics.median(out["ratio_per_round"])  # paired by round, as the data-prep ratios
    out["io_share_per_step"] = [io / s for io, s in zip(disk["io_seconds"], disk["step_seconds"])]
    out["io_share"] = statistics.median(out["io_share_per_step"])
    # Offloading is exact: the same losses and gradient norms step by step, or the two did different work.
    out["same_steps"] = memory["losses"] == disk["losses"] and memory["grad_norms"] == disk["grad_norms"]
    return out


def bench_offload(plan: Plan, skip: dict, rounds: Rounds) -> dict:
    """The offload row: every method at every precision that runs, on the preset's OFFLOAD_PRESETS shape."""
    shape = OFFLOAD_PRESETS.get(plan.preset)
    if shape is None:
        return {"not_run": f"no offload shape for --preset {plan.preset} (see OFFLOAD_PRESETS)"}
    args = ModelArgs(**shape.model, vocab_size=LLAMA3_VOCAB, max_seq_len=shape.seq_len)
    with torch.device("meta"):
        params = Transformer(args).num_params()
    out: dict = {"shape": {"model_args": asdict(args), "params": params, "embedding_params": args.vocab_size * args.dim,
                           "batch": shape.batch, "seq_len": shape.seq_len, "micro_batches": plan.offload_micro_batches,
                           "layout": "packed SFT rows",
                           "trained_share": packed_row(shape.seq_len)[2].float().mean().item()},
                 "store_under": tempfile.gettempdir(), "store_filesystem": filesystem_type(tempfile.gettempdir()),
                 "load_average_start": os.getloadavg(), "runs": {}}
    for precision in PRECISIONS:
        out["runs"][precision] = {"not_run": skip[precision]} if skip[precision] else \
            bench_offload_precision(plan, precision, rounds)
    out["load_average_end"] = os.getloadavg()
    return out


# Runs in a fresh `python -c` interpreter: the writer's spawned workers then re-import nothing of bench.py
# (torch, transformers) and start exactly as under load_pretrain_dataset.py. Before the clock starts the
# tokenizer is loaded and the corpus's first document read, which imports `datasets` and the modules it
# loads on first use (its json reader, and torch for its formatters): about 2 s that a process pays once,
# not per token. Worker start-up (spawn, imports, tokenizer) stays on the clock: every run pays it.
# The modes alternate as in `alternate`: plain, plain in 2, 1, 2, then 2, 1, plain in 2, plain, ...
DATA_PREP_RUN = r"""
import bisect, itertools, json, os, subprocess, sys, time
from pathlib import Path
from data_preparation_utils import cached_tokenizer
from data_sources import Source, open_source
from load_pretrain_dataset import prepare_pretrain_dataset

corpus, work_dir, rounds, helper_code = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
tokenizer = cached_tokenizer(None)
next(open_source(Source(files=[corpus]).resolve()))
docs = [json.loads(line)["text"] for line in open(corpus, encoding="utf-8")]

def plain():
    ids = [tokenizer.encode(doc, bos=True, eos=True) for doc in docs]
    return {"tokens": sum(map(len, ids))}

# the same loop in two processes started beforehand, each over half the text
helpers = [subprocess.Popen([sys.executable, "-c", helper_code, corpus], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True) for _ in range(2)]
if not all(h.stdout.readline().strip() == "ready" for h in helpers):
    sys.exit("a plain-loop helper process failed to start")
ends = list(itertools.accumulate(map(len, docs)))
half = bisect.bisect_left(ends, ends[-1] / 2) + 1  # the first documents holding half the characters

def plain_in_two():
    for helper, (start, stop) in zip(helpers, [(0, half), (half, len(docs))]):
        helper.stdin.write(f"{start} {stop}\n")
        helper.stdin.flush()
    return {"tokens": sum(int(h.stdout.readline()) for h in helpers)}

def writer(num_workers, out_dir):
    report = prepare_pretrain_dataset([Source(files=[corpus])], out_dir, num_workers=num_workers,
                                      overwrite=True, show_progress=False)
    start_up = report["start_up"]
    tokens_after, seconds_after = report["session_tokens"] - start_up["tokens"], report["seconds"] - start_up["seconds"]
    return {"tokens": report["session_tokens"], "start_up_seconds": start_up["seconds"],
            "after_start_up_tokens_per_s": tokens_after / seconds_after if tokens_after else None}

modes = {"plain_loop": plain, "plain_loop_2_processes": plain_in_two,
         "writer_1_worker": lambda: writer(1, work_dir / f"out{time.time_ns()}"),
         "writer_2_workers": lambda: writer(2, work_dir / f"out{time.time_ns()}")}
runs = {name: [] for name in modes}
for r in range(rounds):
    for name in list(modes) if r % 2 == 0 else list(modes)[::-1]:
        start = time.perf_counter()
        result = modes[name]()
        runs[name].append({"seconds": time.perf_counter() - start, **result})
for helper in helpers:
    helper.stdin.close()
    helper.wait()
print(json.dumps(runs), flush=True)
os._exit(0)  # nothing left to write; tearing down an interpreter that holds torch and datasets takes seconds
"""

# One of the two processes of `plain_loop_2_processes`: reads "start stop" lines, encodes those documents.
PLAIN_LOOP_HELPER = r"""
import json, sys
from data_preparation_utils import cached_tokenizer
tokenizer = cached_tokenizer(None)
docs = [json.loads(line)["text"] for line in open(sys.argv[1], encoding="utf-8")]
print("ready", flush=True)
for line in sys.stdin:
    start, stop = map(int, line.split())
    ids = [tokenizer.encode(doc, bos=True, eos=True) for doc in docs[start:stop]]
    print(sum(map(len, ids)), flush=True)
"""


def write_corpus(path: Path, target_chars: int, source_chars: Optional[int] = None) -> dict:
    """CPython's documentation (the project's offline default corpus) as .jsonl, its first `source_chars` (None:
    all of it) repeated up to `target_chars`."""
    from load_pretrain_dataset import cpython_documents

    source, read = [], 0
    for doc in cpython_documents():
        source.append(doc)
        read += len(doc["text"])
        if source_chars is not None and read >= source_chars:
            break
    docs, chars = [], 0
    for doc in itertools.cycle(source):
        docs.append(doc["text"])
        chars += len(doc["text"])
        if chars >= target_chars:
            break
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": text}) + "\n" for text in docs)
    return {"documents": len(docs), "chars": chars}


def _paired_ratios(out: dict, key: str, numerators: list, denominators: list) -> None:
    """out[key_per_round] = each round's ratio, out[key_2_vs_1] = their median (None when a round has no
    figure, e.g. a corpus too small to leave any batch after start-up)."""
    per_round = [a / b for a, b in zip(numerators, denominators) if a and b]
    out[f"{key}_per_round"] = per_round
    out[f"{key}_2_vs_1"] = statistics.median(per_round) if per_round else None


def bench_data_prep(rounds: Rounds) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        corpus = Path(tmp) / "corpus.jsonl"
        out = {"corpus": write_corpus(corpus, rounds.corpus_chars, rounds.corpus_source_chars)}
        proc = subprocess.run([sys.executable, "-c", DATA_PREP_RUN, str(corpus), tmp, str(rounds.data_prep),
                               PLAIN_LOOP_HELPER],
                              cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"data preparation failed:\n{proc.stderr[-3000:]}")
    runs = json.loads(proc.stdout.strip().splitlines()[-1])
    for name, name_runs in runs.items():
        tokens, seconds = name_runs[0]["tokens"], [r["seconds"] for r in name_runs]
        out[name] = {"tokens": tokens, "tokens_per_s": tokens / statistics.median(seconds), "seconds": seconds}
        if name.startswith("writer"):
            for key in ("start_up_seconds", "after_start_up_tokens_per_s"):
                out[name][key] = [r[key] for r in name_runs]
    out["corpus"]["tokens"] = out["plain_loop"]["tokens"]
    out["same_token_count"] = len({out[name]["tokens"] for name in runs}) == 1
    # Paired by round (the runs of a round are adjacent in time, so they share the shared machine's
    # mood): steadier than a ratio of medians taken from different rounds.
    _paired_ratios(out, "scaling", out["writer_1_worker"]["seconds"], out["writer_2_workers"]["seconds"])
    # The same runs after their start-up (spawning the workers, their imports and tokenizer, opening
    # the corpus, until each worker has returned a batch): what a long run gets, which pays it once.
    _paired_ratios(out, "steady_scaling", out["writer_2_workers"]["after_start_up_tokens_per_s"],
                   out["writer_1_worker"]["after_start_up_tokens_per_s"])
    # What two processes get out of this machine right now, with no start-up and nothing to share: on a
    # shared VM two busy vCPUs can deliver well under 2x, and the writer cannot scale better than that.
    _paired_ratios(out, "ceiling", out["plain_loop"]["seconds"], out["plain_loop_2_processes"]["seconds"])
    return out


# ---- environment, table, command line ------------------------------------------------------------------
def git_commit() -> Optional[str]:
    """HEAD's short hash; GIT_COMMIT where the tree is a copy without git (a lent GPU machine)."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    except OSError:
        out = None
    return (out.stdout.strip() if out and out.returncode == 0 else "") or os.environ.get("GIT_COMMIT") or None


def environment(device: torch.device) -> dict:
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cpu": hardware.cpu_model(), "cpu_native_bf16": hardware.cpu_has_native_bf16(), "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "python": platform.python_version(), "torch": torch.__version__, "transformers": version("transformers"),
        "git_commit": git_commit(), "load_average_start": os.getloadavg()[0],
        # the allocator decides how often big tensors are page-faulted afresh: a large share of CPU step time
        "allocator_env": {k: v for k, v in os.environ.items() if k.startswith(("MALLOC_", "LD_PRELOAD", "OMP_"))},
    }


def _pct(x: Optional[float]) -> str:
    return "?" if x is None else f"{100 * x:.1f}%"


def _row(cells: list[str], widths: list[int]) -> str:
    """First cell left-aligned, the others right-aligned, two spaces apart."""
    return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()


def _precision_label(precision: str) -> str:
    return "bf16 autocast" if precision == "bf16" else precision


def _training_lines(train: dict, widths: list[int]) -> list[str]:
    lines = [_row(["training step", "ours tok/s", "HF tok/s", "ratio", "ours MiB", "HF MiB", "matmul peak",
                   "MFU ours / HF", "nominal MFU"], widths)]
    for precision, t in train.items():
        if "not_run" in t:
            lines.append(_row([_precision_label(precision), "not run"], widths[:2]) + f"    {t['not_run']}")
            continue
        ours, hf = t["ours"], t["hf"]
        nominal = "-" if t["nominal_peak_flops"] is None else \
            f"{_pct(ours['mfu_nominal_peak'])} / {_pct(hf['mfu_nominal_peak'])}"
        lines.append(_row([
            _precision_label(precision), f"{ours['tokens_per_s']:,.0f}",
            f"{hf['tokens_per_s']:,.0f}", f"{t['ratio']:.2f}x", f"{ours['peak_memory_mib']:,.0f}",
            f"{hf['peak_memory_mib']:,.0f}", f"{t['matmul_peak_flops'] / 1e9:,.0f} GFLOP/s",
            f"{_pct(ours['mfu_measured_peak'])} / {_pct(hf['mfu_measured_peak'])}", nominal], widths))
    lines.append("first-step loss (same weights, same batch): " + "; ".join(
        f"{p} ours {t['ours']['first_step_loss']:.4f}, HF {t['hf']['first_step_loss']:.4f}"
        for p, t in train.items() if "not_run" not in t))
    return lines


def _offload_lines(o: dict, rounds: dict) -> list[str]:
    widths = [44, 9, 9, 6, 8, 10]
    if "not_run" in o:
        return ["", _row(["offload", "not run"], widths[:2]) + f"    {o['not_run']}"]
    lines = ["", _row(["offload, seconds per step", "in memory", "offloaded", "ratio", "I/O wait", "same steps"],
                      widths)
             + "    ours, OFFLOAD=disk against in memory: same weights and batch, alternated"]
    measured = []
    for precision, runs in o["runs"].items():
        if "not_run" in runs:
            lines.append(_row([_precision_label(precision), "not run"], widths[:2]) + f"    {runs['not_run']}")
            continue
        for method, label in OFFLOAD_METHODS.items():
            r = runs[method]
            measured.append(r)
            lines.append(_row([
                f"{label}, {_precision_label(precision)}", f"{r['memory']['seconds_per_step']:.2f} s",
                f"{r['disk']['seconds_per_step']:.2f} s", f"{r['ratio']:.2f}x", _pct(r["io_share"]),
                "yes" if r["same_steps"] else "NO"], widths)
                + f"    ratio per round {min(r['ratio_per_round']):.2f}x to {max(r['ratio_per_round']):.2f}x")
    shape, a = o["shape"], o["shape"]["model_args"]
    embedding = "tied" if a["tie_word_embeddings"] else "untied"
    lines.append(f"model: {shape['params'] / 1e6:.1f}M parameters ({a['dim']} wide, {a['n_layers']} blocks, the "
                 f"{embedding} {a['vocab_size']:,}-token embedding {shape['embedding_params'] / 1e6:.1f}M of them), "
                 f"{shape['layout']} ({_pct(shape['trained_share'])} of positions trained), batch {shape['batch']} x "
                 f"{shape['seq_len']} tokens x {shape.get('micro_batches', 1)} micro-batches per step; medians of "
                 f"{rounds['train']} alternated steps after "
                 f"{rounds['train_warmup']} warm-up, the ratio paired by round")
    if measured:
        side = measured[0]["memory"]
        cached = min(min(r["page_cache_share"].values()) for r in measured)
        allocator = ("train.py's allocator settings (freed memory kept in memory and offloaded full fine-tuning; "
                     "offloaded LoRA glibc's defaults, the heap trimmed after blocks that freed activations)") \
            if side["keeps_freed_memory"] else "the default allocator (MALLOC_* set)"
        filesystem = f" ({o['store_filesystem']})" if o.get("store_filesystem") else ""
        lines.append(f"train.py's step: OptimizerStep, clip {side['grad_clip']:g}, AdamW at LR {side['lr']:g} "
                     f"(offloaded full fine-tuning: the store's clip_and_step), {allocator}; the store under "
                     f"{o['store_under']}{filesystem}, {_pct(cached)} of its pages in the page cache before and "
                     f"after the timed steps; load average {o['load_average_start'][0]:.1f} -> "
                     f"{o['load_average_end'][0]:.1f}")
    return lines


def format_table(report: dict) -> str:
    env, cfg, rounds = report["environment"], report["config"], report["config"]["rounds"]
    lines = [
        f"bench.py | preset {cfg['preset']} | {env['device']} | {env['cpu']}, {env['cpu_cores']} cores | "
        f"torch {env['torch']} | transformers {env['transformers']} | {env['date']}",
        f"model: {cfg['params'] / 1e6:.1f}M parameters, vocab {cfg['vocab_size']:,}, batch {cfg['batch']} x "
        f"{cfg['seq_len']} tokens, {cfg['flops_per_token'] / 1e6:.1f} MFLOP/token (6N + 12 L d T)"
        f"{', compiled' if cfg['compile'] else ', eager'}; medians of {rounds['train']} alternated steps",
    ]
    widths = [24, 10, 9, 6, 9, 8, 14, 15, 15]
    if report["train"]:
        lines += ["", *_training_lines(report["train"], widths)]
    generated = [g for g in report.get("generate", {}).values() if "not_run" not in g]
    if generated:
        g0, gen_widths = generated[0], widths[:4] + [13, 20]
        batches = "batch 1, " if all(g.get("batch", 1) == 1 for g in generated) else ""
        lines += ["", _row(["generation", "ours tok/s", "HF tok/s", "ratio", "same tokens", "first call ours / HF"],
                           gen_widths)
                  + f"    greedy, {batches}{g0['prompt_tokens']}-token prompt + {g0['new_tokens']} new tokens, "
                    f"medians of {rounds['generate']} alternated runs after a first (cold) call"]
        for key, g in report["generate"].items():
            precision, _, batch = key.partition("_batch")  # generation_key's inverse
            label = f"{precision} weights" + (f", batch {batch}" if batch else "")
            if "not_run" in g:
                lines.append(_row([label, "not run"], gen_widths[:2]) + f"    {g['not_run']}")
                continue
            lines.append(_row([label, f"{g['ours']['tokens_per_s']:,.1f}", f"{g['hf']['tokens_per_s']:,.1f}",
                               f"{g['ratio']:.2f}x", "yes" if g["same_tokens"] else "no",
                               f"{g['ours']['first_call_seconds']:.2f} s / {g['hf']['first_call_seconds']:.2f} s"],
                              gen_widths))

    if "variants" in report:
        v = report["variants"]
        var_widths = [34, 10, 10, 7, 9, 9, 7]
        lines += ["", _row([f"training variants, {v['precision']}", "tok/s", "rows tok/s", "speed", "MiB",
                            "rows MiB", "memory"], var_widths)
                  + "    ours, same weights and shape; each against plain pretraining rows, alternated"
                  + ("; each stage's own loss (stages.py)" if v.get("code_path") == "stages.py" else "")]
        for variant, label in VARIANTS.items():
            r = v[variant]
            if "reference_dtype" in r:  # runs before 592b83c held a copy in the training dtype, unrecorded
                label = label.replace("live", f"live {r['reference_dtype']}")
            lines.append(_row([label, f"{r['tokens_per_s']:,.0f}", f"{r['baseline_tokens_per_s']:,.0f}",
                               f"{r['speed_ratio']:.2f}x", f"{r['peak_memory_mib']:,.0f}",
                               f"{r['baseline_peak_memory_mib']:,.0f}", f"{r['memory_ratio']:.2f}x"], var_widths))

    if "offload" in report:
        lines += _offload_lines(report["offload"], rounds)
    if "data_prep" not in report:
        return "\n".join(lines)
    d = report["data_prep"]
    lines += ["", _row(["data preparation", "tokens/s"], [24, 10])
              + f"    {d['corpus']['tokens']:,} tokens ({d['corpus']['documents']:,} documents), "
                f"medians of {rounds['data_prep']} alternated runs"]
    for name, label in (("plain_loop", "plain tiktoken loop"), ("plain_loop_2_processes", "plain loop, 2 processes"),
                        ("writer_1_worker", "shard writer, 1 worker"), ("writer_2_workers", "shard writer, 2 workers")):
        lines.append(_row([label, f"{d[name]['tokens_per_s']:,.0f}"], [24, 10]))
    start_up = {n: statistics.median(d[n]["start_up_seconds"]) for n in ("writer_1_worker", "writer_2_workers")}
    for key, label, what in (
            ("scaling", "2 vs 1 workers", "the shard writer, whole runs"),
            ("steady_scaling", "  after start-up", "the same runs once each worker has returned a batch (after "
             f"{start_up['writer_1_worker']:.2f} s / {start_up['writer_2_workers']:.2f} s)"),
            ("ceiling", "machine ceiling", "the plain loop in 2 processes vs 1, no start-up")):
        per_round = d[f"{key}_per_round"]
        if not per_round:
            lines.append(_row([label, "-"], [24, 10]) + f"    {what}: the corpus left no batch after it")
            continue
        lines.append(_row([label, f"{d[f'{key}_2_vs_1']:.2f}x"], [24, 10])
                     + f"    {what}: median of the per-round ratios ({min(per_round):.2f}x to {max(per_round):.2f}x)")
    return "\n".join(lines)


def _names(allowed: tuple[str, ...]) -> Callable[[str], list[str]]:
    """A comma-separated subset of `allowed`, for argparse."""
    def parse(text: str) -> list[str]:
        names = [n for n in text.split(",") if n]
        if not names or any(n not in allowed for n in names):
            raise argparse.ArgumentTypeError(f"{text!r}: expected a comma-separated list of {', '.join(allowed)}")
        return names
    return parse


def _batches(text: str) -> list[int]:
    try:
        batches = [int(b) for b in text.split(",")]
    except ValueError:
        batches = []
    if not batches or min(batches) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated batch sizes, e.g. 1,16")
    return batches


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--preset", choices=list(PRESETS), default="small")
    p.add_argument("--json", metavar="FILE", help="write every figure and the environment here")
    p.add_argument("--quick", action="store_true", help="fewer rounds, shorter generation, a tiny corpus")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile both models for training (default: on CUDA only)")
    p.add_argument("--batch", type=int, default=None, help="sequences per step (default: the preset's)")
    p.add_argument("--seq_len", type=int, default=None, help="tokens per sequence (default: the preset's)")
    p.add_argument("--precisions", type=_names(PRECISIONS), default=list(PRECISIONS),
                   help="training and generation precisions to measure (default: fp32,bf16)")
    sections = p.add_mutually_exclusive_group()
    sections.add_argument("--skip", type=_names(SECTIONS), default=[],
                          help=f"sections to leave out, of {','.join(SECTIONS)}")
    sections.add_argument("--only", type=_names(SECTIONS), default=None,
                          help="the sections to measure, leaving out the others (e.g. --only offload)")
    p.add_argument("--offload_micro_batches", type=int, default=1, metavar="N",
                   help="the offload row: micro-batches per optimizer step (gradient accumulation; the store is "
                        "read and written once per step, so its cost per token falls as N grows)")
    p.add_argument("--decode_batches", type=_batches, default=[1],
                   help="generation batch sizes (default: 1); ours decodes a batch through its KV cache")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    if args.offload_micro_batches < 1:
        p.error(f"--offload_micro_batches {args.offload_micro_batches}: expected 1 or more")
    if args.only is not None:
        args.skip = [s for s in SECTIONS if s not in args.only]
    return args


def model_figures(plan: Plan) -> tuple[int, float]:
    """(parameters, training FLOPs per token) of the preset's model, counted on the meta device."""
    with torch.device("meta"):
        model = Transformer(plan.model_args())
    return model.num_params(), model.flops_per_token(plan.seq_len)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    preset = PRESETS[args.preset]
    rounds = QUICK if args.quick else FULL
    plan = Plan(preset=args.preset, device=args.device, batch=args.batch or preset.batch,
                seq_len=args.seq_len or preset.seq_len,
                compile=args.device == "cuda" if args.compile is None else args.compile,
                prompt_len=8 if args.quick else 32, new_tokens=8 if args.quick else 64,
                offload_micro_batches=args.offload_micro_batches)
    device = torch.device(args.device)
    report: dict = {"environment": environment(device), "train": {}, "generate": {}}
    started = time.perf_counter()

    skip = precisions_to_run(device)
    for precision in PRECISIONS:
        if precision not in args.precisions and skip[precision] is None:
            skip[precision] = f"not asked for (--precisions {','.join(args.precisions)})"
    running = [p for p in PRECISIONS if skip[p] is None]
    if not running:
        print(f"error: no precision to measure: {'; '.join(f'{p}: {why}' for p, why in skip.items())}",
              file=sys.stderr)
        return 2
    timing = "train" not in args.skip
    for precision in PRECISIONS:  # a fresh pair of processes per precision: separate memory peaks
        generation = precision == running[-1] and "generate" not in args.skip  # no memory is measured there
        if skip[precision] and timing:
            print(f"training step, {precision}: not run ({skip[precision]})", file=sys.stderr)
            report["train"][precision] = {"not_run": skip[precision]}
        if skip[precision] or not (timing or generation):
            continue
        with model_processes(plan) as procs:
            if timing:
                print(f"training step, {precision} ...", file=sys.stderr)
                report["train"][precision] = bench_training(procs, plan, precision, rounds)
            if generation:
                bench_all_generation(procs, plan, skip, args.precisions, rounds, args.decode_batches,
                                     report["generate"])
    if "variants" not in args.skip:
        report["variants"] = bench_variants(plan, running[-1], rounds)
    if "offload" not in args.skip:
        report["offload"] = bench_offload(plan, skip, rounds)
    if "data_prep" not in args.skip:
        print("data preparation ...", file=sys.stderr)
        report["data_prep"] = bench_data_prep(rounds)

    params, flops_per_token = model_figures(plan)
    report["config"] = {**asdict(plan), "model_args": asdict(plan.model_args()), "vocab_size": LLAMA3_VOCAB,
                        "params": params, "flops_per_token": flops_per_token,
                        "rounds": asdict(rounds), "seconds": time.perf_counter() - started}
    report["environment"]["load_average_end"] = os.getloadavg()[0]
    table = format_table(report)
    print(table)
    if args.json:
        report["table"] = table
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


def bench_all_generation(procs: dict[str, ModelProcess], plan: Plan, skip: dict, asked: list[str], rounds: Rounds,
                         batches: list[int], out: dict) -> None:
    """Every precision at every batch size, in the pair of processes of the last training precision."""
    for precision in PRECISIONS:
        for batch in batches:
            key = generation_key(precision, batch)
            if skip[precision]:  # a precision not asked for is left out; one this machine cannot run says why
                if precision in asked:
                    out[key] = {"not_run": skip[precision]}
                continue
            print(f"generation, {precision}, batch {batch} ...", file=sys.stderr)
            out[key] = bench_generation(procs, plan, precision, rounds, batch)


if __name__ == "__main__":
    raise SystemExit(main())
