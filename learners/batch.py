"""Turn verified samples into the learner's TrainBatch: outcome advantages, with masking.

Samples whose verdict is an infrastructure error are masked (left out), never scored 0. A group
with fewer than two valid samples has no baseline and is dropped (except under ``batch-std``
and the token-level estimators, whose baseline is not the group). Groups whose rewards are all
equal carry zero advantage; with ``drop_zero_variance`` they are left out of the batch too
(DAPO's dynamic-sampling filter; ``rollout.dynamic_sampling`` also re-samples prompts until the
step has enough informative groups, see ``cluster.loop.rollouts``), which saves learner compute.

Outcome estimators (GRPO, RLOO, ...) run here, where whole groups are at hand. Token-level
estimators (REINFORCE++, GAE) need the reference model or the critic and run in the learner:
their rows carry advantage 0 here and the reward in ``TrainBatch.rewards``.
"""

from __future__ import annotations

from typing import Callable

import torch

from learners.algorithms import OUTCOME_ESTIMATORS, AdvantageEstimator
from contracts import Sample, TrainBatch, Verdict


def group_indices(samples: list[Sample]) -> list[list[int]]:
    """Indices of samples grouped by prompt: groups are contiguous, each starting at group_index 0."""
    groups: list[list[int]] = []
    for i, sample in enumerate(samples):
        if sample.group_index == 0 or not groups:
            groups.append([])
        groups[-1].append(i)
    return groups


def informative(verdicts: list[Verdict]) -> bool:
    """Whether a group can teach anything: two valid samples at least, not all rewarded alike."""
    rewards = [v.reward for v in verdicts if v.status == "ok"]
    return len(rewards) >= 2 and max(rewards) != min(rewards)


def build_train_batch(
    samples: list[Sample],
    verdicts: list[Verdict],
    estimator: AdvantageEstimator = "grpo",
    drop_zero_variance: bool = False,
    columns: Callable[[list[Sample], list[Verdict], list[float | None]], dict[str, tuple]] | None = None,
) -> tuple[TrainBatch, list[float | None], dict[str, float]]:
    """Returns the batch, each sample's advantage (None where left out), and metrics.
    ``columns(samples, verdicts, advantages)`` gives further fields of the batch, one value
    per trained sample, filled as the batch is built."""
    advantages: list[float | None] = [None] * len(samples)
    masked = dropped_groups = zero_variance = 0
    groups = group_indices(samples)
    # batch-std and the token-level estimators need no group baseline: a lone sample is kept
    smallest = 1 if estimator == "batch-std" or estimator not in OUTCOME_ESTIMATORS else 2
    kept: list[list[int]] = []
    for group in groups:
        valid = [i for i in group if verdicts[i].status == "ok"]
        masked += len(group) - len(valid)
        if len(valid) < smallest:
            dropped_groups += 1
            continue
        rewards = [verdicts[i].reward for i in valid]
        if len(valid) > 1 and max(rewards) == min(rewards):
            zero_variance += 1
            if drop_zero_variance:
                continue
        kept.append(valid)
    if estimator == "batch-std":
        # one baseline and scale for the whole batch
        kept = [[i for group in kept for i in group]] if kept else []
    for rows in kept:
        rewards = torch.tensor([verdicts[i].reward for i in rows])
        if estimator in OUTCOME_ESTIMATORS:
            values = OUTCOME_ESTIMATORS[estimator](rewards, len(rows))[0].tolist()
        else:  # token-level: the learner computes the advantages
            values = [0.0] * len(rows)
        for i, a in zip(rows, values):
            advantages[i] = a
    keep = [i for i, a in enumerate(advantages) if a is not None]
    extra = columns(samples, verdicts, advantages) if columns is not None else {}
    batch = TrainBatch.from_samples([samples[i] for i in keep], [advantages[i] for i in keep], [verdicts[i].reward for i in keep], **extra)
    metrics = {
        "train/zero_variance_groups": float(zero_variance),
        "train/zero_variance_fraction": zero_variance / max(1, len(groups)),
        "train/masked_samples": float(masked),
        "train/dropped_groups": float(dropped_groups),
        "train/batch_size": float(len(keep)),
    }
    return batch, advantages, metrics


def standardisation_scales(samples: list[Sample], verdicts: list[Verdict], advantages: list[float | None], estimator: AdvantageEstimator) -> list[float]:
    """1 / (std + eps) of the rewards each trained sample's advantage was divided by (its
    group's under ``grpo``, the batch's under ``batch-std``, 0 where they were all equal), 1
    for estimators that do not scale: d A_i / d r_i with the mean and std held constant, what
    the Markovian actor reward multiplies the answer log-prob's gradient by. One per sample
    with an advantage, in order."""
    kept = [i for i, a in enumerate(advantages) if a is not None]
    if estimator not in ("grpo", "batch-std"):
        return [1.0] * len(kept)
    pools = [kept] if estimator == "batch-std" else [[i for i in g if advantages[i] is not None] for g in group_indices(samples)]
    scale: dict[int, float] = {}
    for rows in (r for r in pools if r):
        rewards = torch.tensor([verdicts[i].reward for i in rows])
        std = rewards.std(unbiased=True).item() if len(rows) > 1 else 0.0
        scale |= dict.fromkeys(rows, 1.0 / (std + 1e-6) if std > 0 else 0.0)
    return [scale[i] for i in kept]
