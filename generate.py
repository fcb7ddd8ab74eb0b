"""Sample from a Llama 3 model: a checkpoint written by train.py (a LoRA run's adapters are merged onto their
base in memory), a Meta-format or a Hugging Face directory.

    python generate.py --checkpoint PATH --prompt "The capital of France is" --temperature 0
    python generate.py --checkpoint PATH --prompt FILE:prompt.txt --chat --top_p 0.9
    python generate.py --checkpoint PATH --chat          # interactive: a conversation in the terminal
    python generate.py --checkpoint PATH --offload disk --prompt "Hi"   # a model bigger than memory

The prompt is shown (dimmed on a terminal) and the completion streams after it; generation stops at
<|eot_id|> or <|end_of_text|>.

`--offload disk` copies the weights into a block store (offload.py, one safetensors file per block) and streams
them through two reused block buffers, so beside the KV cache only two blocks, the embedding rows looked up, the
final norm and the output layer are in memory; every new token reads every block from disk again. The store is
reused while it verifies as the checkpoint's weights and rebuilt, saying why, when they change. The arithmetic is
the in-memory model's, so greedy tokens are the same; a LoRA checkpoint's adapters are applied unmerged over its
streamed base, equal to the merged model up to float rounding.
"""

from __future__ import annotations

import argparse
import codecs
import hashlib
import sys
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch

import lora
from checkpoint import Checkpoint, CheckpointError, WeightSource, checked_tokenizer, load_model, rope_scaling_note
from hardware import weights_dtype
from model import Transformer
from offload import AdamWSettings, RunOffload, StreamedTransformer
from speedups import exit_without_teardown, reordered_linears

OFFLOAD_ROOT = Path("~/.cache/llama3-trainer/offload").expanduser()


def sample_next(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                generator: Optional[torch.Generator]) -> torch.Tensor:
    """logits (B, vocab) -> next ids (B,). temperature 0 is greedy; top_k 0 and top_p 1 are off."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        drop = sorted_probs.cumsum(dim=-1) - sorted_probs > top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.inference_mode()
def generate_tokens(model: Transformer, prompt: Sequence[int], max_new_tokens: int, stop_ids: Sequence[int],
                    temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                    generator: Optional[torch.Generator] = None) -> Iterator[int]:
    """Yield new token ids one at a time, using the KV cache; stops after a stop id (not yielded)."""
    device = model_device(model)
    total = min(len(prompt) + max_new_tokens, model.args.max_seq_len)
    if len(prompt) >= total:
        raise ValueError(f"prompt has {len(prompt)} tokens; the model's context is {model.args.max_seq_len}")
    model.setup_cache(batch_size=1, max_seq_len=total)
    try:
        tokens = torch.tensor([list(prompt)], device=device)
        logits, _ = model(tokens, start_pos=0, logits_to_keep=1)
        for pos in range(len(prompt), total):
            next_id = sample_next(logits[:, -1], temperature, top_k, top_p, generator)
            token = int(next_id.item())
            if token in stop_ids:
                return
            yield token
            if pos + 1 < total:
                logits, _ = model(next_id.view(1, 1), start_pos=pos)
    finally:
        model.clear_cache()


def complete(model: Transformer, tokenizer, prompt: str, max_new_tokens: int, chat: bool = False,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: Optional[int] = None) -> str:
    """Prompt text -> completion text (used for sample generations during training), with the CPU's
    reordered decode kernels made from the weights as they are now and dropped on return."""
    with reordered_linears(model):
        return "".join(stream_completion(model, tokenizer, prompt, max_new_tokens, chat, temperature, top_k, top_p,
                                         seed))


def stream_completion(model, tokenizer, prompt: str, max_new_tokens: int, chat: bool = False,
                      temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                      seed: Optional[int] = None) -> Iterator[str]:
    """Yield text pieces as tokens arrive; bytes are decoded incrementally so a character split
    across tokens is printed once complete."""
    if chat:
        ids = tokenizer.encode_chat([{"role": "user", "content": prompt}])
    else:
        ids = tokenizer.encode(prompt, bos=True, eos=False)
    yield from stream_ids(model, tokenizer, ids, max_new_tokens, temperature, top_k, top_p, seed)


def stream_ids(model, tokenizer, ids: Sequence[int], max_new_tokens: int, temperature: float = 0.0, top_k: int = 0,
               top_p: float = 1.0, seed: Optional[int] = None) -> Iterator[str]:
    """Text pieces of the continuation of prompt token ids."""
    generator = None
    if seed is not None:
        generator = torch.Generator(device=model_device(model)).manual_seed(seed)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    for token in generate_tokens(model, ids, max_new_tokens, tokenizer.stop_tokens, temperature, top_k, top_p,
                                 generator):
        piece = decoder.decode(tokenizer.decode_token_bytes(token))
        if piece:
            yield piece
    tail = decoder.decode(b"", final=True)
    if tail:
        yield tail


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """auto: bf16 on GPUs that have it and on CPUs that run it natively and fast, else float32 (hardware.py)."""
    return weights_dtype(name, device)


def model_device(model: torch.nn.Module) -> torch.device:
    """Where the model computes: a streamed model's device (its embedding table stays memory-mapped on the
    CPU), else its first weight's."""
    return model.device if isinstance(model, StreamedTransformer) else next(model.parameters()).device


