"""End-to-end pretraining runs as users start them: `python train.py` and `torchrun`, real
processes, real shards on disk, real checkpoints."""

import json
import re
import os
import shutil
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

from trainer_runs import (ROOT, TINY_RUN, clean_env, final_weights, make_token_data, same_run, step_metric, train,
                          write_env)


@pytest.fixture(scope="module")
def token_data(tmp_path_factory) -> Path:
    return make_token_data(tmp_path_factory.mktemp("data"))


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


@pytest.mark.e2e
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


@pytest.mark.e2e
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
    # Adam hides a constant gradient scale from the losses and weights; the gradient norm does not.
    norms, fsdp_norms = step_metric(single, "grad_norm"), step_metric(fsdp, "grad_norm")
    assert all(abs(norms[s] - fsdp_norms[s]) <= 1e-4 * norms[s] for s in norms), (norms, fsdp_norms)
    a, b = final_weights(single), final_weights(fsdp)
    assert a.keys() == b.keys()
    assert max((a[k].float() - b[k].float()).abs().max().item() for k in a) <= 1e-4


@pytest.fixture(scope="module")
def first_box(tmp_path_factory, token_data, hellaswag) -> Path:
    """The single run's first 3 steps as a --stop-step box: its run directory, for each resume test to copy."""
    box = tmp_path_factory.mktemp("first-box") / "run"
    first = train(write_env(box.parent / "box.env", token_data, box, **hellaswag), "--stop-step", "3")
    assert "stopped" not in first.stdout and (box / "checkpoints" / "step_000003.pt").is_file()
    return box


@pytest.mark.e2e
@pytest.mark.parametrize("flag", ["--pretrain_checkpoint", "--checkpoint"])
def test_resumed_run_reproduces_the_uninterrupted_run_exactly(tmp_path, token_data, hellaswag, single, first_box,
                                                              flag):
    straight = single
    resumed = tmp_path / "resumed"
    shutil.copytree(first_box, resumed)
    env = write_env(tmp_path / "resumed.env", token_data, resumed, **hellaswag)
    second = train(env, flag, str(resumed / "checkpoints" / "step_000003.pt"))
    assert f"resuming pretrain from {resumed / 'checkpoints' / 'step_000003.pt'} at step 3\n" in second.stdout

    same_run(straight, resumed)  # every logged figure of steps 1..6 and the final weights, bit for bit
    assert step_metric(resumed) == step_metric(straight)  # steps 1..6, bit for bit
    a, b = final_weights(straight), final_weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    ckpt = read_checkpoint(sorted((resumed / "checkpoints").glob("step_*.pt"))[-1])
    assert ckpt["step"] == 6 and ckpt["dataloader"]["position"] > 0 and "optimizer" in ckpt


@pytest.mark.e2e
def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path, token_data):
    run_dir = tmp_path / "run"
    env = write_env(tmp_path / "run.env", token_data, run_dir, MAX_STEPS="100000", VALIDATE_EVERY_X_STEPS="0")
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), "--env_file", str(env)], cwd=tmp_path,
                            env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2) and time.time() < deadline:
        time.sleep(0.02)
    done = len(metrics.read_text().splitlines())
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    assert "SIGTERM: stopping after this step, saving a checkpoint" in out and "stopped by signal" in out
    saved = sorted((run_dir / "checkpoints").glob("step_*.pt"))
    assert len(saved) == 1
    last = max(step_metric(run_dir))
    assert read_checkpoint(saved[0])["step"] == last
    assert last <= done + 1  # the step in progress (if any) finishes; no step starts after the signal


@pytest.mark.e2e
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
    assert "resuming pretrain from" in train(resume_env, "--pretrain_checkpoint", str(finished[-1])).stdout


