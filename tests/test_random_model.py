"""random_model.py: real shapes in Meta's and Hugging Face's formats, read back by the project's loaders and by
transformers, drawn tensor by tensor."""

import json
import math
import zipfile

import pytest
import torch
from transformers import AutoModelForCausalLM

import checkpoint
import random_model
from model import PRESETS

TIED_SCALED = dict(PRESETS["tiny"], tie_word_embeddings=True, use_scaled_rope=True, rope_scale_factor=32.0)


@pytest.mark.parametrize("preset, sku", [("llama3.2-1b", "Llama3.2-1B"), ("llama3.2-3b", "Llama3.2-3B"),
                                         ("llama3.1-8b", "Llama3.1-8B")])
def test_params_json_is_metas_own_for_the_real_shapes(preset, sku):
    from llama_models import sku_list

    published = next(m for m in sku_list.all_registered_models() if m.descriptor() == sku).arch_args
    assert random_model.meta_params(random_model.preset_args(preset)) == published


@pytest.fixture
def small_chunks(monkeypatch):
    """Every tensor of the tiny model spans several chunks, so the chunked writing path is what is tested."""
    monkeypatch.setattr(random_model, "CHUNK_ELEMENTS", 1000)
    monkeypatch.setitem(random_model.PRESETS, "tiny-tied", TIED_SCALED)


@pytest.mark.parametrize("preset", ["tiny", "tiny-tied"])
def test_both_formats_load_as_one_model_that_transformers_computes_alike(tmp_path, small_chunks, preset):
    random_model.write_random_model(tmp_path / "meta", preset, "meta", torch.float32, seed=3)
    random_model.write_random_model(tmp_path / "hf", preset, "hf", torch.float32, seed=3, max_shard_bytes=100_000)
    assert len(list((tmp_path / "hf").glob("model-*.safetensors"))) > 1
    with zipfile.ZipFile(tmp_path / "meta" / "consolidated.00.pth") as z:
        assert z.testzip() is None  # every record's CRC-32 is right
    raw = torch.load(tmp_path / "meta" / "consolidated.00.pth", weights_only=True)  # not memory-mapped
    assert ("output.weight" in raw) == (preset == "tiny")

    meta, hf = checkpoint.load_model(tmp_path / "meta"), checkpoint.load_model(tmp_path / "hf")
    assert meta.args.tie_word_embeddings == hf.args.tie_word_embeddings == (preset == "tiny-tied")
    assert meta.args.rope_scale_factor == hf.args.rope_scale_factor
    assert meta.state_dict().keys() == hf.state_dict().keys()
    for name, tensor in meta.state_dict().items():
        assert torch.equal(tensor, hf.state_dict()[name]), name

    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    tokens = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference(tokens).logits
        ours, _ = meta(tokens)
    assert (ours - expected).abs().max().item() <= 1e-5


def test_weights_are_drawn_as_model_init_draws_them(tmp_path):
    random_model.write_random_model(tmp_path / "m", "tiny", "meta", torch.float32)
    state = checkpoint.load_model(tmp_path / "m").state_dict()
    n_layers = PRESETS["tiny"]["n_layers"]
    assert torch.equal(state["layers.1.ffn_norm.weight"], torch.ones(64))
    for name, std in [("tok_embeddings.weight", 0.02), ("layers.0.feed_forward.w1.weight", 0.02),
                      ("layers.1.attention.wo.weight", 0.02 / math.sqrt(2 * n_layers))]:
        assert state[name].std().item() == pytest.approx(std, rel=0.05), name
        assert abs(state[name].mean().item()) < 0.1 * std, name
    assert not torch.equal(state["layers.0.attention.wq.weight"], state["layers.1.attention.wq.weight"])


def test_params_json_carries_a_factor_only_where_the_readers_would_infer_another(tmp_path, monkeypatch):
    monkeypatch.setitem(random_model.PRESETS, "tiny-tied", TIED_SCALED)
    random_model.write_random_model(tmp_path / "m", "tiny-tied", "meta", torch.float32)
    params = json.loads((tmp_path / "m" / "params.json").read_text())
    assert params["rope_scale_factor"] == 32.0 and params["use_scaled_rope"] is True
    assert "tie_word_embeddings" not in params  # Meta's format says so by leaving output.weight out


def test_an_existing_out_is_refused_in_one_line_unless_overwrite(tmp_path, capsys):
    out = tmp_path / "m"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert random_model.main(["--preset", "tiny", "--format", "hf", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--overwrite" in err and (out / "keep.txt").exists()
    assert random_model.main(["--preset", "tiny", "--format", "hf", "--out", str(out), "--overwrite"]) == 0
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert random_model.main(["--preset", "llama9", "--format", "hf", "--out", str(tmp_path / "x")]) == 2
    assert "expected one of" in capsys.readouterr().err
