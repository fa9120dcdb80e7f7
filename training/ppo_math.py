"""The maths of PPO for language models, as small pure functions (InstructGPT / Ziegler et al. 2019).

Shapes: [batch, T] over response tokens; `mask` is 1 for real response tokens (up to and including
the first end-of-turn token) and 0 for padding after it. Every function is tested with values worked
out by hand in tests/test_ppo_math.py.

  per-token reward   r_t = -beta * (log pi(a_t|s_t) - log pi_ref(a_t|s_t))   (+ RM score on the last token)
  GAE                delta_t = r_t + gamma * V_{t+1} - V_t ;  A_t = delta_t + gamma * lam * A_{t+1}
  returns            R_t = A_t + V_t
  policy loss        max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)),  ratio = exp(logp - logp_old)
  value loss         0.5 * max((V - R)^2, (V_old + clip(V - V_old, -eps_v, eps_v) - R)^2)
  adaptive KL        beta <- beta * (1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(x - mean) / std over the masked entries (unbiased variance); padding stays 0."""
    mean = masked_mean(x, mask)
    n = mask.sum().clamp(min=2)
    var = (((x - mean) ** 2) * mask).sum() / (n - 1)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return out * mask


def shaped_rewards(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                   mask: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(rewards [B, T], kl [B, T]): -beta * per-token KL everywhere, plus the score on each last real token."""
    kl = (logprobs - ref_logprobs) * mask
    rewards = -beta * kl
    last = (mask.cumsum(dim=1) * mask).argmax(dim=1)  # index of the last real token of each row
    rewards[torch.arange(rewards.size(0)), last] += scores.to(rewards.dtype)
    return rewards * mask, kl


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimates and returns; the value after the last real token is 0."""
    values = values * mask
    advantages = torch.zeros_like(rewards)
    next_adv = torch.zeros(rewards.size(0), dtype=rewards.dtype, device=rewards.device)
    next_value = torch.zeros_like(next_adv)
    for t in reversed(range(rewards.size(1))):
        m = mask[:, t].to(rewards.dtype)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv = delta + gamma * lam * next_adv
        # Padding positions carry the future through unchanged, so a row's last real token sees V=0 after it.
        next_adv = m * adv + (1 - m) * next_adv
        next_value = m * values[:, t] + (1 - m) * next_value
        advantages[:, t] = adv * m
    return advantages, (advantages + values) * mask


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                mask: torch.Tensor, clip_range: float = 0.2) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate loss (to minimise) and stats: clip fraction and approximate KL(old || new)."""
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip_range, 1 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    stats = {"clipfrac": masked_mean((clipped > unclipped).float(), mask),
             "approx_kl": masked_mean(0.5 * log_ratio**2, mask)}
    return loss, stats


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip_range: float = 0.2) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss (to minimise) and the fraction of tokens where the clipped term was larger."""
    clipped_values = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
    l1, l2 = (values - returns) ** 2, (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(l1, l2), mask)
    return loss, {"vf_clipfrac": masked_mean((l2 > l1).float(), mask)}


@dataclass
class AdaptiveKLController:
    """Ziegler et al. (2019): move beta proportionally so the measured KL tracks `target` (nats per sequence)."""

    beta: float
    target: float
    horizon: int

    def update(self, current_kl: float, n_steps: int) -> float:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.beta *= 1.0 + error * n_steps / self.horizon
        return self.beta