@pytest.mark.e2e
def test_logged_learning_rate_is_the_hand_computed_schedule(single):
    """WARMUP_STEPS=2, MAX_STEPS=6, MAX_LR=3e-3, MIN_LR=3e-4: step k trains with the rate after k-1 steps."""
    import math

    top, low = 3e-3, 3e-4
    cosine = [low + (top - low) * (1 + math.cos(math.pi * i / 4)) / 2 for i in range(4)]
    expected = {1: top / 2, 2: top, 3: cosine[0], 4: cosine[1], 5: cosine[2], 6: cosine[3]}
    got = step_metric(single, "lr")
    assert got.keys() == expected.keys()
    assert all(abs(got[k] - expected[k]) <= 1e-12 for k in expected), got


@pytest.mark.e2e
def test_a_changed_batch_geometry_on_resume_continues_from_the_same_sample_position(tmp_path):
    token_data = make_token_data(tmp_path / "data", documents=14)  # a short epoch, so it wraps in a few steps
    run_dir = tmp_path / "run"
    common = dict(MAX_STEPS="6", VALIDATE_EVERY_X_STEPS="0", SAVE_EVERY_X_STEPS="0")
    train(write_env(tmp_path / "a.env", token_data, run_dir, **common), "--stop-step", "3")  # 4 samples per step
    bigger = write_env(tmp_path / "b.env", token_data, run_dir, MAX_BATCH_SIZE="8", TOTAL_BATCH_SIZE="1024",
                       **common)  # 32 samples of 32 tokens per step
    out = train(bigger, "--pretrain_checkpoint", str(run_dir / "checkpoints" / "step_000003.pt")).stdout
    assert "batch geometry changed: 128 -> 1,024 token positions per step" in out

    state = read_checkpoint(run_dir / "checkpoints" / "step_000006.pt")["dataloader"]
    samples = (json.loads((token_data / "manifest.json").read_text())["splits"]["train"]["num_tokens"] - 1) // 32
    position, epoch = 0, 0
    for per_step in [4] * 3 + [32] * 3:  # the documented rule, by hand: wrap at a step's start when short
        position, epoch = (0, epoch + 1) if position + per_step > samples else (position, epoch)
        position += per_step
    assert (state["epoch"], state["position"]) == (epoch, position) and epoch >= 1
    # ... and the final checkpoint resumes (the old loader wrote one that refused to load)
    train(write_env(tmp_path / "c.env", token_data, run_dir, MAX_BATCH_SIZE="8", TOTAL_BATCH_SIZE="1024",
                    MAX_STEPS="7", VALIDATE_EVERY_X_STEPS="0"),
          "--pretrain_checkpoint", str(run_dir / "checkpoints" / "step_000006.pt"))


@pytest.mark.e2e
def test_a_fresh_run_never_overwrites_another_run_in_its_run_dir(tmp_path, token_data, single):
    run_dir = tmp_path / "run"
    shutil.copytree(single, run_dir)  # a finished run: its metrics and its step-6 checkpoint
    env = write_env(tmp_path / "run.env", token_data, run_dir, VALIDATE_EVERY_X_STEPS="0")
    before = (run_dir / "checkpoints" / "step_000006.pt").read_bytes()
    again = subprocess.run([sys.executable, str(ROOT / "train.py"), "--env_file", str(env)], cwd=tmp_path,
                           capture_output=True, text=True, env=clean_env(), timeout=60)
    assert again.returncode == 2 and len(again.stderr.strip().splitlines()) == 1
    assert re.search(r"RUN_DIR .* already holds a run .* resume it with --checkpoint .*step_000006\.pt.*"
                     r"--overwrite", again.stderr)
    assert (run_dir / "checkpoints" / "step_000006.pt").read_bytes() == before
    # A restarted schedule from this run's own checkpoint would write over its step files: refused too...
    restart = subprocess.run([sys.executable, str(ROOT / "train.py"), "--env_file", str(env), "--pretrain_checkpoint",
                              str(run_dir / "checkpoints" / "step_000006.pt"), "--reset-optimizer", "--start-step",
                              "0"], cwd=tmp_path, capture_output=True, text=True, env=clean_env(), timeout=60)
    assert restart.returncode == 2 and "checkpoints after step 0" in restart.stderr
    # ... unless asked, and then the checkpoint it has just written is never the one deleted.
    out = train(env, "--pretrain_checkpoint", str(run_dir / "checkpoints" / "step_000006.pt"), "--reset-optimizer",
                "--start-step", "0", "--overwrite").stdout
    assert "--overwrite: removed" in out
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step_*.pt")) == ["step_000006.pt"]
    assert read_checkpoint(run_dir / "checkpoints" / "step_000006.pt")["step"] == 6


