"""End-to-end pretraining runs as users start them: `python train.py` and `torchrun`, real
processes, real shards on disk, real checkpoints."""

import json
import re
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from checkpoint import read_checkpoint
from tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
TINY_RUN = {
    "DIM": "64", "N_LAYERS": "2", "N_HEADS": "4", "N_KV_HEADS": "2", "MULTIPLE_OF": "32", "MAX_SEQ_LEN": "32",
    "MAX_BATCH_SIZE": "2", "TOTAL_BATCH_SIZE": "128", "MAX_STEPS": "6", "WARMUP_STEPS": "2", "MAX_LR": "3e-3",
    "MIN_LR": "3e-4", "TRAINING_PRECISION": "fp32", "VALIDATE_EVERY_X_STEPS": "3", "VALIDATION_STEPS": "2",
    "GENERATE_EVERY_X_STEPS": "0", "GENERATION_MAX_NEW_TOKENS": "4", "SAVE_EVERY_X_STEPS": "0",
    "MFU_FLOPS_PEAK": "1e12", "GENERATION_PROMPTS_FILE": str(ROOT / "prompts.txt"), "SEED": "7",
}


@pytest.fixture(scope="module")
def token_data(tmp_path_factory) -> Path:
    """Shards of real text with the real tokenizer, in the manifest format the loader reads."""
    import pydoc_data.topics

    tok = Tokenizer()
    docs = [tok.encode(text, bos=True, eos=True) for _, text in sorted(pydoc_data.topics.topics.items())][:60]
    splits = {"train": np.concatenate(docs[6:]), "val": np.concatenate(docs[:6])}
    out = tmp_path_factory.mktemp("data")
    manifest = {"format": "llama3-token-shards", "version": 1, "dtype": "uint32", "tokenizer": tok.identity(),
                "bos_id": tok.bos_id, "eos_id": tok.eos_id, "shard_size": 20_000, "splits": {}, "sources": [],
                "stats": {}, "created": ""}
    for split, stream in splits.items():
        shards = []
        for i, start in enumerate(range(0, len(stream), 20_000)):
            piece = stream[start:start + 20_000].astype(np.uint32)
            np.save(out / f"{split}_{i:06d}.npy", piece)
            shards.append({"file": f"{split}_{i:06d}.npy", "num_tokens": len(piece), "max_token_id": int(piece.max())})
        manifest["splits"][split] = {"num_tokens": len(stream), "shards": shards}
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def write_env(path: Path, data: Path, run_dir: Path, **overrides) -> Path:
    values = {**TINY_RUN, "PRETRAIN_DATA_DIR": str(data), "RUN_DIR": str(run_dir), **overrides}
    path.write_text("".join(f"{k}={v}\n" for k, v in values.items()))
    return path


def clean_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in TINY_RUN and k not in ("RUN_DIR", "PRETRAIN_DATA_DIR")}
    return {**env, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def train(env_file: Path, *args: str, torchrun: int = 0, timeout: int = 240) -> subprocess.CompletedProcess:
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}"]
                if torchrun else [sys.executable])
    result = subprocess.run([*launcher, str(ROOT / "train.py"), "--env_file", str(env_file), *args],
                            capture_output=True, text=True, cwd=env_file.parent, env=clean_env(), timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def step_metric(run_dir: Path, key: str = "loss") -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in records if key in r}



def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    latest = sorted((run_dir / "checkpoints").glob("step_*.pt"))[-1]
    return read_checkpoint(latest)["model"]


def write_hellaswag_items(path: Path, n: int = 5) -> Path:
    items = [{"ind": i, "activity_label": "Cooking", "ctx_a": f"A cook opens jar number {i}.",
              "ctx_b": "then she", "ctx": f"A cook opens jar number {i}. then she", "split": "val",
              "split_type": "indomain", "source_id": f"x{i}", "label": i % 4,
              "endings": ["pours it out.", "closes the lid again.", "smells the sauce.", "puts it back on the shelf."]}
             for i in range(n)]
    path.write_text("".join(json.dumps(item) + "\n" for item in items))
    return path


@pytest.fixture(scope="module")
def hellaswag(tmp_path_factory) -> dict:
    path = write_hellaswag_items(tmp_path_factory.mktemp("hellaswag") / "hellaswag.jsonl")
    return {"HELLASWAG_EVERY_X_STEPS": "3", "HELLASWAG_PATH": str(path)}


@pytest.fixture(scope="module")
def single(tmp_path_factory, token_data, hellaswag) -> Path:
    """The reference: 6 uninterrupted steps in one process (shared by the tests that compare to it)."""
    out = tmp_path_factory.mktemp("single")
    train(write_env(out / "single.env", token_data, out / "run", **hellaswag))
    return out / "run"


