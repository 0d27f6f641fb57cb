"""The rollout queue between the rollout producer and the learner, bounded by staleness.

The producer works on rollout steps 1, 2, ... in order; the learner trains on them in the same
order. The producer may start step ``r`` only once the learner has released step
``r - 1 - run_ahead`` (``release`` is called when a step is completely done, its curriculum
update included). With ``run_ahead == 0`` (synchronous mode) step r's prompts are drawn only
after step r-1 has finished: exactly the synchronous loop. With ``run_ahead == k`` the
generators work on up to k steps beyond the one the learner trains, so a sample is at most k
policy versions old when it is trained on (an in-flight weight update only makes it younger).

A failure in the producer is raised by the learner's next ``get`` (the same exception, with a
note naming the thread), never lost in a thread.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from contracts import Sample, Verdict


class QueueClosed(RuntimeError):
    """The queue was closed (the run is ending) while a caller waited on it."""


@dataclass
class Rollout:
    """One step's verified samples, in prompt order, with where their time went."""

    step: int
    samples: list[Sample]
    verdicts: list[Verdict]
    generate_seconds: float = 0.0  # first chunk submitted -> last chunk generated
    verify_seconds: float = 0.0  # time the producer spent scoring this step's chunks
    metrics: dict[str, float] = field(default_factory=dict)  # the producer's own (dynamic sampling)


class RolloutQueue:
    def __init__(self, run_ahead: int, next_step: int = 1):
        if run_ahead < 0:
            raise ValueError(f"run_ahead must be >= 0, got {run_ahead}")
        self.run_ahead = run_ahead
        self.released = next_step - 1  # the last step the learner has completely finished
        self._ready: dict[int, Rollout] = {}
        self._error: BaseException | None = None
        self._closed = False
        self._cond = threading.Condition()

    # -- the producer's side ----------------------------------------------------------------

    def may_start(self, step: int) -> bool:
        with self._cond:
            return step - 1 - self.run_ahead <= self.released

    def wait_until_released(self, timeout: float) -> None:
        """Sleep until the learner releases a step (or ``timeout`` passes)."""
        with self._cond:
            self._cond.wait(timeout)

    def put(self, rollout: Rollout) -> None:
        with self._cond:
            self._ready[rollout.step] = rollout
            self._cond.notify_all()

    def fail(self, error: BaseException) -> None:
        error.add_note("(raised in the rollout producer thread)")
        with self._cond:
            self._error = error
            self._cond.notify_all()

    # -- the learner's side -----------------------------------------------------------------

    def get(self, step: int, timeout: float | None = None) -> Rollout:
        """Step ``step``'s rollout, waiting for it; re-raises the producer's failure."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while step not in self._ready:
                if self._error is not None:
                    raise self._error  # its own type: the driver tells a lost generator pool from a bug
                if self._closed:
                    raise QueueClosed(f"rollout queue closed while waiting for step {step}")
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError(f"no rollout for step {step} within {timeout}s")
                self._cond.wait(remaining if remaining is not None else 1.0)
            return self._ready.pop(step)

    def release(self, step: int) -> None:
        """The learner has finished ``step``: the producer may run ``run_ahead`` steps past it."""
        with self._cond:
            self.released = max(self.released, step)
            self._cond.notify_all()

    def depth(self) -> int:
        """Steps generated and verified, waiting for the learner."""
        with self._cond:
            return len(self._ready)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
