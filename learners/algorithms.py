"""Policy-optimisation math as pure functions over tensors.

Every function takes tensors and plain numbers and returns ``(tensor, metrics)`` where
``metrics`` is a dict of Python floats. Shapes use B = sequences in the batch, T = response
tokens (right-padded), G = group size (samples per prompt).

Deviations from the papers are stated where they occur.
"""

from __future__ import annotations

from typing import Literal

import torch

LossAggregation = Literal["token-mean", "seq-mean-token-mean", "token-sum-norm"]
KLEstimator = Literal["k1", "k2", "k3"]


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``values`` where ``mask`` is 1; 0 where the mask is empty."""
    total = (values * mask).sum() if dim is None else (values * mask).sum(dim)
    count = mask.sum() if dim is None else mask.sum(dim)
    return total / count.clamp(min=1)


def grpo_advantages(
    rewards: torch.Tensor, group_size: int, scale_by_std: bool = True, eps: float = 1e-6
) -> tuple[torch.Tensor, dict[str, float]]:
    """Group-relative advantages (GRPO, Shao et al. 2024), one per sequence.

    rewards: [B] with B = n_groups * G, samples of one prompt contiguous.
    Returns advantages [B]. ``scale_by_std=False`` gives Dr. GRPO's unscaled variant.
    Groups whose rewards are all equal get advantage 0 and are counted.
    """
    if rewards.numel() % group_size != 0:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    grouped = rewards.view(-1, group_size).float()
    mean = grouped.mean(dim=1, keepdim=True)
    std = grouped.std(dim=1, keepdim=True, unbiased=True) if group_size > 1 else torch.zeros_like(mean)
    # A_i = (r_i - mean(r_group)) / (std(r_group) + eps)
    advantages = grouped - mean
    if scale_by_std:
        # all-equal groups have A = 0 exactly (also when eps = 0)
        advantages = torch.where(std > 0, advantages / (std + eps), torch.zeros_like(advantages))
    zero_variance = (grouped.max(dim=1).values == grouped.min(dim=1).values).sum().item()
    metrics = {
        "train/zero_variance_groups": float(zero_variance),
        "train/zero_variance_fraction": zero_variance / grouped.shape[0],
    }
    return advantages.view(-1), metrics


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    clip_eps_low: float = 0.2,
    clip_eps_high: float = 0.2,
    loss_agg: LossAggregation = "token-mean",
    loss_norm_constant: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO clipped surrogate with asymmetric clipping (PPO; DAPO's clip-higher).

    logprobs, old_logprobs, response_mask: [B, T]; advantages: [B] (broadcast over tokens).
    ``old_logprobs`` are the generator's log-probs of the sampled tokens, so the ratio also
    absorbs any rollout/trainer numeric mismatch (see the learner's ``train/logprob_mismatch``).
    """
    adv = advantages.unsqueeze(-1).to(logprobs.dtype)
    log_ratio = (logprobs - old_logprobs).clamp(-20.0, 20.0)
    # r_t = pi(a_t|s_t) / pi_old(a_t|s_t)
    ratio = torch.exp(log_ratio)
    # L = -min(r_t A, clip(r_t, 1 - eps_low, 1 + eps_high) A)
    unclipped = ratio * adv
    clipped = ratio.clamp(1.0 - clip_eps_low, 1.0 + clip_eps_high) * adv
    per_token = -torch.minimum(unclipped, clipped)
    loss = aggregate_loss(per_token, response_mask, loss_agg, loss_norm_constant)
    with torch.no_grad():
        mask = response_mask.bool()
        token_ratios = ratio[mask] if mask.any() else torch.ones(1)
        clip_fraction = masked_mean((clipped < unclipped).float(), response_mask)
    metrics = {
        "train/ratio_mean": token_ratios.mean().item(),
        "train/ratio_max": token_ratios.max().item(),
        "train/ratio_min": token_ratios.min().item(),
        "train/clip_fraction": clip_fraction.item(),
    }
    return loss, metrics


def aggregate_loss(
    per_token: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg: LossAggregation,
    loss_norm_constant: float | None = None,
) -> torch.Tensor:
    """Reduce a [B, T] per-token loss to a scalar.

    token-mean: sum over all tokens / number of tokens (DAPO).
    seq-mean-token-mean: mean over sequences of each sequence's token mean (original GRPO).
    token-sum-norm: sum over tokens / a constant (Dr. GRPO; default constant = T).
    """
    if loss_agg == "token-mean":
        return masked_mean(per_token, response_mask)
    if loss_agg == "seq-mean-token-mean":
        return masked_mean(per_token, response_mask, dim=-1).mean()
    if loss_agg == "token-sum-norm":
        constant = loss_norm_constant or per_token.shape[-1]
        return (per_token * response_mask).sum() / (constant * per_token.shape[0])
    raise ValueError(f"unknown loss_agg {loss_agg!r}")


def kl_penalty(
    logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: KLEstimator = "k3"
) -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from sampled tokens (Schulman's k1/k2/k3).

    logprobs, ref_logprobs: [B, T]. Returns [B, T].
    """
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        # k1 = log pi - log pi_ref
        return log_ratio
    if estimator == "k2":
        # k2 = 0.5 * (log pi - log pi_ref)^2
        return 0.5 * log_ratio.square()
    if estimator == "k3":
        # k3 = exp(log pi_ref - log pi) - (log pi_ref - log pi) - 1
        neg = (-log_ratio).clamp(-20.0, 20.0)
        return torch.exp(neg) - neg - 1.0
    raise ValueError(f"unknown KL estimator {estimator!r}")


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the categorical distribution per position: [..., V] -> [...]."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    # H = -sum_v p_v log p_v
    return -(logp.exp() * logp).sum(dim=-1)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Log-prob of each token under its logits: logits [B, T, V], tokens [B, T] -> [B, T]."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


ADVANTAGES = {
    "grpo": lambda rewards, group_size: grpo_advantages(rewards, group_size, scale_by_std=True),
    "dr-grpo": lambda rewards, group_size: grpo_advantages(rewards, group_size, scale_by_std=False),
}
AdvantageEstimator = Literal["grpo", "dr-grpo"]
