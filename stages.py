"""What differs between training stages: their data, their loss, their metrics and their extra models.

A stage is one class, registered under its TRAINING_STAGE name by defining `name`. The loop in train.py
knows none of them; it asks the stage for

    loaders()               train and validation loaders (its `loader` over cfg.<data_key>), resumable
    count(batch)            how many units a micro-batch trains (target tokens; pairs for preferences)
    loss(model, batch)      (summed loss, {name: summed figure}): the loop divides both by the global count
                            over micro-batches and ranks, so every stage weighs its data correctly
    validation_loss(...)    loss(...) at validation, plus the two sums of bits per byte where the stage's
                            loss is a cross-entropy over text (`text_sums`)
    evaluate(model, step)   figures beyond the validation loss (exact match of SFT answers, ...)
    figures                 which of those figures the step line shows, and how
    prompts_path()          what sample generations start from (`chat`: user messages)

and reads its class attributes: `unit`, `distillable` (a teacher may be added), `needs_starting_weights`
(the run keeps a content-hashed reference to the weights it started from: DPO's reference model).

Distillation is not a stage: `Distillation` wraps a stage's loss with a teacher's. LoRA is not one
either: it changes which parameters train (lora.py) and what a checkpoint holds.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from config import PROJECT_DIR, Config, ConfigError
from dataloaders import ChatDataLoader, DataError, PairDataLoader, PretrainDataLoader, StepLoader
from distributed import DistInfo, all_reduce_sum
from generate import generate_tokens
from hardware import autocast_context
from lora import is_adapter_key
from losses import IGNORE_INDEX, chunked_cross_entropy, chunked_distillation_loss, chunked_token_logprobs, dpo_loss
from model import Transformer, document_attention_mask
from shard_format import EVAL_FILE, REFERENCE_LOGPS_DIR
from tokenizer import token_byte_lengths

TEXT_NATS, TEXT_BYTES = "text_nats", "text_bytes"  # validation's sums for bits per byte (train.validate)


def text_sums(token_losses: torch.Tensor, targets: torch.Tensor, byte_lengths: torch.Tensor) -> dict:
    """Bits per byte's two sums over a micro-batch: the cross-entropy (nats) of the targets that stand for text,
    and the UTF-8 bytes of that text; bpb = nats / ln 2 / bytes over all of validation.

    token_losses: (N,) each target's cross-entropy; targets: (N,) ids, IGNORE_INDEX where nothing is trained;
    byte_lengths: (vocab,) tokenizer.token_byte_lengths. Special tokens (<|begin_of_text|>, <|end_of_text|>,
    <|eot_id|>, ...) stand for no text: they count 0 bytes and their loss is left out of the nats as well, as
    nanochat's `evaluate_bpb` (loss_eval.py) does and as lm-evaluation-harness's `bits_per_byte` does by
    scoring only a document's text. Counting their loss over the text's bytes instead would charge a tokenizer
    for framing tokens that every tokenizer has, one per document or turn, and the figure would no longer
    measure how well the text itself is predicted."""
    valid = targets != IGNORE_INDEX
    nbytes = torch.where(valid, byte_lengths[targets.clamp(min=0)], 0)
    return {TEXT_NATS: (token_losses.float() * (nbytes > 0)).sum(), TEXT_BYTES: nbytes.sum().float()}


@dataclass(frozen=True)
class Setting:
    """What every stage is built from."""
    cfg: Config
    d: DistInfo
    samples_per_step: int  # global samples per optimizer step
    tokenizer: object
    vocab_size: int
    # a fresh copy of the weights the run started from (a resumed run's too: not the resumed weights)
    starting_weights: Optional[Callable[[], Transformer]] = None


STAGES: dict[str, type["Stage"]] = {}  # TRAINING_STAGE -> its class, filled by each class's definition


class Stage:
    """Pretraining: next-token cross-entropy over every position of packed documents."""
    name = "pretrain"
    unit = "tokens"  # what the loss is averaged over
    data_key = "pretrain_data_dir"  # the Config field naming the stage's data directory
    loader = PretrainDataLoader
    chat = False  # sample generations in the chat format
    distillable = True
    needs_starting_weights = False
    figures: dict[str, str] = {}  # step-line figures beyond the loss: name -> format

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            STAGES[cls.name] = cls

    def __init__(self, s: Setting):
        self.s, self.cfg, self.d = s, s.cfg, s.d

    @property
    def data_dir(self) -> str:
        return getattr(self.cfg, self.data_key)

    def loader_options(self) -> dict:
        return dict(batch_size=self.cfg.max_batch_size, seq_len=self.cfg.max_seq_len, rank=self.d.rank,
                    world_size=self.d.world_size, seed=self.cfg.seed,
                    tokenizer_identity=self.s.tokenizer.identity(), vocab_size=self.s.vocab_size)

    def loaders(self) -> tuple[StepLoader, StepLoader]:
        common = self.loader_options()
        return (self.loader(self.data_dir, "train", shuffle=True, samples_per_step=self.s.samples_per_step, **common),
                self.loader(self.data_dir, "val", shuffle=False, **common))

    def prompts_path(self) -> Path:
        """GENERATION_PROMPTS_FILE, or the project's own prompts: plain text, or chat questions."""
        if self.cfg.generation_prompts_file:
            return Path(self.cfg.generation_prompts_file)
        return PROJECT_DIR / ("chat_prompts.txt" if self.chat else "prompts.txt")

    def count(self, batch: dict) -> torch.Tensor:
        return (batch["targets"] != IGNORE_INDEX).sum()

    def inputs(self, batch: dict) -> dict:
        """Keyword arguments of the model's forward besides the tokens (packed rows: positions and mask)."""
        return {}

    def loss(self, model, batch: dict) -> tuple[torch.Tensor, dict]:
        if "trained_rows" in batch:  # only the positions with a target meet the output layer
            rows, targets = batch["trained_rows"], batch["targets"].flatten()[batch["trained_rows"]]
            head = lambda h, w: chunked_cross_entropy(h.flatten(0, 1)[rows], w, targets, reduction="sum")  # noqa: E731
            return model(batch["tokens"], head=head, **self.inputs(batch)), {}
        _, loss = model(batch["tokens"], batch["targets"], loss_reduction="sum", return_logits=False,
                        **self.inputs(batch))
        return loss, {}

    def validation_loss(self, model, batch: dict) -> tuple[torch.Tensor, dict]:
        """The same summed cross-entropy from per-token losses (one forward), which also give bits per byte."""
        rows = batch.get("trained_rows")
        targets = batch["targets"].flatten() if rows is None else batch["targets"].flatten()[rows]
        pick = (lambda h: h.flatten(0, 1)) if rows is None else (lambda h: h.flatten(0, 1)[rows])
        head = lambda h, w: chunked_cross_entropy(pick(h), w, targets, reduction="none")  # noqa: E731
        token_losses = model(batch["tokens"], head=head, **self.inputs(batch))  # (N,), 0 where ignored
        return token_losses.sum(), text_sums(token_losses, targets, self.byte_lengths(targets.device))

    def byte_lengths(self, device: torch.device) -> torch.Tensor:
        """(vocab,) UTF-8 bytes of each id, built once (a pass over the vocabulary, 0.6 s for Meta's 128k)."""
        table = getattr(self, "_byte_lengths", None)
        if table is None or table.device != device:
            table = torch.tensor(token_byte_lengths(self.s.tokenizer), dtype=torch.long, device=device)
            self._byte_lengths = table
        return table

    def setup(self, model: Transformer) -> None:
        """Extra models or precomputed figures, once the policy model exists (before it is wrapped)."""

    def evaluate(self, model: Transformer, step: int, sharded: bool) -> dict:
        return {}


