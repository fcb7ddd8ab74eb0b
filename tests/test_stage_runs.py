"""SFT, DPO, distillation and LoRA end to end, as users run them: `python train.py` and `torchrun`, on data
prepared by the project's own scripts, from checkpoints on disk. For every stage: a stage change takes the
weights only, a resumed run equals the uninterrupted one bit for bit, and 2 ranks equal 1 process.

Each uninterrupted run also saves at step 2, and its resume test continues it from there (trainer_runs.cut_at):
the first part of a split run would be those same two steps again, one more process per stage. --stop-step only
decides where train.py's loop saves and stops, whatever the stage: test_train's boxes cover it."""

from pathlib import Path

import pytest
import torch

from checkpoint import read_checkpoint, save_checkpoint
from model import ModelArgs, Transformer
from tokenizer import Tokenizer
from trainer_runs import close_runs, cut_at, make_token_data, same_run, step_metric, train, write_env
from prep_helpers import prepare_chat_tasks

pytestmark = pytest.mark.e2e

SEQ = 64
SHAPE = dict(DIM="64", N_LAYERS="2", N_HEADS="4", N_KV_HEADS="2", MULTIPLE_OF="32", MAX_SEQ_LEN=str(SEQ))
RUN = dict(MAX_BATCH_SIZE="2", TOTAL_BATCH_SIZE=str(2 * SEQ * 2), MAX_STEPS="4", WARMUP_STEPS="1",
           VALIDATE_EVERY_X_STEPS="2", VALIDATION_STEPS="1", SAVE_EVERY_X_STEPS="2", GENERATE_EVERY_X_STEPS="0",
           INSTRUCT_EVAL_EXAMPLES="4")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("runs-data")
    instruct, dpo = prepare_chat_tasks(root, 200, SEQ, 0.1, exact_answers=True, pairs=True)
    return {"pretrain": make_token_data(root / "pretrain", documents=14), "instruct": instruct, "dpo": dpo}


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    """A pretraining checkpoint as train.py writes one, with a best validation loss no later stage may inherit."""
    tok = Tokenizer()
    torch.manual_seed(3)
    model = Transformer(ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=tok.n_words, multiple_of=32,
                                  max_seq_len=SEQ, tie_word_embeddings=True))
    path = tmp_path_factory.mktemp("pretrained") / "step_000100.pt"
    save_checkpoint(path, model, stage="pretrain", step=100, best_val_loss=0.01, validations_without_improvement=3,
                    tokenizer=tok.identity(), tokenizer_path=str(tok.path))
    return path


def env_for(tmp_path: Path, name: str, data: dict, **overrides) -> Path:
    return write_env(tmp_path / f"{name}.env", data["pretrain"], tmp_path / name,
                     INSTRUCT_DATA_DIR=str(data["instruct"]), DPO_DATA_DIR=str(data["dpo"]),
                     **{**SHAPE, **RUN, **overrides})


def resumed_from_step_2(straight: Path, env: Path, flag: str) -> None:
    """The uninterrupted run continued from its step-2 checkpoint in the env's RUN_DIR, by `flag`."""
    train(env, f"--{flag}", str(cut_at(straight, 2, env.parent / env.stem)))


# ---- SFT ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sft_run(tmp_path_factory, data, pretrained) -> Path:
    tmp = tmp_path_factory.mktemp("sft")
    out = train(env_for(tmp, "straight", data, TRAINING_STAGE="instruct"), "--pretrain_checkpoint", str(pretrained))
    assert "starting from the weights of" in out.stdout and "step 0, fresh optimizer" in out.stdout
    return tmp / "straight"


def test_sft_from_a_pretraining_checkpoint_starts_afresh_and_reports_exact_match(sft_run):
    assert sorted(step_metric(sft_run)) == [1, 2, 3, 4]  # step 0, not the checkpoint's 100
    ckpt = read_checkpoint(sft_run / "checkpoints" / "step_000004.pt")
    assert ckpt["stage"] == "sft" and ckpt["step"] == 4
    val = step_metric(sft_run, "val_loss")
    assert ckpt["best_val_loss"] == min(val.values())  # not the pretraining run's 0.01
    matches = step_metric(sft_run, "val_exact_match")
    assert sorted(matches) == [0, 2, 4] and all(0 <= m <= 1 for m in matches.values())  # 0: before SFT
    assert set(step_metric(sft_run, "val_exact_match_n").values()) == {4}