def test_two_ddp_ranks_equal_one_process_with_twice_the_accumulation(tmp_path, token_data, hellaswag, single):
    ddp = tmp_path / "ddp"
    train(write_env(tmp_path / "ddp.env", token_data, ddp, **hellaswag), torchrun=2)

    expected, got = step_metric(single), step_metric(ddp)
    assert sorted(expected) == sorted(got) == list(range(1, 7))
    for step in expected:
        assert abs(expected[step] - got[step]) <= 1e-4, (step, expected[step], got[step])
    assert expected[6] < expected[1]  # it learned something, so the comparison is not vacuous
    # Adam hides a constant gradient scale from the losses; the gradient norm does not.
    norms, ddp_norms = step_metric(single, "grad_norm"), step_metric(ddp, "grad_norm")
    assert all(abs(norms[s] - ddp_norms[s]) <= 1e-4 * norms[s] for s in norms)
    a, b = final_weights(single), final_weights(ddp)
    assert max((a[k].float() - b[k].float()).abs().max().item() for k in a) <= 1e-4
    # HellaSwag ran at the interval on both layouts, each rank scoring its share, none stalling.
    for run in (single, ddp):
        assert sorted(step_metric(run, "hellaswag_n").items()) == [(3, 5), (6, 5)]
    assert step_metric(single, "hellaswag_acc") == step_metric(ddp, "hellaswag_acc")


def test_fsdp_run_matches_single_process_and_its_checkpoint_resumes_without_fsdp(tmp_path, token_data, hellaswag,
                                                                                 single):
    fsdp = tmp_path / "fsdp"
    env = write_env(tmp_path / "fsdp.env", token_data, fsdp, PARALLELISM="fsdp", **hellaswag)
    first = train(env, "--stop-step", "3", torchrun=2)
    assert "(fsdp)" in first.stdout
    # The FSDP checkpoint holds full tensors: a plain single process continues from it.
    train(env, "--pretrain_checkpoint", str(fsdp / "checkpoints" / "step_000003.pt"))

    expected, got = step_metric(single), step_metric(fsdp)
    assert sorted(got) == list(range(1, 7))
    assert all(abs(expected[s] - got[s]) <= 1e-4 for s in expected), (expected, got)
    a, b = final_weights(single), final_weights(fsdp)
    assert a.keys() == b.keys()
    assert max((a[k].float() - b[k].float()).abs().max().item() for k in a) <= 1e-4


def test_resumed_run_reproduces_the_uninterrupted_run_exactly(tmp_path, token_data, hellaswag, single):
    straight = single
    resumed = tmp_path / "resumed"
    env = write_env(tmp_path / "resumed.env", token_data, resumed, **hellaswag)
    first = train(env, "--stop-step", "3")
    assert "stopped" not in first.stdout and (resumed / "checkpoints" / "step_000003.pt").is_file()
    second = train(env, "--pretrain_checkpoint", str(resumed / "checkpoints" / "step_000003.pt"))
    assert "resumed from" in second.stdout

    assert step_metric(resumed) == step_metric(straight)  # steps 1..6, bit for bit
    a, b = final_weights(straight), final_weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    ckpt = read_checkpoint(sorted((resumed / "checkpoints").glob("step_*.pt"))[-1])
    assert ckpt["step"] == 6 and ckpt["dataloader"]["position"] > 0 and "optimizer" in ckpt


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path, token_data):
    run_dir = tmp_path / "run"
    env = write_env(tmp_path / "run.env", token_data, run_dir, MAX_STEPS="100000", VALIDATE_EVERY_X_STEPS="0")
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), "--env_file", str(env)], cwd=tmp_path,
                            env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2) and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    assert "stopped by signal" in out
    saved = sorted((run_dir / "checkpoints").glob("step_*.pt"))
    assert len(saved) == 1
    assert read_checkpoint(saved[0])["step"] == max(step_metric(run_dir))


def test_killed_mid_checkpoint_leaves_the_previous_checkpoint_loadable(tmp_path, token_data):
    run_dir = tmp_path / "run"
    env = write_env(tmp_path / "run.env", token_data, run_dir, MAX_STEPS="100000", SAVE_EVERY_X_STEPS="1",
                    KEEP_LAST_CHECKPOINTS="2", VALIDATE_EVERY_X_STEPS="0")
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), "--env_file", str(env)], cwd=tmp_path,
                            env=clean_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpts = run_dir / "checkpoints"
    deadline, partial = time.time() + 120, []
    try:
        while time.time() < deadline:  # wait until a checkpoint exists and the next one is being written
            if ckpts.is_dir() and list(ckpts.glob("step_*.pt")):
                partial = list(ckpts.glob(".step_*.pt.tmp-*"))
                if partial:
                    proc.kill()
                    break
            time.sleep(0.001)
    finally:
        proc.kill()
        proc.wait()
    assert partial, "never caught a checkpoint being written"
    finished = sorted(ckpts.glob("step_*.pt"))
    assert finished
    ckpt = read_checkpoint(finished[-1])  # the last complete one still loads
    assert ckpt["step"] >= 1
    # ... and training resumes from it.
    resume_env = write_env(tmp_path / "resume.env", token_data, run_dir, MAX_STEPS=str(ckpt["step"] + 1))
    assert "resumed from" in train(resume_env, "--pretrain_checkpoint", str(finished[-1])).stdout


