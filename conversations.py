"""Conversations as both sequence-data scripts see them: turns read from rows, checked, rendered in Llama 3's
chat format with a loss mask beside the tokens, and read back from the tokens.

A turn is {"role": system | user | assistant, "content": str}. A row that cannot be used raises RowError,
whose `reason` is the stats key it is counted under; which row shapes hold turns is each script's own
table (load_instruct_dataset.CHAT_SHAPES, load_dpo_dataset.PAIR_SHAPES).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from data_preparation_utils import DataPrepError
from data_sources import document_hash

ROLES = ("system", "user", "assistant")
ROLE_ALIASES = {"human": "user", "gpt": "assistant", "chatgpt": "assistant"}  # ShareGPT's names


# ---- rows -> turns ----------------------------------------------------------------------------------


class RowError(Exception):
    """A row that cannot be used: `reason` is the stats key it is counted under, `note` the detail."""

    def __init__(self, reason: str, note: str = ""):
        super().__init__(reason)
        self.reason, self.note = reason, note


def present(row: dict, key: str) -> bool:
    return row.get(key) is not None  # a column a row lacks reads as None (`datasets` unifies columns)


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


# ---- turns -> tokens and loss mask, and back -----------------------------------------------------------


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
