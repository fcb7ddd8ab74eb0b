"""Losses on the output layer, computed chunk by chunk so the float32 (rows, vocab) logits never exist.

With a 128k vocabulary the logits dwarf a small model's activations (8 x 2048 rows are 8 GiB of
float32). Every loss here multiplies one chunk of hidden states by the output weight, reduces that
chunk's logits to what the loss needs and moves on; gradients are computed chunk by chunk too.

Shared conventions: h (N, dim) final hidden states, weight (vocab, dim) the output layer, targets (N,)
with IGNORE_INDEX where a row adds nothing (prompt tokens, padding). Under autocast the matmuls run in
the autocast dtype, everything after the logits in float32, and the weight's gradient is summed over
chunks in float32. A gradient nobody needs (a frozen output layer under LoRA, h without grad, no_grad
evaluation) is not computed. This module knows nothing of the model: it takes tensors.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # targets with this value add nothing to any loss (prompt tokens, padding)

REDUCTIONS = ("mean", "sum", "none")
DISTILLATION_KINDS = ("forward_kl", "reverse_kl", "jsd")
DPO_LOSS_TYPES = ("sigmoid", "ipo")


# ---- shared pieces -----------------------------------------------------------------------------


def _matmul_dtype(h: torch.Tensor) -> torch.dtype:
    device_type = h.device.type
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else h.dtype


def _rows_per_chunk(chunk_rows: Optional[int], vocab: int, buffers: int) -> int:
    """Rows per chunk: about 256 MiB of float32 in all for a loss that keeps `buffers` (n, vocab) arrays."""
    return chunk_rows or max(16, (1 << 26) // (vocab * buffers))


class WeightGrad:
    """The output weight's gradient, summed over chunks in float32.

    Summing chunk products in bf16 rounds the running total once per chunk, so its error grows with the number
    of chunks; adding each chunk's bf16 product into a float32 total costs a (vocab, dim) conversion per chunk
    (a few percent of a small model's step on CPU). So chunk products are summed in place in the matmul dtype
    (addmm_, no temporary) over at most FLUSH_EVERY chunks, and that partial sum goes into the float32 total:
    the error is that of a few chunks, whatever their number. In float32 the total is summed directly."""

    FLUSH_EVERY = 4

    def __init__(self, weight: torch.Tensor, mm_dtype: torch.dtype):
        self.total = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        self.partial = None if mm_dtype == torch.float32 else torch.zeros(weight.shape, dtype=mm_dtype,
                                                                          device=weight.device)
        self.pending = 0

    def add(self, g: torch.Tensor, h: torch.Tensor) -> None:
        """+= g.T @ h for one chunk: g (n, vocab), h (n, dim), both in the matmul dtype."""
        if self.partial is None:  # (vocab, dim) in place; out= rather than addmm_, which FLOP counters miss
            torch.addmm(self.total, g.T, h, out=self.total)
            return
        torch.addmm(self.partial, g.T, h, out=self.partial)
        self.pending += 1
        if self.pending == self.FLUSH_EVERY:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            self.total += self.partial
            self.partial.zero_()
            self.pending = 0

    def result(self, dtype: torch.dtype) -> torch.Tensor:
        self.flush()
        return self.total.to(dtype)


def _grad_buffers(h: torch.Tensor, weight: torch.Tensor, need_h: bool, need_w: bool, mm_dtype: torch.dtype):
    """The gradient of h (every row is written) and the weight's accumulator, or None where not needed."""
    grad_h = torch.empty_like(h) if need_h else None
    grad_w = WeightGrad(weight, mm_dtype) if need_w else None
    return grad_h, grad_w


def _backprop_chunk(g: torch.Tensor, rows: slice, h_mm: torch.Tensor, w_mm: torch.Tensor,
                    grad_h: Optional[torch.Tensor], grad_w: Optional[WeightGrad]) -> None:
    """g (n, vocab) = d loss / d logits of these rows, float32 -> into grad_h[rows] and grad_w (in place)."""
    g = g.to(w_mm.dtype)
    if grad_h is not None:
        grad_h[rows] = g @ w_mm  # (n, dim)
    if grad_w is not None:
        grad_w.add(g, h_mm[rows])


def _target_columns(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """targets (n,) -> (valid (n, 1) bool, column (n, 1) safe to gather with: 0 on ignored rows)."""
    return (t != IGNORE_INDEX)[:, None], t.clamp(min=0)[:, None]


def _finish_grads(weight: torch.Tensor, grad_h, grad_w: Optional[WeightGrad]):
    return grad_h, (grad_w.result(weight.dtype) if grad_w is not None else None)


# ---- cross-entropy -----------------------------------------------------------------------------


class _LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of `h @ weight.T`, whose gradients are computed during the forward pass,
    chunk by chunk, so the (rows, vocab) logits never exist all at once nor are stored.

    For one row: loss = logsumexp(z) - z[target] and dloss/dz = softmax(z) - onehot(target); the
    chunk's logits buffer is turned into that gradient in place and multiplied straight into dh and dW.
    """

    @staticmethod
    def forward(ctx, h, weight, targets, chunk_rows: int, mm_dtype: torch.dtype, need_h: bool, need_w: bool):
        h_mm, w_mm = h.to(mm_dtype), weight.to(mm_dtype)
        grad_h, grad_w = _grad_buffers(h, weight, need_h, need_w, mm_dtype)
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for start in range(0, h.shape[0], chunk_rows):
            rows = slice(start, start + chunk_rows)
            z = (h_mm[rows] @ w_mm.T).float()  # (n, vocab)
            valid, col = _target_columns(targets[rows])
            z_target = z.gather(1, col)
            # In place, one buffer: z -> exp(z - max); sum; log-sum-exp = max + log(sum).
            z_max = z.amax(dim=-1, keepdim=True)
            z.sub_(z_max).exp_()
            z_sum = z.sum(dim=-1, keepdim=True)
            total += ((z_max + z_sum.log() - z_target) * valid).sum()
            if need_h or need_w:
                # (exp - onehot * sum) / sum = softmax - onehot; zero on ignored rows.
                z.scatter_add_(1, col, -z_sum)
                _backprop_chunk(z.mul_(valid / z_sum), rows, h_mm, w_mm, grad_h, grad_w)
        ctx.save_for_backward(*_finish_grads(weight, grad_h, grad_w))
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_h, grad_w = ctx.saved_tensors
        grad_h = grad_h * grad_total if grad_h is not None else None
        grad_w = grad_w * grad_total if grad_w is not None else None
        return grad_h, grad_w, None, None, None, None, None


def _needs_grads(h: torch.Tensor, weight: torch.Tensor) -> tuple[bool, bool]:
    # Decided outside the Function: its forward runs with grad mode off, and needs_input_grad follows
    # requires_grad even under no_grad (validation), which would pay two more output-layer matmuls.
    grad_on = torch.is_grad_enabled()
    return grad_on and h.requires_grad, grad_on and weight.requires_grad


def chunked_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, reduction: str = "mean",
                          chunk_rows: Optional[int] = None) -> torch.Tensor:
    """Cross-entropy of `h @ weight.T` against targets without the float32 (N, vocab) logits.

    reduction: "sum" over valid rows (the trainer divides by its global count of valid tokens), "mean"
    over valid rows, "none": per-row losses (N,), 0 on ignored rows, differentiable with any upstream
    gradient (through `chunked_token_logprobs`, which recomputes the logits in backward).
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"chunked_cross_entropy: reduction={reduction!r}, expected one of {REDUCTIONS}")
    if reduction == "none":
        return -chunked_token_logprobs(h, weight, targets, chunk_rows)
    rows = _rows_per_chunk(chunk_rows, weight.shape[0], buffers=1)
    total = _LinearCrossEntropy.apply(h, weight, targets, rows, _matmul_dtype(h), *_needs_grads(h, weight))
    if reduction == "sum":
        return total
    return total / (targets != IGNORE_INDEX).sum().clamp(min=1)


# ---- log-probabilities of given tokens ---------------------------------------------------------


class _LinearTokenLogprobs(torch.autograd.Function):
    """log p(target) per row. Forward keeps only the (N,) log-sum-exp; backward recomputes each chunk's
    logits, so any upstream gradient works (DPO weighs sequences differently) at one more matmul.

    d logp / dz = onehot(target) - softmax(z), times the row's upstream gradient.
    """

    @staticmethod
    def forward(ctx, h, weight, targets, chunk_rows: int, mm_dtype: torch.dtype):
        h_mm, w_mm = h.to(mm_dtype), weight.to(mm_dtype)
        logprobs = torch.zeros(h.shape[0], dtype=torch.float32, device=h.device)
        lse = torch.zeros_like(logprobs)
        for start in range(0, h.shape[0], chunk_rows):
            rows = slice(start, start + chunk_rows)
            z = (h_mm[rows] @ w_mm.T).float()  # (n, vocab)
            valid, col = _target_columns(targets[rows])
            lse[rows] = torch.logsumexp(z, dim=-1)
            logprobs[rows] = (z.gather(1, col).squeeze(1) - lse[rows]) * valid.squeeze(1)
        ctx.save_for_backward(h, weight, targets, lse)
        ctx.chunk_rows, ctx.mm_dtype = chunk_rows, mm_dtype
        return logprobs

    @staticmethod
    def backward(ctx, grad_out):
        h, weight, targets, lse = ctx.saved_tensors
        h_mm, w_mm = h.to(ctx.mm_dtype), weight.to(ctx.mm_dtype)
        grad_h, grad_w = _grad_buffers(h, weight, *ctx.needs_input_grad[:2], ctx.mm_dtype)
        for start in range(0, h.shape[0], ctx.chunk_rows):
            rows = slice(start, start + ctx.chunk_rows)
            z = (h_mm[rows] @ w_mm.T).float()  # (n, vocab), recomputed
            valid, col = _target_columns(targets[rows])
            up = grad_out[rows, None].float() * valid  # (n, 1), zero on ignored rows
            z.sub_(lse[rows, None]).exp_().mul_(-up)  # -up * softmax
            z.scatter_add_(1, col, up)  # + up * onehot
            _backprop_chunk(z, rows, h_mm, w_mm, grad_h, grad_w)
        return *_finish_grads(weight, grad_h, grad_w), None, None, None


def chunked_token_logprobs(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                           chunk_rows: Optional[int] = None) -> torch.Tensor:
    """(N,) float32 log p(targets[i]) under softmax(h[i] @ weight.T), 0 where targets == IGNORE_INDEX.

    Differentiable w.r.t. h and weight; neither forward nor backward holds the (N, vocab) logits.
    Summed per sequence this is what DPO compares.
    """
    rows = _rows_per_chunk(chunk_rows, weight.shape[0], buffers=1)
    return _LinearTokenLogprobs.apply(h, weight, targets, rows, _matmul_dtype(h))


# ---- distillation ------------------------------------------------------------------------------


def _divergence_and_grad(s: torch.Tensor, t: torch.Tensor, kind: str, beta: float):
    """Per-row divergence between student and teacher distributions, and its gradient w.r.t. the
    student's logits divided by the temperature. s, t: (n, vocab) float32 log-probabilities.

    forward_kl KL(t || s) = sum p_t (t - s), gradient p_s - p_t.
    reverse_kl KL(s || t) = sum p_s (s - t), gradient p_s (s - t - KL).
    jsd (TRL's generalised JSD): m = log((1 - beta) p_s + beta p_t),
        beta KL(t || m) + (1 - beta) KL(s || m); d/dp_s = (1 - beta)(s - m), and through the softmax
        gradient p_s (g - sum p_s g) with g = (1 - beta)(s - m).
    """
    p_s = s.exp()
    if kind == "forward_kl":
        p_t = t.exp()
        div = (p_t * (t - s)).sum(-1)
        return div, p_s.sub_(p_t)
    if kind == "reverse_kl":
        g = s - t
        div = (p_s * g).sum(-1)
        return div, g.sub_(div[:, None]).mul_(p_s)
    m = torch.logaddexp(s + math.log1p(-beta), t + math.log(beta))
    div = beta * (t.exp() * (t - m)).sum(-1) + (1 - beta) * (p_s * (s - m)).sum(-1)
    g = m.sub_(s).mul_(beta - 1)  # (1 - beta)(s - m), in m's buffer
    return div, g.sub_((p_s * g).sum(-1, keepdim=True)).mul_(p_s)


class _LinearDistillation(torch.autograd.Function):
    """(1 - alpha) CE + alpha T^2 divergence, summed over valid rows, gradients in the forward pass
    (the loss is a scalar sum, so backward only scales them). Returns (total, ce_sum, kd_sum)."""

    @staticmethod
    def forward(ctx, h, weight, teacher_h, teacher_weight, targets, temperature: float, alpha: float, kind: str,
                beta: float, chunk_rows: int, mm_dtype: torch.dtype, teacher_mm_dtype: torch.dtype, need_h: bool,
                need_w: bool):
        h_mm, w_mm = h.to(mm_dtype), weight.to(mm_dtype)
        th_mm, tw_mm = teacher_h.to(teacher_mm_dtype), teacher_weight.to(teacher_mm_dtype)
        grad_h, grad_w = _grad_buffers(h, weight, need_h, need_w, mm_dtype)
        ce_sum = torch.zeros((), dtype=torch.float32, device=h.device)
        kd_sum = torch.zeros_like(ce_sum)
        for start in range(0, h.shape[0], chunk_rows):
            rows = slice(start, start + chunk_rows)
            valid, col = _target_columns(targets[rows])
            z = (h_mm[rows] @ w_mm.T).float()  # (n, vocab) student logits
            s = torch.log_softmax(z / temperature, dim=-1)
            t = torch.log_softmax((th_mm[rows] @ tw_mm.T).float() / temperature, dim=-1)  # teacher
            div, g_kd = _divergence_and_grad(s, t, kind, beta)
            del s, t
            lse = torch.logsumexp(z, dim=-1, keepdim=True)
            ce_sum += ((lse - z.gather(1, col)) * valid).sum()
            kd_sum += (div[:, None] * valid).sum()
            if need_h or need_w:
                # d total / dz = (1 - alpha)(softmax(z) - onehot) + alpha T^2 (d kd / d(z/T)) / T
                g = z.sub_(lse).exp_().scatter_add_(1, col, -torch.ones_like(lse))
                g.mul_(1 - alpha).add_(g_kd, alpha=alpha * temperature).mul_(valid)
                _backprop_chunk(g, rows, h_mm, w_mm, grad_h, grad_w)
        ctx.save_for_backward(*_finish_grads(weight, grad_h, grad_w))
        ctx.mark_non_differentiable(ce_sum, kd_sum)
        total = (1 - alpha) * ce_sum + alpha * temperature**2 * kd_sum
        return total, ce_sum, kd_sum

    @staticmethod
    def backward(ctx, grad_total, _grad_ce, _grad_kd):
        grad_h, grad_w = ctx.saved_tensors
        grad_h = grad_h * grad_total if grad_h is not None else None
        grad_w = grad_w * grad_total if grad_w is not None else None
        return (grad_h, grad_w) + (None,) * 12


def chunked_distillation_loss(h: torch.Tensor, weight: torch.Tensor, teacher_h: torch.Tensor,
                              teacher_weight: torch.Tensor, targets: torch.Tensor, *, temperature: float,
                              alpha: float, kind: str, jsd_beta: float = 0.5,
                              chunk_rows: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Knowledge distillation on the output layer: (total, ce_sum, kd_sum), summed over rows whose
    target is not IGNORE_INDEX.

    ce_sum: cross-entropy of the student's logits at temperature 1.
    kd_sum: divergence between teacher and student softmax(logits / T), summed over the vocabulary:
        "forward_kl" KL(teacher || student), "reverse_kl" KL(student || teacher), "jsd" TRL's generalised
        JSD, beta KL(teacher || M) + (1 - beta) KL(student || M) with M = beta teacher + (1 - beta) student
        (TRL's GKDTrainer.generalized_jsd_loss with reduction="sum"; jsd_beta 0 and 1 are forward and
        reverse KL, as TRL special-cases them).
    total = (1 - alpha) ce_sum + alpha T^2 kd_sum: T^2 keeps the divergence's gradient on the scale of
        the CE's as T grows (Hinton et al., 2015).
    Gradients reach h and weight only (the teacher is fixed); ce_sum and kd_sum are detached, for logging.
    teacher_h (N, teacher_dim), teacher_weight (vocab, teacher_dim): the teacher's vocab must equal the
    student's (slice a padded teacher's weight before calling).
    """
    if teacher_weight.shape[0] != weight.shape[0]:
        raise ValueError(f"chunked_distillation_loss: teacher vocab {teacher_weight.shape[0]} != student vocab "
                         f"{weight.shape[0]}; slice the teacher's output weight to the student's vocab")
    if teacher_h.shape[0] != h.shape[0] or targets.shape != (h.shape[0],):
        raise ValueError(f"chunked_distillation_loss: rows differ: student h {tuple(h.shape)}, teacher h "
                         f"{tuple(teacher_h.shape)}, targets {tuple(targets.shape)}; expected (N, d), (N, d'), (N,)")
    if kind not in DISTILLATION_KINDS:
        raise ValueError(f"chunked_distillation_loss: kind={kind!r}, expected one of {DISTILLATION_KINDS}")
    if not temperature > 0 or not 0 <= alpha <= 1 or not 0 <= jsd_beta <= 1:
        raise ValueError(f"chunked_distillation_loss: temperature={temperature}, alpha={alpha}, jsd_beta={jsd_beta}; "
                         "expected temperature > 0, alpha and jsd_beta in [0, 1]")
    if kind == "jsd" and jsd_beta in (0, 1):  # TRL's special cases; its mixture formula would give 0 there
        kind = "forward_kl" if jsd_beta == 0 else "reverse_kl"
    rows = _rows_per_chunk(chunk_rows, weight.shape[0], buffers=8)
    # Outside autocast the teacher multiplies in its own dtype: a float32 copy of a bf16 teacher's
    # output weight would cost 2 GiB at 8B.
    teacher_mm_dtype = _matmul_dtype(h) if torch.is_autocast_enabled(h.device.type) else teacher_weight.dtype
    return _LinearDistillation.apply(h, weight, teacher_h.detach(), teacher_weight.detach(), targets,
                                     float(temperature), float(alpha), kind, float(jsd_beta), rows,
                                     _matmul_dtype(h), teacher_mm_dtype, *_needs_grads(h, weight))


# ---- DPO ---------------------------------------------------------------------------------------


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, reference_chosen: torch.Tensor,
             reference_rejected: torch.Tensor, *, beta: float, loss_type: str = "sigmoid",
             label_smoothing: float = 0.0, chosen_lengths: Optional[torch.Tensor] = None,
             rejected_lengths: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair DPO losses (P,) and the implicit rewards (P,) of the chosen and rejected responses.

    Inputs are (P,) log-probabilities of each response summed over its tokens, under the policy and
    the frozen reference. With logratio = policy - reference (per response), as TRL 1.16 computes them:
      rewards = beta * logratio (detached: they are for logging; accuracy = chosen > rejected).
      "sigmoid" (DPO): -log sigmoid(beta * (chosen_logratio - rejected_logratio)). label_smoothing e > 0
          gives conservative DPO, which assumes each label is flipped with probability e:
          -(1 - e) log sigmoid(beta d) - e log sigmoid(-beta d). (TRL 1.16's "sigmoid" ignores
          label_smoothing; it applies this formula in its "aot" loss, which equals it on one pair.)
      "ipo": (chosen_logratio / chosen_lengths - rejected_logratio / rejected_lengths - 1 / (2 beta))^2,
          log-ratios averaged over each response's tokens (lengths = response tokens, (P,)), as TRL does.
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"dpo_loss: loss_type={loss_type!r}, expected one of {DPO_LOSS_TYPES}")
    if not beta > 0 or not 0 <= label_smoothing < 0.5:
        raise ValueError(f"dpo_loss: beta={beta}, label_smoothing={label_smoothing}; expected beta > 0 and "
                         "label_smoothing in [0, 0.5)")
    chosen_logratios = policy_chosen - reference_chosen  # (P,)
    rejected_logratios = policy_rejected - reference_rejected
    if loss_type == "sigmoid":
        margin = beta * (chosen_logratios - rejected_logratios)
        losses = -(1 - label_smoothing) * F.logsigmoid(margin) - label_smoothing * F.logsigmoid(-margin)
    else:
        if chosen_lengths is None or rejected_lengths is None or label_smoothing:
            raise ValueError("dpo_loss: loss_type='ipo' needs chosen_lengths and rejected_lengths (response tokens "
                             "per pair) and takes no label_smoothing")
        delta = chosen_logratios / chosen_lengths.clamp(min=1) - rejected_logratios / rejected_lengths.clamp(min=1)
        losses = (delta - 1 / (2 * beta)) ** 2
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()
