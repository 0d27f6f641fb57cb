"""Generator actors and the generator pool that any driver submits work to.

``GeneratorPool.submit(prompts, sampling, policy)`` returns ``Request`` objects, one per chunk
of the prompts; chunks go to the generators with the least work outstanding, and ``wait`` /
``result`` hand the samples back. A weight update is pushed to every generator without
draining the pool: each actor runs its calls in order, so the update lands between two engine
calls; the work already running or queued on a generator finishes on the old weights and its
samples say so (``Sample.policy``).

The pool keeps the run going when a generator fails (``GeneratorPoolSettings``):

- a generator that dies (its process killed, its node lost), hangs past ``call_timeout_s`` on
  one call, or does not confirm a weight load within ``broadcast_timeout_s`` is killed and
  replaced in its slot (its placement group bundle); the replacement loads the newest policy
  before it takes work, and every request the old one held is re-issued, with its own seed,
  to the least-loaded generator;
- a generator whose samples or load confirmation name another policy than it was sent is
  sent the newest policy again, and the request re-issued;
- ``stats`` counts it all (``faults/generator_restarts``, ``faults/requests_reissued``,
  ``faults/generator_seconds_lost``, ``faults/weight_reloads``);
- after ``max_restarts`` replacements, or with no generator up for ``grace_s`` seconds, the
  pool raises ``GeneratorsLost`` (the driver checkpoints and stops: never a hang).

Failures are found by whoever waits on the pool (the rollout producer, an evaluation, a weight
broadcast): every wait also collects the other finished calls and checks every deadline.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
from typing import Callable

import ray
from ray.exceptions import ObjectLostError, RayActorError, RayTaskError

from contracts import PolicyRef, Prompt, Sample, SamplingSettings
from rollout import generator
from rollout.engines import SLEEP_PARTS
from rollout.generator import BASE_POLICY

logger = logging.getLogger(__name__)


class WeightSyncError(RuntimeError):
    """A weight update could not reach the generators."""


class WeightUpdateLost(WeightSyncError):
    """The weight update itself could not be fetched (the learner that made it is gone);
    ``adapter``: whose update it was (a shared pool tells that run alone)."""

    def __init__(self, message: str, adapter: str | None = None):
        super().__init__(message)
        self.adapter = adapter


class GeneratorsLost(RuntimeError):
    """The pool cannot go on: no generator up for ``grace_s``, or ``max_restarts`` used up."""


class Generator(generator.Generator):
    """``rollout.generator.Generator`` as a Ray actor: a streamed weight update's buckets are
    fetched from the object store one at a time. A streaming generator's pool sends the
    update's reference inside a list, so that the load call starts at once and takes its place
    among the calls by its number, while its update is fetched (a call Ray held back until
    its argument arrived could come after calls sent behind it)."""

    def load_weights(self, update, seq: int | None = None, adapter: str | None = None) -> PolicyRef:
        if isinstance(update, list):
            seq = self.hold(seq)  # the calls sent after this one wait while its update is fetched
            try:
                update = ray.get(update[0])
            except BaseException:
                self.skip(seq)
                raise
        return super().load_weights(update, seq, adapter)

    def _fetch(self, bucket: ray.ObjectRef) -> dict:
        return ray.get(bucket)


# what a generator pool counts of the faults it absorbed (a run's metrics and checkpoint carry them)
FAULT_STATS = ("faults/generator_restarts", "faults/requests_reissued", "faults/generator_seconds_lost", "faults/weight_reloads")


def covered_seconds(intervals, since: float, until: float) -> float:
    """Seconds of [since, until] that ``intervals`` ((key, start, end): a generator's engine
    calls, by rank) cover, summed over keys; one key's intervals that overlap count once."""
    spans = sorted((key, max(start, since), min(end, until)) for key, start, end in intervals if min(end, until) > max(start, since))
    total, last = 0.0, None  # last: (key, end of the union so far)
    for key, start, end in spans:
        if last is not None and last[0] == key:
            start = max(start, last[1])
            end = max(end, last[1])
        total += end - start
        last = (key, end)
    return total


# calls in a row a shared pool's generator may fail before it is taken for broken and replaced
ERRORS_IN_A_ROW = 3

# a streaming generator's calls at once: each generate call holds a thread until its samples are
# done (a multi-turn run has one call per due turn); a call past it waits in Ray's queue
STREAM_CONCURRENCY = 1024


