"""SFT data preparation: chat shards against Meta's own ChatFormat (`llama_models`), on real files read by `datasets`."""

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may touch the network (read when datasets is imported)

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from llama_models.datatypes import RawMessage
from llama_models.llama3.chat_format import ChatFormat
from llama_models.llama3.tokenizer import Tokenizer as MetaTokenizer

import chat_tasks
import load_instruct_dataset as lid
from conversations import ChatRenderer, conversation_from_tokens
from data_preparation_utils import DataPrepError, cached_tokenizer
from data_sources import ChatSource, load_mix_file
from sequence_preparation import TASKS_VAL_FRACTION
from prep_helpers import disk_full_at_save, run_script, shard_sequences, write_jsonl

SYSTEM = {"role": "system", "content": "You answer briefly."}
CHAT = [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Japan? 日本 <|eot_id|> stays text"},
        {"role": "assistant", "content": "Tokyo.\n\n"}]


@pytest.fixture(scope="module")
def chat() -> ChatFormat:
    return ChatFormat(MetaTokenizer.get_instance())


def meta_tokens(chat: ChatFormat, messages: list[dict]) -> list[int]:
    """Meta's rendering of a whole conversation: its dialog prompt without the trailing assistant header."""
    tokens = chat.encode_dialog_prompt([RawMessage(role=m["role"], content=m["content"]) for m in messages]).tokens
    return tokens[: -len(chat._encode_header("assistant"))]


def meta_mask(chat: ChatFormat, messages: list[dict]) -> list[int]:
    """1 on what follows the header of each assistant message as Meta encodes it (content and eot), else 0."""
    mask = [0]  # <|begin_of_text|>
    for m in messages:
        tokens, _ = chat.encode_message(RawMessage(role=m["role"], content=m["content"]), tool_prompt_format=None)
        header = len(chat._encode_header(m["role"]))
        mask += [0] * header + [int(m["role"] == "assistant")] * (len(tokens) - header)
    return mask


def prepare(sources, out_dir, **kw):
    kw = {"max_seq_len": 256, "val_fraction": 0.2, "shard_size": 400, "num_workers": 0, "show_progress": False, **kw}
    return lid.prepare_instruct_dataset(sources, out_dir, **kw)


def read_split(out_dir: Path, manifest: dict, split: str) -> list[tuple[list[int], list[int]]]:
    """Every (tokens, mask) sequence of a split, read back through the offsets files."""
    return [seq for shard in manifest["splits"][split]["shards"] for seq in shard_sequences(out_dir, shard)]


def all_sequences(out_dir: Path, manifest: dict) -> list[tuple[list[int], list[int]]]:
    return read_split(out_dir, manifest, "train") + read_split(out_dir, manifest, "val")


# ---- rendering and mask -------------------------------------------------------------------------------


@pytest.mark.parametrize("messages", [CHAT, [SYSTEM, *CHAT], [SYSTEM, *CHAT[:2]]],
                         ids=["multi-turn", "multi-turn with system", "one exchange with system"])
def test_rendering_and_mask_equal_meta_chat_format(chat, messages, tmp_path):
    tokens, mask, _ = ChatRenderer(cached_tokenizer(None)).render(messages)
    assert tokens.tolist() == meta_tokens(chat, messages)
    assert mask.tolist() == meta_mask(chat, messages)
    # and as written to disk, through a file
    report = prepare([ChatSource(files=[str(write_jsonl(tmp_path / "a.jsonl", [{"messages": messages}]))])],
                     tmp_path / "out", val_fraction=0.0)
    assert all_sequences(tmp_path / "out", report["manifest"]) == [(meta_tokens(chat, messages),
                                                                     meta_mask(chat, messages))]


def test_mask_is_one_exactly_on_assistant_content_and_its_eot(chat):
    tok = cached_tokenizer(None)
    tokens, mask, _ = ChatRenderer(tok).render([SYSTEM, *CHAT])
    trained = [t for t, m in zip(tokens.tolist(), mask.tolist()) if m]
    # by hand: each answer's text tokens, then eot
    paris, tokyo = (tok.encode(text, bos=False, eos=False) for text in ("Paris.", "Tokyo.\n\n"))
    assert trained == paris + [tok.eot_id] + tokyo + [tok.eot_id]
    assert mask[0] == 0 and tokens[0] == tok.bos_id