STAGES[Stage.name] = Stage


class SFTStage(Stage):
    """Instruction tuning: the loss covers assistant turns and their closing <|eot_id|> only (the mask comes
    with the data); packed conversations never attend to each other and restart their positions."""
    name, chat = "sft", True
    data_key, loader = "instruct_data_dir", ChatDataLoader

    def loader_options(self) -> dict:
        return super().loader_options() | {"packing": self.cfg.packing}

    def inputs(self, batch: dict) -> dict:
        if "document_ids" not in batch:
            return {}
        return {"positions": batch["positions"], "attn_mask": document_attention_mask(batch["document_ids"])}

    def setup(self, model: Transformer) -> None:
        self.examples, self.too_long = read_exact_match_examples(
            Path(self.cfg.instruct_data_dir), self.cfg.instruct_eval_examples, self.s.tokenizer, model.args.max_seq_len)

    def evaluate(self, model: Transformer, step: int, sharded: bool) -> dict:
        if not self.examples:
            return {}
        return exact_match(model, self.s.tokenizer, self.examples, self.d, sharded)


def read_exact_match_examples(data_dir: Path, limit: int, tokenizer, max_seq_len: int) -> tuple[list, int]:
    """The first `limit` held-out prompts with their one exact answer; those that cannot be answered within
    the context are left out (counted), so nothing fails late."""
    path = data_dir / EVAL_FILE
    if not limit or not path.is_file():
        return [], 0
    examples, too_long = [], 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            if len(examples) >= limit:
                break
            item = json.loads(line)
            prompt = tokenizer.encode_chat(item["messages"])
            answer = tokenizer.encode(item["answer"].strip(), bos=False, eos=False)
            if len(prompt) + len(answer) + 1 > max_seq_len:
                too_long += 1
                continue
            examples.append((prompt, item["answer"].strip(), len(answer) + 1))
    return examples, too_long


