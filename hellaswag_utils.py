"""HellaSwag (and any four-way multiple-choice set in its jsonl shape), scored as the field does.

    python hellaswag_utils.py --checkpoint PATH [--limit N] [--path FILE] [--batch_size B]
    torchrun --nproc_per_node 8 hellaswag_utils.py --checkpoint PATH   # each rank scores its share
    python hellaswag_utils.py --checkpoint PATH --offload disk        # a model bigger than memory, streamed

Data: the official validation split (10,042 items), downloaded once from the authors' repository
into a cache and verified, or a local `.jsonl` in the same schema (`activity_label`, `ctx_a`,
`ctx_b`, `endings`, `label`). Items without four non-empty endings or with a label outside 0..3
are skipped and counted.

Everything that decides a score follows lm-evaluation-harness (0.4's hellaswag task and its
`TemplateLM` request path), since every published HellaSwag number comes from it.

Text, as its hellaswag task prepares it:
    context = preprocess(activity_label + ": " + ctx_a + " " + ctx_b.capitalize())
    ending  = preprocess(ending); the request is (context, " " + ending), " " being the target delimiter
where `preprocess` drops WikiHow's bracket markup (" [title]" becomes ". ", "[header]", "[step]"
... are removed). nanoGPT / llm.c use the raw `ctx` field instead; scores differ slightly.

Tokens, as `TemplateLM._encode_pair` builds a causal model's request: whitespace at the end of the
context (a removed trailing "[step]" leaves a space) moves to the front of the continuation; the
context is encoded with <|begin_of_text|> in front, and the ending's tokens are those that follow
the context's tokens in the encoding of context + continuation joined. BOS: the harness's HFLM
encodes with the tokenizer's defaults, and Llama 3's Hugging Face tokenizer puts <|begin_of_text|>
in front, so published Llama 3 numbers are scored with it (and every training document here
starts with it too).

Scores: the log-likelihood of an ending is the sum, over its tokens, of the float32 log-softmax
of the logits at the previous position; context tokens are not scored. Three accuracies:
    acc              argmax of the summed log-likelihood
    acc_norm         argmax of the sum / len(ending): Python characters of the cleaned ending,
                     without the delimiter (the harness's `len(choice)`; not UTF-8 bytes)
    acc_norm_tokens  argmax of the sum / the ending's token count (nanoGPT / llm.c "acc_norm")
Beside them, `gold_bpb`: the right endings' negative log-likelihood in bits per UTF-8 byte of their scored
tokens (the harness's `bits_per_byte` arithmetic, which it reports only for perplexity tasks). Unlike
acc_norm_tokens and a log-likelihood per token it does not depend on the vocabulary, so models with different
tokenizers compare, as train.py's val_bpb does.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
from tqdm import tqdm

from distributed import all_reduce_sum
from generate import add_offload_arguments, check_offload_args, load_weights, model_device, pick_dtype
from speedups import exit_without_teardown

HELLASWAG_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
HELLASWAG_LINES = 10042  # items in the official validation split
DEFAULT_CACHE_DIR = Path("~/.cache/llama3-trainer/hellaswag").expanduser()
NUM_ENDINGS = 4
TARGET_DELIMITER = " "  # the harness's default for multiple choice, put between context and ending
DOWNLOAD_TIMEOUT_S = 60.0


class HellaSwagDataError(ValueError):
    """The data cannot be had or cannot be trusted; the message is one line saying what to do."""


@dataclass(frozen=True)
class Example:
    context: str  # preprocessed, as scored
    endings: tuple[str, ...]  # preprocessed, without the separating space
    label: int


# ---- data ---------------------------------------------------------------------------------------
def preprocess(text: str) -> str:
    """lm-evaluation-harness's HellaSwag cleanup: brackets are artifacts of the WikiHow half."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def parse_item(item: object) -> Optional[Example]:
    """One jsonl record -> Example, or None when it is not a well-formed four-way item."""
    if not isinstance(item, dict):
        return None
    endings, label = item.get("endings"), item.get("label")
    if not isinstance(endings, list) or len(endings) != NUM_ENDINGS or not all(isinstance(e, str) for e in endings):
        return None
    if isinstance(label, str) and label.isdigit():  # the Hugging Face copy stores labels as text
        label = int(label)
    if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < NUM_ENDINGS:
        return None
    parts = [item.get(k) for k in ("activity_label", "ctx_a", "ctx_b")]
    if not all(isinstance(p, str) for p in parts):
        return None
    activity, ctx_a, ctx_b = parts
    cleaned = tuple(preprocess(e) for e in endings)
    if not all(cleaned):  # an empty ending has no length to normalise by
        return None
    return Example(preprocess(f"{activity}: {ctx_a} {ctx_b.capitalize()}"), cleaned, label)


