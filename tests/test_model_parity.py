"""Model parity with Hugging Face's `LlamaForCausalLM`, the independent reference.

Tiny random models in float32 on CPU: our Meta-layout weights are converted to HF's layout, and
logits, loss, KV-cache decoding and packed-sequence masking are checked against it.
"""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from hf_convert import to_hf
from model import PRESETS, ModelArgs, Transformer, chunked_cross_entropy, document_attention_mask
from reference_weights import o1_random_

VOCAB = 300
TINY = dict(dim=64, n_layers=2, n_heads=4, vocab_size=VOCAB, multiple_of=32, max_seq_len=128)

CONFIGS = {
    # n_kv_heads < n_heads, a non-default theta, eps and FFN multiplier, so none can be ignored.
    "gqa": ModelArgs(**TINY, n_kv_heads=2, rope_theta=10_000.0, norm_eps=1e-6, ffn_dim_multiplier=1.3),
    "mqa": ModelArgs(**TINY, n_kv_heads=1),
    "tied": ModelArgs(**TINY, n_kv_heads=2, tie_word_embeddings=True),
    # Llama 3.1 scaling with a short original context, so test sequences run well beyond it.
    "scaled_rope": ModelArgs(**TINY, n_kv_heads=2, use_scaled_rope=True, rope_original_max_seq_len=64,
                             rope_scale_factor=4.0, rope_low_freq_factor=1.0, rope_high_freq_factor=4.0),
}
SEQ_LEN = 100  # > rope_original_max_seq_len of the scaled config


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def build(args: ModelArgs, seed: int = 0) -> Transformer:
    """Our model with O(1) random weights: the default N(0, 0.02) init gives near-zero logits
    that would hide layout mistakes under any tolerance. Norm weights are random too."""
    torch.manual_seed(seed)
    return o1_random_(Transformer(args))


def tokens(batch: int = 2, seq_len: int = SEQ_LEN, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq_len), generator=torch.Generator().manual_seed(seed))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# ---- logits ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_hf_llama(name):
    model = build(CONFIGS[name])
    hf = to_hf(model)
    x = tokens()
    with torch.no_grad():
        ours, _ = model(x)
        ref = hf(x).logits
    assert ref.std() > 0.5, "reference logits too small for the tolerance to mean anything"
    assert max_diff(ours, ref) <= 1e-4


def test_tied_embeddings_are_one_tensor_like_hf():
    model = build(CONFIGS["tied"])
    assert model.output.weight is model.tok_embeddings.weight
    hf = to_hf(model)
    assert hf.lm_head.weight is hf.model.embed_tokens.weight
    untied = build(CONFIGS["gqa"])
    assert untied.output.weight is not untied.tok_embeddings.weight


