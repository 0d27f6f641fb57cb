"""Generator actors and the generator pool that any driver submits work to.

``GeneratorPool.submit(prompts, sampling, policy)`` returns futures (Ray object refs), one per
chunk of the prompts; chunks go to the generators with the least work outstanding. A weight
update is pushed to every generator without draining the pool: each actor runs its calls in
order, so the update lands between two engine calls; the work already running or queued on a
generator finishes on the old weights and its samples say so (``Sample.policy``).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time

import ray

from contracts import PolicyRef, Prompt, Sample, SamplingSettings
from rollout.generator import Generator

logger = logging.getLogger(__name__)


class WeightSyncError(RuntimeError):
    """A generator did not confirm the new policy in time, or reports another one."""


def generator_actor(num_cpus: float = 1.0, num_gpus: float = 0.0, max_restarts: int = 0):
    """The Ray actor class for a generator, with its resource request (``.options`` may
    replace it, with a placement group bundle).

    A restarted generator re-runs its constructor and serves no policy until it is sent one.
    """
    return ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=max_restarts)(Generator)


@dataclasses.dataclass
class Chunk:
    """One unit of submitted work: which generator runs it, and when it was submitted."""

    rank: int
    submitted: float


class GeneratorPool:
    """N generator actors behind one ``submit``; thread-safe (a rollout thread and the
    evaluation may submit at once)."""

    def __init__(self, handles: list, broadcast_timeout_s: float = 120.0):
        if not handles:
            raise ValueError("a generator pool needs at least one generator")
        self.handles = handles
        self.broadcast_timeout_s = broadcast_timeout_s
        self._lock = threading.Lock()
        self._chunks: dict[ray.ObjectRef, Chunk] = {}
        self._outstanding = [0] * len(handles)
        self._loads: list[tuple[ray.ObjectRef, PolicyRef, float]] = []  # pushed, not yet confirmed: (ref, policy, when)
        # (rank, engine start, engine end) of the latest finished chunks, wall clock
        self.intervals: collections.deque[tuple[int, float, float]] = collections.deque(maxlen=10_000)

    def __len__(self) -> int:
        return len(self.handles)

    def submit(self, prompts: list[Prompt], sampling: SamplingSettings, policy: PolicyRef | None = None) -> list[ray.ObjectRef]:
        """Futures of ``sampling.n`` samples per prompt: the prompts in ``len(self)``
        contiguous chunks (in order), each on the least-loaded generator. A seeded call gives
        chunk k the seed ``seed + k``, whichever generator runs it. ``policy`` names the adapter
        the samples must come from (any version: each sample records its own)."""
        n = len(self.handles)
        size = -(-len(prompts) // n)
        chunks = [prompts[i * size : (i + 1) * size] for i in range(n)]
        refs = []
        with self._lock:
            for k, chunk in enumerate(chunks):
                if not chunk:
                    continue
                rank = min(range(n), key=lambda r: (self._outstanding[r], r))
                seeded = dataclasses.replace(sampling, seed=None if sampling.seed is None else sampling.seed + k)
                ref = self.handles[rank].timed_generate.remote(chunk, seeded, policy.adapter if policy else None)
                self._chunks[ref] = Chunk(rank, time.time())
                self._outstanding[rank] += 1
                refs.append(ref)
        return refs

    def result(self, ref: ray.ObjectRef) -> list[Sample]:
        """The samples of a finished (or, blocking, an unfinished) chunk; records its timing."""
        samples, started, finished = ray.get(ref)
        with self._lock:
            chunk = self._chunks.pop(ref, None)
            if chunk is not None:
                self._outstanding[chunk.rank] -= 1
                self.intervals.append((chunk.rank, started, finished))
        return samples

    def generate(self, prompts: list[Prompt], sampling: SamplingSettings, policy: PolicyRef | None = None) -> list[Sample]:
        """``submit`` and wait: the samples in prompt order."""
        return [sample for ref in self.submit(prompts, sampling, policy) for sample in self.result(ref)]

    def busy_seconds(self, since: float, until: float) -> float:
        """Engine time of all generators inside [since, until] (summed over generators)."""
        with self._lock:
            return sum(max(0.0, min(end, until) - max(start, since)) for _, start, end in self.intervals)

    # -- weights ----------------------------------------------------------------------------

    def push(self, update: ray.ObjectRef, policy: PolicyRef) -> None:
        """Send ``policy``'s weights to every generator, behind the work it already holds;
        does not wait. Earlier pushes that landed are checked now, and one still pending past
        ``broadcast_timeout_s`` fails the run (``confirm`` waits for all)."""
        self.check(wait=False)
        with self._lock:
            now = time.monotonic()
            self._loads += [(g.load_weights.remote(update), policy, now) for g in self.handles]

    def confirm(self) -> None:
        """Wait until every pushed update has landed, or raise WeightSyncError."""
        while self._loads:
            self.check(wait=True)

    def check(self, wait: bool) -> None:
        with self._lock:
            loads, self._loads = self._loads, []
        if not loads:
            return
        refs = [ref for ref, _, _ in loads]
        oldest = min(when for _, _, when in loads)
        timeout = max(0.0, oldest + self.broadcast_timeout_s - time.monotonic()) if wait else 0.0
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout)
        done = set(ready)
        pending = [(ref, policy, when) for ref, policy, when in loads if ref not in done]
        served = {ref: policy for ref, policy in zip(ready, ray.get(ready))}
        wrong = [(str(served[ref]), str(policy)) for ref, policy, _ in loads if ref in done and served[ref] != policy]
        if wrong:
            raise WeightSyncError(f"generators report other policies than were sent (served, sent): {wrong}")
        overdue = [policy for _, policy, when in pending if time.monotonic() - when >= self.broadcast_timeout_s]
        if overdue:
            raise WeightSyncError(
                f"{len(overdue)} generator(s) did not load policy {overdue[0]} within run.broadcast_timeout_s={self.broadcast_timeout_s}s"
            )
        with self._lock:
            self._loads = pending + self._loads

    def sleep(self) -> None:
        """Every generator hands its device memory over (colocated sleep mode), and waits."""
        ray.get([handle.sleep.remote() for handle in self.handles])

    def wake(self) -> None:
        ray.get([handle.wake.remote() for handle in self.handles])

    def broadcast(self, update: ray.ObjectRef, policy: PolicyRef) -> None:
        """Push and wait (synchronous mode, start, resume, rollback)."""
        self.push(update, policy)
        self.confirm()

    def kill(self) -> None:
        for handle in self.handles:
            ray.kill(handle)
