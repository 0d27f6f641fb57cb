"""Policy-version bookkeeping between generators and the learner.

Every sample records the policy that produced it. In synchronous mode
(``max_staleness == 0``) every sample is on-policy; an asynchronous mode lets generators run
ahead by up to ``max_staleness`` versions and drops anything older.
"""

from __future__ import annotations

from contracts import PolicyRef, Sample


def filter_stale(samples: list[Sample], learner: PolicyRef, max_staleness: int) -> tuple[list[Sample], dict[str, float]]:
    """Keep samples at most ``max_staleness`` versions behind the learner; report staleness."""
    foreign = [s.policy for s in samples if s.policy.adapter != learner.adapter]
    if foreign:
        raise ValueError(f"samples of {foreign[0]} cannot train {learner}: they belong to another adapter")
    lags = [learner.version - s.policy.version for s in samples]
    kept = [s for s, lag in zip(samples, lags) if lag <= max_staleness]
    metrics = {
        "train/staleness_mean": sum(lags) / max(1, len(lags)),
        "train/staleness_max": float(max(lags, default=0)),
        "train/stale_dropped": float(len(samples) - len(kept)),
    }
    return kept, metrics
