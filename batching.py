"""Continuous batching for serve.py: requests that arrive while others decode join the running batch.

Each sequence owns its KV cache in generate.py's layout (one KVCache of prompt + max_new_tokens positions
per layer). A new sequence is prefilled alone between decode steps, through `Transformer.forward` exactly
as `generate_tokens` prefills; each decode step then feeds every active sequence's last token through the
model as one batch, and a sequence leaves as soon as it stops, runs out of tokens or is cancelled.

Greedy answers must not depend on who else is in the batch. Everything a decode step does is either done
per row (each row attends to its own cache at its own length, with its own position's rotary angles) or
is a matrix product, whose rows never mix. But whether a product kernel gives a row the same bits at
every batch size is the kernel's business: MKL's float32 GEMM rounds a row differently below 4 rows,
oneDNN's (bf16 and float32) at 1 row for 1B-sized matrices, though not for the quick start's. So at
start the engine measures it: the smallest batch width from which every width up to max_batch, and every
row order, give each row bitwise the same logits; smaller batches are padded up to that width (a padding
row costs one more row of a product that reads the same weights).
"""

from __future__ import annotations

import secrets
import threading
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

from generate import sample_next
from model import Attention, KVCache, Transformer, apply_rope, rope_cos_sin, rope_frequencies


# ---- sequences --------------------------------------------------------------------------------------------
@dataclass
class Sampling:
    max_new_tokens: int
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0
    seed: Optional[int] = None  # None: a fresh random seed
    ignore_stop: bool = False  # run to max_new_tokens through stop ids (benchmarks: answers of known length)


class Sequence:
    """One stream of tokens. `on_event(kind, value)` is called from the engine's thread with
    ("token", id), ("end", "stop" | "length") or ("error", message); nothing follows "end" or "error"."""

    def __init__(self, prompt: list[int], sampling: Sampling, on_event: Callable[[str, Any], None]):
        self.prompt, self.sampling, self.on_event = list(prompt), sampling, on_event
        self.total = len(self.prompt) + sampling.max_new_tokens  # positions its cache holds
        self.pos = len(self.prompt)  # where the token sampled next sits (and is fed)
        self.next_token = -1
        self.caches: list[KVCache] = []
        self.generator: Optional[torch.Generator] = None
        self.cancelled = False

    def cancel(self) -> None:
        """Leave at the next step boundary (a client went away, or found a stop string)."""
        self.cancelled = True


class EngineStopped(RuntimeError):
    pass


