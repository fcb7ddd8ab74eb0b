"""Meta-format checkpoints load into our model exactly as Meta's reference code reads them.

The reference is Meta's own `llama_models.llama3.model.Transformer` (fairscale layers at
model-parallel size 1), fed the same bf16 weights upcast to float32. Checkpoints with more
model-parallel shards than kv heads are cut by Meta's own resharding code, run in real fairscale
model-parallel processes on gloo. RoPE scale factors are checked against Hugging Face's llama3
frequencies for the factors its published configs give.
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

from checkpoint import (CheckpointError, load_meta_checkpoint, load_model, meta_model_args,  # noqa: E402
                        rope_scaling_note)
from model import rope_frequencies  # noqa: E402
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


@pytest.mark.e2e
def test_generate_cli_prints_meta_reference_greedy_continuation(tmp_path, meta_weights):
    ckpt = write_meta_dir(tmp_path / "meta", meta_weights, 2)
    tok = MetaTokenizer.get_instance()
    prompt = "The capital of France is"
    expected = tok.decode(meta_greedy_continuation(meta_reference(meta_weights), tok.encode(prompt, bos=True, eos=False), 12))
    result = subprocess.run(
        [sys.executable, str(ROOT / "generate.py"), "--checkpoint", str(ckpt), "--prompt", prompt,
         "--temperature", "0", "--max_new_tokens", "12", "--device", "cpu", "--dtype", "fp32", "--quiet"],
        capture_output=True, text=True, cwd=ROOT, timeout=120, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert result.returncode == 0, result.stderr
    assert len(expected) > 0
    assert result.stdout == expected + "\n"


# ---- more model-parallel shards than kv heads ------------------------------------------------------------
# One rank of Meta's loader at model-parallel size `world`: llama_models' maybe_reshard_state_dict cuts (or
# merges) the shards in ckpt_dir into this rank's shard, which is saved as Meta distributes it.
RESHARD_RANK = """
import sys
from pathlib import Path
import torch
import fairscale.nn.model_parallel.initialize as fs_init
from llama_models.checkpoint import maybe_reshard_state_dict
rank, world, port, src, out, n_kv_heads = sys.argv[1:]
rank, world = int(rank), int(world)
torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
fs_init.initialize_model_parallel(world)
state = maybe_reshard_state_dict(sorted(Path(src).glob("consolidated.*.pth")), n_kv_heads=int(n_kv_heads))
torch.save({k: v.clone() for k, v in state.items()}, Path(out) / f"consolidated.{rank:02d}.pth")
torch.distributed.destroy_process_group()
"""


def reshard_with_meta_code(src: Path, out: Path, world: int) -> Path:
    out.mkdir()
    (out / "params.json").write_text((src / "params.json").read_text())
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ranks = [subprocess.Popen([sys.executable, "-c", RESHARD_RANK, str(r), str(world), str(port), str(src), str(out),
                               str(PARAMS["n_kv_heads"])], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
             for r in range(world)]
    for p in ranks:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err.decode()[-2000:]
    return out


@pytest.mark.e2e
def test_more_shards_than_kv_heads_load_like_metas_model(tmp_path, meta_weights):
    # Meta ships at model-parallel size = n_kv_heads (one kv head per shard) and reshards from there, as
    # for Llama 3.1 405B at MP 16: here 2 shards (2 kv heads) -> 4, each kv head on two consecutive shards.
    four = reshard_with_meta_code(write_meta_dir(tmp_path / "mp2", meta_weights, 2), tmp_path / "mp4", 4)
    wk = [torch.load(p, weights_only=True)["layers.0.attention.wk.weight"] for p in sorted(four.glob("*.pth"))]
    assert len(wk) == 4 and torch.equal(wk[0], wk[1]) and torch.equal(wk[2], wk[3]) and not torch.equal(wk[0], wk[2])
    model = load_meta_checkpoint(four, dtype=torch.float32, max_seq_len=64)
    tokens = torch.randint(0, PARAMS["vocab_size"], (1, 40), generator=torch.Generator().manual_seed(2))
    expected = meta_reference(meta_weights)(tokens, 0)
    with torch.no_grad():
        logits, _ = model(tokens)
    assert (logits - expected).abs().max().item() <= 1e-4


# ---- RoPE scale factor by model family -------------------------------------------------------------------
# params.json as Meta publishes them (no rope factor in any), and the llama3 rope settings of Hugging Face's
# configs for the same models: factor 32 for Llama 3.2 1B/3B, 8 for Llama 3.1 8B.
PUBLISHED = {
    "Llama 3.2 1B": ({"dim": 2048, "n_layers": 16, "n_heads": 32, "n_kv_heads": 8, "ffn_dim_multiplier": 1.5,
                      "multiple_of": 256}, 32.0),
    "Llama 3.2 3B": ({"dim": 3072, "n_layers": 28, "n_heads": 24, "n_kv_heads": 8, "ffn_dim_multiplier": 1.0,
                      "multiple_of": 256}, 32.0),
    "Llama 3.1": ({"dim": 4096, "n_layers": 32, "n_heads": 32, "n_kv_heads": 8, "ffn_dim_multiplier": 1.3,
                   "multiple_of": 1024}, 8.0),
}


def write_params(path: Path, shape: dict, **extra) -> Path:
    path.mkdir()
    (path / "params.json").write_text(json.dumps({**shape, "vocab_size": 128256, "norm_eps": 1e-5,
                                                  "rope_theta": 500000.0, "use_scaled_rope": True, **extra}))
    return path


def hf_llama3_inv_freq(head_dim: int, factor: float) -> torch.Tensor:
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = LlamaConfig(hidden_size=head_dim * 4, num_attention_heads=4, max_position_embeddings=131072,
                         rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": factor,
                                          "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                          "original_max_position_embeddings": 8192})
    return ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")[0]


@pytest.mark.parametrize("family", list(PUBLISHED))
def test_rope_factor_follows_the_model_family(tmp_path, family):
    pytest.importorskip("transformers")
    shape, hf_factor = PUBLISHED[family]
    ckpt = write_params(tmp_path / "m", shape)
    args = meta_model_args(ckpt, 8192)
    assert args.rope_scale_factor == hf_factor
    assert torch.allclose(rope_frequencies(args), hf_llama3_inv_freq(args.head_dim, hf_factor), rtol=1e-6, atol=0)
    note = rope_scaling_note(ckpt)
    assert note.startswith(f"rope scaling factor {hf_factor:g} (") and family in note


def test_explicit_rope_factor_wins_over_the_family_and_params_json(tmp_path):
    shape, _ = PUBLISHED["Llama 3.2 1B"]
    by_shape, in_file = write_params(tmp_path / "a", shape), write_params(tmp_path / "b", shape, rope_scaling_factor=16)
    assert meta_model_args(in_file, 8192).rope_scale_factor == 16.0
    assert rope_scaling_note(in_file) == "rope scaling factor 16 (from params.json (rope_scaling_factor))"
    for ckpt in (by_shape, in_file):
        assert meta_model_args(ckpt, 8192, rope_scale_factor=4.0).rope_scale_factor == 4.0
        assert rope_scaling_note(ckpt, 4.0) == "rope scaling factor 4 (given explicitly)"


def test_load_model_applies_the_rope_factor_it_is_given(tmp_path, meta_weights):
    ckpt = write_meta_dir(tmp_path / "meta", meta_weights, 1)
    assert load_model(ckpt).args.rope_scale_factor == 8.0  # dim 64: no 3.2 shape, Llama 3.1's factor
    assert rope_scaling_note(ckpt) == "rope scaling factor 8 (Llama 3.1's; params.json gives none)"
    assert load_model(ckpt, rope_scale_factor=2.0).args.rope_scale_factor == 2.0


# ---- export of a Meta directory --------------------------------------------------------------------------
def test_meta_directory_exports_to_transformers_with_metas_logits(tmp_path, meta_weights):
    transformers = pytest.importorskip("transformers")
    import hf_convert

    ckpt = write_meta_dir(tmp_path / "meta", meta_weights, 2)
    # The tokenizer files are the same as for project checkpoints, tested in test_hf_convert.py.
    assert hf_convert.main(["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "hf"), "--dtype", "fp32",
                            "--no_tokenizer"]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    assert hf.config.max_position_embeddings == 131072 and hf.config.rope_parameters["factor"] == 8.0
    tokens = torch.randint(0, PARAMS["vocab_size"], (1, 40), generator=torch.Generator().manual_seed(3))
    expected = meta_reference(meta_weights)(tokens, 0)
    with torch.no_grad():
        logits = hf(tokens).logits
    assert (logits - expected).abs().max().item() <= 1e-4
