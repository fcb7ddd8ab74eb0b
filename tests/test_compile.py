"""torch.compile (COMPILE=true in .env, `generate.py --compile`): a compiled model trains and decodes
as the eager one does, checked against transformers' loss and greedy tokens on the same weights.

Compiling costs about 10 s per graph on a 2-core CPU, so both tests share one tiny model size.
"""

import pytest
import torch
import torch.nn.functional as F

from generate import generate_tokens
from hf_convert import to_hf
from model import IGNORE_INDEX, ModelArgs, Transformer
from reference_weights import o1_random_

ARGS = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, multiple_of=32, max_seq_len=64)

# inductor compiles in worker processes: tens of seconds a test, so out of the unit loop
pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.e2e]


def build() -> Transformer:
    torch.manual_seed(0)
    return o1_random_(Transformer(ARGS))


def ids(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.randint(0, ARGS.vocab_size, shape, generator=torch.Generator().manual_seed(seed))


def test_compiled_training_loss_matches_transformers_and_gradients_match_eager():
    model = build().train()
    x, targets = ids((2, 32), seed=1), ids((2, 32), seed=2)
    targets[0, :5] = IGNORE_INDEX  # the loss mask goes through the compiled graph too
    with torch.no_grad():
        hf_logits = to_hf(model)(x).logits
    reference = F.cross_entropy(hf_logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX,
                                reduction="sum")

    # as train.py calls it: chunked loss summed over valid tokens; fullgraph: a graph break fails here
    # rather than silently running part of the step in eager mode
    compiled = torch.compile(model, fullgraph=True)
    _, loss = compiled(x, targets, loss_reduction="sum", return_logits=False)
    loss.backward()
    compiled_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model(x, targets, loss_reduction="sum", return_logits=False)[1].backward()

    assert loss.item() == pytest.approx(reference.item(), rel=1e-5)
    for name, p in model.named_parameters():  # summed gradients reach ~20: compare relative to each tensor
        assert (compiled_grads[name] - p.grad).abs().max().item() <= 1e-5 * p.grad.abs().max().item(), name


def test_compiled_greedy_decoding_equals_transformers_generate():
    model = build().eval()
    prompt = ids((10,), seed=3).tolist()
    compiled = torch.compile(model, dynamic=True, fullgraph=True)  # as generate.py --compile, no graph break
    ours = list(generate_tokens(compiled, prompt, max_new_tokens=12, stop_ids=[]))
    x = torch.tensor([prompt])
    hf = to_hf(model).eval().generate(x, attention_mask=torch.ones_like(x), max_new_tokens=12, min_new_tokens=12,
                                      do_sample=False, pad_token_id=0)
    assert ours == hf[0, len(prompt):].tolist()
