"""Policy-optimisation math as pure functions over tensors (no Ray, no config objects).

Most functions return ``(tensor, metrics)`` where ``metrics`` is a dict of Python floats.
Shapes: B = sequences in the batch, T = response tokens (right-padded, ``mask`` marks the real
ones), G = group size (samples per prompt, contiguous in the batch).

Advantages come in two kinds:
- outcome estimators map one scalar reward per sequence to one advantage per sequence, using
  the group or the batch as baseline (GRPO, Dr. GRPO, RLOO, REINFORCE++-baseline, batch-std);
- token estimators work on per-token rewards (the outcome at the last token, minus a KL
  penalty where KL is a reward penalty): REINFORCE++ (discounted returns) and GAE (a critic).

Deviations from the papers are stated where they occur.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

LossAggregation = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "token-sum-norm"]
KLEstimator = Literal["k1", "k2", "k3", "abs", "k1+", "k3+"]
PolicyLossType = Literal["ppo", "gspo", "pg", "sac"]
OutcomeEstimator = Literal["grpo", "dr-grpo", "rloo", "reinforce++-baseline", "batch-std"]
TokenEstimator = Literal["reinforce++", "gae"]
AdvantageEstimator = Literal["grpo", "dr-grpo", "rloo", "reinforce++-baseline", "batch-std", "reinforce++", "gae"]


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``values`` where ``mask`` is 1; 0 where the mask is empty."""
    total = (values * mask).sum() if dim is None else (values * mask).sum(dim)
    count = mask.sum() if dim is None else mask.sum(dim)
    return total / count.clamp(min=1)


