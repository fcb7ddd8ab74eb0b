"""Preference pairs -> chosen and rejected Llama 3 chat sequences with response-only loss masks, in shards, for DPO.

    python load_dpo_dataset.py                           # offline default: the SFT default's tasks (chat_tasks.py)
    python load_dpo_dataset.py --files pairs.jsonl
    python load_dpo_dataset.py --dataset HuggingFaceH4/ultrafeedback_binarized --split train_prefs
    python load_dpo_dataset.py --dataset Anthropic/hh-rlhf
    python load_dpo_dataset.py --mix mix.json

Row shapes, recognised per row (--format forces one):
  pairs      "prompt", "chosen", "rejected" strings (the prompt may also be a list of {"role", "content"})
  messages   "chosen" and "rejected" as lists of {"role", "content"}: either whole conversations that share
             every turn but the last, assistant one (ultrafeedback_binarized), or just the responses, with
             "prompt" a string or a list of turns
  hh         "chosen" and "rejected" transcripts "\\n\\nHuman: ... \\n\\nAssistant: ..." sharing all but the
             last assistant turn (Anthropic/hh-rlhf), parsed into turns

Each pair becomes two sequences, chosen then rejected, both the same prompt rendered exactly as Meta's
llama-models renders a dialog (SYSTEM_PROMPT added where the prompt has no system turn) followed by the
assistant header and the response. Only the response is scored: the mask is 1 on the response's content
and its <|eot_id|>, 0 on everything before it, earlier assistant turns included.

Longer than MAX_SEQ_LEN (or --max_seq_len): the prompt is cut from its start, whole leading exchanges
first (a system turn is kept), then the tokens at the start of its first remaining user turn, but never
below --min_prompt_tokens; a pair that still does not fit is dropped. Skipped and counted (the first
few shown): rows of no known shape, wrong types, unknown roles, empty turns, transcripts that do not
parse, chosen and rejected with different prompts, and identical chosen and rejected responses. About
--val_fraction of the pairs, chosen by a hash of the prompt, form the validation split: a prompt
never appears in both (SFT data made from the same conversations splits them the same way).

Output in --out_dir (default DPO_DATA_DIR): sequence shards as load_instruct_dataset.py writes them, with
sequences 2i (chosen) and 2i+1 (rejected) a pair that no shard splits, and manifest.json (kind
"preference"). An interrupted run resumes from its last finished shard when started again. The trainer
keeps precomputed reference log-probabilities beside the data, in reference_logps/; --overwrite removes
them with the pairs they were computed from.
"""

from __future__ import annotations

import argparse
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

import chat_tasks
from config import ConfigError, exit_on_config_error, load_config
from conversations import ChatRenderer, RowError, check_conversation, messages_of, present, prompt_hash, with_system_prompt
from data_preparation_utils import DataPrepError, exit_on_prep_error, write_jsonl_if_changed
from data_sources import ChatSource, keep_datasets_from_importing_torch
from sequence_preparation import (
    DEFAULT_SHARD_SIZE, DEFAULT_VAL_FRACTION, RowResult, SequenceJob, add_common_arguments, check_format,
    prepare_sequence_shards, print_summary, resolved_defaults, skipped_row, sources_from_args,
)
from shard_format import REFERENCE_LOGPS_DIR

DEFAULT_MIN_PROMPT_TOKENS = 32
HH_TURN = re.compile(r"\n\n(Human|Assistant):[ ]?")
HH_ROLES = {"Human": "user", "Assistant": "assistant"}


# ---- row shapes -> (prompt, chosen, rejected) ------------------------------------------------------------


def _prompt(row: dict) -> list[dict]:
    prompt = row.get("prompt")
    if isinstance(prompt, list):
        return messages_of(prompt, "prompt")
    return [{"role": "user", "content": _string(row, "prompt")}]


def _string(row: dict, key: str) -> str:
    value = row.get(key)
    if not isinstance(value, str):
        raise RowError("wrong_type", f"{key} is {type(value).__name__}, expected a string")
    return value


def hh_turns(text: Any, key: str) -> list[dict]:
    """An hh-rlhf transcript "\\n\\nHuman: ...\\n\\nAssistant: ..." as turns (contents stripped)."""
    if not isinstance(text, str):
        raise RowError("wrong_type", f"{key} is {type(text).__name__}, expected a transcript string")
    parts = HH_TURN.split(text)
    if parts[0].strip() or len(parts) < 3:
        raise RowError("unparsable", f"{key} does not start with '\\n\\nHuman: '")
    return [{"role": HH_ROLES[role], "content": content.strip()} for role, content in zip(parts[1::2], parts[2::2])]


def _string_pair(row: dict) -> tuple[list[dict], list[dict]]:
    return tuple([*_prompt(row), {"role": "assistant", "content": _string(row, key)}] for key in ("chosen", "rejected"))


def _message_pair(row: dict) -> tuple[list[dict], list[dict]]:
    chosen, rejected = (messages_of(row.get(key), key) for key in ("chosen", "rejected"))
    if chosen and chosen[0]["role"] == "assistant":  # responses only: the prompt is a column of its own
        chosen, rejected = _prompt(row) + chosen, _prompt(row) + rejected
    return chosen, rejected


