"""Hugging Face interop: export to a directory transformers loads, import of directories transformers wrote.

References: the `safetensors` package for the file format, transformers' `LlamaForCausalLM`,
`AutoTokenizer` and `save_pretrained` for the model and tokenizer directories, the tiktoken Tokenizer
(checked token for token against Meta's elsewhere) and llama_models' ChatFormat for the chat template.
"""

import contextlib
import io
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
st = pytest.importorskip("safetensors.torch")
from llama_models.datatypes import RawMessage  # noqa: E402
from llama_models.llama3.chat_format import ChatFormat  # noqa: E402
from llama_models.llama3.tokenizer import Tokenizer as MetaTokenizer  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM  # noqa: E402

import hf_convert  # noqa: E402
import safetensors_io  # noqa: E402
from checkpoint import (CheckpointError, checked_tokenizer, is_hf_model_dir, load_model, model_args_for,  # noqa: E402
                        save_checkpoint, tokenizer_path_for)
from generate import generate_tokens  # noqa: E402
from model import ModelArgs, Transformer  # noqa: E402
from reference_weights import o1_random_  # noqa: E402
from tokenizer import HFTokenizer, Tokenizer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LLAMA3_ROPE = dict(use_scaled_rope=True, rope_scale_factor=32.0, rope_low_freq_factor=1.0, rope_high_freq_factor=4.0,
                   rope_original_max_seq_len=64)  # a short original context, so scaling changes a 40-token run


def tiny_args(**overrides) -> ModelArgs:
    return ModelArgs(**{**dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, multiple_of=32,
                               max_seq_len=64), **overrides})


