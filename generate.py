"""Sample from a Llama 3 model: a checkpoint written by train.py (a LoRA run's adapters are merged onto their
base in memory), a Meta-format or a Hugging Face directory.

    python generate.py --checkpoint PATH --prompt "The capital of France is" --temperature 0
    python generate.py --checkpoint PATH --prompt FILE:prompt.txt --chat --top_p 0.9
    python generate.py --checkpoint PATH --chat          # interactive: a conversation in the terminal

The prompt is shown (dimmed on a terminal) and the completion streams after it; generation stops at
<|eot_id|> or <|end_of_text|>.
"""

from __future__ import annotations

import argparse
import codecs
import sys
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch

from checkpoint import CheckpointError, checked_tokenizer, load_model, rope_scaling_note
from hardware import weights_dtype
from model import Transformer
from speedups import reordered_linears


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
    device = model.tok_embeddings.weight.device
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
        generator = torch.Generator(device=model.tok_embeddings.weight.device).manual_seed(seed)
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
        prompt = read_prompt(args.prompt) if args.prompt is not None else None
        device = pick_device(args.device)
        model = load_model(args.checkpoint, device=device, dtype=pick_dtype(args.dtype, device))
        tokenizer = checked_tokenizer(args.checkpoint, args.tokenizer)
        note = rope_scaling_note(args.checkpoint)
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if note:
        print(note, file=sys.stderr)
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
    raise SystemExit(main())
