"""A tokenizer trained by train_tokenizer.py: exact round trips, the same ids and chat rendering in
transformers' AutoTokenizer, Meta's special-token layout (llama_models), the trainer's own encoding kept,
and the data scripts, the SFT mask, generation, export and train.py working with it."""

import json
import os
import random
import subprocess
import sys
import unicodedata
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may touch the network (read when datasets is imported)

import numpy as np
import pytest
import torch
from llama_models.llama3.tokenizer import Tokenizer as MetaTokenizer
from transformers import AutoTokenizer

import load_dpo_dataset as ldd
import load_instruct_dataset as lid
import train_tokenizer as tt
from checkpoint import read_checkpoint
from data_preparation_utils import DataPrepError
from data_sources import ChatSource, Source
from dataloaders import DataError, PretrainDataLoader
from generate import complete, generate_tokens
from hf_convert import export_hf
from load_pretrain_dataset import prepare_pretrain_dataset
from model import ModelArgs, Transformer
from prep_helpers import REPO, run_script, shard_sequences, write_jsonl
from tokenizer import Tokenizer, load_tokenizer
from trainer_runs import clean_env, write_env

VOCAB = 1000

UNICODE = ["naïve café — 日本語のテキスト", "emoji 🤖🚀 family 👨‍👩‍👧‍👦 flag 🇫🇷", "العربية و עברית", "Ελληνικά, русский",
           "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ﬁ ẞ", unicodedata.normalize("NFD", "é à ñ combining"), "한국어 ไทย हिन्दी"]
WHITESPACE = ["   ", "\t\t", "\n\n\n", "\r\n", " \u00a0 \u3000 ", "\t \n \t", "          "]
CODE = ["def f(x):\n    return x ** 2  # squares\n", "class A:\n\tpass\r\n", "if (a&&b) { x->y[i] += 1; }",
        "<html><body class=\"x\">&nbsp;</body></html>", '{"key": [1, 2, null], "k2": {"n": -3.5e10}}',
        "```python\nprint('héllo')\n```", "$$ \\frac{a}{b} $$ ~~~ @decorator"]
DIGITS = ["12345678901234567890", "3.14159265358979", "1,000,000", "0x7fffffff", "2024-11-30 23:59:59", "-0.0e-7"]
PROSE = ["The capital of France is Paris.", "I'M sure they'LL say it's o'clock, DON'T they'd've",
         "Return the number of items in a container.", "a"]


# every special token by name, in Meta's order, from llama_models
SPECIAL_NAMES = sorted(MetaTokenizer.get_instance().special_tokens, key=MetaTokenizer.get_instance().special_tokens.get)


def varied_texts() -> list[str]:
    """300 texts: the first 256 each quote one special token in its place among other pieces."""
    rng = random.Random(0)
    pieces = UNICODE + WHITESPACE + CODE + DIGITS + PROSE
    texts = []
    for i in range(300):
        parts = rng.sample(pieces, rng.randint(1, 5))
        if i < 256:
            parts.insert(rng.randint(0, len(parts)), SPECIAL_NAMES[i])
        texts.append(rng.choice(["", " ", "\n", "\t"]).join(parts))
    return texts + ["x" * 300 + " " + "ab" * 200, " leading space", "trailing space ", "\n"]


def corpus_rows() -> list[dict]:
    """About 400 KB: Python's reference topics (prose), some of its source (code), and other scripts."""
    import pydoc_data.topics
    import textwrap as code_sample

    topics = [text for _, text in sorted(pydoc_data.topics.topics.items())][:120]
    code = Path(code_sample.__file__).read_text()
    other = [" ".join(UNICODE + DIGITS) * 20, "\n".join(CODE) * 10]
    return [{"text": t} for t in topics + [code] + other]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path, dict]:
    tmp = tmp_path_factory.mktemp("tok")
    corpus = write_jsonl(tmp / "corpus.jsonl", corpus_rows())
    report = tt.train_tokenizer([Source(files=[str(corpus)])], tmp / "tok", vocab_size=VOCAB, show_progress=False)
    return tmp / "tok", corpus, report


