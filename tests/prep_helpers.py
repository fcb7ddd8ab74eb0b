"""What the data-preparation tests share: input files, a crash halfway through a run, reading shards back,
and running a preparation script as a user would."""

import json
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


@contextmanager
def disk_full_at_save(n: int, torn: bytes = b"") -> Iterator[None]:
    """Within the block the n-th `np.save` fails with OSError("disk full"), after writing `torn` (the start
    of a file) when given; the saves before it succeed."""
    real_save, calls = np.save, []

    def save(file, array, **kw):
        calls.append(1)
        if len(calls) == n:
            if torn:
                file.write(torn)
            raise OSError("disk full")
        real_save(file, array, **kw)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(np, "save", save)
        yield


def shard_sequences(out_dir: Path, shard: dict) -> list[tuple[list[int], list[int]]]:
    """Every (tokens, mask) sequence of one sequence shard, read back through its offsets file."""
    tokens, mask, offsets = (np.load(out_dir / shard[k]) for k in ("tokens", "mask", "offsets"))
    assert (tokens.dtype, mask.dtype, offsets.dtype) == (np.uint32, np.uint8, np.int64)
    assert offsets[0] == 0 and offsets[-1] == len(tokens) == len(mask) == shard["num_tokens"]
    return [(tokens[a:b].tolist(), mask[a:b].tolist()) for a, b in zip(offsets[:-1], offsets[1:])]


def run_script(script: str, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    """`python <repo>/<script> args` in tmp_path, offline, with a Hugging Face cache of its own."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    return subprocess.run([sys.executable, str(REPO / script), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True)


def prepare_chat_tasks(root: Path, count: int, seq: int, val_fraction: float, exact_answers: bool = False,
                       pairs: bool = False) -> tuple[Path, Optional[Path]]:
    """The first `count` conversations of the embedded default prepared by the project's own scripts: SFT
    shards in root/instruct and, with `pairs`, preference shards in root/dpo."""
    import chat_tasks
    from load_dpo_dataset import prepare_dpo_dataset
    from data_sources import ChatSource
    from load_instruct_dataset import prepare_instruct_dataset

    examples = chat_tasks.generate(count)
    chat = root / "chat.jsonl"
    chat.write_text("".join(json.dumps(r) + "\n" for r in chat_tasks.chat_rows(examples)))
    prepare_instruct_dataset([ChatSource(files=[str(chat)])], root / "instruct", max_seq_len=seq,
                             val_fraction=val_fraction, exact_answers=exact_answers, show_progress=False)
    if not pairs:
        return root / "instruct", None
    rows = root / "pairs.jsonl"
    rows.write_text("".join(json.dumps(r) + "\n" for r in chat_tasks.preference_rows(examples)))
    prepare_dpo_dataset([ChatSource(files=[str(rows)])], root / "dpo", max_seq_len=seq, val_fraction=val_fraction,
                        show_progress=False)
    return root / "instruct", root / "dpo"