# ---- weights in memory or streamed from disk ---------------------------------------------------------------
def add_offload_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--offload", default="none", choices=["none", "disk"],
                   help="disk: stream the weights from a block store one block at a time, for a model bigger than "
                        "memory (slow: every forward reads every block); none: load them into memory")
    p.add_argument("--offload_dir", default=None, metavar="DIR",
                   help="with --offload disk: the store goes in DIR/policy, as in train.py's OFFLOAD_DIR (a LoRA "
                        "run's OFFLOAD_DIR holds its base's store, reused here); default: "
                        f"{OFFLOAD_ROOT}/<checkpoint name>-<hash of its path>, so a read-only checkpoint works")


def check_offload_args(args: argparse.Namespace) -> None:
    """ValueError (one line) for offload flags that cannot work together."""
    if args.offload == "none" and args.offload_dir is not None:
        raise ValueError("--offload_dir is for --offload disk: add --offload disk, or drop --offload_dir")
    if args.offload == "disk" and getattr(args, "compile", False):
        raise ValueError("--compile cannot be used with --offload disk (a streamed model swaps its weights in and "
                         "out every block, which torch.compile cannot trace); drop one of them")
    if args.offload_dir is not None and Path(args.offload_dir).exists() and not Path(args.offload_dir).is_dir():
        raise ValueError(f"--offload_dir {args.offload_dir}: not a directory")


def default_offload_dir(checkpoint: str | Path) -> Path:
    """One store per checkpoint path, in the user's cache: the checkpoint's own directory may be read-only."""
    path = Path(checkpoint).resolve()
    return OFFLOAD_ROOT / f"{path.name}-{hashlib.sha256(str(path).encode()).hexdigest()[:12]}"


def load_weights(checkpoint: str, device: torch.device, dtype: torch.dtype, offload: str = "none",
                 offload_dir: Optional[str] = None) -> tuple[Transformer, str]:
    """The model to run in eval mode and a line saying where its weights are ('' in memory)."""
    if offload == "none":
        return load_model(checkpoint, device=device, dtype=dtype), ""
    return streamed_model(checkpoint, device, dtype, Path(offload_dir or default_offload_dir(checkpoint)))


def streamed_model(checkpoint: str | Path, device: torch.device, dtype: torch.dtype,
                   directory: Path) -> tuple[StreamedTransformer, str]:
    """The checkpoint's weights in the block store directory/policy, computed in `dtype` one block at a time.

    offload.RunOffload decides whether the store there is reused (it holds these weights, by content hash, and
    every file verifies) or rebuilt, and says which. A LoRA adapter checkpoint streams its base (checked against
    the hash it records) with its adapters in memory, unmerged; one trained from no base file is merged into the
    store."""
    source = WeightSource.open(checkpoint)
    stores = RunOffload(directory, device, train_base=False, adamw=AdamWSettings())  # adamw: never steps
    adapters = source.adapters
    if adapters is not None and adapters.base is not None:
        model = _streamed_adapters(stores, source.record, checkpoint, dtype)
    else:
        model = stores.from_source("policy", checkpoint, source.model_args(), lora.base_fingerprint(checkpoint),
                                   dtype)
    source.close()
    model.eval().load_outer()  # the embedding, norm and output stay in place; the blocks stream
    return model, f"offload: disk, {'; '.join(stores.notes)}; each forward streams {model.args.n_layers} blocks"


def _streamed_adapters(stores: RunOffload, record: Checkpoint, checkpoint: str | Path,
                       dtype: torch.dtype) -> StreamedTransformer:
    recorded = record.provenance.adapters
    try:
        base = lora.verify_base(recorded.base)
    except lora.LoRAError as e:
        raise CheckpointError(f"{checkpoint}: {e}") from None
    args = record.model_args
    if WeightSource.open(base).model_args(args.max_seq_len) != args:
        raise CheckpointError(f"{checkpoint}: trained on a model of another shape than its base {base}")
    model = stores.from_source("policy", base, args, recorded.base["sha256"], dtype)
    with torch.random.fork_rng(devices=[]):  # the adapters' draw is overwritten at once: the caller's RNG stays
        stores.add_adapters(model, lora.LoRASettings.from_dict(recorded.settings), 0)
    lora.load_lora_state_dict(model, record.weights)
    return model


