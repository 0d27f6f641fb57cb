"""The rollout producer: a driver thread that keeps the generators and verifiers busy.

For each rollout step, in order, as soon as the queue lets it start (``RolloutQueue``: no
run-ahead in synchronous mode, up to ``rollout.max_staleness`` steps in asynchronous mode):
1. draw the step's prompts (the driver records the data position before each draw, so a
   checkpoint can re-issue every prompt that was drawn but not yet trained on);
2. submit them to the generator pool (chunks spread over the generators; a chunk whose
   generator dies or hangs is re-issued by the pool, with its seed);
3. score each chunk in the verifier pool as soon as it is generated, while the other chunks
   (and the next steps' chunks) are still being generated;
4. put the step's verified samples, in prompt order, on the queue.

With dynamic sampling (DAPO, ``rollout.dynamic_sampling``), a step whose verified groups hold
fewer informative groups (some reward differs within the group) than it has prompts draws
another ``prompts_per_step`` prompts, up to ``rollout.max_sampling_rounds`` rounds in all; the
informative groups past the step's number are left out, and a step still short after the last
round trains on what it has (``dynamic/shortfall`` counts the groups missing).

The learner thread (``Trainer.step``) takes them in order. Ray calls are thread-safe; the
verifier pool and the task mixture are guarded by locks because an evaluation in the learner
thread uses them too.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from actors.generator import GeneratorPool, Request
from actors.verifier import VerifierPool
from learners.batch import group_indices, informative
from contracts import Prompt, Sample, SamplingSettings, Verdict
from rollout.queue import Rollout, RolloutQueue

logger = logging.getLogger(__name__)


@dataclass
class _Pending:
    """A step whose chunks are still being generated or scored."""

    requests: list[Request]
    started: float
    samples: dict[int, list[Sample]] = field(default_factory=dict)  # chunk -> samples
    verdicts: dict[int, list[Verdict]] = field(default_factory=dict)
    generated: float = 0.0
    verify_seconds: float = 0.0
    rounds: int = 1  # rounds of prompts drawn (dynamic sampling draws more)

    def complete(self) -> bool:
        return len(self.verdicts) == len(self.requests)


class RolloutProducer(threading.Thread):
    """Produces rollout steps ``first_step``..``last_step`` into ``queue``."""

    def __init__(
        self,
        queue: RolloutQueue,
        generators: GeneratorPool,
        verifiers: VerifierPool,
        draw: Callable[[int, int], list[Prompt]],
        sampling: Callable[[int, int], SamplingSettings],
        first_step: int,
        last_step: int,
        shape: Callable[[list[Sample], list[Verdict]], list[Verdict]] | None = None,
        dynamic: DynamicSampling | None = None,
    ):
        """``draw(step, round)`` and ``sampling(step, round)`` give a round's prompts and
        sampling; ``shape`` adjusts each chunk's verdicts (the overlong penalty)."""
        super().__init__(name="rollout-producer", daemon=True)
        self.queue, self.generators, self.verifiers = queue, generators, verifiers
        self.draw, self.sampling, self.shape, self.dynamic = draw, sampling, shape, dynamic
        self.next_step, self.last_step = first_step, last_step
        self.stopping = threading.Event()
        self._pending: dict[int, _Pending] = {}
        self._chunk_of: dict[Request, tuple[int, int]] = {}

    def stop(self, timeout: float = 30.0) -> None:
        self.stopping.set()
        self.join(timeout)
        if self.is_alive():
            logger.warning("the rollout producer did not stop within %.0fs", timeout)

    def run(self) -> None:
        try:
            while not self.stopping.is_set():
                if self.next_step <= self.last_step and self.queue.may_start(self.next_step):
                    self._start(self.next_step)
                    self.next_step += 1
                    continue
                if not self._chunk_of:
                    if self.next_step > self.last_step:
                        return  # every step produced
                    self.queue.wait_until_released(0.2)
                    continue
                self._collect()
        except BaseException as exc:  # noqa: BLE001 - handed to the learner thread
            logger.exception("rollout producer failed")
            self.queue.fail(exc)

    def _start(self, step: int) -> None:
        self._pending[step] = _Pending([], time.time())
        self._submit(step, 0)

    def _submit(self, step: int, round: int) -> None:
        pending = self._pending[step]
        requests = self.generators.submit(self.draw(step, round), self.sampling(step, round))
        for chunk, request in enumerate(requests, start=len(pending.requests)):
            self._chunk_of[request] = (step, chunk)
        pending.requests += requests

    def _collect(self) -> None:
        """Score the chunks that finished; hand every completed step over, in order."""
        for request in self.generators.wait(list(self._chunk_of), timeout=0.2):
            step, chunk = self._chunk_of.pop(request)
            pending = self._pending[step]
            samples = request.samples
            pending.generated = time.time()
            start = time.perf_counter()
            verdicts = self.verifiers.score(samples)
            if self.shape is not None:
                verdicts = self.shape(samples, verdicts)
            pending.verify_seconds += time.perf_counter() - start
            pending.samples[chunk], pending.verdicts[chunk] = samples, verdicts
        for step in sorted(self._pending):
            pending = self._pending[step]
            if not pending.complete():
                break
            order = sorted(pending.samples)
            samples = [s for c in order for s in pending.samples[c]]
            verdicts = [v for c in order for v in pending.verdicts[c]]
            metrics = {}
            if self.dynamic is not None:
                if self.dynamic.wants_more(samples, verdicts, pending.rounds):
                    self._submit(step, pending.rounds)
                    pending.rounds += 1
                    break
                samples, verdicts, metrics = self.dynamic.select(samples, verdicts, pending.rounds)
            del self._pending[step]
            rollout = Rollout(step, samples, verdicts, pending.generated - pending.started, pending.verify_seconds, metrics)
            self.queue.put(rollout)


@dataclass(frozen=True)
class DynamicSampling:
    """DAPO's dynamic sampling (Yu et al. 2025): each step trains on ``groups`` informative
    groups, drawing up to ``max_rounds`` rounds of prompts to find them."""

    groups: int  # informative groups a step wants: rollout.prompts_per_step
    max_rounds: int

    def wants_more(self, samples: list[Sample], verdicts: list[Verdict], rounds: int) -> bool:
        return rounds < self.max_rounds and self._count(samples, verdicts) < self.groups

    def _count(self, samples: list[Sample], verdicts: list[Verdict]) -> int:
        return sum(informative([verdicts[i] for i in group]) for group in group_indices(samples))

    def select(self, samples: list[Sample], verdicts: list[Verdict], rounds: int) -> tuple[list[Sample], list[Verdict], dict[str, float]]:
        """The step's samples less the informative groups past the ``groups``-th; the groups
        with nothing to teach stay for the step's metrics (the batch leaves them out)."""
        groups = group_indices(samples)
        keep, found, surplus = [], 0, 0
        for group in groups:
            if informative([verdicts[i] for i in group]):
                found += 1
                if found > self.groups:
                    surplus += 1
                    continue
            keep += group
        metrics = {
            "dynamic/rounds": float(rounds),
            "dynamic/sampled_groups": float(len(groups)),
            "dynamic/informative_groups": float(min(found, self.groups)),
            "dynamic/surplus_groups": float(surplus),
            "dynamic/shortfall": float(max(0, self.groups - found)),
        }
        return [samples[i] for i in keep], [verdicts[i] for i in keep], metrics
