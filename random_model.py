"""A random Llama of a real shape, written as Meta's distribution format or a Hugging Face directory, for
trying large-model paths (offload, loading, export) without downloading weights:

    python random_model.py --preset llama3.1-8b --format meta --out /tmp/llama8b [--dtype bf16] [--seed 0]
    python random_model.py --preset llama3.2-1b --format hf --out /tmp/llama1b [--max_shard_size 1GB]

The shapes are model.PRESETS, which are Meta's published ones; `meta` writes `params.json` with exactly
Meta's fields and one `consolidated.00.pth`, `hf` writes `config.json` and safetensors shards as
hf_convert.py exports them. Both are read by checkpoint.load_model like the real thing.

Weights are drawn as model.py's init draws them (normal, std 0.02, the residual projections shrunk by
sqrt(2 * n_layers), norm gains one), so activations stay of order one through every block. Each tensor
comes from its own generator, seeded by --seed and the tensor's name and drawn in fixed row chunks, so both
formats hold the same model and any one tensor can be drawn alone.

Memory: the model is never whole in memory. The Meta file is written by torch.save without the tensor
bytes (torch.serialization.skip_data), then each tensor is drawn chunk by chunk straight into the place
torch.save reserved for it, and the zip's CRC-32 fields are filled in afterwards, so the peak is one chunk
(64 MB). safetensors_io writes a whole shard at once, so the HF format holds one shard at a time
(--max_shard_size, 1 GB by default; a tensor larger than that, Llama 3.1 8B's 1 GB bf16 embedding, is a
shard of its own). Tokenizer files come along for Meta's 128k vocabulary (Meta's tokenizer.model from the
llama-models package, and its tokenizer.json for the HF format).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import struct
import sys
import zipfile
import zlib
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch

from checkpoint import meta_rope_scale_factor
from hf_convert import hf_config_dict, parse_size, supported_context, write_tokenizer_files
from hf_names import hf_name, permute_for_rotate_half
from model import PRESETS, ModelArgs, Transformer
from safetensors_io import INDEX_NAME, save_file, write_atomically

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
META_VOCAB = 128256  # Meta's tokenizer: its files are written beside the weights for this vocabulary
CHUNK_ELEMENTS = 16 << 20  # numbers drawn at a time (64 MB of float32)
# The fields of Meta's params.json (llama_models' sku_list arch_args); None-valued ones are left out.
META_PARAMS = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "ffn_dim_multiplier", "multiple_of",
               "norm_eps", "rope_theta", "use_scaled_rope")


class RandomModelError(ValueError):
    """A request that cannot be written; the message is one line."""


def preset_args(name: str) -> ModelArgs:
    if name not in PRESETS:
        raise RandomModelError(f"--preset {name!r}: unknown; expected one of {', '.join(PRESETS)}")
    return ModelArgs(**PRESETS[name])


# ---- the weights ------------------------------------------------------------------------------------------
def weight_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Meta's names -> shapes, in state-dict order; a tied output layer is the embedding, not a tensor."""
    with torch.device("meta"):
        model = Transformer(args)
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if args.tie_word_embeddings:
        del shapes["output.weight"]
    return shapes


def init_std(name: str, args: ModelArgs) -> Optional[float]:
    """model.py's init_weights for this tensor: its standard deviation, None for a norm gain (ones)."""
    if name.endswith("norm.weight"):
        return None
    if name.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
        return 0.02 / math.sqrt(2 * args.n_layers)
    return 0.02


