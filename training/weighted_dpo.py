"""DPO losses with per-pair weights, as small pure functions (tested with hand-worked values).

TRL's DPOTrainer averages its per-pair losses with a plain mean and has no sample weights. Flywheel's
pairs carry a weight >= 0 from the implicit-signal rules (an edit is stronger evidence than a
regenerate), so the batch loss here is the weighted mean

    L = sum_i w_i * l_i / sum_i w_i

which makes a pair of weight 0 contribute nothing to the value or the gradient: the batch behaves as
if the pair were absent. Scaling all weights by a constant changes nothing.

Per-pair losses (Δ = chosen_logratio - rejected_logratio, logratio = log pi(y|x) - log pi_ref(y|x)):
  sigmoid  -log sigma(beta * Δ)                                    (Rafailov et al. 2023)
  ipo      (Δ_len - 1 / (2 beta))^2, Δ_len uses per-token log-ratios   (Azar et al. 2023; TRL's length norm)
  robust   (-(1-eps) log sigma(beta Δ) + eps log sigma(-beta Δ)) / (1 - 2 eps)   (Chowdhury et al. 2024),
           unbiased under a label-flip rate eps: for noisy thumbs feedback
Optionally + sft_alpha * NLL(chosen) per token (RPO), against over-optimisation on small datasets.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSS_TYPES = ("sigmoid", "ipo", "robust")


def pair_losses(chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor, beta: float,
                loss_type: str = "sigmoid", label_smoothing: float = 0.0,
                chosen_lengths: torch.Tensor | None = None,
                rejected_lengths: torch.Tensor | None = None) -> torch.Tensor:
    """Per-pair DPO losses, shape [batch]."""
    if loss_type == "sigmoid":
        return -F.logsigmoid(beta * (chosen_logratios - rejected_logratios))
    if loss_type == "ipo":
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError("the ipo loss needs chosen_lengths and rejected_lengths (completion token counts)")
        delta = chosen_logratios / chosen_lengths.clamp(min=1) - rejected_logratios / rejected_lengths.clamp(min=1)
        return (delta - 1.0 / (2.0 * beta)) ** 2
    if loss_type == "robust":
        if not 0.0 <= label_smoothing < 0.5:
            raise ValueError(f"robust DPO needs 0 <= label_smoothing < 0.5 (the label-flip rate), got {label_smoothing}")
        z = beta * (chosen_logratios - rejected_logratios)
        return (-(1 - label_smoothing) * F.logsigmoid(z) + label_smoothing * F.logsigmoid(-z)) / (
            1 - 2 * label_smoothing)
    raise ValueError(f"loss_type={loss_type!r} is not one of {LOSS_TYPES}")


def weighted_mean(losses: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum(w * l) / sum(w); 0 (with a zero gradient) for a batch whose weights are all 0."""
    if (weights < 0).any():
        raise ValueError("pair weights must be >= 0; check the dataset's weight column")
    weights = weights.to(losses.dtype)
    total = weights.sum()
    # where() instead of a clamp keeps an all-zero batch at exactly 0 rather than 0/eps noise.
    return torch.where(total > 0, (weights * losses).sum() / total.clamp(min=1e-12), losses.sum() * 0.0)


def weighted_dpo_loss(chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor, weights: torch.Tensor,
                      beta: float, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
                      chosen_lengths: torch.Tensor | None = None,
                      rejected_lengths: torch.Tensor | None = None,
                      sft_alpha: float = 0.0, chosen_logps: torch.Tensor | None = None) -> torch.Tensor:
    """The batch loss: weighted mean of `pair_losses`, plus `sft_alpha` x the chosen answers' per-token
    negative log-likelihood under the policy when sft_alpha > 0 (RPO, Pang et al. 2024), weighted alike.

    The NLL term keeps the chosen answers likely. Without it DPO can push both answers of every pair
    down and drift into text neither held (the demo's SmolLM2 run learned "1. ****\n2. ****").
    """
    losses = pair_losses(chosen_logratios, rejected_logratios, beta, loss_type, label_smoothing,
                         chosen_lengths, rejected_lengths)
    if sft_alpha > 0:
        if chosen_logps is None or chosen_lengths is None:
            raise ValueError("sft_alpha > 0 needs chosen_logps and chosen_lengths")
        losses = losses + sft_alpha * (-chosen_logps / chosen_lengths.clamp(min=1).to(chosen_logps.dtype))
    return weighted_mean(losses, weights)


def importance_weights(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, behaviour_chosen: torch.Tensor,
                       behaviour_rejected: torch.Tensor, chosen_len: torch.Tensor, rejected_len: torch.Tensor,
                       clip: float) -> torch.Tensor:
    """Per pair, how much likelier the policy being improved finds its two answers than the policy that
    wrote them did: exp(sum over the model-written answers of the mean per-token log-ratio
    log pi(y) - log mu(y)), clipped to [1/clip, clip].

    Per token, not per sequence: a sequence ratio of 80 tokens is a product of 80 ratios and explodes or
    vanishes; the per-token geometric mean keeps the weight on the scale of how far the two policies are
    apart. A side without a behaviour log-prob (NaN: a user's edit, written by no policy) counts as 1.
    """
    def side(policy: torch.Tensor, behaviour: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        per_token = (policy - behaviour.to(policy)) / n.to(policy).clamp(min=1)
        return torch.where(torch.isnan(behaviour.to(policy)), torch.zeros_like(policy), per_token)

    log_w = side(policy_chosen, behaviour_chosen, chosen_len) + side(policy_rejected, behaviour_rejected, rejected_len)
    return log_w.exp().clamp(1.0 / clip, clip)
