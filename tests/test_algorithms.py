"""Hand-computed values for the policy-optimisation math; vectorised code against plain loops."""

import math

import pytest
import torch

from learners.algorithms import (
    AdaptiveKLController,
    aggregate_loss,
    batch_standardized_advantages,
    cosine_schedule,
    discounted_returns,
    gae_advantages,
    group_centered_advantages,
    masked_whiten,
    outcome_token_rewards,
    rloo_advantages,
    truncated_is_weights,
    value_loss,
    entropy_from_logits,
    grpo_advantages,
    kl_penalty,
    masked_mean,
    policy_loss,
    soft_consistency_loss,
    soft_lambda_values,
    token_logprobs,
)


def close(actual: torch.Tensor, expected: list) -> None:
    torch.testing.assert_close(actual.float(), torch.tensor(expected), rtol=1e-5, atol=1e-6)


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
    loss, m = policy_loss(logprobs, old, torch.tensor([1.0]), mask, clip_eps_low=0.2, clip_eps_high=0.2)
    assert loss.item() == pytest.approx(-(1.2 + 0.5) / 2)
    assert m["train/clip_fraction"] == 0.5
    # negative advantage: ratio 0.5 clipped to 0.8 (-min(-0.5, -0.8) = 0.8); 1.5 kept
    loss, _ = policy_loss(logprobs, old, torch.tensor([-1.0]), mask, clip_eps_low=0.2, clip_eps_high=0.2)
    assert loss.item() == pytest.approx((1.5 + 0.8) / 2)
    # asymmetric (DAPO clip-higher): eps_high 0.6 lets 1.5 through
    loss, _ = policy_loss(logprobs, old, torch.tensor([1.0]), mask, clip_eps_low=0.2, clip_eps_high=0.6)
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
    assert aggregate_loss(per_token, mask, "seq-mean-token-sum").item() == pytest.approx((3 + 4) / 2)
    with pytest.raises(ValueError):
        aggregate_loss(per_token, mask, "bogus")


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "token-sum-norm"])
def test_a_fully_masked_row_is_left_out_of_the_count(mode):
    """A row with no token to learn from (an empty completion) changes no aggregation mode:
    it is not counted as a sequence (verl divides by every row)."""
    per_token = torch.tensor([[1.0, 1.0, 1.0, 0.0], [4.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    with_empty = aggregate_loss(torch.cat([per_token, torch.full((1, 4), 9.0)]), torch.cat([mask, torch.zeros(1, 4)]), mode, 4.0)
    assert with_empty.item() == pytest.approx(aggregate_loss(per_token, mask, mode, 4.0).item())


def test_kl_estimators_hand_computed():
    logp = torch.tensor([[math.log(0.5)]])
    ref = torch.tensor([[math.log(0.25)]])
    d = math.log(2)
    assert kl_penalty(logp, ref, "k1").item() == pytest.approx(d)
    assert kl_penalty(logp, ref, "k2").item() == pytest.approx(0.5 * d * d)
    assert kl_penalty(logp, ref, "k3").item() == pytest.approx(0.5 + d - 1)
    assert kl_penalty(ref, ref, "k3").item() == 0.0
    assert kl_penalty(ref, logp, "abs").item() == pytest.approx(d) and kl_penalty(ref, logp, "k1").item() == pytest.approx(-d)
    # a token the reference all but rules out: exp(-20) + 20 - 1 ~ 19, bounded at 10 as verl bounds it
    assert kl_penalty(torch.tensor([[0.0]]), torch.tensor([[math.log(1e-9)]]), "k3").item() == 10.0


@pytest.mark.parametrize("estimator", ["k1+", "k3+"])
def test_straight_through_kl_has_the_value_of_its_estimate_and_the_gradient_of_k2(estimator):
    logp = torch.tensor([[math.log(0.5), math.log(0.1)]], requires_grad=True)
    ref = torch.tensor([[math.log(0.25), math.log(0.3)]])
    value = kl_penalty(logp, ref, estimator)
    assert torch.allclose(value, kl_penalty(logp.detach(), ref, estimator[:-1]))
    value.sum().backward()
    assert torch.allclose(logp.grad, (logp - ref).detach())  # d/dlogp of 0.5 (logp - ref)^2


def test_k3_equals_verls_low_var_kl_on_random_inputs():
    """verl's ``low_var_kl``, written as verl writes it: kl = ref - logp clamped to [-20, 20],
    exp(kl) - kl - 1 clamped to [-10, 10]."""
    generator = torch.Generator().manual_seed(0)
    logp, ref = (torch.randn(64, 32, generator=generator) * 6 - 3 for _ in range(2))
    kl = (ref - logp).clamp(-20, 20)
    verl = (torch.exp(kl) - kl - 1).clamp(-10, 10)
    assert torch.allclose(kl_penalty(logp, ref, "k3"), verl)
    assert torch.equal(kl_penalty(logp, ref, "abs"), (logp - ref).abs())


def test_masked_mean_and_entropy_and_token_logprobs():
    assert masked_mean(torch.tensor([1.0, 3.0, 100.0]), torch.tensor([1.0, 1.0, 0.0])).item() == 2.0
    uniform = torch.zeros(1, 4)
    assert entropy_from_logits(uniform).item() == pytest.approx(math.log(4))
    logits = torch.log(torch.tensor([[[0.1, 0.2, 0.7]]]))
    assert token_logprobs(logits, torch.tensor([[2]])).item() == pytest.approx(math.log(0.7))


def test_rloo_hand_computed_and_loop():
    adv, metrics = rloo_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0, 3.0, 3.0]), group_size=3)
    # group (1, 0, 0): baselines 0, 0.5, 0.5; group (1, 3, 3): 3, 2, 2
    assert adv.tolist() == pytest.approx([1.0, -0.5, -0.5, -2.0, 1.0, 1.0])
    assert metrics["train/zero_variance_groups"] == 0.0
    torch.manual_seed(1)
    rewards = torch.rand(20)
    adv, _ = rloo_advantages(rewards, group_size=5)
    for i in range(20):
        group = rewards[(i // 5) * 5 : (i // 5) * 5 + 5].tolist()
        others = [r for j, r in enumerate(group) if j != i % 5]
        assert adv[i].item() == pytest.approx(rewards[i].item() - sum(others) / 4, abs=1e-6)
    with pytest.raises(ValueError, match="two samples"):
        rloo_advantages(torch.zeros(3), group_size=1)


def test_group_centered_and_batch_standardized():
    adv, _ = group_centered_advantages(torch.tensor([1.0, 3.0, 5.0, 5.0]), group_size=2)
    assert adv.tolist() == [-1.0, 1.0, 0.0, 0.0]
    adv, metrics = batch_standardized_advantages(torch.tensor([0.0, 0.0, 1.0, 3.0]), group_size=2, eps=0.0)
    # mean 1, unbiased std sqrt((1 + 1 + 0 + 4) / 3) = sqrt(2)
    assert adv.tolist() == pytest.approx([-1 / math.sqrt(2), -1 / math.sqrt(2), 0.0, 2 / math.sqrt(2)])
    assert metrics["train/zero_variance_groups"] == 1.0
    assert batch_standardized_advantages(torch.ones(4), group_size=2)[0].tolist() == [0.0] * 4


def test_masked_whiten_ignores_padding_and_uses_given_moments():
    values = torch.tensor([[1.0, 3.0, 99.0], [5.0, 99.0, 99.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    out = masked_whiten(values, mask, eps=0.0)
    # mean 3, unbiased std 2
    close(out, [[-1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    # statistics from another (e.g. the global) batch: sum 30, sum sq 500, count 3 -> mean 10, var 100
    out = masked_whiten(values, mask, torch.tensor([30.0, 500.0, 3.0]), eps=0.0)
    close(out, [[-0.9, -0.7, 0.0], [-0.5, 0.0, 0.0]])


def test_outcome_rewards_sit_on_the_last_token_and_returns_accumulate():
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    rewards = outcome_token_rewards(torch.tensor([2.0, -1.0]), mask)
    assert rewards.tolist() == [[0.0, 0.0, 2.0], [-1.0, 0.0, 0.0]]
    rewards[0, 0] = -0.5  # e.g. a KL penalty on the first token
    assert discounted_returns(rewards, mask, gamma=1.0).tolist() == [[1.5, 2.0, 2.0], [-1.0, 0.0, 0.0]]
    close(discounted_returns(rewards, mask, gamma=0.5), [[0.0, 1.0, 2.0], [-1.0, 0.0, 0.0]])


def gae_loop(rewards, values, length, gamma, lam):
    advantages, running = [0.0] * length, 0.0
    for t in reversed(range(length)):
        next_value = values[t + 1] if t + 1 < length else 0.0
        delta = rewards[t] + gamma * next_value - values[t]
        running = delta + gamma * lam * running
        advantages[t] = running
    return advantages


def test_gae_hand_computed_and_loop():
    rewards = torch.tensor([[0.0, 1.0]])
    values = torch.tensor([[0.5, 0.25]])
    adv, ret = gae_advantages(rewards, values, torch.ones(1, 2), gamma=1.0, lam=0.5)
    # delta_1 = 1 - 0.25 = 0.75; delta_0 = 0 + 0.25 - 0.5 = -0.25; A_0 = -0.25 + 0.5 * 0.75
    close(adv, [[0.125, 0.75]])
    close(ret, [[0.625, 1.0]])
    torch.manual_seed(2)
    lengths = [5, 3, 1, 4]
    mask = torch.tensor([[1.0] * n + [0.0] * (5 - n) for n in lengths])
    rewards, values = torch.randn(4, 5) * mask, torch.randn(4, 5)
    adv, _ = gae_advantages(rewards, values, mask, gamma=0.9, lam=0.8)
    for i, n in enumerate(lengths):
        expected = gae_loop(rewards[i].tolist(), values[i].tolist(), n, 0.9, 0.8)
        assert adv[i, :n].tolist() == pytest.approx(expected, abs=1e-5)
        assert adv[i, n:].abs().sum() == 0


def test_plain_policy_gradient_has_no_ratio():
    logprobs = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    loss, m = policy_loss(logprobs, torch.full((1, 2), -5.0), torch.tensor([2.0]), torch.ones(1, 2), loss_type="pg")
    # -A * mean(log pi) = -2 * -1.5; the (far off-policy) old log-probs play no part
    assert loss.item() == pytest.approx(3.0)
    loss.backward()
    assert logprobs.grad.tolist() == [[-1.0, -1.0]]
    assert m["train/clip_fraction"] == 0.0


def test_dual_clip_bounds_negative_advantage_loss():
    logprobs = torch.log(torch.tensor([[5.0, 0.5]]))
    mask = torch.ones(1, 2)
    # A = -1: ratio 5 gives loss 5 (the clipped 1.2 loses the max); dual-clip c = 3 caps it at 3
    loss, _ = policy_loss(logprobs, torch.zeros(1, 2), torch.tensor([-1.0]), mask)
    assert loss.item() == pytest.approx((5.0 + 0.8) / 2)
    loss, m = policy_loss(logprobs, torch.zeros(1, 2), torch.tensor([-1.0]), mask, dual_clip_c=3.0)
    assert loss.item() == pytest.approx((3.0 + 0.8) / 2)
    assert m["train/clip_fraction"] == 1.0
    # positive advantages are untouched by dual-clip
    assert policy_loss(logprobs, torch.zeros(1, 2), torch.tensor([1.0]), mask, dual_clip_c=3.0)[0].item() == pytest.approx(-(1.2 + 0.5) / 2)


def test_gspo_uses_one_ratio_per_sequence():
    # token log-ratios (log 4, 0) -> sequence ratio exp(mean) = 2, for every token of the sequence
    logprobs = torch.tensor([[math.log(4.0), 0.0], [0.0, 0.0]], requires_grad=True)
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    loss, m = policy_loss(logprobs, torch.zeros(2, 2), torch.tensor([1.0, 1.0]), mask, loss_type="gspo",
                          clip_eps_low=10.0, clip_eps_high=10.0, loss_agg="seq-mean-token-mean")
    assert m["train/ratio_max"] == pytest.approx(2.0) and m["train/ratio_min"] == pytest.approx(1.0)
    assert loss.item() == pytest.approx(-(2.0 + 1.0) / 2)
    loss.backward()
    # d/dlogp_t of -s_i A / 2 (sequence mean of token means): -s_i * A / (2 * n_i) per token
    close(logprobs.grad, [[-0.5, -0.5], [-0.5, 0.0]])
    # clipped: s = 2 beyond 1 + 0.2 for A > 0 -> no gradient from sequence 0
    logprobs.grad = None
    policy_loss(logprobs, torch.zeros(2, 2), torch.tensor([1.0, 1.0]), mask, loss_type="gspo", loss_agg="seq-mean-token-mean")[0].backward()
    assert logprobs.grad[0].tolist() == [0.0, 0.0]


def test_per_token_advantages_and_importance_weights():
    logprobs = torch.zeros(1, 2)
    adv = torch.tensor([[1.0, -3.0]])
    weights = truncated_is_weights(torch.log(torch.tensor([[0.5, 0.9]])), torch.log(torch.tensor([[0.1, 0.9]])), cap=2.0)
    close(weights, [[2.0, 1.0]])  # 5 truncated to 2
    loss, _ = policy_loss(logprobs, logprobs, adv, torch.ones(1, 2), is_weights=weights)
    assert loss.item() == pytest.approx((-1.0 * 2.0 + 3.0 * 1.0) / 2)


def test_global_counts_make_shards_add_up():
    per_token = torch.tensor([[1.0, 2.0], [3.0, 0.0], [5.0, 6.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
    for agg in ("token-mean", "seq-mean-token-mean", "token-sum-norm"):
        whole = aggregate_loss(per_token, mask, agg, 2.0)
        parts = sum(aggregate_loss(per_token[i : i + 1], mask[i : i + 1], agg, 2.0, num_tokens=5.0, num_sequences=3) for i in range(3))
        assert parts.item() == pytest.approx(whole.item()), agg


def test_value_loss_clipped():
    values = torch.tensor([[1.0, 0.0]])
    old = torch.tensor([[0.0, 0.0]])
    returns = torch.tensor([[0.0, 2.0]])
    loss, m = value_loss(values, old, returns, torch.ones(1, 2), clip_eps=0.5)
    # token 0: max((1-0)^2, (0.5-0)^2) = 1; token 1: max(4, 4) = 4 -> 0.5 * mean = 1.25
    assert loss.item() == pytest.approx(1.25)
    assert m["train/value_clip_fraction"] == 0.0
    values = torch.tensor([[0.0, 1.0]])
    loss, m = value_loss(values, old, returns, torch.ones(1, 2), clip_eps=0.5)
    # token 1: unclipped (1-2)^2 = 1, clipped (0.5-2)^2 = 2.25 -> pessimistic 2.25
    assert loss.item() == pytest.approx(0.5 * (0.0 + 2.25) / 2)
    assert m["train/value_clip_fraction"] == 0.5
    assert value_loss(values, old, returns, torch.ones(1, 2), clip_eps=None)[0].item() == pytest.approx(0.5 * 1.0 / 2)


def test_adaptive_kl_controller():
    kl = AdaptiveKLController(coef=0.1, target=0.01, horizon=100)
    # KL 5x the target: error clipped to +0.2, times n_steps / horizon = 0.5
    assert kl.update(0.05, n_steps=50) == pytest.approx(0.1 * 1.1)
    assert kl.update(0.0, n_steps=50) == pytest.approx(0.1 * 1.1 * 0.9)
    assert kl.update(float("nan")) == pytest.approx(0.1 * 1.1 * 0.9)  # no measurement: unchanged


def test_cosine_schedule():
    assert cosine_schedule(0, 10, warmup_steps=2) == 0.5
    assert cosine_schedule(1, 10, warmup_steps=2) == 1.0
    assert cosine_schedule(2, 10, warmup_steps=2) == 1.0
    assert cosine_schedule(6, 10, warmup_steps=2) == pytest.approx(0.5)
    assert cosine_schedule(10, 10, warmup_steps=2, min_ratio=0.1) == pytest.approx(0.1)


def soft_inputs():
    """One sequence of two tokens and a padded third: log pi = [-1, -2], log pi_ref = [-1.5, -1.5]
    (log-ratios [0.5, -0.5]), V = [0.2, 0.4], reward 1 at the last token, alpha = 0.5."""
    logprobs = torch.tensor([[-1.0, -2.0, 0.0]], requires_grad=True)
    values = torch.tensor([[0.2, 0.4, 9.0]], requires_grad=True)
    return logprobs, torch.tensor([[-1.5, -1.5, 0.0]]), values, torch.tensor([1.0]), torch.tensor([[1.0, 1.0, 0.0]])


def test_soft_lambda_values_hand_computed():
    rewards, penalty, values, mask = torch.tensor([[0.0, 1.0, 0.0]]), torch.tensor([[0.25, -0.25, 0.0]]), torch.tensor([[0.2, 0.4, 9.0]]), torch.tensor([[1.0, 1.0, 0.0]])
    # V^l(s_1) = (1 - l) * 0.4 + l * (1 - (-0.25)); V^l(s_2) = 0 (after the last token)
    for lam, expected in ((0.0, 0.4), (0.5, 0.825), (1.0, 1.25)):
        torch.testing.assert_close(soft_lambda_values(rewards, penalty, values, mask, lam), torch.tensor([[expected, 0.0, 0.0]]))


@pytest.mark.parametrize("lam, delta0", [(0.0, 0.05), (1.0, -0.8)])
def test_soft_consistency_loss_hand_computed(lam, delta0):
    """delta_t = alpha * log_ratio_t + V_t - r_t - V^l(s_{t+1}):
    delta_1 = 0.5 * -0.5 + 0.4 - 1 - 0 = -0.85 (the last token); delta_0 = 0.25 + 0.2 - V^l(s_1)."""
    logprobs, ref, values, rewards, mask = soft_inputs()
    loss, metrics = soft_consistency_loss(logprobs, ref, values, rewards, mask, alpha=0.5, lam=lam)
    assert loss.item() == pytest.approx(0.5 * (delta0**2 + 0.85**2) / 2)
    loss.backward()
    # d loss / d log pi_t = alpha * delta_t / N; d loss / d V_t = delta_t / N (the bootstrap is detached)
    torch.testing.assert_close(logprobs.grad, torch.tensor([[0.5 * delta0 / 2, 0.5 * -0.85 / 2, 0.0]]))
    torch.testing.assert_close(values.grad, torch.tensor([[delta0 / 2, -0.85 / 2, 0.0]]))
    assert metrics["train/td_error_abs_mean"] == pytest.approx((abs(delta0) + 0.85) / 2)
    assert metrics["train/soft_q_mean"] == pytest.approx((0.25 + 0.2 - 0.25 + 0.4) / 2)


def test_soft_consistency_is_zero_at_the_soft_optimum():
    """V = the soft value (V_1 = r - alpha * log_ratio_1 = 1.25, V_0 = V_1 - alpha * log_ratio_0 =
    1.0): every residual vanishes, for any lambda."""
    logprobs, ref, _, rewards, mask = soft_inputs()
    values = torch.tensor([[1.0, 1.25, 0.0]])
    for lam in (0.0, 0.7, 1.0):
        loss, _ = soft_consistency_loss(logprobs, ref, values, rewards, mask, alpha=0.5, lam=lam)
        assert loss.item() == pytest.approx(0.0, abs=1e-12)
