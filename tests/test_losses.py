"""Chunked output-layer losses (losses.py) against independent references: plain torch on the full
logits (float64 where precision matters), hand computations, TRL's GKDTrainer.generalized_jsd_loss and
DPOTrainer's own loss code, and the memory a 128k vocabulary would need without chunking.
"""

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from losses import (IGNORE_INDEX, chunked_cross_entropy, chunked_distillation_loss, chunked_token_logprobs,
                    dpo_loss)
from trl_reference import trl_dpo_loss

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parents[1]


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def problem(n=24, dim=8, vocab=40, dtype=torch.float32, seed=0, masked=(0, 5, 6, 17)):
    """h (n, dim), weight (vocab, dim) with O(1) logits, targets with some rows IGNORE_INDEX."""
    g = gen(seed)
    h = torch.randn(n, dim, generator=g, dtype=dtype)
    weight = torch.randn(vocab, dim, generator=g, dtype=dtype) * dim**-0.5 * 2
    targets = torch.randint(0, vocab, (n,), generator=g)
    targets[list(masked)] = IGNORE_INDEX
    return h, weight, targets


def leaves(*tensors):
    return [t.clone().requires_grad_() for t in tensors]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def naive_logprobs(h, weight, targets):
    """log p(target) from the full logits, 0 on ignored rows."""
    logp = (h @ weight.T).log_softmax(-1)
    valid = targets != IGNORE_INDEX
    return logp.gather(1, targets.clamp(min=0)[:, None]).squeeze(1) * valid


# ---- cross-entropy -----------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_matches_torch_for_each_reduction_with_gradients(reduction):
    h, weight, targets = problem()
    upstream = torch.randn(24, generator=gen(9)) if reduction == "none" else torch.tensor(1.7)
    ref_h, ref_w = leaves(h, weight)
    ref = F.cross_entropy(ref_h @ ref_w.T, targets, ignore_index=IGNORE_INDEX, reduction=reduction)
    (ref * upstream).sum().backward()
    ours_h, ours_w = leaves(h, weight)
    ours = chunked_cross_entropy(ours_h, ours_w, targets, reduction, chunk_rows=5)
    (ours * upstream).sum().backward()
    assert ours.shape == ref.shape  # "none": one loss per row, (N,)
    assert (ours - ref).abs().max().item() <= 1e-5
    assert (ours_h.grad - ref_h.grad).abs().max().item() <= 1e-5
    assert (ours_w.grad - ref_w.grad).abs().max().item() <= 1e-5


def test_cross_entropy_rejects_unknown_reduction():
    h, weight, targets = problem()
    with pytest.raises(ValueError, match="reduction='avg'"):
        chunked_cross_entropy(h, weight, targets, "avg")