def generator_actor(num_cpus: float = 1.0, num_gpus: float = 0.0, streaming: bool = False):
    """The Ray actor class for a generator, with its resource request (``.options`` may
    replace it, with a placement group bundle). Ray does not restart it: the pool replaces a
    failed generator itself, and sends the replacement the newest policy. A streaming one
    takes its calls on many threads (``rollout.serving``)."""
    return ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=0, max_concurrency=STREAM_CONCURRENCY if streaming else 1)(Generator)


@dataclasses.dataclass(frozen=True)
class GeneratorPoolSettings:
    """Deadlines and limits of the generator pool (keys of the config's ``generator`` section)."""

    broadcast_timeout_s: float = 120.0  # a weight load not confirmed by then (once the generator is free): replaced
    call_timeout_s: float = 600.0  # a generate call running longer: the generator is hung, replaced
    startup_s: float = 300.0  # added to a new generator's first deadline (engine start, model load)
    max_restarts: int = 8  # generator replacements in a run; one more stops the run
    grace_s: float = 300.0  # no generator up for this long: the run stops with a checkpoint


@dataclasses.dataclass(eq=False)
class Request:
    """One chunk of generation work; ``samples`` is set once it is done. Re-issued, with the
    same sampling seed, when the generator holding it fails."""

    prompts: list[Prompt]
    sampling: SamplingSettings
    adapter: str | None
    samples: list[Sample] | None = None
    span: tuple[float, float] | None = None  # when its engine work started and finished (wall clock)


@dataclasses.dataclass(eq=False)
class _Call:
    """A call outstanding on one generator: a Request's generate, or a weight load."""

    rank: int
    epoch: int  # which actor of the slot (a replacement is the next epoch)
    ref: ray.ObjectRef
    sent: float
    expect: PolicyRef | None  # the policy the generator must serve for this call (None: unknown)
    request: Request | None = None  # None for a weight load
    update: ray.ObjectRef | None = None  # a weight load's update


@dataclasses.dataclass
class _Slot:
    """One generator's place in the pool, and what the pool knows of its actor."""

    handle: object
    epoch: int = 0
    started: float = dataclasses.field(default_factory=time.monotonic)
    up: bool = False  # has finished a call since it started
    sent: dict[str, PolicyRef] = dataclasses.field(default_factory=dict)  # each adapter's newest policy sent to it (what its next call serves)
    mark: float = dataclasses.field(default_factory=time.monotonic)  # when its running call began, about
    wrong: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # consecutive reports of a wrong policy, by adapter
    dormant: bool = False  # started asleep and not woken since: no engine yet, nothing can be loaded
    calls: int = 0  # calls sent to its actor: the next one's number (``seq``), the order a streaming one runs them in
    loaded: dict[str, float] = dataclasses.field(default_factory=dict)  # when each adapter's newest load was sent to it
    errors: int = 0  # calls in a row that raised (a shared pool's: the caller is told; past ERRORS_IN_A_ROW it is replaced)

    def number(self) -> int:
        self.calls += 1
        return self.calls - 1


