"""The README's LoRA pipeline, as users run it: a Hugging Face base -> SFT with adapters -> DPO with adapters on
those (stopped and resumed) -> lora.py merge -> generate.py -> hf_convert.py export, each result checked against
an independent reference: the adapters merged by hand from the checkpoints' own tensors, and transformers
reading the export."""

import math

import pytest
import torch

import generate
import hf_convert
import lora
from checkpoint import load_model, read_checkpoint
from model import ModelArgs, Transformer
from reference_weights import o1_random_
from tokenizer import Tokenizer
from trainer_runs import step_metric, train, write_env
from prep_helpers import prepare_chat_tasks

pytestmark = pytest.mark.e2e

SEQ = 64
# The .env names the shape as Meta's FFN rule does (MULTIPLE_OF=32); the Hugging Face import stores other
# multiple_of / ffn_dim_multiplier values that build the same FFN, which the resumed run must accept.
RUN = dict(DIM="64", N_LAYERS="2", N_HEADS="4", N_KV_HEADS="2", MULTIPLE_OF="32", MAX_SEQ_LEN=str(SEQ),
           MAX_BATCH_SIZE="2", TOTAL_BATCH_SIZE=str(2 * SEQ), MAX_STEPS="2", WARMUP_STEPS="1", MAX_LR="2e-2",
           MIN_LR="2e-2", VALIDATE_EVERY_X_STEPS="0", VALIDATION_STEPS="1", INSTRUCT_EVAL_EXAMPLES="0",
           SAVE_EVERY_X_STEPS="1", LORA_ENABLED="true", LORA_RANK="4", LORA_ALPHA="12", LORA_DROPOUT="0",
           LORA_TARGET_MODULES="wq,wk,wv,w2", GENERATION_MAX_NEW_TOKENS="1")
SCALE = 12 / 4
# Llama 3.1-style rope scaling from a 32-token original context: the model supports 32 x 4 = 128 positions.
ROPE = dict(use_scaled_rope=True, rope_scale_factor=4.0, rope_original_max_seq_len=32)


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("lora-pipeline")
    prepare_chat_tasks(root, 80, SEQ, 0.2, exact_answers=True, pairs=True)
    torch.manual_seed(0)
    base = o1_random_(Transformer(ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128256,
                                            multiple_of=32, max_seq_len=SEQ, tie_word_embeddings=True, **ROPE)))
    hf_convert.export_hf(base, root / "base-hf")  # weights and config only: no tokenizer to compare with
    (root / "prompt.txt").write_text("Hi\n")  # the one sample each run generates at its end
    return {"root": root, "base": root / "base-hf"}


def env_for(setup: dict, name: str, **overrides):
    root = setup["root"]
    return write_env(root / f"{name}.env", root / "instruct", root / name, INSTRUCT_DATA_DIR=str(root / "instruct"),
                     DPO_DATA_DIR=str(root / "dpo"), GENERATION_PROMPTS_FILE=str(root / "prompt.txt"),
                     **{**RUN, **overrides})


def merged_by_hand(base_dir, *adapter_checkpoints) -> Transformer:
    """The base with W += (alpha / r) B A added for each adapter checkpoint in turn, from their saved tensors."""
    model = load_model(base_dir, dtype=torch.float32, max_seq_len=SEQ)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for path in adapter_checkpoints:
        adapters = read_checkpoint(path)["model"]
        for key in [k for k in adapters if k.endswith(".lora_a.weight")]:
            stem = key.removesuffix(".lora_a.weight")
            state[stem + ".weight"] += SCALE * adapters[stem + ".lora_b.weight"] @ adapters[key]
    model.load_state_dict(state)
    return model


def test_sft_then_dpo_with_adapters_resume_merge_generate_and_export(setup, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    root, tok = setup["root"], Tokenizer()
    out = train(env_for(setup, "sft", TRAINING_STAGE="sft"), "--pretrain_checkpoint", str(setup["base"]))
    assert "carries no tokenizer" in out.stdout  # the Hugging Face base: the run's tokenizer is assumed
    sft = root / "sft" / "checkpoints" / "step_000002.pt"

    # DPO with adapters on the SFT adapters; resumed from its step 1, it continues exactly as it went on
    out = train(env_for(setup, "dpo", TRAINING_STAGE="dpo"), "--instruct_checkpoint", str(sft))
    assert "LoRA adapters merged onto" in out.stdout
    assert step_metric(root / "dpo")[1] == pytest.approx(math.log(2), abs=1e-4)  # B = 0: the policy is its reference
    train(env_for(setup, "resumed", TRAINING_STAGE="dpo"), "--dpo_checkpoint",
          str(root / "dpo" / "checkpoints" / "step_000001.pt"))
    assert step_metric(root / "resumed") == {2: step_metric(root / "dpo")[2]}
    dpo, resumed = (root / run / "checkpoints" / "step_000002.pt" for run in ("dpo", "resumed"))
    assert all(torch.equal(v, read_checkpoint(resumed)["model"][k]) for k, v in read_checkpoint(dpo)["model"].items())

    expected = merged_by_hand(setup["base"], sft, dpo)
    tokens = torch.randint(0, tok.n_words, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = expected(tokens)[0]
        assert (want - merged_by_hand(setup["base"])(tokens)[0]).abs().max() > 1e-3  # both runs moved the model

    assert lora.main(["merge", "--checkpoint", str(dpo), "--out", str(tmp_path / "merged.pt")]) == 0
    merged = read_checkpoint(tmp_path / "merged.pt")
    assert merged["stage"] == "dpo" and "step" not in merged
    with torch.no_grad():
        assert (load_model(tmp_path / "merged.pt")(tokens)[0] - want).abs().max() <= 1e-5

    assert hf_convert.main(["export", "--checkpoint", str(dpo), "--out", str(tmp_path / "hf"), "--no_tokenizer"]) == 0
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    assert hf.config.max_position_embeddings == 32 * 4  # what the rope scaling supports, not the 64-token window
    with torch.no_grad():
        assert (hf(tokens).logits - want).abs().max() <= 1e-5

    prompt = "Repeat these words: river moon"
    ids = tok.encode_chat([{"role": "user", "content": prompt}])
    capsys.readouterr()
    assert generate.main(["--checkpoint", str(dpo), "--prompt", prompt, "--chat", "--temperature", "0",
                          "--max_new_tokens", "8", "--quiet", "--device", "cpu", "--dtype", "fp32"]) == 0
    x = torch.tensor([ids])
    greedy = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=8, do_sample=False,
                         eos_token_id=tok.stop_tokens, pad_token_id=0)[0, len(ids):].tolist()
    assert capsys.readouterr().out == tok.decode([t for t in greedy if t not in tok.stop_tokens]) + "\n"