# ---- row shapes ---------------------------------------------------------------------------------------


SHAPES = {
    "messages": ({"messages": [SYSTEM, *CHAT], "prompt": "ignored"}, [SYSTEM, *CHAT]),
    "conversation": ({"conversation": CHAT, "model": "x"}, CHAT),
    "sharegpt": ({"conversations": [{"from": "system", "value": SYSTEM["content"]}, {"from": "human", "value": "Hi"},
                                    {"from": "gpt", "value": "Hello"}]},
                 [SYSTEM, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]),
    "alpaca": ({"instruction": "Add.", "input": "2 and 3", "output": "5"},
               [{"role": "user", "content": "Add.\n\n2 and 3"}, {"role": "assistant", "content": "5"}]),
    "alpaca without input": ({"instruction": "Say hi.", "input": "", "output": "hi"},
                             [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "hi"}]),
    "prompt_response": ({"prompt": "2+2?", "response": "4"},
                        [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]),
    "prompt_completion": ({"prompt": "3+3?", "completion": "6"},
                          [{"role": "user", "content": "3+3?"}, {"role": "assistant", "content": "6"}]),
}


@pytest.mark.parametrize("storage", ["jsonl", "parquet", "dataset_dir"])
def test_every_row_shape_is_recognised(chat, tmp_path, storage):
    """One file (or hub-style dataset directory) per shape, each read through `datasets` as it would be."""
    sources = []
    for i, (row, _) in enumerate(SHAPES.values()):
        folder = tmp_path / f"shape{i}"
        folder.mkdir()
        if storage == "jsonl":
            sources.append(ChatSource(files=[str(write_jsonl(folder / "rows.jsonl", [row]))]))
        else:
            pq.write_table(pa.Table.from_pylist([row]), folder / "part-0.parquet")
            sources.append(ChatSource(files=[str(folder / "part-0.parquet")]) if storage == "parquet"
                           else ChatSource(dataset=str(folder)))  # the --dataset code path on a local dataset
    report = prepare(sources, tmp_path / "out", val_fraction=0.0)
    written = sorted(tokens for tokens, _ in all_sequences(tmp_path / "out", report["manifest"]))
    assert written == sorted(meta_tokens(chat, messages) for _, messages in SHAPES.values())
    assert report["manifest"]["stats"]["skipped"] == {}


def test_format_forces_one_shape(chat, tmp_path):
    row = {"messages": CHAT, "prompt": "2+2?", "response": "4"}
    path = write_jsonl(tmp_path / "a.jsonl", [row])
    report = prepare([ChatSource(files=[str(path)], format="prompt_response")], tmp_path / "out", val_fraction=0.0)
    expected = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    assert [t for t, _ in all_sequences(tmp_path / "out", report["manifest"])] == [meta_tokens(chat, expected)]
    with pytest.raises(DataPrepError, match="format 'chatml' is invalid"):
        prepare([ChatSource(files=[str(path)], format="chatml")], tmp_path / "out2")


MALFORMED = [
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "yo"}]}, "unknown_role"),
    ({"messages": [{"content": "hi"}, {"role": "assistant", "content": "yo"}]}, "missing_role"),
    ({"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "yo"}]}, "wrong_type"),
    ({"messages": "hello"}, "wrong_type"),
    ({"messages": ["hello", "there"]}, "wrong_type"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant"}]}, "missing_content"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]}, "empty_content"),
    ({"messages": [{"role": "assistant", "content": "yo"}, {"role": "user", "content": "hi"}]}, "not_user_first"),
    ({"messages": [{"role": "system", "content": "be nice"}]}, "not_user_first"),
    ({"messages": []}, "not_user_first"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "no_assistant"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "system", "content": "x"},
                   {"role": "assistant", "content": "yo"}]}, "misplaced_system"),
    ({"instruction": "x", "output": 3}, "wrong_type"),
    ({"prompt": "x", "response": None}, "unrecognised_shape"),
    ({"text": "plain text"}, "unrecognised_shape"),
]


