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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

import chat_tasks
from config import ConfigError, exit_on_config_error, load_config
from conversations import (
    ChatRenderer, RowError, check_conversation, conversation_from_tokens, messages_of, present, prompt_hash,
    with_system_prompt,
)
from data_preparation_utils import DataPrepError, exit_on_prep_error, write_jsonl_atomic, write_jsonl_if_changed
from data_sources import ChatSource, keep_datasets_from_importing_torch
from sequence_preparation import (
    DEFAULT_SHARD_SIZE, DEFAULT_VAL_FRACTION, RowResult, SequenceJob, add_common_arguments, check_format,
    prepare_sequence_shards, print_summary, resolved_defaults, skipped_row, sources_from_args,
)
from shard_format import EVAL_FILE

OVERFLOW = ("drop", "truncate")


# ---- row shapes -> conversations ---------------------------------------------------------------------


def _text(row: Any, key: str) -> str:
    value = row.get(key) if isinstance(row, dict) else None
    if key == "input" and value is None:
        return ""
    if not isinstance(value, str):
        raise RowError("wrong_type", f"{key} is {type(value).__name__}, expected a string")
    return value


def _turn_list(column: str) -> Callable[[Any], list[dict]]:
    return lambda row: messages_of(row.get(column) if isinstance(row, dict) else None, column)


def _alpaca(row: Any) -> list[dict]:
    instruction, extra, output = (_text(row, key) for key in ("instruction", "input", "output"))
    user = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
    return [{"role": "user", "content": user}, {"role": "assistant", "content": output}]


def _prompt_response(row: Any) -> list[dict]:
    prompt = _text(row, "prompt")  # first: a row that is no object is refused for its prompt
    answer = _text(row, "response" if present(row, "response") else "completion")
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]


@dataclass(frozen=True)
class ChatShape:
    needs: tuple[tuple[str, ...], ...]  # a row has this shape when it fills one column of each group
    turns: Callable[[Any], list[dict]]  # the row's turns, checked for types and roles only


# Recognised in this order: the first shape whose columns a row fills.
CHAT_SHAPES = {
    "messages": ChatShape((("messages",),), _turn_list("messages")),  # ultrachat_200k
    "conversation": ChatShape((("conversation",),), _turn_list("conversation")),  # lmsys-chat-1m
    "sharegpt": ChatShape((("conversations",),), _turn_list("conversations")),
    "alpaca": ChatShape((("instruction",), ("output",)), _alpaca),
    "prompt_response": ChatShape((("prompt",), ("response", "completion")), _prompt_response),
}
FORMATS = ("auto", *CHAT_SHAPES)


def detect_format(row: Any) -> str:
    if not isinstance(row, dict):
        raise RowError("wrong_type", f"a row is {type(row).__name__}, expected an object")
    for fmt, shape in CHAT_SHAPES.items():
        if all(any(present(row, column) for column in group) for group in shape.needs):
            return fmt
    raise RowError("unrecognised_shape", f"columns {', '.join(sorted(k for k in row if present(row, k)))}")


def conversation_of(row: Any, fmt: str) -> list[dict]:
    """The row's turns as [{"role", "content"}], in the shape `fmt` names ("auto": recognised per row)."""
    return CHAT_SHAPES[detect_format(row) if fmt == "auto" else fmt].turns(row)


# ---- conversations -> sequences ------------------------------------------------------------------------


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
    """One row's conversation as a sequence; runs in a worker process (see `sequence_preparation.render_rows`)."""
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


# ---- the held-out prompts and answers ----------------------------------------------------------------


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
    job = SequenceJob(kind="chat", group_size=1, row=chat_row, row_settings=settings,
                      settings={"overflow": overflow, "system_prompt": system_prompt, "formats": formats},
                      max_seq_len=max_seq_len, exact_answers=exact_answers, finish=write_eval_file)
    return prepare_sequence_shards(job, sources, out_dir, tokenizer_path=tokenizer_path, shard_size=shard_size,
                                   val_fraction=val_fraction, max_tokens=max_tokens, num_workers=num_workers,
                                   overwrite=overwrite, show_progress=show_progress)


def default_data_file(raw_dir: Path) -> Path:
    """The embedded default as JSON lines (rewritten only if the generator changed), read like any file."""
    path = raw_dir / "chat-tasks.jsonl"
    if write_jsonl_if_changed(path, chat_tasks.chat_rows(chat_tasks.generate())):
        print(f"wrote the embedded default (generated tasks, see chat_tasks.py) to {path}")
    return path


# ---- command line ----------------------------------------------------------------------------------


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
