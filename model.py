"""Llama 3 in plain PyTorch: Meta's architecture and parameter names, built for training.

Reads top to bottom: ModelArgs -> RMSNorm -> RoPE -> KVCache -> Attention -> FeedForward
-> TransformerBlock -> Transformer. Parameter names are Meta's (`tok_embeddings`,
`layers.N.attention.wq`, `feed_forward.w1`, ...), so Meta checkpoints load without renaming.
The model knows nothing of devices, ranks or dtypes: callers move it and wrap it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

# The chunked output-layer losses live in losses.py; IGNORE_INDEX and chunked_cross_entropy are
# re-exported because callers have always imported them from here.
from losses import IGNORE_INDEX, chunked_cross_entropy  # noqa: F401


@dataclass
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: Optional[int] = None
    vocab_size: int = 128256
    multiple_of: int = 256  # SwiGLU hidden size is rounded up to a multiple of this
    ffn_dim_multiplier: Optional[float] = None
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    use_scaled_rope: bool = False  # Llama 3.1 long-context frequency scaling
    rope_scale_factor: float = 8.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_seq_len: int = 8192
    max_seq_len: int = 2048
    tie_word_embeddings: bool = False  # Llama 3.2 1B/3B share tok_embeddings and output

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        assert self.dim % self.n_heads == 0, "dim must be divisible by n_heads"
        assert self.n_heads % self.n_kv_heads == 0, "n_kv_heads must divide n_heads"

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_hidden_dim(self) -> int:
        """Meta's rule: 2/3 of 4*dim, times the optional multiplier, rounded up to multiple_of."""
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    @classmethod
    def from_dict(cls, params: dict, **overrides) -> "ModelArgs":
        """From Meta's params.json (unknown keys such as `vision_*` are ignored) or a saved config."""
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in {**params, **overrides}.items() if k in known}
        return cls(**values)


# Named shapes. `tiny` is for tests; the rest are Meta's published configurations.
PRESETS: dict[str, dict] = {
    "tiny": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, multiple_of=32, max_seq_len=128),
    "llama3.2-1b": dict(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_dim_multiplier=1.5, multiple_of=256,
                        rope_theta=500000.0, use_scaled_rope=True, rope_scale_factor=32.0, tie_word_embeddings=True),
    "llama3.2-3b": dict(dim=3072, n_layers=28, n_heads=24, n_kv_heads=8, ffn_dim_multiplier=1.0, multiple_of=256,
                        rope_theta=500000.0, use_scaled_rope=True, rope_scale_factor=32.0, tie_word_embeddings=True),
    "llama3.1-8b": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim_multiplier=1.3, multiple_of=1024,
                        rope_theta=500000.0, use_scaled_rope=True),
    "llama3-8b": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim_multiplier=1.3, multiple_of=1024,
                      rope_theta=500000.0),
}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 as Meta does: bf16 squares lose too much precision.
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