def test_malformed_rows_are_skipped_counted_and_shown(chat, tmp_path):
    good = {"messages": CHAT}
    trailing = {"messages": [*CHAT, {"role": "user", "content": "unanswered"}]}
    rows = [good] + [row for row, _ in MALFORMED] + [trailing]
    report = prepare([ChatSource(files=[str(write_jsonl(tmp_path / "a.jsonl", rows))])], tmp_path / "out",
                     val_fraction=0.0)
    stats = report["manifest"]["stats"]
    expected: dict[str, int] = {}
    for _, reason in MALFORMED:
        expected[reason] = expected.get(reason, 0) + 1
    assert stats["skipped"] == expected and stats["rows"] == len(rows) and stats["kept"] == 2
    assert stats["changed"] == {"trailing_turns_removed": 1}
    assert stats["skipped_examples"][0].endswith("a.jsonl row 1: unknown_role (turn 1 has role 'bot')")
    assert len(stats["skipped_examples"]) == 5
    assert [t for t, _ in all_sequences(tmp_path / "out", report["manifest"])] == [meta_tokens(chat, CHAT)] * 2


def test_system_prompt_is_added_only_where_there_is_none(chat, tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"messages": CHAT}, {"messages": [SYSTEM, *CHAT[:2]]}])
    default = {"role": "system", "content": "Default system."}
    report = prepare([ChatSource(files=[str(path)])], tmp_path / "out", system_prompt=default["content"],
                     val_fraction=0.0)
    assert [t for t, _ in all_sequences(tmp_path / "out", report["manifest"])] == [
        meta_tokens(chat, [default, *CHAT]), meta_tokens(chat, [SYSTEM, *CHAT[:2]])]
    assert report["manifest"]["stats"]["changed"] == {"system_prompt_added": 1}


# ---- too long -------------------------------------------------------------------------------------------


def test_overflow_truncate_cuts_whole_trailing_turns_and_drop_drops(chat, tmp_path):
    three = [*CHAT, {"role": "user", "content": "And Peru?"}, {"role": "assistant", "content": "Lima."}]
    short = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    first_too_long = [{"role": "user", "content": "word " * 300}, {"role": "assistant", "content": "ok"}]
    path = write_jsonl(tmp_path / "a.jsonl", [{"messages": m} for m in (three, short, first_too_long)])
    limit = len(meta_tokens(chat, three[:4])) + 3  # the first two exchanges fit, not the third
    truncated = prepare([ChatSource(files=[str(path)])], tmp_path / "t", max_seq_len=limit, val_fraction=0.0)
    assert [t for t, _ in all_sequences(tmp_path / "t", truncated["manifest"])] == [
        meta_tokens(chat, three[:4]), meta_tokens(chat, short)]
    stats = truncated["manifest"]["stats"]
    assert stats["changed"] == {"truncated": 1, "turns_cut": 2} and stats["skipped"] == {"too_long": 1}
    dropped = prepare([ChatSource(files=[str(path)])], tmp_path / "d", max_seq_len=limit, overflow="drop",
                      val_fraction=0.0)
    assert [t for t, _ in all_sequences(tmp_path / "d", dropped["manifest"])] == [meta_tokens(chat, short)]
    assert dropped["manifest"]["stats"]["skipped"] == {"too_long": 2} and dropped["manifest"]["max_seq_len"] == limit


# ---- splits, manifest, eval file -----------------------------------------------------------------------


def conversations(n: int, seed: int = 0) -> list[dict]:
    return list(chat_tasks.chat_rows(chat_tasks.generate(n, seed=seed)))


def test_duplicates_and_equal_prompts_never_straddle_the_splits(tmp_path):
    base = conversations(60)
    same_prompt = [{"messages": [*r["messages"][:-1], {"role": "assistant", "content": "another answer"}]}
                   for r in base[:30]]
    rows = base + base[::-1] + same_prompt + base[:1]  # the first conversation, which goes to val, again at the end
    report = prepare([ChatSource(files=[str(write_jsonl(tmp_path / "a.jsonl", rows))])], tmp_path / "out",
                     val_fraction=0.3)
    tok = cached_tokenizer(None)
    prompts = {}
    for split in ("train", "val"):
        for tokens, _ in read_split(tmp_path / "out", report["manifest"], split):
            prompt = json.dumps(conversation_from_tokens(tok, np.array(tokens))[:-1])
            prompts.setdefault(prompt, set()).add(split)
    assert len(prompts) == 60 and all(len(splits) == 1 for splits in prompts.values())
    assert 0 < sum(splits == {"val"} for splits in prompts.values()) < 60


