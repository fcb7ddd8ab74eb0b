"""A tiny checkpoint and serve.py as a real process, for the server tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import torch

from checkpoint import save_checkpoint
from model import ModelArgs, Transformer
from reference_weights import o1_random_
from tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
CONTEXT = 1024


def tiny_checkpoint(path: Path) -> Path:
    tok = Tokenizer()
    torch.manual_seed(0)
    model = o1_random_(Transformer(ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=tok.n_words,
                                             multiple_of=32, max_seq_len=CONTEXT)))
    save_checkpoint(path, model, tokenizer=tok.identity(), tokenizer_path=str(tok.path))
    return path


class Server:
    """serve.py in its own process; the URL comes from its first line (it listens on --port 0)."""

    def __init__(self, checkpoint: Path, log: Path, *args: str, env: dict | None = None):
        self.log = log
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "serve.py"), "--checkpoint", str(checkpoint),
                                      "--port", "0", *args], stdout=subprocess.PIPE, stderr=open(log, "w"),
                                     text=True, env={**os.environ, **(env or {})})
        self.url = ""

    def wait_ready(self) -> "Server":
        first: list[str] = []
        reader = threading.Thread(target=lambda: first.append(self.proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout=180)
        if not first or " at http://" not in first[0]:
            self.proc.kill()
            raise RuntimeError(f"serve.py did not start: {first} {self.log.read_text()}")
        self.url = first[0].split(" at ")[1].split("/ ")[0]
        return self

    def health(self) -> dict:
        return httpx.get(f"{self.url}/health", timeout=30).json()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=60)