def read_prompt(prompt: str) -> str:
    if prompt.startswith("FILE:"):
        path = Path(prompt[len("FILE:"):])
        if not path.is_file():
            raise FileNotFoundError(f"--prompt {prompt}: file not found")
        return path.read_text(encoding="utf-8")
    return prompt


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True,
                   help="a .pt checkpoint from train.py (LoRA adapters: merged onto their base), a Meta-format or "
                        "a Hugging Face model directory")
    p.add_argument("--prompt", default=None,
                   help="prompt text, or FILE:path to read it from a file (with --chat and no prompt: interactive)")
    p.add_argument("--quiet", action="store_true", help="print the completion only, not the prompt before it")
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top_k", type=int, default=0, help="0 = off")
    p.add_argument("--top_p", type=float, default=1.0, help="1.0 = off")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--chat", action="store_true", help="wrap the prompt as a user turn in Llama 3's chat format")
    p.add_argument("--tokenizer", default=None, help="tokenizer.model or HF tokenizer dir (default: the checkpoint's)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"])
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the model (dynamic shapes: one compilation serves every position); "
                        "worth it on GPUs; on CPU the eager path's reordered-weight kernels decode faster")
    add_offload_arguments(p)
    args = p.parse_args(argv)
    if args.max_new_tokens < 1:
        p.error("--max_new_tokens must be >= 1")
    if not 0 < args.top_p <= 1:
        p.error("--top_p must be in (0, 1]")
    if args.prompt is None and not args.chat:
        p.error("--prompt is required (or --chat for an interactive conversation)")
    return args


def show_prompt(prompt: str, out=sys.stdout) -> None:
    """The prompt before its completion: dimmed on a terminal, else followed by a line that marks the break."""
    if out.isatty():
        out.write(f"\033[2m{prompt}\033[0m")
    else:
        out.write(f"{prompt}\n---\n")


def chat_loop(model, tokenizer, args: argparse.Namespace, read=input, out=sys.stdout) -> None:
    """A conversation in the terminal: each answer joins the history; /reset forgets it, Ctrl-D (or /quit) leaves."""
    history: list[dict] = []
    out.write("chat: /reset starts over, Ctrl-D leaves\n")
    while True:
        try:
            text = read("> ")
        except EOFError:
            out.write("\n")
            return
        if text.strip() in ("/quit", "/exit"):
            return
        if text.strip() == "/reset":
            history = []
            out.write("(history cleared)\n")
            continue
        if not text.strip():
            continue
        history.append({"role": "user", "content": text})
        ids = tokenizer.encode_chat(history)
        budget = min(args.max_new_tokens, model.args.max_seq_len - len(ids))
        if budget < 1:
            out.write(f"(the conversation fills the model's {model.args.max_seq_len}-token context: /reset)\n")
            history.pop()
            continue
        pieces = []
        for piece in stream_ids(model, tokenizer, ids, budget, args.temperature, args.top_k, args.top_p, args.seed):
            pieces.append(piece)
            out.write(piece)
            out.flush()
        out.write("\n")
        history.append({"role": "assistant", "content": "".join(pieces)})


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        check_offload_args(args)
        prompt = read_prompt(args.prompt) if args.prompt is not None else None
        device = pick_device(args.device)
        tokenizer = checked_tokenizer(args.checkpoint, args.tokenizer)
        model, where = load_weights(args.checkpoint, device, pick_dtype(args.dtype, device), args.offload,
                                    args.offload_dir)
        note = rope_scaling_note(args.checkpoint)
    except (CheckpointError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for line in (where, note):
        if line:
            print(line, file=sys.stderr)
    if tokenizer.n_words > model.args.vocab_size:
        print(f"error: tokenizer has {tokenizer.n_words} tokens but the model only {model.args.vocab_size}",
              file=sys.stderr)
        return 2
    if args.compile:
        model = torch.compile(model, dynamic=True)  # attribute access (args, setup_cache) passes through
    with reordered_linears(model):  # the CPU decodes faster with them (speedups.py)
        if prompt is None:
            chat_loop(model, tokenizer, args)
            return 0
        if not args.quiet:
            show_prompt(prompt)
        for piece in stream_completion(model, tokenizer, prompt, args.max_new_tokens, args.chat, args.temperature,
                                       args.top_k, args.top_p, args.seed):
            sys.stdout.write(piece)
            sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    exit_without_teardown(main())
