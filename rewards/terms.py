"""Rewards from outside the project: a user's Python function and an HTTP reward server.

Each is a *term* of the reward: it scores a batch of (completion, problem) pairs with one value
per sample, a float or a dict of components, and the task's judge (``rewards.scoring``) adds
``weight * value`` to the sample's reward and reports the value as the component ``<name>``
(a dict's other keys as ``<name>/<key>``). A term runs inside the verifier actors, behind the
pool's deadlines (a hanging function or server is the pool's timeout) and its masking.

When a term fails on a sample (it raised, returned something that is not a finite number or a
dict with one under ``reward``, a server kept failing), its ``on_error`` decides:
- ``mask`` (the default): the sample is left out of training (``Verdict.status == "masked"``)
  and counts toward the masked share the monitor watches: a policy can learn to break a reward
  function, and a silent 0 would hide it;
- ``zero``: the term scores 0 for that sample, and the failure is counted;
- ``stop``: the run stops with the term's error.
Every failure is named in ``Verdict.faults`` (counted per term in the metrics), and each
term's first traceback in a verifier process is logged.

A user's function is trusted code: it runs in the verifier actor's process, with its
permissions, not in the code sandbox (``rewards.sandbox``), which is for what the model wrote.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import importlib
import importlib.util
import inspect
import json
import logging
import math
import os
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Protocol, Sequence

from contracts import Problem

logger = logging.getLogger(__name__)

OnError = Literal["mask", "zero", "stop"]
Item = tuple[str, Problem]  # (completion text, problem)

# what a per-sample function may ask for by parameter name; a batched one gets the plurals
SAMPLE_ARGUMENTS = ("completion", "answer", "question", "task", "meta", "example")


class TermFailure(Exception):
    """A term's failure on one sample: what it raised or returned, for ``Verdict.error``."""


class Term(Protocol):
    """A reward term, opened in the verifier actor: one value (a number, a dict of numbers, or
    the ``TermFailure`` it met) per item."""

    name: str
    weight: float
    on_error: OnError

    def __call__(self, items: list[Item]) -> list[Any]: ...


class TermSource(Protocol):
    """A term's settings: picklable, sent to every verifier actor, opened there."""

    name: str

    def open(self) -> Term: ...


def _example(problem: Problem) -> dict:
    """The dataset row's fields (a generic dataset task keeps them), else empty."""
    return dict(problem.meta.get("example", {}))


def _arguments(completion: str, problem: Problem) -> dict[str, Any]:
    return {"completion": completion, "answer": problem.answer, "question": problem.question, "task": problem.task,
            "meta": dict(problem.meta), "example": _example(problem)}  # fmt: skip


def value_of(name: str, value: Any) -> tuple[float, dict[str, float]]:
    """A term's value for one sample as (its reward, its components): a finite number, or a
    dict whose ``reward`` is one and whose other entries are numbers (``correct`` among them
    says whether the sample is right). Anything else is a ``TermFailure`` naming what came."""
    if isinstance(value, bool):
        value = float(value)
    if isinstance(value, (int, float)):
        if not math.isfinite(value):
            raise TermFailure(f"reward {name} returned {value!r}, not a finite number")
        return float(value), {}
    if isinstance(value, dict):
        if "reward" not in value:
            raise TermFailure(f"reward {name} returned a dict without 'reward': {sorted(value)[:10]}")
        reward, _ = value_of(name, value["reward"])
        components = {}
        for key, part in value.items():
            if key == "reward":
                continue
            try:
                components[str(key)] = value_of(name, part)[0]
            except TermFailure:
                raise TermFailure(f"reward {name} returned {key}={part!r:.80}, not a number") from None
        return reward, components
    raise TermFailure(f"reward {name} returned {type(value).__name__} {value!r:.80}, not a number or a dict with 'reward'")


# -- a user's function ------------------------------------------------------------------------


