"""The rollout stream: a run's verified rollouts, step by step (``RolloutStream``), and the
producer thread that keeps the generators and verifiers busy (``RolloutProducer``).

For each rollout step, in order, as soon as the queue lets it start (``RolloutQueue``: no
run-ahead in synchronous mode, up to ``rollout.max_staleness`` steps in asynchronous mode):
1. draw the step's prompts (the stream records the data position before each draw, so a
   checkpoint can re-issue every prompt that was drawn but not yet trained on);
2. submit them to the generator pool (chunks spread over the generators; a chunk whose
   generator dies or hangs is re-issued by the pool, with its seed), or start them as
   multi-turn episodes (``EpisodeSource``, with an environment);
3. score each chunk in the verifier pool as soon as it is generated (or its episodes are
   over), while the other chunks (and the next steps' chunks) are still being generated;
4. put the step's verified samples, in prompt order, on the queue.

With dynamic sampling (DAPO, ``rollout.dynamic_sampling``), a step whose verified groups hold
fewer informative groups (some reward differs within the group) than it has prompts draws
another ``prompts_per_step`` prompts, up to ``rollout.max_sampling_rounds`` rounds in all; the
informative groups past the step's number are left out, and a step still short after the last
round trains on what it has (``dynamic/shortfall`` counts the groups missing).

The learner thread (``Trainer.step``) takes them in order (``RolloutStream.rollout``). Ray
calls are thread-safe; the verifier pool and the task mixture are guarded by locks because an
evaluation and the curricula in the learner thread use them too.

A run is reproducible step by step: each step's sampling seed is a function of the run's seed
and the step (``step_seed``), and the stream records the data position before each step's
prompts, so a run resumed from a checkpoint draws and samples exactly what the uninterrupted
run would have.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

from actors.generator import GeneratorPool, Request
from actors.verifier import VerifierPool
from cluster.config import SEEDS_PER_STEP, Config
from cluster.loop.episodes import EpisodeBatch, EpisodeRunner
from cluster.stages import Crew, Prompts
from learners.batch import group_indices, informative
from contracts import Prompt, Sample, SamplingSettings, Verdict
from rewards.shaping import shape_overlong
from rollout.queue import Rollout, RolloutQueue
from rollout.tasks import TaskMixture

logger = logging.getLogger(__name__)


def step_seed(run_seed: int, step: int) -> int:
    """The sampler's seed for ``step``: the same in every run of this seed, resumed or not."""
    return (run_seed * 1_000_003 + step) % 2**31 * SEEDS_PER_STEP


class RolloutStream:
    """Verified rollouts of steps in order, produced up to ``run_ahead`` steps ahead of the
    step being learned (``rollout.max_staleness`` in async mode, 0 in sync mode): the queue,
    its producer, each step's prompts and seeds, and the data positions a checkpoint reads."""

    def __init__(self, config: Config, tasks: TaskMixture, prompts: Prompts, crew: Crew):
        ro = config.rollout
        self.tasks, self.prompts, self.crew = tasks, prompts, crew
        self.prompts_per_step, self.run_seed, self.chunks = ro.prompts_per_step, config.run.seed, config.generator.num_generators
        self.run_ahead = ro.max_staleness if ro.mode == "async" else 0
        r = config.reward
        # the overlong penalty (DAPO's soft punishment of completions near the budget), if any
        self.shape = functools.partial(shape_overlong, max_tokens=ro.max_tokens, buffer=r.overlong_buffer, factor=r.overlong_penalty) if r.overlong_buffer > 0 else None
        self.dynamic = DynamicSampling(ro.prompts_per_step, ro.max_sampling_rounds) if ro.dynamic_sampling else None
        self.last_step = config.run.steps
        self.queue: RolloutQueue | None = None
        self.producer: RolloutProducer | None = None
        self._next_step = 0  # the step the learner takes next, if it goes on in order
        self.positions: dict[int, dict] = {}  # step -> data position before its prompts were drawn
        self._data_lock = threading.Lock()

    def run_to(self, last_step: int) -> None:
        self.last_step = last_step

    # -- what the producer asks, in step order ----------------------------------------------

    def draw(self, step: int, round: int = 0) -> list[Prompt]:
        """Step ``step``'s prompts (of its ``round``-th round with dynamic sampling), recording
        the data position before its first round."""
        with self._data_lock:
            if round == 0:
                self.positions[step] = self.tasks.state()
            return self.prompts.render(self.tasks.sample(self.prompts_per_step))

    def sampling(self, step: int, round: int = 0) -> SamplingSettings:
        """A round's sampling: its chunks' seeds (one per generator) follow the last round's."""
        return dataclasses.replace(self.prompts.sampling, seed=step_seed(self.run_seed, step) + round * self.chunks)

    # -- what the learner thread asks -------------------------------------------------------

    def rollout(self, step: int) -> Rollout:
        """Step ``step``'s verified samples. Everything before ``step`` is done (its
        evaluation, monitor and checkpoint too), so the producer may run ``run_ahead`` steps
        past it; a step out of the producer's order (a first step, a resumed run) restarts it."""
        if self.producer is None or step != self._next_step or self.producer.last_step < self.last_step:
            self.last_step = max(self.last_step, step)
            self._start(step)
        self._next_step = step + 1
        with self._data_lock:
            for done in [s for s in self.positions if s < step]:
                del self.positions[done]
        self.queue.release(step - 1)
        return self.queue.get(step)

    def _start(self, first_step: int) -> None:
        """The queue and its producer thread, from ``first_step`` to ``last_step``."""
        self.stop()
        self.queue = RolloutQueue(self.run_ahead, next_step=first_step)
        self.producer = RolloutProducer(self.queue, self.source(), self.draw, self.sampling, first_step, self.last_step, shape=self.shape, dynamic=self.dynamic)
        self.producer.start()

    def source(self) -> SampleSource:
        """Where the producer's scored samples come from: episodes where the prompts are an
        environment's, single completions otherwise."""
        runner = getattr(self.prompts, "runner", None)
        return EpisodeSource(runner.fresh()) if runner is not None else Completions(self.crew.generators, self.crew.verifiers)

    def stop(self) -> None:
        if self.producer is not None:
            self.queue.close()
            self.producer.stop()
            self.producer = None
        self.positions.clear()

    def depth(self) -> int:
        """Rollout steps produced and waiting for the learner."""
        return self.queue.depth() if self.queue is not None else 0

    def update_curricula(self, accuracy: dict[str, float]) -> dict[str, float]:
        """Each task's curriculum after a step's accuracy (the producer draws meanwhile)."""
        with self._data_lock:
            return self.tasks.update_curricula(accuracy)

    # -- what a checkpoint reads and restores -----------------------------------------------

    def position_after(self, step: int) -> dict:
        """Where the data stream continues after ``step``: before the first prompts not yet
        trained on (those the producer drew ahead are drawn again after a resume)."""
        with self._data_lock:
            return self.positions.get(step + 1) or self.tasks.state()

    def seek(self, position: dict) -> None:
        """Continue the data stream from ``position`` (the producer is stopped)."""
        with self._data_lock:
            self.tasks.load_state(position)


