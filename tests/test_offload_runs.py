"""OFFLOAD=disk through the real train.py: the streamed run equals the in-memory one (per-step figures, validation,
exact match, samples and final weights) for full fine-tuning with 2 accumulation steps and clipping active, for
LoRA with adapter dropout, and for DPO with a streamed frozen reference or the adapters-off reference; an offloaded
checkpoint resumes bit-exactly (offloaded or in memory); a store is trusted by content; SIGTERM loses nothing; and
what offload cannot do ends with one line."""

import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import offload
import train as train_module
from checkpoint import save_checkpoint
from config import ConfigError, load_config
from model import ModelArgs, Transformer
from prep_helpers import prepare_chat_tasks
from tokenizer import Tokenizer
from trainer_runs import (ROOT, clean_env, close_runs, final_weights, make_token_data, same_run, step_metric, train,
                          write_env)

SEQ = 64
CLIP = 0.05  # far below the tiny model's gradient norms: every step clips
RUN = dict(DIM="64", N_LAYERS="2", N_HEADS="4", N_KV_HEADS="2", MULTIPLE_OF="32", MAX_SEQ_LEN=str(SEQ),
           MAX_BATCH_SIZE="2", TOTAL_BATCH_SIZE=str(2 * 2 * SEQ), MAX_STEPS="4", WARMUP_STEPS="1",
           VALIDATE_EVERY_X_STEPS="2", VALIDATION_STEPS="1", SAVE_EVERY_X_STEPS="2", GRAD_CLIP=str(CLIP),
           INSTRUCT_EVAL_EXAMPLES="3")
SFT = dict(TRAINING_STAGE="sft")  # full fine-tuning runs: SFT, whose validation includes greedy exact match


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("offload-data")
    instruct, dpo = prepare_chat_tasks(root, 120, SEQ, 0.1, exact_answers=True, pairs=True)
    return {"pretrain": make_token_data(root / "pretrain", documents=14), "instruct": instruct, "dpo": dpo}


@pytest.fixture(scope="module")
def start(tmp_path_factory) -> Path:
    """Starting weights without training state (another stage's), so every run below starts from them afresh."""
    tok = Tokenizer()
    torch.manual_seed(3)
    model = Transformer(ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=tok.n_words, multiple_of=32,
                                  max_seq_len=SEQ, tie_word_embeddings=True))
    path = tmp_path_factory.mktemp("start") / "weights.pt"
    save_checkpoint(path, model, stage="sft", tokenizer=tok.identity(), tokenizer_path=str(tok.path))
    return path


def env_for(tmp_path: Path, name: str, data: dict, **overrides) -> Path:
    return write_env(tmp_path / f"{name}.env", data["pretrain"], tmp_path / name,
                     INSTRUCT_DATA_DIR=str(data["instruct"]), DPO_DATA_DIR=str(data["dpo"]),
                     **{**RUN, **overrides})


@pytest.fixture(scope="module")
def full_runs(tmp_path_factory, data, start) -> dict:
    """Full fine-tuning (SFT from `start`) in memory and offloaded."""
    tmp = tmp_path_factory.mktemp("full")
    runs = {}
    for mode in ("none", "disk"):
        out = train(env_for(tmp, mode, data, OFFLOAD=mode, **SFT), "--checkpoint", str(start))
        runs[mode] = (tmp / mode, out.stdout)
    return runs


@pytest.mark.e2e
def test_offloaded_full_fine_tuning_equals_in_memory_with_accumulation_and_clipping(full_runs):
    (memory, _), (disk, stdout) = full_runs["none"], full_runs["disk"]
    assert "2 accumulation steps" in stdout
    assert "offload: disk" in stdout and "every weight, its gradient and its AdamW state" in stdout
    assert all(norm > CLIP for norm in step_metric(memory, "grad_norm").values())  # clipping scaled every step
    assert sorted(step_metric(memory, "val_exact_match")) == [0, 2, 4]  # streamed greedy decoding was compared
    same_run(memory, disk)
    shares = step_metric(disk, "io_share")
    assert len(shares) == 4 and all(0 < s < 1 for s in shares.values())
    assert " | io " in stdout
    store = offload.BlockStore.open(disk / "offload" / "policy", verify=False)
    # Gradients are scratch overwritten in place each step: one fp32 gradient per stored weight on disk.
    stored_numel = sum(t.numel() for unit in store.units for t in store.mapped(unit).values())
    grad_bytes = sum(f.stat().st_size for f in (store.directory / "grads").iterdir())
    assert 4 * stored_numel <= grad_bytes < 4 * stored_numel + 4096 * len(store.units)
    assert not store.pristine  # trained in place: a rerun rebuilds it from its checkpoint, never reuses it