@pytest.fixture(scope="module")
def tok(trained) -> Tokenizer:
    return load_tokenizer(trained[0])


@pytest.fixture(scope="module")
def hf(trained):
    return AutoTokenizer.from_pretrained(trained[0])


def chat_ids(hf, dialog: list[dict], **kw) -> list[int]:
    got = hf.apply_chat_template(dialog, tokenize=True, **kw)
    return list(got["input_ids"] if hasattr(got, "keys") else got)  # a BatchEncoding from transformers 5


def hf_ids(hf, text: str) -> list[int]:
    """transformers' ids for a document: special-token text is plain text, as the project encodes it."""
    return hf(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]


# ---- the tokenizer itself -----------------------------------------------------------------------------


def test_trained_directory_holds_the_asked_vocabulary_with_meta_special_tokens_after_the_learned_ranks(trained,
                                                                                                       tok):
    out, _, report = trained
    assert sorted(p.name for p in out.iterdir()) == ["special_tokens_map.json", "tokenizer.json",
                                                     "tokenizer.model", "tokenizer_config.json"]
    assert isinstance(tok, Tokenizer) and tok.n_words == VOCAB == report["tokenizer"].n_words
    # Meta's layout, by llama_models' own table: the same names in the same order after the base ranks
    meta = MetaTokenizer.get_instance()
    meta_base = min(meta.special_tokens.values())
    assert {name: i - meta_base for name, i in meta.special_tokens.items()} == \
        {name: i - (VOCAB - 256) for name, i in tok.special_tokens.items()}
    assert tok.stop_tokens == [tok.special_tokens[t] for t in ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")]
    assert [tok.decode_token_bytes(b) for b in range(256)] == [bytes([b]) for b in range(256)]


def test_trained_tokenizer_round_trips_300_varied_texts_exactly(tok):
    texts = varied_texts()
    for text in texts:
        ids = tok.encode(text, bos=True, eos=True)
        assert tok.decode(ids[1:-1]) == text
        assert b"".join(tok.decode_token_bytes(i) for i in ids[1:-1]) == text.encode("utf-8")
        assert not set(ids[1:-1]) & set(tok.special_tokens.values())  # quoted special text stays text
    for name, i in tok.special_tokens.items():
        assert tok.decode([i]) == name and tok.decode_token_bytes(i) == name.encode()


def test_autotokenizer_on_the_directory_gives_the_projects_ids_for_every_text(tok, hf):
    for text in varied_texts():
        ids = tok.encode(text, bos=False, eos=False)
        assert hf_ids(hf, text) == ids
        assert hf(text, split_special_tokens=True)["input_ids"] == [tok.bos_id] + ids  # BOS first, as Meta's
        assert hf.decode(ids) == text
    assert len(hf) == tok.n_words
    assert hf.convert_tokens_to_ids(list(tok.special_tokens)) == list(tok.special_tokens.values())
    assert (hf.bos_token_id, hf.eos_token_id) == (tok.bos_id, tok.eos_id)


def test_written_ranks_encode_as_the_trained_bpe_does(trained, tok):
    """The ranks keep what `tokenizers` learned: its own model splits the corpus into the same pieces."""
    _, corpus, _ = trained
    documents = [row["text"] for row in map(json.loads, corpus.read_text().splitlines())]
    bpe = tt.train_bpe(documents, VOCAB, show_progress=False)
    byte_of_char = {c: b for b, c in __import__("hf_convert").bytes_to_unicode().items()}
    for text in documents + varied_texts():
        learned = [bytes(byte_of_char[c] for c in piece) for piece in bpe.encode(text).tokens]
        assert [tok.decode_token_bytes(i) for i in tok.encode(text, bos=False, eos=False)] == learned


DIALOGS = [
    [{"role": "user", "content": "What is 2 + 2?"}],
    [{"role": "system", "content": "You are terse.\nAnswer in one line."}, {"role": "user", "content": "Hi 🤖"},
     {"role": "assistant", "content": "Hello. <|eot_id|> stays text"}, {"role": "user", "content": CODE[0]}],
    [{"role": "user", "content": "call it"}, {"role": "assistant", "content": "ok"},
     {"role": "tool", "content": '{"result": 42}'}],
]


@pytest.mark.parametrize("dialog", DIALOGS, ids=["one turn", "system and special text", "tool"])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_renders_as_encode_chat(tok, hf, dialog, add_generation_prompt):
    expected = tok.encode_chat(dialog, add_generation_prompt=add_generation_prompt)
    # the template writes special-token text that must become special ids; content with such text is the
    # one place where transformers reads it as the special token, so compare the rendered text too
    assert hf.decode(expected) == hf.apply_chat_template(dialog, add_generation_prompt=add_generation_prompt,
                                                         tokenize=False)
    if "<|" not in "".join(m["content"] for m in dialog):
        assert chat_ids(hf, dialog, add_generation_prompt=add_generation_prompt) == expected


# ---- the data scripts, the SFT mask, generation and export ---------------------------------------------


def test_pretraining_shards_hold_each_document_as_autotokenizer_encodes_it(trained, tok, hf, tmp_path):
    out, corpus, _ = trained
    report = prepare_pretrain_dataset([Source(files=[str(corpus)])], tmp_path / "data", tokenizer_path=str(out),
                                      shard_size=50_000, num_workers=0, show_progress=False)
    manifest = report["manifest"]
    assert manifest["tokenizer"] == tok.identity() and (manifest["bos_id"], manifest["eos_id"]) == (tok.bos_id,
                                                                                                    tok.eos_id)
    stream = np.concatenate([np.load(tmp_path / "data" / s["file"]) for split in ("train", "val")
                             for s in manifest["splits"][split]["shards"]]).tolist()
    documents = [row["text"] for row in map(json.loads, corpus.read_text().splitlines())]
    expected = [[tok.bos_id, *hf_ids(hf, d), tok.eos_id] for d in documents]
    written, doc = [], []
    for t in stream:
        doc.append(t)
        if t == tok.eos_id:
            written.append(doc)
            doc = []
    assert sorted(written) == sorted(expected)


def test_data_prepared_with_another_tokenizer_is_refused_in_one_line(trained, tmp_path):
    out, corpus, _ = trained
    prepare_pretrain_dataset([Source(files=[str(corpus)])], tmp_path / "data", tokenizer_path=str(out),
                             num_workers=0, show_progress=False)
    with pytest.raises(DataError, match="prepare the data again with this tokenizer") as e:
        PretrainDataLoader(str(tmp_path / "data"), "train", 2, 16, tokenizer_identity=Tokenizer().identity())
    assert "\n" not in str(e.value)


CHAT = [{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And of Japan? 日本"},
        {"role": "assistant", "content": "Tokyo.\n\n"}]


def header(hf, role: str) -> list[int]:
    return hf.encode(f"<|start_header_id|>{role}<|end_header_id|>\n\n", add_special_tokens=False)


def test_sft_shards_mask_exactly_the_assistant_content_and_its_eot(trained, tok, hf, tmp_path):
    out, _, _ = trained
    rows = write_jsonl(tmp_path / "chats.jsonl", [{"messages": CHAT}])
    report = lid.prepare_instruct_dataset([ChatSource(files=[str(rows)])], tmp_path / "sft", max_seq_len=256,
                                          tokenizer_path=str(out), val_fraction=0.0, num_workers=0,
                                          show_progress=False)
    eot = hf.convert_tokens_to_ids("<|eot_id|>")
    tokens, mask = [hf.bos_token_id], [0]  # by hand, from transformers' ids
    for m in CHAT:
        content = hf_ids(hf, m["content"]) + [eot]
        tokens += header(hf, m["role"]) + content
        mask += [0] * len(header(hf, m["role"])) + [int(m["role"] == "assistant")] * len(content)
    assert tokens == chat_ids(hf, CHAT, add_generation_prompt=False)
    [shard] = report["manifest"]["splits"]["train"]["shards"]
    assert shard_sequences(tmp_path / "sft", shard) == [(tokens, mask)]
    assert report["manifest"]["tokenizer"] == tok.identity()


def test_dpo_shards_score_the_response_after_the_autotokenizer_prompt(trained, hf, tmp_path):
    out, _, _ = trained
    rows = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "Capital of France?", "chosen": "Paris.",
                                                   "rejected": "Lyon, I think."}])
    report = ldd.prepare_dpo_dataset([ChatSource(files=[str(rows)])], tmp_path / "dpo", max_seq_len=256,
                                     tokenizer_path=str(out), val_fraction=0.0, num_workers=0, show_progress=False)
    head = chat_ids(hf, [{"role": "user", "content": "Capital of France?"}], add_generation_prompt=True)
    eot = hf.convert_tokens_to_ids("<|eot_id|>")
    expected = [(head + hf_ids(hf, r) + [eot], [0] * len(head) + [1] * (len(hf_ids(hf, r)) + 1))
                for r in ("Paris.", "Lyon, I think.")]
    [shard] = report["manifest"]["splits"]["train"]["shards"]
    assert shard_sequences(tmp_path / "dpo", shard) == expected