def tiny_model(seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    return o1_random_(Transformer(tiny_args(**overrides)))


def ours_logits(model: Transformer, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens)[0]


def hf_greedy(hf_model, prompt: list[int], n: int) -> list[int]:
    ids = torch.tensor([prompt])
    out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                            do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


# ---- safetensors ------------------------------------------------------------------------------------------
SAMPLE = {"bf16": torch.randn(3, 5).bfloat16(), "f16": torch.randn(2, 2, 2).half(), "f32": torch.randn(7),
          "i64": torch.arange(-3, 4), "bool": torch.tensor([True, False, True]), "scalar": torch.tensor(2.5),
          "empty": torch.empty(0, 4), "odd_bytes": torch.randint(0, 255, (3,), dtype=torch.uint8)}


def test_safetensors_reader_reads_what_the_safetensors_package_writes(tmp_path):
    st.save_file(SAMPLE, tmp_path / "ref.safetensors", metadata={"format": "pt"})
    got = safetensors_io.load_file(tmp_path / "ref.safetensors")
    assert set(got) == set(SAMPLE)
    for name, t in SAMPLE.items():
        assert got[name].dtype == t.dtype and got[name].shape == t.shape and torch.equal(got[name], t), name
    assert safetensors_io.read_header(tmp_path / "ref.safetensors")[1] == {"format": "pt"}


def test_safetensors_writer_output_loads_in_the_safetensors_package(tmp_path):
    safetensors_io.save_file(SAMPLE, tmp_path / "ours.safetensors", {"format": "pt"})
    got = st.load_file(tmp_path / "ours.safetensors")
    for name, t in SAMPLE.items():
        assert got[name].dtype == t.dtype and got[name].shape == t.shape and torch.equal(got[name], t), name
    from safetensors import safe_open
    with safe_open(tmp_path / "ours.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}


def test_loaded_tensors_are_copy_on_write_views_of_the_file(tmp_path):
    path = tmp_path / "w.safetensors"
    st.save_file({"w": torch.zeros(4)}, path)
    before = path.read_bytes()
    safetensors_io.load_file(path)["w"].add_(1)
    assert path.read_bytes() == before


# ---- export -----------------------------------------------------------------------------------------------
def test_export_loads_in_transformers_with_the_same_logits_and_greedy_ids(tmp_path):
    model = tiny_model(**LLAMA3_ROPE)
    files = hf_convert.export_hf(model, tmp_path / "hf", max_shard_bytes=60_000)
    assert len([f for f in files if f.suffix == ".safetensors"]) > 1
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    assert hf.config.rope_parameters["rope_type"] == "llama3" and hf.config.rope_parameters["factor"] == 32.0
    tokens = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(tokens).logits
    assert (ours_logits(model, tokens) - expected).abs().max().item() <= 1e-5
    prompt = tokens[0, :8].tolist()
    assert list(generate_tokens(model, prompt, 16, stop_ids=[])) == hf_greedy(hf, prompt, 16)


def test_export_refuses_a_non_empty_output_directory(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not an empty directory"):
        hf_convert.export_hf(tiny_model(), tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").read_text() == "x"


@pytest.fixture(scope="module")
def ref_tok() -> Tokenizer:
    return Tokenizer()


@pytest.fixture(scope="module")
def exported(tmp_path_factory, ref_tok):
    """A project checkpoint (Llama 3 vocabulary, tied embeddings) exported by the command line; the
    tokenizer tests use the same directory."""
    tmp = tmp_path_factory.mktemp("cli")
    torch.manual_seed(3)
    model = o1_random_(Transformer(tiny_args(vocab_size=128256, tie_word_embeddings=True, max_seq_len=128)))
    save_checkpoint(tmp / "step.pt", model, tokenizer=ref_tok.identity(), tokenizer_path=str(ref_tok.path))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        rc = hf_convert.main(["export", "--checkpoint", str(tmp / "step.pt"), "--out", str(tmp / "hf"),
                              "--max_shard_size", "20MB"])
    assert rc == 0
    return tmp, model, printed.getvalue()


@pytest.fixture(scope="module")
def hf_tok(exported):
    return AutoTokenizer.from_pretrained(exported[0] / "hf")


def test_export_command_writes_a_directory_transformers_uses_alone(exported, hf_tok, ref_tok):
    tmp, model, printed = exported
    out = tmp / "hf"
    assert f"exported {tmp / 'step.pt'} -> {out}" in printed and "2 safetensors file(s)" in printed
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is True and config["torch_dtype"] == "float32"
    assert 128009 in json.loads((out / "generation_config.json").read_text())["eos_token_id"]  # <|eot_id|>

    hf = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    prompt = "The capital of France is"
    ids = hf_tok(prompt)["input_ids"]
    assert ids == ref_tok.encode(prompt, bos=True, eos=False)
    with torch.no_grad():
        expected = hf(torch.tensor([ids])).logits
    assert (ours_logits(model, torch.tensor([ids])) - expected).abs().max().item() <= 1e-5
    assert list(generate_tokens(model, ids, 12, stop_ids=[])) == hf_greedy(hf, ids, 12)


def test_exported_directory_imports_with_its_tokenizer(exported, ref_tok):
    tmp, model, _ = exported
    assert is_hf_model_dir(tmp / "hf") and tokenizer_path_for(tmp / "hf") == str(tmp / "hf")
    tok = checked_tokenizer(tmp / "hf")
    assert isinstance(tok, HFTokenizer) and tok.stop_tokens == ref_tok.stop_tokens
    assert tok.encode(TEXTS[1], bos=True, eos=True) == ref_tok.encode(TEXTS[1], bos=True, eos=True)
    back = load_model(tmp / "hf")
    assert back.output.weight is back.tok_embeddings.weight
    assert all(torch.equal(back.state_dict()[k], v) for k, v in model.state_dict().items())


TEXTS = [
    "The capital of France is Paris.",
    "naïve café — 日本語のテキスト, emoji 🤖🚀👩‍👩‍👧 and العربية, Ελληνικά",
    "def f(x):\n    return x ** 2  # squares\n\n\nclass A:\n\tpass\r\n",
    "12345678901234567890 3.14159265358979 1,000,000 0x7fffffff",
    "   leading, trailing   \n\n\n\t\t  \u00a0 \u3000 runs of whitespace          end ",
    "I'M sure they'LL say it's o'clock, DON'T they'd've",
    "<html><body class=\"x\">&nbsp;</body></html> {\"key\": [1, 2, null]} ~~~ ``` $$ \\frac{a}{b}",
    "x" * 300 + " " + "ab" * 200,
]


@pytest.mark.parametrize("text", TEXTS)
def test_exported_tokenizer_encodes_like_the_tiktoken_tokenizer(hf_tok, ref_tok, text):
    ids = ref_tok.encode(text, bos=False, eos=False)
    assert hf_tok.encode(text, add_special_tokens=False) == ids
    assert hf_tok.encode(text) == [128000] + ids  # with special tokens: <|begin_of_text|> first, as Meta's
    assert hf_tok.decode(ids) == text


DIALOG = [{"role": "user", "content": "What is 2 + 2?"},
          {"role": "assistant", "content": "4. Anything else?"},
          {"role": "user", "content": "Write code:\n```python\nprint('héllo 🤖')\n```"}]


@pytest.mark.parametrize("system", [None, "You are terse.\nAnswer in one line."])
def test_exported_chat_template_renders_like_llama_models(hf_tok, system):
    dialog = ([{"role": "system", "content": system}] if system else []) + DIALOG
    expected = ChatFormat(MetaTokenizer.get_instance()).encode_dialog_prompt(
        [RawMessage(role=m["role"], content=m["content"]) for m in dialog]).tokens
    got = hf_tok.apply_chat_template(dialog, add_generation_prompt=True, tokenize=True)
    assert list(got["input_ids"] if hasattr(got, "keys") else got) == expected


# ---- import -----------------------------------------------------------------------------------------------
def transformers_model(tied: bool, llama3_rope: bool, seed: int = 0) -> LlamaForCausalLM:
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 32} if llama3_rope else \
        {"rope_type": "default", "rope_theta": 10000.0}
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         rms_norm_eps=1e-5, rope_parameters=rope, tie_word_embeddings=tied,
                         attn_implementation="eager")
    torch.manual_seed(seed)
    hf = LlamaForCausalLM(config)
    with torch.no_grad():  # O(1) weights: the default init gives near-uniform logits that hide layout mistakes
        for name, p in hf.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if name.endswith("norm.weight") else
                    torch.randn_like(p) * p.shape[1] ** -0.5)
    return hf.eval()


@pytest.mark.parametrize("tied,llama3_rope,sharded", [(False, False, False), (True, True, True),
                                                      (False, True, True), (True, False, False)])
def test_model_saved_by_transformers_loads_with_its_logits(tmp_path, tied, llama3_rope, sharded):
    hf = transformers_model(tied, llama3_rope)
    hf.save_pretrained(tmp_path, max_shard_size="40KB" if sharded else "1GB")
    assert (tmp_path / "model.safetensors.index.json").is_file() == sharded
    assert is_hf_model_dir(tmp_path)
    model = load_model(tmp_path, dtype=torch.float32)
    args = model_args_for(tmp_path)
    assert (args.ffn_hidden_dim, args.tie_word_embeddings, args.use_scaled_rope) == (160, tied, llama3_rope)
    assert (model.output.weight is model.tok_embeddings.weight) == tied
    tokens = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(tokens).logits
    assert (ours_logits(model, tokens) - expected).abs().max().item() <= 1e-5


def test_project_to_hf_to_project_is_bit_exact(tmp_path):
    model = tiny_model(**LLAMA3_ROPE).to(torch.bfloat16)
    save_checkpoint(tmp_path / "a.pt", model)
    hf_convert.export_hf(load_model(tmp_path / "a.pt"), tmp_path / "hf", max_shard_bytes=50_000)
    back = load_model(tmp_path / "hf")
    assert back.args.ffn_hidden_dim == model.args.ffn_hidden_dim and back.args.rope_scale_factor == 32.0
    original, roundtrip = model.state_dict(), back.state_dict()
    assert set(original) == set(roundtrip)
    for name, t in original.items():
        assert roundtrip[name].dtype == torch.bfloat16 and torch.equal(roundtrip[name], t), name



def llama_3_2_1b_config(directory):
    """Meta's published Llama 3.2 1B shape as transformers writes its config.json (no weights needed)."""
    LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-5, tie_word_embeddings=True,
                rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                                 "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                 "original_max_position_embeddings": 8192},
                max_position_embeddings=131072).save_pretrained(directory)
    return directory


