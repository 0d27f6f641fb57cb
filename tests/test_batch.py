"""Building the learner's batch: group advantages, masking of verifier failures, staleness."""

import pytest

from learners.batch import build_train_batch, group_indices, standardisation_scales
from contracts import Completion, PolicyRef, Problem, Prompt, Sample, Verdict
from rollout.staleness import filter_stale


def make_samples(rewards_per_group, version=0):
    samples, verdicts = [], []
    for g, rewards in enumerate(rewards_per_group):
        prompt = Prompt(Problem(uid=f"p{g}", question="q", answer="1"), text="q", token_ids=(1, 2))
        for i, r in enumerate(rewards):
            completion = Completion(token_ids=(3, 4 + i), text=str(r), logprobs=(-0.1, -0.2), finish_reason="stop")
            samples.append(Sample(prompt, completion, policy=PolicyRef(version=version), group_index=i))
            verdicts.append(Verdict.infra_error("boom") if r is None else Verdict(reward=r, correct=r > 0))
    return samples, verdicts


def test_groups_are_contiguous_runs():
    samples, _ = make_samples([[1, 0], [1, 1, 0]])
    assert group_indices(samples) == [[0, 1], [2, 3, 4]]


def test_advantages_per_group():
    samples, verdicts = make_samples([[1.0, 0.0], [2.0, 2.0]])
    batch, advantages, metrics = build_train_batch(samples, verdicts)
    # mean 0.5, unbiased std sqrt(0.5): A = +-0.5 / sqrt(0.5) (eps = 1e-6)
    assert advantages[:2] == pytest.approx([2**-0.5, -(2**-0.5)], rel=1e-5)
    assert advantages[2:] == [0.0, 0.0]
    assert len(batch) == 4 and metrics["train/zero_variance_groups"] == 1.0


def test_zero_variance_groups_can_be_dropped():
    samples, verdicts = make_samples([[1.0, 0.0], [2.0, 2.0]])
    batch, advantages, _ = build_train_batch(samples, verdicts, drop_zero_variance=True)
    assert len(batch) == 2 and advantages[2:] == [None, None]


def test_infra_errors_are_masked_not_scored_zero():
    # group 0: one verifier failure among three -> advantages from the two valid rewards only
    samples, verdicts = make_samples([[1.0, None, 0.0], [None, 1.0]])
    batch, advantages, metrics = build_train_batch(samples, verdicts)
    assert advantages[1] is None
    assert advantages[0] > 0 > advantages[2]
    # group 1 has one valid sample left: no baseline, dropped
    assert advantages[3:] == [None, None]
    assert metrics["train/masked_samples"] == 2.0 and metrics["train/dropped_groups"] == 1.0
    assert len(batch) == 2
    assert batch.old_logprobs[0] == (-0.1, -0.2)


def test_batch_std_keeps_lone_samples_and_standardises_over_the_batch():
    # group size 1 (the Markovian recipes without parallel sampling): no group baseline needed
    samples, verdicts = make_samples([[1.0], [3.0], [None]])
    batch, advantages, metrics = build_train_batch(samples, verdicts, "batch-std", drop_zero_variance=True)
    # mean 2, unbiased std sqrt(2): A = -+1 / sqrt(2)
    assert advantages[:2] == pytest.approx([-(2**-0.5), 2**-0.5], rel=1e-5)
    assert advantages[2] is None and len(batch) == 2
    assert metrics["train/zero_variance_groups"] == 0.0 and metrics["train/dropped_groups"] == 1.0


@pytest.mark.parametrize("estimator", ["grpo", "batch-std", "rloo"])
def test_standardisation_scales_are_the_advantage_per_unit_of_reward(estimator):
    """d A_i / d r_i with mean and std held fixed: A_i = (r_i - mean) * scale_i."""
    samples, verdicts = make_samples([[1.0, 0.0, 4.0], [2.0, 2.0], [None, 5.0, 1.0]])
    _, advantages, _ = build_train_batch(samples, verdicts, estimator)
    scales = standardisation_scales(samples, verdicts, advantages, estimator)
    kept = [i for i, a in enumerate(advantages) if a is not None]
    assert len(scales) == len(kept) == 7
    if estimator == "rloo":
        assert scales == [1.0] * 7
        return
    pools = [kept] if estimator == "batch-std" else [[0, 1, 2], [3, 4], [6, 7]]
    for pool in pools:
        rewards = [verdicts[i].reward for i in pool]
        mean = sum(rewards) / len(rewards)
        for i in pool:
            scale = scales[kept.index(i)]
            if max(rewards) == min(rewards):  # an all-equal group: no advantage, no weight
                assert scale == 0.0 and advantages[i] == 0.0
            else:
                assert advantages[i] == pytest.approx((verdicts[i].reward - mean) * scale, rel=1e-5)