def test_scaled_rope_config_covers_all_three_frequency_bands():
    # Guard on the test itself: Llama 3.1 scaling keeps short wavelengths, divides long ones and
    # blends the band between; the scaled config must have frequencies in each regime.
    a = CONFIGS["scaled_rope"]
    hd = a.head_dim
    wavelens = [2 * math.pi * a.rope_theta ** (2 * i / hd) for i in range(hd // 2)]
    low, high = a.rope_original_max_seq_len / a.rope_low_freq_factor, a.rope_original_max_seq_len / a.rope_high_freq_factor
    assert any(w < high for w in wavelens)
    assert any(high <= w <= low for w in wavelens)
    assert any(w > low for w in wavelens)


def test_scaled_rope_changes_logits():
    # If scaling were ignored, the HF parity above would fail; this shows it is not a no-op here.
    scaled = CONFIGS["scaled_rope"]
    unscaled = dataclasses.replace(scaled, use_scaled_rope=False)
    x = tokens()
    with torch.no_grad():
        a, _ = build(scaled)(x)
        b, _ = build(unscaled)(x)  # same seed, same weights
    assert max_diff(a, b) > 1e-2


@pytest.mark.parametrize("batched", [False, True])
def test_explicit_positions_match_hf_position_ids(batched):
    # RoPE only sees position differences, so a uniform shift proves nothing: use gaps, differing per row.
    model = build(CONFIGS["scaled_rope"])
    hf = to_hf(model)
    x = tokens(seq_len=40)
    gaps = torch.randint(1, 5, (2, 40), generator=torch.Generator().manual_seed(4))
    positions = gaps.cumsum(-1) - gaps[:, :1]  # (B, T), starting at 0
    if not batched:
        positions = positions[:1].expand(2, -1)
    with torch.no_grad():
        ours, _ = model(x, positions=positions if batched else positions[0])
        ref = hf(x, position_ids=positions).logits
        default, _ = model(x)
    assert max_diff(ours, ref) <= 1e-4
    assert max_diff(ours, default) > 1e-2


# ---- loss --------------------------------------------------------------------------------------


def _reference_nll(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token negative log-likelihood by hand, and the mask of tokens that count (not -100)."""
    logp = logits.float().log_softmax(-1)
    valid = targets != -100
    nll = -logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return nll * valid, valid


def test_loss_matches_cross_entropy_on_hf_logits_ignoring_minus_100():
    model = build(CONFIGS["gqa"])
    hf = to_hf(model)
    x = tokens(seq_len=40)
    targets = tokens(seq_len=40, seed=2)
    targets[0, :15] = -100  # a masked prompt
    targets[1, -7:] = -100  # padding
    targets[1, 3] = -100
    with torch.no_grad():
        nll, valid = _reference_nll(hf(x).logits, targets)
        _, mean = model(x, targets)
        _, total = model(x, targets, loss_reduction="sum")
    assert valid.sum() == 2 * 40 - 15 - 7 - 1
    assert mean.item() == pytest.approx((nll.sum() / valid.sum()).item(), abs=1e-5)
    assert total.item() == pytest.approx(nll.sum().item(), rel=1e-5)


@pytest.mark.parametrize("name", ["gqa", "tied"])
def test_chunked_loss_without_logits_matches_hf_and_full_path_gradients(name):
    # The training path never materialises (B, T, vocab): 12 x 100 rows = two chunks of <= 1024.
    model = build(CONFIGS[name])
    hf = to_hf(model)
    x = tokens(batch=12)
    targets = tokens(batch=12, seed=2)
    targets[0, :15] = -100
    with torch.no_grad():
        nll, valid = _reference_nll(hf(x).logits, targets)
    logits, mean = model(x, targets, return_logits=False)
    _, total = model(x, targets, loss_reduction="sum", return_logits=False)
    assert logits is None
    assert mean.item() == pytest.approx((nll.sum() / valid.sum()).item(), abs=1e-5)
    assert total.item() == pytest.approx(nll.sum().item(), rel=1e-5)
    mean.backward()
    chunked_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model(x, targets)[1].backward()
    for n, p in model.named_parameters():
        assert max_diff(chunked_grads[n], p.grad) <= 1e-5, n


def test_chunked_loss_under_no_grad_costs_only_the_logits_matmul():
    """Validation runs under no_grad with weights that require grad: only the forward product is due."""
    n, dim, vocab = 64, 32, 1000
    h, weight = torch.randn(n, dim, requires_grad=True), torch.randn(vocab, dim, requires_grad=True)
    targets = torch.randint(0, vocab, (n,))
    with torch.no_grad(), FlopCounterMode(display=False) as flops:
        loss = chunked_cross_entropy(h, weight, targets, chunk_rows=16)
    assert flops.get_total_flops() == 2 * n * dim * vocab
    assert loss.item() == pytest.approx(F.cross_entropy(h @ weight.T, targets).item(), rel=1e-5)


def test_sum_loss_of_fully_masked_batch_is_zero():
    # A micro-batch of prompt tokens only must add nothing (not NaN) to a summed loss.
    model = build(CONFIGS["gqa"])
    x = tokens(seq_len=8)
    _, total = model(x, torch.full_like(x, -100), loss_reduction="sum")
    assert total.item() == 0.0


# ---- KV cache ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["gqa", "scaled_rope"])
def test_kv_cache_one_token_decode_matches_full_forward(name):
    model = build(CONFIGS[name])
    x = tokens(seq_len=90)
    with torch.no_grad():
        full, _ = model(x)
        model.setup_cache(batch_size=2, max_seq_len=96)
        steps = [model(x[:, :70])[0]]  # prefill
        for t in range(70, 90):
            steps.append(model(x[:, t : t + 1], start_pos=t)[0])
        model.clear_cache()
    assert max_diff(torch.cat(steps, dim=1), full) <= 1e-5


@pytest.mark.parametrize("name", ["gqa", "scaled_rope"])
def test_kv_cache_multi_token_chunks_after_prefill_match_full_forward(name):
    model = build(CONFIGS[name])
    x = tokens(seq_len=90)
    with torch.no_grad():
        full, _ = model(x)
        model.setup_cache(batch_size=2, max_seq_len=96)
        steps, start = [], 0
        for size in (30, 17, 1, 25, 17):  # chunks at start_pos > 0 need a causal offset mask
            steps.append(model(x[:, start : start + size], start_pos=start)[0])
            start += size
        model.clear_cache()
        again, _ = model(x)  # no cache left behind
    assert max_diff(torch.cat(steps, dim=1), full) <= 1e-5
    assert max_diff(again, full) == 0.0


# ---- packed sequences --------------------------------------------------------------------------


def test_packed_documents_match_each_document_run_alone():
    model = build(CONFIGS["gqa"])
    doc_lengths = [[10, 25, 13], [30, 18]]  # two packed rows of 48 tokens
    x = tokens(seq_len=48)
    doc_ids = torch.cat([torch.cat([torch.full((n,), d) for d, n in enumerate(row)])[None] for row in doc_lengths])
    positions = torch.cat([torch.cat([torch.arange(n) for n in row])[None] for row in doc_lengths])
    with torch.no_grad():
        packed, _ = model(x, attn_mask=document_attention_mask(doc_ids), positions=positions)
        unmasked, _ = model(x)
        for b, row in enumerate(doc_lengths):
            start = 0
            for n in row:
                alone, _ = model(x[b : b + 1, start : start + n])
                assert max_diff(packed[b, start : start + n], alone[0]) <= 1e-5, (b, start, n)
                if start > 0:  # the mask matters: without it later documents see earlier ones
                    assert max_diff(unmasked[b, start : start + n], alone[0]) > 1e-3
                start += n


# ---- sizes, gradients, devices -----------------------------------------------------------------


@pytest.mark.parametrize(
    "dim,multiple_of,multiplier,hidden",
    [
        (4096, 1024, 1.3, 14336),  # Llama 3 / 3.1 8B
        (2048, 256, 1.5, 8192),  # Llama 3.2 1B
        (3072, 256, 1.0, 8192),  # Llama 3.2 3B
        (4096, 256, None, 11008),  # Llama 2 7B: the rule without a multiplier
    ],
)
def test_ffn_hidden_dim_matches_published_configs(dim, multiple_of, multiplier, hidden):
    # Published HF `intermediate_size` values; the layers built must have that shape too.
    args = ModelArgs(dim=dim, n_layers=1, n_heads=32, multiple_of=multiple_of, ffn_dim_multiplier=multiplier)
    assert args.ffn_hidden_dim == hidden
    with torch.device("meta"):
        ff = Transformer(args).layers[0].feed_forward
    assert ff.w1.weight.shape == ff.w3.weight.shape == (hidden, dim)
    assert ff.w2.weight.shape == (dim, hidden)


@pytest.mark.parametrize("preset,hidden", [("llama3-8b", 14336), ("llama3.1-8b", 14336),
                                           ("llama3.2-1b", 8192), ("llama3.2-3b", 8192)])
def test_presets_have_published_ffn_hidden_dim(preset, hidden):
    assert ModelArgs(**PRESETS[preset]).ffn_hidden_dim == hidden


@pytest.mark.parametrize("name", ["gqa", "tied"])
def test_backward_gives_finite_nonzero_grad_on_every_parameter(name):
    model = build(CONFIGS[name]).train()
    x = tokens(seq_len=32)
    _, loss = model(x, tokens(seq_len=32, seed=3))
    loss.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, pname


def test_builds_and_runs_on_meta_device():
    # No hard-coded device: everything, including forward's rope tables and masks, follows inputs.
    with torch.device("meta"):
        model = Transformer(CONFIGS["tied"])
    assert all(p.device.type == "meta" for p in model.parameters())
    assert model.output.weight is model.tok_embeddings.weight
    x = torch.zeros(2, 16, dtype=torch.long, device="meta")
    logits, loss = model(x, x)
    assert logits.shape == (2, 16, VOCAB) and logits.device.type == "meta"
    assert loss.device.type == "meta"


def test_bfloat16_forward_runs_and_tracks_float32():
    model = build(CONFIGS["tied"])
    x = tokens(seq_len=32)
    with torch.no_grad():
        ref, _ = model(x)
        model.to(torch.bfloat16)
        assert model.output.weight is model.tok_embeddings.weight
        logits, loss = model(x, x)
    assert logits.dtype == torch.bfloat16
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert torch.isfinite(logits).all()
    # bf16 keeps ~3 significant digits; logits are O(1), so errors of a few 1e-2 are expected.
    assert max_diff(logits.float(), ref) < 0.25
    assert (logits.float().argmax(-1) == ref.argmax(-1)).float().mean() > 0.9


def test_activation_checkpointing_gives_the_same_loss_and_gradients():
    # The non-checkpointed path is the one verified against HF above; recomputation must not change it.
    model = build(CONFIGS["gqa"])
    x, targets = tokens(seq_len=40), tokens(seq_len=40, seed=2)
    model(x, targets)[1].backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.activation_checkpointing = True
    model.train()
    calls = []
    model.layers[0].register_forward_pre_hook(lambda *_: calls.append(1))
    model(x, targets)[1].backward()
    assert len(calls) == 2  # the block really was recomputed in backward
    for n, p in model.named_parameters():
        assert max_diff(plain[n], p.grad) <= 1e-6, n


def test_chunked_loss_under_bf16_autocast_tracks_the_float32_reference():
    # bf16 matmuls, float32 softmax: loss and gradients stay within bf16 rounding of float32.
    model = build(CONFIGS["tied"]).train()
    x, targets = tokens(batch=12), tokens(batch=12, seed=2)
    ref_loss = model(x, targets)[1]
    ref_loss.backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(x, targets, return_logits=False)[1]
    loss.backward()
    assert loss.dtype == torch.float32 and abs(loss.item() - ref_loss.item()) <= 2e-2 * ref_loss.item()
    for n, p in model.named_parameters():
        assert (p.grad - ref[n]).norm() <= 3e-2 * ref[n].norm(), n
