"""Hugging Face Llama names and rotary row order against ours (Meta's), for reading and writing HF weights.

The two layouts differ in names and in one permutation: Meta rotates interleaved pairs of a head's dimensions,
HF rotates its two halves, so the rows of wq/wk are reordered on the way out and back. checkpoint.py reads HF
directories with `from_hf_state_dict`; hf_convert.py exports with `to_hf_state_dict`.
"""

from __future__ import annotations

import re
from typing import Optional

import torch

from model import ModelArgs

_TOP_NAMES = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
              "output.weight": "lm_head.weight"}
_LAYER_NAMES = {  # ours after "layers.N." -> HF's after "model.layers.N."
    "attention.wq.weight": "self_attn.q_proj.weight", "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight", "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight", "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight", "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_HF_TOP = {v: k for k, v in _TOP_NAMES.items()}
_HF_LAYER = {v: k for k, v in _LAYER_NAMES.items()}
_LAYER_KEY = re.compile(r"^(model\.)?layers\.(\d+)\.(.+)$")


def hf_name(name: str) -> str:
    """Our parameter name -> HF's (`layers.3.attention.wq.weight` -> `model.layers.3.self_attn.q_proj.weight`)."""
    if name in _TOP_NAMES:
        return _TOP_NAMES[name]
    m = _LAYER_KEY.match(name)
    if m is None or m[3] not in _LAYER_NAMES:
        raise KeyError(f"no Hugging Face name for {name!r}")
    return f"model.layers.{m[2]}.{_LAYER_NAMES[m[3]]}"


def meta_name(name: str) -> Optional[str]:
    """HF's name -> ours, or None for a name that is not part of a Llama."""
    if name in _HF_TOP:
        return _HF_TOP[name]
    m = _LAYER_KEY.match(name)
    if m is None or m[1] is None or m[3] not in _HF_LAYER:
        return None
    return f"layers.{m[2]}.{_HF_LAYER[m[3]]}"


def permute_for_rotate_half(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of wq/wk (n_heads*head_dim, in): Meta's order (pairs (0,1), (2,3)... of each head) -> HF's
    (the first halves of the pairs, then the second halves), so HF's rotate-half computes Meta's rotation."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def unpermute_from_rotate_half(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of `permute_for_rotate_half`: HF's row order -> Meta's."""
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def rotary_heads(name: str, args: ModelArgs) -> Optional[int]:
    """The number of heads whose rows `permute_for_rotate_half` reorders in this weight, else None."""
    if name.endswith("attention.wq.weight"):
        return args.n_heads
    if name.endswith("attention.wk.weight"):
        return args.n_kv_heads
    return None


def to_hf_state_dict(state: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """Our names and row order -> HF's (the tensors not permuted are shared, not copied)."""
    out = {}
    for name, t in state.items():
        heads = rotary_heads(name, args)
        out[hf_name(name)] = t if heads is None else permute_for_rotate_half(t, heads)
    return out


def from_hf_state_dict(state: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """HF's names and row order -> ours; names that are not part of a Llama are left out (the caller checks)."""
    out = {}
    for name, t in state.items():
        ours = meta_name(name)
        if ours is None:
            continue
        heads = rotary_heads(ours, args)
        out[ours] = t if heads is None else unpermute_from_rotate_half(t, heads)
    return out
