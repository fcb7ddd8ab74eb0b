"""Our Llama (Meta's layout and names) in Hugging Face's layout, and the export tool.

    python hf_convert.py export --checkpoint CKPT --out DIR [--dtype bf16] [--max_shard_size 5GB]

writes a directory that `transformers` loads with nothing else: `config.json`, `generation_config.json`,
`model.safetensors` (or shards plus an index), and the tokenizer as `tokenizer.json` +
`tokenizer_config.json` (Llama 3's chat template). CKPT is anything `checkpoint.load_model` reads: a
project checkpoint, a Meta-format directory, a Hugging Face directory, or a LoRA adapter checkpoint (exported
as its base with the adapters merged). With `--peft`, a LoRA adapter checkpoint becomes a PEFT adapter directory (`adapter_config.json` + `adapter_model.safetensors`) to load
with `PeftModel.from_pretrained` on the base model exported the same way.

The names and the rotary row order of the two layouts are hf_names.py's (checkpoint.py reads HF directories
with the same table); nothing in this file needs `transformers` except `to_hf`, which builds a
`LlamaForCausalLM` for the tests and bench.py.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch

import checkpoint
from hf_names import hf_name, permute_for_rotate_half, rotary_heads, to_hf_state_dict
from model import ModelArgs, Transformer
from safetensors_io import save_file, save_sharded, write_atomically
from tokenizer import PAT_STR, HFTokenizer, load_bpe_ranks

# ---- weights ----------------------------------------------------------------------------------------------
_PEFT_TARGETS = {"wq": "q_proj", "wk": "k_proj", "wv": "v_proj", "wo": "o_proj",  # lora.py's target names
                 "w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}            # -> HF's module names


def hf_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """The model's weights under HF's names (with `lm_head.weight` even when tied, as the tests want)."""
    return to_hf_state_dict(model.state_dict(), model.args)


# ---- config -----------------------------------------------------------------------------------------------
def hf_rope(args: ModelArgs) -> Optional[dict]:
    """Llama 3.1 frequency scaling as HF's `rope_scaling` of type llama3, or None without scaling."""
    if not args.use_scaled_rope:
        return None
    return {"rope_type": "llama3", "factor": float(args.rope_scale_factor),
            "low_freq_factor": float(args.rope_low_freq_factor), "high_freq_factor": float(args.rope_high_freq_factor),
            "original_max_position_embeddings": args.rope_original_max_seq_len}


# Meta publishes its Llama 3.1-style models (3.1, 3.2, 3.3: rope scaling from an original 8192) for this context.
META_SCALED_CONTEXT = 131072


def supported_context(args: ModelArgs) -> int:
    """max_position_embeddings for an export: the context the model supports, not the window it was last trained
    at (a Llama 3.2 fine-tuned at 64 tokens is still a long-context model). Llama 3.1-style rope scaling stretches
    RoPE's long wavelengths by `factor` past the original context: original x factor, except for Meta's own
    family (original 8192), published for 131072 whatever the factor (8 for 3.1, 32 for 3.2). Plain RoPE: only
    the context it was trained at is known."""
    if not args.use_scaled_rope:
        return args.max_seq_len
    original = args.rope_original_max_seq_len
    stretched = META_SCALED_CONTEXT if original == 8192 else int(original * args.rope_scale_factor)
    return max(args.max_seq_len, stretched)