@pytest.mark.parametrize("loss", ["cross_entropy", "token_logprobs"])
def test_bf16_weight_gradient_error_does_not_grow_with_the_number_of_chunks(loss):
    # The weight gradient summed over chunks in bf16 gained error with every chunk (measured here before
    # the fix: 3.3e-3 for one chunk, 9.0e-3 for 64, 1.1e-2 for 256); summed in float32 it stays put.
    n, dim, vocab = 256, 16, 64
    h, weight, targets = problem(n, dim, vocab, dtype=torch.float64, seed=3, masked=())
    upstream = torch.randn(n, generator=gen(4), dtype=torch.float64)
    ref_w = weight.clone().requires_grad_()
    if loss == "cross_entropy":
        F.cross_entropy(h @ ref_w.T, targets, reduction="sum").backward()
    else:
        (naive_logprobs(h, ref_w, targets) * upstream).sum().backward()

    def error(chunk_rows: int) -> float:
        w = weight.float().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if loss == "cross_entropy":
                chunked_cross_entropy(h.float(), w, targets, "sum", chunk_rows=chunk_rows).backward()
            else:
                logps = chunked_token_logprobs(h.float(), w, targets, chunk_rows=chunk_rows)
                (logps * upstream.float()).sum().backward()
        return rel_err(w.grad, ref_w.grad)

    one, many, most = error(n), error(n // 64), error(1)  # 1, 64 and 256 chunks
    assert one <= 6e-3  # bf16 keeps ~3 significant digits
    assert many <= max(1.5 * one, 4e-3) and most <= max(1.5 * one, 4e-3), (one, many, most)


@pytest.mark.parametrize("loss", ["cross_entropy", "token_logprobs", "distillation"])
@pytest.mark.parametrize("trains", ["both", "h_only", "weight_only"])
def test_gradients_nobody_needs_cost_no_matmul(loss, trains):
    """A frozen output layer (LoRA) needs no weight gradient, a frozen h no h gradient: each is one
    (n x dim x vocab) matmul, 2 n dim vocab FLOPs, that must not run."""
    n, dim, vocab, teacher_dim = 64, 32, 1000, 48
    h, weight, targets = problem(n, dim, vocab, masked=())
    h.requires_grad_(trains != "weight_only")
    weight.requires_grad_(trains != "h_only")
    teacher_h, teacher_w = torch.randn(n, teacher_dim), torch.randn(vocab, teacher_dim)
    with FlopCounterMode(display=False) as flops:
        if loss == "cross_entropy":
            out = chunked_cross_entropy(h, weight, targets, "sum", chunk_rows=16)
        elif loss == "token_logprobs":
            out = chunked_token_logprobs(h, weight, targets, chunk_rows=16).sum()
        else:
            out = chunked_distillation_loss(h, weight, teacher_h, teacher_w, targets, temperature=2.0, alpha=0.5,
                                            kind="forward_kl", chunk_rows=16)[0]
        out.backward()
    mm = 2 * n * dim * vocab  # one output-layer matmul
    forward = {"cross_entropy": mm, "token_logprobs": mm, "distillation": mm + 2 * n * teacher_dim * vocab}[loss]
    recompute = mm if loss == "token_logprobs" else 0  # its backward recomputes the logits
    wanted = (trains != "weight_only") + (trains != "h_only")
    assert flops.get_total_flops() == forward + recompute + wanted * mm
    assert (h.grad is not None) == h.requires_grad and (weight.grad is not None) == weight.requires_grad


# ---- token log-probabilities -------------------------------------------------------------------


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-5), (torch.float32, 1e-5)])
def test_token_logprobs_and_gradients_match_full_log_softmax(dtype, tol):
    h, weight, targets = problem(dtype=dtype)
    upstream = torch.randn(24, generator=gen(5), dtype=dtype)  # per-pair weights, signs, anything
    ref_h, ref_w = leaves(h, weight)
    ref = naive_logprobs(ref_h, ref_w, targets)
    (ref * upstream).sum().backward()
    ours_h, ours_w = leaves(h, weight)
    ours = chunked_token_logprobs(ours_h, ours_w, targets, chunk_rows=7)
    (ours * upstream).sum().backward()
    assert ours.dtype == torch.float32 and ours.shape == (24,)
    assert (ours - ref).abs().max().item() <= tol
    assert (ours_h.grad - ref_h.grad).abs().max().item() <= tol
    assert (ours_w.grad - ref_w.grad).abs().max().item() <= tol


def test_ignored_positions_give_zero_logprob_and_zero_gradient():
    h, weight, targets = problem()
    ignored = targets == IGNORE_INDEX
    upstream = torch.randn(24, generator=gen(6))
    ours_h, ours_w = leaves(h, weight)
    out = chunked_token_logprobs(ours_h, ours_w, targets, chunk_rows=5)
    (out * upstream).sum().backward()
    assert ignored.sum() == 4
    assert (out[ignored] == 0).all() and (out[~ignored] < 0).all()
    assert (ours_h.grad[ignored] == 0).all() and (ours_h.grad[~ignored] != 0).any(dim=1).all()
    # the weight's gradient is that of the kept rows alone
    ref_w = weight.clone().requires_grad_()
    (naive_logprobs(h[~ignored], ref_w, targets[~ignored]) * upstream[~ignored]).sum().backward()
    assert (ours_w.grad - ref_w.grad).abs().max().item() <= 1e-5


# ---- distillation ------------------------------------------------------------------------------

KINDS = {"forward_kl": 0.0, "reverse_kl": 1.0, "jsd": 0.3}  # kind -> TRL's beta (0.3: which side is which)