class SampleSource(Protocol):
    """How the producer turns a round's prompts into scored samples: ``start`` sends them
    (handles, one per chunk), ``finished`` hands back the chunks done among ``handles`` with
    their samples, verdicts and scoring seconds, waiting up to ``timeout`` for one."""

    def start(self, prompts: list[Prompt], sampling: SamplingSettings) -> list[object]: ...

    def finished(self, handles: list[object], timeout: float) -> list[tuple[object, list[Sample], list[Verdict], float]]: ...

    def close(self) -> None:
        """The producer stopped: drop what is still in flight."""
        ...


@dataclass(frozen=True)
class Completions:
    """One completion per sample: chunks spread over the generators (a chunk whose generator
    dies or hangs is re-issued by the pool, with its seed), each scored in the verifier pool
    as soon as it is generated."""

    generators: GeneratorPool
    verifiers: VerifierPool

    def start(self, prompts: list[Prompt], sampling: SamplingSettings) -> list[Request]:
        return self.generators.submit(prompts, sampling)

    def finished(self, handles: list[Request], timeout: float) -> list[tuple[Request, list[Sample], list[Verdict], float]]:
        done = []
        for request in self.generators.wait(handles, timeout=timeout):
            start = time.perf_counter()
            verdicts = self.verifiers.score(request.samples)
            done.append((request, request.samples, verdicts, time.perf_counter() - start))
        return done

    def close(self) -> None:
        pass  # the pool's calls finish on their own; their samples are not collected


@dataclass(frozen=True)
class EpisodeSource:
    """Multi-turn episodes (``cluster.loop.episodes``): a round's prompts are one batch of
    episodes, handed back scored once every episode in it is over."""

    runner: EpisodeRunner

    def start(self, prompts: list[Prompt], sampling: SamplingSettings) -> list[EpisodeBatch]:
        return [self.runner.start(prompts, sampling)]

    def finished(self, handles: list[EpisodeBatch], timeout: float) -> list[tuple[EpisodeBatch, list[Sample], list[Verdict], float]]:
        over = set(self.runner.advance(timeout))
        return [(batch, batch.samples, batch.verdicts, batch.verify_seconds) for batch in handles if batch in over]

    def close(self) -> None:
        self.runner.close()


@dataclass
class _Pending:
    """A step whose chunks are still being generated or scored."""

    requests: list[object]
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
        source: SampleSource,
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
        self.queue, self.source = queue, source
        self.draw, self.sampling, self.shape, self.dynamic = draw, sampling, shape, dynamic
        self.next_step, self.last_step = first_step, last_step
        self.stopping = threading.Event()
        self._pending: dict[int, _Pending] = {}
        self._chunk_of: dict[object, tuple[int, int]] = {}

    def stop(self, timeout: float = 30.0) -> None:
        self.stopping.set()
        self.join(timeout)
        if self.is_alive():
            logger.warning("the rollout producer did not stop within %.0fs", timeout)
        self.source.close()

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
        requests = self.source.start(self.draw(step, round), self.sampling(step, round))
        for chunk, request in enumerate(requests, start=len(pending.requests)):
            self._chunk_of[request] = (step, chunk)
        pending.requests += requests

    def _collect(self) -> None:
        """Score the chunks that finished; hand every completed step over, in order."""
        for request, samples, verdicts, verify_seconds in self.source.finished(list(self._chunk_of), timeout=0.2):
            step, chunk = self._chunk_of.pop(request)
            pending = self._pending[step]
            pending.generated = time.time() - verify_seconds
            if self.shape is not None:
                verdicts = self.shape(samples, verdicts)
            pending.verify_seconds += verify_seconds
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