def test_sft_resumed_with_instruct_checkpoint_equals_the_uninterrupted_run(tmp_path, data, sft_run):
    resumed_from_step_2(sft_run, env_for(tmp_path, "boxed", data, TRAINING_STAGE="sft"), "instruct_checkpoint")
    same_run(sft_run, tmp_path / "boxed")


# ---- DPO ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dpo_start(tmp_path_factory, data, lora_sft_run) -> tuple[Path, str]:
    """Full-weight DPO from the LoRA SFT run's adapter checkpoint, merged onto its base on the fly (DPO from a
    full SFT checkpoint is the LoRA DPO run's start below): the run and what it printed."""
    tmp = tmp_path_factory.mktemp("dpo")
    start = lora_sft_run / "checkpoints" / "step_000004.pt"
    out = train(env_for(tmp, "straight", data, TRAINING_STAGE="dpo"), "--instruct_checkpoint", str(start))
    return tmp / "straight", out.stdout


@pytest.fixture(scope="module")
def dpo_run(dpo_start) -> Path:
    assert "starting from the weights of" in dpo_start[1]
    return dpo_start[0]


def test_dpo_logs_rewards_and_preference_accuracy_and_resumes_exactly(tmp_path, data, dpo_run):
    for key in ("reward_chosen", "reward_rejected", "reward_margin", "accuracy", "logps_chosen", "logps_rejected",
                "policy_accuracy", "val_accuracy", "val_reward_margin", "val_policy_accuracy"):
        assert step_metric(dpo_run, key), key
    assert sorted(step_metric(dpo_run, "val_exact_match")) == [0, 2, 4]  # SFT's held-out answers, before and after
    assert step_metric(dpo_run)[1] == pytest.approx(0.6931, abs=1e-3)  # the policy starts as its own reference
    resumed_from_step_2(dpo_run, env_for(tmp_path, "boxed", data, TRAINING_STAGE="dpo"), "dpo_checkpoint")
    same_run(dpo_run, tmp_path / "boxed")


def test_dpo_on_two_ranks_equals_one_process(tmp_path, data, lora_sft_run, dpo_run):
    train(env_for(tmp_path, "ddp", data, TRAINING_STAGE="dpo"), "--instruct_checkpoint",
          str(lora_sft_run / "checkpoints" / "step_000004.pt"), torchrun=2)
    close_runs(dpo_run, tmp_path / "ddp")


# ---- distillation ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hf_teacher(tmp_path_factory, pretrained) -> Path:
    """The teacher as a Hugging Face model directory (the trainer reads it through its own import)."""
    from checkpoint import load_model
    from hf_convert import export_hf

    out = tmp_path_factory.mktemp("teacher") / "hf"
    export_hf(load_model(pretrained), out, Tokenizer())
    return out


@pytest.fixture(scope="module")
def distill_run(tmp_path_factory, data, hf_teacher) -> Path:
    tmp = tmp_path_factory.mktemp("distill")
    env = env_for(tmp, "straight", data, IS_MODEL_DISTILLATION="true", TEACHER_MODEL_CHECKPOINT=str(hf_teacher),
                  DIM="32", N_HEADS="2", N_KV_HEADS="1")  # a smaller student, from scratch
    assert "distillation from" in train(env).stdout
    return tmp / "straight"


def test_distillation_logs_both_parts_and_resumes_exactly(tmp_path, data, hf_teacher, distill_run):
    ce, kd, loss = (step_metric(distill_run, k) for k in ("ce", "kd", "loss"))
    assert all(loss[s] == pytest.approx(0.5 * ce[s] + 0.5 * 4.0 * kd[s], rel=1e-5) for s in loss)  # T=2, alpha=.5
    assert step_metric(distill_run, "val_kd") and step_metric(distill_run, "val_teacher_loss")
    env = env_for(tmp_path, "boxed", data, IS_MODEL_DISTILLATION="true", TEACHER_MODEL_CHECKPOINT=str(hf_teacher),
                  DIM="32", N_HEADS="2", N_KV_HEADS="1")
    resumed_from_step_2(distill_run, env, "pretrain_checkpoint")
    same_run(distill_run, tmp_path / "boxed")


def test_distillation_on_two_fsdp_ranks_equals_one_process(tmp_path, data, hf_teacher, distill_run):
    """The teacher's blocks are sharded too. (DDP adds nothing stage-specific: the pretraining DDP run covers it.)"""
    train(env_for(tmp_path, "two", data, IS_MODEL_DISTILLATION="true", TEACHER_MODEL_CHECKPOINT=str(hf_teacher),
                  DIM="32", N_HEADS="2", N_KV_HEADS="1", PARALLELISM="fsdp"), torchrun=2)
    close_runs(distill_run, tmp_path / "two")


