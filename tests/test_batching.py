"""The serving engine's continuous batching: sequences that join a running batch at different steps and
positions get each token generate.py's generate_tokens gives them alone (greedy and seeded sampling),
the probe finds kernels whose rows depend on the batch, and a cancelled sequence frees its place."""

import queue
import threading
from contextlib import ExitStack

import pytest
import torch
import torch.nn.functional as F

from batching import BatchEngine, Sampling, Sequence
from generate import generate_tokens
from hardware import cpu_has_native_bf16
from model import ModelArgs, Transformer
from reference_weights import o1_random_
from speedups import reordered_linears

ARGS = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, multiple_of=32, max_seq_len=96)
DTYPES = [torch.float32, pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
    not cpu_has_native_bf16(), reason="this CPU has no native bf16"))]


def build(dtype: torch.dtype) -> Transformer:
    torch.manual_seed(0)
    return o1_random_(Transformer(ARGS)).to(dtype).eval()


def prompts(n: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, ARGS.vocab_size, (3 + 5 * i,), generator=g).tolist() for i in range(n)]


class Collector:
    """Sequences whose events land in one queue, as (index, kind, value)."""

    def __init__(self):
        self.events: queue.Queue = queue.Queue()

    def sequence(self, i: int, prompt: list[int], sampling: Sampling) -> Sequence:
        return Sequence(prompt, sampling, lambda kind, value: self.events.put((i, kind, value)))

    def run(self, n: int, timeout: float = 60.0) -> tuple[dict[int, list[int]], dict[int, str]]:
        tokens: dict[int, list[int]] = {i: [] for i in range(n)}
        ends: dict[int, str] = {}
        while len(ends) < n:
            i, kind, value = self.events.get(timeout=timeout)
            if kind == "token":
                tokens[i].append(value)
            else:
                ends[i] = f"{kind}:{value}"
        return tokens, ends


def solo(dtype: torch.dtype, prompt: list[int], n: int, *sampling) -> list[int]:
    """generate.py's answer: generate_tokens on a fresh model under the kernels generate.py's main switches on."""
    model = build(dtype)
    with reordered_linears(model):
        return list(generate_tokens(model, prompt, n, [], *sampling))


@pytest.fixture
def engine_for():
    """Started engines whose models have the kernels serve.py's start-up gives them; stopped after the test."""
    engines, kernels = [], ExitStack()

    def make(model, max_batch: int = 8, **kw):
        kernels.enter_context(reordered_linears(model, rows=max_batch))
        engine = BatchEngine(model, stop_ids=[], max_batch=max_batch, **kw)
        engine.start()
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.stop()
    kernels.close()


def prefilled(engine: BatchEngine, n: int) -> list[Sequence]:
    """n sequences of different lengths, prefilled, each with a next token to feed at its position."""
    seqs = []
    for i, p in enumerate(prompts(n)):
        seq = Sequence(p, Sampling(4), lambda *_: None)
        engine.prefill(seq)
        seq.next_token = (7 * i + 1) % ARGS.vocab_size
        seqs.append(seq)
    return seqs


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_rows_logits_are_bitwise_the_same_alone_and_in_any_batch(dtype):
    model = build(dtype)
    engine = BatchEngine(model, stop_ids=[], max_batch=6)
    with reordered_linears(model, rows=6), torch.inference_mode():
        engine.width_floor = engine.probe_width_floor()
        assert engine.width_floor is not None, "this CPU's kernels give rows batch-dependent results"
        seqs = prefilled(engine, 6)
        batch = engine.decode(seqs)
        for j in range(6):
            assert torch.equal(engine.decode([seqs[j]]), batch[j:j + 1])
        assert torch.equal(engine.decode(seqs[1:4][::-1]), batch[1:4].flip(0))


@pytest.mark.parametrize("dtype, bitwise", [(torch.float32, False), pytest.param(torch.bfloat16, True, marks=(
    pytest.mark.skipif(not cpu_has_native_bf16(), reason="this CPU has no native bf16")))])
