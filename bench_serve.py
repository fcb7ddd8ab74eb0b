"""Time serve.py as a client sees it: time to first token and tokens/s for 1 and for N concurrent streams.

    python bench_serve.py --checkpoint runs/sft/checkpoints/step_001000.pt
    python bench_serve.py                       # random weights of the quick-start shape (.env.example's)
    python bench_serve.py --streams 1 4 8 --max_tokens 64 --rounds 5 --json serve_bench.json

A real server process on a free localhost port; each stream is a streamed chat completion of a prompt
from chat_prompts.txt, decoded greedily for exactly --max_tokens tokens (ignore_eos, so that a trained
model's short answers do not shorten the measurement). The stream counts take turns, round after round,
and medians are reported: on a shared CPU a burst of another job's work then costs one round, not a row.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Optional, Sequence

ROOT = Path(__file__).resolve().parent


def quick_start_checkpoint(directory: Path) -> Path:
    """Random weights in the shape the default .env trains (config.py's defaults), with Meta's tokenizer."""
    import torch

    from checkpoint import save_checkpoint
    from config import Config
    from model import Transformer
    from tokenizer import Tokenizer
    from train import model_args

    tok = Tokenizer()
    torch.manual_seed(0)
    path = directory / "quick_start_random.pt"
    save_checkpoint(path, Transformer(model_args(Config(), tok.n_words)), tokenizer=tok.identity(),
                    tokenizer_path=str(tok.path))
    return path


def stream_once(host: str, port: int, prompt: str, max_tokens: int) -> dict:
    """One streamed chat completion -> seconds to the first token, seconds in all, tokens."""
    body = json.dumps({"messages": [{"role": "user", "content": prompt}], "temperature": 0, "max_tokens": max_tokens,
                       "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}})
    conn = http.client.HTTPConnection(host, port, timeout=600)
    began = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    response = conn.getresponse()
    if response.status != 200:
        raise RuntimeError(f"the server answered {response.status}: {response.read()[:300]!r}")
    first, tokens = None, None
    for line in response:
        if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
            continue
        event = json.loads(line[6:])
        if first is None and any(c["delta"].get("content") for c in event["choices"]):
            first = time.perf_counter() - began
        if event.get("usage"):
            tokens = event["usage"]["completion_tokens"]
    conn.close()
    return {"ttft": first, "seconds": time.perf_counter() - began, "tokens": tokens}


def concurrent_round(host: str, port: int, prompts: list[str], streams: int, max_tokens: int) -> dict:
    results: list[Optional[dict]] = [None] * streams
    start = threading.Barrier(streams)

    def one(i: int) -> None:
        start.wait()
        results[i] = stream_once(host, port, prompts[i % len(prompts)], max_tokens)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(streams)]
    began = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - began
    tokens = sum(r["tokens"] for r in results)
    return {"ttft": statistics.median(r["ttft"] for r in results),
            "stream_tokens_per_s": statistics.median((r["tokens"] - 1) / (r["seconds"] - r["ttft"]) for r in results),
            "total_tokens_per_s": tokens / wall}


def start_server(checkpoint: str, extra: list[str]) -> tuple[subprocess.Popen, str, int]:
    proc = subprocess.Popen([sys.executable, str(ROOT / "serve.py"), "--checkpoint", checkpoint, "--port", "0",
                             *extra], stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if " at http://" not in line:
        proc.kill()
        raise SystemExit(f"error: serve.py did not start (it printed {line!r})")
    host, port = line.split(" at http://")[1].split("/ ")[0].rsplit(":", 1)
    return proc, host, int(port)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None, help="what to serve (default: random weights, quick-start shape)")
    p.add_argument("--streams", type=int, nargs="+", default=[1, 8], help="concurrent stream counts to time")
    p.add_argument("--max_tokens", type=int, default=64, help="tokens per answer")
    p.add_argument("--rounds", type=int, default=3, help="rounds per stream count (medians reported)")
    p.add_argument("--json", default=None, help="also write the figures to this file")
    p.add_argument("--serve_args", default="", help="more serve.py flags, e.g. '--dtype fp32'")
    args = p.parse_args(argv)
    if args.max_tokens < 2 or args.rounds < 1 or min(args.streams) < 1:
        p.error("--max_tokens must be >= 2, --rounds and --streams >= 1")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    prompts = [line.strip() for line in (ROOT / "chat_prompts.txt").read_text().splitlines() if line.strip()]
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.checkpoint or str(quick_start_checkpoint(Path(tmp)))
        extra = args.serve_args.split() + ["--max_batch", str(max(args.streams))]
        proc, host, port = start_server(checkpoint, extra)
        try:
            stream_once(host, port, prompts[0], 4)  # warm-up: first-call allocations, lazy kernels
            rounds: dict[int, list[dict]] = {n: [] for n in args.streams}
            for _ in range(args.rounds):
                for n in args.streams:
                    rounds[n].append(concurrent_round(host, port, prompts, n, args.max_tokens))
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    figures = {n: {key: statistics.median(r[key] for r in rs) for key in rs[0]} for n, rs in rounds.items()}
    base = figures[min(args.streams)]["total_tokens_per_s"]
    print(f"{checkpoint if args.checkpoint else 'random weights, quick-start shape'}; {args.max_tokens} tokens per "
          f"answer, median of {args.rounds} rounds, {os.cpu_count()} CPUs")
    print(f"{'streams':>8} {'first token':>12} {'tok/s per stream':>17} {'tok/s in all':>13} {'vs one':>7}")
    for n, f in figures.items():
        print(f"{n:>8} {f['ttft'] * 1000:>10.0f}ms {f['stream_tokens_per_s']:>17.1f} "
              f"{f['total_tokens_per_s']:>13.1f} {f['total_tokens_per_s'] / base:>6.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"checkpoint": args.checkpoint, "max_tokens": args.max_tokens,
                                               "rounds": rounds, "medians": figures}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