def test_a_hugging_face_shape_matches_an_env_that_names_it_as_meta_does(tmp_path):
    """A run started from a Hugging Face directory resumes with the .env naming the shape by Meta's FFN rule:
    shapes compare by what they build. 2048 dims, multiple_of 256, ffn_dim_multiplier 1.5 build
    256 * ceil(int(1.5 * int(8 * 2048 / 3)) / 256) = 256 * ceil(8191 / 256) = 8192 = intermediate_size."""
    import train
    from config import load_config

    saved = model_args_for(llama_3_2_1b_config(tmp_path / "hf"))
    (tmp_path / "empty.env").write_text("")
    shape = dict(DIM="2048", N_LAYERS="16", N_HEADS="32", N_KV_HEADS="8", NORM_EPS="1e-5", TIE_WORD_EMBEDDINGS="true",
                 USE_SCALED_ROPE="true", ROPE_SCALE_FACTOR="32", MULTIPLE_OF="256", FFN_DIM_MULTIPLIER="1.5")
    assert train.shape_conflicts(load_config(str(tmp_path / "empty.env"), shape), saved, 128256) == ""
    other = load_config(str(tmp_path / "empty.env"), {**shape, "FFN_DIM_MULTIPLIER": "1.3"})  # 7099 -> 7168
    conflict = train.shape_conflicts(other, saved, 128256)
    assert "FFN_DIM_MULTIPLIER=1.3" in conflict and "7168" in conflict and "8192" in conflict
    scale = train.shape_conflicts(load_config(str(tmp_path / "empty.env"), {**shape, "ROPE_SCALE_FACTOR": "8"}),
                                  saved, 128256)
    assert "ROPE_SCALE_FACTOR=8" in scale and "32" in scale


