"""bench.py runs end to end as users start it and reports every section. Speed is not judged here:
the figures come from a tiny model on a shared machine; only that each was measured and is positive, and
that the offload row's two sides trained through the same steps.

The run imitates a CPU without bf16 (ONEDNN_MAX_CPU_ISA=AVX2), whatever this machine has, so its duration
does not depend on the CPU: bf16 rows must then say they were not run. Rows of a bf16 run are checked by
re-rendering a saved full run (bench_cpu_small.json, measured on a CPU with bf16). One quick run serves every
test that reads it."""

import json
import mmap
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

import bench

ROOT = Path(__file__).resolve().parents[1]
NO_BF16 = {"not_run": "no native bf16 on this CPU (oneDNN has no bf16 kernels for it)"}


@pytest.mark.parametrize("saved", ["bench_cpu_small.json", "bench_cpu_small_no_bf16.json"])
def test_saved_full_run_renders_to_its_own_table(saved):
    report = json.loads((ROOT / saved).read_text())
    assert bench.format_table(report) == report["table"]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> tuple[str, dict]:
    """`bench.py --preset tiny --quick` as a user starts it: (what it printed, the report it wrote)."""
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    proc = subprocess.run([sys.executable, "bench.py", "--preset", "tiny", "--quick", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=280,
                          env={**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout, json.loads(out.read_text())


@pytest.mark.e2e
def test_quick_run_prints_the_table_and_writes_every_figure(quick_run):
    stdout, report = quick_run
    for heading in ("training step", "generation", "training variants, fp32", "offload, seconds per step",
                    "data preparation", "2 vs 1 workers", "after start-up", "machine ceiling"):
        assert heading in stdout

    assert report["table"] == stdout.strip()
    env = report["environment"]
    assert env["date"] and env["cpu"] and env["cpu_cores"] >= 1 and env["torch"] and env["device"] == "cpu"
    assert report["config"]["preset"] == "tiny" and report["config"]["flops_per_token"] > 0

    assert report["train"]["bf16"] == report["generate"]["bf16"] == NO_BF16
    assert "bf16 autocast" in stdout and "not run    no native bf16 on this CPU" in stdout
    for precision in ("fp32",):
        train = report["train"][precision]
        assert train["matmul_peak_flops"] > 0 and train["ratio"] > 0
        for kind in ("ours", "hf"):
            side = train[kind]
            assert side["tokens_per_s"] > 0 and side["peak_memory_mib"] > 0
            assert side["mfu_measured_peak"] is None or 0 < side["mfu_measured_peak"] <= 1
            assert side["params"] == report["config"]["params"]  # the header counts the model that was timed
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


def first_sft_loss(method: str) -> float:
    """The loss of the offload row's first step, computed apart from the trainer's step: the model train.py builds
    for that .env (LoRA's B starts at zero, so its adapters change nothing yet), its full logits on the packed rows
    bench.py lays out, a plain cross-entropy over the answers' positions."""
    import torch
    import torch.nn.functional as F

    import lora
    from model import document_attention_mask
    from train import build_model

    cfg = bench.offload_config("tiny", "cpu", "fp32", method, "memory", "unused")
    model = build_model(cfg, bench.LLAMA3_VOCAB, torch.device("cpu"))
    if cfg.lora_enabled:
        lora.with_new_adapters(model, lora.LoRASettings.from_config(cfg), cfg.seed)
    window = torch.randint(0, bench.LLAMA3_VOCAB, (cfg.max_batch_size, cfg.max_seq_len + 1),
                           generator=torch.Generator().manual_seed(bench.SEED + 1))
    inputs, targets = bench.packed_sft(window[:, :-1], window[:, 1:])
    with torch.no_grad():
        logits, _ = model(inputs["tokens"], positions=inputs["positions"],
                          attn_mask=document_attention_mask(inputs["document_ids"]))
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100).item()


@pytest.mark.e2e
def test_offload_row_trains_the_same_steps_in_memory_and_streamed_from_disk(quick_run, one_torch_thread):
    stdout, report = quick_run
    offload = report["offload"]
    assert offload["runs"]["bf16"] == NO_BF16
    steps = report["config"]["rounds"]["train_warmup"] + report["config"]["rounds"]["train"]
    for method, label in (("full", "full fine-tuning, fp32"), ("full-all", "full, activations kept, fp32"),
                          ("lora", "LoRA r=16, fp32"), ("lora-all", "LoRA r=16, activations kept, fp32")):
        r = offload["runs"]["fp32"][method]
        memory, disk = r["memory"], r["disk"]
        # Offloading is exact, so equal figures step by step show both did the same work: the same first loss,
        # then the same update (the second step's loss moved from the first) and the same clipped gradients.
        assert len(memory["losses"]) == len(disk["losses"]) == steps >= 2
        assert memory["losses"] == disk["losses"] and memory["grad_norms"] == disk["grad_norms"] and r["same_steps"]
        assert memory["losses"][1] != memory["losses"][0]
        assert memory["losses"][0] == pytest.approx(first_sft_loss(method), rel=1e-5)
        assert memory["trainable"] == disk["trainable"]

        for side in (memory, disk):
            assert side["seconds_per_step"] == statistics.median(side["step_seconds"]) > 0
        assert memory["io_seconds"] == [0.0] * len(memory["step_seconds"])  # nothing is read from a store
        assert all(io > 0 for io in disk["io_seconds"])  # the first block is always waited for
        per_round = [d / m for m, d in zip(memory["step_seconds"], disk["step_seconds"])]
        assert r["ratio"] == pytest.approx(statistics.median(per_round))
        shares = [io / s for io, s in zip(disk["io_seconds"], disk["step_seconds"])]
        assert r["io_share"] == pytest.approx(statistics.median(shares)) and all(0 <= s <= 1 for s in shares)
        assert all(0 < share <= 1 for share in r["page_cache_share"].values())
        row = next(line for line in stdout.splitlines() if line.startswith(label))
        assert f"{r['ratio']:.2f}x" in row and bench._pct(r["io_share"]) in row and " yes " in row
    full, adapters = offload["runs"]["fp32"]["full"]["memory"], offload["runs"]["fp32"]["lora"]["memory"]
    assert adapters["trainable"] < full["trainable"] == offload["shape"]["params"]
    assert "of its pages in the page cache before and after the timed steps" in stdout


@pytest.mark.e2e
def test_a_report_of_the_offload_row_alone_renders_without_the_other_sections(quick_run):
    """What `--only offload` prints: the header and the offload row."""
    _, report = quick_run
    assert bench.parse_args(["--only", "offload"]).skip == ["train", "generate", "variants", "data_prep"]
    alone = {k: v for k, v in report.items() if k not in ("variants", "data_prep")} | {"train": {}, "generate": {}}
    lines = bench.format_table(alone).splitlines()
    assert lines[2] == "" and lines[3].startswith("offload, seconds per step")
    assert not any(line.startswith(("training step", "generation", "data preparation")) for line in lines)


def test_offload_micro_batches_make_the_row_accumulate_and_zero_is_refused(capsys):
    """--offload_micro_batches N: each optimizer step of the row takes N micro-batches of the preset's shape."""
    shape = bench.OFFLOAD_PRESETS["tiny"]
    cfg = bench.offload_config("tiny", "cpu", "fp32", "full", "memory", "unused", micro_batches=3)
    assert cfg.total_batch_size // (cfg.max_batch_size * cfg.max_seq_len) == 3
    assert (cfg.max_batch_size, cfg.max_seq_len) == (shape.batch, shape.seq_len)
    with pytest.raises(SystemExit):
        bench.parse_args(["--offload_micro_batches", "0"])
    assert "--offload_micro_batches 0: expected 1 or more" in capsys.readouterr().err


def test_page_cache_share_counts_the_pages_fincore_counts(tmp_path):
    """Half of a file's pages dropped from the page cache: the share agrees with util-linux's fincore."""
    fincore = shutil.which("fincore")
    if fincore is None:
        pytest.skip("util-linux's fincore is not installed")
    pages = 1024  # 4 MiB: the page cache may hold a file in folios of many pages, which drop only whole
    path = tmp_path / "unit.safetensors"
    with open(path, "wb") as f:
        f.write(os.urandom(pages * mmap.PAGESIZE))
        f.flush()
        os.fsync(f.fileno())  # clean pages: the kernel may drop them
        os.posix_fadvise(f.fileno(), 0, pages // 2 * mmap.PAGESIZE, os.POSIX_FADV_DONTNEED)
    out = subprocess.run([fincore, "--raw", "--noheadings", "--bytes", "--output", "PAGES", str(path)],
                         capture_output=True, text=True, check=True)
    resident = int(out.stdout.split()[0])
    if resident == pages:
        pytest.skip(f"{tmp_path} keeps dropped pages (tmpfs?): nothing to tell apart")
    assert bench.page_cache_share(tmp_path) == resident / pages < 1
    path.read_bytes()
    assert bench.page_cache_share(tmp_path) == 1.0


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