@pytest.mark.parametrize("overrides,args,message", [
    ({"TOTAL_BATCH_SIZE": "100"}, [], r"TOTAL_BATCH_SIZE=100 is not a multiple of .* = 64"),
    ({"PRETRAIN_DATA_DIR": "missing"}, [], r"missing.*load_pretrain_dataset\.py"),
    ({"GENERATION_PROMPTS_FILE": "nope.txt"}, [], r"GENERATION_PROMPTS_FILE='nope.txt': file not found"),
    ({}, ["--pretrain_checkpoint", "nope.pt"], r"--pretrain_checkpoint nope\.pt: not found \(expected a checkpoint"),
    ({"TRAINING_STAGE": "dpo", "DPO_DATA_DIR": "none"}, [], r"data directory none does not exist.*load_dpo_dataset"),
    ({"TRAINING_STAGE": "sft", "INSTRUCT_DATA_DIR": "none"}, [], r"none does not exist.*load_instruct_dataset"),
    ({"TRAINING_PRECISION": "fp16", "DEVICE": "cpu"}, [], r"TRAINING_PRECISION=fp16 is invalid on CPU.*expected auto, bf16 or fp32"),
])
def test_bad_setup_stops_with_one_clear_line(tmp_path, token_data, overrides, args, message):
    env = {**TINY_RUN, "PRETRAIN_DATA_DIR": str(token_data), "RUN_DIR": str(tmp_path / "run"), **overrides}
    (tmp_path / "bad.env").write_text("".join(f"{k}={v}\n" for k, v in env.items()))
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), "--env_file", "bad.env", *args], cwd=tmp_path,
                            capture_output=True, text=True, env=clean_env(), timeout=60)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and re.search(message, lines[0]), result.stderr


def test_checkpoint_from_another_model_shape_is_refused(tmp_path, token_data):
    run_dir = tmp_path / "run"
    train(write_env(tmp_path / "a.env", token_data, run_dir, MAX_STEPS="1", WARMUP_STEPS="1"))
    wider = write_env(tmp_path / "b.env", token_data, tmp_path / "run2", DIM="128", MAX_STEPS="2")
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), "--env_file", str(wider), "--pretrain_checkpoint",
                             str(run_dir / "checkpoints" / "step_000001.pt")], cwd=tmp_path, capture_output=True,
                            text=True, env=clean_env(), timeout=60)
    assert result.returncode == 2 and "model shape" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_early_stopping_ends_the_run_when_validation_stops_improving(tmp_path, token_data):
    # A learning rate far below float32 resolution leaves the weights, hence the validation loss, unchanged.
    run_dir = tmp_path / "run"
    env = write_env(tmp_path / "run.env", token_data, run_dir, MAX_LR="1e-12", MIN_LR="1e-12",
                    VALIDATE_EVERY_X_STEPS="1", EARLY_STOPPING_PATIENCE="1", MAX_STEPS="6")
    out = train(env).stdout
    assert "early stopping" in out and max(step_metric(run_dir)) == 2
    val = step_metric(run_dir, "val_loss")
    assert val[1] == val[2]
    assert (run_dir / "checkpoints" / "step_000002.pt").is_file()


def test_resumed_run_continues_the_same_offline_wandb_run(tmp_path, token_data):
    pytest.importorskip("wandb")
    run_dir = tmp_path / "run"
    env = write_env(tmp_path / "run.env", token_data, run_dir, WANDB_ENABLED="true", WANDB_MODE="offline",
                    VALIDATE_EVERY_X_STEPS="0")
    train(env, "--stop-step", "2")
    first_id = read_checkpoint(run_dir / "checkpoints" / "step_000002.pt")["wandb_run_id"]
    train(env, "--pretrain_checkpoint", str(run_dir / "checkpoints" / "step_000002.pt"))
    runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert first_id and len(runs) == 2 and all(r.name.endswith(first_id) for r in runs)
    assert read_checkpoint(sorted((run_dir / "checkpoints").glob("step_*.pt"))[-1])["wandb_run_id"] == first_id
    assert sorted(step_metric(run_dir)) == list(range(1, 7))


def test_micro_steps_skip_the_gradient_all_reduce_under_compile_too(tmp_path):
    """COMPILE wraps the DDP model; the last micro-step alone must reduce gradients across ranks."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    import train as train_module

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        ddp = DDP(torch.nn.Linear(4, 4))
        for model in (ddp, torch.compile(ddp)):
            with train_module.gradient_sync(model, enabled=False):
                assert not ddp.require_backward_grad_sync
            with train_module.gradient_sync(model, enabled=True):
                assert ddp.require_backward_grad_sync
    finally:
        dist.destroy_process_group()
