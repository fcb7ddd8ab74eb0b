"""Looking at a model bigger than memory: `generate.py --offload disk` and `hellaswag_utils.py --offload disk` stream
the weights from a block store and give what the model in memory gives (greedy tokens against transformers'
`generate`, HellaSwag log-likelihoods against transformers' logits), for project, Hugging Face and LoRA adapter
checkpoints; the store is reused while it holds the checkpoint's weights and rebuilt when they change; and
validation, exact match, sample generations and HellaSwag during an OFFLOAD=disk training run log what an
in-memory run logs."""

import argparse
import io
import re
import shutil

import pytest
import torch

import generate
import hellaswag_utils
import offload
from checkpoint import save_checkpoint
from hf_convert import export_hf, to_hf
from lora_helpers import adapter_checkpoint_for
from model import ModelArgs, Transformer
from reference_weights import o1_random_
from test_offload_runs import SFT, data, env_for, start  # noqa: F401  (module fixtures, reused)
from test_train import write_hellaswag_items
from tokenizer import Tokenizer
from trainer_runs import same_run, step_metric, train

PROMPT = "The capital of France is"
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def random_model(tok: Tokenizer, seed: int = 0) -> Transformer:
    """O(1) random weights, so that greedy choices and log-likelihoods are far apart and a wrong weight shows."""
    torch.manual_seed(seed)
    args = ModelArgs(dim=32, n_layers=3, n_heads=2, n_kv_heads=1, vocab_size=tok.n_words, multiple_of=32,
                     max_seq_len=128)
    return o1_random_(Transformer(args)).eval()


def save(model: Transformer, path, tok: Tokenizer):
    save_checkpoint(path, model, tokenizer=tok.identity(), tokenizer_path=str(tok.path))
    return path


@pytest.fixture(scope="module")
def model(tok) -> Transformer:
    return random_model(tok)


@pytest.fixture(scope="module")
def checkpoint(model, tok, tmp_path_factory):
    return save(model, tmp_path_factory.mktemp("checkpoint") / "model.pt", tok)


@pytest.fixture(scope="module")
def hf_answer(model, tok):
    """Text of transformers' greedy decoding of `model`: 10 tokens, cut before the first stop id (where
    generate.py stops)."""
    hf = to_hf(model)

    def answer(ids: list[int], reference=hf) -> str:
        x = torch.tensor([ids])
        out = reference.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=10, min_new_tokens=10,
                                 do_sample=False, pad_token_id=0)[0, len(ids):].tolist()
        return tok.decode(out[:next((i for i, t in enumerate(out) if t in tok.stop_tokens), len(out))])
    return answer


def run_generate(capsys, checkpoint, *flags: str) -> tuple[int, str, str]:
    code = generate.main(["--checkpoint", str(checkpoint), "--temperature", "0", "--max_new_tokens", "10", "--quiet",
                          "--device", "cpu", "--dtype", "fp32", *flags])
    out, err = capsys.readouterr()
    return code, out, err


def offloaded(directory) -> tuple[str, ...]:
    return "--offload", "disk", "--offload_dir", str(directory)


# ---- generate.py --------------------------------------------------------------------------------------------------
def test_generate_offload_disk_prints_the_text_of_transformers_and_of_the_model_in_memory(checkpoint, hf_answer, tok,
                                                                                       tmp_path, capsys):
    expected = hf_answer(tok.encode(PROMPT, bos=True, eos=False)) + "\n"
    assert len(expected) > 10
    code, streamed, err = run_generate(capsys, checkpoint, "--prompt", PROMPT, *offloaded(tmp_path / "stores"))
    assert code == 0 and streamed == expected, err
    assert f"offload: disk, policy store {tmp_path / 'stores' / 'policy'} written" in err
    assert "each forward streams 3 blocks" in err
    assert run_generate(capsys, checkpoint, "--prompt", PROMPT)[1] == expected  # in memory


