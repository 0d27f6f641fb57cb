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

    def complete(self) -> bool:
        return len(self.verdicts) == len(self.requests)


class RolloutProducer(threading.Thread):
    """Produces rollout steps ``first_step``..``last_step`` into ``queue``."""

    def __init__(
        self,
        queue: RolloutQueue,
        generators: GeneratorPool,
        verifiers: VerifierPool,
        draw: Callable[[int], list[Prompt]],
        sampling: Callable[[int], SamplingSettings],
        first_step: int,
        last_step: int,
    ):
        super().__init__(name="rollout-producer", daemon=True)
        self.queue, self.generators, self.verifiers = queue, generators, verifiers
        self.draw, self.sampling = draw, sampling
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
        prompts = self.draw(step)
        started = time.time()
        requests = self.generators.submit(prompts, self.sampling(step))
        self._pending[step] = _Pending(requests, started)
        for chunk, request in enumerate(requests):
            self._chunk_of[request] = (step, chunk)

    def _collect(self) -> None:
        """Score the chunks that finished; hand every completed step over, in order."""
        for request in self.generators.wait(list(self._chunk_of), timeout=0.2):
            step, chunk = self._chunk_of.pop(request)
            pending = self._pending[step]
            samples = request.samples
            pending.generated = time.time()
            start = time.perf_counter()
            verdicts = self.verifiers.score(samples)
            pending.verify_seconds += time.perf_counter() - start
            pending.samples[chunk], pending.verdicts[chunk] = samples, verdicts
        for step in sorted(self._pending):
            pending = self._pending[step]
            if not pending.complete():
                break
            del self._pending[step]
            order = sorted(pending.samples)
            self.queue.put(
                Rollout(
                    step=step,
                    samples=[s for c in order for s in pending.samples[c]],
                    verdicts=[v for c in order for v in pending.verdicts[c]],
                    generate_seconds=pending.generated - pending.started,
                    verify_seconds=pending.verify_seconds,
                )
            )
