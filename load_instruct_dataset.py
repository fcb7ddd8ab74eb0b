"""Conversations -> Llama 3 chat-format token sequences with loss masks, in shards, for SFT.

    python load_instruct_dataset.py                      # offline default: generated tasks (chat_tasks.py)
    python load_instruct_dataset.py --files chats.jsonl more/
    python load_instruct_dataset.py --dataset HuggingFaceH4/ultrachat_200k --split train_sft
    python load_instruct_dataset.py --dataset lmsys/lmsys-chat-1m
    python load_instruct_dataset.py --mix mix.json       # [{"files": "a.jsonl", "weight": 2, "max_tokens": 1e6}, ...]

Row shapes, recognised per row (--format forces one):
  messages / conversation   a list of {"role", "content"}     (ultrachat_200k, lmsys-chat-1m)
  sharegpt                  "conversations": a list of {"from", "value"}, from = human | gpt | system
  alpaca                    "instruction", optional "input", "output"
  prompt_response           "prompt" and "response" (or "completion")

Each conversation is rendered exactly as Meta's llama-models renders a dialog: <|begin_of_text|>, then
per turn <|start_header_id|>role<|end_header_id|>\\n\\n content <|eot_id|>. The loss mask is 1 on every
assistant turn's content and the <|eot_id|> closing it (so the model learns to stop), 0 elsewhere.
SYSTEM_PROMPT is added to conversations that have no system turn (empty: none).

Skipped and counted (the first few shown): rows of no known shape, wrong types, missing or unknown
roles, empty content, a system turn after the start, conversations that do not start with a user (or
system) turn or have no assistant turn. Trailing turns after the last assistant turn are removed.
Longer than MAX_SEQ_LEN (or --max_seq_len): INSTRUCT_OVERFLOW=drop drops the conversation; truncate
keeps its start and cuts whole trailing turns, so it still ends after a complete assistant turn (dropped
if even the first exchange does not fit). About --val_fraction of the conversations, chosen by a hash
of the prompt (every turn before the final answer, as given), form the validation split: identical
conversations, and the same prompt with different answers, never straddle the splits.

Output in --out_dir (default INSTRUCT_DATA_DIR): sequence shards (`train_000000.tokens.npy`, `.mask.npy`,
`.offsets.npy`, ...), `manifest.json` (kind "chat") and `eval.jsonl`, one held-out conversation per line
as {"messages": turns before the final answer, "answer": the final answer}. An interrupted run resumes
from its last finished shard when started again with the same arguments.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

import chat_tasks
from config import ConfigError, exit_on_config_error, load_config
from data_preparation_utils import (
    BUILDER_BY_SUFFIX, EVAL_FILE, MANIFEST_FILE, DataPrepError, RowResult, SequenceBatch, SequenceJob, Source,
    document_hash, exit_on_prep_error, keep_datasets_from_importing_torch, load_mix_file, prepare_sequence_shards,
    write_jsonl_atomic, write_jsonl_if_changed,
)

DEFAULT_SHARD_SIZE = 10_000_000  # tokens per shard (40 MB of tokens, 10 MB of mask)
DEFAULT_VAL_FRACTION = 0.01
TASKS_VAL_FRACTION = 0.06  # the embedded default: a few hundred held-out conversations of 6,400
FORMATS = ("auto", "messages", "conversation", "sharegpt", "alpaca", "prompt_response")
OVERFLOW = ("drop", "truncate")
ROLES = ("system", "user", "assistant")
ROLE_ALIASES = {"human": "user", "gpt": "assistant", "chatgpt": "assistant"}  # ShareGPT's names
LIST_COLUMNS = {"messages": "messages", "conversation": "conversation", "sharegpt": "conversations"}


# ---- sources -------------------------------------------------------------------------------------


@dataclass
class ChatSource(Source):
    """A source of conversations (or preference pairs): rows of a known shape, not one text column."""

    format: str = "auto"  # the row shape; the scripts name the ones they know

    @classmethod
    def mix_types(cls) -> dict:
        types = {**Source.mix_types(), "format": str}
        del types["text_column"], types["sample_by"]  # conversations are whole rows, never plain text
        return types

    def resolve(self) -> "ChatSource":
        super().resolve()
        for path in self.paths:
            if BUILDER_BY_SUFFIX[path.suffix] == "text":
                raise DataPrepError(f"{path}: conversations need .jsonl, .json or .parquet rows, not plain text")
        return self

    def describe(self) -> dict:
        described = super().describe()
        del described["text_column"], described["sample_by"]
        return {**described, "format": self.format}


# ---- rows -> conversations --------------------------------------------------------------------------


class RowError(Exception):
    """A row that cannot be used: `reason` is the stats key it is counted under, `note` the detail."""

    def __init__(self, reason: str, note: str = ""):
        super().__init__(reason)
        self.reason, self.note = reason, note


def skipped_row(error: RowError | ValueError | TypeError) -> RowResult:
    """What an unusable row becomes: a RowError says why; a ValueError or TypeError (e.g. text the
    tokenizer refuses) is counted as unreadable: one row lost, not the run."""
    if isinstance(error, RowError):
        return RowResult(skip=error.reason, note=error.note)
    return RowResult(skip="unreadable", note=str(error)[:200])


def present(row: dict, key: str) -> bool:
    return row.get(key) is not None  # a column a row lacks reads as None (`datasets` unifies columns)


def detect_format(row: Any) -> str:
    """The first known shape whose columns the row fills."""
    if not isinstance(row, dict):
        raise RowError("wrong_type", f"a row is {type(row).__name__}, expected an object")
    for fmt, column in LIST_COLUMNS.items():
        if present(row, column):
            return fmt
    if present(row, "instruction") and present(row, "output"):
        return "alpaca"
    if present(row, "prompt") and (present(row, "response") or present(row, "completion")):
        return "prompt_response"
    raise RowError("unrecognised_shape", f"columns {', '.join(sorted(k for k in row if present(row, k)))}")


def conversation_of(row: Any, fmt: str) -> list[dict]:
    """The row's turns as [{"role", "content"}], checked for types and roles only."""
    fmt = detect_format(row) if fmt == "auto" else fmt
    if fmt in LIST_COLUMNS:
        return messages_of(row.get(LIST_COLUMNS[fmt]) if isinstance(row, dict) else None, LIST_COLUMNS[fmt])
    if fmt == "alpaca":
        instruction, extra, output = (_text(row, key) for key in ("instruction", "input", "output"))
        user = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
        return [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    prompt = _text(row, "prompt")
    answer = _text(row, "response" if present(row, "response") else "completion")
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]


