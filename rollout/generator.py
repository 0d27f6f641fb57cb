"""Generator: owns a generation engine, tags every sample with the policy it served.

A plain object; ``actors.generator`` wraps it as the Ray generator actor.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import time

from contracts import PolicyRef, Prompt, Sample, SamplingSettings, WeightUpdate
from contracts.footprint import peak_rss_gib
from rollout.engines import SLEEP_PARTS, EngineSettings, build_engine

logger = logging.getLogger(__name__)

BASE_POLICY = PolicyRef("base", 0)


class Generator:
    """Serves one policy at a time; every sample records which one produced it.

    In colocated sleep mode it hands its device's memory to the learner between rollouts
    (``sleep`` / ``wake``); one started ``asleep`` (a replacement while the others sleep)
    builds its engine only when woken, so it never takes memory the learner holds. ``events``
    records when it started, slept, woke and loaded weights (wall clock): the hand-over's
    order, for diagnosis and tests."""

    def __init__(self, model_path: str, settings: EngineSettings, *, seed: int, max_lora_rank: int, rank: int = 0, asleep: bool = False):
        self.rank = rank
        self._build = functools.partial(build_engine, model_path, settings, seed=seed, max_lora_rank=max_lora_rank)
        self.events: collections.deque[tuple[str, float]] = collections.deque(maxlen=1000)
        self.engine = None if asleep else self._build()
        self._record("start asleep" if asleep else "start")
        self.policy: PolicyRef | None = None  # nothing served yet
        self.sleeping = set(SLEEP_PARTS) if asleep else set()  # the parts of its memory lent out

    @property
    def asleep(self) -> bool:
        return bool(self.sleeping)

    def _record(self, event: str) -> None:
        self.events.append((event, time.time()))

    def recorded(self) -> list[tuple[str, float]]:
        """The hand-over events so far: (what, when), in order."""
        return list(self.events)

    def sleep(self) -> None:
        """Hand the device's memory over (to a colocated learner) until ``wake``."""
        if self.engine is not None and "weights" not in self.sleeping:  # awake, or woken in part
            self.engine.sleep()
        self.sleeping = set(SLEEP_PARTS)
        self._record("sleep")

    def wake(self, parts: tuple[str, ...] = SLEEP_PARTS) -> None:
        """Take the memory back, all of it or ``parts`` of it (the weights before a load, the
        KV cache after it); an engine started asleep is built now, whole."""
        if self.engine is None:
            self.engine = self._build()
            self.sleeping = set()
        elif woken := tuple(p for p in SLEEP_PARTS if p in parts and p in self.sleeping):
            self.engine.wake(woken)
            self.sleeping -= set(woken)
        self._record("wake" if set(parts) >= set(SLEEP_PARTS) else f"wake {' '.join(parts)}")

    def _awake(self, doing: str, needs: tuple[str, ...] = SLEEP_PARTS) -> None:
        if self.sleeping & set(needs):
            raise RuntimeError(f"generator {self.rank} is asleep (its memory is lent to the learner): wake it before it can {doing}")

    def load_weights(self, update: WeightUpdate) -> PolicyRef:
        """Serve ``update`` from now on; returns the policy now live. A load that fails part
        way (a streamed update's bucket lost) leaves a mix of two policies' weights: until the
        next load, the generator tags its samples with an unknown version (-1), which the pool
        never accepts as the policy it sent."""
        self._awake("load weights", needs=("weights",))
        try:
            for piece in update.pieces(self._fetch):  # a streamed update: one bucket in memory at a time
                self.engine.load_weights(piece)
                del piece
        except BaseException:
            if self.policy is not None:
                self.policy = dataclasses.replace(self.policy, version=-1)
            raise
        self.policy = update.policy
        self._record("load weights")
        return self.policy

    def _fetch(self, bucket) -> dict:
        """A streamed update's bucket: here the tensors themselves (the Ray actor,
        ``actors.generator``, fetches each from the object store)."""
        return bucket

    def serve_base(self) -> PolicyRef:
        """Serve the base model alone (``BASE_POLICY``), e.g. to evaluate the untrained model."""
        self._awake("serve the base model")
        self.engine.serve_base()
        self.policy = BASE_POLICY
        return self.policy

    def peak_rss_gib(self) -> float:
        """This process's peak memory (the engine's weights and KV cache included), GiB."""
        return peak_rss_gib()

    def generate(self, prompts: list[Prompt], sampling: SamplingSettings, adapter: str | None = None) -> list[Sample]:
        """``sampling.n`` samples per prompt, each group contiguous, tagged with the live policy
        (which must be of ``adapter``, when one is named). ``adapter == BASE_POLICY.adapter``
        asks for the base model with the adapter off, beside the live policy (a frozen
        model's text); those samples are tagged ``BASE_POLICY``."""
        self._awake("generate")
        if self.policy is None:
            raise RuntimeError(f"generator {self.rank} has no policy loaded yet")
        base = adapter == BASE_POLICY.adapter
        policy = BASE_POLICY if base else self.policy
        if adapter is not None and policy.adapter != adapter:
            raise ValueError(f"generator {self.rank} serves {policy}, not adapter {adapter!r}")
        outputs = self.engine.generate([p.token_ids for p in prompts], sampling, base=base)
        return [
            Sample(prompt=prompt, completion=completion, policy=policy, group_index=i)
            for prompt, completions in zip(prompts, outputs)
            for i, completion in enumerate(completions)
        ]

    def timed_generate(self, prompts: list[Prompt], sampling: SamplingSettings, adapter: str | None = None) -> tuple[list[Sample], float, float]:
        """``generate``, with the wall-clock times (``time.time()``) the engine started and
        finished: what the pool's busy fraction and the overlap checks are measured from."""
        started = time.time()
        samples = self.generate(prompts, sampling, adapter)
        return samples, started, time.time()

    def ping(self) -> PolicyRef | None:
        return self.policy