def masked_moments(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[sum, sum of squares, count] of the masked values: what data-parallel ranks all-reduce
    to whiten over the global batch."""
    v = values.double() * mask
    return torch.stack([v.sum(), (v * values.double()).sum(), mask.double().sum()])


def masked_whiten(
    values: torch.Tensor, mask: torch.Tensor, moments: torch.Tensor | None = None, eps: float = 1e-8
) -> torch.Tensor:
    """(x - mean) / std over the masked entries; ``moments`` (from ``masked_moments``, possibly
    summed over ranks) fixes the statistics. Padding stays 0."""
    total, total_sq, count = (moments if moments is not None else masked_moments(values, mask)).tolist()
    if count < 1:
        return torch.zeros_like(values)
    mean = total / count
    # unbiased variance, as OpenRLHF and verl whiten
    var = max(0.0, (total_sq - count * mean * mean) / max(1.0, count - 1))
    return (values - mean) / math.sqrt(var + eps) * mask


# -- outcome estimators: [B] rewards -> [B] advantages ---------------------------------------


def _grouped(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    if rewards.numel() % group_size != 0:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    return rewards.view(-1, group_size).float()


def _zero_variance_metrics(grouped: torch.Tensor) -> dict[str, float]:
    zero_variance = (grouped.max(dim=1).values == grouped.min(dim=1).values).sum().item()
    return {
        "train/zero_variance_groups": float(zero_variance),
        "train/zero_variance_fraction": zero_variance / grouped.shape[0],
    }


def grpo_advantages(
    rewards: torch.Tensor, group_size: int, scale_by_std: bool = True, eps: float = 1e-6
) -> tuple[torch.Tensor, dict[str, float]]:
    """Group-relative advantages (GRPO, Shao et al. 2024), one per sequence.

    rewards: [B] with B = n_groups * G, samples of one prompt contiguous.
    ``scale_by_std=False`` gives Dr. GRPO's unscaled variant (Liu et al. 2025).
    Groups whose rewards are all equal get advantage 0 and are counted.
    """
    grouped = _grouped(rewards, group_size)
    mean = grouped.mean(dim=1, keepdim=True)
    std = grouped.std(dim=1, keepdim=True, unbiased=True) if group_size > 1 else torch.zeros_like(mean)
    # A_i = (r_i - mean(r_group)) / (std(r_group) + eps)
    advantages = grouped - mean
    if scale_by_std:
        # all-equal groups have A = 0 exactly (also when eps = 0)
        advantages = torch.where(std > 0, advantages / (std + eps), torch.zeros_like(advantages))
    return advantages.view(-1), _zero_variance_metrics(grouped)


def rloo_advantages(rewards: torch.Tensor, group_size: int) -> tuple[torch.Tensor, dict[str, float]]:
    """REINFORCE leave-one-out (Ahmadian et al. 2024): baseline = mean of the other G-1 samples.

    A_i = r_i - (sum_j r_j - r_i) / (G - 1)  ==  G / (G - 1) * (r_i - mean(r_group)).
    """
    if group_size < 2:
        raise ValueError("RLOO needs at least two samples per group")
    grouped = _grouped(rewards, group_size)
    baseline = (grouped.sum(dim=1, keepdim=True) - grouped) / (group_size - 1)
    return (grouped - baseline).view(-1), _zero_variance_metrics(grouped)


def group_centered_advantages(rewards: torch.Tensor, group_size: int) -> tuple[torch.Tensor, dict[str, float]]:
    """Subtract the group mean only: Dr. GRPO's advantage (Liu et al. 2025), and REINFORCE++-baseline's
    (Hu et al. 2025), for which the learner then whitens over the whole batch (``masked_whiten``)."""
    return grpo_advantages(rewards, group_size, scale_by_std=False)


def batch_standardized_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-6) -> tuple[torch.Tensor, dict[str, float]]:
    """Within-batch standardisation: (r - mean(batch)) / (std(batch) + eps), no groups as baseline."""
    grouped = _grouped(rewards, group_size)
    flat = grouped.view(-1)
    std = flat.std(unbiased=True) if flat.numel() > 1 else torch.tensor(0.0)
    advantages = (flat - flat.mean()) / (std + eps) if std > 0 else torch.zeros_like(flat)
    return advantages, _zero_variance_metrics(grouped)


OUTCOME_ESTIMATORS = {
    "grpo": lambda rewards, group_size: grpo_advantages(rewards, group_size, scale_by_std=True),
    "dr-grpo": group_centered_advantages,
    "rloo": rloo_advantages,
    "reinforce++-baseline": group_centered_advantages,
    "batch-std": batch_standardized_advantages,
}
TOKEN_ESTIMATORS = ("reinforce++", "gae")
# estimators defined with batch whitening of the final advantages
WHITENED_BY_DEFINITION = ("reinforce++-baseline", "reinforce++", "gae")


# -- token estimators: [B, T] rewards -> [B, T] advantages -----------------------------------


def outcome_token_rewards(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Place each sequence's scalar score on its last response token (the last the mask keeps:
    an episode's last policy token): [B], [B, T] -> [B, T]."""
    rewards = torch.zeros_like(mask, dtype=torch.float32)
    positions = torch.arange(1, mask.shape[-1] + 1, dtype=torch.float32)
    last = ((mask > 0).float() * positions).argmax(dim=-1)
    rewards[torch.arange(mask.shape[0]), last] = scores.float() * (mask.sum(dim=-1) > 0)
    return rewards


def discounted_returns(token_rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """G_t = sum_{k>=t} gamma^(k-t) r_k over the masked tokens (REINFORCE++'s advantage before
    whitening): [B, T] -> [B, T]. Tokens the mask leaves out (an episode's observations, the
    padding) neither add a reward nor a discount step: the return passes over them."""
    returns = torch.zeros_like(token_rewards)
    running = torch.zeros(token_rewards.shape[0], dtype=token_rewards.dtype)
    for t in reversed(range(token_rewards.shape[1])):
        running = torch.where(mask[:, t] > 0, token_rewards[:, t] + gamma * running, running)
        returns[:, t] = running
    return returns * mask


def gae_advantages(
    token_rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) over response tokens.

    values[:, t] = V(s_t), the critic's value before token t; the value after the last token is 0.
    delta_t = r_t + gamma V(s_{t+1}) - V(s_t);  A_t = delta_t + gamma lam A_{t+1}.
    Returns (advantages, returns = advantages + values), both [B, T], 0 on padding.
    """
    values = values.detach() * mask
    advantages = torch.zeros_like(token_rewards)
    next_value = torch.zeros(token_rewards.shape[0], dtype=token_rewards.dtype)
    next_advantage = torch.zeros_like(next_value)
    for t in reversed(range(token_rewards.shape[1])):
        live = mask[:, t]
        delta = token_rewards[:, t] + gamma * next_value - values[:, t]
        advantage = delta + gamma * lam * next_advantage
        # padding (after the end) neither contributes nor receives
        next_value = torch.where(live > 0, values[:, t], next_value)
        next_advantage = torch.where(live > 0, advantage, next_advantage)
        advantages[:, t] = advantage * live
    return advantages, (advantages + values) * mask


# -- losses ------------------------------------------------------------------------------------


def aggregate_loss(
    per_token: torch.Tensor,
    mask: torch.Tensor,
    loss_agg: LossAggregation,
    loss_norm_constant: float | None = None,
    num_tokens: float | None = None,
    num_sequences: float | None = None,
) -> torch.Tensor:
    """Reduce a [B, T] per-token loss to a scalar.

    token-mean: sum over all tokens / number of tokens (DAPO).
    seq-mean-token-mean: mean over sequences of each sequence's token mean (original GRPO).
    seq-mean-token-sum: mean over sequences of each sequence's token sum (verl's mode of that
      name; a long sequence weighs in proportion to its length).
    token-sum-norm: sum over tokens / (constant * sequences) (Dr. GRPO; default constant = T).

    Sequences are counted only where their mask has a token: a fully masked row adds nothing to
    the loss and is not in the count either (verl counts every row).
    ``num_tokens`` / ``num_sequences`` replace this tensor's own counts by those of the whole
    (mini-)batch it is a part of, so micro-batches and data-parallel shards sum to the loss of
    the whole batch exactly.
    """
    tokens = num_tokens if num_tokens is not None else mask.sum().clamp(min=1)
    sequences = num_sequences if num_sequences is not None else (mask.sum(-1) > 0).sum().clamp(min=1)
    if loss_agg == "token-mean":
        return (per_token * mask).sum() / tokens
    if loss_agg == "seq-mean-token-mean":
        return masked_mean(per_token, mask, dim=-1).sum() / sequences
    if loss_agg == "seq-mean-token-sum":
        return (per_token * mask).sum() / sequences
    if loss_agg == "token-sum-norm":
        constant = loss_norm_constant or per_token.shape[-1]
        return (per_token * mask).sum() / (constant * sequences)
    raise ValueError(f"unknown loss_agg {loss_agg!r}")


def truncated_is_weights(learner_logprobs: torch.Tensor, generator_logprobs: torch.Tensor, cap: float) -> torch.Tensor:
    """Per-token importance weights pi_learner / pi_generator under the same policy version,
    truncated at ``cap`` (Yao et al. 2025, "off-policy RL from rollout/trainer mismatch").
    Corrects for the inference engine's numerics differing from the trainer's; no gradient."""
    log_ratio = (learner_logprobs - generator_logprobs).detach().clamp(-20.0, 20.0)
    return torch.exp(log_ratio).clamp(max=cap)


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    loss_type: PolicyLossType = "ppo",
    clip_eps_low: float = 0.2,
    clip_eps_high: float = 0.2,
    dual_clip_c: float | None = None,
    loss_agg: LossAggregation = "token-mean",
    loss_norm_constant: float | None = None,
    is_weights: torch.Tensor | None = None,
    num_tokens: float | None = None,
    num_sequences: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The policy-gradient surrogate, per token, then aggregated.

    logprobs, old_logprobs, mask: [B, T]; advantages: [B] (one per sequence) or [B, T].
    - ``pg``: -A log pi (REINFORCE; on-policy, no ratio, no clipping).
    - ``ppo``: -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A), r = pi / pi_old per token;
      asymmetric eps is DAPO's clip-higher. ``dual_clip_c`` (Ye et al. 2020, c > 1) also bounds
      the loss of negative-advantage tokens by -c A.
    - ``gspo``: the same clipped form with one ratio per sequence, s = exp(mean_t log(pi/pi_old))
      (Zheng et al. 2025), whose gradient flows through each token as s * grad log pi_t.
    ``is_weights`` ([B, T], no gradient) multiply the per-token loss: truncated importance sampling.
    """
    adv = advantages.unsqueeze(-1) if advantages.dim() == 1 else advantages
    adv = adv.to(logprobs.dtype).expand_as(logprobs)
    log_ratio = (logprobs - old_logprobs).clamp(-20.0, 20.0)
    if loss_type == "pg":
        per_token = -adv * logprobs
        ratio = torch.exp(log_ratio).detach()
        clipped_mask = torch.zeros_like(mask)
    elif loss_type in ("ppo", "gspo"):
        if loss_type == "gspo":
            seq_log_ratio = masked_mean(log_ratio, mask, dim=-1).unsqueeze(-1)
            # value s_i, gradient s_i * grad log pi_t
            log_ratio = seq_log_ratio.detach() + logprobs - logprobs.detach()
        ratio = torch.exp(log_ratio)
        # L_t = -min(r_t A, clip(r_t, 1 - eps_low, 1 + eps_high) A)
        unclipped = -ratio * adv
        clipped = -ratio.clamp(1.0 - clip_eps_low, 1.0 + clip_eps_high) * adv
        per_token = torch.maximum(unclipped, clipped)
        clipped_mask = (clipped > unclipped).float()
        if dual_clip_c is not None:
            # for A < 0: L_t = min(L_t, -c A)
            capped = torch.minimum(per_token, -dual_clip_c * adv)
            dual = ((adv < 0) & (capped < per_token)).float()
            per_token = torch.where(adv < 0, capped, per_token)
            clipped_mask = torch.maximum(clipped_mask, dual)
        ratio = ratio.detach()
    else:
        raise ValueError(f"unknown policy loss {loss_type!r}")
    if is_weights is not None:
        per_token = per_token * is_weights
    loss = aggregate_loss(per_token, mask, loss_agg, loss_norm_constant, num_tokens, num_sequences)
    with torch.no_grad():
        real = mask.bool()
        token_ratios = ratio[real] if real.any() else torch.ones(1)
        metrics = {
            "train/ratio_mean": token_ratios.mean().item(),
            "train/ratio_max": token_ratios.max().item(),
            "train/ratio_min": token_ratios.min().item(),
            "train/clip_fraction": masked_mean(clipped_mask, mask).item(),
        }
    return loss, metrics


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float | None = 0.2,
    num_tokens: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped value loss (PPO as in OpenAI baselines), token-mean:
    0.5 * max((V - R)^2, (clip(V, V_old - eps, V_old + eps) - R)^2)."""
    unclipped = (values - returns).square()
    if clip_eps is None:
        per_token = unclipped
        clipped_fraction = torch.zeros(())
    else:
        clipped_values = old_values + (values - old_values).clamp(-clip_eps, clip_eps)
        clipped = (clipped_values - returns).square()
        per_token = torch.maximum(unclipped, clipped)
        clipped_fraction = masked_mean((clipped > unclipped).float(), mask)
    loss = 0.5 * aggregate_loss(per_token, mask, "token-mean", num_tokens=num_tokens)
    with torch.no_grad():
        metrics = {
            "train/value_loss": loss.item(),
            "train/value_clip_fraction": clipped_fraction.item(),
            "train/value_mean": masked_mean(values.detach(), mask).item(),
        }
    return loss, metrics


def soft_lambda_values(rewards: torch.Tensor, soft_penalty: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, lam: float) -> torch.Tensor:
    """The soft lambda-value of each token's next state, sg(V^lambda(s_{t+1})): [B, T] (0 after
    the last token). With r~_k = r_k - alpha * log(pi / pi_ref)(a_k | s_k), the soft reward:

        V^lambda(s_t) = (1 - lambda) * V(s_t) + lambda * (r~_t + V^lambda(s_{t+1})),  V^lambda(s_T) = 0

    lambda = 0: the critic's V(s_{t+1}) (one-step TD); lambda = 1: the soft Monte-Carlo return."""
    soft_rewards = (rewards - soft_penalty) * mask
    out = torch.zeros_like(values)
    following = torch.zeros(values.shape[0], dtype=values.dtype)  # V^lambda(s_{t+1})
    for t in reversed(range(values.shape[1])):
        out[:, t] = following * (mask[:, t + 1] if t + 1 < values.shape[1] else 0.0)
        following = ((1 - lam) * values[:, t] + lam * (soft_rewards[:, t] + following)) * mask[:, t]
    return out