def _text(row: Any, key: str) -> str:
    value = row.get(key) if isinstance(row, dict) else None
    if key == "input" and value is None:
        return ""
    if not isinstance(value, str):
        raise RowError("wrong_type", f"{key} is {type(value).__name__}, expected a string")
    return value


def messages_of(turns: Any, column: str) -> list[dict]:
    """A list of {"role", "content"} or ShareGPT's {"from", "value"}, roles mapped to system|user|assistant."""
    if not isinstance(turns, list):
        raise RowError("wrong_type", f"{column} is {type(turns).__name__}, expected a list of turns")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise RowError("wrong_type", f"turn {i} is {type(turn).__name__}, expected an object")
        role = turn["role"] if turn.get("role") is not None else turn.get("from")
        content = turn["content"] if turn.get("content") is not None else turn.get("value")
        if role is None:
            raise RowError("missing_role", f"turn {i} has no role")
        if not isinstance(role, str):
            raise RowError("wrong_type", f"turn {i}'s role is {type(role).__name__}")
        role = ROLE_ALIASES.get(role, role)
        if role not in ROLES:
            raise RowError("unknown_role", f"turn {i} has role {role!r}")
        if content is None:
            raise RowError("missing_content", f"turn {i} has no content")
        if not isinstance(content, str):
            raise RowError("wrong_type", f"turn {i}'s content is {type(content).__name__}")
        messages.append({"role": role, "content": content})
    return messages