def test_batched_logits_are_a_one_token_forwards_bf16_bit_for_bit_float32_to_rounding(dtype, bitwise):
    """The engine under serve.py's kernels; the reference is Transformer.forward with its own KV cache under
    generate.py's (oneDNN for bf16, as the engine's; MKL for one float32 row, which rounds in another order)."""
    model, reference = build(dtype), build(dtype)
    engine = BatchEngine(model, stop_ids=[], max_batch=6)
    with reordered_linears(model, rows=6), torch.inference_mode():
        engine.width_floor = engine.probe_width_floor()
        seqs = prefilled(engine, 6)
        batch = engine.decode(seqs)
        for j, seq in enumerate(seqs):
            reference.setup_cache(1, seq.total)
            with reordered_linears(reference):
                reference(torch.tensor([seq.prompt]), start_pos=0, logits_to_keep=1)
                expected, _ = reference(torch.tensor([[seq.next_token]]), start_pos=seq.pos)
            reference.clear_cache()
            if bitwise:
                assert torch.equal(batch[j], expected[0, 0])
            else:
                torch.testing.assert_close(batch[j], expected[0, 0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_sequences_joining_a_running_batch_get_their_solo_greedy_tokens(dtype, engine_for):
    engine = engine_for(build(dtype), max_batch=6)
    assert engine.width_floor is not None, "this CPU's kernels give rows batch-dependent results"
    ps = prompts(6)
    lengths = [30, 12, 25, 40, 7, 33]
    alone = [solo(dtype, p, n) for p, n in zip(ps, lengths)]
    c = Collector()
    engine.submit([c.sequence(i, ps[i], Sampling(lengths[i])) for i in range(3)])
    while engine.decode_steps < 5:  # the rest join a batch that is already decoding
        threading.Event().wait(0.005)
    engine.submit([c.sequence(i, ps[i], Sampling(lengths[i])) for i in range(3, 6)])
    tokens, ends = c.run(6)
    assert [tokens[i] for i in range(6)] == alone
    assert all(end == "end:length" for end in ends.values())
    assert engine.peak_batch >= 4


def test_seeded_sampling_draws_what_generate_tokens_draws_with_that_seed(engine_for):
    engine = engine_for(build(torch.float32), max_batch=4)
    ps = prompts(4)
    sampling = [Sampling(20, temperature=0.9, top_p=0.8, top_k=50, seed=100 + i) for i in range(4)]
    alone = [solo(torch.float32, p, 20, s.temperature, s.top_k, s.top_p, torch.Generator().manual_seed(s.seed))
             for p, s in zip(ps, sampling)]
    c = Collector()
    engine.submit([c.sequence(i, ps[i], sampling[i]) for i in range(4)])
    tokens, _ = c.run(4)
    assert [tokens[i] for i in range(4)] == alone


def test_a_stop_id_ends_the_sequence_unsent(engine_for):
    free = solo(torch.float32, prompts(1)[0], 20)
    engine = engine_for(build(torch.float32), max_batch=2)
    engine.stop_ids = {free[4]}
    c = Collector()
    engine.submit([c.sequence(0, prompts(1)[0], Sampling(20))])
    tokens, ends = c.run(1)
    assert tokens[0] == free[:free.index(free[4])] and ends[0] == "end:stop"


def test_ignore_stop_decodes_through_stop_ids_to_max_new_tokens(engine_for):
    free = solo(torch.float32, prompts(1)[0], 20)
    engine = engine_for(build(torch.float32), max_batch=2)
    engine.stop_ids = {free[4]}
    c = Collector()
    engine.submit([c.sequence(0, prompts(1)[0], Sampling(20, ignore_stop=True))])
    tokens, ends = c.run(1)
    assert tokens[0] == free and ends[0] == "end:length"


def test_probe_pads_solo_rows_up_to_where_a_kernel_stops_depending_on_the_batch_size(engine_for):
    model = build(torch.float32)
    engine = BatchEngine(model, stop_ids=[], max_batch=4)
    w = model.output.weight.detach().clone()
    # One or two rows round differently from three or more, as MKL's float32 GEMV and GEMM do.
    rowwise = lambda x: torch.cat([F.linear(row, w) for row in x.split(1)])  # noqa: E731
    model.output.forward = lambda x: rowwise(x) + (1e-3 if x.shape[0] < 3 else 0.0)
    with reordered_linears(model, rows=4), torch.inference_mode():  # the other linears as serve.py runs them
        assert engine.probe_width_floor() == 3


def test_probe_reports_a_kernel_whose_rows_depend_on_their_place_in_the_batch():
    model = build(torch.float32)
    engine = BatchEngine(model, stop_ids=[], max_batch=4)
    w = model.output.weight.detach().clone()
    model.output.forward = lambda x: F.linear(x, w) + 1e-3 * torch.arange(x.shape[0]).view(-1, 1, 1)
    with torch.inference_mode():
        assert engine.probe_width_floor() is None


def test_a_cancelled_sequence_frees_its_place_for_the_next_one(engine_for):
    engine = engine_for(build(torch.float32), max_batch=1)
    c = Collector()
    long, short = c.sequence(0, prompts(1)[0], Sampling(90)), c.sequence(1, prompts(2)[1], Sampling(5))
    engine.submit([long])
    assert c.events.get(timeout=30)[1] == "token"
    engine.submit([short])  # waits: the only place is taken
    long.cancel()
    got = []
    while len(got) < 6:
        i, kind, value = c.events.get(timeout=30)
        if i == 1:
            got.append((kind, value))
    assert got[-1] == ("end", "length")
    for _ in range(100):  # the engine forgets a finished sequence right after its last event
        if engine.active == 0:
            break
        threading.Event().wait(0.01)
    assert engine.active == 0 and engine.queued == 0