@pytest.mark.e2e
def test_retention_keeps_the_last_checkpoints_written_past_step_999999(tmp_path, token_data):
    run_dir = tmp_path / "run"
    env = write_env(tmp_path / "run.env", token_data, run_dir, MAX_STEPS="1000001", WARMUP_STEPS="1",
                    VALIDATE_EVERY_X_STEPS="0", SAVE_EVERY_X_STEPS="1", KEEP_LAST_CHECKPOINTS="2")
    train(env, "--start-step", "999998")
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step_*.pt")) == ["step_1000000.pt",
                                                                                  "step_1000001.pt"]


@pytest.mark.e2e
def test_a_run_split_into_time_boxes_validates_and_stops_as_the_whole_run_does(tmp_path, token_data):
    """Early stopping on a flat loss (a learning rate below float32's resolution leaves the weights, hence the
    validation loss, unchanged): the run stops when the patience runs out, and the boxes must not add
    validations of their own, which would count towards the patience and stop the run early."""
    flat = dict(MAX_LR="1e-12", MIN_LR="1e-12", VALIDATE_EVERY_X_STEPS="2", EARLY_STOPPING_PATIENCE="2",
                MAX_STEPS="8", SAVE_EVERY_X_STEPS="0")
    whole, boxed = tmp_path / "whole", tmp_path / "boxed"
    assert "early stopping" in train(write_env(tmp_path / "w.env", token_data, whole, **flat)).stdout
    env = write_env(tmp_path / "b.env", token_data, boxed, **flat)
    # a box ending at step 3, between the validations at 2 and 4: one of its own there would show in val_loss,
    # and the patience already spent at step 2 must come back for the run to stop at 4 as the whole run does
    train(env, "--stop-step", "3")
    last = train(env, "--pretrain_checkpoint", str(boxed / "checkpoints" / "step_000003.pt")).stdout
    assert "early stopping" in last
    assert step_metric(boxed, "val_loss") == step_metric(whole, "val_loss")
    # validations at steps 0 (before training: the best), 2 and 4 (no better): patience 2 runs out at step 4,
    # and the step it stops at is saved
    val = step_metric(whole, "val_loss")
    assert sorted(val) == [0, 2, 4] and len(set(val.values())) == 1 and max(step_metric(whole)) == 4
    assert (whole / "checkpoints" / "step_000004.pt").is_file() and max(step_metric(boxed)) == 4
    assert all(torch.equal(a, b) for a, b in zip(final_weights(whole).values(), final_weights(boxed).values()))