def soft_consistency_loss(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    values: torch.Tensor,
    rewards: torch.Tensor,
    mask: torch.Tensor,
    alpha: float,
    lam: float = 1.0,
    num_tokens: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Token-level soft actor-critic (``policy_loss: sac``): the soft Bellman residual of a soft
    Q-function carried by the policy itself and a value head.

    logprobs (with gradient), ref_logprobs, values (with gradient): [B, T]; rewards: [B], each
    sequence's, received with its last token; mask: [B, T]. Tokens are deterministic
    transitions (s_{t+1} = s_t + a_t), gamma = 1, and SAC's entropy bonus is the KL to the
    reference (the frozen base; a uniform prior over 49k tokens would pay for noise):

        Q(s_t, a_t) = alpha * log(pi / pi_ref)(a_t | s_t) + V(s_t)

    so that pi = pi_ref * exp((Q - V) / alpha), SAC's actor update, holds by construction (soft
    Q-learning with the policy as the Q-function's advantage part). One residual trains both,
    against SAC's soft target r_t + V(s_{t+1}) with the next state's soft value taken as a
    lambda-return (``soft_lambda_values``; detached):

        delta_t = alpha * log(pi / pi_ref)(a_t | s_t) + V(s_t) - r_t - sg(V^lambda(s_{t+1}))
        loss = 0.5 * sum_t delta_t^2 / N_tokens

    The policy's gradient at token t is alpha * delta_t: an actor-critic step with the soft TD
    error as (minus) the advantage. With a reward only at the end, lambda = 0 credits a token
    only once the critic has learned the value of what follows it (on the toy test it never
    learned); lambda near 1 credits every token with the sequence's reward at once, as GRPO
    does, the critic as its baseline. The residual holds for any sampled sequence (off-policy,
    as SAC's replay needs). Deviations from SAC: one critic, the target a detached lambda-return
    rather than a Polyak target network, alpha fixed (no entropy-target tuning).
    """
    token_rewards = outcome_token_rewards(rewards, mask)
    log_ratio = (logprobs - ref_logprobs) * mask
    next_values = soft_lambda_values(token_rewards, alpha * log_ratio.detach(), values.detach(), mask, lam)
    delta = (alpha * log_ratio + values - token_rewards - next_values) * mask
    loss = 0.5 * aggregate_loss(delta.square(), mask, "token-mean", num_tokens=num_tokens)
    with torch.no_grad():
        metrics = {
            "train/sac_loss": loss.item(),
            "train/soft_q_mean": masked_mean(alpha * log_ratio + values, mask).item(),
            "train/value_mean": masked_mean(values, mask).item(),
            "train/td_error_abs_mean": masked_mean(delta.abs(), mask).item(),
        }
    return loss, metrics


K3_CLAMP = 10.0  # verl's bound on the k3 estimate (its "low_var_kl")


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: KLEstimator = "k3") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from sampled tokens (Schulman's k1/k2/k3, and
    the options verl adds).

    - k1 = log pi - log pi_ref; abs = |k1|; k2 = 0.5 k1^2;
    - k3 = exp(-k1) + k1 - 1, with -k1 clamped to [-20, 20] and the estimate to at most
      ``K3_CLAMP`` as verl clamps it (one token with a vanishing reference probability would
      otherwise dominate the batch);
    - k1+, k3+: the value of k1 or k3 with the gradient of k2 (a straight-through estimate):
      k1's and k3's expectations are the KL, but their gradients are not the KL's gradient,
      k2's is (for samples from pi).

    logprobs, ref_logprobs: [B, T]. Returns [B, T].
    """
    log_ratio = logprobs - ref_logprobs
    if estimator in ("k1+", "k3+"):
        value = kl_penalty(logprobs, ref_logprobs, estimator[:-1]).detach()
        gradient = 0.5 * log_ratio.square()
        return gradient - gradient.detach() + value
    if estimator == "k1":
        return log_ratio
    if estimator == "abs":
        return log_ratio.abs()
    if estimator == "k2":
        return 0.5 * log_ratio.square()
    if estimator == "k3":
        neg = (-log_ratio).clamp(-20.0, 20.0)
        return (torch.exp(neg) - neg - 1.0).clamp(max=K3_CLAMP)
    raise ValueError(f"unknown KL estimator {estimator!r}")


@dataclass
class AdaptiveKLController:
    """Adaptive KL coefficient (Ziegler et al. 2019): push the measured KL toward ``target``.

    beta <- beta * (1 + clip(KL / target - 1, -0.2, 0.2) * n_steps / horizon).
    """

    coef: float
    target: float
    horizon: float = 10000.0

    def update(self, current_kl: float, n_steps: int = 1) -> float:
        if math.isfinite(current_kl):
            error = min(0.2, max(-0.2, current_kl / self.target - 1.0))
            self.coef *= 1.0 + error * n_steps / self.horizon
        return self.coef


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the categorical distribution per position: [..., V] -> [...]."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    # H = -sum_v p_v log p_v
    return -(logp.exp() * logp).sum(dim=-1)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Log-prob of each token under its logits: logits [B, T, V], tokens [B, T] -> [B, T]."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def cosine_schedule(step: int, total_steps: int, warmup_steps: int = 0, min_ratio: float = 0.0) -> float:
    """LR multiplier: linear warm-up over ``warmup_steps``, then cosine decay to ``min_ratio``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