def import_function(path: str, search: Sequence[str] = ()) -> Callable:
    """The function ``path`` names: ``package.module:function`` (importable here, e.g. from the
    job's working directory) or ``file.py:function``. ``search``: folders tried after
    ``sys.path`` (the folder the run was started in)."""
    module_name, sep, attr = path.rpartition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"reward function path {path!r} must be 'package.module:function' or 'file.py:function'")
    if module_name.endswith(".py"):
        file = next((Path(root, module_name) for root in ("", *search) if Path(root, module_name).is_file()), None)
        if file is None:
            raise ValueError(f"reward function {path!r}: no file {module_name} (looked in {['.', *search]})")
        spec = importlib.util.spec_from_file_location(f"raylight_reward_{file.stem}", file)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            extra = [root for root in search if root not in sys.path and Path(root).is_dir()]
            if not extra or exc.name is None or not module_name.startswith(exc.name):
                raise ValueError(f"reward function {path!r}: cannot import {module_name}: {exc}") from None
            sys.path.extend(extra)
            try:
                module = importlib.import_module(module_name)
            except ModuleNotFoundError as again:
                raise ValueError(f"reward function {path!r}: cannot import {module_name}: {again} (searched sys.path and {extra})") from None
    function = getattr(module, attr, None)
    if not callable(function):
        raise ValueError(f"reward function {path!r}: {module_name} has no function {attr!r}")
    return function


@dataclass(frozen=True)
class FunctionReward:
    """A reward function from the user's own module (the config's ``reward.functions``).

    Per sample (``batched: false``): ``fn(completion, answer, ...) -> float | dict``, called
    with the arguments it names among ``completion``, ``answer``, ``question``, ``task``,
    ``meta``, ``example`` (the dataset row's fields), or all of them if it takes ``**kwargs``.
    Batched: ``fn(completions, answers, ...) -> list``, the same names in the plural, one value
    per sample in order. Either may be ``async def``."""

    path: str = ""  # "my_pkg.rewards:fn" or "rewards.py:fn"
    weight: float = 1.0
    name: str | None = None  # the component's name; default: the function's
    batched: bool = False
    on_error: OnError = "mask"
    # folders tried after sys.path when importing (filled by the run: the folder it started in)
    search: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        return self.name or self.path.rpartition(":")[2]

    def open(self) -> FunctionTerm:
        return FunctionTerm(self, import_function(self.path, self.search))


class FunctionTerm:
    """A ``FunctionReward`` opened in the verifier: calls the function as it wants to be called."""

    def __init__(self, settings: FunctionReward, function: Callable):
        self.name, self.weight, self.on_error = settings.label, settings.weight, settings.on_error
        self.batched = settings.batched
        self.function = function
        self.is_async = inspect.iscoroutinefunction(function)
        parameters = inspect.signature(function).parameters.values()
        names = tuple(f"{n}s" if self.batched else n for n in SAMPLE_ARGUMENTS)
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
            self.wants = names
        else:
            self.wants = tuple(n for n in names if n in {p.name for p in parameters})
            unknown = [p.name for p in parameters if p.name not in names and p.default is inspect.Parameter.empty
                       and p.kind not in (inspect.Parameter.VAR_POSITIONAL,)]  # fmt: skip
            if unknown:
                raise ValueError(f"reward function {self.name}: parameters {unknown} are not among {list(names)}")

    def __call__(self, items: list[Item]) -> list[Any]:
        if self.batched:
            columns = {f"{n}s": [_arguments(c, p)[n] for c, p in items] for n in SAMPLE_ARGUMENTS}
            kwargs = {n: columns[n] for n in self.wants}
            values = asyncio.run(self.function(**kwargs)) if self.is_async else self.function(**kwargs)
            if not isinstance(values, (list, tuple)) or len(values) != len(items):
                got = f"{len(values)} values" if isinstance(values, (list, tuple)) else type(values).__name__
                raise TermFailure(f"batched reward {self.name} returned {got} for {len(items)} samples")
            return list(values)
        calls = [{n: _arguments(c, p)[n] for n in self.wants} for c, p in items]
        if self.is_async:
            return asyncio.run(_gather(self.function, calls))
        values = []
        for kwargs in calls:
            try:
                values.append(self.function(**kwargs))
            except Exception as exc:  # noqa: BLE001 - one sample's failure, handled by on_error
                values.append(exc)
        return values


async def _gather(function: Callable, calls: list[dict]) -> list[Any]:
    return list(await asyncio.gather(*(function(**kwargs) for kwargs in calls), return_exceptions=True))


# -- an HTTP reward server --------------------------------------------------------------------