# Runs in its own interpreter: a DDP reducer holding a Python communication hook, freed in the pytest process
# after its gloo group was destroyed, deadlocked a later test (the gloo worker join waited for the GIL).
COUNT_REDUCTIONS = """
import sys, types
import torch, torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
sys.path.insert(0, sys.argv[1])
import train
from config import Config
from distributed import DistInfo
from model import ModelArgs, Transformer
from stages import Setting, Stage

dist.init_process_group("gloo", store=dist.FileStore(sys.argv[2], 1), rank=0, world_size=1)
torch.manual_seed(0)
model = Transformer(ModelArgs(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=64, multiple_of=32, max_seq_len=16))
ddp = DDP(model)
reductions = []

def count(state, bucket):
    reductions.append(1)
    fut = torch.futures.Future()
    fut.set_result(bucket.buffer())
    return fut

ddp.register_comm_hook(None, count)
cfg = Config(training_precision="fp32", grad_clip=0.0)
d = DistInfo(0, 0, 1, torch.device("cpu"))
stage = Stage(Setting(cfg, d, 2, None, 64))
optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
batch = lambda: {"tokens": torch.randint(0, 64, (2, 16)), "targets": torch.randint(0, 64, (2, 16)),
                 "input_tokens": torch.tensor(32)}
stop = types.SimpleNamespace(requested=False)
scaler = torch.amp.GradScaler("cpu", enabled=False)
for micro_batches in (1, 3):
    train.OptimizerStep(ddp, stage, optimizer, scaler, cfg, d)([batch() for _ in range(micro_batches)], 0.0, stop)
    print(len(reductions))
del ddp, stage
dist.destroy_process_group()
"""


@pytest.mark.e2e
def test_micro_steps_reduce_gradients_only_once_per_step_end_to_end(tmp_path):
    """OptimizerStep's own use of no_sync, seen by a DDP communication hook: three micro-batches reduce the
    gradients as often as one does."""
    out = subprocess.run([sys.executable, "-c", COUNT_REDUCTIONS, str(ROOT), str(tmp_path / "store")],
                         capture_output=True, text=True, timeout=120, env=clean_env())
    assert out.returncode == 0, out.stderr[-2000:]
    once, total = map(int, out.stdout.split())
    assert once >= 1 and total == 2 * once


@pytest.mark.e2e  # torch.compile: tens of seconds
def test_micro_steps_skip_the_gradient_all_reduce_under_compile_too(one_rank_group):
    """COMPILE wraps the DDP model; the last micro-step alone must reduce gradients across ranks."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    import train as train_module

    ddp = DDP(torch.nn.Linear(4, 4))
    for model in (ddp, torch.compile(ddp)):
        with train_module.gradient_sync(model, enabled=False):
            assert not ddp.require_backward_grad_sync
        with train_module.gradient_sync(model, enabled=True):
            assert ddp.require_backward_grad_sync


BAD_SETUPS = [
    ({"TOTAL_BATCH_SIZE": "100"}, [], r"TOTAL_BATCH_SIZE=100 is not a multiple of .* = 64"),
    ({"PRETRAIN_DATA_DIR": "missing"}, [], r"missing.*load_pretrain_dataset\.py"),
    ({"GENERATION_PROMPTS_FILE": "nope.txt"}, [], r"GENERATION_PROMPTS_FILE='nope.txt': file not found"),
    ({}, ["--pretrain_checkpoint", "nope.pt"], r"--pretrain_checkpoint nope\.pt: not found \(expected a checkpoint"),
    ({"TRAINING_STAGE": "dpo", "DPO_DATA_DIR": "none"}, [], r"data directory none does not exist.*load_dpo_dataset"),
    ({"TRAINING_STAGE": "sft", "INSTRUCT_DATA_DIR": "none"}, [], r"none does not exist.*load_instruct_dataset"),
    ({"TRAINING_PRECISION": "fp16", "DEVICE": "cpu"}, [], r"TRAINING_PRECISION=fp16 is invalid on CPU.*expected auto, bf16 or fp32"),
    ({"GENERATION_PROMPTS_FILE": "long.txt"}, [], r"prompt 2 has \d+ tokens, but MAX_SEQ_LEN=32 leaves no room"),
]

# Each case is train.py's main in a directory of its own, all in one process (a process costs about 7 s
# of imports and teardown on a 2-core CPU): its exit code and everything written to file descriptor 2.
RUN_MAINS = """
import json, os, sys, tempfile
sys.path.insert(0, sys.argv[1])
import train
results = []
for directory, argv in json.loads(sys.argv[2]):
    os.chdir(directory)
    with tempfile.TemporaryFile() as err:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(err.fileno(), 2)
        try:
            code = train.main(argv)
        except SystemExit as e:
            code = e.code
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
        err.seek(0)
        results.append([code, err.read().decode()])
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def bad_setups(tmp_path_factory, token_data) -> list[tuple[int, str]]:
    """(exit code, stderr) of train.py started with each of BAD_SETUPS."""
    cases = []
    for i, (overrides, args, _) in enumerate(BAD_SETUPS):
        case = tmp_path_factory.mktemp(f"bad{i}")
        write_env(case / "bad.env", token_data, case / "run", **overrides)
        (case / "long.txt").write_text("A short prompt\n" + "word " * 40 + "\n")
        cases.append((str(case), ["--env_file", "bad.env", *args]))
    out = subprocess.run([sys.executable, "-c", RUN_MAINS, str(ROOT), json.dumps(cases)], capture_output=True,
                         text=True, env=clean_env(), timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return [tuple(r) for r in json.loads(out.stdout.strip().splitlines()[-1])]


@pytest.mark.parametrize("case", range(len(BAD_SETUPS)), ids=[m for _, _, m in BAD_SETUPS])
@pytest.mark.e2e
def test_bad_setup_stops_with_one_clear_line(bad_setups, case):
    code, stderr = bad_setups[case]
    assert code == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and re.search(BAD_SETUPS[case][2], lines[0]), stderr


@pytest.mark.e2e
def test_checkpoint_from_another_model_shape_is_refused(tmp_path, token_data, single):
    wider = write_env(tmp_path / "b.env", token_data, tmp_path / "run2", DIM="128", MAX_STEPS="2")
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), "--env_file", str(wider), "--pretrain_checkpoint",
                             str(single / "checkpoints" / "step_000006.pt")], cwd=tmp_path, capture_output=True,
                            text=True, env=clean_env(), timeout=60)
    assert result.returncode == 2 and "model shape" in result.stderr and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.e2e
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


