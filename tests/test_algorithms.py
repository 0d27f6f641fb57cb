"""Hand-computed values for the GRPO math."""

import math

import pytest
import torch

from learners.algorithms import (
    aggregate_loss,
    entropy_from_logits,
    grpo_advantages,
    kl_penalty,
    masked_mean,
    policy_loss,
    token_logprobs,
)


def test_grpo_advantages_hand_computed():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    adv, metrics = grpo_advantages(rewards, group_size=4, eps=0.0)
    # group 1: mean 0.5, unbiased std sqrt(1/3)
    s = math.sqrt(1 / 3)
    assert adv[:4].tolist() == pytest.approx([0.5 / s, -0.5 / s, -0.5 / s, 0.5 / s])
    assert adv[4:].tolist() == [0.0, 0.0, 0.0, 0.0]
    assert metrics["train/zero_variance_groups"] == 1.0
    assert metrics["train/zero_variance_fraction"] == 0.5


def test_dr_grpo_does_not_scale_by_std():
    adv, _ = grpo_advantages(torch.tensor([3.0, 1.0]), group_size=2, scale_by_std=False)
    assert adv.tolist() == [1.0, -1.0]


def test_grpo_vectorised_equals_loop():
    torch.manual_seed(0)
    rewards = torch.rand(24)
    adv, _ = grpo_advantages(rewards, group_size=6)
    for g in range(4):
        group = rewards[g * 6 : (g + 1) * 6].tolist()
        mean = sum(group) / 6
        std = math.sqrt(sum((r - mean) ** 2 for r in group) / 5)
        expected = [(r - mean) / (std + 1e-6) for r in group]
        assert adv[g * 6 : (g + 1) * 6].tolist() == pytest.approx(expected, rel=1e-5)


def test_grpo_rejects_ragged_groups():
    with pytest.raises(ValueError, match="groups of 4"):
        grpo_advantages(torch.zeros(6), group_size=4)


def test_policy_loss_ratio_is_e():
    # logprobs exceed old_logprobs by 1 -> ratio e on every token (clipping off)
    logprobs = torch.zeros(1, 3)
    old = -torch.ones(1, 3)
    mask = torch.ones(1, 3)
    loss, m = policy_loss(logprobs, old, torch.tensor([1.0]), mask, clip_eps_low=10.0, clip_eps_high=10.0)
    assert m["train/ratio_mean"] == pytest.approx(math.e)
    assert loss.item() == pytest.approx(-math.e)
    assert m["train/clip_fraction"] == 0.0


def test_policy_loss_clips_high_and_low():
    logprobs = torch.log(torch.tensor([[1.5, 0.5]]))
    old = torch.zeros(1, 2)
    mask = torch.ones(1, 2)
    # positive advantage: ratio 1.5 clipped to 1.2; ratio 0.5 is not clipped (min picks 0.5)
    loss, m = policy_loss(logprobs, old, torch.tensor([1.0]), mask, 0.2, 0.2)
    assert loss.item() == pytest.approx(-(1.2 + 0.5) / 2)
    assert m["train/clip_fraction"] == 0.5
    # negative advantage: ratio 0.5 clipped to 0.8 (-min(-0.5, -0.8) = 0.8); 1.5 kept
    loss, _ = policy_loss(logprobs, old, torch.tensor([-1.0]), mask, 0.2, 0.2)
    assert loss.item() == pytest.approx((1.5 + 0.8) / 2)
    # asymmetric (DAPO clip-higher): eps_high 0.6 lets 1.5 through
    loss, _ = policy_loss(logprobs, old, torch.tensor([1.0]), mask, 0.2, 0.6)
    assert loss.item() == pytest.approx(-(1.5 + 0.5) / 2)


def test_policy_loss_gradient_is_advantage_weighted():
    logprobs = torch.zeros(1, 2, requires_grad=True)
    loss, _ = policy_loss(logprobs, torch.zeros(1, 2), torch.tensor([2.0]), torch.ones(1, 2))
    loss.backward()
    # d/dlogp of -mean(ratio * A) at ratio 1 = -A / n_tokens
    assert logprobs.grad.tolist() == [[-1.0, -1.0]]


def test_loss_aggregation_modes():
    per_token = torch.tensor([[1.0, 1.0, 1.0, 0.0], [4.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    assert aggregate_loss(per_token, mask, "token-mean").item() == pytest.approx(7 / 4)
    assert aggregate_loss(per_token, mask, "seq-mean-token-mean").item() == pytest.approx((1 + 4) / 2)
    assert aggregate_loss(per_token, mask, "token-sum-norm").item() == pytest.approx(7 / (4 * 2))
    assert aggregate_loss(per_token, mask, "token-sum-norm", 7.0).item() == pytest.approx(7 / (7 * 2))
    with pytest.raises(ValueError):
        aggregate_loss(per_token, mask, "bogus")


def test_kl_estimators_hand_computed():
    logp = torch.tensor([[math.log(0.5)]])
    ref = torch.tensor([[math.log(0.25)]])
    d = math.log(2)
    assert kl_penalty(logp, ref, "k1").item() == pytest.approx(d)
    assert kl_penalty(logp, ref, "k2").item() == pytest.approx(0.5 * d * d)
    assert kl_penalty(logp, ref, "k3").item() == pytest.approx(0.5 + d - 1)
    assert kl_penalty(ref, ref, "k3").item() == 0.0


def test_masked_mean_and_entropy_and_token_logprobs():
    assert masked_mean(torch.tensor([1.0, 3.0, 100.0]), torch.tensor([1.0, 1.0, 0.0])).item() == 2.0
    uniform = torch.zeros(1, 4)
    assert entropy_from_logits(uniform).item() == pytest.approx(math.log(4))
    logits = torch.log(torch.tensor([[[0.1, 0.2, 0.7]]]))
    assert token_logprobs(logits, torch.tensor([[2]])).item() == pytest.approx(math.log(0.7))