def test_filter_stale():
    old, old_verdicts = make_samples([[1, 0]], version=3)
    new, new_verdicts = make_samples([[0, 1]], version=5)
    kept, verdicts, metrics = filter_stale(old + new, old_verdicts + new_verdicts, PolicyRef(version=5), max_staleness=1)
    assert kept == new and verdicts == new_verdicts
    assert metrics["train/stale_dropped"] == 2.0 and metrics["train/staleness_max"] == 2.0
    assert (metrics["train/staleness/0"], metrics["train/staleness/2"]) == (2.0, 2.0) and "train/staleness/1" not in metrics
    kept, _, metrics = filter_stale(new, new_verdicts, PolicyRef(version=5), max_staleness=0)
    assert kept == new and metrics["train/staleness_mean"] == 0.0
    with pytest.raises(ValueError, match="another adapter"):
        filter_stale(new, new_verdicts, PolicyRef("other", 5), max_staleness=0)


# -- DAPO: the overlong penalty and dynamic sampling -------------------------------------------


def test_overlong_penalty_hand_computed():
    """DAPO eq. 13 with L_max = 64, L_cache = 16: free up to 48 tokens, then linear to -1 at 64."""
    from rewards.shaping import overlong_penalty

    assert [overlong_penalty(n, 64, 16) for n in (10, 48, 56, 64, 80)] == [0.0, 0.0, -0.5, -1.0, -1.0]
    assert overlong_penalty(60, 64, 16, factor=0.5) == pytest.approx(-0.375)
    assert overlong_penalty(64, 64, 0) == 0.0  # buffer 0: off


def test_overlong_shaping_adds_a_component_and_leaves_failed_verifications_alone():
    from rewards.shaping import shape_overlong

    samples, verdicts = make_samples([[1.0, None]])  # completions of 2 tokens
    shaped = shape_overlong(samples, verdicts, max_tokens=3, buffer=2, factor=1.0)
    assert shaped[0].reward == pytest.approx(0.5) and shaped[0].components["overlong"] == pytest.approx(-0.5)
    assert shaped[1] is verdicts[1]
    assert shape_overlong(samples, verdicts, 3, 0, 1.0) is verdicts


def test_dynamic_sampling_asks_for_rounds_until_enough_informative_groups():
    from cluster.loop.rollouts import DynamicSampling

    dynamic = DynamicSampling(groups=2, max_rounds=3)
    samples, verdicts = make_samples([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]])  # one informative group of three
    assert dynamic.wants_more(samples, verdicts, rounds=1) and dynamic.wants_more(samples, verdicts, rounds=2)
    assert not dynamic.wants_more(samples, verdicts, rounds=3)  # the cap
    kept, kept_verdicts, metrics = dynamic.select(samples, verdicts, rounds=3)
    assert len(kept) == 6 and kept_verdicts == verdicts  # nothing surplus; uninformative groups stay for metrics
    assert metrics == {"dynamic/rounds": 3.0, "dynamic/sampled_groups": 3.0, "dynamic/informative_groups": 1.0,
                       "dynamic/surplus_groups": 0.0, "dynamic/shortfall": 1.0}  # fmt: skip


def test_dynamic_sampling_leaves_out_informative_groups_past_the_steps_number():
    from cluster.loop.rollouts import DynamicSampling

    dynamic = DynamicSampling(groups=2, max_rounds=3)
    samples, verdicts = make_samples([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0], [3.0, 0.0]])
    assert not dynamic.wants_more(samples, verdicts, rounds=1)
    kept, _, metrics = dynamic.select(samples, verdicts, rounds=1)
    assert [s.prompt.problem.uid for s in kept] == ["p0", "p0", "p1", "p1", "p2", "p2"]
    assert metrics["dynamic/surplus_groups"] == 1.0 and metrics["dynamic/shortfall"] == 0.0
    batch, _, _ = build_train_batch(kept, verdicts[:6], drop_zero_variance=True)
    assert len(batch) == 4  # the two informative groups


def test_the_masked_share_is_a_metric_of_the_step_and_of_each_task():
    """What the monitor's ``masked_share`` rule reads: the share of samples whose verdict is an
    infrastructure error, over the step and per task."""
    import dataclasses

    from cluster.observe.samples import sample_metrics, task_metrics

    samples, verdicts = make_samples([[1.0, None, 0.0, None], [None, 1.0]])
    tasks = ["code", "code", "code", "code", "infix", "infix"]
    samples = [dataclasses.replace(s, prompt=dataclasses.replace(s.prompt, problem=dataclasses.replace(s.prompt.problem, task=t))) for s, t in zip(samples, tasks)]
    assert sample_metrics(samples, verdicts, "train")["train/masked_share"] == pytest.approx(3 / 6)
    by_task = task_metrics(samples, verdicts, "train")
    assert by_task["train/code/masked_share"] == pytest.approx(2 / 4) and by_task["train/infix/masked_share"] == pytest.approx(1 / 2)
    assert sample_metrics(samples[:1], verdicts[:1], "eval")["eval/masked_share"] == 0.0
