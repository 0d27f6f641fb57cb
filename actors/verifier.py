"""The verifier pool: Ray actors scoring samples, sized by the queue, never losing a sample.

Each verifier actor builds its scorer (and, for code, its own sandbox) from a picklable
factory. The pool hands out small jobs of ``samples_per_call`` samples, one job per actor at a
time, and grows between ``min_size`` and ``max_size`` actors with the number of samples waiting.

Failures, and what the sample gets:
- the actor dies, or a job runs past ``timeout_s`` per sample: the actor is killed and replaced,
  and the job's samples are retried one per job (so one hanging sample cannot take others down);
- the scorer reports an infrastructure error (``sandbox_error``): the sample is retried;
- after ``max_retries`` retries the sample keeps ``Verdict.infra_error``: it is masked out of the
  advantages, never scored 0;
- a reward term from outside the project failed on a sample (``rewards.terms``): it has had its
  own retries, so its ``masked`` verdict stands; a ``stop`` verdict (``on_error: stop``) stops
  the run with ``RewardStopError``.

``stats`` holds the pool's metrics: queue depth, executions per second and verdict counts of
the last call, and running totals of restarts, retries and infrastructure errors.
"""

from __future__ import annotations

import collections
import logging
import math
import threading
import time
from dataclasses import dataclass
from typing import Callable

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from rewards.scoring import BatchScorer, Scorer, as_batch
from contracts import Problem, Sample, Verdict
from contracts.footprint import peak_rss_gib

logger = logging.getLogger(__name__)

# builds, in the verifier actor, a per-sample scorer or a judge of batches (``batch = True``)
ScorerFactory = Callable[[], "Scorer | BatchScorer"]


@dataclass(frozen=True)
class VerifierPoolSettings:
    """The pool's size, batching and failure handling (the config's ``verifier`` section)."""

    min_verifiers: int = 1  # verifier actors kept at all times
    max_verifiers: int = 2  # the pool grows toward this with the number of samples waiting
    samples_per_verifier: int = 16  # queue depth per actor before the pool grows
    samples_per_call: int = 4  # samples sent to an actor in one call
    timeout_s: float = 60.0  # per sample; a verifier past it is replaced and the sample retried
    max_retries: int = 2  # then the sample is masked (infra_error), never scored 0
    num_cpus: float = 0.1  # per verifier actor
    startup_s: float = 60.0  # the verifiers must be up by then, or the run stops with the scorer's error
    scale_down_after: int = 3  # calls with a short queue before an extra verifier is let go


class VerifierStartError(RuntimeError):
    """The verifier actors could not build their scorer; the message carries the scorer's error."""


class RewardStopError(RuntimeError):
    """A reward term configured with ``on_error: stop`` failed; the message is its error."""


class Verifier:
    """Plain scorer host; ``ray.remote(Verifier)`` is the verifier actor."""

    def __init__(self, factory: ScorerFactory):
        self.judge = as_batch(factory())

    def ready(self) -> bool:
        return True

    def peak_rss_gib(self) -> float:
        """This actor's peak memory plus its largest sandbox process's, GiB."""
        return peak_rss_gib(children=True)

    def score(self, items: list[tuple[str, Problem]]) -> list[Verdict]:
        """Score (completion text, problem) pairs; a scorer exception is its sample's infra
        error (the judge's, every sample's)."""
        try:
            return self.judge(items)
        except Exception as exc:  # noqa: BLE001 - the job's samples are retried
            logger.exception("judge failed on %d samples", len(items))
            return [Verdict.infra_error(f"judge raised {type(exc).__name__}: {exc}"[:500])] * len(items)


@dataclass
class _Job:
    actor: int
    indices: list[int]
    started: float
    deadline: float


