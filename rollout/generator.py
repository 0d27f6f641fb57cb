"""Generator: owns a generation engine, tags every sample with the policy it served.

A plain object; ``actors.generator`` wraps it as the Ray generator actor. It serves in one of
two ways (``EngineSettings.serving``): ``batch``, one blocking engine call per generate call,
in the order they come; or ``stream``, continuous batching on an engine thread
(``rollout.serving.Stream``), where generate calls run side by side and a weight load takes
its place among them by the sequence number the pool gave it (``seq``).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import threading
import time

from contracts import PolicyRef, Prompt, Sample, SamplingSettings, WeightUpdate
from contracts.footprint import peak_rss_gib
from rollout.engines import SLEEP_PARTS, EngineSettings, build_engine
from rollout.serving import Stream

logger = logging.getLogger(__name__)

BASE_POLICY = PolicyRef("base", 0)


class Generator:
    """Serves a policy (or, on an engine that holds several adapters, one version of each of
    several adapters: a shared pool's runs); every sample records which one produced it.

    In colocated sleep mode it hands its device's memory to the learner between rollouts
    (``sleep`` / ``wake``); one started ``asleep`` (a replacement while the others sleep)
    builds its engine only when woken, so it never takes memory the learner holds. ``events``
    records when it started, slept, woke and loaded weights (wall clock): the hand-over's
    order, for diagnosis and tests."""

    def __init__(self, model_path: str, settings: EngineSettings, *, seed: int, max_lora_rank: int, rank: int = 0, asleep: bool = False, partial: bool = False):
        """``partial``: a weight load aborts the sequences running and resumes them on the new
        weights (stream serving only; ``rollout.serving``)."""
        streaming = settings.serving == "stream"
        if streaming and settings.engine != "vllm":
            raise ValueError(f"generator.serving=stream needs generator.engine=vllm, not {settings.engine!r} (only vLLM batches requests as they come)")
        if partial and not streaming:
            raise ValueError("partial rollouts need generator.serving=stream (a batch engine call cannot be interrupted)")
        self.rank = rank
        self.partial = partial
        self._build = functools.partial(build_engine, model_path, settings, seed=seed, max_lora_rank=max_lora_rank)
        self.events: collections.deque[tuple[str, float]] = collections.deque(maxlen=1000)
        self._events_lock = threading.Lock()
        self.policy: PolicyRef | None = None  # the policy loaded last (None: nothing served yet)
        self.policies: dict[str, PolicyRef] = {}  # each adapter's version served
        self.sleeping = set(SLEEP_PARTS) if asleep else set()  # the parts of its memory lent out
        self._stream = Stream(self._version) if streaming else None
        self.engine = None
        if not asleep:
            self._serve(self._start_engine)
        self._record("start asleep" if asleep else "start")

    def _start_engine(self) -> None:
        """Build the engine, on the thread that will drive it: vLLM's CPU worker binds its
        OpenMP threads to the thread that builds it, and its attention kernels check that the
        thread running them has as many."""
        self.engine = self._build()
        if self._stream is not None:
            self._stream.engine = self.engine
            self._stream.mix = getattr(self.engine, "mixes_adapters", True)

    def _version(self, adapter: str | None) -> int:
        policy = self.policy if adapter is None else self.policies.get(adapter)
        return policy.version if policy is not None else -1

    @property
    def asleep(self) -> bool:
        return bool(self.sleeping)

    def _record(self, event: str) -> None:
        with self._events_lock:
            self.events.append((event, time.time()))

    def recorded(self) -> list[tuple[str, float]]:
        """The hand-over events so far: (what, when), in order."""
        with self._events_lock:  # streaming, the engine thread records them
            return list(self.events)

    def _serve(self, fn, seq: int | None = None, idle: bool = True):
        """``fn()`` where the engine may be touched: here (batch serving: calls come one at a
        time), or on the stream's engine thread in ``seq``'s place, once nothing runs."""
        return fn() if self._stream is None else self._stream.run(seq, fn, idle=idle)

    def sleep(self) -> None:
        """Hand the device's memory over (to a colocated learner) until ``wake``."""
        self._serve(self._sleep)

    def _sleep(self) -> None:
        if self.engine is not None and "weights" not in self.sleeping:  # awake, or woken in part
            self.engine.sleep()
        self.sleeping = set(SLEEP_PARTS)
        self._record("sleep")

    def wake(self, parts: tuple[str, ...] = SLEEP_PARTS) -> None:
        """Take the memory back, all of it or ``parts`` of it (the weights before a load, the
        KV cache after it); an engine started asleep is built now, whole."""
        self._serve(lambda: self._wake(parts))

    def _wake(self, parts: tuple[str, ...]) -> None:
        if self.engine is None:
            self._start_engine()
            self.sleeping = set()
        elif woken := tuple(p for p in SLEEP_PARTS if p in parts and p in self.sleeping):
            self.engine.wake(woken)
            self.sleeping -= set(woken)
        self._record("wake" if set(parts) >= set(SLEEP_PARTS) else f"wake {' '.join(parts)}")

    def _awake(self, doing: str, needs: tuple[str, ...] = SLEEP_PARTS) -> None:
        if self.sleeping & set(needs):
            raise RuntimeError(f"generator {self.rank} is asleep (its memory is lent to the learner): wake it before it can {doing}")

    def load_weights(self, update: WeightUpdate, seq: int | None = None, adapter: str | None = None) -> PolicyRef:
        """Serve ``update`` from now on; returns the policy now live. A load that fails part
        way (a streamed update's bucket lost) leaves a mix of two policies' weights: until the
        next load, the generator tags its samples with an unknown version (-1), which the pool
        never accepts as the policy it sent. Streaming, the load waits for the sequences
        running (or, ``partial``, interrupts them: ``rollout.serving``). ``adapter``: serve
        it under that name (a shared pool's name for the run), not the one it carries."""
        if adapter is not None and adapter != update.policy.adapter:
            update = dataclasses.replace(update, policy=PolicyRef(adapter, update.policy.version))
        if self._stream is None:
            return self._load(update)
        return self._stream.load(seq, lambda: self._load(update), partial=self.partial)

    def hold(self, seq: int | None):
        """Streaming: hold call ``seq``'s place while what it runs is fetched (a weight
        update); the place is what ``load_weights`` or ``skip`` then takes as ``seq``."""
        return self._stream.hold(seq) if self._stream is not None else seq

    def skip(self, seq) -> None:
        """Let the calls numbered after ``seq`` go on: call ``seq`` failed before it could
        run (its weight update could not be fetched)."""
        self._serve(lambda: None, seq, idle=False)

    def _load(self, update: WeightUpdate) -> PolicyRef:
        self._awake("load weights", needs=("weights",))
        adapter = update.policy.adapter
        others = sorted(a for a in self.policies if a != adapter)
        if others and not self.engine.multi_adapter:
            raise ValueError(f"generator {self.rank} serves adapter(s) {others} and its engine holds one adapter at a time: "
                             f"a shared pool serves its runs' adapters as LoRAs (generator.adapter_mode=lora, engine vllm)")  # fmt: skip
        try:
            for piece in update.pieces(self._fetch):  # a streamed update: one bucket in memory at a time
                self.engine.load_weights(piece)
                del piece
        except BaseException:
            if adapter in self.policies:
                self.policies[adapter] = dataclasses.replace(self.policies[adapter], version=-1)
            if self.policy is not None and self.policy.adapter == adapter:
                self.policy = dataclasses.replace(self.policy, version=-1)
            raise
        self.policy = self.policies[adapter] = update.policy
        self._record("load weights")
        return self.policy

    def drop_adapter(self, adapter: str, seq: int | None = None) -> None:
        """Stop serving ``adapter`` and free its memory (a shared pool's run that left);
        streaming, once the sequences running have finished."""
        self._serve(lambda: self._drop_adapter(adapter), seq, idle=True)

    def _drop_adapter(self, adapter: str) -> None:
        if self.policies.pop(adapter, None) is not None and self.engine is not None:
            self.engine.remove_adapter(adapter)
        if self.policy is not None and self.policy.adapter == adapter:
            self.policy = next(iter(self.policies.values()), None)
        self._record(f"drop {adapter}")

    def adapters(self) -> dict[str, PolicyRef]:
        """Each adapter served and its version."""
        return dict(self.policies)

    def _fetch(self, bucket) -> dict:
        """A streamed update's bucket: here the tensors themselves (the Ray actor,
        ``actors.generator``, fetches each from the object store)."""
        return bucket

    def serve_base(self) -> PolicyRef:
        """Serve the base model alone (``BASE_POLICY``), e.g. to evaluate the untrained model."""
        return self._serve(self._serve_base)

    def _serve_base(self) -> PolicyRef:
        self._awake("serve the base model")
        self.engine.serve_base()
        self.policy = BASE_POLICY
        return self.policy

    def peak_rss_gib(self) -> float:
        """This process's peak memory (the engine's weights and KV cache included), GiB."""
        return peak_rss_gib()

    def generate(self, prompts: list[Prompt], sampling: SamplingSettings, adapter: str | None = None, seq: int | None = None) -> list[Sample]:
        """``sampling.n`` samples per prompt, each group contiguous, tagged with the live policy
        (which must be of ``adapter``, when one is named). ``adapter == BASE_POLICY.adapter``
        asks for the base model with the adapter off, beside the live policy (a frozen
        model's text); those samples are tagged ``BASE_POLICY``. Streaming, a sample's policy
        is the one live when it started (its tokens' own versions, where a partial rollout's
        load came between them, are in ``Completion.versions``)."""
        return self.timed_generate(prompts, sampling, adapter, seq)[0]

    def _policy_for(self, adapter: str | None) -> PolicyRef:
        """The policy a request for ``adapter`` (None: the one loaded last) is served by now
        (checked)."""
        self._awake("generate")
        if self.policy is None:
            raise RuntimeError(f"generator {self.rank} has no policy loaded yet")
        if adapter == BASE_POLICY.adapter:
            return BASE_POLICY
        policy = self.policy if adapter is None else self.policies.get(adapter)
        if policy is None:
            raise ValueError(f"generator {self.rank} serves {sorted(self.policies) or [str(self.policy)]}, not adapter {adapter!r}")
        return policy

    def timed_generate(self, prompts: list[Prompt], sampling: SamplingSettings, adapter: str | None = None, seq: int | None = None) -> tuple[list[Sample], float, float]:
        """``generate``, with the wall-clock times (``time.time()``) its engine work started and
        finished: what the pool's busy fraction and the overlap checks are measured from
        (streaming, calls overlap: the pool counts their union)."""
        ids = [p.token_ids for p in prompts]
        base = adapter == BASE_POLICY.adapter
        if adapter is None and self.policy is not None:
            adapter = self.policy.adapter  # the one served (its name is kept through loads)
        if self._stream is None:
            started = time.time()
            policy = self._policy_for(adapter)
            outputs = self.engine.generate(ids, sampling, base=base, adapter=None if base else policy.adapter)
        else:
            opening = lambda: (self._policy_for(adapter), time.time())  # noqa: E731
            policy, started, outputs, interrupted = self._stream.generate(seq, ids, sampling, base, opening=opening, adapter=None if base else adapter)
            if interrupted:  # a failed load stopped some of its sequences: neither policy's (the pool reloads and re-issues)
                policy = dataclasses.replace(policy, version=-1)
        samples = [
            Sample(prompt=prompt, completion=completion, policy=policy, group_index=i)
            for prompt, completions in zip(prompts, outputs)
            for i, completion in enumerate(completions)
        ]
        return samples, started, time.time()

    def stream_stats(self) -> dict[str, int]:
        """Streaming: sequences resumed on new weights (partial rollouts), call numbers skipped."""
        return dict(self._stream.stats) if self._stream is not None else {}

    def ping(self) -> PolicyRef | None:
        return self.policy