def test_manifest_and_eval_file_follow_the_agreed_format(chat, tmp_path):
    rows = conversations(80)
    report = prepare([ChatSource(files=[str(write_jsonl(tmp_path / "a.jsonl", rows))])], tmp_path / "out",
                     max_seq_len=64, shard_size=300)
    out, manifest = tmp_path / "out", report["manifest"]
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert (manifest["format"], manifest["version"], manifest["kind"], manifest["dtype"]) == (
        "llama3-sequence-shards", 1, "chat", "uint32")
    assert manifest["tokenizer"] == cached_tokenizer(None).identity()
    assert manifest["max_seq_len"] == 64 and manifest["exact_answers"] is False
    by_text = {json.dumps(meta_tokens(chat, r["messages"])): r for r in rows}
    for split in ("train", "val"):
        entry, sequences = manifest["splits"][split], read_split(out, manifest, split)
        assert len(entry["shards"]) >= 2 if split == "train" else len(entry["shards"]) >= 1
        assert all(s["num_tokens"] <= 300 for s in entry["shards"])
        assert entry["num_sequences"] == len(sequences) == sum(s["num_sequences"] for s in entry["shards"])
        assert entry["num_tokens"] == sum(len(t) for t, _ in sequences)
        assert entry["num_trained_tokens"] == sum(sum(m) for _, m in sequences)
        for tokens, mask in sequences:  # each is one input conversation, rendered and masked as Meta's format says
            row = by_text[json.dumps(tokens)]
            assert mask == meta_mask(chat, row["messages"]) and len(tokens) <= 64
    assert manifest["stats"]["train"] + manifest["stats"]["val"] == 80
    # eval.jsonl: each held-out conversation in val order, split into the turns before the answer and the answer
    evals = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]
    val = [by_text[json.dumps(t)]["messages"] for t, _ in read_split(out, manifest, "val")]
    assert evals == [{"messages": m[:-1], "answer": m[-1]["content"]} for m in val]


# ---- resume, workers ------------------------------------------------------------------------------------


def output_files(out_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out_dir.glob("*.npy"))} | {
        "eval.jsonl": (out_dir / "eval.jsonl").read_bytes()}