@torch.no_grad()
def exact_match(model: Transformer, tokenizer, examples: list, d: DistInfo, sharded: bool) -> dict:
    """Greedy answers to held-out prompts, compared as whole strings: right only if the model stops after the
    answer (one token more than the answer's suffices to see whether <|eot_id|> follows). Each rank answers
    its share; under FSDP every forward is collective, so every rank answers all of them in lockstep."""
    share = examples if sharded else examples[d.rank::d.world_size]
    was_training = model.training
    model.eval()
    correct = 0
    for prompt, answer, budget in share:
        ids = list(generate_tokens(model, prompt, budget, tokenizer.stop_tokens))
        correct += tokenizer.decode(ids).strip() == answer
    model.train(was_training)
    counts = torch.tensor([len(share), correct], dtype=torch.float64, device=model.tok_embeddings.weight.device)
    n, right = (counts if sharded else all_reduce_sum(counts)).tolist()
    return {"exact_match": right / n, "exact_match_n": int(n)}


# ---- preferences -----------------------------------------------------------------------------------------
def sequence_logps(targets: torch.Tensor, rows: Optional[torch.Tensor] = None):
    """A head for Transformer.forward: summed log-probabilities of each row's target tokens, (rows,).
    `rows`: the flat positions that have a target (the others contribute nothing and are skipped)."""
    def head(h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if rows is None:
            return chunked_token_logprobs(h.flatten(0, 1), weight, targets.flatten()).view(targets.shape).sum(-1)
        logps = chunked_token_logprobs(h.flatten(0, 1)[rows], weight, targets.flatten()[rows])
        sums = torch.zeros(targets.shape[0], dtype=logps.dtype, device=logps.device)
        return sums.index_add(0, rows // targets.shape[1], logps)  # (rows,)
    return head


@dataclass(frozen=True)
class Pairs:
    """One micro-batch of B pairs under the policy: summed response log-probs (B,) and response tokens (B,)
    of the chosen and the rejected answers (<|eot_id|> included)."""
    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor

    def mean_logps(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Each answer's log-probability averaged over its own tokens: the length-normalised likelihood."""
        return self.chosen / self.chosen_tokens.clamp(min=1), self.rejected / self.rejected_tokens.clamp(min=1)


class PreferenceStage(Stage):
    """Preference pairs (load_dpo_dataset.py): a batch of B pairs is 2B rows, chosen first, run in one forward
    through the chunked output layer. A subclass gives `pair_losses`: each pair's loss from the policy's
    log-probabilities. Exact match on SFT's held-out prompts, where they exist, is evaluated alongside:
    alignment must not cost the answers SFT taught."""
    unit, chat, distillable = "pairs", True, False
    data_key, loader = "dpo_data_dir", PairDataLoader
    figures = {"accuracy": "pref acc {:.2f}", "reward_margin": "margin {:.3f}"}

    def loaders(self) -> tuple[StepLoader, StepLoader]:
        common = self.loader_options()
        self.train_loader = self.loader(self.data_dir, "train", shuffle=True,
                                        samples_per_step=self.s.samples_per_step, **common)
        # validation pairs are numbered after the training pairs: one table of reference log-probs holds both
        self.val_loader = self.loader(self.data_dir, "val", shuffle=False,
                                      index_offset=self.train_loader.num_pairs, **common)
        return self.train_loader, self.val_loader

    def count(self, batch: dict) -> torch.Tensor:
        return torch.tensor(batch["pair_index"].numel(), device=batch["tokens"].device)

    def setup(self, model: Transformer) -> None:
        self.policy = model
        self.examples, _ = read_exact_match_examples(Path(self.cfg.instruct_data_dir), self.cfg.instruct_eval_examples,
                                                     self.s.tokenizer, model.args.max_seq_len)

    def evaluate(self, model: Transformer, step: int, sharded: bool) -> dict:
        return exact_match(model, self.s.tokenizer, self.examples, self.d, sharded) if self.examples else {}

    @staticmethod
    def head(batch: dict):
        return sequence_logps(batch["targets"], batch.get("trained_rows"))

    def validation_loss(self, model, batch: dict) -> tuple[torch.Tensor, dict]:
        """No bits per byte: the loss is a preference between two answers per pair, not a cross-entropy over
        text, so it has no per-byte reading."""
        return self.loss(model, batch)

    def loss(self, model, batch: dict) -> tuple[torch.Tensor, dict]:
        policy = model(batch["tokens"], head=self.head(batch))  # (2B,)
        B = policy.shape[0] // 2
        tokens = (batch["targets"] != IGNORE_INDEX).sum(-1)
        losses, extras = self.pair_losses(Pairs(policy[:B], policy[B:], tokens[:B], tokens[B:]), batch)
        logps = policy.detach().float()
        return losses.sum(), extras | {"logps_chosen": logps[:B].sum(), "logps_rejected": logps[B:].sum(),
                                       # the policy's own preference, meaningful before training too
                                       "policy_accuracy": (logps[:B] > logps[B:]).float().sum()}

    def pair_losses(self, pairs: Pairs, batch: dict) -> tuple[torch.Tensor, dict]:
        """(B,) losses and {name: summed figure}; `reward_chosen`, `reward_rejected`, `reward_margin` and
        `accuracy` (reward chosen > rejected) are what every preference stage reports."""
        raise NotImplementedError


def reward_figures(chosen: torch.Tensor, rejected: torch.Tensor) -> dict:
    chosen, rejected = chosen.detach(), rejected.detach()
    return {"reward_chosen": chosen.sum(), "reward_rejected": rejected.sum(),
            "reward_margin": (chosen - rejected).sum(), "accuracy": (chosen > rejected).float().sum()}


class DPOStage(PreferenceStage):
    """Direct preference optimisation against a frozen reference, the starting policy: the same model with its
    LoRA adapters off, a frozen copy, or log-probabilities computed once before training
    (DPO_PRECOMPUTE_REFERENCE).

    DPO_SFT_WEIGHT w (RPO, Pang et al. 2024) adds w * -log p(chosen | prompt) / (its tokens, <|eot_id|>
    included) to each pair's loss: the chosen answer's negative log-likelihood averaged over its own tokens,
    then over pairs like the DPO term, so it weighs the same however pairs split into micro-batches and
    ranks. TRL's "sft" loss type averages over all chosen tokens of the batch it is given instead: the same
    for one pair, or for chosen answers of one length; otherwise TRL weighs every token alike, so a long
    answer counts for more."""
    name, needs_starting_weights = "dpo", True

    def __init__(self, s: Setting):
        super().__init__(s)
        self.lora_reference = s.cfg.lora_enabled  # the reference is the policy with its adapters off
        self.reference: Optional[Transformer] = None
        self.table: Optional[torch.Tensor] = None  # (train + val pairs, 2) precomputed reference log-probs

    def setup(self, model: Transformer) -> None:
        super().setup(model)
        if self.cfg.dpo_precompute_reference:
            self.table = self.precomputed()
        elif not self.lora_reference:
            dtype = reference_dtype(self.cfg.dpo_reference_dtype, self.cfg)
            self.reference = self.s.starting_weights().to(dtype).eval().requires_grad_(False)

    def reference_logps(self, batch: dict) -> torch.Tensor:
        """(2B,) summed response log-probs under the reference: chosen rows first, then rejected."""
        if self.table is not None:
            pairs = batch["pair_index"].cpu()
            return torch.cat([self.table[pairs, 0], self.table[pairs, 1]]).to(batch["tokens"].device)
        with torch.no_grad():
            if self.reference is not None:
                return self.reference(batch["tokens"], head=self.head(batch)).float()
            with adapters_off(self.policy):
                return self.policy(batch["tokens"], head=self.head(batch)).float()

    def pair_losses(self, pairs: Pairs, batch: dict) -> tuple[torch.Tensor, dict]:
        reference = self.reference_logps(batch)
        B = len(pairs.chosen)
        losses, chosen, rejected = dpo_loss(
            pairs.chosen, pairs.rejected, reference[:B], reference[B:], beta=self.cfg.dpo_beta,
            loss_type=self.cfg.dpo_loss, label_smoothing=self.cfg.dpo_label_smoothing,
            chosen_lengths=pairs.chosen_tokens, rejected_lengths=pairs.rejected_tokens)
        extras = reward_figures(chosen, rejected)
        if self.cfg.dpo_sft_weight:  # RPO: keep the chosen answers likely while pushing the rejected ones down
            nll = -pairs.mean_logps()[0]  # (B,) each pair's mean over its own chosen tokens
            losses = losses + self.cfg.dpo_sft_weight * nll
            extras["nll_chosen"] = nll.detach().sum()
        return losses, extras

    @torch.no_grad()
    def precomputed(self) -> torch.Tensor:
        """(pairs, 2) reference log-probs of every train and val pair, computed once by all ranks (each its
        share) and kept beside the data (load_dpo_dataset.py --overwrite removes them with it), keyed by what
        they depend on: the reference's shape and weights, the pairs' content (the shards' sha256), the
        autocast precision and MAX_SEQ_LEN (which pairs fit). A resumed run finds the file and reuses it;
        other weights or data prepared again under the same names get a table of their own."""
        loaders = (self.train_loader, self.val_loader)
        model = self.policy if self.lora_reference else self.s.starting_weights().eval()
        key = hashlib.sha256(json.dumps([
            weights_sha256(model), [[x.split, x.data.content_sha256()] for x in loaders],
            self.cfg.max_seq_len, self.cfg.training_precision]).encode()).hexdigest()[:16]
        path = Path(self.cfg.dpo_data_dir) / REFERENCE_LOGPS_DIR / f"{key}.npy"
        if path.is_file():
            return torch.from_numpy(np.load(path))
        device = model.tok_embeddings.weight.device
        table = torch.zeros(sum(x.num_pairs for x in loaders), 2, dtype=torch.float64, device=device)
        was_training, loader_batch = self.policy.training, self.train_loader.batch_size
        self.policy.eval()
        with autocast_context(self.cfg.training_precision, device), \
                (adapters_off(self.policy) if self.lora_reference else contextlib.nullcontext()):
            size = 4 * loader_batch  # no gradients, no optimizer state: bigger batches fit
            for loader in loaders:
                for start in range(self.d.rank * size, len(loader.fitting_pairs), size * self.d.world_size):
                    batch = loader.batch_of(loader.fitting_pairs[start : start + size])
                    batch = {k: v.to(device) for k, v in batch.items()}
                    logps = model(batch["tokens"], head=self.head(batch))
                    B = len(batch["pair_index"])
                    table[batch["pair_index"].to(device)] = torch.stack([logps[:B], logps[B:]], dim=1).double()
        self.policy.train(was_training)
        table = all_reduce_sum(table).float().cpu()  # disjoint shares: the sum is the whole table
        if self.d.is_main:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
            with open(tmp, "wb") as f:
                np.save(f, table.numpy())
            os.replace(tmp, path)
        return table


class ORPOStage(PreferenceStage):
    """Odds-ratio preference optimisation (Hong et al. 2024), with no reference model: each pair's loss is the
    chosen answer's negative log-likelihood minus ORPO_LAMBDA * log sigmoid(log odds(chosen) - log odds(rejected)),
    where odds(y) = P(y) / (1 - P(y)) of the length-normalised likelihood P(y) = exp(mean log p over y's tokens).

    The odds term is TRL's (ORPOTrainer.odds_ratio_loss). The likelihood term is each pair's chosen NLL averaged
    over its own tokens, then over pairs, so that it weighs the same however pairs split into micro-batches and
    ranks; TRL averages over all chosen tokens of the batch it is given, which is the same for one pair or for
    chosen answers of one length. Rewards, as TRL logs them: ORPO_LAMBDA * the mean log-probabilities."""
    name = "orpo"
    figures = PreferenceStage.figures | {"nll_chosen": "nll {:.4f}"}

    @staticmethod
    def log1mexp(x: torch.Tensor) -> torch.Tensor:
        """log(1 - exp(x)) for x < 0 without cancellation: expm1 near 0, log1p further out (Maechler 2012)."""
        return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))

    def pair_losses(self, pairs: Pairs, batch: dict) -> tuple[torch.Tensor, dict]:
        chosen, rejected = (x.float() for x in pairs.mean_logps())
        log_odds = (chosen - rejected) - (self.log1mexp(chosen) - self.log1mexp(rejected))
        nll = -chosen
        losses = nll - self.cfg.orpo_lambda * F.logsigmoid(log_odds)
        return losses, reward_figures(self.cfg.orpo_lambda * chosen, self.cfg.orpo_lambda * rejected) | {
            "nll_chosen": nll.detach().sum(), "log_odds": log_odds.detach().sum()}


class SimPOStage(PreferenceStage):
    """Simple preference optimisation (Meng et al. 2024), with no reference model: an answer's reward is
    SIMPO_BETA times its mean log-probability per token, and each pair's loss is
    -log sigmoid(reward(chosen) - reward(rejected) - SIMPO_GAMMA), a target margin gamma. TRL's CPOTrainer
    with loss_type="simpo" (and cpo_alpha=0, no NLL term) computes the same."""
    name = "simpo"

    def pair_losses(self, pairs: Pairs, batch: dict) -> tuple[torch.Tensor, dict]:
        chosen, rejected = (self.cfg.simpo_beta * x.float() for x in pairs.mean_logps())
        return -F.logsigmoid(chosen - rejected - self.cfg.simpo_gamma), reward_figures(chosen, rejected)


def weights_sha256(model: Transformer) -> str:
    """What a reference computes with: its shape and every weight, by content (the LoRA adapters left out: the
    reference runs with them off). Reads each byte once, about a second per GB."""
    digest = hashlib.sha256(json.dumps(asdict(model.args), sort_keys=True).encode())
    for name, tensor in model.state_dict().items():
        if not is_adapter_key(name):
            tensor = tensor.detach().contiguous().cpu()
            digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}".encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def adapters_off(model: Transformer):
    from lora import adapters_disabled
    return adapters_disabled(model)


