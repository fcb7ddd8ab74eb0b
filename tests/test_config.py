"""Settings: precedence, types, and one clear line for every bad value."""

import re
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from config import Config, ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_apply_without_an_env_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DIM", raising=False)
    assert load_config().dim == Config().dim


def test_environment_beats_env_file_which_beats_defaults(tmp_path, monkeypatch):
    env = tmp_path / "run.env"
    env.write_text("DIM=512\nN_LAYERS=3\nFFN_DIM_MULTIPLIER=1.3\nUSE_SCALED_ROPE=yes\n")
    monkeypatch.setenv("N_LAYERS", "7")
    cfg = load_config(str(env))
    assert (cfg.dim, cfg.n_layers, cfg.ffn_dim_multiplier, cfg.use_scaled_rope) == (512, 7, 1.3, True)
    assert cfg.n_heads == Config().n_heads


def test_env_example_documents_every_key_and_loads_to_the_defaults(monkeypatch):
    text = (ROOT / ".env.example").read_text().splitlines()
    for key in Config.keys():
        # set, or shown commented out (the rotary keys: set, they replace a starting checkpoint's)
        line = next((i for i, l in enumerate(text) if l.startswith((f"{key}=", f"# {key}="))), None)
        assert line is not None, f"{key} missing from .env.example"
        assert text[line - 1].startswith("# ") and len(text[line - 1]) > 6, f"{key} has no comment"
        monkeypatch.delenv(key, raising=False)
    assert not [l for l in text if l.startswith(("ROPE_", "USE_SCALED_ROPE"))]  # none switches a checkpoint's off
    loaded = load_config(str(ROOT / ".env.example"))
    for f in fields(Config):
        if not f.metadata.get("derived"):
            assert getattr(loaded, f.name) == f.default, f.name


@pytest.mark.parametrize("line,key,expected", [
    ("N_LAYERS=abc", "N_LAYERS", "an integer"),
    ("TRAINING_STAGE=foo", "TRAINING_STAGE", "pretrain | sft | dpo"),
    ("TRAINING_STAGE=distill", "TRAINING_STAGE", "set IS_MODEL_DISTILLATION=true"),
    ("LORA_DROPOUT=1", "LORA_DROPOUT", "in [0, 1)"),
    ("DPO_LOSS=hinge", "DPO_LOSS", "sigmoid | ipo"),
    ("DIM=250", "DIM", "a multiple of N_HEADS"),
    ("N_KV_HEADS=3", "N_KV_HEADS", "a divisor of N_HEADS"),
    ("TOKENIZER_PATH=/no/such/tokenizer.model", "TOKENIZER_PATH", "an existing tokenizer.model"),
    ("USE_SCALED_ROPE=maybe", "USE_SCALED_ROPE", "true or false"),
    ("MAX_LR=fast", "MAX_LR", "a number"),
    ("MIN_LR=1.0", "MIN_LR", "<= MAX_LR"),
    ("TRAINING_PRECISION=fp8", "TRAINING_PRECISION", "bf16 | fp16 | fp32"),
    ("BETA2=1.5", "BETA2", "in [0, 1)"),
])
def test_bad_env_value_stops_train_with_one_line_naming_key_and_expectation(tmp_path, capsys, line, key, expected):
    # train.main is the CLI entry point; the subprocess test below shows the same path end to end.
    import train

    env = tmp_path / "bad.env"
    env.write_text(line + "\n")
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--env_file", str(env)])
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert key in lines[0] and expected in lines[0] and str(env) in lines[0]


@pytest.mark.e2e
def test_bad_env_value_from_the_command_line_prints_one_line_without_traceback(tmp_path):
    env = tmp_path / "bad.env"
    env.write_text("N_LAYERS=abc\n")
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), "--env_file", str(env)], cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr == f"config error: N_LAYERS='abc' is invalid: expected an integer (from {env})\n"


@pytest.mark.e2e
def test_missing_env_file_is_one_line(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), "--env_file", "nope.env"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and result.stderr.strip() == "config error: --env_file 'nope.env': file not found"


def test_unknown_key_is_reported_as_a_likely_typo(tmp_path, capsys):
    env = tmp_path / "typo.env"
    env.write_text("N_LAYER=3\n")
    load_config(str(env))
    assert re.search(r"unknown key N_LAYER .*typo", capsys.readouterr().err)


def test_config_error_names_key_in_python_api_too():
    with pytest.raises(ConfigError, match=r"^DIM=100 is invalid: expected a multiple of N_HEADS \(8\)"):
        load_config(overrides={"DIM": "100"})


def test_a_bad_value_from_the_environment_is_not_blamed_on_the_env_file(tmp_path, monkeypatch):
    env = tmp_path / "run.env"
    env.write_text("MAX_LR=0.001\n")
    monkeypatch.setenv("MAX_LR", "abc")
    with pytest.raises(ConfigError, match=r"^MAX_LR='abc' is invalid: expected a number \(from the environment\)$"):
        load_config(str(env))
    monkeypatch.setenv("MAX_LR", "-1")
    with pytest.raises(ConfigError, match=r"^MAX_LR=-1.0 is invalid: expected a number > 0 \(from the environment\)$"):
        load_config(str(env))


def test_instruct_is_the_original_projects_name_for_sft_and_each_stage_gets_its_own_run_dir():
    cfg = load_config(overrides={"TRAINING_STAGE": "instruct"})
    assert cfg.training_stage == "sft" and cfg.run_path == Path("runs/sft")
    assert load_config(overrides={"RUN_DIR": "elsewhere"}).run_path == Path("elsewhere")
