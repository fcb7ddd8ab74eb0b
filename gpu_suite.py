"""The GPU suite: every CUDA check and the 1B figures in one run, for the few minutes a GPU is lent.

    ./bench_gpu.sh                 # on the GPU machine, with the project copied over (installs .whl/ first)
    ./bench_gpu.sh --dry-run       # the same steps on this CPU with tiny shapes and step counts: a rehearsal

Parts, in order, each stopped at its budget (seconds on an H100; all of them together under 8 minutes):

    environment        20   GPU, versions, the packages the project imports (bench_gpu.sh installs them first)
    tests             140   tests/test_cuda.py: kernels, stages on CUDA = CPU, fp16, compile, NCCL, resume, FSDP2
    bench_eager        60   bench.py --preset 1b, bf16, T=2048, eager: ours vs transformers (SDPA), tokens/s, MFU
                            against the datasheet peak, peak memory; greedy decoding at batch 1 and 16
    bench_compiled    110   the same training step, both models under torch.compile
    train             150   train.py, the 1b shape on the default corpus: 200 steps, checkpoint at 100; a second
                            run resumed from it must log steps 101-200 as the first did, bit for bit

Every figure goes into --json (bench_gpu_1b.json), rewritten after each part, so a part that runs out of time
leaves the others' figures; the output of every command goes to the log beside it. Where $OUT is set (the
device tool brings back what is written there), both are copied there after every part, with the metrics of
the two training runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent
BUDGETS = {"environment": 20, "tests": 140, "bench_eager": 60, "bench_compiled": 110, "train": 150}
DRY_RUN_BUDGET = 1200  # seconds per part on a 2-core CPU: the rehearsal checks the flow, not the time
# Targets of issue 27 (anchors: torchtitan 33-39% MFU on Llama 3.1 8B on H100)
TARGETS = {"compiled_bf16_mfu": 0.45, "compiled_bf16_vs_transformers": 1.3, "decode_batch_1_vs_transformers": 1.5}


@dataclass(frozen=True)
class Shape:
    """What the suite runs at: the 1b preset on a GPU, tiny shapes and step counts in the dry run."""
    bench_args: tuple[str, ...]
    train_env: dict
    steps: int
    resume_at: int


def shapes(dry_run: bool) -> Shape:
    from model import PRESETS

    if dry_run:
        model = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "multiple_of": 32,
                 "tie_word_embeddings": True}
        return Shape(("--device", "cpu", "--preset", "tiny", "--quick"),
                     {**_env_keys(model), "MAX_SEQ_LEN": "64", "MAX_BATCH_SIZE": "2", "TOTAL_BATCH_SIZE": "128",
                      "WARMUP_STEPS": "2", "VALIDATION_STEPS": "2"}, steps=8, resume_at=4)
    return Shape(("--device", "cuda", "--preset", "1b"),
                 {**_env_keys(PRESETS["llama3.2-1b"]), "MAX_SEQ_LEN": "2048", "MAX_BATCH_SIZE": "2",
                  "TOTAL_BATCH_SIZE": "4096", "WARMUP_STEPS": "20", "MAX_LR": "3e-4", "MIN_LR": "3e-5",
                  "VALIDATION_STEPS": "4"}, steps=200, resume_at=100)


def _env_keys(model_args: dict) -> dict:
    return {k.upper(): str(v).lower() if isinstance(v, bool) else str(v) for k, v in model_args.items()}


# ---- running commands against a budget ----------------------------------------------------------------------
class Suite:
    def __init__(self, args: argparse.Namespace):
        self.dry_run, self.work = args.dry_run, Path(args.work_dir)
        self.json_path = Path(args.json)
        self.log_path = self.json_path.with_suffix(".log")
        self.out = Path(os.environ["OUT"]) if os.environ.get("OUT") else None
        self.log = open(self.log_path, "w", encoding="utf-8")
        self.report: dict = {"suite": "gpu_suite.py" + (" --dry-run" if self.dry_run else ""),
                             "budgets_s": BUDGETS, "parts": {}}
        self.started = time.perf_counter()

    def say(self, text: str) -> None:
        line = f"[{time.perf_counter() - self.started:6.1f}s] {text}"
        print(line, flush=True)
        self.log.write(line + "\n")
        self.log.flush()

    def budget(self, part: str) -> int:
        return DRY_RUN_BUDGET if self.dry_run else BUDGETS[part]

    def run(self, cmd: list[str], deadline: float, env: Optional[dict] = None) -> tuple[int, str]:
        """Run cmd, its output teed to the console and the log, until `deadline` (perf_counter); then its whole
        process group is ended. Returns (exit status, 124 on timeout, and the output)."""
        self.say("$ " + " ".join(cmd))
        proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        lines: list[str] = []

        def tee() -> None:
            for line in proc.stdout:
                lines.append(line)
                sys.stdout.write(line)
                self.log.write(line)
            self.log.flush()

        reader = threading.Thread(target=tee, daemon=True)
        reader.start()
        try:
            rc = proc.wait(timeout=max(1.0, deadline - time.perf_counter()))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = 124
            self.say(f"timed out: {' '.join(cmd[:3])} ran out of its part's budget")
        reader.join(timeout=10)
        return rc, "".join(lines)

    def part(self, name: str, fn) -> None:
        budget = self.budget(name)
        self.say(f"== {name} (budget {budget} s)")
        start = time.perf_counter()
        try:
            figures = fn(start + budget)
            status = figures.pop("status", "ok")
        except Exception as e:  # a part that breaks must not take the others' figures with it
            figures, status = {"error": f"{type(e).__name__}: {e}"}, "error"
        seconds = time.perf_counter() - start
        self.report["parts"][name] = {"status": status, "seconds": round(seconds, 1), "budget_s": budget, **figures}
        self.say(f"== {name}: {status} in {seconds:.0f} s")
        self.save()

    def save(self) -> None:
        self.report["seconds"] = round(time.perf_counter() - self.started, 1)
        self.report["targets"] = targets(self.report["parts"])
        write_atomically(self.json_path, json.dumps(self.report, indent=2) + "\n")
        if self.out is not None:  # the device tool brings back at most 8 files: these are 4
            self.log.flush()
            files = {p.name: p for p in (self.json_path, self.log_path)}
            files |= {f"{d.name}_metrics.jsonl": d / "metrics.jsonl" for d in self.work.glob("train_*") if d.is_dir()}
            self.out.mkdir(parents=True, exist_ok=True)
            for name, path in files.items():
                if path.is_file():
                    shutil.copyfile(path, self.out / name)


def write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


# ---- the parts --------------------------------------------------------------------------------------------------
def environment(suite: Suite, deadline: float) -> dict:
    import torch

    out = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "python": platform.python_version(),
           "torch": torch.__version__, "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
           "git_commit": os.environ.get("GIT_COMMIT")}
    if torch.cuda.is_available():
        out["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        out["bf16_supported"] = torch.cuda.is_bf16_supported()
    if shutil.which("nvidia-smi"):
        rc, text = suite.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.max.sm",
                              "--format=csv,noheader"], deadline)
        out["nvidia_smi"] = text.strip()
    imports = {}
    for module in ("dotenv", "datasets", "llama_models", "transformers", "tiktoken", "numpy", "tqdm"):
        rc, text = suite.run([sys.executable, "-c", f"import {module}; print(getattr({module}, '__version__', 'ok'))"],
                             deadline)
        imports[module] = text.strip().splitlines()[-1] if rc == 0 else f"missing: {text.strip().splitlines()[-1:]}"
    out["imports"] = imports
    missing = [m for m, v in imports.items() if v.startswith("missing")]
    if missing:
        out["status"] = f"error: cannot import {', '.join(missing)}"
    if not suite.dry_run and not torch.cuda.is_available():
        out["status"] = "error: no CUDA device"
    return out


TEST_LINE = re.compile(r"^(tests/test_cuda\.py::\S.*?) (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)\b")
FAILURE_LINE = re.compile(r"^(?:FAILED|ERROR) (tests/test_cuda\.py::.+?)(?: - (.*))?$")


def tests(suite: Suite, deadline: float) -> dict:
    env = {"TEST_CUDA_DEVICE": "cpu"} if suite.dry_run else {}
    rc, text = suite.run([sys.executable, "-m", "pytest", "-v", "-rfEs", "-p", "no:cacheprovider", "--durations=15",
                          "tests/test_cuda.py"], deadline, env)
    outcomes = {m.group(1): m.group(2) for m in map(TEST_LINE.match, text.splitlines()) if m}
    reasons = {m.group(1): m.group(2) for m in map(FAILURE_LINE.match, text.splitlines()) if m and m.group(2)}
    counts = {k: list(outcomes.values()).count(k) for k in ("PASSED", "FAILED", "ERROR", "SKIPPED")}
    status = "timeout" if rc == 124 else "ok" if rc == 0 else "failed"
    return {"status": status, "exit_code": rc, "counts": counts, "outcomes": outcomes, "failures": reasons,
            "summary": text.strip().splitlines()[-1] if text.strip() else ""}


def bench(suite: Suite, deadline: float, compiled: bool) -> dict:
    mode = "compiled" if compiled else "eager"
    path = suite.work / f"bench_{mode}.json"
    extra = ["--compile", "--skip", "generate,variants,data_prep"] if compiled else \
        ["--no-compile", "--skip", "variants,data_prep", "--decode_batches", "1,16"]
    rc, _ = suite.run([sys.executable, "bench.py", *shapes(suite.dry_run).bench_args, "--precisions", "bf16",
                       *extra, "--json", str(path)], deadline)
    if rc != 0 or not path.is_file():
        return {"status": "timeout" if rc == 124 else "failed", "exit_code": rc}
    report = json.loads(path.read_text())
    return {"figures": bench_figures(report), "report": report}


def bench_figures(report: dict) -> dict:
    """The figures the tables need, from one bench.py report."""
    t = report["train"]["bf16"]
    out = {"compile": report["config"]["compile"], "batch": report["config"]["batch"],
           "seq_len": report["config"]["seq_len"], "params": report["config"]["params"],
           "device": report["environment"]["device"], "nominal_peak_flops": t["nominal_peak_flops"],
           "matmul_peak_flops": t["matmul_peak_flops"], "ratio": t["ratio"], "first_step_loss": {}}
    for kind in ("ours", "hf"):
        out[kind] = {k: t[kind][k] for k in ("tokens_per_s", "peak_memory_mib", "mfu_nominal_peak", "mfu_measured_peak")}
        out["first_step_loss"][kind] = t[kind]["first_step_loss"]
    for key, g in report.get("generate", {}).items():
        if "not_run" not in g:
            out[f"decode_{key}"] = {"batch": g["batch"], "ours_tokens_per_s": g["ours"]["tokens_per_s"],
                                    "hf_tokens_per_s": g["hf"]["tokens_per_s"], "ratio": g["ratio"],
                                    "same_tokens": g["same_tokens"]}
    return out


def train(suite: Suite, deadline: float) -> dict:
    shape = shapes(suite.dry_run)
    data = suite.work / "data" / "pretrain"
    if not (data / "manifest.json").is_file():  # the default corpus: CPython's documentation
        rc, _ = suite.run([sys.executable, "load_pretrain_dataset.py", "--out_dir", str(data)], deadline)
        if rc != 0:
            return {"status": "failed", "step": "load_pretrain_dataset.py", "exit_code": rc}
    straight, resumed = suite.work / "train_straight", suite.work / "train_resumed"
    settings = {**shape.train_env, "PRETRAIN_DATA_DIR": str(data), "MAX_STEPS": str(shape.steps),
                "SAVE_EVERY_X_STEPS": str(shape.resume_at), "VALIDATE_EVERY_X_STEPS": str(shape.resume_at),
                "KEEP_LAST_CHECKPOINTS": "2", "GENERATE_EVERY_X_STEPS": "0", "GENERATION_MAX_NEW_TOKENS": "16",
                "LOG_EVERY_X_STEPS": str(max(1, shape.steps // 10)), "TRAINING_PRECISION": "auto",
                "WANDB_ENABLED": "false", "SEED": "1337"}
    out: dict = {"settings": settings}
    env = {"TQDM_DISABLE": "1"}  # a progress bar in a log is noise
    for run_dir, args in ((straight, []), (resumed, ["--pretrain_checkpoint",
                                                     str(straight / "checkpoints" / f"step_{shape.resume_at:06d}.pt")])):
        env_file = suite.work / f"{run_dir.name}.env"
        env_file.write_text("".join(f"{k}={v}\n" for k, v in {**settings, "RUN_DIR": str(run_dir)}.items()))
        start = time.perf_counter()
        rc, text = suite.run([sys.executable, "train.py", "--env_file", str(env_file), *args], deadline, env)
        out[run_dir.name] = {"exit_code": rc, "seconds": round(time.perf_counter() - start, 1),
                             **run_figures(run_dir, text)}
        if rc != 0:
            out["status"] = "timeout" if rc == 124 else "failed"
            return out
        if run_dir == straight:  # the resumed run needs only the checkpoint it starts from: 15 GB of disk back
            (straight / "checkpoints" / f"step_{shape.steps:06d}.pt").unlink(missing_ok=True)
    out["resume"] = compare_runs(straight, resumed, shape.resume_at)
    if not out["resume"]["bit_exact"]:
        out["status"] = "failed: the resumed run differs"
    return out


def metrics_of(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def run_figures(run_dir: Path, output: str) -> dict:
    records = metrics_of(run_dir)
    steps = [r for r in records if "loss" in r and "tokens_per_s" in r]
    timed = steps[2:] or steps  # the first steps pay for warm-up (cuBLAS handles, the allocator)
    out = {"steps_logged": len(steps), "first_lines": [line for line in output.splitlines()[:6]]}
    if steps:
        out |= {"first_loss": steps[0]["loss"], "last_loss": steps[-1]["loss"],
                "median_tokens_per_s": statistics.median(r["tokens_per_s"] for r in timed),
                "median_step_time_s": statistics.median(r["step_time_s"] for r in timed),
                "median_mfu": statistics.median(r["mfu"] for r in timed) if all(r.get("mfu") for r in timed) else None}
    out["val_loss"] = {r["step"]: r["val_loss"] for r in records if "val_loss" in r}
    return out


def compare_runs(straight: Path, resumed: Path, resume_at: int) -> dict:
    """The resumed run against the uninterrupted one over the steps after the checkpoint: every step's loss and
    gradient norm, bit for bit; the first resumed step shows whether the state came back (its loss is computed
    from the restored weights before any kernel of this run could round differently)."""
    a = {r["step"]: r for r in metrics_of(straight) if "loss" in r and r["step"] > resume_at}
    b = {r["step"]: r for r in metrics_of(resumed) if "loss" in r and r["step"] > resume_at}
    steps = sorted(a)
    diffs = {k: [abs(a[s][k] - b[s][k]) for s in steps if s in b] for k in ("loss", "grad_norm")}
    first = steps[0] if steps else None
    val = [{r["step"]: r["val_loss"] for r in metrics_of(run) if "val_loss" in r and r["step"] > resume_at}
           for run in (straight, resumed)]
    same = bool(steps) and sorted(a) == sorted(b) and val[0] == val[1] and all(
        a[s]["loss"] == b[s]["loss"] and a[s]["grad_norm"] == b[s]["grad_norm"] for s in steps)
    return {"steps": [first, steps[-1]] if steps else [], "same_steps": sorted(a) == sorted(b), "bit_exact": same,
            "first_step_equal": first is not None and first in b and a[first]["loss"] == b[first]["loss"],
            "val_loss": val,
            "max_loss_diff": max(diffs["loss"], default=None), "max_grad_norm_diff": max(diffs["grad_norm"], default=None),
            "straight_losses": [a[s]["loss"] for s in steps], "resumed_losses": [b[s]["loss"] for s in steps if s in b]}


def targets(parts: dict) -> dict:
    """Issue 27's targets against what has been measured so far (None: not measured)."""
    compiled = parts.get("bench_compiled", {}).get("figures", {})
    eager = parts.get("bench_eager", {}).get("figures", {})
    measured = {"compiled_bf16_mfu": (compiled.get("ours") or {}).get("mfu_nominal_peak"),
                "compiled_bf16_vs_transformers": compiled.get("ratio"),
                "decode_batch_1_vs_transformers": (eager.get("decode_bf16") or {}).get("ratio")}
    return {k: {"target": TARGETS[k], "measured": v, "met": None if v is None else v >= TARGETS[k]}
            for k, v in measured.items()}


