"""The model's hooks for the training stages: a loss `head` computed inside forward (eager and compiled),
GQA attention that keeps SDPA's memory-efficient kernel reachable on CUDA, and packed-document masks
that stay boolean. References: transformers' LlamaForCausalLM on the same weights, and the eager model.
"""

import pytest
import torch
import torch.nn.functional as F

import model as model_module
from hf_convert import to_hf
from losses import IGNORE_INDEX, chunked_cross_entropy, chunked_token_logprobs
from model import ModelArgs, Transformer, document_attention_mask, sdpa_needs_repeated_kv
from reference_weights import o1_random_

ARGS = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, multiple_of=32, max_seq_len=64)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def build() -> Transformer:
    torch.manual_seed(0)
    return o1_random_(Transformer(ARGS))


def ids(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.randint(0, ARGS.vocab_size, shape, generator=torch.Generator().manual_seed(seed))


def packed(seq_len: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    """Two rows of packed documents: the (B, 1, T, T) mask and per-document positions."""
    lengths = [[7, 10, 7], [15, 9]]
    doc_ids = torch.stack([torch.cat([torch.full((n,), d) for d, n in enumerate(row)]) for row in lengths])
    positions = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in lengths])
    return document_attention_mask(doc_ids), positions


# ---- head ----------------------------------------------------------------------------------------


def test_head_gets_hidden_states_and_output_weight_and_its_loss_matches_transformers():
    model = build().train()
    x, targets = ids((2, 24), seed=1), ids((2, 24), seed=2)
    targets[0, :6] = IGNORE_INDEX
    with torch.no_grad():
        reference = F.cross_entropy(to_hf(model)(x).logits.flatten(0, 1), targets.flatten(),
                                    ignore_index=IGNORE_INDEX, reduction="sum")
    seen = {}

    def head(h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        seen["h"], seen["weight"] = h.shape, weight
        return chunked_cross_entropy(h.flatten(0, 1), weight, targets.flatten(), "sum", chunk_rows=10)

    loss = model(x, head=head)
    loss.backward()
    head_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model(x, targets, loss_reduction="sum")[1].backward()  # the full-logits path
    assert seen["h"] == (2, 24, ARGS.dim) and seen["weight"] is model.output.weight
    assert loss.item() == pytest.approx(reference.item(), rel=1e-5)
    for n, p in model.named_parameters():
        assert (head_grads[n] - p.grad).abs().max().item() <= 1e-5 * p.grad.abs().max().item(), n


def test_head_and_targets_together_are_refused():
    model = build()
    x = ids((1, 8), seed=1)
    with pytest.raises(ValueError, match="pass targets to the head"):
        model(x, x, head=lambda h, w: h)


@pytest.mark.e2e  # torch.compile: tens of seconds
def test_compiled_model_runs_a_closure_head_like_eager():
    # As a DPO step would: per-sequence sums of token log-probs, weighted differently per sequence.
    model = build().train()
    x, targets = ids((2, 24), seed=3), ids((2, 24), seed=4)
    targets[:, :5] = IGNORE_INDEX
    weights = torch.tensor([1.0, -0.5])
    mask, positions = packed()

    def head(h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        logps = chunked_token_logprobs(h.flatten(0, 1), weight, targets.flatten(), chunk_rows=16).view(2, -1)
        return (logps.sum(-1) * weights).sum()

    # aot_eager: dynamo's capture of forward + head and AOT autograd's trace of the losses' backward are
    # what a head could break; inductor's code generation (1-2 min cold on 2 cores) compiles the same ops
    # in test_compile.py.
    compiled = torch.compile(model, backend="aot_eager")
    loss = compiled(x, attn_mask=mask, positions=positions, head=head)
    loss.backward()
    compiled_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    eager = model(x, attn_mask=mask, positions=positions, head=head)
    eager.backward()
    assert loss.item() == pytest.approx(eager.item(), rel=1e-5)
    for n, p in model.named_parameters():
        assert (compiled_grads[n] - p.grad).abs().max().item() <= 1e-5 * p.grad.abs().max().item(), n


# ---- attention -------------------------------------------------------------------------------------


@pytest.mark.parametrize("device,dtype,has_mask,q_len,n_kv_heads,expected", [
    ("cuda", torch.float32, False, 128, 8, True),    # fp32 GQA: flash refuses fp32, math kernel would run
    ("cuda", torch.bfloat16, True, 128, 8, True),    # a mask (packed documents): flash refuses masks
    ("cuda", torch.float32, True, 128, 8, True),
    ("cuda", torch.bfloat16, False, 128, 8, False),  # flash takes bf16 GQA without a mask
    ("cuda", torch.float32, False, 128, 32, False),  # no GQA: nothing to repeat
    ("cuda", torch.float32, True, 1, 8, False),      # one query (decoding): tiny scores, keep the cache as is
    ("cpu", torch.float32, True, 128, 8, False),     # CPU kernels handle GQA
    ("cpu", torch.bfloat16, True, 128, 8, False),
])
def test_kv_heads_are_repeated_only_where_cuda_gqa_would_fall_back_to_the_math_kernel(
        device, dtype, has_mask, q_len, n_kv_heads, expected):
    assert sdpa_needs_repeated_kv(device, dtype, has_mask, q_len, n_heads=32, n_kv_heads=n_kv_heads) is expected


def test_repeated_kv_attention_matches_transformers(monkeypatch):
    # The CUDA path run on CPU: k/v repeated per query head must pair heads as GQA does (i -> i // n_rep).
    model = build()
    x = ids((2, 24), seed=5)
    with torch.no_grad():
        reference = to_hf(model)(x).logits
    calls = []
    monkeypatch.setattr(model_module, "sdpa_needs_repeated_kv", lambda *args: calls.append(args) or True)
    with torch.no_grad():
        logits, _ = model(x)
    assert len(calls) == ARGS.n_layers
    assert (logits - reference).abs().max().item() <= 1e-4


def test_packed_document_mask_reaches_sdpa_boolean_and_broadcast_over_heads(monkeypatch):
    model = build()
    x = ids((2, 24), seed=6)
    mask, positions = packed()
    seen = []
    sdpa = F.scaled_dot_product_attention

    def recording_sdpa(q, k, v, attn_mask=None, **kwargs):
        seen.append((attn_mask.dtype, tuple(attn_mask.shape)))
        return sdpa(q, k, v, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording_sdpa)
    with torch.no_grad():
        model(x, attn_mask=mask, positions=positions)
    assert seen == [(torch.bool, (2, 1, 24, 24))] * ARGS.n_layers