def hf_config_dict(args: ModelArgs, dtype: torch.dtype, bos_id: int = 128000,
                   eos_ids: Sequence[int] = (128001,), max_position_embeddings: Optional[int] = None) -> dict:
    """config.json for a `LlamaForCausalLM` of this shape.

    Rope settings go in both spellings: `rope_theta` + `rope_scaling` (what transformers 4.x, vLLM and
    llama.cpp's converter read) and `rope_parameters` (transformers 5)."""
    rope_scaling = hf_rope(args)
    dtype_name = str(dtype).removeprefix("torch.")
    eos_ids = [i for i in eos_ids if i < args.vocab_size]  # a small test vocabulary has no special tokens
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": args.vocab_size, "hidden_size": args.dim, "intermediate_size": args.ffn_hidden_dim,
        "num_hidden_layers": args.n_layers, "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads, "head_dim": args.head_dim, "hidden_act": "silu",
        "rms_norm_eps": args.norm_eps, "max_position_embeddings": max_position_embeddings or args.max_seq_len,
        "rope_theta": args.rope_theta, "rope_scaling": rope_scaling,
        "rope_parameters": {**(rope_scaling or {"rope_type": "default"}), "rope_theta": args.rope_theta},
        "tie_word_embeddings": args.tie_word_embeddings, "attention_bias": False, "mlp_bias": False,
        "attention_dropout": 0.0, "initializer_range": 0.02, "pretraining_tp": 1, "use_cache": True,
        "bos_token_id": bos_id if bos_id < args.vocab_size else None,
        "eos_token_id": eos_ids[0] if len(eos_ids) == 1 else eos_ids or None,
        "pad_token_id": None, "torch_dtype": dtype_name, "dtype": dtype_name,
    }


def hf_config(args: ModelArgs, attn_implementation: str = "eager"):
    """A transformers `LlamaConfig` of this shape (the tests' and bench.py's reference model)."""
    from transformers import LlamaConfig

    config = hf_config_dict(args, torch.float32, max_position_embeddings=max(args.max_seq_len, 1024))
    for key in ("architectures", "model_type", "rope_theta", "rope_scaling", "torch_dtype", "dtype"):
        config.pop(key)
    return LlamaConfig(**config, attn_implementation=attn_implementation)


def to_hf(model: Transformer, attn_implementation: str = "eager"):
    """A transformers LlamaForCausalLM (eval mode) holding copies of the same weights."""
    from transformers import LlamaForCausalLM

    hf_model = LlamaForCausalLM(hf_config(model.args, attn_implementation))
    hf_model.load_state_dict({k: v.clone() for k, v in hf_state_dict(model).items()}, strict=True)
    return hf_model.eval()


# ---- tokenizer --------------------------------------------------------------------------------------------
# Llama 3's chat format exactly as llama_models' ChatFormat encodes a dialog: no trimming of the content,
# "tool" spoken as "ipython", the assistant header appended when asked for.
CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{%- set role = 'ipython' if message['role'] == 'tool' else message['role'] %}"
    "{{- '<|start_header_id|>' + role + '<|end_header_id|>\\n\\n' + message['content'] + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: each byte gets a printable character (printable ASCII and Latin-1 keep
    their own; the rest, space and control bytes among them, move to U+0100 and up), so every token's
    bytes become a JSON-safe string without spaces."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: chr(b) for b in printable}
    for n, b in enumerate(b for b in range(256) if b not in chars):
        chars[b] = chr(256 + n)
    return chars


# As a str.translate table: a byte read as Latin-1 (the character whose ordinal is the byte) -> its character.
_BYTE_CHARS = bytes_to_unicode()


def bpe_vocab_and_merges(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[list[str]]]:
    """tiktoken ranks -> HF BPE vocab (byte-level strings) and merges.

    tiktoken merges, at each step, the adjacent pair whose concatenation has the lowest rank. HF's BPE
    merges the adjacent pair listed earliest in `merges`. Listing every split (left, right) of every
    token, ordered by the token's rank, makes the two agree; `ignore_merges` then reproduces tiktoken's
    shortcut of taking a whole pre-token that is itself in the vocabulary."""
    # One character per byte, so splitting a token's string splits its bytes at the same place.
    vocab = {token.decode("latin-1").translate(_BYTE_CHARS): rank for token, rank in ranks.items()}
    merges = []
    for s, _ in sorted(vocab.items(), key=lambda kv: kv[1]):
        splits = [(vocab[s[:i]], vocab[s[i:]], s[:i], s[i:]) for i in range(1, len(s))
                  if s[:i] in vocab and s[i:] in vocab]
        splits.sort()  # by the pieces' ranks
        merges.extend([left, right] for _, _, left, right in splits)
    return vocab, merges


