"""A Hugging Face tokenizer directory works behind the same API as the tiktoken one.

The directory is made here from Meta's tokenizer.model by transformers' own TikTokenConverter
(the route Hugging Face used to publish Llama 3's tokenizer.json), so the tiktoken Tokenizer,
already checked token for token against Meta's, is the reference.
"""

import codecs

import pytest

from tokenizer import HFTokenizer, NAMED_SPECIAL_TOKENS, Tokenizer, default_tokenizer_path, load_tokenizer

converter = pytest.importorskip("transformers.convert_slow_tokenizer")

TEXTS = [
    "The capital of France is Paris.",
    "  leading spaces, trailing tabs\t\t\nand\r\nnewlines\n\n\n",
    "naïve café — 日本語のテキスト, emoji 🤖🚀 and العربية",
    "def f(x):\n    return x ** 2  # squares\n",
    "I'M sure they'LL say it's 12345678901234 o'clock",
]

# Documents that quote special-token text, as web pages and code about Llama do.
SPECIAL_TEXTS = [
    "a <|end_of_text|> b",
    "<|begin_of_text|>starts like a document",
    "chat logs: <|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>",
    "reserved <|reserved_special_token_5|><|finetune_right_pad_id|> and a half <|eot_id",
]

# Characters that Llama 3's BPE splits over several tokens: no token holds a whole character.
MULTI_TOKEN_TEXTS = ["🤖🚀", "family 👨‍👩‍👧‍👦, flag 🇫🇷 done ✅", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 and 日本語のテキスト"]


@pytest.fixture(scope="module")
def ref() -> Tokenizer:
    return Tokenizer()


@pytest.fixture(scope="module")
def hf_dir(ref, tmp_path_factory):
    specials = sorted(ref.special_tokens, key=ref.special_tokens.get)
    hf = converter.TikTokenConverter(vocab_file=str(default_tokenizer_path()), extra_special_tokens=specials).converted()
    out = tmp_path_factory.mktemp("hf_tokenizer")
    hf.save(str(out / "tokenizer.json"))
    return out


@pytest.fixture(scope="module")
def tok(hf_dir) -> HFTokenizer:
    return load_tokenizer(hf_dir)


def test_directory_with_tokenizer_json_loads_as_hf_tokenizer(tok, ref):
    assert isinstance(tok, HFTokenizer)
    assert tok.n_words == ref.n_words
    for name in NAMED_SPECIAL_TOKENS:
        assert tok.special_tokens[name] == ref.special_tokens[name]
    assert (tok.bos_id, tok.eos_id, tok.eot_id) == (ref.bos_id, ref.eos_id, ref.eot_id)


@pytest.mark.parametrize("text", TEXTS)
def test_hf_tokenizer_encodes_like_the_tiktoken_tokenizer(tok, ref, text):
    assert tok.encode(text, bos=True, eos=True) == ref.encode(text, bos=True, eos=True)
    assert tok.decode(tok.encode(text, bos=False, eos=False)) == text


@pytest.mark.parametrize("text", SPECIAL_TEXTS)
def test_special_token_text_in_a_document_is_plain_text_for_both_kinds(tok, ref, text):
    # A document quoting `<|end_of_text|>` must not get a fake boundary (id 128001) on either path.
    expected = ref.encode(text, bos=True, eos=True)
    assert tok.encode(text, bos=True, eos=True) == expected
    assert tok.encode_batch([text, "x"], bos=True, eos=True) == [expected, ref.encode("x", bos=True, eos=True)]
    inner = set(expected[1:-1])
    assert not inner & set(ref.special_tokens.values()), "reference encoded special text as a special id"
    assert tok.decode(expected[1:-1]) == text


def test_hf_tokenizer_refuses_to_turn_text_into_special_ids(tok):
    # Only tiktoken can do that; special ids go in by id (as the chat format does), never silently.
    with pytest.raises(ValueError, match="plain text"):
        tok.encode("x <|eot_id|>", bos=False, eos=False, allowed_special="all")
    with pytest.raises(ValueError, match="<\\|eot_id\\|>"):
        tok.encode("x <|eot_id|>", bos=False, eos=False, disallowed_special="all")


def test_every_token_decodes_to_the_same_bytes_as_tiktoken(tok, ref):
    # The byte-level alphabet mapped back to bytes; special tokens are their text's UTF-8.
    assert tok.n_words == ref.n_words
    for i in range(ref.n_words):
        assert tok.decode_token_bytes(i) == ref.model.decode_single_token_bytes(i), i


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _stream(tokenizer, ids: list[int]) -> list[str]:
    """What generate.stream_completion yields: per-token bytes through an incremental UTF-8 decoder."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    pieces = [decoder.decode(tokenizer.decode_token_bytes(i)) for i in ids] + [decoder.decode(b"", final=True)]
    return [p for p in pieces if p]


@pytest.mark.parametrize("text", MULTI_TOKEN_TEXTS)
def test_streamed_text_is_the_same_for_both_kinds(tok, ref, text):
    ids = ref.encode(text, bos=False, eos=False) + [ref.eot_id]
    assert any(not _is_utf8(ref.decode_token_bytes(i)) for i in ids), "no character is split over tokens"
    assert "".join(_stream(ref, ids)) == text + "<|eot_id|>"  # the tiktoken path, right today
    assert _stream(tok, ids) == _stream(ref, ids)


def test_hf_tokenizer_renders_chat_like_the_tiktoken_tokenizer(tok, ref):
    dialog = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi <|eot_id|> there!"}]
    assert tok.encode_chat(dialog) == ref.encode_chat(dialog)


def test_a_tokenizer_that_is_not_byte_level_is_refused_at_load(tmp_path):
    # Its tokens' bytes cannot be had, so streaming would print replacement characters.
    from tokenizers import Tokenizer as HF
    from tokenizers.models import WordLevel

    HF(WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")).save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match="expected ByteLevel"):
        load_tokenizer(tmp_path)


def test_directory_without_tokenizer_files_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer.json in"):
        load_tokenizer(tmp_path)


# ---- weights carry their tokenizer: it must be the run's, id for id ------------------------------------
def hf_model_dir(path, tokenizer_json=None):
    """A tiny Llama with Llama 3's vocabulary as a Hugging Face directory, `tokenizer_json` beside it."""
    import shutil

    import torch

    from hf_convert import export_hf
    from model import ModelArgs, Transformer

    torch.manual_seed(0)
    export_hf(Transformer(ModelArgs(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=128256, multiple_of=32,
                                    max_seq_len=32, tie_word_embeddings=True)), path)
    if tokenizer_json is not None:
        shutil.copyfile(tokenizer_json, path / "tokenizer.json")
    return path


@pytest.fixture(scope="module")
def swapped_json(hf_dir, tmp_path_factory):
    """The same tokenizer.json with the ids of " the" and " and" swapped: same size, other ids."""
    import json

    data = json.loads((hf_dir / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    vocab["Ġthe"], vocab["Ġand"] = vocab["Ġand"], vocab["Ġthe"]
    out = tmp_path_factory.mktemp("swapped") / "tokenizer.json"
    out.write_text(json.dumps(data))
    return out


def test_weights_whose_tokenizer_maps_ids_differently_are_refused_with_one_line(tmp_path, ref, swapped_json):
    from checkpoint import CheckpointError, check_trained_tokenizer

    model_dir = hf_model_dir(tmp_path / "hf", swapped_json)
    assert load_tokenizer(model_dir).n_words == ref.n_words  # the sizes agree: only the ids tell
    with pytest.raises(CheckpointError) as e:
        check_trained_tokenizer(model_dir, ref)
    message = str(e.value)
    the, and_ = ref.encode(" the", bos=False, eos=False), ref.encode(" and", bos=False, eos=False)
    assert "\n" not in message and str(model_dir) in message and "2 of" in message and "TOKENIZER_PATH" in message
    assert str(min(the + and_)) in message


def test_a_meta_directory_whose_tokenizer_model_maps_ids_differently_is_refused(tmp_path, ref):
    from checkpoint import CheckpointError, check_trained_tokenizer

    lines = default_tokenizer_path().read_bytes().splitlines()
    lines[500], lines[501] = lines[500].split()[0] + b" 501", lines[501].split()[0] + b" 500"
    (tmp_path / "params.json").write_text("{}")
    (tmp_path / "tokenizer.model").write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(CheckpointError, match=r"2 of .* id 500"):
        check_trained_tokenizer(tmp_path, ref)


def test_weights_with_the_same_tokenizer_pass_and_weights_without_one_get_a_note(tmp_path, ref, hf_dir):
    from checkpoint import check_trained_tokenizer

    assert check_trained_tokenizer(hf_model_dir(tmp_path / "same", hf_dir / "tokenizer.json"), ref) is None
    note = check_trained_tokenizer(hf_model_dir(tmp_path / "bare"), ref)
    assert "\n" not in note and str(tmp_path / "bare") in note and "no tokenizer" in note and str(ref.path) in note


@pytest.mark.e2e
def test_train_refuses_a_teacher_whose_tokenizer_maps_ids_differently(tmp_path, swapped_json):
    """The run the review saw finish with no warning: distillation from such a teacher."""
    import subprocess
    import sys

    from trainer_runs import ROOT, clean_env, write_env

    env = write_env(tmp_path / "run.env", tmp_path / "no-data", tmp_path / "run", IS_MODEL_DISTILLATION="true",
                    TEACHER_MODEL_CHECKPOINT=str(hf_model_dir(tmp_path / "hf", swapped_json)))
    out = subprocess.run([sys.executable, str(ROOT / "train.py"), "--env_file", str(env)], capture_output=True,
                         text=True, env=clean_env(), timeout=120)
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "TEACHER_MODEL_CHECKPOINT=" in out.stderr and "tokenizer" in out.stderr and "2 of" in out.stderr


def test_a_start_whose_tokenizer_maps_ids_differently_is_refused_before_its_weights_load(tmp_path, ref,
                                                                                           swapped_json):
    import torch

    import train
    from checkpoint import CheckpointError
    from config import load_config

    (tmp_path / "empty.env").write_text("")
    cfg = load_config(str(tmp_path / "empty.env"), {"TRAINING_STAGE": "sft"})
    start = train.Start(str(hf_model_dir(tmp_path / "hf", swapped_json)), resume=False, flag="pretrain_checkpoint")
    with pytest.raises(CheckpointError, match=r"2 of .*TOKENIZER_PATH"):
        train.initial_model(cfg, start, ref, ref.n_words, torch.device("cpu"), None)