def check_conversation(messages: list[dict], changes: dict[str, int]) -> list[dict]:
    """Raise RowError for a conversation SFT cannot use; drop turns after the last assistant turn."""
    for i, m in enumerate(messages):
        if not m["content"].strip():
            raise RowError("empty_content", f"turn {i} ({m['role']}) is empty")
        if m["role"] == "system" and i > 0:
            raise RowError("misplaced_system", f"turn {i} is a system turn")
    first = 1 if messages and messages[0]["role"] == "system" else 0
    if len(messages) <= first or messages[first]["role"] != "user":
        role = messages[first]["role"] if len(messages) > first else "nothing"
        raise RowError("not_user_first", f"the first turn after the system turn is {role}" if first
                       else f"the first turn is {role}")
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None:
        raise RowError("no_assistant", f"{len(messages)} turn(s), none from the assistant")
    if last < len(messages) - 1:
        changes["trailing_turns_removed"] = len(messages) - 1 - last
    return messages[: last + 1]


def prompt_hash(prompt: list[dict]) -> int:
    """Decides the split: a hash of the turns before the final answer, as given (before SYSTEM_PROMPT is
    added), so SFT and DPO data made from the same conversations split them the same way."""
    return document_hash(json.dumps([[m["role"], m["content"]] for m in prompt], ensure_ascii=False))


def with_system_prompt(messages: list[dict], system_prompt: str, changes: dict[str, int]) -> list[dict]:
    if not system_prompt or messages[0]["role"] == "system":
        return messages
    changes["system_prompt_added"] = 1
    return [{"role": "system", "content": system_prompt}, *messages]


# ---- conversations -> tokens and loss mask ----------------------------------------------------------