def distill_problem(n=20, dim=8, teacher_dim=12, vocab=30, seed=0):
    h, weight, targets = problem(n, dim, vocab, seed=seed, masked=(1, 2, 11))
    g = gen(seed + 100)
    teacher_h = torch.randn(n, teacher_dim, generator=g)
    teacher_w = torch.randn(vocab, teacher_dim, generator=g) * teacher_dim**-0.5 * 2
    return h, weight, teacher_h, teacher_w, targets


def naive_divergence(s_logits, t_logits, kind, beta):
    """Per-row divergence from the textbook definitions on full log-probs (autograd-able)."""
    s, t = s_logits.log_softmax(-1), t_logits.log_softmax(-1)
    kl = lambda a, b: (a.exp() * (a - b)).sum(-1)  # KL(a || b) from log-probs
    if kind == "forward_kl":
        return kl(t, s)
    if kind == "reverse_kl":
        return kl(s, t)
    m = ((1 - beta) * s.exp() + beta * t.exp()).log()
    return beta * kl(t, m) + (1 - beta) * kl(s, m)


def naive_distillation(h, weight, teacher_h, teacher_w, targets, T, alpha, kind, beta):
    valid = targets != IGNORE_INDEX
    logits = h @ weight.T
    ce = F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")
    kd = (naive_divergence(logits / T, (teacher_h @ teacher_w.T) / T, kind, beta) * valid).sum()
    return (1 - alpha) * ce + alpha * T**2 * kd, ce, kd


@pytest.mark.parametrize("kind", KINDS)
def test_divergence_is_zero_when_student_equals_teacher(kind):
    h, weight, _, _, targets = distill_problem()
    total, ce, kd = chunked_distillation_loss(h, weight, h, weight, targets, temperature=2.0, alpha=1.0, kind=kind,
                                              chunk_rows=6)
    assert abs(kd.item()) <= 1e-5 and ce.item() > 1.0


@pytest.mark.parametrize("kind", KINDS)
def test_each_divergence_matches_a_hand_computation(kind):
    # Logits 2 log p at T = 2 give the student p_s and the teacher p_t exactly; weight = identity.
    p_s, p_t, T, alpha, beta = [0.5, 0.25, 0.25], [0.2, 0.3, 0.5], 2.0, 0.25, KINDS[kind]
    h = torch.tensor([[T * math.log(p) for p in p_s]] * 2, dtype=torch.float64)
    teacher_h = torch.tensor([[T * math.log(p) for p in p_t]] * 2, dtype=torch.float64)
    eye, targets = torch.eye(3, dtype=torch.float64), torch.tensor([2, IGNORE_INDEX])
    kl = lambda a, b: sum(x * math.log(x / y) for x, y in zip(a, b))
    m = [(1 - beta) * s + beta * t for s, t in zip(p_s, p_t)]
    expected_kd = {"forward_kl": kl(p_t, p_s), "reverse_kl": kl(p_s, p_t),
                   "jsd": beta * kl(p_t, m) + (1 - beta) * kl(p_s, m)}[kind]
    # CE at T = 1: softmax(2 log p) = p^2 / sum p^2
    expected_ce = math.log(sum(p * p for p in p_s)) - 2 * math.log(p_s[2])
    total, ce, kd = chunked_distillation_loss(h, eye, teacher_h, eye, targets, temperature=T, alpha=alpha,
                                              kind=kind, jsd_beta=beta)
    assert kd.item() == pytest.approx(expected_kd, rel=1e-5)
    assert ce.item() == pytest.approx(expected_ce, rel=1e-5)
    assert total.item() == pytest.approx((1 - alpha) * expected_ce + alpha * T**2 * expected_kd, rel=1e-5)


@pytest.mark.filterwarnings("ignore:You are importing from 'trl.experimental'")
@pytest.mark.parametrize("kind,beta", [*KINDS.items(), ("jsd", 0.5), ("jsd", 0.0), ("jsd", 1.0)])
def test_divergence_equals_trl_generalized_jsd_loss(kind, beta):
    from trl.experimental.gkd import GKDTrainer

    h, weight, teacher_h, teacher_w, targets = distill_problem(seed=1)
    T = 1.7
    _, _, kd = chunked_distillation_loss(h, weight, teacher_h, teacher_w, targets, temperature=T, alpha=0.5,
                                         kind=kind, jsd_beta=beta, chunk_rows=6)
    # TRL on the full (batch, seq, vocab) logits in float64, same labels mask, summed like ours.
    trl = GKDTrainer.generalized_jsd_loss((h @ weight.T).double().view(4, 5, -1),
                                          (teacher_h @ teacher_w.T).double().view(4, 5, -1),
                                          labels=targets.view(4, 5), beta=beta, temperature=T, reduction="sum")
    assert kd.item() == pytest.approx(trl.item(), rel=1e-5)
    assert kd.item() > 0.05


