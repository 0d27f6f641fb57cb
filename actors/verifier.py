"""The verifier pool: N Ray actors scoring samples in parallel.

A verifier that dies or hangs is killed, replaced and its chunk retried; if the chunk still
fails, its samples get ``Verdict.infra_error`` (masked out of the advantages), never reward 0.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

import ray
from ray.exceptions import GetTimeoutError, RayActorError

from rollout.contracts import Sample, Verdict

logger = logging.getLogger(__name__)

Scorer = Callable[[str, str], Verdict]


class Verifier:
    """Plain scorer object; ``ray.remote(Verifier)`` is the verifier actor."""

    def __init__(self, scorer: Scorer):
        self.scorer = scorer

    def score(self, items: list[tuple[str, str]]) -> list[Verdict]:
        """Score (completion text, expected answer) pairs."""
        return [self.scorer(completion, answer) for completion, answer in items]


class VerifierPool:
    """Fans scoring out over ``size`` verifier actors, with per-chunk timeout and retries."""

    def __init__(self, scorer: Scorer, size: int = 2, timeout_s: float = 60.0, max_retries: int = 2, num_cpus: float = 0.1):
        self.scorer = scorer
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self._actor_class = ray.remote(num_cpus=num_cpus)(Verifier)
        self.actors = [self._actor_class.remote(scorer) for _ in range(size)]
        self.stats = {"verifier/restarts": 0, "verifier/infra_errors": 0, "verifier/executions": 0}

    def _replace(self, index: int) -> None:
        ray.kill(self.actors[index], no_restart=True)
        self.actors[index] = self._actor_class.remote(self.scorer)
        self.stats["verifier/restarts"] += 1

    def score(self, samples: list[Sample]) -> list[Verdict]:
        items = [(s.completion.text, s.prompt.problem.answer) for s in samples]
        n = len(self.actors)
        chunks = [list(range(i, len(items), n)) for i in range(n)]
        pending = {i: self.actors[i].score.remote([items[j] for j in chunk]) for i, chunk in enumerate(chunks) if chunk}
        verdicts: list[Verdict | None] = [None] * len(items)
        for i, ref in pending.items():
            for j, verdict in zip(chunks[i], self._collect(i, ref, [items[j] for j in chunks[i]])):
                verdicts[j] = verdict
        self.stats["verifier/executions"] += len(items)
        self.stats["verifier/queue_depth"] = len(pending)
        return verdicts  # type: ignore[return-value]

    def _collect(self, index: int, ref, chunk: list[tuple[str, str]]) -> list[Verdict]:
        error = ""
        for attempt in range(self.max_retries + 1):
            start = time.monotonic()
            try:
                return ray.get(ref, timeout=self.timeout_s)
            except (GetTimeoutError, RayActorError) as exc:
                error = f"{type(exc).__name__} after {time.monotonic() - start:.1f}s"
                logger.warning("verifier %d failed (%s), attempt %d: replacing it", index, error, attempt + 1)
                self._replace(index)
                if attempt < self.max_retries:
                    ref = self.actors[index].score.remote(chunk)
        self.stats["verifier/infra_errors"] += len(chunk)
        return [Verdict.infra_error(f"verifier {index}: {error}") for _ in chunk]
