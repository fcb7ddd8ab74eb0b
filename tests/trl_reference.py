"""TRL 1.16's DPO loss, computed by TRL's own code on given log-probabilities, for the tests to compare with."""

from collections import defaultdict
from types import SimpleNamespace

import torch


def trl_dpo_loss(loss_types: list[str], loss_weights: list[float], beta: float, per_token_logps: torch.Tensor,
                 completion_mask: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
                 label_smoothing: float = 0.0) -> tuple[float, dict]:
    """TRL's DPOTrainer._compute_loss on one batch of P pairs, called unbound with a stub `self`:
    (the batch's loss, the metrics TRL logged).

    Building a real DPOTrainer needs a Hugging Face model, a tokenizer, a dataset and accelerate; the
    method reads only the attributes set on `stub` and, from the model's output, per-token log-probs
    (2P, L) (rows: the P chosen responses, then the P rejected ones; zero outside the response) plus
    logging-only fields. completion_mask (2P, L + 1): 1 on response tokens, its first column the prompt
    (TRL shifts it by one to align it with the log-probs). ref_chosen, ref_rejected (P,): the reference's
    summed log-probs. TRL averages every loss type over the batch it is given.
    """
    from trl import DPOTrainer

    zeros = torch.zeros_like(per_token_logps)
    outputs = SimpleNamespace(log_probs=per_token_logps, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())
    same = lambda x: x  # noqa: E731
    stub = SimpleNamespace(
        model=SimpleNamespace(training=True),
        accelerator=SimpleNamespace(device=torch.device("cpu"), gather=same, gather_for_metrics=same),
        aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl",
        loss_types=loss_types, loss_weights=loss_weights, beta=beta, label_smoothing=label_smoothing,
        use_weighting=False, _metrics={"train": defaultdict(list)}, _total_train_tokens=0, _tp_size=1,
    )
    inputs = dict(input_ids=torch.zeros(completion_mask.shape, dtype=torch.long),
                  attention_mask=torch.ones_like(completion_mask), completion_mask=completion_mask,
                  ref_chosen_logps=ref_chosen, ref_rejected_logps=ref_rejected)
    loss = DPOTrainer._compute_loss(stub, lambda **_: outputs, inputs, return_outputs=False)
    return loss.item(), stub._metrics["train"]