def streamed_answer(checkpoint, directory, tok) -> tuple[str, str]:
    """generate.py's greedy completion of PROMPT from the streamed checkpoint, and the line saying which store."""
    model, where = generate.load_weights(str(checkpoint), torch.device("cpu"), torch.float32, "disk", str(directory))
    assert isinstance(model, offload.StreamedTransformer)
    ids = list(generate.generate_tokens(model, tok.encode(PROMPT, bos=True, eos=False), 10, tok.stop_tokens))
    return tok.decode(ids), where


@pytest.mark.parametrize("form", ["hugging face directory", "LoRA adapter checkpoint"])
def test_other_checkpoint_forms_stream_to_the_same_greedy_text(form, model, hf_answer, tok, tmp_path):
    """The adapter checkpoint's base and adapters merge to `model` (lora_helpers): its base streams, its adapters
    stay in memory, unmerged."""
    if form == "hugging face directory":
        export_hf(model, tmp_path / "hf")
        checkpoint = tmp_path / "hf"
    else:
        checkpoint = adapter_checkpoint_for(model, tmp_path, tokenizer=tok.identity(), tokenizer_path=str(tok.path))
    rng = torch.get_rng_state()
    text, where = streamed_answer(checkpoint, tmp_path / "stores", tok)
    assert text == hf_answer(tok.encode(PROMPT, bos=True, eos=False)) and "written" in where
    assert torch.equal(torch.get_rng_state(), rng)  # drawing the adapters to overwrite them took no numbers


def test_the_store_is_reused_while_it_verifies_and_rebuilt_when_the_checkpoint_changes(model, hf_answer, tok,
                                                                                         tmp_path):
    checkpoint, stores = save(model, tmp_path / "model.pt", tok), tmp_path / "stores"
    ids = tok.encode(PROMPT, bos=True, eos=False)
    assert f"policy store {stores / 'policy'} written" in streamed_answer(checkpoint, stores, tok)[1]
    assert streamed_answer(checkpoint, stores, tok) == (
        hf_answer(ids), f"offload: disk, policy store {stores / 'policy'} reused (content verified); each forward "
                        f"streams 3 blocks")

    other = random_model(tok, seed=1)
    save(other, checkpoint, tok)  # other weights under the same name
    expected = hf_answer(ids, to_hf(other))
    text, where = streamed_answer(checkpoint, stores, tok)
    assert f"policy store {stores / 'policy'} rebuilt (written from other weights)" in where
    assert text == expected != hf_answer(ids)

    shutil.copyfile(stores / "policy" / "weights" / "layers.0.safetensors",
                    stores / "policy" / "weights" / "layers.1.safetensors")  # a damaged store: found by its hash
    text, where = streamed_answer(checkpoint, stores, tok)
    assert "rebuilt (" in where and "content differs" in where
    assert text == expected


def test_chat_streams_too_one_prompt_and_a_conversation(checkpoint, hf_answer, tok, tmp_path, capsys):
    hello = [{"role": "user", "content": "hello"}]
    assert run_generate(capsys, checkpoint, "--chat", "--prompt", "hello", *offloaded(tmp_path / "stores"))[1] == \
        hf_answer(tok.encode_chat(hello)) + "\n"

    streamed, _ = generate.load_weights(str(checkpoint), torch.device("cpu"), torch.float32, "disk",
                                        str(tmp_path / "stores"))
    lines, out = iter(["hello", "and then?"]), io.StringIO()

    def read(_):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None  # Ctrl-D

    settings = argparse.Namespace(max_new_tokens=10, temperature=0.0, top_k=0, top_p=1.0, seed=None)
    generate.chat_loop(streamed, tok, settings, read=read, out=out)
    first = hf_answer(tok.encode_chat(hello))
    second = hf_answer(tok.encode_chat([*hello, {"role": "assistant", "content": first},
                                        {"role": "user", "content": "and then?"}]))
    assert out.getvalue() == f"chat: /reset starts over, Ctrl-D leaves\n{first}\n{second}\n\n"


