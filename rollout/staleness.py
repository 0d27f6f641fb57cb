"""Policy-version bookkeeping between generators and the learner.

Every sample records the policy version that produced it. In synchronous mode
(``max_staleness == 0``) every sample is on-policy; an asynchronous mode lets generators run
ahead by up to ``max_staleness`` versions and drops anything older.
"""

from __future__ import annotations

from rollout.contracts import Sample


def filter_stale(samples: list[Sample], learner_version: int, max_staleness: int) -> tuple[list[Sample], dict[str, float]]:
    """Keep samples at most ``max_staleness`` versions behind the learner; report staleness."""
    lags = [learner_version - s.policy_version for s in samples]
    kept = [s for s, lag in zip(samples, lags) if lag <= max_staleness]
    metrics = {
        "train/staleness_mean": sum(lags) / max(1, len(lags)),
        "train/staleness_max": float(max(lags, default=0)),
        "train/stale_dropped": float(len(samples) - len(kept)),
    }
    return kept, metrics