def reference_dtype(name: str, cfg: Config) -> torch.dtype:
    """auto: float32, the policy's own master weights, so that the two start out computing exactly the same
    log-probabilities (loss log 2, rewards 0); bf16 halves the reference's memory at the price of a little
    noise in the rewards."""
    return torch.bfloat16 if name == "bf16" else torch.float32


# ---- distillation -------------------------------------------------------------------------------------------
class Distillation(Stage):
    """Wraps a stage (pretrain or sft): loss = (1 - alpha) CE + alpha T^2 KL(teacher_T || student_T) (or the
    reverse KL, or a generalised JSD) over the positions the stage trains, computed chunk by chunk so neither
    model's (rows x vocab) logits exist in full. The teacher runs frozen, in eval mode, without gradients."""

    def __init__(self, stage: Stage, teacher: Transformer):
        super().__init__(stage.s)
        self.stage, self.teacher = stage, teacher
        self.name, self.unit, self.chat = stage.name, stage.unit, stage.chat
        self.figures = stage.figures | {"ce": "ce {:.4f}", "kd": "kd {:.4f}"}

    def loaders(self):
        return self.stage.loaders()

    def count(self, batch):
        return self.stage.count(batch)

    def inputs(self, batch):
        return self.stage.inputs(batch)

    def setup(self, model):
        self.stage.setup(model)

    def evaluate(self, model, step, sharded):
        return self.stage.evaluate(model, step, sharded)

    def validation_loss(self, model, batch: dict) -> tuple[torch.Tensor, dict]:
        return self.loss(model, batch, per_byte=True)

    def byte_lengths(self, device: torch.device) -> torch.Tensor:
        return self.stage.byte_lengths(device)

    def loss(self, model, batch: dict, per_byte: bool = False) -> tuple[torch.Tensor, dict]:
        """per_byte (validation): also bits per byte's sums of the student's own cross-entropy (`ce`), from one
        more pass of the output layer over the same hidden states."""
        inputs = self.inputs(batch)
        rows = batch.get("trained_rows")  # only positions with a target count; None: all of them
        pick = (lambda x: x.flatten(0, 1)) if rows is None else (lambda x: x.flatten(0, 1)[rows])
        with torch.no_grad():
            teacher_h = pick(self.teacher.hidden_states(batch["tokens"], **inputs))  # (N, dim_teacher)
        vocab = self.s.vocab_size
        teacher_weight = self.teacher.output.weight[:vocab]  # a teacher padded past the tokenizer's ids
        cfg, targets = self.cfg, batch["targets"].flatten() if rows is None else batch["targets"].flatten()[rows]

        def head(h: torch.Tensor, weight: torch.Tensor):
            losses = chunked_distillation_loss(
                pick(h), weight, teacher_h, teacher_weight, targets, temperature=cfg.distillation_temperature,
                alpha=cfg.distillation_alpha, kind=cfg.distillation_loss, jsd_beta=cfg.distillation_jsd_beta)
            if not per_byte:
                return *losses, None
            with torch.no_grad():
                return *losses, chunked_cross_entropy(pick(h), weight, targets, reduction="none")

        total, ce, kd, token_losses = model(batch["tokens"], head=head, **inputs)
        extras = {"ce": ce, "kd": kd}
        if per_byte:
            extras |= text_sums(token_losses, targets, self.byte_lengths(targets.device))
        if not torch.is_grad_enabled():  # validation: the teacher's own loss on the same tokens, for comparison
            extras["teacher_loss"] = chunked_cross_entropy(teacher_h, teacher_weight, targets, reduction="sum")
        return total, extras