class ChatRenderer:
    """Renders conversations as Meta's ChatFormat does, with the loss mask beside the tokens."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.headers = {role: tokenizer.encode_header(role) for role in ROLES}

    def render(self, messages: list[dict]) -> tuple[np.ndarray, np.ndarray, list[int]]:
        """(tokens, mask, ends): ends[i] is the length of the rendering up to and including turn i.

        mask is 1 on each assistant turn's content and its <|eot_id|>: the tokens predicted from what
        precedes them that the model should learn to produce; 0 on <|begin_of_text|>, every header
        (the assistant's too: the model is never asked to write one) and system and user turns."""
        tok = self.tokenizer
        tokens, mask, ends = [tok.bos_id], [0], []
        for m in messages:  # Python lists, one array at the end: most turns are a few dozen tokens
            header, content = self.headers[m["role"]], tok.encode(m["content"], bos=False, eos=False)
            tokens += header
            tokens += content
            tokens.append(tok.eot_id)
            mask += [0] * len(header)
            mask += [int(m["role"] == "assistant")] * (len(content) + 1)
            ends.append(len(tokens))
        return np.array(tokens, np.uint32), np.array(mask, np.uint8), ends


def turns_that_fit(messages: list[dict], ends: list[int], max_seq_len: int, overflow: str) -> int | None:
    """How many leading turns to keep: all when they fit; else (truncate) up to the last assistant turn
    that ends within max_seq_len; None to drop the conversation."""
    if ends[-1] <= max_seq_len:
        return len(messages)
    if overflow == "drop":
        return None
    fitting = [i + 1 for i, m in enumerate(messages) if m["role"] == "assistant" and ends[i] <= max_seq_len]
    return fitting[-1] if fitting else None


@dataclass
class ChatSettings:
    formats: list[str]  # per source
    system_prompt: str
    max_seq_len: int
    overflow: str
    renderer: ChatRenderer | None = field(default=None, repr=False)


def chat_row(settings: ChatSettings, source: int, row: Any) -> RowResult:
    """One row's conversation as a sequence; runs in a worker process (see `init_row_worker`)."""
    changes: dict[str, int] = {}
    try:
        messages = check_conversation(conversation_of(row, settings.formats[source]), changes)
        content_hash = prompt_hash(messages[:-1])
        messages = with_system_prompt(messages, settings.system_prompt, changes)
        tokens, mask, ends = settings.renderer.render(messages)
    except (RowError, ValueError, TypeError) as e:
        return skipped_row(e)
    keep = turns_that_fit(messages, ends, settings.max_seq_len, settings.overflow)
    if keep is None:
        return RowResult(skip="too_long", note=f"{ends[-1]} tokens, max_seq_len {settings.max_seq_len}, "
                                               f"overflow {settings.overflow}")
    if keep < len(messages):
        changes.update(truncated=1, turns_cut=len(messages) - keep)
        tokens, mask = tokens[: ends[keep - 1]], mask[: ends[keep - 1]]
    return RowResult([(tokens, mask)], content_hash, changes=changes)


# ---- worker processes (shared with load_dpo_dataset.py) ---------------------------------------------

RowFunction = Callable[[Any, int, Any], RowResult]  # (settings, source index, row) -> what the row became
_worker: tuple[RowFunction, Any] | None = None  # this process's row function and settings (see `init_row_worker`)


def init_row_worker(tokenizer, row_function: RowFunction, settings: Any) -> None:
    """A worker's initializer: `render_rows` calls `row_function(settings, source, row)`, with this
    process's ChatRenderer in `settings.renderer`."""
    global _worker
    settings.renderer = ChatRenderer(tokenizer)
    _worker = (row_function, settings)


def render_rows(items: list[tuple[int, Any]]) -> SequenceBatch:
    """(source index, row) pairs -> one worker task's sequences; runs in a worker process."""
    row_function, settings = _worker
    return SequenceBatch.of([row_function(settings, source, row) for source, row in items])


# ---- the held-out prompts and answers ----------------------------------------------------------------


def conversation_from_tokens(tokenizer, tokens: np.ndarray) -> list[dict]:
    """The turns of one rendered conversation, read back from its tokens (the inverse of ChatRenderer)."""
    start, end, eot = (tokenizer.special_tokens[t] for t in ("<|start_header_id|>", "<|end_header_id|>",
                                                              "<|eot_id|>"))
    gap = len(tokenizer.encode("\n\n", bos=False, eos=False))  # between a header and its content
    tokens = tokens.tolist()
    messages, i = [], 1  # after <|begin_of_text|>
    while i < len(tokens):
        if tokens[i] != start:
            raise DataPrepError(f"a rendered conversation has token {tokens[i]} where a header should start")
        j = tokens.index(end, i)
        k = tokens.index(eot, j)
        messages.append({"role": tokenizer.decode(tokens[i + 1 : j]), "content": tokenizer.decode(tokens[j + 1 + gap : k])})
        i = k + 1
    return messages


def write_eval_file(out_dir: Path, tokenizer, splits: dict) -> None:
    """eval.jsonl: each validation conversation, as written to the shards, split into prompt and answer."""
    def rows():
        for shard in splits["val"]["shards"]:
            tokens, offsets = np.load(out_dir / shard["tokens"]), np.load(out_dir / shard["offsets"])
            for a, b in zip(offsets[:-1], offsets[1:]):
                messages = conversation_from_tokens(tokenizer, tokens[a:b])
                yield {"messages": messages[:-1], "answer": messages[-1]["content"]}

    write_jsonl_atomic(out_dir / EVAL_FILE, rows())


# ---- one run ---------------------------------------------------------------------------------------


def prepare_instruct_dataset(sources: list[ChatSource], out_dir: str | Path, *, max_seq_len: int,
                             overflow: str = "truncate", system_prompt: str = "", exact_answers: bool = False,
                             tokenizer_path: str | None = None, shard_size: int = DEFAULT_SHARD_SIZE,
                             val_fraction: float = DEFAULT_VAL_FRACTION, max_tokens: int = 0, num_workers: int = 0,
                             overwrite: bool = False, show_progress: bool = True) -> dict:
    """Render the conversations of `sources` into chat sequence shards under `out_dir` (see the module
    docstring); resumes an interrupted run with the same settings. Returns the report of
    `prepare_sequence_shards`."""
    if overflow not in OVERFLOW:
        raise DataPrepError(f"overflow {overflow!r} is invalid: expected drop | truncate")
    if max_seq_len < 1:
        raise DataPrepError(f"max_seq_len must be >= 1, got {max_seq_len}")
    formats = [check_format(s.format, FORMATS) for s in sources]
    settings = ChatSettings(formats, system_prompt, max_seq_len, overflow)
    job = SequenceJob(kind="chat", group_size=1, render=render_rows, init=init_row_worker,
                      init_args=(chat_row, settings),
                      settings={"overflow": overflow, "system_prompt": system_prompt, "formats": formats},
                      max_seq_len=max_seq_len, exact_answers=exact_answers, finish=write_eval_file)
    return prepare_sequence_shards(job, sources, out_dir, tokenizer_path=tokenizer_path, shard_size=shard_size,
                                   val_fraction=val_fraction, max_tokens=max_tokens, num_workers=num_workers,
                                   overwrite=overwrite, show_progress=show_progress)


def check_format(fmt: str, known: tuple[str, ...]) -> str:
    if fmt not in known:
        raise DataPrepError(f"format {fmt!r} is invalid: expected one of {', '.join(known)}")
    return fmt


def default_data_file(raw_dir: Path) -> Path:
    """The embedded default as JSON lines (rewritten only if the generator changed), read like any file."""
    path = raw_dir / "chat-tasks.jsonl"
    if write_jsonl_if_changed(path, chat_tasks.chat_rows(chat_tasks.generate())):
        print(f"wrote the embedded default (generated tasks, see chat_tasks.py) to {path}")
    return path


def print_summary(report: dict, out_dir: Path, noun: str) -> None:
    """What was written and what was skipped or changed, and why."""
    if report["already_done"]:
        return
    manifest = report["manifest"]
    stats, splits = manifest["stats"], manifest["splits"]
    resumed = f" (resumed after {report['resumed_shards']} shard(s))" if report["resumed_shards"] else ""
    skipped = sum(stats["skipped"].values())
    print(f"done in {report['seconds']:.1f} s{resumed}: {stats['rows']:,} rows read, {stats['kept']:,} {noun} kept "
          f"(train {stats['train']:,}, val {stats['val']:,}), {skipped:,} skipped")
    if skipped:
        print("  skipped: " + ", ".join(f"{n:,} {why}" for why, n in sorted(stats["skipped"].items())))
        for example in stats["skipped_examples"]:
            print(f"    {example}")
    if stats["changed"]:
        print("  changed: " + ", ".join(f"{n:,} {what}" for what, n in sorted(stats["changed"].items())))
    if stats["decode_errors"]:
        print(f"  {stats['decode_errors']:,} invalid UTF-8 sequences read as U+FFFD")
    print("  " + ", ".join(f"{name} {s['num_sequences']:,} sequences, {s['num_tokens']:,} tokens "
                           f"({s['num_trained_tokens']:,} trained) in {len(s['shards'])} shard(s)"
                           for name, s in splits.items()) + f" -> {out_dir / MANIFEST_FILE}")


# ---- command line (shared with load_dpo_dataset.py) -------------------------------------------------


def add_common_arguments(parser: argparse.ArgumentParser, formats: tuple[str, ...], data_dir_key: str) -> None:
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--files", nargs="+", metavar="PATH",
                        help=".jsonl/.json/.parquet files, directories or globs (default: the embedded tasks)")
    source.add_argument("--dataset", help="a Hugging Face dataset, or a local dataset directory")
    source.add_argument("--mix", metavar="FILE.json", help="a JSON list of sources, each with files or dataset, and "
                        "optionally weight, max_tokens, format, config, split, streaming")
    parser.add_argument("--dataset_config", default=None, help="the dataset's configuration")
    parser.add_argument("--split", default="train", help="the dataset's split to read")
    parser.add_argument("--streaming", action=argparse.BooleanOptionalAction, default=True,
                        help="stream the dataset instead of downloading it first")
    parser.add_argument("--format", choices=formats, default="auto", help="the row shape (auto: recognised per row)")
    parser.add_argument("--max_seq_len", type=int, default=None, help="tokens per sequence (default: MAX_SEQ_LEN)")
    parser.add_argument("--max_tokens", type=int, default=0, help="stop after about this many tokens (0: no limit)")
    parser.add_argument("--out_dir", default=None, help=f"where shards go (default: {data_dir_key} of the config)")
    parser.add_argument("--shard_size", type=int, default=DEFAULT_SHARD_SIZE, help="tokens per shard, at most")
    parser.add_argument("--val_fraction", type=float, default=None,
                        help=f"fraction held out for validation (default: {DEFAULT_VAL_FRACTION}; "
                             f"{TASKS_VAL_FRACTION} for the embedded default)")
    parser.add_argument("--num_workers", type=int, default=None,
                        help="tokenizer processes (default: none for the embedded default, else up to 8)")
    parser.add_argument("--overwrite", action="store_true", help="discard earlier output in --out_dir and start afresh")
    parser.add_argument("--env_file", default=None, help="settings file (default: .env when present)")


