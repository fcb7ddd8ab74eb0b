"""Context extension at a stage start: a weights-only start takes MAX_SEQ_LEN and the rotary keys the .env sets
explicitly in place of the checkpoint's (one line says old -> new), a resumed run refuses them (one line naming
the key), and the export carries them to Hugging Face (checked with transformers' own config and logits)."""

import math

import pytest
import torch

import hf_convert
import train
from checkpoint import save_checkpoint
from config import Config
from model import ModelArgs, Transformer, rope_frequencies
from reference_weights import o1_random_
from train import Start, initial_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CPU = torch.device("cpu")
SHAPE = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=32)
OLD_THETA, NEW_THETA, OLD_CONTEXT, NEW_CONTEXT = 10_000.0, 1_000_000.0, 32, 128


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, tok):
    """A pretraining checkpoint at 32 tokens with theta 10,000, as train.py writes one (the fields a start reads)."""
    torch.manual_seed(0)
    model = o1_random_(Transformer(ModelArgs(**SHAPE, vocab_size=tok.n_words, rope_theta=OLD_THETA,
                                             max_seq_len=OLD_CONTEXT)))
    path = tmp_path_factory.mktemp("pretrained") / "step_000010.pt"
    save_checkpoint(path, model, step=10, stage="pretrain", tokenizer=tok.identity(), tokenizer_path=str(tok.path))
    return path


def config(stage: str, **explicit) -> Config:
    """A Config whose `explicit` keys are set as the .env sets them (recorded in cfg.sources)."""
    values = {k.lower(): v for k, v in explicit.items()}
    shape = {k: v for k, v in SHAPE.items()}
    return Config(training_stage=stage, training_precision="fp32", **shape, **{"max_seq_len": OLD_CONTEXT, **values},
                  sources={k: "the .env" for k in explicit})