@pytest.mark.parametrize("flags, message", [
    (("--offload", "disk", "--compile"), "--compile cannot be used with --offload disk"),
    (("--offload_dir", "DIR"), "--offload_dir is for --offload disk"),
])
def test_offload_flags_that_cannot_work_are_refused_in_one_line(flags, message, checkpoint, capsys):
    code, _, err = run_generate(capsys, checkpoint, "--prompt", PROMPT, *flags)
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: ") and message in err


def test_a_store_directory_holding_other_files_is_left_alone_and_refused_in_one_line(checkpoint, tmp_path, capsys):
    theirs = tmp_path / "stores" / "policy" / "notes.txt"
    theirs.parent.mkdir(parents=True)
    theirs.write_text("mine")
    code, _, err = run_generate(capsys, checkpoint, "--prompt", PROMPT, *offloaded(tmp_path / "stores"))
    assert code == 2 and err.count("\n") == 1 and "holds files but no offload store" in err
    assert theirs.read_text() == "mine"


def test_too_little_disk_space_is_refused_in_one_line_before_the_store_is_written(model, checkpoint, tmp_path,
                                                                                   capsys, monkeypatch):
    monkeypatch.setattr(offload, "free_bytes", lambda directory: 10**6)  # a disk with 1 MB free
    code, _, err = run_generate(capsys, checkpoint, "--prompt", PROMPT, *offloaded(tmp_path / "stores"))
    needed = model.num_params() * 4  # float32, as the checkpoint holds them
    assert code == 2 and err.count("\n") == 1
    assert f"the offload store needs {needed / 1e9:.2f} GB, only 0.00 GB free" in err
    assert not list((tmp_path / "stores").rglob("*.safetensors"))


def test_an_adapter_checkpoint_whose_base_changed_is_refused_in_one_line(model, tok, tmp_path, capsys):
    adapters = adapter_checkpoint_for(model, tmp_path, tokenizer=tok.identity(), tokenizer_path=str(tok.path))
    save(model, tmp_path / "base.pt", tok)  # the merged weights over the base the adapters were trained on
    code, _, err = run_generate(capsys, adapters, "--prompt", PROMPT, *offloaded(tmp_path / "stores"))
    assert code == 2 and err.count("\n") == 1 and "base weights changed since the adapters were trained" in err


def test_the_default_store_is_in_the_users_cache_one_per_checkpoint_path(tmp_path):
    a, b = generate.default_offload_dir(tmp_path / "a.pt"), generate.default_offload_dir(tmp_path / "b.pt")
    assert a.parent == b.parent == generate.OFFLOAD_ROOT and a != b and a.name.startswith("a.pt-")
    assert generate.default_offload_dir(tmp_path / "x" / ".." / "a.pt") == a


# ---- hellaswag_utils.py -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hellaswag_file(tmp_path_factory):
    return write_hellaswag_items(tmp_path_factory.mktemp("hellaswag") / "val.jsonl", n=5)


def hf_logliks(model: Transformer, tok: Tokenizer, examples) -> torch.Tensor:
    """Each ending's summed log-probability from transformers' logits, one unpadded request at a time (N, 4)."""
    hf, sums = to_hf(model), []
    for example in examples:
        for context, ending in hellaswag_utils.encode_example(tok, example):
            ids = torch.tensor([context + ending])
            with torch.no_grad():
                logprobs = hf(ids).logits[0, len(context) - 1:-1].float().log_softmax(-1)
            sums.append(logprobs.gather(-1, ids[0, len(context):, None]).sum().item())
    return torch.tensor(sums, dtype=torch.float64).view(-1, 4)


def test_streamed_hellaswag_logliks_equal_in_memory_and_transformers(model, checkpoint, tok, tmp_path,
                                                                      hellaswag_file):
    examples, _ = hellaswag_utils.load_examples(hellaswag_file)
    streamed, where = generate.load_weights(str(checkpoint), torch.device("cpu"), torch.float32, "disk",
                                            str(tmp_path / "stores"))
    assert isinstance(streamed, offload.StreamedTransformer) and "written" in where
    sums, counts = hellaswag_utils.score_examples(streamed, tok, examples, batch_size=4)  # 4 + 1: padded rows
    memory, memory_counts = hellaswag_utils.score_examples(model, tok, examples, batch_size=4)
    reference = hf_logliks(model, tok, examples)
    assert reference.std() > 1.0  # endings far apart: a wrong block would show
    assert torch.equal(counts, memory_counts) and (sums - memory).abs().max().item() <= 1e-5
    assert (sums - reference).abs().max().item() <= 1e-4


