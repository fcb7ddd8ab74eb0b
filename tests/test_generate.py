"""Generation: greedy decoding equals transformers' `generate` on the same weights, and the CPU decode
kernels (reordered weight copies) compute what plain nn.Linear computes, follow weight updates and
leave the model as they found it."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from generate import cpu_decode_kernels, generate_tokens
from hf_convert import to_hf
from model import ModelArgs, Transformer
from reference_weights import o1_random_

ARGS = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, multiple_of=32, max_seq_len=64)
KERNELS_AVAILABLE = torch.backends.mkl.is_available() and torch.backends.mkldnn.is_available()

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def build(dtype: torch.dtype = torch.float32, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return o1_random_(Transformer(ARGS)).to(dtype).eval()


def prompt(n: int = 12) -> list[int]:
    return torch.randint(0, ARGS.vocab_size, (n,), generator=torch.Generator().manual_seed(3)).tolist()


def patched_linears(model: nn.Module) -> int:
    return sum("forward" in m.__dict__ for m in model.modules() if isinstance(m, nn.Linear))


def test_greedy_tokens_equal_transformers_generate():
    model = build()
    ids = prompt()
    ours = list(generate_tokens(model, ids, max_new_tokens=40, stop_ids=[]))
    hf = to_hf(model).eval()
    x = torch.tensor([ids])
    out = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=40, min_new_tokens=40, do_sample=False,
                      pad_token_id=0)
    assert ours == out[0, len(ids):].tolist()


def test_stop_token_ends_generation_and_is_not_yielded():
    model = build()
    free = list(generate_tokens(model, prompt(), max_new_tokens=20, stop_ids=[]))
    stopped = list(generate_tokens(model, prompt(), max_new_tokens=20, stop_ids=[free[5]]))
    assert stopped == free[:free.index(free[5])]


def test_prefill_logits_to_keep_is_the_last_row_of_full_logits():
    model = build()
    x = torch.tensor([prompt(20)])
    with torch.no_grad():
        full, _ = model(x)
        last, _ = model(x, logits_to_keep=1)
    assert last.shape == (1, 1, ARGS.vocab_size)
    assert (last[0, 0] - full[0, -1]).abs().max().item() <= 1e-5  # M=1 and M=20 GEMMs may round apart


@pytest.mark.skipif(not KERNELS_AVAILABLE, reason="this torch build has no MKL / oneDNN")
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 0.0)])
def test_decode_kernels_compute_what_linear_computes(dtype, tol):
    model = build(dtype)
    x = torch.tensor([prompt(1)])
    with torch.inference_mode():
        plain, _ = model(x)
        with cpu_decode_kernels(model):
            assert patched_linears(model) == 2 * 7 + 1  # every projection of both layers, and the output
            packed, _ = model(x)
        assert patched_linears(model) == 0
    # bf16: oneDNN's reordered product rounds exactly as the default bf16 linear does on this CPU
    assert (packed.float() - plain.float()).abs().max().item() <= tol * plain.float().abs().max().item()


@pytest.mark.skipif(not KERNELS_AVAILABLE, reason="this torch build has no MKL / oneDNN")
def test_decode_kernels_follow_in_place_weight_updates():
    model = build()
    x = torch.tensor([prompt(1)])
    with torch.inference_mode(), cpu_decode_kernels(model):
        before, _ = model(x)
    with torch.no_grad():
        model.output.weight.mul_(-1.0)  # what an optimizer step does: same tensor, new values
        expected = F.linear(model.hidden_states(x), model.output.weight)
    with torch.inference_mode(), cpu_decode_kernels(model):
        after, _ = model(x)
    assert (after - expected).abs().max().item() <= 1e-4
    assert (after + before).abs().max().item() <= 1e-4 * before.abs().max().item() + 1e-4


def test_no_kernels_under_autocast_and_global_rng_untouched():
    model = build()
    rng = torch.get_rng_state()
    with torch.autocast("cpu", dtype=torch.bfloat16), cpu_decode_kernels(model):
        assert patched_linears(model) == 0
    with cpu_decode_kernels(model):
        pass
    assert torch.equal(torch.get_rng_state(), rng)


def test_nested_contexts_leave_plain_linears():
    model = build()
    with cpu_decode_kernels(model):
        with cpu_decode_kernels(model):
            pass
    assert patched_linears(model) == 0