def hand_inverse_frequencies(theta: float, head_dim: int) -> torch.Tensor:
    """RoPE (Su et al. 2021): theta_i = base^(-2i/d), i = 0 .. d/2 - 1, in float64."""
    return torch.tensor([theta ** (-2 * i / head_dim) for i in range(head_dim // 2)], dtype=torch.float64)


def test_a_weights_only_start_takes_the_envs_context_and_theta_and_says_old_to_new(pretrained, tok):
    cfg = config("sft", MAX_SEQ_LEN=NEW_CONTEXT, ROPE_THETA=NEW_THETA)
    initial = initial_model(cfg, Start(str(pretrained), flag="pretrain_checkpoint"), tok, tok.n_words, CPU, None)
    args = initial.model.args
    assert (args.rope_theta, args.max_seq_len) == (NEW_THETA, NEW_CONTEXT)
    torch.testing.assert_close(rope_frequencies(args).double(), hand_inverse_frequencies(NEW_THETA, args.head_dim),
                               rtol=1e-6, atol=0)
    lines = [line for line in initial.note.splitlines() if line.startswith("context:")]
    assert lines == [f"context: MAX_SEQ_LEN {OLD_CONTEXT} -> {NEW_CONTEXT} (the .env), "
                     f"ROPE_THETA {OLD_THETA} -> {NEW_THETA} (the .env)"]
    # the weights are the checkpoint's; only the rotation of positions > 0 changed
    before = torch.load(pretrained, weights_only=True)["model"]
    assert all(torch.equal(before[k], v) for k, v in initial.model.state_dict().items())


def test_a_start_can_turn_on_llama3_scaling_as_transformers_computes_it(pretrained, tok):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = config("sft", MAX_SEQ_LEN=NEW_CONTEXT, USE_SCALED_ROPE=True, ROPE_SCALE_FACTOR=4.0,
                 ROPE_ORIGINAL_MAX_SEQ_LEN=OLD_CONTEXT, ROPE_HIGH_FREQ_FACTOR=2.0)
    initial = initial_model(cfg, Start(str(pretrained), flag="pretrain_checkpoint"), tok, tok.n_words, CPU, None)
    args = initial.model.args
    hf = LlamaConfig(hidden_size=args.dim, num_attention_heads=args.n_heads, max_position_embeddings=NEW_CONTEXT,
                     rope_parameters={"rope_type": "llama3", "rope_theta": OLD_THETA, "factor": 4.0,
                                      "low_freq_factor": 1.0, "high_freq_factor": 2.0,
                                      "original_max_position_embeddings": OLD_CONTEXT})
    expected = ROPE_INIT_FUNCTIONS["llama3"](hf, "cpu")[0]
    torch.testing.assert_close(rope_frequencies(args), expected.float(), rtol=1e-6, atol=0)
    assert not torch.allclose(rope_frequencies(args).double(), hand_inverse_frequencies(OLD_THETA, args.head_dim))
    assert "USE_SCALED_ROPE False -> True (the .env), ROPE_SCALE_FACTOR 8.0 -> 4.0 (the .env)" in initial.note


def test_a_weights_only_start_without_rotary_keys_keeps_the_checkpoints_theta(pretrained, tok):
    cfg = config("sft")  # ROPE_THETA's default (500,000) differs, but the .env does not set it
    initial = initial_model(cfg, Start(str(pretrained), flag="pretrain_checkpoint"), tok, tok.n_words, CPU, None)
    assert initial.model.args.rope_theta == OLD_THETA
    assert "context:" not in initial.note


def test_a_resumed_run_refuses_another_theta_in_one_line_naming_the_key(pretrained, tmp_path, capsys):
    env = tmp_path / ".env"
    env.write_text("".join(f"{k}={v}\n" for k, v in {
        "DIM": 64, "N_LAYERS": 2, "N_HEADS": 4, "N_KV_HEADS": 2, "MULTIPLE_OF": 32, "MAX_SEQ_LEN": OLD_CONTEXT,
        "ROPE_THETA": NEW_THETA, "TRAINING_PRECISION": "fp32", "RUN_DIR": tmp_path / "run"}.items()))
    assert train.main(["--env_file", str(env), "--pretrain_checkpoint", str(pretrained)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"ROPE_THETA={NEW_THETA} ({env}) vs {OLD_THETA} (the checkpoint)" in err[0]


def test_a_resumed_run_refuses_another_context_in_one_line_naming_the_key(pretrained, tok):
    cfg = config("pretrain", MAX_SEQ_LEN=NEW_CONTEXT)
    with pytest.raises(train.CheckpointError) as e:
        initial_model(cfg, Start(str(pretrained), resume=True, flag="pretrain_checkpoint"), tok, tok.n_words, CPU,
                      None)
    assert "\n" not in str(e.value) and f"MAX_SEQ_LEN={NEW_CONTEXT} (the .env) vs {OLD_CONTEXT}" in str(e.value)


def test_the_extended_model_exports_with_its_theta_and_context_as_transformers_reads_them(pretrained, tok, tmp_path):
    from transformers import AutoConfig, LlamaForCausalLM

    cfg = config("sft", MAX_SEQ_LEN=NEW_CONTEXT, ROPE_THETA=NEW_THETA)
    model = initial_model(cfg, Start(str(pretrained), flag="pretrain_checkpoint"), tok, tok.n_words, CPU,
                          None).model.eval()
    path = tmp_path / "sft.pt"
    save_checkpoint(path, model, step=1, stage="sft", tokenizer=tok.identity(), tokenizer_path=str(tok.path))
    assert hf_convert.main(["export", "--checkpoint", str(path), "--out", str(tmp_path / "hf")]) == 0
    hf_config = AutoConfig.from_pretrained(tmp_path / "hf")
    theta = getattr(hf_config, "rope_theta", None) or hf_config.rope_parameters["rope_theta"]
    assert (theta, hf_config.max_position_embeddings) == (NEW_THETA, NEW_CONTEXT)
    hf = LlamaForCausalLM.from_pretrained(tmp_path / "hf", torch_dtype=torch.float32).eval()
    tokens = torch.randint(0, tok.n_words, (1, NEW_CONTEXT), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = model(tokens)[0], hf(tokens).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    old = Transformer(ModelArgs(**SHAPE, vocab_size=tok.n_words, rope_theta=OLD_THETA, max_seq_len=NEW_CONTEXT))
    old.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert not torch.allclose(old.eval()(tokens)[0][:, 1:], theirs[:, 1:], atol=1e-3)  # theta matters
    assert math.isclose(theta, NEW_THETA)


def test_a_lora_start_refuses_other_rotary_settings_in_one_line(pretrained, tok):
    import lora

    cfg = config("sft", ROPE_THETA=NEW_THETA, LORA_ENABLED=True)
    with pytest.raises(train.SetupError) as e:
        initial_model(cfg, Start(str(pretrained), flag="pretrain_checkpoint"), tok, tok.n_words, CPU,
                      lora.LoRASettings.from_config(cfg))
    assert "\n" not in str(e.value) and str(e.value).startswith("ROPE_THETA: changing the rotary settings of a LoRA")