@pytest.mark.parametrize("rope, expected", [
    (LLAMA3_ROPE, 64 * 32),  # original_max_position_embeddings x factor: the context the scaling stretches to
    ({**LLAMA3_ROPE, "rope_original_max_seq_len": 8192}, 131072),  # Meta's Llama 3.2 (factor 32): as Meta publishes it
    ({**LLAMA3_ROPE, "rope_scale_factor": 8.0, "rope_original_max_seq_len": 8192}, 131072),  # and 3.1 (factor 8)
    ({}, 64)])  # plain RoPE: nothing but the context it was trained at
def test_export_writes_the_context_the_model_supports_not_the_training_window(tmp_path, rope, expected):
    import logging

    save_checkpoint(tmp_path / "step.pt", tiny_model(**rope))  # fine-tuned at 64 tokens
    assert hf_convert.main(["export", "--checkpoint", str(tmp_path / "step.pt"), "--out", str(tmp_path / "hf"),
                            "--no_tokenizer"]) == 0
    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logging.getLogger("transformers").addHandler(handler)  # its loggers do not propagate to pytest's
    try:
        hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    finally:
        logging.getLogger("transformers").removeHandler(handler)
    assert hf.config.max_position_embeddings == expected
    assert not [r.getMessage() for r in records if "position" in r.getMessage()]

# ---- what is not a usable Llama ---------------------------------------------------------------------------
def one_line_error(path, match: str) -> str:
    with pytest.raises(CheckpointError, match=match) as info:
        load_model(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    return message


def test_non_llama_config_is_a_one_line_error(tmp_path):
    config = transformers.Qwen2Config(vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)
    transformers.Qwen2ForCausalLM(config).save_pretrained(tmp_path)
    one_line_error(tmp_path, r"model_type 'qwen2' \(Qwen2ForCausalLM\) is not a Llama")


@pytest.mark.parametrize("cut", [5, 100, -50])  # inside the length, inside the JSON header, inside the data
def test_truncated_safetensors_file_is_a_one_line_error(tmp_path, cut):
    transformers_model(tied=False, llama3_rope=False).save_pretrained(tmp_path)
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[:cut])
    one_line_error(tmp_path / "model.safetensors", "lone safetensors file")  # the file alone is not a model
    one_line_error(tmp_path, "truncated")