# ---- command line ---------------------------------------------------------------------------------------------
def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="the same steps on the CPU, tiny shapes and step counts")
    p.add_argument("--json", default=None, help="the report (default: bench_gpu_1b.json; dry run: in the work dir)")
    p.add_argument("--work-dir", default=None,
                   help="scratch space for data, runs and checkpoints (30 GB at the 1b shape; default: runs/bench_gpu, "
                        "dry run: a new temporary directory)")
    p.add_argument("--parts", default=",".join(BUDGETS), help=f"comma-separated, of {','.join(BUDGETS)}")
    p.add_argument("--overwrite", action="store_true", help="reuse a work dir that holds an earlier suite's files")
    args = p.parse_args(argv)
    args.parts = [part for part in args.parts.split(",") if part]
    if any(part not in BUDGETS for part in args.parts):
        p.error(f"--parts {','.join(args.parts)}: expected a comma-separated list of {', '.join(BUDGETS)}")
    if args.work_dir is None:
        args.work_dir = tempfile.mkdtemp(prefix="bench-gpu-dry-run-") if args.dry_run else str(ROOT / "runs" / "bench_gpu")
    work = Path(args.work_dir)
    if args.json is None:
        args.json = str(work / "bench_gpu_dry_run.json") if args.dry_run else str(ROOT / "bench_gpu_1b.json")
    in_the_way = [str(p) for p in (work, Path(args.json)) if p.is_file() or (p.is_dir() and any(p.iterdir()))]
    if in_the_way and not args.overwrite:
        p.error(f"{' and '.join(in_the_way)} already hold an earlier suite's results: pass --overwrite to replace them")
    if work.is_dir():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    return args


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    suite = Suite(args)
    suite.say(f"gpu_suite: parts {', '.join(args.parts)}; work dir {suite.work}; report {suite.json_path}")
    parts = {"environment": environment, "tests": tests, "bench_eager": lambda s, d: bench(s, d, compiled=False),
             "bench_compiled": lambda s, d: bench(s, d, compiled=True), "train": train}
    for name in args.parts:
        suite.part(name, lambda deadline, fn=parts[name]: fn(suite, deadline))
    statuses = {name: part["status"] for name, part in suite.report["parts"].items()}
    suite.say(f"done in {suite.report['seconds']:.0f} s: " + ", ".join(f"{k} {v}" for k, v in statuses.items()))
    suite.say("targets: " + json.dumps(suite.report["targets"]))
    suite.log.close()
    return 0 if all(status == "ok" for status in statuses.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