def rope_frequencies(args: ModelArgs, device: torch.device | None = None) -> torch.Tensor:
    """Inverse frequencies (head_dim/2,), with Llama 3.1 scaling when enabled."""
    hd = args.head_dim
    freqs = 1.0 / (args.rope_theta ** (torch.arange(0, hd, 2, device=device)[: hd // 2].float() / hd))
    if not args.use_scaled_rope:
        return freqs
    # Long wavelengths are stretched by scale_factor, short ones kept, the band between blended.
    low_freq_wavelen = args.rope_original_max_seq_len / args.rope_low_freq_factor
    high_freq_wavelen = args.rope_original_max_seq_len / args.rope_high_freq_factor
    wavelen = 2 * math.pi / freqs
    scaled = torch.where(wavelen > low_freq_wavelen, freqs / args.rope_scale_factor, freqs)
    smooth = (args.rope_original_max_seq_len / wavelen - args.rope_low_freq_factor) / (
        args.rope_high_freq_factor - args.rope_low_freq_factor
    )
    blended = (1 - smooth) * scaled / args.rope_scale_factor + smooth * scaled
    in_band = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(in_band, blended, scaled)


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """positions (T,) or (B, T) -> cos, sin of shape (..., T, 1, head_dim/2), float32."""
    angles = positions.float()[..., None] * inv_freq  # (..., T, hd/2)
    return angles.cos().unsqueeze(-2), angles.sin().unsqueeze(-2)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive pairs (x[2i], x[2i+1]) as Meta's complex multiply does. x: (B, T, H, hd)."""
    xf = x.float().unflatten(-1, (-1, 2))  # (B, T, H, hd/2, 2)
    x0, x1 = xf[..., 0], xf[..., 1]
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.flatten(-2).type_as(x)


class KVCache(nn.Module):
    """Keys and values of past positions for incremental decoding. Shapes (B, n_kv_heads, S, hd)."""

    def __init__(self, batch_size: int, max_seq_len: int, n_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        super().__init__()
        shape = (batch_size, n_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, start_pos: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        bsz, _, seqlen, _ = k.shape
        end = start_pos + seqlen
        if end > self.k.shape[2]:
            raise ValueError(f"KV cache holds {self.k.shape[2]} positions, asked to write up to {end}")
        self.k[:bsz, :, start_pos:end] = k.to(self.k.dtype)
        self.v[:bsz, :, start_pos:end] = v.to(self.v.dtype)
        return self.k[:bsz, :, :end], self.v[:bsz, :, :end]


def sdpa_needs_repeated_kv(device_type: str, dtype: torch.dtype, has_mask: bool, q_len: int, n_heads: int,
                           n_kv_heads: int) -> bool:
    """Whether to repeat k/v to n_heads before SDPA rather than pass enable_gqa.

    On CUDA only the flash kernel takes enable_gqa, and flash wants half precision and no explicit mask;
    in float32 or with a mask (packed documents, chunked prefill) GQA falls back to the math kernel, which
    materialises the float32 (B, H, T, S) scores: about 1 GB per layer at the 1b preset. With repeated
    k/v the memory-efficient kernel is reachable. One query (decoding) has tiny scores, and repeating
    would copy the whole cache each step. CPU kernels handle GQA themselves.
    """
    return device_type == "cuda" and n_kv_heads != n_heads and q_len > 1 and (dtype == torch.float32 or has_mask)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads = args.n_heads
        self.n_kv_heads = args.n_kv_heads
        self.head_dim = args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * self.head_dim, args.dim, bias=False)
        self.cache: Optional[KVCache] = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start_pos: int,
                attn_mask: Optional[torch.Tensor]) -> torch.Tensor:
        bsz, seqlen, _ = x.shape
        q = self.wq(x).view(bsz, seqlen, self.n_heads, self.head_dim)
        k = self.wk(x).view(bsz, seqlen, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(bsz, seqlen, self.n_kv_heads, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, T, hd)
        if self.cache is not None:
            k, v = self.cache.update(start_pos, k, v)  # (B, H_kv, start_pos + T, hd)
            k, v = k.to(q.dtype), v.to(q.dtype)
        # A branch, not bool(...): under torch.compile(dynamic=True) seqlen is symbolic, a branch makes
        # the compiler specialise on it, and SDPA takes only a plain bool (else dynamo breaks the graph here).
        is_causal = True if attn_mask is None and seqlen > 1 else False
        n_rep = self.n_heads // self.n_kv_heads
        repeat_kv = sdpa_needs_repeated_kv(q.device.type, q.dtype, attn_mask is not None, seqlen, self.n_heads,
                                           self.n_kv_heads)
        if repeat_kv:  # query head i reads kv head i // n_rep, as enable_gqa does
            k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)  # (B, H, S, hd)
        # attn_mask stays boolean and broadcast over heads, (T, S) or (B, 1, T, S): no per-head float mask is built.
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                             enable_gqa=n_rep > 1 and not repeat_kv)
        return self.wo(out.transpose(1, 2).reshape(bsz, seqlen, -1))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args.dim, args.ffn_hidden_dim)
        self.attention_norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, eps=args.norm_eps)

    def forward(self, x, cos, sin, start_pos, attn_mask):
        h = x + self.attention(self.attention_norm(x), cos, sin, start_pos, attn_mask)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_word_embeddings:
            self.output.weight = self.tok_embeddings.weight
        # Recompute each block's activations in backward instead of storing them: less memory,
        # about a third more compute. A training choice, not part of the shape, so not in ModelArgs.
        self.activation_checkpointing = False
        self.init_weights()

    @torch.no_grad()
    def init_weights(self, std: float = 0.02):
        """GPT-2 style: N(0, 0.02), residual projections shrunk by sqrt(2 * n_layers) so the
        residual stream's variance does not grow with depth. Norm weights start at one."""
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif name.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
                nn.init.normal_(p, mean=0.0, std=std / math.sqrt(2 * self.args.n_layers))
            else:
                nn.init.normal_(p, mean=0.0, std=std)

    # ---- KV cache -------------------------------------------------------------------------
    def setup_cache(self, batch_size: int, max_seq_len: int, dtype: Optional[torch.dtype] = None):
        """Allocate per-layer caches on the model's device; forward then needs `start_pos`."""
        ref = self.tok_embeddings.weight
        for layer in self.layers:
            layer.attention.cache = KVCache(batch_size, max_seq_len, self.args.n_kv_heads, self.args.head_dim,
                                            dtype or ref.dtype, ref.device)

    def clear_cache(self):
        for layer in self.layers:
            layer.attention.cache = None

    # ---- forward ------------------------------------------------------------------------------
    def forward(
        self,
        tokens: torch.Tensor,
        targets: Optional[torch.Tensor] = None,
        *,
        start_pos: int = 0,
        attn_mask: Optional[torch.Tensor] = None,
        positions: Optional[torch.Tensor] = None,
        loss_reduction: str = "mean",
        return_logits: bool = True,
        logits_to_keep: int = 0,
        head: Optional[Callable[[torch.Tensor, torch.Tensor], Any]] = None,
    ) -> Any:
        """tokens (B, T) -> (logits (B, T, vocab), loss or None), or what `head` returns.

        targets: (B, T) next-token ids, IGNORE_INDEX where no loss is wanted. `loss_reduction`
            "sum" lets the trainer divide by the number of valid tokens over all micro-batches.
        attn_mask: optional boolean mask broadcastable to (B, H, T, start_pos + T), True where
            attention is allowed; combined with the causal mask (packed sequences use it).
        positions: optional (B, T) or (T,) rotary positions (restart at 0 per packed document).
        start_pos: with a KV cache, the position of tokens[:, 0].
        return_logits: False (training) computes the loss chunk by chunk without ever holding the
            float32 (B, T, vocab) logits, and returns None for them.
        logits_to_keep: without targets, compute logits for the last this many positions only (0: all);
            a prefill needs one row, not prompt_len x vocab.
        head: replaces the output layer: returns head(h (B, T, dim), self.output.weight), e.g. a loss from
            losses.py. The loss then runs inside forward, so a wrapped model (DDP, FSDP, torch.compile)
            is called once per micro-batch as usual, with FSDP's output weight gathered. Takes no targets.
        """
        if head is not None and targets is not None:
            raise ValueError("Transformer.forward: pass targets to the head, not as targets= as well")
        h = self.hidden_states(tokens, start_pos=start_pos, attn_mask=attn_mask, positions=positions)
        if head is not None:
            return head(h, self.output.weight)
        if targets is None:
            return self.output(h[:, -logits_to_keep:] if logits_to_keep else h), None
        if not return_logits:
            return None, chunked_cross_entropy(h.flatten(0, 1), self.output.weight, targets.flatten(), loss_reduction)
        logits = self.output(h)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX,
                               reduction=loss_reduction)
        return logits, loss

    def hidden_states(self, tokens: torch.Tensor, *, start_pos: int = 0, attn_mask: Optional[torch.Tensor] = None,
                      positions: Optional[torch.Tensor] = None) -> torch.Tensor:
        """tokens (B, T) -> final normed hidden states (B, T, dim), the output layer's input. For callers
        that need only some positions' logits (decoding) or never the full logits (chunked losses)."""
        seqlen = tokens.shape[1]
        h = self.tok_embeddings(tokens)
        if positions is None:
            positions = torch.arange(start_pos, start_pos + seqlen, device=tokens.device)
        cos, sin = rope_cos_sin(rope_frequencies(self.args, tokens.device), positions)
        mask = self._attention_mask(seqlen, start_pos, attn_mask, tokens.device)
        for layer in self.layers:
            if self.activation_checkpointing and self.training and torch.is_grad_enabled():
                h = checkpoint(layer, h, cos, sin, start_pos, mask, use_reentrant=False)
            else:
                h = layer(h, cos, sin, start_pos, mask)
        return self.norm(h)

    @staticmethod
    def _attention_mask(seqlen: int, start_pos: int, attn_mask: Optional[torch.Tensor],
                        device: torch.device) -> Optional[torch.Tensor]:
        """None means plain causal (SDPA's is_causal); otherwise a boolean (.., T, start_pos + T) mask."""
        if attn_mask is None and (start_pos == 0 or seqlen == 1):
            return None
        # Query i sits at absolute position start_pos + i and may see keys 0 .. start_pos + i.
        q_pos = torch.arange(start_pos, start_pos + seqlen, device=device)[:, None]
        causal = torch.arange(start_pos + seqlen, device=device)[None, :] <= q_pos
        return causal if attn_mask is None else causal & attn_mask

    # ---- accounting -------------------------------------------------------------------------------
    def num_params(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())  # parameters() yields a tied weight once
        if exclude_embeddings and not self.args.tie_word_embeddings:
            n -= self.tok_embeddings.weight.numel()
        return n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6*N for the matmuls (N without the embedding lookup,
        with the output layer) plus 12*n_layers*dim*seq_len for attention scores and values
        (PaLM, appendix B)."""
        a = self.args
        n = sum(p.numel() for p in self.parameters()) - self.tok_embeddings.weight.numel()
        n += a.dim * a.vocab_size if a.tie_word_embeddings else 0
        return 6 * n + 12 * a.n_layers * a.dim * seq_len


def document_attention_mask(document_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) document ids of packed sequences -> (B, 1, T, T) mask: tokens see only their own document."""
    return (document_ids[:, :, None] == document_ids[:, None, :]).unsqueeze(1)
