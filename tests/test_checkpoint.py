"""What load_model and checked_tokenizer say about paths they cannot use, and the tokenizer a checkpoint
was trained with.

Each unusable input must stop with one line that names the path and what was expected; the tokenizer
used with a project checkpoint must be the one whose sha256 it records (compared with hashlib here).
"""

import hashlib

import pytest
import torch

from checkpoint import CheckpointError, checked_tokenizer, load_model, model_args_for, save_checkpoint
from model import ModelArgs, Transformer
from tokenizer import Tokenizer, default_tokenizer_path

TINY = dict(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=256, multiple_of=16, max_seq_len=32)


def one_line(path, match: str, call=load_model) -> str:
    with pytest.raises(CheckpointError, match=match) as info:
        call(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message, message
    return message


def test_missing_path_says_what_was_expected(tmp_path):
    one_line(tmp_path / "nope.pt", "no such file or directory; expected a checkpoint .pt written by train.py, "
                                   "a Meta-format directory .* or a Hugging Face Llama directory")


def test_directory_without_params_or_config_says_what_it_holds(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    one_line(tmp_path, r"neither params.json nor config.json \(it holds checkpoints/, metrics.jsonl\); expected")


def test_garbage_file_is_not_a_pytorch_checkpoint(tmp_path):
    (tmp_path / "x.pt").write_bytes(b"not a checkpoint at all" * 10)
    message = one_line(tmp_path / "x.pt", "not a PyTorch checkpoint")
    assert "_use_new_zipfile_serialization" not in message


def test_truncated_checkpoint_is_damaged(tmp_path):
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "a.pt", Transformer(ModelArgs(**TINY)))
    data = (tmp_path / "a.pt").read_bytes()
    (tmp_path / "a.pt").write_bytes(data[: len(data) // 2])
    one_line(tmp_path / "a.pt", "damaged or truncated")


class NotAWeight:
    def __reduce__(self):  # what a malicious pickle does: call something on load
        return (print, ("unpickled!",))


def test_pickled_objects_are_refused_not_executed(tmp_path, capsys):
    torch.save({"format": "llama3-trainer-checkpoint", "model": NotAWeight()}, tmp_path / "evil.pt")
    one_line(tmp_path / "evil.pt", "refused: it holds Python objects")
    assert "unpickled!" not in capsys.readouterr().out


def test_bare_state_dict_is_named_as_such(tmp_path):
    torch.save({"tok_embeddings.weight": torch.zeros(2, 2)}, tmp_path / "consolidated.00.pth")
    one_line(tmp_path / "consolidated.00.pth", "not a checkpoint written by this project .*bare state dict")


def test_model_args_for_a_project_checkpoint_reads_the_recorded_shape(tmp_path):
    save_checkpoint(tmp_path / "a.pt", Transformer(ModelArgs(**TINY, use_scaled_rope=True)))
    args = model_args_for(tmp_path / "a.pt", max_seq_len=16, rope_scale_factor=4.0)
    assert (args.dim, args.n_kv_heads, args.max_seq_len, args.rope_scale_factor) == (32, 1, 16, 4.0)


# ---- the tokenizer a checkpoint was trained with --------------------------------------------------------
@pytest.fixture
def tokenizer_copy(tmp_path):
    """Meta's tokenizer.model copied elsewhere, and a variant with the same ranks but other bytes."""
    same = tmp_path / "same" / "tokenizer.model"
    other = tmp_path / "other" / "tokenizer.model"
    for path in (same, other):
        path.parent.mkdir()
    same.write_bytes(default_tokenizer_path().read_bytes())
    other.write_bytes(default_tokenizer_path().read_bytes() + b"\n")  # a blank line: other sha256
    return same, other


def trained_with(tmp_path, tokenizer: Tokenizer):
    """A project checkpoint recording `tokenizer` as train.py records it."""
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, Transformer(ModelArgs(**TINY)), tokenizer=tokenizer.identity(),
                    tokenizer_path=str(tokenizer.path))
    return path


def sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_recorded_tokenizer_is_used(tmp_path, tokenizer_copy):
    same, _ = tokenizer_copy
    tok = checked_tokenizer(trained_with(tmp_path, Tokenizer(same)))
    assert tok.path == same


def test_vanished_tokenizer_falls_back_to_the_default_only_when_it_is_the_same_file(tmp_path, tokenizer_copy):
    same, _ = tokenizer_copy
    ckpt = trained_with(tmp_path, Tokenizer(same))
    same.unlink()
    assert sha(checked_tokenizer(ckpt).path) == sha(default_tokenizer_path())


def test_vanished_tokenizer_with_another_hash_names_both(tmp_path, tokenizer_copy):
    _, other = tokenizer_copy
    ckpt, recorded = trained_with(tmp_path, Tokenizer(other)), sha(other)
    other.unlink()
    message = one_line(ckpt, "was trained with tokenizer", checked_tokenizer)
    assert f"{other} (sha256 {recorded[:12]}, no longer there)" in message
    assert f"{default_tokenizer_path()} has sha256 {sha(default_tokenizer_path())[:12]}" in message


def test_tokenizer_override_must_match_the_recorded_hash(tmp_path, tokenizer_copy):
    same, other = tokenizer_copy
    ckpt = trained_with(tmp_path, Tokenizer(same))
    assert checked_tokenizer(ckpt, default_tokenizer_path()).path == default_tokenizer_path()  # same bytes
    message = one_line(ckpt, "was trained with tokenizer", lambda p: checked_tokenizer(p, other))
    assert str(same) in message and str(other) in message


def test_a_hub_name_is_downloaded_through_huggingface_hub_and_a_local_path_is_not(tmp_path, monkeypatch):
    """The network edge is the only thing replaced: snapshot_download's answer for a hub name."""
    import huggingface_hub

    from checkpoint import local_model_path

    calls = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda repo, allow_patterns: calls.append((repo, allow_patterns)) or str(tmp_path))
    assert local_model_path("meta-llama/Llama-3.2-1B") == str(tmp_path)
    assert calls[0][0] == "meta-llama/Llama-3.2-1B" and "*.safetensors" in calls[0][1]
    local = tmp_path / "org" / "model"
    local.mkdir(parents=True)
    assert local_model_path(str(local)) == str(local) and len(calls) == 1  # an existing path is never looked up

    def offline(repo, allow_patterns):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(CheckpointError, match=r"^someone/missing: not a local path, and downloading it from the "
                                              r"Hugging Face hub failed \(OSError: We couldn't connect"):
        local_model_path("someone/missing")