@pytest.mark.e2e
def test_offloaded_full_fine_tuning_keeping_every_activation_equals_in_memory(tmp_path, data, start, full_runs):
    out = train(env_for(tmp_path, "kept", data, OFFLOAD="disk", OFFLOAD_ACTIVATIONS="all", **SFT), "--checkpoint",
                str(start))
    assert "every activation kept (no recompute)" in out.stdout
    same_run(full_runs["none"][0], tmp_path / "kept")


@pytest.mark.e2e
def test_an_offloaded_checkpoint_resumes_bit_exactly_offloaded_and_in_memory(tmp_path, data, start, full_runs):
    disk = full_runs["disk"][0]
    boxed = env_for(tmp_path, "boxed", data, OFFLOAD="disk", **SFT)
    train(boxed, "--checkpoint", str(start), "--stop-step", "2")
    out = train(boxed, "--checkpoint", str(tmp_path / "boxed" / "checkpoints" / "step_000002.pt"))
    assert "resuming sft" in out.stdout and "policy store" in out.stdout
    same_run(disk, tmp_path / "boxed")

    # the checkpoint is a normal one: weights and optimizer state load in memory too
    memory = env_for(tmp_path, "in-memory", data, OFFLOAD="none", **SFT)
    shutil.copytree(tmp_path / "boxed" / "checkpoints", tmp_path / "in-memory" / "checkpoints")
    (tmp_path / "in-memory" / "checkpoints" / "step_000004.pt").unlink()
    shutil.copyfile(tmp_path / "boxed" / "metrics.jsonl", tmp_path / "in-memory" / "metrics.jsonl")
    train(memory, "--checkpoint", str(tmp_path / "in-memory" / "checkpoints" / "step_000002.pt"))
    same_run(disk, tmp_path / "in-memory")


@pytest.mark.e2e
def test_offloaded_lora_equals_in_memory_with_dropout_and_its_store_is_trusted_by_content(tmp_path, data, start):
    lora = dict(LORA_ENABLED="true", LORA_RANK="4", LORA_DROPOUT="0.3")
    train(env_for(tmp_path, "memory", data, **lora), "--checkpoint", str(start))
    disk = env_for(tmp_path, "disk", data, OFFLOAD="disk", OFFLOAD_DIR=str(tmp_path / "stores"), **lora)
    out = train(disk, "--checkpoint", str(start))
    assert "the frozen weights (adapters and their AdamW state in memory)" in out.stdout
    same_run(tmp_path / "memory", tmp_path / "disk")
    assert set(final_weights(tmp_path / "disk")) == {n for n in final_weights(tmp_path / "memory")}  # adapters only
    assert all(".lora_" in n for n in final_weights(tmp_path / "disk"))

    out = train(disk, "--checkpoint", str(start), "--overwrite")
    assert f"policy store {tmp_path / 'stores' / 'policy'} reused (content verified)" in out.stdout
    same_run(tmp_path / "memory", tmp_path / "disk")

    # another model's block under the same name: found by its hash, the store rebuilt from the weights
    torch.manual_seed(9)
    other = offload.write_store_from_model(tmp_path / "other", Transformer(offload.BlockStore.open(
        tmp_path / "stores" / "policy").args))
    block = Path("weights") / "layers.1.safetensors"
    shutil.copyfile(other.directory / block, tmp_path / "stores" / "policy" / block)
    out = train(disk, "--checkpoint", str(start), "--overwrite")
    assert "policy store" in out.stdout and "rebuilt (" in out.stdout and "content differs" in out.stdout
    same_run(tmp_path / "memory", tmp_path / "disk")