# ---- the engine -------------------------------------------------------------------------------------------
class BatchEngine:
    """Owns the model on one thread: prefills newcomers, runs batched decode steps, runs other jobs
    (embeddings) between steps. `start` probes the width floor of the product kernels the model has then
    (serve.py routes its linears through speedups.reordered_linears first); `submit` and `call` may be
    used from any thread."""

    def __init__(self, model: Transformer, stop_ids: list[int], max_batch: int = 8, max_queue: int = 64):
        self.model, self.stop_ids = model, set(stop_ids)
        self.max_batch, self.max_queue = max_batch, max_queue
        self.device = model.tok_embeddings.weight.device
        self.width_floor: Optional[int] = 1
        self.decode_steps = 0
        self.peak_batch = 0
        self._freqs = rope_frequencies(model.args, self.device)
        self._rope: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._pending: deque[Sequence] = deque()
        self._jobs: deque[tuple[Callable[[], Any], Future]] = deque()
        self._active: list[Sequence] = []
        self._wake = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="batch-engine", daemon=True)

    # ---- from any thread ---------------------------------------------------------------------------------
    def start(self) -> None:
        with torch.inference_mode():
            self.width_floor = self.probe_width_floor()
        self._thread.start()

    def request_stop(self) -> None:
        """After the current step, end every sequence with an error event and stop (safe in a signal handler)."""
        self._stopping = True
        with self._wake:
            self._wake.notify()

    def stop(self) -> None:
        self.request_stop()
        if self._thread.is_alive():
            self._thread.join()

    @property
    def active(self) -> int:
        return len(self._active)

    @property
    def queued(self) -> int:
        return len(self._pending)

    def submit(self, seqs: list[Sequence]) -> None:
        """Queue sequences (a request's choices, together); raises EngineStopped or OverflowError."""
        with self._wake:
            if self._stopping:
                raise EngineStopped("the server is shutting down")
            if len(self._pending) + len(seqs) > self.max_queue:
                raise OverflowError(f"{len(self._pending)} sequences are already waiting (the queue holds "
                                    f"{self.max_queue}); try again shortly")
            self._pending.extend(seqs)
            self._wake.notify()

    def call(self, fn: Callable[[], Any]) -> Future:
        """Run fn() on the engine's thread between two steps (the model is not thread-safe: prefill
        attaches caches to it)."""
        future: Future = Future()
        with self._wake:
            if self._stopping:
                raise EngineStopped("the server is shutting down")
            self._jobs.append((fn, future))
            self._wake.notify()
        return future

    # ---- the engine's thread -----------------------------------------------------------------------------
    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._wake:
                    while not (self._stopping or self._pending or self._jobs or self._active):
                        self._wake.wait()
                    if self._stopping:
                        break
                    jobs, self._jobs = list(self._jobs), deque()
                    joining = []
                    while self._pending and len(self._active) + len(joining) < self.max_batch:
                        joining.append(self._pending.popleft())
                for fn, future in jobs:
                    self._run_job(fn, future)
                self._active = [s for s in self._active if not s.cancelled]
                for seq in joining:
                    self._join(seq)
                if self._active:
                    self._step()
        with self._wake:
            left = self._active + list(self._pending)
            self._active, self._pending = [], deque()
            for _, future in self._jobs:
                future.set_exception(EngineStopped("the server is shutting down"))
        for seq in left:
            seq.on_event("error", "the server is shutting down")

    @staticmethod
    def _run_job(fn: Callable[[], Any], future: Future) -> None:
        try:
            future.set_result(fn())
        except Exception as e:  # noqa: BLE001 -- the caller gets it
            future.set_exception(e)

    def _join(self, seq: Sequence) -> None:
        if seq.cancelled:
            return
        try:
            if seq.sampling.temperature > 0:
                seed = seq.sampling.seed if seq.sampling.seed is not None else secrets.randbits(63)
                seq.generator = torch.Generator(device=self.device).manual_seed(seed)
            logits = self.prefill(seq)
        except Exception as e:  # noqa: BLE001 -- one request's failure (memory, say) must not stop the rest
            seq.caches = []
            seq.on_event("error", f"prefill failed: {type(e).__name__}: {e}")
            return
        if self._advance(seq, self._sample([seq], logits)[0]):
            self._active.append(seq)

    def _step(self) -> None:
        seqs = self._active
        try:
            logits = self.decode(seqs)
        except Exception as e:  # noqa: BLE001
            self._active = []
            for seq in seqs:
                seq.caches = []
                seq.on_event("error", f"decoding failed: {type(e).__name__}: {e}")
            return
        self.decode_steps += 1
        self.peak_batch = max(self.peak_batch, len(seqs))
        keep = []
        for seq, token in zip(seqs, self._sample(seqs, logits)):
            seq.pos += 1
            if self._advance(seq, token):
                keep.append(seq)
        self._active = keep

    @staticmethod
    def _sample(seqs: list[Sequence], logits: torch.Tensor) -> list[int]:
        """Next tokens from logits (len(seqs), vocab) by generate.py's sample_next: the greedy rows in one
        argmax (exact, so the same as row by row; over 128k bf16 logits one row costs ~0.5 ms), each
        sampling row alone with its own generator, as generate_tokens draws."""
        tokens = [0] * len(seqs)
        greedy = [j for j, seq in enumerate(seqs) if seq.sampling.temperature <= 0]
        if greedy:
            rows = logits if len(greedy) == len(seqs) else logits[greedy]
            for j, token in zip(greedy, sample_next(rows, 0.0, 0, 1.0, None).tolist()):
                tokens[j] = token
        for j, seq in enumerate(seqs):
            if seq.sampling.temperature > 0:
                s = seq.sampling
                tokens[j] = int(sample_next(logits[j:j + 1], s.temperature, s.top_k, s.top_p, seq.generator).item())
        return tokens

    def _advance(self, seq: Sequence, token: int) -> bool:
        """Send the token sampled at seq.pos; False when the sequence ends here (a stop id, not sent,
        or its last position)."""
        s = seq.sampling
        if token in self.stop_ids and not s.ignore_stop:
            seq.caches = []
            seq.on_event("end", "stop")
            return False
        seq.on_event("token", token)
        if seq.pos + 1 >= seq.total:
            seq.caches = []
            seq.on_event("end", "length")
            return False
        seq.next_token = token
        return True

    # ---- model arithmetic ----------------------------------------------------------------------------------
    def prefill(self, seq: Sequence) -> torch.Tensor:
        """The prompt alone through model.forward with a fresh cache of seq.total positions, as
        generate_tokens does; the caches then belong to the sequence. -> last logits (1, vocab)."""
        model = self.model
        model.setup_cache(batch_size=1, max_seq_len=seq.total)
        try:
            tokens = torch.tensor([seq.prompt], device=self.device)
            logits, _ = model(tokens, start_pos=0, logits_to_keep=1)
            seq.caches = [layer.attention.cache for layer in model.layers]
        finally:
            model.clear_cache()
        return logits[:, -1]

    def _rope_at(self, pos: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (1, 1, hd/2) for one position, computed as a one-token forward computes them:
        a batch of angles may take a vectorised cos where one angle takes the scalar one."""
        if pos not in self._rope:
            self._rope[pos] = rope_cos_sin(self._freqs, torch.arange(pos, pos + 1, device=self.device))
        return self._rope[pos]

    def decode(self, seqs: list[Sequence]) -> torch.Tensor:
        """Each sequence's next_token at its pos, as one batch padded to the width floor (padding rows
        attend to nothing) -> logits (len(seqs), vocab). The blocks as TransformerBlock computes them."""
        model, n = self.model, len(seqs)
        width = max(n, self.width_floor or 1)
        tokens = torch.zeros(width, 1, dtype=torch.long, device=self.device)
        tokens[:n, 0] = torch.tensor([s.next_token for s in seqs], device=self.device)
        angles = [self._rope_at(s.pos) for s in seqs] + [self._rope_at(0)] * (width - n)
        cos, sin = torch.stack([c for c, _ in angles]), torch.stack([s for _, s in angles])  # (W, 1, 1, hd/2)
        h = model.tok_embeddings(tokens)  # (W, 1, dim)
        for i, layer in enumerate(model.layers):
            h = h + self._attend(layer.attention, layer.attention_norm(h), cos, sin, seqs, i)
            h = h + layer.feed_forward(layer.ffn_norm(h))
        return model.output(model.norm(h))[:n, 0]

    @staticmethod
    def _attend(attn: Attention, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, seqs: list[Sequence],
                layer: int) -> torch.Tensor:
        """Attention.forward for one new token per row, each row against its own cache, one SDPA call per
        row with the arguments a one-token forward passes."""
        width = x.shape[0]
        q = attn.wq(x).view(width, 1, attn.n_heads, attn.head_dim)
        k = attn.wk(x).view(width, 1, attn.n_kv_heads, attn.head_dim)
        v = attn.wv(x).view(width, 1, attn.n_kv_heads, attn.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (W, H, 1, hd)
        out = torch.zeros_like(q)
        for j, seq in enumerate(seqs):
            keys, values = seq.caches[layer].update(seq.pos, k[j:j + 1], v[j:j + 1])  # (1, H_kv, pos + 1, hd)
            out[j:j + 1] = F.scaled_dot_product_attention(q[j:j + 1], keys.to(q.dtype), values.to(q.dtype),
                                                          enable_gqa=attn.n_heads != attn.n_kv_heads)
        return attn.wo(out.transpose(1, 2).reshape(width, 1, -1))

    def probe_width_floor(self) -> Optional[int]:
        """The smallest batch width from which each row's logits are bitwise the same at every width up
        to max_batch and in reversed row order, measured on max_batch random prompts; None if even
        max_batch rows in reversed order differ (batched answers may then differ from solo ones)."""
        width, self.width_floor = self.max_batch, 1
        gen = torch.Generator().manual_seed(0)
        vocab, context = self.model.args.vocab_size, self.model.args.max_seq_len
        seqs = []
        for j in range(width):
            length = 1 + (3 * j) % max(1, min(context - 1, 13))  # rows at different positions
            seq = Sequence(torch.randint(vocab, (length,), generator=gen).tolist(), Sampling(1), lambda *_: None)
            self.prefill(seq)
            seq.next_token = int(torch.randint(vocab, (1,), generator=gen))
            seqs.append(seq)
        full = self.decode(seqs)
        if not torch.equal(self.decode(seqs[::-1]).flip(0), full):
            return None
        floor = width
        while floor > 1 and torch.equal(self.decode(seqs[:floor - 1]), full[:floor - 1]):
            floor -= 1
        return floor