@pytest.mark.parametrize("kind", KINDS)
def test_distillation_value_and_gradients_match_autograd_on_the_naive_formula(kind):
    h, weight, teacher_h, teacher_w, targets = (t.double() if t.is_floating_point() else t for t in distill_problem())
    T, alpha = 2.5, 0.3
    ref_h, ref_w, ref_th = leaves(h, weight, teacher_h)
    ref = naive_distillation(ref_h, ref_w, ref_th, teacher_w, targets, T, alpha, kind, KINDS[kind])
    ref[0].backward()
    results = {}
    for chunk_rows in (None, 3):  # one chunk, and 7 chunks with a ragged last one
        ours_h, ours_w, ours_th = leaves(h, weight, teacher_h)
        total, ce, kd = chunked_distillation_loss(ours_h, ours_w, ours_th, teacher_w, targets, temperature=T,
                                                  alpha=alpha, kind=kind, jsd_beta=KINDS[kind], chunk_rows=chunk_rows)
        (total * 2.0).backward()  # the trainer scales the summed loss by 1 / count
        results[chunk_rows] = total, ours_h.grad, ours_w.grad
        for a, b in ((total, ref[0]), (ce, ref[1]), (kd, ref[2])):
            assert a.item() == pytest.approx(b.item(), rel=1e-5)
        assert rel_err(ours_h.grad, 2 * ref_h.grad) <= 1e-5 and rel_err(ours_w.grad, 2 * ref_w.grad) <= 1e-5
        assert ours_th.grad is None and not ce.requires_grad and not kd.requires_grad  # teacher fixed; logs detached
    (a_total, a_h, a_w), (b_total, b_h, b_w) = results[None], results[3]
    assert abs(a_total.item() - b_total.item()) <= 1e-5 * abs(a_total.item())
    assert (a_h - b_h).abs().max().item() <= 1e-5 and (a_w - b_w).abs().max().item() <= 1e-5


@pytest.mark.parametrize("kind", KINDS)
def test_masked_positions_add_nothing_to_distillation_value_or_gradient(kind):
    h, weight, teacher_h, teacher_w, targets = distill_problem()
    masked = targets == IGNORE_INDEX
    kwargs = dict(temperature=2.0, alpha=0.6, kind=kind, chunk_rows=4)
    ours_h, ours_w = leaves(h, weight)
    total = chunked_distillation_loss(ours_h, ours_w, teacher_h, teacher_w, targets, **kwargs)[0]
    total.backward()
    kept_h, kept_w = leaves(h[~masked], weight)
    kept = chunked_distillation_loss(kept_h, kept_w, teacher_h[~masked], teacher_w, targets[~masked], **kwargs)[0]
    kept.backward()
    assert total.item() == pytest.approx(kept.item(), rel=1e-6)
    assert (ours_h.grad[masked] == 0).all()
    assert (ours_h.grad[~masked] - kept_h.grad).abs().max().item() <= 1e-6
    assert (ours_w.grad - kept_w.grad).abs().max().item() <= 1e-6


