"""Reward shaping from what the verifier does not see: the completion's length in tokens.

DAPO's soft overlong punishment (Yu et al. 2025, "DAPO", eq. 13): a completion longer than
``max_tokens - buffer`` tokens loses reward linearly, down to ``-factor`` at ``max_tokens``
(where generation stops it). It is added to the verdict's reward and reported as the
``overlong`` component; verdicts of failed verifications are left as they are.
"""

from __future__ import annotations

import dataclasses

from contracts import Sample, Verdict


def overlong_penalty(length: int, max_tokens: int, buffer: int, factor: float = 1.0) -> float:
    """0 up to ``max_tokens - buffer`` tokens, then ``-factor * (length - start) / buffer``,
    at most ``-factor`` (reached at ``max_tokens``)."""
    if buffer <= 0:
        return 0.0
    start = max_tokens - buffer
    return 0.0 if length <= start else -factor * min(1.0, (length - start) / buffer)


def shape_overlong(samples: list[Sample], verdicts: list[Verdict], max_tokens: int, buffer: int, factor: float) -> list[Verdict]:
    """The verdicts with each sample's overlong penalty added (unchanged when ``buffer`` is 0)."""
    if buffer <= 0:
        return verdicts
    shaped = []
    for sample, verdict in zip(samples, verdicts, strict=True):
        if verdict.status == "ok":
            penalty = overlong_penalty(len(sample.completion.token_ids), max_tokens, buffer, factor)
            verdict = dataclasses.replace(verdict, reward=verdict.reward + penalty, components={**verdict.components, "overlong": penalty})
        shaped.append(verdict)
    return shaped
