"""Our Llama (Meta's layout and names) as a Hugging Face `LlamaForCausalLM`.

Used by the tests and bench.py as the independent reference, and by users exporting a model
to the transformers ecosystem. Needs `transformers` (not a runtime dependency of training).
"""

from __future__ import annotations

import torch

from model import ModelArgs, Transformer


def permute_for_rotate_half(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta rotates interleaved pairs (x0, x1), (x2, x3)...; HF rotates the two halves of each
    head. Reordering the rows of wq/wk makes HF's rotation compute Meta's."""
    dim1, dim2 = w.shape
    return w.view(n_heads, dim1 // n_heads // 2, 2, dim2).transpose(1, 2).reshape(dim1, dim2)


def hf_config(args: ModelArgs, attn_implementation: str = "eager"):
    from transformers import LlamaConfig

    if args.use_scaled_rope:
        rope = {"rope_type": "llama3", "rope_theta": args.rope_theta, "factor": args.rope_scale_factor,
                "low_freq_factor": args.rope_low_freq_factor, "high_freq_factor": args.rope_high_freq_factor,
                "original_max_position_embeddings": args.rope_original_max_seq_len}
    else:
        rope = {"rope_type": "default", "rope_theta": args.rope_theta}
    return LlamaConfig(
        vocab_size=args.vocab_size, hidden_size=args.dim, intermediate_size=args.ffn_hidden_dim,
        num_hidden_layers=args.n_layers, num_attention_heads=args.n_heads, num_key_value_heads=args.n_kv_heads,
        rms_norm_eps=args.norm_eps, max_position_embeddings=max(args.max_seq_len, 1024), rope_parameters=rope,
        tie_word_embeddings=args.tie_word_embeddings, attn_implementation=attn_implementation,
    )


def hf_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """Meta names -> HF names, with the RoPE row permutation."""
    args, sd = model.args, model.state_dict()
    new = {"model.embed_tokens.weight": sd["tok_embeddings.weight"], "model.norm.weight": sd["norm.weight"],
           "lm_head.weight": sd["output.weight"]}
    for i in range(args.n_layers):
        ours, hf = f"layers.{i}.", f"model.layers.{i}."
        new[hf + "self_attn.q_proj.weight"] = permute_for_rotate_half(sd[ours + "attention.wq.weight"], args.n_heads)
        new[hf + "self_attn.k_proj.weight"] = permute_for_rotate_half(sd[ours + "attention.wk.weight"],
                                                                      args.n_kv_heads)
        new[hf + "self_attn.v_proj.weight"] = sd[ours + "attention.wv.weight"]
        new[hf + "self_attn.o_proj.weight"] = sd[ours + "attention.wo.weight"]
        new[hf + "mlp.gate_proj.weight"] = sd[ours + "feed_forward.w1.weight"]
        new[hf + "mlp.down_proj.weight"] = sd[ours + "feed_forward.w2.weight"]
        new[hf + "mlp.up_proj.weight"] = sd[ours + "feed_forward.w3.weight"]
        new[hf + "input_layernorm.weight"] = sd[ours + "attention_norm.weight"]
        new[hf + "post_attention_layernorm.weight"] = sd[ours + "ffn_norm.weight"]
    return new


def to_hf(model: Transformer, attn_implementation: str = "eager"):
    """A transformers LlamaForCausalLM (eval mode) holding copies of the same weights."""
    from transformers import LlamaForCausalLM

    hf_model = LlamaForCausalLM(hf_config(model.args, attn_implementation))
    hf_model.load_state_dict({k: v.clone() for k, v in hf_state_dict(model).items()}, strict=True)
    return hf_model.eval()