def _hh_pair(row: dict) -> tuple[list[dict], list[dict]]:
    return tuple(hh_turns(row.get(key), key) for key in ("chosen", "rejected"))


def _both(row: dict, kind: type) -> bool:
    return isinstance(row["chosen"], kind) and isinstance(row["rejected"], kind)


@dataclass(frozen=True)
class PairShape:
    matches: Callable[[dict], bool]  # asked of a row that has "chosen" and "rejected"
    conversations: Callable[[dict], tuple[list[dict], list[dict]]]  # the chosen and the rejected conversation


# Recognised in this order: the first shape a row with "chosen" and "rejected" matches.
PAIR_SHAPES = {
    "messages": PairShape(lambda row: _both(row, list), _message_pair),  # ultrafeedback_binarized
    "pairs": PairShape(lambda row: _both(row, str) and present(row, "prompt"), _string_pair),
    "hh": PairShape(lambda row: _both(row, str) and not present(row, "prompt"), _hh_pair),  # Anthropic/hh-rlhf
}
FORMATS = ("auto", *PAIR_SHAPES)


def detect_format(row: Any) -> str:
    if not isinstance(row, dict):
        raise RowError("wrong_type", f"a row is {type(row).__name__}, expected an object")
    if not (present(row, "chosen") and present(row, "rejected")):
        raise RowError("unrecognised_shape", f"columns {', '.join(sorted(k for k in row if present(row, k)))}")
    for fmt, shape in PAIR_SHAPES.items():
        if shape.matches(row):
            return fmt
    raise RowError("wrong_type", f"chosen is {type(row['chosen']).__name__} and rejected "
                                 f"{type(row['rejected']).__name__}: expected two strings or two lists of turns")


def pair_of(row: Any, fmt: str) -> tuple[list[dict], str, str]:
    """(prompt turns, chosen response, rejected response), checked like an SFT conversation."""
    fmt = detect_format(row) if fmt == "auto" else fmt
    if not isinstance(row, dict):
        raise RowError("wrong_type", f"a row is {type(row).__name__}, expected an object")
    chosen, rejected = PAIR_SHAPES[fmt].conversations(row)
    for key, turns in (("chosen", chosen), ("rejected", rejected)):
        if not turns or turns[-1]["role"] != "assistant":
            raise RowError("no_response", f"{key} does not end with an assistant turn")
        check_conversation(turns, {})
    if chosen[:-1] != rejected[:-1]:
        raise RowError("prompts_differ", "chosen and rejected do not share every turn before the response")
    if chosen[-1]["content"] == rejected[-1]["content"]:
        raise RowError("identical", "chosen and rejected are the same response")
    return chosen[:-1], chosen[-1]["content"], rejected[-1]["content"]


# ---- (prompt, chosen, rejected) -> two sequences ----------------------------------------------------


@dataclass
class PairSettings:
    formats: list[str]  # per source
    system_prompt: str
    max_seq_len: int
    min_prompt_tokens: int
    renderer: ChatRenderer | None = field(default=None, repr=False)


def pair_row(settings: PairSettings, source: int, row: Any) -> RowResult:
    """One row's chosen and rejected sequences; runs in a worker process (see `sequence_preparation.render_rows`)."""
    changes: dict[str, int] = {}
    renderer, tok = settings.renderer, settings.renderer.tokenizer
    try:
        prompt, chosen, rejected = pair_of(row, settings.formats[source])
        content_hash = prompt_hash(prompt)
        prompt = with_system_prompt(prompt, settings.system_prompt, changes)
        tokens, _, ends = renderer.render(prompt)
        responses = [tok.encode(text, bos=False, eos=False) + [tok.eot_id] for text in (chosen, rejected)]
    except (RowError, ValueError, TypeError) as e:
        return skipped_row(e)
    header = renderer.headers["assistant"]
    budget = settings.max_seq_len - len(header) - max(map(len, responses))  # tokens left for the prompt
    if len(tokens) > budget:
        if budget < min(len(tokens), settings.min_prompt_tokens):
            return RowResult(skip="too_long", note=f"responses of {' and '.join(str(len(r)) for r in responses)} "
                                                   f"tokens leave {budget} for the prompt, max_seq_len "
                                                   f"{settings.max_seq_len}, min_prompt_tokens {settings.min_prompt_tokens}")
        tokens = cut_prompt(prompt, tokens, ends, budget, renderer, changes)
        if tokens is None:
            return RowResult(skip="too_long", note="the system turn and headers alone do not fit")
    prompt_part = np.concatenate([tokens, np.array(header, np.uint32)])
    sequences = [(np.concatenate([prompt_part, np.array(r, np.uint32)]),
                  np.concatenate([np.zeros(len(prompt_part), np.uint8), np.ones(len(r), np.uint8)]))
                 for r in responses]
    return RowResult(sequences, content_hash, changes=changes)