class GeneratorPool:
    """N generator actors behind one ``submit``; thread-safe (a rollout thread and the
    evaluation may submit at once). See the module docstring for what it does on failure."""

    def __init__(self, handles: list, settings: GeneratorPoolSettings = GeneratorPoolSettings(), factory: Callable[[int, bool], object] | None = None, streaming: bool = False,
                 on_error: Callable[[Request | None, PolicyRef | None, Exception], None] | None = None):  # fmt: skip
        """``factory(rank, asleep)`` starts a replacement for generator ``rank`` (without one,
        a failed generator fails the pool's caller), asleep while the pool is. ``streaming``:
        the generators batch calls as they come (``rollout.serving``): any number of calls may
        be outstanding on one, and the pool numbers them so that each runs in its place.
        ``on_error(request, policy, exc)``: where an error a generator raised in a call goes
        (a generate call's request, or a load's policy), instead of to whoever waits on the
        pool: a shared pool tells the run that sent it."""
        self.on_error = on_error
        if not handles:
            raise ValueError("a generator pool needs at least one generator")
        self.settings = settings
        self.streaming = streaming
        self.factory = factory
        self.slots = [_Slot(handle) for handle in handles]
        self._lock = threading.RLock()
        self._calls: dict[ray.ObjectRef, _Call] = {}
        # each adapter's newest weights sent (a replacement loads them); one adapter but on a
        # shared pool (actors.pool), where each run's is its own
        self._updates: dict[str, tuple[ray.ObjectRef, PolicyRef]] = {}
        self._down_since: float | None = None  # when the last generator up was lost
        self.asleep = False  # the generators' memory is lent to colocated learners (sleep mode)
        self._last_failure = "none"
        self.stats = dict.fromkeys(FAULT_STATS, 0.0)
        # (rank, engine start, engine end) of the latest finished chunks, wall clock
        self.intervals: collections.deque[tuple[int, float, float]] = collections.deque(maxlen=10_000)

    def __len__(self) -> int:
        return len(self.slots)

    @property
    def handles(self) -> list:
        return [slot.handle for slot in self.slots]

    # -- work -------------------------------------------------------------------------------

    def submit(self, prompts: list[Prompt], sampling: SamplingSettings, policy: PolicyRef | None = None) -> list[Request]:
        """Requests for ``sampling.n`` samples per prompt: the prompts in ``len(self)``
        contiguous chunks (in order), each on the least-loaded generator. A seeded call gives
        chunk k the seed ``seed + k``, whichever generator runs it. ``policy`` names the adapter
        the samples must come from (any version: each sample records its own);
        ``BASE_POLICY``: the base model with the adapter off, beside the live policy."""
        n = len(self.slots)
        size = -(-len(prompts) // n)
        chunks = [prompts[i * size : (i + 1) * size] for i in range(n)]
        requests = []
        with self._lock:
            for k, chunk in enumerate(chunks):
                if chunk:
                    seeded = dataclasses.replace(sampling, seed=None if sampling.seed is None else sampling.seed + k)
                    request = Request(chunk, seeded, policy.adapter if policy else None)
                    self._send(request, self._least_loaded())
                    requests.append(request)
        return requests

    def wait(self, requests: list[Request], timeout: float) -> list[Request]:
        """The requests of ``requests`` that are done, waiting up to ``timeout`` seconds for
        one when none is; failed generators found meanwhile are replaced."""
        done = [r for r in requests if r.samples is not None]
        if not done:
            self.poll(timeout)
            done = [r for r in requests if r.samples is not None]
        return done

    def result(self, request: Request) -> list[Sample]:
        """A request's samples, waiting for them."""
        while request.samples is None:
            self.poll(1.0)
        return request.samples

    def generate(self, prompts: list[Prompt], sampling: SamplingSettings, policy: PolicyRef | None = None) -> list[Sample]:
        """``submit`` and wait: the samples in prompt order."""
        return [sample for request in self.submit(prompts, sampling, policy) for sample in self.result(request)]

    def busy_seconds(self, since: float, until: float) -> float:
        """Engine time of all generators inside [since, until], summed over generators; a
        generator's calls that overlap (streaming) count once."""
        with self._lock:
            intervals = list(self.intervals)
        return covered_seconds(intervals, since, until)

    def metrics(self, since: float, until: float) -> dict[str, float]:
        """Figures of the run's share of a shared pool (``actors.pool.PoolClient``); none here:
        the generators are the run's own."""
        return {}

    # -- weights ----------------------------------------------------------------------------

    def push(self, update: ray.ObjectRef, policy: PolicyRef, collect: bool = True) -> None:
        """Send ``policy``'s weights to every generator, behind the work it already holds;
        does not wait (``confirm`` does); ``collect``: then collect the calls finished (a
        shared pool leaves that to its own thread)."""
        with self._lock:
            self._updates[policy.adapter] = (update, policy)
            for rank in range(len(self.slots)):
                self._load(rank, policy.adapter)
        if collect:
            self.poll(0.0)

    def loading(self, adapter: str | None = None) -> bool:
        """A weight load (of ``adapter``'s, if named) is outstanding on a generator that is up
        (or on any, while none is): what ``confirm`` waits out."""
        with self._lock:
            up = any(slot.up for slot in self.slots)
            return any(call.request is None and (adapter is None or (call.expect is not None and call.expect.adapter == adapter)) and (self.slots[call.rank].up or not up)
                       for call in self._calls.values())  # fmt: skip

    def confirm(self) -> None:
        """Wait until every generator that is up has loaded the newest policy (replacing those
        that fail or time out on the way), or raise GeneratorsLost. A replacement still
        starting is not waited for: its load runs before any work it is given."""
        while self.loading():
            self.poll(1.0)

    def drop(self, adapter: str) -> None:
        """Stop serving ``adapter`` on every generator (a shared pool's run that left): its
        updates are forgotten and each generator frees it behind the work it holds."""
        with self._lock:
            self._updates.pop(adapter, None)
            for rank, slot in enumerate(self.slots):
                if slot.sent.pop(adapter, None) is not None and not slot.dormant:
                    slot.loaded.pop(adapter, None)
                    self._track(rank, slot.handle.drop_adapter.remote(adapter, slot.number()), None)

    def send(self, request: Request, rank: int | None = None) -> int:
        """Send ``request`` whole to generator ``rank`` (default: the least loaded); its rank.
        ``submit`` splits and sends at once; a shared pool's scheduler sends one at a time."""
        with self._lock:
            rank = self._least_loaded() if rank is None else rank
            self._send(request, rank)
            return rank

    def outstanding(self, rank: int) -> int:
        """Generate calls outstanding on generator ``rank``."""
        with self._lock:
            return sum(c.request is not None for c in self._outstanding(rank))

    def broadcast(self, update: ray.ObjectRef, policy: PolicyRef) -> None:
        """Push and wait (synchronous mode, start, resume, rollback). Sleeping generators wake
        in verl's order: the weights, the load, then the KV cache, so that the load's transient
        buffers never compete with the KV cache for the device."""
        staged = self.asleep
        if staged:
            self.wake(("weights",))
        self.push(update, policy)
        self.confirm()
        if staged:
            self.wake(("kv_cache",))
            self.confirm()  # a generator replaced meanwhile is built at this wake, and loads now

    def sleep(self) -> None:
        """Every generator hands its device memory over (colocated sleep mode), and waits. A
        generator replaced from now until ``wake`` starts asleep: it takes no memory."""
        self.asleep = True
        self._each("sleep", lambda handle: handle.sleep.remote())

    def wake(self, parts: tuple[str, ...] = SLEEP_PARTS) -> None:
        """Every generator takes its memory back (or ``parts`` of it: the pool stays asleep
        until the KV cache is back), and waits; once awake, those replaced while asleep, whose
        engines are built at the wake, load the newest policy."""
        self.asleep = "kv_cache" not in parts
        epochs = [slot.epoch for slot in self.slots]
        # a generator replaced while asleep builds its engine now: it has its start-up time too
        self._each("wake", lambda handle: handle.wake.remote(parts), self.settings.call_timeout_s + self.settings.startup_s)
        for slot, epoch in zip(self.slots, epochs):
            slot.dormant = slot.dormant and slot.epoch != epoch  # woken (built), unless replaced during the wake
        if self.asleep:
            return
        with self._lock:
            if not any(slot.up for slot in self.slots) and self._down_since is None:
                self._down_since = time.monotonic()
            for adapter, (_, policy) in self._updates.items():
                for rank, slot in enumerate(self.slots):
                    if slot.sent.get(adapter) != policy:
                        self._load(rank, adapter)

    def started(self, timeout_s: float) -> None:
        """Wait until every generator has built its engine (what a colocated learner must not
        start before, on a GPU: vLLM refuses to start without its share of free memory)."""
        self._each("start", lambda handle: handle.ping.remote(), timeout_s)

    def kill(self) -> None:
        for slot in self.slots:
            ray.kill(slot.handle, no_restart=True)

    # -- the calls and their failures -------------------------------------------------------

    def _least_loaded(self) -> int:
        """The generator with the fewest chunks outstanding, preferring those up to those
        still starting (a replacement's engine may take a while)."""
        load = collections.Counter(call.rank for call in self._calls.values() if call.request is not None)
        return min(range(len(self.slots)), key=lambda r: (not self.slots[r].up, load[r], r))

    def _outstanding(self, rank: int) -> list[_Call]:
        """The calls generator ``rank``'s current actor holds, in the order it runs them."""
        epoch = self.slots[rank].epoch
        return sorted((c for c in self._calls.values() if c.rank == rank and c.epoch == epoch), key=lambda c: c.sent)

    def _track(self, rank: int, ref: ray.ObjectRef, expect: PolicyRef | None, request: Request | None = None, update: ray.ObjectRef | None = None) -> None:
        slot = self.slots[rank]
        now = time.monotonic()
        if not self._outstanding(rank):
            slot.mark = now  # an idle generator starts this call now
        self._calls[ref] = _Call(rank, slot.epoch, ref, now, expect, request, update)

    def _adapter(self, request: Request) -> str | None:
        """The adapter ``request`` runs on: the one it names, else the pool's only one."""
        if request.adapter is not None or len(self._updates) != 1:
            return request.adapter
        return next(iter(self._updates))

    def _send(self, request: Request, rank: int) -> None:
        slot = self.slots[rank]
        # base-model samples name BASE_POLICY whatever the generator serves: nothing to check
        expect = None if request.adapter == BASE_POLICY.adapter else slot.sent.get(self._adapter(request))
        self._track(rank, slot.handle.timed_generate.remote(request.prompts, request.sampling, request.adapter, slot.number()), expect, request)

    def _load(self, rank: int, adapter: str) -> None:
        """Send ``adapter``'s newest weights to generator ``rank`` (a dormant one loads once woken)."""
        update, policy = self._updates[adapter]
        slot = self.slots[rank]
        if slot.dormant:
            return
        slot.sent[adapter], slot.loaded[adapter] = policy, time.monotonic()
        self._track(rank, slot.handle.load_weights.remote([update] if self.streaming else update, slot.number(), adapter), policy, update=update)

    def poll(self, timeout: float) -> None:
        """Collect finished calls (waiting up to ``timeout`` for one), then check deadlines."""
        with self._lock:
            refs = list(self._calls)
        if refs:
            ready, _ = ray.wait(refs, num_returns=1, timeout=timeout)
            if ready:
                ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
            for ref in ready:
                self._finish(ref)
        elif timeout:
            time.sleep(min(timeout, 0.05))
        self._check_deadlines()

    def _finish(self, ref: ray.ObjectRef) -> None:
        with self._lock:
            call = self._calls.pop(ref, None)
            if call is None or call.epoch != self.slots[call.rank].epoch:
                return  # taken by another thread, or its generator was already replaced
            slot = self.slots[call.rank]
            try:
                value = ray.get(ref)
            except RayActorError as exc:
                if exc.actor_id not in (None, slot.handle._actor_id.hex()):
                    self._update_lost(call, exc)  # an argument's maker died: the update's learner, not this generator
                else:
                    self._replace(call.rank, f"died ({type(exc).__name__})", call)
                return
            except ObjectLostError as exc:
                if call.request is None:
                    self._update_lost(call, exc)  # a bucket of a streamed update: the learner that put it is gone
                else:
                    self._replace(call.rank, f"lost its result ({type(exc).__name__})", call)
                return
            except RayTaskError as exc:  # the generator raised: its caller's error, or its engine is broken
                if self.on_error is None:
                    raise
                slot.mark, slot.up, self._down_since = time.monotonic(), True, None
                slot.errors += 1
                if call.request is None and self._superseded(call):  # an older load of the adapter (a newer one follows): nothing to tell its run
                    logger.info("generator %d: an older load of %s failed: %s", call.rank, call.expect, exc)
                else:
                    self.on_error(call.request, call.expect, exc)
                if slot.errors >= ERRORS_IN_A_ROW:  # several calls failed in a row: the engine, not the callers
                    self._replace(call.rank, f"failed {slot.errors} calls in a row ({type(exc).__name__})")
                return
            slot.mark, slot.up, self._down_since, slot.errors = time.monotonic(), True, None, 0
            served = value if call.request is None else (value[0][0].policy if value[0] else call.expect)
            if call.expect is not None and served != call.expect:
                self._reload(call, served)
                return
            if call.expect is not None:
                slot.wrong[call.expect.adapter] = 0
            if call.request is not None:
                samples, started, finished = value
                call.request.span, call.request.samples = (started, finished), samples  # span first: samples say done
                self.intervals.append((call.rank, started, finished))

    def _update_lost(self, call: _Call, exc: Exception) -> None:
        """A weight load failed because its update is gone with the learner that made it. An
        older update's load is dropped: the newest is queued behind it on that generator (a
        recovery's broadcast finds the lost update's other loads so). The newest's is the
        run's to answer: ``WeightUpdateLost`` (the driver rebuilds the learners, whose restored
        policy is broadcast anew)."""
        if self._superseded(call):
            logger.info("generator %d: the load of an older policy (%s) failed, its update gone with its learner: the newest follows", call.rank, call.expect)
            return
        raise WeightUpdateLost(f"generator {call.rank} could not fetch the weight update of {call.expect}: {exc}", call.expect.adapter) from exc

    def _superseded(self, call: _Call) -> bool:
        """Load ``call``'s update is no longer its adapter's newest (or its adapter is gone)."""
        newest = self._updates.get(call.expect.adapter) if call.expect is not None else None
        return newest is None or call.update != newest[0]

    def _reload(self, call: _Call, served: PolicyRef) -> None:
        """Generator ``call.rank`` serves ``served``, not the policy it was sent: send it the
        newest again (twice in a row: replace it) and re-issue the request."""
        slot = self.slots[call.rank]
        adapter = call.expect.adapter
        if adapter not in self._updates:  # a shared pool's run that left: nothing to serve
            return
        if slot.loaded.get(adapter, 0.0) > call.sent and slot.sent.get(adapter) == self._updates[adapter][1]:
            # the newest policy was sent after this call (a streaming generator's calls side by
            # side all report the failed load before it): it serves that now, only re-issue
            if call.request is not None:
                self._reissue(call, time.monotonic())
            return
        slot.wrong[adapter] += 1
        if slot.wrong[adapter] > 2:
            self._replace(call.rank, f"reports policy {served} after reloads of {call.expect}", call)
            return
        logger.warning("generator %d serves %s, not %s: sending it %s again", call.rank, served, call.expect, self._updates[adapter][1])
        self.stats["faults/weight_reloads"] += 1
        self._load(call.rank, adapter)
        if call.request is not None:
            self._reissue(call, time.monotonic())

    def _reissue(self, call: _Call, now: float) -> None:
        self.stats["faults/requests_reissued"] += 1
        self.stats["faults/generator_seconds_lost"] += now - call.sent
        self._send(call.request, self._least_loaded())

    def _check_deadlines(self) -> None:
        s = self.settings
        now = time.monotonic()
        with self._lock:
            for rank, slot in enumerate(self.slots):
                mine = self._outstanding(rank)
                if not mine:
                    continue
                first = mine[0]  # the call it runs now
                limit = (s.call_timeout_s if first.request is not None else s.broadcast_timeout_s) + (0.0 if slot.up else s.startup_s)
                if now - slot.mark > limit:
                    what = "a generate call" if first.request is not None else f"loading policy {first.expect}"
                    self._replace(rank, f"hung: {what} ran past {limit:.0f}s", first)
            if self._down_since is not None and now - self._down_since > s.grace_s:
                raise GeneratorsLost(f"no generator has been up for {now - self._down_since:.0f}s (generator.grace_s={s.grace_s:.0f}); the last failure: {self._last_failure}")

    def _replace(self, rank: int, why: str, call: _Call | None = None) -> None:
        """Kill generator ``rank``, start its replacement with the newest policy, re-issue its requests."""
        slot = self.slots[rank]
        lost = self._outstanding(rank)
        for c in lost:
            del self._calls[c.ref]
        if call is not None and call not in lost:
            lost.append(call)
        ray.kill(slot.handle, no_restart=True)
        self._last_failure = f"generator {rank} {why}"
        logger.warning("generator %d %s: replacing it, re-issuing %d requests", rank, why, sum(c.request is not None for c in lost))
        if self.factory is None:
            raise GeneratorsLost(f"generator {rank} {why}, and this pool cannot start another")
        if self.stats["faults/generator_restarts"] >= self.settings.max_restarts:
            raise GeneratorsLost(f"generator {rank} {why}, and generator.max_restarts={self.settings.max_restarts} replacements are used up")
        now = time.monotonic()
        self.slots[rank] = _Slot(self.factory(rank, self.asleep), epoch=slot.epoch + 1, dormant=self.asleep)
        self.stats["faults/generator_restarts"] += 1
        if not any(s.up for s in self.slots) and self._down_since is None and not self.asleep:
            self._down_since = now  # asleep, the clock starts at the wake (nothing can come up before)
        if not self.asleep:  # asleep: it loads when woken
            for adapter in self._updates:
                self._load(rank, adapter)
        for c in lost:
            if c.request is not None:
                self._reissue(c, now)

    def _each(self, method: str, call: Callable[[object], ray.ObjectRef], timeout_s: float | None = None) -> None:
        """``call`` (``method`` in messages) on every generator, and wait up to ``timeout_s``
        (default ``call_timeout_s``); a generator that fails is replaced (asleep if the pool is)."""
        timeout_s = self.settings.call_timeout_s if timeout_s is None else timeout_s
        refs = {call(slot.handle): rank for rank, slot in enumerate(self.slots)}
        ready, pending = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
        with self._lock:
            for ref in ready:
                try:
                    ray.get(ref)
                except (RayActorError, RayTaskError) as exc:  # dead, or its engine failed (to start, to sleep)
                    self._replace(refs[ref], f"failed in {method} ({type(exc).__name__}: {str(exc).strip().splitlines()[-1][:200]})")
            for ref in pending:
                self._replace(refs[ref], f"hung in {method} past {timeout_s:.0f}s")