def test_bf16_teacher_and_bf16_autocast_track_the_float32_result():
    # A teacher kept in bf16 beside a float32 student (no autocast), and everything under bf16 autocast.
    h, weight, teacher_h, teacher_w, targets = distill_problem()
    kwargs = dict(temperature=2.0, alpha=0.5, kind="jsd", chunk_rows=6)
    ref_h, ref_w = leaves(h, weight)
    ref = chunked_distillation_loss(ref_h, ref_w, teacher_h, teacher_w, targets, **kwargs)[0]
    ref.backward()  # float32 throughout: checked against the naive formula above
    bf16_teacher = (teacher_h.bfloat16(), teacher_w.bfloat16())
    for autocast in (False, True):
        ours_h, ours_w = leaves(h, weight)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            total = chunked_distillation_loss(ours_h, ours_w, *bf16_teacher, targets, **kwargs)[0]
        total.backward()
        assert total.dtype == torch.float32 and ours_w.grad.dtype == torch.float32
        assert abs(total.item() - ref.item()) <= 2e-2 * ref.item()
        assert rel_err(ours_h.grad, ref_h.grad) <= 3e-2 and rel_err(ours_w.grad, ref_w.grad) <= 3e-2


def test_distillation_refuses_a_teacher_with_another_vocabulary():
    h, weight, teacher_h, teacher_w, targets = distill_problem()
    with pytest.raises(ValueError, match="teacher vocab 32 != student vocab 30"):
        chunked_distillation_loss(h, weight, teacher_h, torch.randn(32, 12), targets, temperature=1.0, alpha=0.5,
                                  kind="forward_kl")


# ---- DPO ---------------------------------------------------------------------------------------


def trl_dpo_on_one_pair(loss_type: str, beta: float, label_smoothing: float, per_token_logps: torch.Tensor,
                        completion_mask: torch.Tensor, ref_chosen: float, ref_rejected: float):
    """TRL's loss, rewards and accuracy on one pair (TRL returns the mean loss over pairs and logs mean rewards)."""
    loss, m = trl_dpo_loss([loss_type], [1.0], beta, per_token_logps, completion_mask,
                           torch.tensor([ref_chosen], dtype=torch.float64),
                           torch.tensor([ref_rejected], dtype=torch.float64), label_smoothing=label_smoothing)
    return loss, m["rewards/chosen"][0], m["rewards/rejected"][0], m["rewards/accuracies"][0]


def dpo_pairs(P=6, L=9, seed=0):
    """Per-token log-probs (P, 2, L) zero outside each response, completion masks (P, 2, L + 1) whose
    first column is the prompt, reference sums (P, 2)."""
    g = gen(seed)
    lengths = torch.randint(1, L + 1, (P, 2), generator=g)
    lengths[0] = torch.tensor([L, 1])  # extremes
    mask = torch.zeros(P, 2, L + 1, dtype=torch.long)
    for p in range(P):
        for r in range(2):
            mask[p, r, L + 1 - lengths[p, r]:] = 1
    per_token = -torch.rand(P, 2, L, generator=g, dtype=torch.float64) * 3 * mask[..., 1:]
    reference = per_token.sum(-1) + torch.randn(P, 2, generator=g, dtype=torch.float64)
    return per_token, mask, reference, lengths


def test_dpo_with_policy_equal_to_reference_is_log2_with_zero_rewards():
    logps = torch.tensor([-12.5, -3.0, -40.25])
    losses, chosen, rejected = dpo_loss(logps, logps - 1, logps, logps - 1, beta=0.1)
    assert torch.equal(losses, torch.full((3,), math.log(2)))
    assert (chosen == 0).all() and (rejected == 0).all()


# TRL 1.16's "sigmoid" ignores label_smoothing (its docs: Robust DPO and EXO only); conservative DPO's
# formula is TRL's "aot" loss, whose sorting over pairs is the identity on one pair.
@pytest.mark.parametrize("loss_type,label_smoothing,trl_loss_type",
                         [("sigmoid", 0.0, "sigmoid"), ("sigmoid", 0.1, "aot"), ("ipo", 0.0, "ipo")])
def test_dpo_losses_rewards_and_accuracy_equal_trl(loss_type, label_smoothing, trl_loss_type):
    per_token, mask, reference, lengths = dpo_pairs()
    beta = 0.3
    policy = per_token.sum(-1)  # (P, 2)
    losses, chosen, rejected = dpo_loss(policy[:, 0], policy[:, 1], reference[:, 0], reference[:, 1], beta=beta,
                                        loss_type=loss_type, label_smoothing=label_smoothing,
                                        chosen_lengths=lengths[:, 0], rejected_lengths=lengths[:, 1])
    accuracy = chosen > rejected
    assert 0 < accuracy.sum() < len(accuracy)  # both outcomes occur
    for p in range(len(losses)):
        trl = trl_dpo_on_one_pair(trl_loss_type, beta, label_smoothing, per_token[p], mask[p],
                                  reference[p, 0].item(), reference[p, 1].item())
        assert losses[p].item() == pytest.approx(trl[0], rel=1e-12), p
        assert (chosen[p].item(), rejected[p].item()) == pytest.approx(trl[1:3], rel=1e-12), p
        assert float(accuracy[p]) == trl[3], p