def cut_prompt(prompt: list[dict], tokens: np.ndarray, ends: list[int], budget: int, renderer: ChatRenderer,
               changes: dict[str, int]) -> np.ndarray | None:
    """The rendered prompt cut from its start to at most `budget` tokens: whole leading exchanges first
    (up to the next user turn; a system turn stays), then the start of the first remaining user turn's
    content. None if even that is not enough. `ends[i]`: the rendering's length up to turn i."""
    first = 1 if prompt[0]["role"] == "system" else 0
    head = ends[first - 1] if first else 1  # <|begin_of_text|> and the system turn: always kept
    users = [i for i in range(first, len(prompt)) if prompt[i]["role"] == "user"]
    for start in users:  # keep turns start.. : tokens[:head] + tokens[ends[start - 1]:]
        kept = head + len(tokens) - (ends[start - 1] if start else 1)
        if kept <= budget:
            break
    cut_from = ends[start - 1] if start else 1
    changes.update(prompt_cut=1)
    if start > first:
        changes["prompt_turns_cut"] = start - first
    if kept > budget:  # even one exchange is too long: drop the start of the last user turn's content
        content_start = cut_from + len(renderer.headers["user"])
        content_end = ends[start] - 1  # before its <|eot_id|>
        excess = kept - budget
        if excess >= content_end - content_start:
            return None
        changes["prompt_turn_shortened"] = 1
        return np.concatenate([tokens[:head], tokens[cut_from:content_start], tokens[content_start + excess :]])
    return np.concatenate([tokens[:head], tokens[cut_from:]])


# ---- one run ---------------------------------------------------------------------------------------


def prepare_dpo_dataset(sources: list[ChatSource], out_dir: str | Path, *, max_seq_len: int,
                        min_prompt_tokens: int = DEFAULT_MIN_PROMPT_TOKENS, system_prompt: str = "",
                        exact_answers: bool = False, tokenizer_path: str | None = None,
                        shard_size: int = DEFAULT_SHARD_SIZE, val_fraction: float = DEFAULT_VAL_FRACTION,
                        max_tokens: int = 0, num_workers: int = 0, overwrite: bool = False,
                        show_progress: bool = True) -> dict:
    """Render the preference pairs of `sources` into sequence shards under `out_dir` (see the module
    docstring); resumes an interrupted run with the same settings. Returns the report of
    `prepare_sequence_shards`."""
    if max_seq_len < 1:
        raise DataPrepError(f"max_seq_len must be >= 1, got {max_seq_len}")
    if min_prompt_tokens < 1:
        raise DataPrepError(f"--min_prompt_tokens must be >= 1, got {min_prompt_tokens}")
    formats = [check_format(s.format, FORMATS) for s in sources]
    settings = PairSettings(formats, system_prompt, max_seq_len, min_prompt_tokens)
    job = SequenceJob(kind="preference", group_size=2, row=pair_row, row_settings=settings,
                      settings={"min_prompt_tokens": min_prompt_tokens, "system_prompt": system_prompt,
                                "formats": formats},
                      max_seq_len=max_seq_len, exact_answers=exact_answers)
    derived = Path(out_dir) / REFERENCE_LOGPS_DIR
    if overwrite and derived.exists():
        shutil.rmtree(derived)
    return prepare_sequence_shards(job, sources, out_dir, tokenizer_path=tokenizer_path, shard_size=shard_size,
                                   val_fraction=val_fraction, max_tokens=max_tokens, num_workers=num_workers,
                                   overwrite=overwrite, show_progress=show_progress)


def default_data_file(raw_dir: Path) -> Path:
    """The embedded default: the SFT default's conversations, the right answer chosen and a near miss rejected."""
    path = raw_dir / "preference-tasks.jsonl"
    if write_jsonl_if_changed(path, chat_tasks.preference_rows(chat_tasks.generate())):
        print(f"wrote the embedded default (generated tasks, see chat_tasks.py) to {path}")
    return path


def main(argv: list[str] | None = None) -> None:
    keep_datasets_from_importing_torch()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser, FORMATS, "DPO_DATA_DIR")
    parser.add_argument("--min_prompt_tokens", type=int, default=DEFAULT_MIN_PROMPT_TOKENS,
                        help="a prompt too long for max_seq_len is cut from its start down to this, not further")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.env_file)
    except ConfigError as e:
        exit_on_config_error(e)
    out_dir = Path(args.out_dir or config.dpo_data_dir)
    embedded, val_fraction, num_workers = resolved_defaults(args)
    with exit_on_prep_error():
        sources = sources_from_args(args, default_data_file(out_dir / "raw") if embedded else None)
        report = prepare_dpo_dataset(
            sources, out_dir, max_seq_len=args.max_seq_len or config.max_seq_len,
            min_prompt_tokens=args.min_prompt_tokens, system_prompt=config.system_prompt, exact_answers=embedded,
            tokenizer_path=config.tokenizer_path or None, shard_size=args.shard_size, val_fraction=val_fraction,
            max_tokens=args.max_tokens, num_workers=num_workers, overwrite=args.overwrite)
    print_summary(report, out_dir, "pairs")


if __name__ == "__main__":
    main()