def read_examples(path: Path, limit: Optional[int] = None) -> tuple[list[Example], int]:
    """The first `limit` well-formed items of a jsonl file, and how many malformed ones were skipped."""
    examples, skipped = [], 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            if limit is not None and len(examples) >= limit:
                break
            if not line.strip():
                continue
            try:
                example = parse_item(json.loads(line))
            except json.JSONDecodeError:
                example = None
            if example is None:
                skipped += 1
            else:
                examples.append(example)
    return examples, skipped


def _atomic_write(path: Path, data: bytes) -> None:
    """Temporary name then rename: ranks downloading at once, or a crash, never leave half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _check_line_count(data: bytes, where: str) -> None:
    lines = sum(1 for line in data.splitlines() if line.strip())
    if lines != HELLASWAG_LINES:
        raise HellaSwagDataError(f"{where}: {lines} items, expected the official validation split's "
                                 f"{HELLASWAG_LINES}; delete it to download again, or set HELLASWAG_PATH")


def download(url: str, dest: Path) -> None:
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
            data = response.read()
    except (OSError, ValueError) as e:  # URLError, refused, timed out, or a malformed URL
        reason = getattr(e, "reason", None) or e
        raise HellaSwagDataError(f"cannot download HellaSwag ({reason}); offline? download the file from {url} "
                                 f"and put it at {dest}, or set HELLASWAG_PATH (--path) to a local copy") from None
    _check_line_count(data, url)  # a truncated transfer or an error page never reaches the cache
    _atomic_write(dest, data)


def official_file(cache_dir: Path = DEFAULT_CACHE_DIR, url: str = HELLASWAG_URL) -> Path:
    """The cached official split, downloaded if absent, checked on every load.

    No checksum is published upstream, so the file's sha256 is recorded next to it on first use
    and later loads must match it; the line count is checked every time.
    """
    path = Path(cache_dir) / "hellaswag_val.jsonl"
    if not path.is_file():
        download(url, path)
    data = path.read_bytes()
    _check_line_count(data, str(path))
    digest = hashlib.sha256(data).hexdigest()
    sidecar = path.with_name(path.name + ".sha256")
    if not sidecar.is_file():
        _atomic_write(sidecar, (digest + "\n").encode())
    elif sidecar.read_text().strip() != digest:
        raise HellaSwagDataError(f"{path}: sha256 {digest[:12]}... differs from the one recorded at first download "
                                 f"({sidecar}); delete both files to download again")
    return path


def load_examples(path: Optional[str | Path] = None, limit: Optional[int] = None,
                  cache_dir: Path = DEFAULT_CACHE_DIR, url: str = HELLASWAG_URL) -> tuple[list[Example], int]:
    """Examples from `path` (HELLASWAG_PATH) or else the cached official split; and the skipped count."""
    if path:
        path = Path(path)
        if not path.is_file():
            raise HellaSwagDataError(f"HellaSwag file not found: {path}")
    else:
        path = official_file(cache_dir, url)
    examples, skipped = read_examples(path, limit)
    if not examples:
        raise HellaSwagDataError(f"{path}: no well-formed four-way item ({skipped} skipped)")
    return examples, skipped


# ---- scoring ------------------------------------------------------------------------------------
def encode_example(tokenizer, example: Example) -> list[tuple[list[int], list[int]]]:
    """(context ids, ending ids) for each of the four endings, as the harness's
    `TemplateLM._encode_pair` builds a causal model's request: the context's trailing whitespace
    moves to the front of the continuation, and the continuation's ids are what follows the
    context's ids in the encoding of the whole text."""
    context = example.context.rstrip()
    moved = example.context[len(context):]  # e.g. the space a removed trailing "[step]" leaves
    context_ids = tokenizer.encode(context, bos=True, eos=False)
    pairs = []
    for ending in example.endings:
        whole = tokenizer.encode(context + moved + TARGET_DELIMITER + ending, bos=True, eos=False)
        if len(whole) <= len(context_ids):  # its score would be 0, a silent win
            raise HellaSwagDataError(f"ending {ending!r} of {example.context!r} has no tokens of its own")
        pairs.append((context_ids, whole[len(context_ids):]))
    return pairs


