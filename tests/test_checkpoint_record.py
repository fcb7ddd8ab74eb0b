"""The checkpoint record: version-1 files as today's users have them load as they are, unknown versions are
refused in one line, a weights-only start reads its file once, and --checkpoint lets the recorded stage decide
between a resume and a weights-only start."""

from dataclasses import asdict
from pathlib import Path

import pytest
import torch

import train
from checkpoint import Checkpoint, CheckpointError, WeightSource, load_model
from config import Config
from model import ModelArgs, Transformer

SHAPE = dict(dim=16, n_layers=1, n_heads=2, n_kv_heads=1, multiple_of=16, max_seq_len=32)
CPU = torch.device("cpu")


def old_writer_checkpoint(path: Path, tok, stage: str = "pretrain", step: int = 10, version=1, **more) -> dict:
    """A checkpoint as the writer before the record wrote it: a plain dict through torch.save, every field a step
    checkpoint of train.py held. Returns the dict."""
    torch.manual_seed(0)
    model = Transformer(ModelArgs(**SHAPE, vocab_size=tok.n_words))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.zeros(1, 4, dtype=torch.long))[0].float().sum().backward()  # so the optimizer has state
    optimizer.step()
    d = {"format": "llama3-trainer-checkpoint", "version": version, "model_args": asdict(model.args),
         "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": {}, "step": step,
         "stage": stage, "init": None, "best_val_loss": 2.5, "validations_without_improvement": 1,
         "wandb_run_id": "abc", "dataloader": {"position": 7, "epoch": 0}, "rng": {"torch": torch.get_rng_state()},
         "config": {"seed": 7}, "tokenizer": tok.identity(), "tokenizer_path": str(tok.path), "world_size": 1,
         "tokens_per_step": 64, **more}
    torch.save(d, path)
    return d


def config(stage: str) -> Config:
    return Config(training_stage=stage, training_precision="fp32", **{k: v for k, v in SHAPE.items()})


def test_a_version_1_file_written_the_old_way_loads_with_every_field_and_writes_back_the_same(tmp_path, tok):
    old = old_writer_checkpoint(tmp_path / "old.pt", tok)
    record = Checkpoint.read(tmp_path / "old.pt")
    assert record.stage == "pretrain" and record.training.step == 10 and record.training.tokens_per_step == 64
    assert record.model_args == ModelArgs(**old["model_args"]) and record.tokenizer == tok.identity()
    model = load_model(tmp_path / "old.pt")
    assert all(torch.equal(v, old["model"][k]) for k, v in model.state_dict().items())
    record.write(tmp_path / "again.pt")
    again = torch.load(tmp_path / "again.pt", weights_only=True)
    assert set(again) == set(old)  # every field a resume reads survives a round trip
    for key in ("model_args", "step", "stage", "init", "best_val_loss", "validations_without_improvement",
                "wandb_run_id", "dataloader", "config", "tokenizer", "tokenizer_path", "world_size", "tokens_per_step"):
        assert again[key] == old[key], key
    assert torch.equal(again["rng"]["torch"], old["rng"]["torch"])
    assert all(torch.equal(again["optimizer"]["state"][0][k], v) for k, v in old["optimizer"]["state"][0].items())


@pytest.mark.parametrize("version", [2, None])
def test_an_unknown_version_is_refused_in_one_line_naming_the_file_its_version_and_what_this_code_reads(
        tmp_path, tok, version):
    path = tmp_path / "future.pt"
    old_writer_checkpoint(path, tok, version=version)
    for read in (load_model, Checkpoint.read, WeightSource.open):
        with pytest.raises(CheckpointError) as e:
            read(path)
        message = str(e.value)
        assert "\n" not in message and str(path) in message
        assert f"version {version!r}" in message and "reads version 1" in message


def test_a_weights_only_start_reads_its_file_once(tmp_path, tok, monkeypatch):
    path = tmp_path / "pretrain.pt"
    old_writer_checkpoint(path, tok)
    loads = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda f, *a, **k: loads.append(Path(f)) or real_load(f, *a, **k))
    cfg = config("sft")
    start = train.Start.from_args(train.parse_args(["--checkpoint", str(path)]), cfg)
    train.initial_model(cfg, start, tok, tok.n_words, CPU, None)
    assert loads == [path]


def test_checkpoint_of_another_stage_starts_from_its_weights_at_step_0_and_says_so(tmp_path, tok):
    path = tmp_path / "pretrain.pt"
    old = old_writer_checkpoint(path, tok)
    cfg = config("sft")
    start = train.Start.from_args(train.parse_args(["--checkpoint", str(path)]), cfg)
    assert not start.resume and start.line == f"starting from the weights of a pretrain checkpoint {path}"
    initial = train.initial_model(cfg, start, tok, tok.n_words, CPU, None)
    assert initial.ckpt is None and initial.note.startswith(start.line + " (step 0, fresh optimizer")
    assert all(torch.equal(v, old["model"][k]) for k, v in initial.model.state_dict().items())


def test_checkpoint_of_the_running_stage_with_training_state_resumes_at_its_step(tmp_path, tok):
    path = tmp_path / "sft.pt"
    old = old_writer_checkpoint(path, tok, stage="sft", step=4)
    cfg = config("sft")
    start = train.Start.from_args(train.parse_args(["--checkpoint", str(path)]), cfg)
    assert start.resume and start.line == f"resuming sft from {path} at step 4"
    initial = train.initial_model(cfg, start, tok, tok.n_words, CPU, None)
    assert initial.ckpt.training.step == 4 and initial.ckpt.training.dataloader == old["dataloader"]
    assert all(torch.equal(v, old["model"][k]) for k, v in initial.model.state_dict().items())


def test_checkpoint_works_for_a_stage_without_a_flag_of_its_own_and_the_stage_flags_name_it(tmp_path, tok):
    """A stage added to the registry later (here a checkpoint recording "orpo") needs no flag: --checkpoint takes
    it as weights in another stage; a --<stage>_checkpoint flag refuses it, naming --checkpoint."""
    path = tmp_path / "orpo.pt"
    old_writer_checkpoint(path, tok, stage="orpo")
    start = train.Start.from_args(train.parse_args(["--checkpoint", str(path)]), config("pretrain"))
    assert not start.resume and "a orpo checkpoint" in start.line
    with pytest.raises(train.SetupError, match=r"this is a orpo checkpoint; pass it as --checkpoint$"):
        train.Start.from_args(train.parse_args(["--pretrain_checkpoint", str(path)]), config("pretrain"))


def test_the_stage_flags_keep_refusing_another_stages_checkpoint_by_its_flag(tmp_path, tok):
    path = tmp_path / "sft.pt"
    old_writer_checkpoint(path, tok, stage="sft")
    with pytest.raises(train.SetupError, match=r"this is a sft checkpoint; pass it as --instruct_checkpoint$"):
        train.Start.from_args(train.parse_args(["--dpo_checkpoint", str(path)]), config("dpo"))
    with pytest.raises(train.SetupError, match=r"give one starting point, not --checkpoint and --instruct_checkpoint"):
        train.Start.from_args(train.parse_args(["--checkpoint", str(path), "--sft_checkpoint", str(path)]),
                              config("dpo"))
    start = train.Start.from_args(train.parse_args(["--instruct_checkpoint", str(path)]), config("dpo"))
    assert not start.resume and start.path == str(path)
