"""speedups.reordered_linears: the CPU's reordered weight copies compute what plain nn.Linear computes for
one row and for a batch, live only inside their block (so none outlives an optimizer step, which the fused
AdamW takes without bumping weight versions), and leave the model as they found it."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import offload
from generate import complete, generate_tokens
from hardware import cpu_has_native_bf16
from model import ModelArgs, Transformer
from reference_weights import o1_random_
from speedups import reordered_linears

ARGS = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, multiple_of=32, max_seq_len=64)
KERNELS_AVAILABLE = torch.backends.mkl.is_available() and torch.backends.mkldnn.is_available()
LINEARS = 2 * 7 + 1  # every projection of both layers, and the output
BF16 = pytest.mark.skipif(not cpu_has_native_bf16(),
                          reason="this CPU has no native bf16: oneDNN has no bf16 kernel to reorder for")
needs_kernels = pytest.mark.skipif(not KERNELS_AVAILABLE, reason="this torch build has no MKL / oneDNN")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def build(dtype: torch.dtype = torch.float32, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return o1_random_(Transformer(ARGS)).to(dtype).eval()


def tokens(n: int, batch: int = 1) -> torch.Tensor:
    return torch.randint(0, ARGS.vocab_size, (batch, n), generator=torch.Generator().manual_seed(3))


def patched_linears(model: nn.Module) -> int:
    return sum("forward" in m.__dict__ for m in model.modules() if isinstance(m, nn.Linear))


@needs_kernels
@pytest.mark.parametrize("rows", [1, 8])
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), pytest.param(torch.bfloat16, 0.0, marks=BF16)])
def test_reordered_linears_compute_what_linear_computes_for_one_row_and_a_batch(dtype, tol, rows):
    model = build(dtype)
    for batch in (1, 8):
        x = tokens(1, batch)
        with torch.inference_mode():
            plain, _ = model(x)
            with reordered_linears(model, rows=rows) as patched:
                assert patched == patched_linears(model) == LINEARS
                fast, _ = model(x)
            assert patched_linears(model) == 0
        # bf16: oneDNN's reordered product rounds exactly as the default bf16 linear does on this CPU
        assert (fast.float() - plain.float()).abs().max().item() <= tol * plain.float().abs().max().item()


@needs_kernels
def test_a_model_streaming_its_weights_from_disk_gets_no_reordered_copies(tmp_path):
    model = build()
    with torch.inference_mode(), reordered_linears(model) as patched:
        assert patched == LINEARS  # the same weights in memory get theirs
    streamed = offload.open_streamed(offload.write_store_from_model(tmp_path / "store", model))
    streamed.load_outer()
    assert type(streamed.output) is nn.Linear and streamed.output.weight.device.type == "cpu"  # reorderable
    with torch.inference_mode(), reordered_linears(streamed) as patched:
        assert patched == patched_linears(streamed) == 0


@needs_kernels
def test_no_reordered_copy_outlives_a_fused_adamw_step(tok):
    """What training's sample generations do: complete() before and after an optimizer step. The fused AdamW
    kernel updates the weights in place without bumping their version counters, so a copy kept by version
    would be stale; after the step the answer must be the plain linears' answer from the new weights."""
    torch.manual_seed(0)
    model = o1_random_(Transformer(ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=tok.n_words,
                                             multiple_of=32, max_seq_len=64))).eval()
    before = complete(model, tok, "The", max_new_tokens=8)

    optimizer = torch.optim.AdamW(model.parameters(), lr=0.5, weight_decay=0.0, fused=True)  # train.py's on CPU
    versions = [p._version for p in model.parameters()]
    model.train()
    logits, _ = model(torch.tensor([tok.encode("The capital of France is Paris", bos=True, eos=False)]))
    logits.float().logsumexp(-1).mean().backward()
    optimizer.step()
    model.eval()
    assert [p._version for p in model.parameters()] == versions  # the trap: no version says the weights moved

    after = complete(model, tok, "The", max_new_tokens=8)
    ids = tok.encode("The", bos=True, eos=False)
    plain = list(generate_tokens(model, ids, 8, stop_ids=tok.stop_tokens))  # plain PyTorch, the new weights
    assert after == tok.decode(plain) and after != before
    assert patched_linears(model) == 0


def test_no_kernels_under_autocast_and_global_rng_untouched():
    model = build()
    rng = torch.get_rng_state()
    with torch.autocast("cpu", dtype=torch.bfloat16), reordered_linears(model) as patched:
        assert patched == patched_linears(model) == 0
    with reordered_linears(model):
        pass
    assert torch.equal(torch.get_rng_state(), rng)


@needs_kernels
def test_an_inner_block_leaves_the_outer_blocks_kernels_and_both_leave_plain_linears():
    model = build()
    with reordered_linears(model, rows=8):
        with reordered_linears(model) as inner:
            assert inner == 0  # already routed by the outer block, whose row count stands
        assert patched_linears(model) == LINEARS
    assert patched_linears(model) == 0


def test_a_linear_whose_forward_is_already_replaced_is_left_alone():
    model = build()
    w = model.output.weight.detach().clone()
    own = lambda x: F.linear(x, w) + 1.0  # noqa: E731
    model.output.forward = own
    with reordered_linears(model):
        assert model.output.forward is own
    assert model.output.forward is own
