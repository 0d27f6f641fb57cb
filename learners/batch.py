"""Turn verified samples into the learner's TrainBatch: outcome advantages, with masking.

Samples whose verdict is an infrastructure error are masked (left out), never scored 0. A group
with fewer than two valid samples has no baseline and is dropped. Groups whose rewards are all
equal carry zero advantage; with ``drop_zero_variance`` they are left out of the batch too
(DAPO's dynamic-sampling filter; ``rollout.dynamic_sampling`` also re-samples prompts until the
step has enough informative groups, see ``cluster.rollouts``), which saves learner compute.

Outcome estimators (GRPO, RLOO, ...) run here, where whole groups are at hand. Token-level
estimators (REINFORCE++, GAE) need the reference model or the critic and run in the learner:
their rows carry advantage 0 here and the reward in ``TrainBatch.rewards``.
"""

from __future__ import annotations

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
) -> tuple[TrainBatch, list[float | None], dict[str, float]]:
    """Returns the batch, each sample's advantage (None where left out), and metrics."""
    advantages: list[float | None] = [None] * len(samples)
    masked = dropped_groups = zero_variance = 0
    groups = group_indices(samples)
    kept: list[list[int]] = []
    for group in groups:
        valid = [i for i in group if verdicts[i].status == "ok"]
        masked += len(group) - len(valid)
        if len(valid) < 2:
            dropped_groups += 1
            continue
        rewards = [verdicts[i].reward for i in valid]
        if max(rewards) == min(rewards):
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
    batch = TrainBatch.from_samples(
        [samples[i] for i in keep], [advantages[i] for i in keep], [verdicts[i].reward for i in keep]
    )
    metrics = {
        "train/zero_variance_groups": float(zero_variance),
        "train/zero_variance_fraction": zero_variance / max(1, len(groups)),
        "train/masked_samples": float(masked),
        "train/dropped_groups": float(dropped_groups),
        "train/batch_size": float(len(keep)),
    }
    return batch, advantages, metrics