@torch.no_grad()
def score_batch(model: torch.nn.Module, tokenizer, examples: Sequence[Example],
                autocast_dtype: Optional[torch.dtype] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-ending log-likelihood sums (B, 4) float64 and ending token counts (B, 4), one forward.

    Rows are right-padded: the causal mask keeps padding out of every earlier position, and
    padded positions are never scored, so a row's score does not depend on its batch.
    """
    device = model_device(model)
    pairs = [pair for example in examples for pair in encode_example(tokenizer, example)]
    rows = len(pairs)
    width = max(len(ctx) + len(end) for ctx, end in pairs)
    tokens = torch.zeros(rows, width, dtype=torch.long)  # pad id 0: never scored
    scored = torch.zeros(rows, width, dtype=torch.bool)  # True at ending tokens
    for i, (ctx, end) in enumerate(pairs):
        tokens[i, : len(ctx) + len(end)] = torch.tensor(ctx + end)
        scored[i, len(ctx) : len(ctx) + len(end)] = True
    tokens = tokens.to(device)
    autocast = torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None)
    with autocast:
        logits, _ = model(tokens)  # (R, T, vocab)
    # The logits at position t predict token t + 1; only ending tokens are gathered.
    target_mask = scored[:, 1:]  # (R, T-1)
    on_device = target_mask.to(device)
    logprobs = logits[:, :-1][on_device].float().log_softmax(dim=-1)  # (N ending tokens, vocab)
    token_ll = logprobs.gather(-1, tokens[:, 1:][on_device].unsqueeze(-1)).squeeze(-1)  # (N,)
    # Summed on the CPU in float64 (not every accelerator has it): exact enough to compare across batchings.
    row_of = torch.arange(rows).unsqueeze(1).expand(-1, width - 1)[target_mask]
    sums = torch.zeros(rows, dtype=torch.float64).index_add_(0, row_of, token_ll.cpu().double())
    return sums.view(-1, NUM_ENDINGS), scored.sum(dim=1).view(-1, NUM_ENDINGS)


def score_examples(model: torch.nn.Module, tokenizer, examples: Sequence[Example], batch_size: int,
                   autocast_dtype: Optional[torch.dtype] = None, progress: bool = False
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """score_batch over `examples`, `batch_size` examples (4 x batch_size rows) per forward."""
    sums = [torch.zeros(0, NUM_ENDINGS, dtype=torch.float64)]
    counts = [torch.zeros(0, NUM_ENDINGS, dtype=torch.long)]
    with tqdm(total=len(examples), desc="hellaswag", unit="ex", disable=not progress, dynamic_ncols=True) as bar:
        for start in range(0, len(examples), batch_size):
            batch = examples[start : start + batch_size]
            s, c = score_batch(model, tokenizer, batch, autocast_dtype)
            sums.append(s)
            counts.append(c)
            bar.update(len(batch))
    return torch.cat(sums), torch.cat(counts)


def ending_lengths(example: Example) -> list[int]:
    """lm-evaluation-harness's `len(choice)` for acc_norm: characters of the preprocessed ending,
    without the delimiter (its UTF-8 byte count goes only into acc_bytes, which hellaswag does not report)."""
    return [len(ending) for ending in example.endings]


def predictions(loglik: torch.Tensor, n_tokens: torch.Tensor, n_chars: torch.Tensor) -> dict[str, torch.Tensor]:
    """The chosen ending (N,) under each rule; ties go to the first ending, as numpy.argmax does."""
    return {
        "acc": loglik.argmax(dim=1),
        "acc_norm": (loglik / n_chars).argmax(dim=1),
        "acc_norm_tokens": (loglik / n_tokens).argmax(dim=1),
    }


def evaluate(model: torch.nn.Module, tokenizer, examples: Sequence[Example], batch_size: int,
             rank: int = 0, world_size: int = 1, autocast_dtype: Optional[torch.dtype] = None,
             progress: bool = False) -> dict:
    """Accuracies over all `examples`; every rank must call this with the same list.

    Each rank scores examples[rank::world_size] (shares differ by at most one example, so no rank
    idles while another works) and the correct counts are summed over ranks with one all-reduce.
    """
    if not examples:
        raise ValueError("evaluate needs at least one example")
    share = list(examples[rank::world_size])
    was_training = model.training
    model.eval()
    try:
        loglik, n_tokens = score_examples(model, tokenizer, share, batch_size, autocast_dtype, progress)
    finally:
        model.train(was_training)
    n_chars = torch.tensor([ending_lengths(ex) for ex in share], dtype=torch.float64).view(-1, NUM_ENDINGS)
    labels = torch.tensor([ex.label for ex in share], dtype=torch.long)
    chosen = predictions(loglik, n_tokens, n_chars)
    local = [len(share)] + [int((chosen[k] == labels).sum()) for k in ("acc", "acc_norm", "acc_norm_tokens")]
    gold_nats = -loglik[torch.arange(len(share)), labels].sum().item() if share else 0.0
    # float64 counts stay exact far beyond the 10,042 items; one all-reduce carries the counts and the sums
    device = model_device(model)
    totals = torch.tensor(local + [gold_nats, sum(gold_bytes(tokenizer, ex) for ex in share)], dtype=torch.float64,
                          device=device)
    n, acc, acc_norm, acc_norm_tokens, nats, nbytes = all_reduce_sum(totals).tolist()
    n = int(n)
    return {"acc": acc / n, "acc_norm": acc_norm / n, "acc_norm_tokens": acc_norm_tokens / n,
            "gold_bpb": nats / math.log(2) / nbytes, "n": n}


def gold_bytes(tokenizer, example: Example) -> int:
    """UTF-8 bytes of the right ending's scored tokens: the text its log-likelihood is the probability of."""
    _, ending = encode_example(tokenizer, example)[example.label]
    return sum(len(tokenizer.decode_token_bytes(t)) for t in ending)


# ---- reporting ----------------------------------------------------------------------------------
def as_metrics(result: dict, skipped: int = 0) -> dict:
    """Flat keys for metrics.jsonl and W&B."""
    return {f"hellaswag_{k}": v for k, v in result.items()} | {"hellaswag_skipped": skipped}


def format_result(result: dict, skipped: int = 0, speed: str = "") -> str:
    """`speed` (' | N examples/s') goes after the accuracies, where scripts reading the line expect it."""
    return (f"hellaswag | {result['n']} examples ({skipped} skipped) | acc {result['acc']:.4f} | "
            f"acc_norm {result['acc_norm']:.4f} | acc_norm_tokens {result['acc_norm_tokens']:.4f}{speed} | "
            f"gold_bpb {result['gold_bpb']:.4f}")


# ---- command line -------------------------------------------------------------------------------
def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True,
                   help="a .pt checkpoint from train.py (LoRA adapters: merged onto their base), a Meta-format or a "
                        "Hugging Face directory")
    p.add_argument("--path", default=None, help="local jsonl in HellaSwag's schema (default: the official split)")
    p.add_argument("--limit", type=int, default=None, help="score only the first N well-formed items")
    p.add_argument("--batch_size", type=int, default=8, help="examples per forward (4 rows each)")
    p.add_argument("--tokenizer", default=None, help="tokenizer.model or HF tokenizer dir (default: the checkpoint's)")
    p.add_argument("--cache_dir", default=str(DEFAULT_CACHE_DIR), help="where the official split is kept")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"],
                   help="weights' dtype (auto: bf16 on GPUs that support it, else fp32)")
    add_offload_arguments(p)
    args = p.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        p.error("--limit must be >= 1")
    if args.batch_size < 1:
        p.error("--batch_size must be >= 1")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    from checkpoint import CheckpointError, checked_tokenizer
    from distributed import setup_distributed, teardown_distributed

    args = parse_args(argv)
    d = setup_distributed(args.device)
    try:
        check_offload_args(args)
        if args.offload != "none" and d.world_size > 1:
            raise ValueError(f"--offload {args.offload} scores in one process ({d.world_size} ranks given: they would "
                             f"write one store at once); run without torchrun")
        examples, skipped = load_examples(args.path, args.limit, Path(args.cache_dir))
        tokenizer = checked_tokenizer(args.checkpoint, args.tokenizer)
        model, where = load_weights(args.checkpoint, d.device, pick_dtype(args.dtype, d.device), args.offload,
                                    args.offload_dir)
        if where:
            print(where, file=sys.stderr)
        if tokenizer.n_words > model.args.vocab_size:
            raise CheckpointError(f"tokenizer has {tokenizer.n_words} tokens but the model only "
                                  f"{model.args.vocab_size}")
        start = time.perf_counter()
        result = evaluate(model, tokenizer, examples, args.batch_size, d.rank, d.world_size, progress=d.is_main)
        elapsed = time.perf_counter() - start
    except (HellaSwagDataError, CheckpointError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        teardown_distributed()
    if d.is_main:
        print(format_result(result, skipped, f" | {result['n'] / elapsed:.1f} examples/s"))
    return 0


if __name__ == "__main__":
    exit_without_teardown(main())