# ---- LoRA ------------------------------------------------------------------------------------------------------
LORA = dict(LORA_ENABLED="true", LORA_RANK="4", LORA_ALPHA="12", LORA_TARGET_MODULES='["wq", "wv", "w2"]')


@pytest.fixture(scope="module")
def lora_dpo_run(tmp_path_factory, data, sft_run) -> Path:
    """DPO with adapters; its reference is the same model with the adapters off. Adapter dropout draws from the
    global RNG, so the resume test below also shows that a checkpoint restores it."""
    tmp = tmp_path_factory.mktemp("lora-dpo")
    out = train(env_for(tmp, "straight", data, TRAINING_STAGE="dpo", LORA_DROPOUT="0.1", **LORA),
                "--instruct_checkpoint", str(sft_run / "checkpoints" / "step_000004.pt"))
    assert "trainable (" in out.stdout and "LoRA adapters" in out.stdout
    return tmp / "straight"


def test_lora_dpo_starts_at_log_2_keeps_adapters_only_and_resumes_exactly(tmp_path, data, sft_run, lora_dpo_run):
    assert step_metric(lora_dpo_run)[1] == pytest.approx(0.6931, abs=1e-3)  # B = 0: the policy is its reference
    ckpt = read_checkpoint(lora_dpo_run / "checkpoints" / "step_000004.pt")
    assert ckpt["lora"]["rank"] == 4 and ckpt["lora"]["alpha"] == 12 and ckpt["base"]["sha256"]
    assert set(ckpt["model"]) and all(".lora_" in k for k in ckpt["model"])
    full = (sft_run / "checkpoints" / "step_000004.pt").stat().st_size
    assert (lora_dpo_run / "checkpoints" / "step_000004.pt").stat().st_size < full / 5
    env = env_for(tmp_path, "boxed", data, TRAINING_STAGE="dpo", LORA_DROPOUT="0.1", **LORA)
    resumed_from_step_2(lora_dpo_run, env, "dpo_checkpoint")
    same_run(lora_dpo_run, tmp_path / "boxed")


def test_lora_resume_refuses_another_rank_or_alpha_with_one_line(tmp_path, data, lora_dpo_run):
    import subprocess
    import sys

    from trainer_runs import ROOT, clean_env

    env = env_for(tmp_path, "other", data, TRAINING_STAGE="dpo", **{**LORA, "LORA_ALPHA": "8"})
    out = subprocess.run([sys.executable, str(ROOT / "train.py"), "--env_file", str(env), "--dpo_checkpoint",
                          str(lora_dpo_run / "checkpoints" / "step_000004.pt")], capture_output=True, text=True,
                         env=clean_env(), timeout=120)
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1 and "alpha" in out.stderr.lower()


@pytest.fixture(scope="module")
def lora_sft_run(tmp_path_factory, data, pretrained) -> Path:
    tmp = tmp_path_factory.mktemp("lora-sft")
    train(env_for(tmp, "one", data, TRAINING_STAGE="sft", LORA_DROPOUT="0", **LORA), "--pretrain_checkpoint",
          str(pretrained))
    return tmp / "one"


def test_lora_sft_on_two_ranks_equals_one_process_and_merges_into_a_plain_checkpoint(tmp_path, data, pretrained,
                                                                                     lora_sft_run, dpo_start):
    """Also SFT's 2-ranks-equal-1 check: the conversation loader's sharding and the masked token count across ranks
    (the full-weight gradient reduction is the pretraining DDP run's)."""
    import lora
    from checkpoint import load_model

    two = env_for(tmp_path, "two", data, TRAINING_STAGE="sft", LORA_DROPOUT="0", **LORA)
    train(two, "--pretrain_checkpoint", str(pretrained), torchrun=2)
    close_runs(lora_sft_run, tmp_path / "two")
    adapters, merged = lora_sft_run / "checkpoints" / "step_000004.pt", tmp_path / "merged.pt"
    # lora.py merge's own command (in this process: test_lora runs it as a process)
    assert lora.main(["merge", "--checkpoint", str(adapters), "--out", str(merged)]) == 0
    model = load_model(merged)
    tokens = torch.randint(0, 1000, (1, 16))
    with torch.no_grad():
        base = load_model(pretrained)(tokens)[0]
        assert not torch.allclose(model(tokens)[0], base)  # the adapters trained and were folded in
    # and a later stage starts from the adapter checkpoint itself, merged on the fly: the DPO run above
    assert "starting from the weights of" in dpo_start[1]