def chunks(name: str, shape: tuple[int, ...], args: ModelArgs, seed: int, dtype: torch.dtype) -> Iterator[torch.Tensor]:
    """The tensor `name`, as consecutive blocks of rows in `dtype`: the same numbers whoever asks."""
    std = init_std(name, args)
    rows, cols = shape[0], math.prod(shape[1:])
    step = max(1, CHUNK_ELEMENTS // max(cols, 1))
    generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    for start in range(0, rows, step):
        n = min(step, rows - start)
        if std is None:
            block = torch.ones((n, *shape[1:]))
        else:
            block = torch.empty((n, *shape[1:])).normal_(0.0, std, generator=generator)
        yield block.to(dtype)


def draw(name: str, shape: tuple[int, ...], args: ModelArgs, seed: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.cat(list(chunks(name, shape, args, seed, dtype)))


# ---- Meta format ------------------------------------------------------------------------------------------
def meta_params(args: ModelArgs) -> dict:
    """params.json as Meta writes it. Meta's gives no rope scaling factor: the readers infer it (32 for the
    Llama 3.2 shapes, else 8), so a factor is written only when the inferred one would be wrong."""
    params = {k: getattr(args, k) for k in META_PARAMS if getattr(args, k) is not None}
    if args.use_scaled_rope and meta_rope_scale_factor(params)[0] != args.rope_scale_factor:
        params["rope_scale_factor"] = args.rope_scale_factor
    return params


def write_meta_weights(path: Path, args: ModelArgs, seed: int, dtype: torch.dtype) -> None:
    """consolidated.00.pth, one chunk in memory at a time: torch.save of fake tensors with skip_data reserves
    each tensor's bytes (record data/i for the i-th tensor saved), which are then written in place."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    shapes = weight_shapes(args)
    with FakeTensorMode():
        fake = {name: torch.empty(shape, dtype=dtype) for name, shape in shapes.items()}
    with torch.serialization.skip_data(materialize_fake_tensors=True):
        torch.save(fake, path)
    reader = torch._C.PyTorchFileReader(str(path))
    offsets = [reader.get_record_offset(f"data/{i}") for i in range(len(shapes))]
    del reader
    crcs = {}
    with open(path, "r+b") as f:
        for i, ((name, shape), offset) in enumerate(zip(shapes.items(), offsets)):
            f.seek(offset)
            crc = 0
            for block in chunks(name, shape, args, seed, dtype):
                raw = block.reshape(-1).view(torch.uint8).numpy().data
                f.write(raw)
                crc = zlib.crc32(raw, crc)
            crcs[f"data/{i}"] = crc
    fill_zip_crcs(path, crcs)


def fill_zip_crcs(path: Path, crcs: dict[str, int]) -> None:
    """Write the CRC-32 of records named (without the archive's top folder) in `crcs` into their local
    headers and central-directory entries, which skip_data left at 0. torch.load does not check them; zip
    tools do."""
    with zipfile.ZipFile(path) as z:
        infos = {info.filename.split("/", 1)[1]: info for info in z.infolist()}
        central_start = z.start_dir
    with open(path, "r+b") as f:
        for name, crc in crcs.items():
            f.seek(infos[name].header_offset + 14)  # local file header: CRC-32 at byte 14
            f.write(struct.pack("<I", crc))
        f.seek(central_start)
        central = bytearray(f.read())
        pos = 0
        while central[pos:pos + 4] == b"PK\x01\x02":  # central directory entries: CRC-32 at byte 16
            n_name, n_extra, n_comment = struct.unpack_from("<HHH", central, pos + 28)
            name = central[pos + 46:pos + 46 + n_name].decode().split("/", 1)[1]
            if name in crcs:
                struct.pack_into("<I", central, pos + 16, crcs[name])
            pos += 46 + n_name + n_extra + n_comment
        f.seek(central_start)
        f.write(central)


def write_meta(out: Path, args: ModelArgs, seed: int, dtype: torch.dtype) -> None:
    (out / "params.json").write_text(json.dumps(meta_params(args), indent=2) + "\n")
    write_meta_weights(out / "consolidated.00.pth", args, seed, dtype)
    if args.vocab_size == META_VOCAB:
        from tokenizer import default_tokenizer_path

        shutil.copyfile(default_tokenizer_path(), out / "tokenizer.model")


# ---- Hugging Face format ----------------------------------------------------------------------------------
def plan_shards(sizes: dict[str, int], max_shard_bytes: int) -> list[list[str]]:
    """Names grouped into consecutive shards of at most max_shard_bytes (a larger tensor alone), as
    safetensors_io.save_sharded groups them."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, nbytes in sizes.items():
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def hf_tensor(name: str, shape: tuple[int, ...], args: ModelArgs, seed: int, dtype: torch.dtype) -> torch.Tensor:
    """The tensor Meta's `name` holds, in HF's row order (wq and wk rows permuted for rotate-half)."""
    t = draw(name, shape, args, seed, dtype)
    if name.endswith("attention.wq.weight"):
        return permute_for_rotate_half(t, args.n_heads)
    if name.endswith("attention.wk.weight"):
        return permute_for_rotate_half(t, args.n_kv_heads)
    return t


def write_hf(out: Path, args: ModelArgs, seed: int, dtype: torch.dtype, max_shard_bytes: int) -> None:
    shapes = weight_shapes(args)
    sizes = {name: math.prod(shape) * dtype.itemsize for name, shape in shapes.items()}
    shards = plan_shards(sizes, max_shard_bytes)
    files = ["model.safetensors"] if len(shards) == 1 else \
        [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for names, file in zip(shards, files):
        save_file({hf_name(n): hf_tensor(n, shapes[n], args, seed, dtype) for n in names}, out / file,
                  {"format": "pt"})
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(sizes.values())},
                 "weight_map": {hf_name(n): file for names, file in zip(shards, files) for n in names}}
        text = (json.dumps(index, indent=2) + "\n").encode()
        write_atomically(out / INDEX_NAME, lambda f: f.write(text))
    tokenizer = None
    if args.vocab_size == META_VOCAB:
        from tokenizer import Tokenizer

        tokenizer = Tokenizer()
    max_len = supported_context(args)
    config = hf_config_dict(args, dtype, *((tokenizer.bos_id, tokenizer.stop_tokens) if tokenizer else ()),
                            max_position_embeddings=max_len)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if tokenizer is not None:
        write_tokenizer_files(tokenizer, out, max_len)


# ---- the command ------------------------------------------------------------------------------------------
def weight_bytes(args: ModelArgs, dtype: torch.dtype) -> int:
    return sum(math.prod(s) for s in weight_shapes(args).values()) * dtype.itemsize


def check_free_space(directory: Path, needed: int) -> None:
    free = shutil.disk_usage(directory).free
    if free < needed:
        raise RandomModelError(f"{directory}: {needed / 1e9:.2f} GB needed for the weights, "
                               f"only {free / 1e9:.2f} GB free")


def write_random_model(out: str | Path, preset: str, fmt: str, dtype: torch.dtype = torch.bfloat16, seed: int = 0,
                       overwrite: bool = False, max_shard_bytes: int = 10**9) -> ModelArgs:
    """Write the directory `out` (in a temporary directory beside it, renamed when complete)."""
    out = Path(out)
    args = preset_args(preset)
    if fmt not in ("meta", "hf"):
        raise RandomModelError(f"--format {fmt!r}: expected meta or hf")
    if out.exists() and not overwrite:
        raise RandomModelError(f"{out} exists; choose a new --out or pass --overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    check_free_space(out.parent, weight_bytes(args, dtype))
    tmp = out.with_name(f".{out.name}.tmp-random")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        if fmt == "meta":
            write_meta(tmp, args, seed, dtype)
        else:
            write_hf(tmp, args, seed, dtype, max_shard_bytes)
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return args


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Write a random Llama of a real shape (Meta or Hugging Face format).")
    p.add_argument("--preset", required=True, help=f"one of {', '.join(PRESETS)}")
    p.add_argument("--format", required=True, choices=("meta", "hf"))
    p.add_argument("--out", required=True, help="the directory to write (must not exist, unless --overwrite)")
    p.add_argument("--dtype", default="bf16", choices=tuple(DTYPES), help="default bf16, as Meta publishes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--max_shard_size", default="1GB",
                   help="HF format: bytes per safetensors shard, also the peak memory while writing (default 1GB)")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    a = parse_args(argv)
    try:
        dtype = DTYPES[a.dtype]
        args = write_random_model(a.out, a.preset, a.format, dtype, a.seed, a.overwrite, parse_size(a.max_shard_size))
    except (RandomModelError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    n = sum(math.prod(s) for s in weight_shapes(args).values())
    print(f"wrote {a.out}: a random {a.preset} ({n / 1e9:.2f}B parameters, {n * dtype.itemsize / 1e9:.2f} GB "
          f"{a.dtype}) in {'Meta' if a.format == 'meta' else 'Hugging Face'} format, seed {a.seed}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