def stage_class(cfg: Config) -> type[Stage]:
    """TRAINING_STAGE's class; ConfigError names the stages there are, and those a teacher can join."""
    where = cfg.where("TRAINING_STAGE")
    if cfg.training_stage not in STAGES:
        raise ConfigError(f"TRAINING_STAGE={cfg.training_stage!r} is invalid: expected {' | '.join(STAGES)} "
                          f"(instruct = sft){where}")
    cls = STAGES[cfg.training_stage]
    if cfg.is_model_distillation and not cls.distillable:
        raise ConfigError(f"TRAINING_STAGE={cfg.training_stage!r} is invalid: expected "
                          f"{' or '.join(n for n, c in STAGES.items() if c.distillable)} when "
                          f"IS_MODEL_DISTILLATION=true{where}")
    return cls


def build_stage(s: Setting) -> Stage:
    return stage_class(s.cfg)(s)


def check_teacher(teacher: Transformer, student_vocab: int, tokenizer, where: str) -> None:
    """Teacher and student must share the tokenizer: same ids for the same text. A teacher whose embedding is
    only padded beyond the tokenizer's ids is fine (its extra rows are cut off)."""
    if teacher.args.vocab_size < student_vocab:
        raise DataError(f"TEACHER_MODEL_CHECKPOINT={where}: its vocabulary has {teacher.args.vocab_size} tokens, "
                        f"fewer than the student's {student_vocab}; teacher and student must share the tokenizer")
    if tokenizer.n_words > teacher.args.vocab_size:
        raise DataError(f"TEACHER_MODEL_CHECKPOINT={where}: {teacher.args.vocab_size} tokens, but the tokenizer "
                        f"has {tokenizer.n_words}")