def tokenizer_json(ranks: dict[bytes, int], special_tokens: dict[str, int]) -> dict:
    """A `tokenizers` tokenizer.json that encodes exactly as tiktoken with Meta's split pattern does."""
    vocab, merges = bpe_vocab_and_merges(ranks)
    bos = "<|begin_of_text|>"
    return {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True}
                         for t, i in sorted(special_tokens.items(), key=lambda kv: kv[1])],
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": PAT_STR}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
        # Encoding with special tokens on prepends <|begin_of_text|>, as Meta's published tokenizer does.
        "post_processor": {"type": "Sequence", "processors": [
            {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
            {"type": "TemplateProcessing",
             "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
             "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                      {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
             "special_tokens": {bos: {"id": bos, "ids": [special_tokens[bos]], "tokens": [bos]}}}]},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
                  "vocab": vocab, "merges": merges},
    }


def tokenizer_config(model_max_length: int) -> dict:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
        "eos_token": "<|end_of_text|>", "chat_template": CHAT_TEMPLATE,
        # Llama 3's published config says true, which makes decode() drop spaces before punctuation.
        "clean_up_tokenization_spaces": False, "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": model_max_length,
    }


def _write_json(path: Path, obj: dict, indent: Optional[int] = 2) -> None:
    text = (json.dumps(obj, indent=indent, ensure_ascii=False) + "\n").encode()
    write_atomically(path, lambda f: f.write(text))


def write_tokenizer_files(tokenizer, out_dir: Path, model_max_length: int) -> None:
    """tokenizer.json + tokenizer_config.json for a tiktoken `Tokenizer`, or a copy of an HF tokenizer's."""
    if isinstance(tokenizer, HFTokenizer):  # already in HF's format
        shutil.copyfile(tokenizer.path, out_dir / "tokenizer.json")
    else:
        vocab = tokenizer_json(load_bpe_ranks(tokenizer.path), tokenizer.special_tokens)
        _write_json(out_dir / "tokenizer.json", vocab, indent=None)  # 7 MB compact, 16 MB indented
    _write_json(out_dir / "tokenizer_config.json", tokenizer_config(model_max_length))