def test_hellaswag_cli_with_offload_prints_the_in_memory_scores(checkpoint, tmp_path, hellaswag_file, capsys):
    flags = ["--checkpoint", str(checkpoint), "--path", str(hellaswag_file), "--device", "cpu", "--dtype", "fp32",
             "--batch_size", "4"]
    scores = lambda text: re.sub(r" \| [\d.]+ examples/s", "", text)  # noqa: E731  (all but the speed)
    assert hellaswag_utils.main(flags) == 0
    memory = scores(capsys.readouterr().out)
    assert hellaswag_utils.main([*flags, "--offload", "disk", "--offload_dir", str(tmp_path / "stores")]) == 0
    out, err = capsys.readouterr()
    assert scores(out) == memory and "hellaswag | 5 examples (0 skipped)" in memory
    assert f"policy store {tmp_path / 'stores' / 'policy'} written" in err


# ---- evaluation during an offloaded training run ------------------------------------------------------------------
@pytest.mark.e2e
def test_offloaded_training_logs_the_in_memory_validation_exact_match_samples_and_hellaswag(tmp_path, data, start,
                                                                                            hellaswag_file):
    """Full-weight SFT: the evaluations read the weights each update wrote back to the store."""
    evaluations = dict(GENERATE_EVERY_X_STEPS="2", GENERATION_MAX_NEW_TOKENS="6", HELLASWAG_EVERY_X_STEPS="2",
                       HELLASWAG_PATH=str(hellaswag_file), HELLASWAG_NUMBER_OF_EXAMPLES="5", SAVE_EVERY_X_STEPS="0",
                       **SFT)
    out = {mode: train(env_for(tmp_path, mode, data, OFFLOAD=mode, **evaluations), "--checkpoint", str(start)).stdout
           for mode in ("none", "disk")}
    assert "offload: disk" in out["disk"] and "hellaswag | 5 examples" in out["disk"] and "sample 1 |" in out["disk"]
    memory, disk = tmp_path / "none", tmp_path / "disk"
    assert sorted(step_metric(memory, "val_loss")) == sorted(step_metric(memory, "val_exact_match")) == [0, 2, 4]
    assert sorted(step_metric(memory, "hellaswag_acc")) == [2, 4] and set(step_metric(memory, "hellaswag_n")
                                                                          .values()) == {5}
    samples = step_metric(memory, "samples")
    assert sorted(samples) == [2, 4] and all(s["completion"] for round_ in samples.values() for s in round_)
    same_run(memory, disk)  # every record: losses, validation, exact match, samples, hellaswag; and the weights


@pytest.mark.e2e
def test_a_lora_runs_checkpoint_generates_from_the_runs_own_store(tmp_path, data, start, capsys):
    """The offloaded LoRA run wrote its base's store in OFFLOAD_DIR/policy; generate.py --offload_dir reuses it."""
    train(env_for(tmp_path, "lora", data, OFFLOAD="disk", LORA_ENABLED="true", LORA_RANK="4", MAX_LR="3e-2", **SFT),
          "--checkpoint", str(start))
    adapters = sorted((tmp_path / "lora" / "checkpoints").glob("step_*.pt"))[-1]
    code, streamed, err = run_generate(capsys, adapters, "--prompt", PROMPT, *offloaded(tmp_path / "lora" / "offload"))
    assert code == 0 and f"policy store {tmp_path / 'lora' / 'offload' / 'policy'} reused (content verified)" in err
    assert streamed == run_generate(capsys, adapters, "--prompt", PROMPT)[1]  # merged in memory
    assert streamed != run_generate(capsys, start, "--prompt", PROMPT)[1]  # the adapters count