def test_generation_stops_at_the_trained_tokenizers_eot(tok, hf, one_torch_thread):
    """A tiny model taught one exchange (rendered by transformers) answers it and stops at <|eot_id|>."""
    answer = "Tokyo, of course."
    sequence = chat_ids(hf, [{"role": "user", "content": "Capital of Japan?"},
                             {"role": "assistant", "content": answer}])
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=tok.n_words,
                                  multiple_of=32, max_seq_len=64))
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-2)
    x, y = torch.tensor([sequence[:-1]]), torch.tensor([sequence[1:]])
    for _ in range(60):
        logits, _ = model(x)
        loss = torch.nn.functional.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    assert complete(model, tok, "Capital of Japan?", max_new_tokens=30, chat=True) == answer
    prompt = tok.encode_chat([{"role": "user", "content": "Capital of Japan?"}])
    free = list(generate_tokens(model, prompt, max_new_tokens=30, stop_ids=[]))
    assert free[: len(hf_ids(hf, answer)) + 1] == hf_ids(hf, answer) + [hf.convert_tokens_to_ids("<|eot_id|>")]


def test_export_writes_the_trained_tokenizer_and_its_stop_ids(trained, tok, tmp_path):
    out, _, _ = trained
    model = Transformer(ModelArgs(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=tok.n_words,
                                  multiple_of=32, max_seq_len=64))
    export_hf(model, tmp_path / "hf", tok)
    assert (tmp_path / "hf" / "tokenizer.json").read_bytes() == (out / "tokenizer.json").read_bytes()
    generation = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert generation == {"bos_token_id": tok.bos_id, "eos_token_id": tok.stop_tokens}
    exported = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert chat_ids(exported, DIALOGS[0], add_generation_prompt=True) == tok.encode_chat(DIALOGS[0])