class VerifierPool:
    """Scores samples over ``min_verifiers``..``max_verifiers`` actors; see the module docstring."""

    def __init__(self, factory: ScorerFactory, settings: VerifierPoolSettings = VerifierPoolSettings()):
        s = self.settings = settings
        if not 1 <= s.min_verifiers <= s.max_verifiers:
            raise ValueError(f"verifier pool size needs 1 <= min_verifiers ({s.min_verifiers}) <= max_verifiers ({s.max_verifiers})")
        self.factory = factory
        self._actor_class = ray.remote(num_cpus=s.num_cpus)(Verifier)
        self.actors: list = []
        self._fresh: set[int] = set()  # actors that have not finished a job yet (still starting)
        self._oversized_calls = 0
        self.stats: dict[str, float] = {"verifier/restarts": 0, "verifier/retries": 0, "verifier/infra_errors": 0}
        self._lock = threading.Lock()  # one scoring call at a time (a rollout thread and an evaluation share the pool)
        self._resize(s.min_verifiers)
        self._wait_ready(s.startup_s)

    def _wait_ready(self, timeout_s: float) -> None:
        """Fail at once, with the scorer's own error, if the verifiers cannot start (no sandbox
        on this machine, a bad reward setting): better than masking every sample later."""
        refs = [actor.ready.remote() for actor in self.actors]
        try:
            ray.get(refs, timeout=timeout_s)
        except GetTimeoutError:
            self.kill()
            raise VerifierStartError(f"verifier actors did not start within {timeout_s:.0f}s (is the cluster out of CPUs?)") from None
        except RayActorError as exc:
            self.kill()
            cause = str(exc).strip().splitlines()[-1]  # the scorer's own error, below Ray's traceback
            raise VerifierStartError(f"verifier actors could not start: {cause}") from exc
        self._fresh.clear()

    # -- size -----------------------------------------------------------------------------

    def _start(self, index: int):
        """A new actor for slot ``index``; it counts as starting until its first job returns."""
        self._fresh.add(index)
        return self._actor_class.remote(self.factory)

    def _resize(self, size: int) -> None:
        while len(self.actors) < size:
            self.actors.append(self._start(len(self.actors)))
        while len(self.actors) > size:
            ray.kill(self.actors.pop(), no_restart=True)
            self._fresh.discard(len(self.actors))

    def _desired(self, waiting: int) -> int:
        return max(self.settings.min_verifiers, min(self.settings.max_verifiers, math.ceil(waiting / self.settings.samples_per_verifier)))

    def _replace(self, index: int) -> None:
        ray.kill(self.actors[index], no_restart=True)
        self.actors[index] = self._start(index)
        self.stats["verifier/restarts"] += 1

    # -- scoring --------------------------------------------------------------------------

    def score(self, samples: list[Sample]) -> list[Verdict]:
        return self.score_items([(s.answer_text, s.prompt.problem) for s in samples])

    def score_items(self, items: list[tuple[str, Problem]]) -> list[Verdict]:
        """Verdicts for (completion, problem) pairs, in their order."""
        with self._lock:
            return self._score_items(items)

    def _score_items(self, items: list[tuple[str, Problem]]) -> list[Verdict]:
        start = time.perf_counter()
        desired = self._desired(len(items))
        if desired > len(self.actors):
            logger.info("verifier pool: %d samples waiting, growing from %d to %d actors", len(items), len(self.actors), desired)
            self._resize(desired)
        self._oversized_calls = self._oversized_calls + 1 if desired < len(self.actors) else 0

        verdicts: list[Verdict | None] = [None] * len(items)
        attempts = [0] * len(items)
        per_call = self.settings.samples_per_call
        queue = collections.deque([list(range(i, min(i + per_call, len(items)))) for i in range(0, len(items), per_call)])
        running: dict[ray.ObjectRef, _Job] = {}

        def retry(indices: list[int], error: str, outcome: str = "infra_error") -> None:
            for i in indices:
                attempts[i] += 1
                if attempts[i] <= self.settings.max_retries:
                    self.stats["verifier/retries"] += 1
                    queue.append([i])
                else:
                    self.stats["verifier/infra_errors"] += 1
                    verdicts[i] = Verdict.infra_error(f"{error} (after {self.settings.max_retries} retries)", outcome)

        while queue or running:
            busy = {job.actor for job in running.values()}
            for actor in range(len(self.actors)):
                if queue and actor not in busy:
                    indices = queue.popleft()
                    now = time.monotonic()
                    budget = self.settings.timeout_s * len(indices) + (self.settings.startup_s if actor in self._fresh else 0.0)
                    ref = self.actors[actor].score.remote([items[i] for i in indices])
                    running[ref] = _Job(actor, indices, now, now + budget)
            ready, _ = ray.wait(list(running), num_returns=1, timeout=0.2)
            for ref in ready:
                job = running.pop(ref)
                try:
                    results = ray.get(ref)
                except (RayActorError, RayTaskError) as exc:
                    logger.warning("verifier %d failed (%s): replacing it, retrying %d samples", job.actor, type(exc).__name__, len(job.indices))
                    self._replace(job.actor)
                    retry(job.indices, f"verifier died: {type(exc).__name__}")
                    continue
                self._fresh.discard(job.actor)
                for i, verdict in zip(job.indices, results):
                    if verdict.status == "infra_error":
                        retry([i], verdict.error or "infrastructure error", verdict.outcome)
                    else:
                        verdicts[i] = verdict
            now = time.monotonic()
            for ref, job in list(running.items()):
                if now > job.deadline:
                    running.pop(ref)
                    logger.warning("verifier %d ran past %.0fs on %d samples: replacing it", job.actor, job.deadline - job.started, len(job.indices))
                    self._replace(job.actor)
                    retry(job.indices, f"verifier timed out after {job.deadline - job.started:.0f}s")

        stopped = next((v for v in verdicts if v is not None and v.status == "stop"), None)
        if stopped is not None:
            raise RewardStopError(f"a reward configured to stop the run failed: {stopped.error}")
        if self._oversized_calls >= self.settings.scale_down_after:
            logger.info("verifier pool: shrinking from %d to %d actors", len(self.actors), desired)
            self._resize(desired)
            self._oversized_calls = 0
        self._record(verdicts, len(items), time.perf_counter() - start)  # type: ignore[arg-type]
        return verdicts  # type: ignore[return-value]

    def _record(self, verdicts: list[Verdict], queued: int, seconds: float) -> None:
        counts = collections.Counter(v.outcome for v in verdicts)
        self.stats = {
            **{k: v for k, v in self.stats.items() if not k.startswith("verifier/verdict/")},
            "verifier/queue_depth": float(queued),
            "verifier/size": float(len(self.actors)),
            "verifier/executions_per_second": queued / max(seconds, 1e-9),
            **{f"verifier/verdict/{outcome}": float(n) for outcome, n in sorted(counts.items())},
        }

    def kill(self) -> None:
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self.actors = []