@dataclass(frozen=True)
class HttpReward:
    """An HTTP reward server (the config's ``reward.http``), like OpenRLHF's remote reward model.

    Each request is ``POST url`` with ``{"samples": [{"uid", "task", "question", "completion",
    "answer", "example"}, ...]}`` (at most ``batch_size`` samples); the reply is
    ``{"rewards": [value, ...]}``, one value per sample in order: a number, or a dict with
    ``reward`` and further components. A request that fails (no connection, a status other
    than 200, past ``timeout_s``, a reply that is not that JSON) is retried ``retries`` times
    with a short back-off; then its samples meet ``on_error``. ``max_concurrency`` bounds the
    requests in flight from the whole verifier pool."""

    url: str = ""
    weight: float = 1.0
    name: str = "http"
    timeout_s: float = 30.0
    max_concurrency: int = 4
    batch_size: int = 16
    retries: int = 2
    on_error: OnError = "mask"
    # requests each verifier actor may have in flight (set by the run from max_concurrency and
    # the pool's size); 0: max_concurrency
    per_actor: int = 0

    @property
    def label(self) -> str:
        return self.name

    def open(self) -> HttpTerm:
        return HttpTerm(self)


class HttpTerm:
    def __init__(self, settings: HttpReward):
        if not settings.url.startswith(("http://", "https://")):
            raise ValueError(f"reward.http.url must be an http:// or https:// address, got {settings.url!r}")
        self.settings = settings
        self.name, self.weight, self.on_error = settings.name, settings.weight, settings.on_error
        self.pool = concurrent.futures.ThreadPoolExecutor(max(1, settings.per_actor or settings.max_concurrency), thread_name_prefix="reward-http")

    def __call__(self, items: list[Item]) -> list[Any]:
        size = max(1, self.settings.batch_size)
        chunks = [items[i : i + size] for i in range(0, len(items), size)]
        values: list[Any] = []
        for chunk, result in zip(chunks, self.pool.map(self._request, chunks)):
            values.extend(result if isinstance(result, list) else [result] * len(chunk))
        return values

    def _request(self, items: list[Item]) -> list[Any] | TermFailure:
        s = self.settings
        body = json.dumps({"samples": [{"uid": p.uid, "task": p.task, "question": p.question, "completion": c, "answer": p.answer,
                                        "example": _example(p)} for c, p in items]}, default=str).encode()  # fmt: skip
        error = ""
        for attempt in range(s.retries + 1):
            if attempt:
                time.sleep(min(2.0, 0.2 * 2**attempt))
            try:
                request = urllib.request.Request(s.url, data=body, headers={"Content-Type": "application/json"}, method="POST")
                with urllib.request.urlopen(request, timeout=s.timeout_s) as reply:
                    payload = json.loads(reply.read())
                rewards = payload.get("rewards") if isinstance(payload, dict) else None
                if not isinstance(rewards, list) or len(rewards) != len(items):
                    error = f"reply is not {{'rewards': [{len(items)} values]}}: {json.dumps(payload)[:120]}"
                    continue
                return rewards
            except urllib.error.HTTPError as exc:
                error = f"HTTP {exc.code} {exc.reason}"
            except (OSError, ValueError) as exc:  # refused, reset, timed out; bad JSON
                error = f"{type(exc).__name__}: {exc}"
        return TermFailure(f"reward server {s.url}: {error} (after {s.retries} retries)")


# -- what the judge applies -------------------------------------------------------------------


@dataclass
class Scored:
    """One term's result for one sample: its reward and components, or its failure."""

    reward: float = 0.0
    components: dict[str, float] = field(default_factory=dict)
    failure: str | None = None


_logged: set[str] = set()  # terms whose first failure this process has logged


def score_term(term: Term, items: list[Item]) -> list[Scored]:
    """``term`` on ``items``: each sample's value read, or its failure described (a term that
    fails as a whole fails on every sample). The first failure of each term is logged with
    its traceback, once per process."""
    try:
        values = term(items)
    except Exception as exc:  # noqa: BLE001 - the whole batch failed
        values = [exc] * len(items)
    results = []
    for value in values:
        try:
            if isinstance(value, BaseException):
                raise value
            reward, components = value_of(term.name, value)
            results.append(Scored(reward, components))
        except TermFailure as exc:
            results.append(Scored(failure=str(exc)[:500]))
            _log_once(term.name, str(exc), None)
        except Exception as exc:  # noqa: BLE001 - what the user's code raised
            results.append(Scored(failure=f"reward {term.name} raised {type(exc).__name__}: {exc}"[:500]))
            _log_once(term.name, f"reward {term.name} raised", exc)
    return results


def _log_once(name: str, message: str, exc: BaseException | None) -> None:
    if name in _logged:
        return
    _logged.add(name)
    logger.error("%s (pid %d; later failures of this reward are counted, not logged)", message, os.getpid(), exc_info=exc)
