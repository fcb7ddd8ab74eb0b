"""Meta-format checkpoints load into our model exactly as Meta's reference code reads them.

The reference is Meta's own `llama_models.llama3.model.Transformer` (fairscale layers at
model-parallel size 1), fed the same bf16 weights upcast to float32.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

fs_init = pytest.importorskip("fairscale.nn.model_parallel.initialize")
from llama_models.llama3.args import ModelArgs as MetaArgs  # noqa: E402
from llama_models.llama3.model import Transformer as MetaTransformer  # noqa: E402
from llama_models.llama3.tokenizer import Tokenizer as MetaTokenizer  # noqa: E402

from checkpoint import CheckpointError, load_meta_checkpoint  # noqa: E402
from tokenizer import default_tokenizer_path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PARAMS = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 128256, "multiple_of": 32,
          "ffn_dim_multiplier": 1.3, "norm_eps": 1e-5, "rope_theta": 500000.0, "use_scaled_rope": True}
COLUMN_PARALLEL = ("tok_embeddings", "output", "attention.wq", "attention.wk", "attention.wv",
                   "feed_forward.w1", "feed_forward.w3")
ROW_PARALLEL = ("attention.wo", "feed_forward.w2")


@pytest.fixture(scope="module")
def meta_model_parallel():
    """fairscale's layers need a (single-process) model-parallel group."""
    if not torch.distributed.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    fs_init.initialize_model_parallel(1)
    yield
    fs_init.destroy_model_parallel()
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def meta_weights(meta_model_parallel):
    """Random weights with Meta's names and shapes, as Meta's own model class declares them, in bf16."""
    torch.manual_seed(0)
    ref = MetaTransformer(MetaArgs(**PARAMS, max_seq_len=64, max_batch_size=1))
    state = {}
    for name, tensor in ref.state_dict().items():
        if name.endswith("norm.weight"):
            state[name] = (1 + 0.1 * torch.randn_like(tensor)).bfloat16()
        else:  # large enough that greedy choices are far from ties
            state[name] = (torch.randn_like(tensor) * (1.0 if "tok_embeddings" in name else 0.15)).bfloat16()
    return state


def split_for_model_parallel(state: dict, n: int) -> list[dict]:
    shards = [{} for _ in range(n)]
    for name, tensor in state.items():
        if any(f"{k}.weight" in name for k in COLUMN_PARALLEL):
            pieces = tensor.chunk(n, dim=0)
        elif any(f"{k}.weight" in name for k in ROW_PARALLEL):
            pieces = tensor.chunk(n, dim=1)
        else:
            pieces = [tensor] * n
        for shard, piece in zip(shards, pieces):
            shard[name] = piece.clone()
    return shards


def write_meta_dir(path: Path, state: dict, n_shards: int) -> Path:
    path.mkdir()
    (path / "params.json").write_text(json.dumps(PARAMS))
    for i, shard in enumerate(split_for_model_parallel(state, n_shards)):
        torch.save(shard, path / f"consolidated.{i:02d}.pth")
    (path / "tokenizer.model").write_bytes(default_tokenizer_path().read_bytes())
    return path


def meta_reference(state: dict, max_seq_len: int = 64) -> MetaTransformer:
    ref = MetaTransformer(MetaArgs(**PARAMS, max_seq_len=max_seq_len, max_batch_size=1))
    ref.load_state_dict({k: v.float() for k, v in state.items()})
    return ref.eval()


@pytest.mark.parametrize("n_shards", [1, 2])
def test_meta_checkpoint_logits_match_meta_reference(tmp_path, meta_weights, n_shards):
    ckpt = write_meta_dir(tmp_path / "meta", meta_weights, n_shards)
    model = load_meta_checkpoint(ckpt, dtype=torch.float32, max_seq_len=64)
    tokens = torch.randint(0, PARAMS["vocab_size"], (1, 40))
    expected = meta_reference(meta_weights)(tokens, 0)
    with torch.no_grad():
        logits, _ = model(tokens)
    assert (logits - expected).abs().max().item() <= 1e-4


def test_meta_checkpoint_keeps_bf16_when_no_dtype_given(tmp_path, meta_weights):
    model = load_meta_checkpoint(write_meta_dir(tmp_path / "meta", meta_weights, 1))
    assert model.tok_embeddings.weight.dtype == torch.bfloat16
    assert torch.equal(model.layers[1].feed_forward.w2.weight, meta_weights["layers.1.feed_forward.w2.weight"])


def test_meta_checkpoint_with_missing_weight_is_a_clear_error(tmp_path, meta_weights):
    broken = {k: v for k, v in meta_weights.items() if k != "layers.0.attention.wq.weight"}
    with pytest.raises(CheckpointError, match="missing weights.*layers.0.attention.wq.weight"):
        load_meta_checkpoint(write_meta_dir(tmp_path / "meta", broken, 1))


def meta_greedy_continuation(ref: MetaTransformer, prompt: list[int], max_new_tokens: int) -> list[int]:
    """Greedy decoding the way Meta's generation loop drives its model: prefill, then one token
    at a time at increasing start_pos, stopping at a stop token."""
    tok = MetaTokenizer.get_instance()
    out, pos = [], 0
    tokens = torch.tensor([prompt])
    for _ in range(max_new_tokens):
        logits = ref(tokens, pos)
        pos += tokens.shape[1]
        next_id = int(logits[0, -1].argmax())
        if next_id in tok.stop_tokens:
            break
        out.append(next_id)
        tokens = torch.tensor([[next_id]])
    return out


def test_generate_cli_prints_meta_reference_greedy_continuation(tmp_path, meta_weights):
    ckpt = write_meta_dir(tmp_path / "meta", meta_weights, 2)
    tok = MetaTokenizer.get_instance()
    prompt = "The capital of France is"
    expected = tok.decode(meta_greedy_continuation(meta_reference(meta_weights), tok.encode(prompt, bos=True, eos=False), 12))
    result = subprocess.run(
        [sys.executable, str(ROOT / "generate.py"), "--checkpoint", str(ckpt), "--prompt", prompt,
         "--temperature", "0", "--max_new_tokens", "12", "--device", "cpu", "--dtype", "fp32"],
        capture_output=True, text=True, cwd=ROOT, timeout=120, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert result.returncode == 0, result.stderr
    assert len(expected) > 0
    assert result.stdout == expected + "\n"