def test_resume_after_an_interruption_gives_identical_output(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", conversations(200))
    clean = prepare([ChatSource(files=[str(path)])], tmp_path / "clean", shard_size=500)
    with disk_full_at_save(8), pytest.raises(OSError, match="disk full"):  # the third shard's second file
        prepare([ChatSource(files=[str(path)])], tmp_path / "out", shard_size=500)
    assert list((tmp_path / "out").glob("val_*.pending"))  # held-out rows were waiting for their shard
    report = prepare([ChatSource(files=[str(path)])], tmp_path / "out", shard_size=500)
    assert report["resumed_shards"] >= 2 and report["session_rows"] < 200
    assert output_files(tmp_path / "out") == output_files(tmp_path / "clean")
    stable = lambda m: {k: v for k, v in m.items() if k not in ("created", "stats")}  # noqa: E731
    assert stable(report["manifest"]) == stable(clean["manifest"])
    assert not list((tmp_path / "out").glob("*.pending"))
    again = prepare([ChatSource(files=[str(path)])], tmp_path / "out", shard_size=500)
    assert again["already_done"]


def test_worker_processes_give_the_same_output(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", conversations(300))
    prepare([ChatSource(files=[str(path)])], tmp_path / "w0", shard_size=2000)
    prepare([ChatSource(files=[str(path)])], tmp_path / "w2", shard_size=2000, num_workers=2)
    assert output_files(tmp_path / "w0") == output_files(tmp_path / "w2")


def test_mix_applies_weights_caps_and_per_source_formats(chat, tmp_path):
    write_jsonl(tmp_path / "a.jsonl", conversations(100, seed=1))
    write_jsonl(tmp_path / "b.jsonl", [{"prompt": f"q{i}", "response": f"a{i}", "messages": CHAT} for i in range(50)])
    (tmp_path / "mix.json").write_text(json.dumps([{"files": "a.jsonl", "max_tokens": 300},
                                                   {"files": "b.jsonl", "format": "prompt_response", "weight": 2}]))
    sources = load_mix_file(str(tmp_path / "mix.json"), ChatSource)
    manifest = prepare(sources, tmp_path / "out", val_fraction=0.0)["manifest"]
    a, b = manifest["sources"]
    assert 300 <= a["tokens"] < 300 + 60 and a["kept"] < 100 and b["kept"] == 50 and b["format"] == "prompt_response"
    written = [t for t, _ in all_sequences(tmp_path / "out", manifest)]
    qa = [meta_tokens(chat, [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}])
          for i in range(50)]
    assert [t for t in written if t in qa] == qa
    with pytest.raises(DataPrepError, match="unknown key.*text_column"):
        (tmp_path / "bad.json").write_text(json.dumps([{"files": "a.jsonl", "text_column": "x"}]))
        load_mix_file(str(tmp_path / "bad.json"), ChatSource)


# ---- the embedded default -------------------------------------------------------------------------------


def test_default_is_deterministic_and_its_held_out_prompts_are_not_trained(tmp_path):
    assert chat_tasks.generate() == chat_tasks.generate()
    path = lid.default_data_file(tmp_path / "raw")
    mtime = path.stat().st_mtime_ns
    assert lid.default_data_file(tmp_path / "raw").stat().st_mtime_ns == mtime  # unchanged: not rewritten
    report = prepare([ChatSource(files=[str(path)])], tmp_path / "out", val_fraction=TASKS_VAL_FRACTION,
                     exact_answers=True, shard_size=10**7)
    manifest, tok = report["manifest"], cached_tokenizer(None)
    train = [conversation_from_tokens(tok, np.array(t)) for t, _ in read_split(tmp_path / "out", manifest, "train")]
    evals = [json.loads(line) for line in (tmp_path / "out" / "eval.jsonl").read_text().splitlines()]
    assert 4000 <= len(train) <= 8000 and 200 <= len(evals) <= 800 and manifest["exact_answers"]
    trained_questions = {m["content"] for c in train for m in c if m["role"] == "user"}  # every turn
    assert not {e["messages"][-1]["content"] for e in evals} & trained_questions
    assert not {json.dumps(e["messages"]) for e in evals} & {json.dumps(c[:-1]) for c in train}
    answers = [len(tok.encode(e["answer"], bos=False, eos=False)) for e in evals]
    assert max(answers) <= 5 and manifest["stats"]["skipped"] == {}
    turns = [len([m for m in c if m["role"] != "system"]) for c in train]
    assert 0.1 < sum(t > 2 for t in turns) / len(train) < 0.4  # some multi-turn
    assert 0.1 < sum(c[0]["role"] == "system" for c in train) / len(train) < 0.4  # some with a system turn


def test_default_words_are_single_tokens():
    tok = cached_tokenizer(None)
    assert all(len(tok.encode(w, bos=False, eos=False)) == len(tok.encode(" " + w, bos=False, eos=False)) == 1
               for w in chat_tasks.WORDS)


# ---- the command line ------------------------------------------------------------------------------------


def run_cli(tmp_path, *args):
    return run_script("load_instruct_dataset.py", tmp_path, "--out_dir", str(tmp_path / "out"), *args)


@pytest.mark.e2e
def test_cli_prepares_files_prints_skips_and_refuses_bad_input_in_one_line(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", conversations(20) + [{"messages": [{"role": "bot", "content": "x"}]}])
    result = run_cli(tmp_path, "--files", "a.jsonl", "--num_workers", "0", "--max_seq_len", "128")
    assert result.returncode == 0, result.stderr
    assert "21 rows read, 20 conversations kept" in result.stdout and "1 unknown_role" in result.stdout
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["max_seq_len"] == 128 and manifest["stats"]["kept"] == 20
    result = run_cli(tmp_path, "--files", "missing.jsonl", "--overwrite")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0] == "error: file not found: missing.jsonl"
