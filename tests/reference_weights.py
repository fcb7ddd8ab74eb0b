"""Weights for comparisons against a reference implementation."""

import torch

from model import Transformer


@torch.no_grad()
def o1_random_(model: Transformer) -> Transformer:
    """O(1) random weights, in place: the default N(0, 0.02) init gives near-uniform logits that
    would hide layout mistakes under any tolerance. Norm weights are random too. Draws from the
    global generator: seed it before building the model."""
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.copy_(1.0 + 0.2 * torch.randn_like(p))
        else:
            p.normal_(0.0, p.shape[1] ** -0.5)
    return model.eval()