@pytest.mark.e2e
@pytest.mark.parametrize("lora", [False, True], ids=["streamed-reference", "lora-adapters-off"])
def test_offloaded_dpo_equals_in_memory(tmp_path, data, start, lora):
    settings = dict(TRAINING_STAGE="dpo", MAX_STEPS="2", SAVE_EVERY_X_STEPS="0", VALIDATE_EVERY_X_STEPS="1",
                    **(dict(LORA_ENABLED="true", LORA_RANK="4", LORA_DROPOUT="0.3") if lora else {}))
    train(env_for(tmp_path, "memory", data, **settings), "--checkpoint", str(start))
    out = train(env_for(tmp_path, "disk", data, OFFLOAD="disk", **settings), "--checkpoint", str(start))
    assert ("reference streamed too" in out.stdout) != lora
    assert step_metric(tmp_path / "disk")[1] == pytest.approx(0.6931, abs=1e-3)  # the policy is its own reference
    same_run(tmp_path / "memory", tmp_path / "disk")
    if lora:  # every activation kept instead of recomputed: chosen and rejected forwards share one backward
        out = train(env_for(tmp_path, "kept", data, OFFLOAD="disk", OFFLOAD_ACTIVATIONS="all", **settings),
                    "--checkpoint", str(start))
        assert "every activation kept (no recompute)" in out.stdout
        same_run(tmp_path / "memory", tmp_path / "kept")


@pytest.mark.e2e
def test_sigterm_during_an_offloaded_run_loses_nothing_and_a_rerun_resumes(tmp_path, data, start, full_runs):
    env = env_for(tmp_path, "stopped", data, OFFLOAD="disk", SAVE_EVERY_X_STEPS="0", **SFT)
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), "--env_file", str(env), "--checkpoint",
                             str(start)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=tmp_path, env=clean_env())
    seen = []
    for line in proc.stdout:  # the step line is printed after the step: SIGTERM lands in a later one
        seen.append(line)
        if "step 1/4" in line:
            proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0, "".join(seen)
    saved = sorted((tmp_path / "stopped" / "checkpoints").glob("step_*.pt"))
    assert "stopped by signal" in "".join(seen) and len(saved) == 1 and saved[0].name != "step_000004.pt"
    train(env, "--checkpoint", str(saved[0]))
    same_run(full_runs["disk"][0], tmp_path / "stopped")


@pytest.mark.e2e
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_offload_on_two_ranks_equals_one_process_in_memory(tmp_path, data, start, lora):
    """2 ranks x 1 micro-batch, each streaming its own store, step as 1 process x 2 micro-batches in memory: the
    stored (full) or in-memory (LoRA) gradients are averaged over the ranks before the global-norm clip."""
    settings = dict(MAX_STEPS="2", SAVE_EVERY_X_STEPS="0", DDP_BACKEND="gloo", **SFT,
                    **(dict(LORA_ENABLED="true", LORA_RANK="4", LORA_DROPOUT="0") if lora else {}))
    train(env_for(tmp_path, "one", data, OFFLOAD="none", **settings), "--checkpoint", str(start))
    out = train(env_for(tmp_path, "two", data, OFFLOAD="disk", **settings), "--checkpoint", str(start), torchrun=2)
    assert "2 ranks x 1 accumulation steps" in out.stdout and "offload: disk" in out.stdout
    assert all((tmp_path / "two" / "offload" / f"rank{r}" / "policy" / "manifest.json").is_file() for r in (0, 1))
    assert all(norm > CLIP for norm in step_metric(tmp_path / "one", "grad_norm").values())  # clipping active
    close_runs(tmp_path / "one", tmp_path / "two")


