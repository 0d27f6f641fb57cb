"""Policy-version bookkeeping between generators and the learner.

Every sample records the policy that produced it. In synchronous mode every sample is
on-policy (lag 0); in asynchronous mode the generators run ahead by up to ``max_staleness``
versions, and anything older (possible after a rollback, which serves old weights as a new
version) is dropped and counted, never trained on. A sample's policy is its oldest token's
(a partial rollout's tokens, or an episode's turns, may come from several versions:
``Completion.versions``), so the bound holds for every token.
"""

from __future__ import annotations

import collections

from contracts import PolicyRef, Sample, Verdict


def filter_stale(
    samples: list[Sample], verdicts: list[Verdict], learner: PolicyRef, max_staleness: int
) -> tuple[list[Sample], list[Verdict], dict[str, float]]:
    """Keep samples (and their verdicts) at most ``max_staleness`` versions behind the
    learner; report the lags: mean, max, dropped, a histogram ``train/staleness/<lag>``, and of
    those kept, the samples with tokens of another version than their own
    (``train/multi_version_samples``) and the mean lag of the tokens trained on."""
    foreign = [s.policy for s in samples if s.policy.adapter != learner.adapter]
    if foreign:
        raise ValueError(f"samples of {foreign[0]} cannot train {learner}: they belong to another adapter")
    lags = [learner.version - s.policy.version for s in samples]
    kept = [i for i, lag in enumerate(lags) if lag <= max_staleness]
    metrics = {
        "train/staleness_mean": sum(lags) / max(1, len(lags)),
        "train/staleness_max": float(max(lags, default=0)),
        "train/stale_dropped": float(len(samples) - len(kept)),
        **{f"train/staleness/{lag}": float(n) for lag, n in sorted(collections.Counter(lags).items())},
    }
    token_lags = [learner.version - v for i in kept for v in _trained_versions(samples[i])]
    metrics["train/multi_version_samples"] = float(sum(1 for i in kept if samples[i].completion.versions))
    metrics["train/token_staleness_mean"] = sum(token_lags) / max(1, len(token_lags))
    return [samples[i] for i in kept], [verdicts[i] for i in kept], metrics


def _trained_versions(sample: Sample) -> list[int]:
    """The policy version of each token the learner trains on (an episode's observations out)."""
    versions = sample.completion.versions or (sample.policy.version,) * len(sample.completion.token_ids)
    if sample.episode is None or not sample.episode.loss_mask:
        return list(versions)
    return [v for v, m in zip(versions, sample.episode.loss_mask) if m]