def test_the_model_is_built_on_its_device_not_on_the_host_first():
    """Parameters are created where they train (here 'meta', which has no storage: a host copy would need it)."""
    import train as train_module
    from config import Config

    cfg = Config(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=32)
    on_meta = train_module.build_model(cfg, 256, torch.device("meta"))
    assert {p.device.type for p in on_meta.parameters()} == {"meta"}
    a, b = (train_module.build_model(cfg, 256, torch.device("cpu")) for _ in range(2))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))  # seeded


def test_a_fixed_gpu_under_torchrun_is_refused(monkeypatch):
    from distributed import setup_distributed

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match=r"DEVICE=cuda:1 would put every torchrun rank on one GPU.*LOCAL_RANK"):
        setup_distributed("cuda:1")


def test_step_flops_count_the_output_layer_only_where_targets_are_and_skip_frozen_weight_gradients():
    """6 FLOPs per parameter and token (2 forward, 2 input gradient, 2 weight gradient) plus attention; a frozen
    matrix needs no weight gradient (4), and positions without a target never meet the output layer."""
    import lora
    from model import ModelArgs, Transformer
    from train import StepFlops

    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=1000, multiple_of=32, max_seq_len=32)
    model = Transformer(args)
    flops = StepFlops.of(model, 32)
    assert flops.body + flops.head == model.flops_per_token(32) and flops.head == 6 * 64 * 1000
    assert flops.per_step(100, 10) == flops.body * 100 + flops.head * 10
    lora.apply_lora(model, lora.LoRASettings(rank=4, alpha=8.0, dropout=0.0, targets=["wq", "w2"]))
    adapted = StepFlops.of(model, 32)
    frozen_blocks = sum(p.numel() for n, p in model.named_parameters() if n.startswith("layers") and p.dim() == 2
                        and not p.requires_grad)
    adapters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert adapted.head == 4 * 64 * 1000
    assert adapted.body == flops.body - 2 * frozen_blocks + 6 * adapters