def test_pickled_weights_are_not_read(tmp_path):
    transformers_model(tied=False, llama3_rope=False).save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").rename(tmp_path / "pytorch_model.bin")
    one_line_error(tmp_path, "holds pytorch_model.bin, which is never read")


def test_missing_tensor_is_a_one_line_error(tmp_path):
    transformers_model(tied=False, llama3_rope=False).save_pretrained(tmp_path)
    tensors = st.load_file(tmp_path / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    st.save_file(tensors, tmp_path / "model.safetensors")
    one_line_error(tmp_path, r"missing tensors: model\.layers\.1\.mlp\.up_proj\.weight")


def test_shape_mismatch_is_a_one_line_error(tmp_path):
    transformers_model(tied=False, llama3_rope=False).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "intermediate_size": 192}))
    one_line_error(tmp_path, r"model\.layers\.0\.mlp\.gate_proj\.weight has shape \(160, 64\), "
                             r"config\.json implies \(192, 64\)")


# ---- LoRA adapters as PEFT --------------------------------------------------------------------------------
def test_lora_adapters_export_as_peft_and_load_on_the_exported_base(tmp_path):
    peft = pytest.importorskip("peft")
    base = tiny_model(**LLAMA3_ROPE)  # 4 query heads over 2 kv heads: wq and wk permute differently
    save_checkpoint(tmp_path / "base.pt", base)
    # An adapter checkpoint in lora.py's format: the adapters (A: rank x in, B: out x rank) of every block
    # linear, the settings, and the base they were trained on.
    rank, alpha, g = 4, 8.0, torch.Generator().manual_seed(5)
    adapters, merged = {}, {k: v.clone() for k, v in base.state_dict().items()}
    for name, w in base.state_dict().items():
        if name.startswith("layers.") and not name.endswith("norm.weight"):
            a = torch.randn(rank, w.shape[1], generator=g) * w.shape[1] ** -0.5
            b = torch.randn(w.shape[0], rank, generator=g) * 0.1  # larger: rounding grows past 1e-5 in fp32
            stem = name.removesuffix(".weight")
            adapters[f"{stem}.lora_a.weight"], adapters[f"{stem}.lora_b.weight"] = a, b
            merged[name] += alpha / rank * b @ a  # the reference: each update merged by hand
    lora = {"rank": rank, "alpha": alpha, "dropout": 0.0, "targets": ["wq", "wk", "wv", "wo", "w1", "w2", "w3"]}
    save_checkpoint(tmp_path / "adapters.pt", base, model_state=adapters, lora=lora,
                    base={"path": str(tmp_path / "base.pt"), "sha256": "not checked by the export"})

    hf_convert.export_hf(load_model(tmp_path / "base.pt"), tmp_path / "base_hf")
    assert hf_convert.main(["export", "--checkpoint", str(tmp_path / "adapters.pt"), "--out", str(tmp_path / "peft"),
                            "--peft", "--base_hf", str(tmp_path / "base_hf")]) == 0
    base_hf = AutoModelForCausalLM.from_pretrained(tmp_path / "base_hf", attn_implementation="eager")
    hf = peft.PeftModel.from_pretrained(base_hf, tmp_path / "peft").eval()
    tokens = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(tokens).logits
    base.load_state_dict(merged)
    adapted = ours_logits(base, tokens)
    assert (adapted - ours_logits(tiny_model(**LLAMA3_ROPE), tokens)).abs().max().item() > 0.1  # adapters matter
    assert (adapted - expected).abs().max().item() <= 1e-5


def test_export_without_peft_writes_an_adapter_checkpoint_merged_onto_its_base(tmp_path):
    """The reference: transformers reading the export, against the model the adapters merge to by hand."""
    from lora_helpers import adapter_checkpoint_for

    model = tiny_model(**LLAMA3_ROPE)
    adapters = adapter_checkpoint_for(model, tmp_path)
    assert hf_convert.main(["export", "--checkpoint", str(adapters), "--out", str(tmp_path / "hf"),
                            "--no_tokenizer"]) == 0
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    tokens = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(tokens).logits
    assert (ours_logits(model, tokens) - expected).abs().max().item() <= 1e-5