# ---- export -----------------------------------------------------------------------------------------------
@contextmanager
def new_directory(out_dir: Path) -> Iterator[Path]:
    """Yield a temporary directory beside `out_dir`, renamed to `out_dir` when the block succeeds, so an
    interrupted export leaves no half-written model. `out_dir` must not exist or be empty."""
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"{out_dir} exists and is not an empty directory; choose a new --out")
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if out_dir.exists():
            out_dir.rmdir()  # empty, checked above
        tmp.rename(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def export_hf(model: Transformer, out_dir: str | Path, tokenizer=None, dtype: Optional[torch.dtype] = None,
              max_shard_bytes: int = 5 * 10**9, max_position_embeddings: Optional[int] = None) -> list[Path]:
    """Write `model` (and `tokenizer`, when given) as a Hugging Face model directory `out_dir`; returns
    the weight files written. max_position_embeddings: the model's supported context by default."""
    out_dir = Path(out_dir)
    with new_directory(out_dir) as tmp:
        state = to_hf_state_dict(model.state_dict(), model.args)
        if model.args.tie_word_embeddings:
            del state["lm_head.weight"]  # transformers ties it to the embedding on load
        dtype = dtype or model.tok_embeddings.weight.dtype
        state = {k: v.to(dtype) for k, v in state.items()}
        files = save_sharded(state, tmp, max_shard_bytes)
        stop_ids = tokenizer.stop_tokens if tokenizer is not None else [128001, 128008, 128009]
        bos_id = tokenizer.bos_id if tokenizer is not None else 128000
        max_len = max_position_embeddings or supported_context(model.args)
        config = hf_config_dict(model.args, dtype, bos_id, stop_ids, max_len)
        _write_json(tmp / "config.json", config)
        _write_json(tmp / "generation_config.json", {k: config[k] for k in ("bos_token_id", "eos_token_id")})
        if tokenizer is not None:
            write_tokenizer_files(tokenizer, tmp, max_len)
    return [out_dir / f.name for f in files]


# ---- PEFT adapters ----------------------------------------------------------------------------------------
def peft_adapter_state_dict(adapters: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """lora.py's adapter tensors (`layers.N.attention.wq.lora_a.weight`, A: (rank, in), B: (out, rank)) under
    PEFT's names (`base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight`).

    The update is W + scale * B A; HF's wq/wk are P W with P the rotary row permutation, so their update is
    P (B A) = (P B) A: B's rows are permuted like the weight's, A stays."""
    out = {}
    for name, t in adapters.items():
        linear, sep, part = name.rpartition(".lora_")  # "layers.0.attention.wq", "a.weight"
        if not sep or part not in ("a.weight", "b.weight"):
            raise KeyError(f"{name!r} is not a LoRA adapter tensor (expected ...lora_a.weight / ...lora_b.weight)")
        heads = rotary_heads(linear + ".weight", args) if part == "b.weight" else None
        hf_linear = hf_name(linear + ".weight").removesuffix(".weight")  # model.layers.0.self_attn.q_proj
        out[f"base_model.model.{hf_linear}.lora_{part[0].upper()}.weight"] = \
            t if heads is None else permute_for_rotate_half(t, heads)
    return out


def peft_config(lora: dict, base_model_name_or_path: Optional[str]) -> dict:
    """adapter_config.json for lora.py's settings ({"rank", "alpha", "dropout", "targets"}): PEFT scales
    by lora_alpha / r, as lora.py does (no rsLoRA, no DoRA)."""
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lora["rank"], "lora_alpha": lora["alpha"],
            "lora_dropout": lora["dropout"],
            "target_modules": sorted(_PEFT_TARGETS[t] for t in lora["targets"]),
            "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
            "init_lora_weights": True, "modules_to_save": None, "inference_mode": True,
            "base_model_name_or_path": base_model_name_or_path, "revision": None}


def export_peft(adapters: dict[str, torch.Tensor], lora: dict, args: ModelArgs, out_dir: str | Path,
                base_model_name_or_path: Optional[str] = None) -> Path:
    """Write an adapter checkpoint's adapters as a PEFT directory (adapter_config.json +
    adapter_model.safetensors) for `PeftModel.from_pretrained(base_hf_model, out_dir)`."""
    out_dir = Path(out_dir)
    with new_directory(out_dir) as tmp:
        save_file(peft_adapter_state_dict(adapters, args), tmp / "adapter_model.safetensors", {"format": "pt"})
        _write_json(tmp / "adapter_config.json", peft_config(lora, base_model_name_or_path))
    return out_dir / "adapter_model.safetensors"


# ---- command line -----------------------------------------------------------------------------------------
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMG]i?B)?\s*$", re.IGNORECASE)
_UNITS = {"kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30, None: 1}


def parse_size(text: str) -> int:
    """'5GB' -> 5e9 bytes, '500MiB' -> 500 * 2**20, '1000' -> 1000 (as transformers' max_shard_size)."""
    m = _SIZE.match(text)
    if m is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size such as 5GB, 500MB or 2GiB")
    return int(float(m[1]) * _UNITS[m[2].lower() if m[2] else None])


DTYPES = {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser("export", help="write a checkpoint as a Hugging Face model directory")
    e.add_argument("--checkpoint", required=True,
                   help="project .pt (a LoRA adapter checkpoint is merged onto its base), Meta-format or HF directory")
    e.add_argument("--out", required=True, help="new directory to write")
    e.add_argument("--dtype", default="auto", choices=list(DTYPES), help="weights' dtype (auto: as stored)")
    e.add_argument("--max_shard_size", type=parse_size, default="5GB",
                   help="largest safetensors file before splitting, e.g. 5GB, 500MB (default 5GB)")
    e.add_argument("--tokenizer", default=None, help="tokenizer.model or HF tokenizer dir (default: the checkpoint's)")
    e.add_argument("--no_tokenizer", action="store_true", help="write the model only")
    e.add_argument("--max_seq_len", type=int, default=None,
                   help="max_position_embeddings (default: the context the model supports: a Hugging Face "
                        "directory's own, 131072 for Meta's 3.1-3.3, else original x factor with rope scaling, "
                        "else the context it was trained at)")
    e.add_argument("--rope_scale_factor", type=float, default=None,
                   help="Llama 3.1 rope scaling factor (default: the checkpoint's, or Meta's per family)")
    e.add_argument("--peft", action="store_true",
                   help="a LoRA adapter checkpoint: write its adapters as a PEFT directory (adapter_config.json + "
                        "adapter_model.safetensors)")
    e.add_argument("--base_hf", default=None,
                   help="with --peft: base_model_name_or_path to record (default: the base path the adapters record)")
    return p.parse_args(argv)


def _export_model(args: argparse.Namespace) -> list[str]:
    source = checkpoint.WeightSource.open(args.checkpoint)
    max_seq_len = args.max_seq_len
    if max_seq_len is None and source.kind == "meta":
        scaled = source.model_args(8192).use_scaled_rope
        max_seq_len = META_SCALED_CONTEXT if scaled else 8192  # what Meta's models are published for
    model = source.load_model(max_seq_len=max_seq_len, rope_scale_factor=args.rope_scale_factor)
    if max_seq_len is None and source.kind == "hf":
        max_seq_len = model.args.max_seq_len  # its own config's: the base's context as published
    tokenizer = None if args.no_tokenizer else source.checked_tokenizer(args.tokenizer)
    if tokenizer is not None and tokenizer.n_words > model.args.vocab_size:
        raise checkpoint.CheckpointError(
            f"the tokenizer has {tokenizer.n_words} tokens but the model's vocabulary only "
            f"{model.args.vocab_size}; pass --no_tokenizer to export the weights alone")
    note = source.rope_note(args.rope_scale_factor)
    files = export_hf(model, args.out, tokenizer, DTYPES[args.dtype], args.max_shard_size, max_seq_len)
    dtype = DTYPES[args.dtype] or model.tok_embeddings.weight.dtype
    weights = [f for f in files if f.suffix == ".safetensors"]
    lines = [f"exported {args.checkpoint} -> {args.out}",
             f"  model: {model.num_params() / 1e6:.1f}M parameters, {str(dtype).removeprefix('torch.')}, "
             f"{len(weights)} safetensors file(s), {sum(f.stat().st_size for f in weights) / 1e6:.1f} MB"]
    if note:
        lines.append(f"  {note}")
    if tokenizer is not None:
        lines.append(f"  tokenizer: {tokenizer.path} -> tokenizer.json, tokenizer_config.json (Llama 3 chat template)")
    return lines + [f"  load with: AutoModelForCausalLM.from_pretrained({str(args.out)!r}), "
                    f"AutoTokenizer.from_pretrained(...)"]


def _export_adapters(args: argparse.Namespace) -> list[str]:
    record = checkpoint.Checkpoint.read(args.checkpoint)
    adapters = record.provenance.adapters
    if adapters is None:
        raise checkpoint.CheckpointError(f"{args.checkpoint}: not a LoRA adapter checkpoint; drop --peft")
    if adapters.base is None:
        raise checkpoint.CheckpointError(f"{args.checkpoint}: trained from no base file, so it holds every weight; "
                                         f"export it without --peft (the adapters merged)")
    base = args.base_hf or adapters.base["path"]
    export_peft(record.weights, adapters.settings, record.model_args, args.out, base)
    lora = adapters.settings
    return [f"exported {args.checkpoint} -> {args.out} (PEFT LoRA adapters)",
            f"  {len(record.weights)} adapter tensors, rank {lora['rank']}, alpha {lora['alpha']:g}, "
            f"targets {', '.join(lora['targets'])}",
            f"  base: {base} (export it with: python hf_convert.py export --checkpoint {adapters.base['path']} "
            f"--out BASE_DIR)",
            f"  load with: PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE_DIR), "
            f"{str(args.out)!r})"]


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        lines = _export_adapters(args) if args.peft else _export_model(args)
    except (checkpoint.CheckpointError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
