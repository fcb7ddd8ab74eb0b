"""The optimizer train.py builds: AdamW with decoupled weight decay on matrices (and the embedding)
only, checked against the update written out by hand; fused into one kernel on CPU as on CUDA."""

import torch

from config import Config
from model import ModelArgs, Transformer
from train import build_optimizer

ARGS = ModelArgs(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=50, multiple_of=16, max_seq_len=16)


def hand_adamw(p0: torch.Tensor, grads: list[torch.Tensor], cfg: Config, weight_decay: float) -> torch.Tensor:
    """Loshchilov & Hutter's AdamW with Adam's bias correction, in float64."""
    p, m, v = p0.double(), torch.zeros_like(p0, dtype=torch.float64), torch.zeros_like(p0, dtype=torch.float64)
    for t, g in enumerate(grads, start=1):
        g = g.double()
        m = cfg.beta1 * m + (1 - cfg.beta1) * g
        v = cfg.beta2 * v + (1 - cfg.beta2) * g * g
        m_hat, v_hat = m / (1 - cfg.beta1**t), v / (1 - cfg.beta2**t)
        p = p * (1 - cfg.max_lr * weight_decay) - cfg.max_lr * m_hat / (v_hat.sqrt() + cfg.adam_eps)
    return p


def test_three_steps_match_hand_computed_adamw_with_decay_on_matrices_only():
    torch.manual_seed(0)
    model = Transformer(ARGS)
    # none of these is torch's default, so each must reach the optimizer to match
    cfg = Config(max_lr=1e-2, weight_decay=0.1, beta1=0.8, beta2=0.95, adam_eps=1e-6)
    optimizer = build_optimizer(model, cfg, torch.device("cpu"))
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = {n: [torch.randn_like(p) for _ in range(3)] for n, p in model.named_parameters()}
    for step in range(3):
        for n, p in model.named_parameters():
            p.grad = grads[n][step].clone()
        optimizer.step()

    decayed = 0
    for n, p in model.named_parameters():
        weight_decay = cfg.weight_decay if p.dim() >= 2 else 0.0  # norm gains are 1-D
        decayed += weight_decay > 0
        expected = hand_adamw(start[n], grads[n], cfg, weight_decay)
        assert (p.detach().double() - expected).abs().max().item() <= 1e-6, n
    assert 0 < decayed < len(start)  # both groups were exercised


def test_optimizer_is_fused_on_cpu():
    optimizer = build_optimizer(Transformer(ARGS), Config(), torch.device("cpu"))
    assert all(group["fused"] for group in optimizer.param_groups)

