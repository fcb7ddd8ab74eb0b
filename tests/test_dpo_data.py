"""DPO data preparation: chosen/rejected sequences against Meta's own ChatFormat (`llama_models`), on real files."""

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may touch the network (read when datasets is imported)

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from llama_models.datatypes import RawMessage
from llama_models.llama3.chat_format import ChatFormat
from llama_models.llama3.tokenizer import Tokenizer as MetaTokenizer

import chat_tasks
import load_dpo_dataset as ldd
import load_instruct_dataset as lid
from data_sources import ChatSource
from sequence_preparation import TASKS_VAL_FRACTION
from shard_format import REFERENCE_LOGPS_DIR
from prep_helpers import disk_full_at_save, run_script, shard_sequences, write_jsonl

SYSTEM = {"role": "system", "content": "You answer briefly."}
USER = {"role": "user", "content": "Capital of France?"}


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


@pytest.fixture(scope="module")
def chat() -> ChatFormat:
    return ChatFormat(MetaTokenizer.get_instance())


def meta_pair(chat: ChatFormat, prompt: list[dict], chosen: str, rejected: str) -> list[tuple[list[int], list[int]]]:
    """The expected two sequences: Meta's dialog prompt (ending with the assistant header), then the response
    as Meta encodes an assistant message after its header; the mask 1 on the response only."""
    head = chat.encode_dialog_prompt([RawMessage(role=m["role"], content=m["content"]) for m in prompt]).tokens
    pair = []
    for text in (chosen, rejected):
        message, _ = chat.encode_message(RawMessage(role="assistant", content=text), tool_prompt_format=None)
        response = message[len(chat._encode_header("assistant")) :]
        pair.append((head + response, [0] * len(head) + [1] * len(response)))
    return pair


def prepare(sources, out_dir, **kw):
    kw = {"max_seq_len": 256, "val_fraction": 0.0, "shard_size": 400, "num_workers": 0, "show_progress": False, **kw}
    return ldd.prepare_dpo_dataset(sources, out_dir, **kw)


def read_pairs(out_dir: Path, manifest: dict, split: str = "train") -> list[list[tuple[list[int], list[int]]]]:
    """[[chosen, rejected], ...] as (tokens, mask), checking that no shard splits a pair."""
    pairs = []
    for shard in manifest["splits"][split]["shards"]:
        assert shard["num_sequences"] % 2 == 0 and shard["num_pairs"] == shard["num_sequences"] // 2
        sequences = shard_sequences(out_dir, shard)
        pairs += [sequences[i : i + 2] for i in range(0, len(sequences), 2)]
    return pairs


def hh(*turns: str) -> str:
    return "".join(f"\n\n{'Human' if i % 2 == 0 else 'Assistant'}: {t}" for i, t in enumerate(turns))