# ---- settings and bad input ---------------------------------------------------------------------------


def test_max_bytes_trains_on_that_prefix_of_the_corpus_cut_at_a_character(tmp_path):
    docs = ["é" * 10, "abc", "日本語" * 5]  # 20, 3 and 45 bytes
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"text": d} for d in docs])
    stats = tt.CorpusStats()
    texts = list(tt.corpus_texts([Source(files=[str(corpus)]).resolve()], 30, stats))
    assert texts == ["é" * 10, "abc", "日本"]  # 20 + 3 + 6 bytes: a third character would pass 30
    assert (stats.documents, stats.bytes) == (3, 29)


def main_error(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as e:
        tt.main(list(argv))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    return err


def test_a_vocabulary_too_small_for_bytes_and_special_tokens_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"text": "some text"}])
    err = main_error(capsys, "--files", str(corpus), "--vocab_size", "511", "--out_dir", str(tmp_path / "t"))
    assert "--vocab_size 511" in err and "at least 512" in err
    assert not (tmp_path / "t").exists()
    tt.train_tokenizer([Source(files=[str(corpus)])], tmp_path / "t", vocab_size=512, show_progress=False)
    assert Tokenizer(tmp_path / "t" / "tokenizer.model").n_words == 512  # bytes and special tokens only


