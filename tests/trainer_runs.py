"""Running train.py as users do, for the end-to-end tests: real processes, real shards, real checkpoints."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import shard_format
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


def make_token_data(out: Path, documents: int = 60) -> Path:
    """Shards of real text with the real tokenizer, written as shard_format defines them (6 documents of
    validation, the rest train)."""
    import pydoc_data.topics

    tok = Tokenizer()
    docs = [tok.encode(text, bos=True, eos=True) for _, text in sorted(pydoc_data.topics.topics.items())][:documents]
    streams = {"train": np.concatenate(docs[6:]), "val": np.concatenate(docs[:6])}
    out.mkdir(parents=True, exist_ok=True)
    shard_size, splits = 20_000, {}
    for split, stream in streams.items():
        shards = []
        for i, start in enumerate(range(0, len(stream), shard_size)):
            piece = stream[start:start + shard_size].astype(shard_format.TOKEN_DTYPE)
            shards.append(shard_format.token_shard_entry(split, i, piece))
            np.save(out / shards[-1]["file"], piece)
        splits[split] = {"num_tokens": len(stream), "shards": shards}
    shard_format.write_manifest(out, shard_format.build_token_manifest(tok, shard_size, splits, [], {}, ""))
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


UNTIMED = ("time", "tokens_per_s", "step_time_s", "data_share", "mfu", "io_share")  # figures that depend on time


def same_run(a: Path, b: Path) -> None:
    """Bit for bit: every logged record (steps, validations, samples) less what depends on time, and the final
    weights."""
    records = lambda run: [{k: v for k, v in json.loads(line).items() if k not in UNTIMED}  # noqa: E731
                           for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert records(a) == records(b)
    wa, wb = final_weights(a), final_weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def cut_at(run: Path, step: int, dest: Path) -> Path:
    """`run` as it stood when it had just saved its step-`step` checkpoint (it saves one there): that checkpoint
    and the records up to that step, copied into `dest`. Returns the checkpoint, for a resumed run in `dest`,
    which must then log every later record of `run` itself: compare them with same_run(run, dest)."""
    (dest / "checkpoints").mkdir(parents=True)
    ckpt = dest / "checkpoints" / f"step_{step:06d}.pt"
    shutil.copyfile(run / "checkpoints" / ckpt.name, ckpt)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (dest / "metrics.jsonl").write_text("".join(line + "\n" for line in lines if json.loads(line)["step"] <= step))
    return ckpt


def close_runs(a: Path, b: Path, tol: float = 1e-4) -> None:
    """Equal up to float reassociation: losses, gradient norms and final weights (2 ranks vs 1 process)."""
    for key in ("loss", "grad_norm"):
        x, y = step_metric(a, key), step_metric(b, key)
        assert x.keys() == y.keys() and all(abs(x[s] - y[s]) <= tol * max(1.0, abs(x[s])) for s in x), (key, x, y)
    wa, wb = final_weights(a), final_weights(b)
    assert max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa) <= tol
