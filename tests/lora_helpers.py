"""An adapter checkpoint made by hand around a given model, for the tests of the tools that read one.

Its base holds W - (alpha / r) B A for random A and B on every block linear, so base + adapters merge to the
model's own weights (up to float32 rounding): what a tool computes from the adapter checkpoint can be checked
against that model with any reference that reads it (transformers, lm-eval). The format is written out here,
not through lora.py: the base is recorded by the sha256 of its file, as `sha256sum` gives it.
"""

import hashlib
import re
from pathlib import Path

import torch

from checkpoint import save_checkpoint
from model import Transformer

_BLOCK_LINEAR = re.compile(r"^(layers\.\d+\.(?:attention\.w[qkvo]|feed_forward\.w[123]))\.weight$")
TARGETS = ["wq", "wk", "wv", "wo", "w1", "w2", "w3"]


def adapter_checkpoint_for(model: Transformer, directory: Path, rank: int = 4, alpha: float = 12.0, seed: int = 0,
                           **fields) -> Path:
    """Write directory/base.pt and directory/adapters.pt (with `fields`, e.g. the tokenizer, in both); returns the
    adapters' path."""
    scale, g = alpha / rank, torch.Generator().manual_seed(seed)
    base_state, adapters = {}, {}
    for name, w in model.state_dict().items():
        linear = _BLOCK_LINEAR.match(name)
        if linear:
            a = torch.randn(rank, w.shape[1], generator=g) * w.shape[1] ** -0.5
            b = torch.randn(w.shape[0], rank, generator=g) * 0.1
            adapters[f"{linear[1]}.lora_a.weight"], adapters[f"{linear[1]}.lora_b.weight"] = a, b
            w = (w.float() - scale * (b @ a)).to(w.dtype)
        base_state[name] = w
    base = directory / "base.pt"
    save_checkpoint(base, model, model_state=base_state, **fields)
    digest = hashlib.sha256(base.read_bytes()).hexdigest()
    path = directory / "adapters.pt"
    save_checkpoint(path, model, model_state=adapters,
                    lora={"rank": rank, "alpha": alpha, "dropout": 0.0, "targets": TARGETS},
                    base={"path": str(base.resolve()), "sha256": digest, "files": {base.name: digest}}, **fields)
    return path