# ---- refused before anything runs (no e2e mark: in-process, seconds) ----------------------------------------------
def test_too_little_disk_space_ends_with_one_line_before_the_store_is_written(tmp_path, monkeypatch, capsys):
    data = make_token_data(tmp_path / "data", documents=8)
    env = write_env(tmp_path / "run.env", data, tmp_path / "run", **{**RUN, "OFFLOAD": "disk"})
    monkeypatch.setattr(offload, "free_bytes", lambda directory: 10**6)  # a disk with 1 MB free
    assert train_module.main(["--env_file", str(env)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("error: ")
    with torch.device("meta"):
        params = Transformer(ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=Tokenizer().n_words,
                                       multiple_of=32, tie_word_embeddings=True)).num_params()
    needed = params * 4 * 4  # fp32 weights, their gradients, AdamW's two moments
    assert f"the offload store needs {needed / 1e9:.2f} GB, only 0.00 GB free" in err and "OFFLOAD_DIR" in err
    assert not list((tmp_path / "run" / "offload").rglob("*.safetensors"))  # nothing half-written left


def test_a_full_fine_tuning_checkpoint_that_cannot_fit_is_refused_at_start_with_one_line(tmp_path, monkeypatch,
                                                                                        capsys):
    """The store fits, the run's checkpoint (float32 weights and AdamW's two moments) would not: refused before
    step 1 rather than at the first save, the store kept to be reused."""
    data = make_token_data(tmp_path / "data", documents=8)
    run_dir = tmp_path / "run"
    env = write_env(tmp_path / "run.env", data, run_dir, **{**RUN, "OFFLOAD": "disk"})
    monkeypatch.setattr(offload, "free_bytes", lambda d: 10**6 if Path(d) in (run_dir, run_dir / "checkpoints")
                        else 10**12)  # the offload store's disk is roomy, the run directory's has 1 MB
    assert train_module.main(["--env_file", str(env)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith(f"error: {run_dir / 'checkpoints'}: ")
    with torch.device("meta"):
        params = Transformer(ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=Tokenizer().n_words,
                                       multiple_of=32, tie_word_embeddings=True)).num_params()
    assert f"a checkpoint of this run needs {params * 12 / 1e9:.2f} GB, only 0.00 GB free" in err and "RUN_DIR" in err
    assert (run_dir / "offload" / "policy" / "manifest.json").is_file()  # the store is kept for the rerun
    assert not list(run_dir.rglob("step_*.pt"))


@pytest.mark.parametrize("key, value", [("COMPILE", "true"), ("PARALLELISM", "fsdp"), ("TRAINING_PRECISION", "fp16"),
                                        ("DPO_PRECOMPUTE_REFERENCE", "true"), ("DPO_REFERENCE_DTYPE", "bf16")])
def test_settings_offload_cannot_honour_are_refused_with_one_line(key, value):
    with pytest.raises(ConfigError, match=rf"(?i)^{key}='?{value}'? is invalid with OFFLOAD=disk: expected") as e:
        load_config(overrides={"OFFLOAD": "disk", key: value})
    assert "\n" not in str(e.value)
    load_config(overrides={"OFFLOAD": "none", key: value})  # fine in memory


def test_offload_cpu_is_refused_as_not_built_yet():
    with pytest.raises(ConfigError, match="needs a GPU and is not built yet"):
        load_config(overrides={"OFFLOAD": "cpu"})


def test_block_inputs_on_disk_without_offload_are_refused_with_one_line():
    with pytest.raises(ConfigError, match=r"^OFFLOAD_ACTIVATIONS='disk' is invalid: expected memory without OFFLOAD="):
        load_config(overrides={"OFFLOAD_ACTIVATIONS": "disk"})
    assert load_config(overrides={"OFFLOAD": "disk", "OFFLOAD_ACTIVATIONS": "disk"}).offload_activations == "disk"


def test_keeping_every_activation_without_offload_is_refused_with_one_line():
    with pytest.raises(ConfigError, match=r"^OFFLOAD_ACTIVATIONS='all' is invalid: expected memory without OFFLOAD="):
        load_config(overrides={"OFFLOAD_ACTIVATIONS": "all"})
    assert load_config(overrides={"OFFLOAD": "disk", "OFFLOAD_ACTIVATIONS": "all"}).offload_activations == "all"