def test_an_empty_corpus_is_one_line_and_writes_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"text": ""}, {"text": "  \n"}, {"text": None}])
    err = main_error(capsys, "--files", str(corpus), "--vocab_size", "600", "--out_dir", str(tmp_path / "t"))
    assert "no text to train on" in err and "3 rows read, 2 empty, 1 not text" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.jsonl"]


def test_a_non_empty_out_dir_is_refused_unless_overwrite_replaces_it(trained, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _, corpus, _ = trained
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "notes.txt").write_text("mine")
    err = main_error(capsys, "--files", str(corpus), "--vocab_size", "600", "--out_dir", str(tmp_path / "t"))
    assert "is not empty" in err and "--overwrite" in err
    assert [p.name for p in (tmp_path / "t").iterdir()] == ["notes.txt"]
    tt.main(["--files", str(corpus), "--vocab_size", "600", "--out_dir", str(tmp_path / "t"), "--overwrite"])
    assert not (tmp_path / "t" / "notes.txt").exists() and load_tokenizer(tmp_path / "t").n_words == 600
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary directory left


def test_a_negative_max_bytes_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    err = main_error(capsys, "--max_bytes", "-1", "--out_dir", str(tmp_path / "t"))
    assert "--max_bytes must be >= 0" in err


def test_unreadable_sources_are_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataPrepError, match="file not found"):
        tt.train_tokenizer([Source(files=[str(tmp_path / "missing.jsonl")])], tmp_path / "t", show_progress=False)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "fine"}\n{"text": "cut off\n')
    err = main_error(capsys, "--files", str(broken), "--vocab_size", "600", "--out_dir", str(tmp_path / "t"))
    assert str(broken) in err
    assert not (tmp_path / "t").exists()


# ---- the commands, as a user runs them --------------------------------------------------------------------


@pytest.mark.e2e
def test_cli_tokenizer_then_data_then_train_py_with_vocab_size_0(trained, tmp_path):
    """As a user runs it: train_tokenizer.py, load_pretrain_dataset.py with TOKENIZER_PATH, train.py with
    VOCAB_SIZE=0. (train.py refusing data of another tokenizer is the loader test above: it prints DataError
    as one line, as test_train.py shows for every DataError.)"""
    _, corpus, _ = trained
    made = run_script("train_tokenizer.py", tmp_path, "--files", str(corpus), "--vocab_size", "700",
                      "--out_dir", "tok")
    assert made.returncode == 0, made.stderr
    assert "700 tokens" in made.stdout and "TOKENIZER_PATH=tok" in made.stdout
    prepared = subprocess.run([sys.executable, str(REPO / "load_pretrain_dataset.py"), "--files", str(corpus),
                               "--out_dir", "data", "--num_workers", "0"], cwd=tmp_path, capture_output=True, text=True,
                              env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
                                   "TOKENIZER_PATH": str(tmp_path / "tok")})
    assert prepared.returncode == 0, prepared.stderr
    assert json.loads((tmp_path / "data" / "manifest.json").read_text())["tokenizer"] == \
        Tokenizer(tmp_path / "tok" / "tokenizer.model").identity()

    env_file = write_env(tmp_path / "run.env", tmp_path / "data", tmp_path / "run", TOKENIZER_PATH=str(tmp_path / "tok"),
                         VOCAB_SIZE="0", MAX_STEPS="2", VALIDATE_EVERY_X_STEPS="0", SAVE_EVERY_X_STEPS="2")
    runs = subprocess.run([sys.executable, str(REPO / "train.py"), "--env_file", str(env_file)], capture_output=True,
                          text=True, cwd=tmp_path, env=clean_env(), timeout=240)
    assert runs.returncode == 0, runs.stdout[-2000:] + runs.stderr[-2000:]
    assert read_checkpoint(tmp_path / "run" / "checkpoints" / "step_000002.pt")["model_args"]["vocab_size"] == 700