def test_dpo_loss_gradient_reaches_the_policy_only():
    policy = torch.tensor([-10.0, -20.0], requires_grad=True)
    losses, chosen, rejected = dpo_loss(policy[:1], policy[1:], torch.tensor([-11.0]), torch.tensor([-19.0]), beta=0.5)
    losses.sum().backward()
    # d/d chosen of -log sigmoid(beta * d) = -beta * sigmoid(-beta * d), d = (1) - (-1) = 2
    expected = -0.5 * torch.sigmoid(torch.tensor(-1.0)).item()
    assert policy.grad.tolist() == pytest.approx([expected, -expected])
    assert not chosen.requires_grad and not rejected.requires_grad


def test_ipo_needs_lengths():
    x = torch.zeros(2)
    with pytest.raises(ValueError, match="chosen_lengths and rejected_lengths"):
        dpo_loss(x, x, x, x, beta=0.1, loss_type="ipo")


# ---- memory at a 128k vocabulary ---------------------------------------------------------------

# Run in a child process whose allocator returns every buffer over 64 KiB to the system when freed
# (MALLOC_MMAP_THRESHOLD_ fixes glibc's otherwise adaptive threshold), so resident memory tracks live
# tensors; the kernel's high-water mark (VmHWM, reset through /proc/self/clear_refs) is the peak.
_PEAK_CHILD = textwrap.dedent("""
    import json, sys
    import torch
    import torch.nn.functional as F
    from losses import chunked_cross_entropy, chunked_distillation_loss, chunked_token_logprobs

    def status(key):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))

    def peak_extra(fn):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current resident size
        before = status("VmRSS")
        fn()
        return status("VmHWM") - before

    torch.set_num_threads(1)
    rows, dim, vocab, chunk = json.loads(sys.argv[1])
    g = torch.Generator().manual_seed(0)
    h = torch.randn(rows, dim, generator=g).requires_grad_()
    w = (torch.randn(vocab, dim, generator=g) * 0.3).requires_grad_()
    th, tw = torch.randn(rows, dim, generator=g), torch.randn(vocab, dim, generator=g) * 0.3
    t = torch.randint(0, vocab, (rows,), generator=g)
    runs = {
        "full_logits_guard": lambda: F.cross_entropy(h.detach() @ w.detach().T, t),
        "cross_entropy": lambda: chunked_cross_entropy(h, w, t, "sum", chunk_rows=chunk).backward(),
        "token_logprobs": lambda: chunked_token_logprobs(h, w, t, chunk_rows=chunk).sum().backward(),
        "distillation": lambda: chunked_distillation_loss(h, w, th, tw, t, temperature=2.0, alpha=0.5, kind="jsd",
                                                          chunk_rows=chunk)[0].backward(),
    }
    print(json.dumps({name: peak_extra(fn) for name, fn in runs.items()}))
""")


@pytest.mark.e2e
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc peak-RSS reset")
def test_losses_never_hold_the_full_float32_logits_at_a_128k_vocabulary():
    rows, dim, vocab, chunk = 192, 16, 128_256, 2
    full = rows * vocab * 4  # 98.5 MB of float32 logits
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run([sys.executable, "-c", _PEAK_CHILD, json.dumps([rows, dim, vocab, chunk])], cwd=REPO,
                         env=env, capture_output=True, text=True, timeout=120, check=True)
    peaks = json.loads(out.stdout.strip().splitlines()[-1])
    print({k: f"{v / 2**20:.0f} MiB" for k, v in peaks.items()}, f"full logits {full / 2**20:.0f} MiB")
    assert peaks["full_logits_guard"] >= full  # the measurement sees a full-logits loss
    for name in ("cross_entropy", "token_logprobs", "distillation"):
        assert peaks[name] < 0.4 * full, name