def sources_from_args(args: argparse.Namespace, default_file: Path | None) -> list[ChatSource]:
    """The sources the arguments name; `default_file` (the embedded default) when they name none."""
    if args.mix:
        sources = load_mix_file(args.mix, ChatSource)
        for s in sources:
            s.format = s.format if s.format != "auto" else args.format
        return sources
    if args.dataset:
        return [ChatSource(dataset=args.dataset, config=args.dataset_config, split=args.split,
                           streaming=args.streaming, format=args.format)]
    if args.dataset_config:
        raise DataPrepError("--dataset_config needs --dataset")
    return [ChatSource(files=args.files or [str(default_file)], format=args.format)]


def resolved_defaults(args: argparse.Namespace) -> tuple[bool, float, int]:
    """(embedded default?, val_fraction, num_workers): the embedded default is small enough that worker
    processes would cost more to start than they save, and needs a larger share held out."""
    embedded = not (args.files or args.dataset or args.mix)
    val_fraction = args.val_fraction if args.val_fraction is not None else (
        TASKS_VAL_FRACTION if embedded else DEFAULT_VAL_FRACTION)
    num_workers = args.num_workers if args.num_workers is not None else (0 if embedded else min(os.cpu_count() or 1, 8))
    return embedded, val_fraction, num_workers


def main(argv: list[str] | None = None) -> None:
    keep_datasets_from_importing_torch()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser, FORMATS, "INSTRUCT_DATA_DIR")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.env_file)
    except ConfigError as e:
        exit_on_config_error(e)
    out_dir = Path(args.out_dir or config.instruct_data_dir)
    embedded, val_fraction, num_workers = resolved_defaults(args)
    with exit_on_prep_error():
        sources = sources_from_args(args, default_data_file(out_dir / "raw") if embedded else None)
        report = prepare_instruct_dataset(
            sources, out_dir, max_seq_len=args.max_seq_len or config.max_seq_len, overflow=config.instruct_overflow,
            system_prompt=config.system_prompt, exact_answers=embedded, tokenizer_path=config.tokenizer_path or None,
            shard_size=args.shard_size, val_fraction=val_fraction, max_tokens=args.max_tokens,
            num_workers=num_workers, overwrite=args.overwrite)
    print_summary(report, out_dir, "conversations")


if __name__ == "__main__":
    main()
