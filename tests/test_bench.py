"""bench.py runs end to end as users start it and reports every section. Speed is not judged here:
the figures come from a tiny model on a shared machine; only that each was measured and is positive.

The run imitates a CPU without bf16 (ONEDNN_MAX_CPU_ISA=AVX2), whatever this machine has, so its duration
does not depend on the CPU: bf16 rows must then say they were not run. Rows of a bf16 run are checked by
re-rendering a saved full run (bench_cpu_small.json, measured on a CPU with bf16)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import bench

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("saved", ["bench_cpu_small.json", "bench_cpu_small_no_bf16.json"])
def test_saved_full_run_renders_to_its_own_table(saved):
    report = json.loads((ROOT / saved).read_text())
    assert bench.format_table(report) == report["table"]


@pytest.mark.e2e
def test_quick_run_prints_the_table_and_writes_every_figure(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "bench.py", "--preset", "tiny", "--quick", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    for heading in ("training step", "generation", "training variants, fp32", "data preparation", "2 vs 1 workers",
                    "after start-up", "machine ceiling"):
        assert heading in proc.stdout

    report = json.loads(out.read_text())
    assert report["table"] == proc.stdout.strip()
    env = report["environment"]
    assert env["date"] and env["cpu"] and env["cpu_cores"] >= 1 and env["torch"] and env["device"] == "cpu"
    assert report["config"]["preset"] == "tiny" and report["config"]["flops_per_token"] > 0

    assert report["train"]["bf16"] == report["generate"]["bf16"] == {
        "not_run": "no native bf16 on this CPU (oneDNN has no bf16 kernels for it)"}
    assert "bf16 autocast" in proc.stdout and "not run    no native bf16 on this CPU" in proc.stdout
    for precision in ("fp32",):
        train = report["train"][precision]
        assert train["matmul_peak_flops"] > 0 and train["ratio"] > 0
        for kind in ("ours", "hf"):
            side = train[kind]
            assert side["tokens_per_s"] > 0 and side["peak_memory_mib"] > 0
            assert side["mfu_measured_peak"] is None or 0 < side["mfu_measured_peak"] <= 1
        # same weights, same batch: the first timed step starts from nearly the same loss
        assert abs(train["ours"]["losses"][0] - train["hf"]["losses"][0]) < 0.1

        gen = report["generate"][precision]
        assert gen["ours"]["tokens_per_s"] > 0 and gen["hf"]["tokens_per_s"] > 0 and gen["ratio"] > 0

    variants = report["variants"]
    assert variants["precision"] == "fp32"  # what auto picks without native bf16
    for name in ("packed", "lora", "dpo", "dpo_precomputed", "distill"):
        v = variants[name]
        assert v["tokens_per_s"] > 0 and v["baseline_tokens_per_s"] > 0 and v["peak_memory_mib"] > 0
        assert v["speed_ratio"] == pytest.approx(v["tokens_per_s"] / v["baseline_tokens_per_s"])
    assert variants["lora"]["trainable"] < variants["lora"]["params"] == variants["packed"]["trainable"]

    data = report["data_prep"]
    for name in ("plain_loop", "plain_loop_2_processes", "writer_1_worker", "writer_2_workers"):
        assert data[name]["tokens_per_s"] > 0
    assert data["same_token_count"] and data["scaling_2_vs_1"] > 0
    rounds = report["config"]["rounds"]["data_prep"]
    assert len(data["scaling_per_round"]) == rounds == len(data["writer_1_worker"]["seconds"])
    paired = sorted(one / two for one, two in zip(data["writer_1_worker"]["seconds"],
                                                  data["writer_2_workers"]["seconds"]))
    assert data["scaling_2_vs_1"] == pytest.approx(paired[len(paired) // 2])
    ceiling = sorted(one / two for one, two in zip(data["plain_loop"]["seconds"],
                                                   data["plain_loop_2_processes"]["seconds"]))
    assert data["ceiling_2_vs_1"] == pytest.approx(ceiling[len(ceiling) // 2])
    for name in ("writer_1_worker", "writer_2_workers"):  # start-up ends within the run, the rest is measured
        assert all(0 < start_up < whole for start_up, whole in zip(data[name]["start_up_seconds"], data[name]["seconds"]))
        assert all(rate > 0 for rate in data[name]["after_start_up_tokens_per_s"])
    steady = sorted(two / one for one, two in zip(data["writer_1_worker"]["after_start_up_tokens_per_s"],
                                                  data["writer_2_workers"]["after_start_up_tokens_per_s"]))
    assert data["steady_scaling_2_vs_1"] == pytest.approx(steady[len(steady) // 2])


def variant(name: str) -> "bench.VariantRunner":
    runner = bench.VariantRunner(f"ours:{name}", bench.Plan(preset="tiny", device="cpu", batch=2, seq_len=64,
                                                            compile=False, prompt_len=8, new_tokens=8))
    runner.setup_training("fp32")
    return runner


def test_packed_sft_variant_trains_only_the_answers_through_the_stage_loss(one_torch_thread):
    """Independent of the chunked trained-rows head: cross-entropy of the plain forward's full logits, over the
    positions that have a target."""
    import torch
    import torch.nn.functional as F

    runner = variant("packed")
    batch = runner.batch
    trained = batch["targets"] != -100
    assert 0.08 < trained.float().mean().item() < 0.2  # SFT trains the answers: about a tenth of the positions
    assert torch.equal(batch["trained_rows"], trained.flatten().nonzero().squeeze(1))
    with torch.no_grad():
        logits, _ = runner.model(batch["tokens"], **runner.stage.inputs(batch))
        expected = F.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten(), ignore_index=-100)
        assert runner._loss().item() == pytest.approx(expected.item(), rel=1e-5)


def test_dpo_variant_scores_responses_only_and_starts_at_log_2(one_torch_thread):
    import math

    runner = variant("dpo")
    batch = runner.batch
    assert (batch["targets"][:, :32] == -100).all() and (batch["targets"][:, 32:] != -100).all()
    assert batch["pair_index"].tolist() == [0]  # 2 rows: one pair, chosen then rejected
    assert runner._loss().item() == pytest.approx(math.log(2), abs=1e-6)  # the policy is its own reference