# (row, prompt, chosen, rejected)
SHAPES = {
    "pairs": ({"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "Lyon."}, [USER], "Paris.", "Lyon."),
    "pairs with a prompt of turns": ({"prompt": [SYSTEM, USER], "chosen": "Paris.", "rejected": "Rome."},
                                     [SYSTEM, USER], "Paris.", "Rome."),
    "messages, whole conversations": (
        {"prompt": "ignored", "chosen": [SYSTEM, USER, assistant("Paris."), user("And Japan?"), assistant("Tokyo.")],
         "rejected": [SYSTEM, USER, assistant("Paris."), user("And Japan?"), assistant("Kyoto.")], "score_chosen": 8.0},
        [SYSTEM, USER, assistant("Paris."), user("And Japan?")], "Tokyo.", "Kyoto."),
    "messages, responses only": ({"prompt": "Capital of Spain?", "chosen": [assistant("Madrid.")],
                                  "rejected": [assistant("Seville.")]},
                                 [user("Capital of Spain?")], "Madrid.", "Seville."),
    "hh transcripts": ({"chosen": hh("Hi there", "Hello!", "Capital of Italy?", "Rome."),
                        "rejected": hh("Hi there", "Hello!", "Capital of Italy?", "I don't know.")},
                       [user("Hi there"), assistant("Hello!"), user("Capital of Italy?")], "Rome.", "I don't know."),
}


@pytest.mark.parametrize("storage", ["jsonl", "dataset_dir"])
def test_every_row_shape_gives_meta_rendered_pairs_scoring_the_response_only(chat, tmp_path, storage):
    sources = []
    for i, (row, *_) in enumerate(SHAPES.values()):
        folder = tmp_path / f"shape{i}"
        folder.mkdir()
        if storage == "jsonl":
            sources.append(ChatSource(files=[str(write_jsonl(folder / "rows.jsonl", [row]))]))
        else:  # the --dataset code path, on a local dataset directory
            pq.write_table(pa.Table.from_pylist([row]), folder / "part-0.parquet")
            sources.append(ChatSource(dataset=str(folder)))
    report = prepare(sources, tmp_path / "out")
    written = sorted(read_pairs(tmp_path / "out", report["manifest"]))
    assert written == sorted(meta_pair(chat, *expected) for _, *expected in SHAPES.values())
    assert report["manifest"]["stats"]["skipped"] == {}


def test_pairs_share_the_prompt_tokens_and_differ_only_in_the_response(tmp_path):
    rows = list(chat_tasks.preference_rows(chat_tasks.generate(300)))
    report = prepare([ChatSource(files=[str(write_jsonl(tmp_path / "a.jsonl", rows))])], tmp_path / "out")
    pairs = read_pairs(tmp_path / "out", report["manifest"])
    assert len(pairs) == 300 and len(report["manifest"]["splits"]["train"]["shards"]) > 1
    for (chosen, chosen_mask), (rejected, rejected_mask) in pairs:
        n = chosen_mask.index(1)
        assert chosen[:n] == rejected[:n] and rejected_mask.index(1) == n  # the same prompt, token for token
        assert set(chosen_mask[n:]) == set(rejected_mask[n:]) == {1} and chosen[n:] != rejected[n:]


MALFORMED = [
    ({"prompt": "q", "chosen": "same", "rejected": "same"}, "identical"),
    ({"prompt": "q", "chosen": "", "rejected": "no"}, "empty_content"),
    ({"prompt": "q", "chosen": "a", "rejected": 3}, "wrong_type"),
    ({"prompt": "q", "chosen": "a", "rejected": ["b"]}, "wrong_type"),
    ({"chosen": [USER, assistant("a")], "rejected": [user("Other?"), assistant("b")]}, "prompts_differ"),
    ({"chosen": [USER, assistant("a")], "rejected": [USER]}, "no_response"),
    ({"chosen": [USER, {"role": "robot", "content": "a"}], "rejected": [USER, assistant("b")]}, "unknown_role"),
    ({"chosen": [assistant("a"), USER, assistant("b")], "rejected": [assistant("a"), USER, assistant("c")],
      "prompt": None}, "wrong_type"),
    ({"chosen": hh("q", "a"), "rejected": hh("other q", "b")}, "prompts_differ"),
    ({"chosen": "Human: q Assistant: a", "rejected": "Human: q Assistant: b"}, "unparsable"),
    ({"prompt": "q", "response": "a"}, "unrecognised_shape"),
]


def test_malformed_pairs_are_skipped_counted_and_shown(chat, tmp_path):
    good = {"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "Lyon."}
    rows = [good] + [row for row, _ in MALFORMED]
    report = prepare([ChatSource(files=[str(write_jsonl(tmp_path / "a.jsonl", rows))])], tmp_path / "out")
    stats = report["manifest"]["stats"]
    expected: dict[str, int] = {}
    for _, reason in MALFORMED:
        expected[reason] = expected.get(reason, 0) + 1
    assert stats["skipped"] == expected and stats["kept"] == 1 and stats["rows"] == len(rows)
    assert stats["skipped_examples"][0].endswith("row 1: identical (chosen and rejected are the same response)")
    assert read_pairs(tmp_path / "out", report["manifest"]) == [meta_pair(chat, [USER], "Paris.", "Lyon.")]


# ---- too long ---------------------------------------------------------------------------------------------


def test_a_long_prompt_loses_whole_leading_exchanges_first_and_keeps_its_system_turn(chat, tmp_path):
    earlier = [user("word " * 40), assistant("ok " * 20)]
    prompt = [SYSTEM, *earlier, USER]
    row = {"chosen": [*prompt, assistant("Paris.")], "rejected": [*prompt, assistant("Lyon.")]}
    limit = len(meta_pair(chat, [SYSTEM, USER], "Paris.", "Lyon.")[0][0]) + 5  # room for the last exchange only
    report = prepare([ChatSource(files=[str(write_jsonl(tmp_path / "a.jsonl", [row]))])], tmp_path / "out",
                     max_seq_len=limit, min_prompt_tokens=8)
    assert read_pairs(tmp_path / "out", report["manifest"]) == [meta_pair(chat, [SYSTEM, USER], "Paris.", "Lyon.")]
    assert report["manifest"]["stats"]["changed"] == {"prompt_cut": 1, "prompt_turns_cut": 2}


def test_a_long_single_turn_is_cut_from_its_start_down_to_the_floor_else_dropped(chat, tmp_path):
    meta = MetaTokenizer.get_instance()
    long_question = " ".join(f"w{i}" for i in range(120)) + " Capital of France?"
    rows = [{"prompt": long_question, "chosen": "Paris.", "rejected": "Lyon."},
            {"prompt": "Short?", "chosen": "yes " * 100, "rejected": "no"}]  # leaves too little for the prompt
    limit, floor = 64, 24
    report = prepare([ChatSource(files=[str(write_jsonl(tmp_path / "a.jsonl", rows))])], tmp_path / "out",
                     max_seq_len=limit, min_prompt_tokens=floor)
    (chosen, mask), (rejected, _) = read_pairs(tmp_path / "out", report["manifest"])[0]
    # by hand from Meta's pieces: bos, user header, the question's last tokens, eot, assistant header, response
    full = meta_pair(chat, [user(long_question)], "Paris.", "Lyon.")
    content = meta.encode(long_question, bos=False, eos=False)
    user_header = chat._encode_header("user")
    excess = max(len(full[0][0]), len(full[1][0])) - limit  # what the longer sequence is over the limit
    kept = content[excess:]
    assert chosen == [meta.special_tokens["<|begin_of_text|>"], *user_header, *kept,
                      *full[0][0][1 + len(user_header) + len(content) :]]
    assert max(len(chosen), len(rejected)) == limit and mask[-1] == 1 and sum(mask) == sum(full[0][1])
    stats = report["manifest"]["stats"]
    assert stats["changed"] == {"prompt_cut": 1, "prompt_turn_shortened": 1} and stats["skipped"] == {"too_long": 1}


# ---- splits, resume, the embedded default ---------------------------------------------------------------


def test_resume_after_an_interruption_gives_identical_output(tmp_path):
    rows = list(chat_tasks.preference_rows(chat_tasks.generate(150)))
    rows += rows[:40]  # duplicates: their prompts must land where the first copies did
    data = write_jsonl(tmp_path / "a.jsonl", rows)
    clean = prepare([ChatSource(files=[str(data)])], tmp_path / "clean", shard_size=600, val_fraction=0.2)
    with disk_full_at_save(10), pytest.raises(OSError, match="disk full"):
        prepare([ChatSource(files=[str(data)])], tmp_path / "out", shard_size=600, val_fraction=0.2)
    report = prepare([ChatSource(files=[str(data)])], tmp_path / "out", shard_size=600, val_fraction=0.2)
    assert report["resumed_shards"] >= 2
    files = lambda d: {p.name: p.read_bytes() for p in sorted(d.glob("*.npy"))}  # noqa: E731
    assert files(tmp_path / "out") == files(tmp_path / "clean")
    prompts = {split: {json.dumps(c[: c_mask.index(1)]) for (c, c_mask), _ in read_pairs(tmp_path / "out", clean["manifest"], split)}
               for split in ("train", "val")}
    assert prompts["val"] and not prompts["train"] & prompts["val"]


@pytest.mark.e2e
def test_default_split_matches_the_sft_default_and_the_cli_prepares_it(tmp_path):
    """The DPO default is the SFT default's conversations: the same prompts held out, none of them trained."""
    result = run_script("load_dpo_dataset.py", tmp_path, "--out_dir", str(tmp_path / "dpo"))
    assert result.returncode == 0, result.stderr
    assert "6,400 rows read, 6,400 pairs kept" in result.stdout
    manifest = json.loads((tmp_path / "dpo" / "manifest.json").read_text())
    assert manifest["kind"] == "preference" and manifest["exact_answers"] is True
    assert manifest["splits"]["train"]["num_pairs"] * 2 == manifest["splits"]["train"]["num_sequences"]
    sft = lid.prepare_instruct_dataset([ChatSource(files=[str(lid.default_data_file(tmp_path / "raw"))])],
                                       tmp_path / "sft", max_seq_len=256, val_fraction=TASKS_VAL_FRACTION,
                                       show_progress=False)["manifest"]
    sft_val = [json.loads(line)["messages"] for line in (tmp_path / "sft" / "eval.jsonl").read_text().splitlines()]
    dpo_prompt = lambda pair: pair[0][0][: pair[0][1].index(1)]  # noqa: E731  the chosen sequence's unscored part
    dpo = {split: [dpo_prompt(p) for p in read_pairs(tmp_path / "dpo", manifest, split)] for split in ("train", "val")}
    chat = ChatFormat(MetaTokenizer.get_instance())
    rendered = lambda msgs: chat.encode_dialog_prompt(  # noqa: E731
        [RawMessage(role=m["role"], content=m["content"]) for m in msgs]).tokens
    assert sorted(dpo["val"]) == sorted(rendered(m) for m in sft_val)
    assert not {json.dumps(p) for p in dpo["train"]} & {json.dumps(p) for p in dpo["val"]}
    assert sft["stats"]["val"] == manifest["stats"]["val"]


# ---- what the trainer keeps beside the data ---------------------------------------------------------------


def test_each_shard_records_the_sha256_of_its_tokens_mask_and_offsets(tmp_path):
    """The content, not the names and counts, identifies the data: DPO's precomputed reference is keyed by it."""
    import hashlib

    import numpy as np

    rows = list(chat_tasks.preference_rows(chat_tasks.generate(60)))
    report = prepare([ChatSource(files=[str(write_jsonl(tmp_path / "a.jsonl", rows))])], tmp_path / "out",
                     val_fraction=0.2)
    shards = [s for split in ("train", "val") for s in report["manifest"]["splits"][split]["shards"]]
    assert len(shards) > 2
    for shard in shards:
        content = b"".join(np.load(tmp_path / "out" / shard[key]).tobytes() for key in ("tokens", "mask", "offsets"))
        assert shard["sha256"] == hashlib.sha256(content).hexdigest()


def test_overwrite_removes_the_reference_log_probs_computed_from_the_old_pairs(tmp_path):
    rows = [{"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "Lyon."}]
    source = [ChatSource(files=[str(write_jsonl(tmp_path / "a.jsonl", rows))])]
    prepare(source, tmp_path / "out")
    table = tmp_path / "out" / REFERENCE_LOGPS_DIR / "0123456789abcdef.npy"  # as the trainer leaves one
    table.parent.mkdir()
    table.write_bytes(b"stale")
    swapped = [{"prompt": "Capital of France?", "chosen": "Lyon.", "rejected": "Paris."}]
    prepare([ChatSource(files=[str(write_jsonl(tmp_path / "a.jsonl", swapped))])], tmp_path / "out", overwrite=True)
    assert not table.parent.exists()
