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
import numbers
import os
import sys
import threading
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
    if isinstance(value, (bool, numbers.Real)) or (hasattr(value, "item") and hasattr(value, "dtype") and getattr(value, "size", 0) == 1):
        value = float(value)  # numpy and torch scalars too
    if isinstance(value, float):
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


def import_function(path: str, search: Sequence[str] = (), what: str = "reward function") -> Callable:
    """The function ``path`` names: ``package.module:function`` (importable here, e.g. from the
    job's working directory) or ``file.py:function``. ``search``: folders tried after
    ``sys.path`` (the folder the run was started in); ``what`` names it in errors."""
    module_name, sep, attr = path.rpartition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"{what} path {path!r} must be 'package.module:function' or 'file.py:function'")
    if module_name.endswith(".py"):
        file = next((Path(root, module_name) for root in ("", *search) if Path(root, module_name).is_file()), None)
        if file is None:
            raise ValueError(f"{what} {path!r}: no file {module_name} (looked in {['.', *search]})")
        name = f"raylight_reward_{file.stem}"
        spec = importlib.util.spec_from_file_location(name, file)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses and pickling look their module up there
        spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            extra = [root for root in search if root not in sys.path and Path(root).is_dir()]
            if not extra or exc.name is None or not module_name.startswith(exc.name):
                raise ValueError(f"{what} {path!r}: cannot import {module_name}: {exc}") from None
            sys.path.extend(extra)
            try:
                module = importlib.import_module(module_name)
            except ModuleNotFoundError as again:
                raise ValueError(f"{what} {path!r}: cannot import {module_name}: {again} (searched sys.path and {extra})") from None
    function = getattr(module, attr, None)
    if not callable(function):
        raise ValueError(f"{what} {path!r}: {module_name} has no function {attr!r}")
    return function


@dataclass(frozen=True)
class FunctionReward:
    """A reward function from the user's own module (the config's ``reward.functions``).

    Per sample (``batched: false``): ``fn(completion, answer, ...) -> float | dict``, called
    with the arguments it names among ``completion``, ``answer``, ``question``, ``task``,
    ``meta``, ``example`` (the dataset row's fields), or all of them if it takes ``**kwargs``.
    Batched: ``fn(completions, answers, ...) -> list``, the same names in the plural, one value
    per sample in order (a list, a tuple or an array). Either may be ``async def`` (or return
    an awaitable)."""

    path: str = ""  # "my_pkg.rewards:fn" or "rewards.py:fn"
    weight: float = 1.0  # the term's weight in the reward
    name: str | None = None  # the component's name; default: the function's
    batched: bool = False  # called once per verifier call with lists, instead of once per sample
    on_error: OnError = "mask"  # a sample it fails on: mask (left out of training), zero (reward 0), stop (the run)
    # folders tried after sys.path when importing (filled by the run: the folder it started in)
    search: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        return self.name or self.path.rpartition(":")[2]

    def open(self) -> FunctionTerm:
        return FunctionTerm(self, import_function(self.path, self.search))


class FunctionTerm:
    """A ``FunctionReward`` opened in the verifier: calls the function as it wants to be called.

    Coroutines run on one event loop of the term's own, in a thread, for the life of the
    verifier (a client or a semaphore the user's module made at import stays usable), at most
    ``ASYNC_CONCURRENCY`` at once. A batched call that fails as a whole is repeated one sample
    at a time, so one bad completion fails alone."""

    def __init__(self, settings: FunctionReward, function: Callable):
        self.name, self.weight, self.on_error = settings.label, settings.weight, settings.on_error
        self.batched = settings.batched
        self.function = function
        self._loop: asyncio.AbstractEventLoop | None = None
        parameters = list(inspect.signature(function).parameters.values())
        names = tuple(f"{n}s" if self.batched else n for n in SAMPLE_ARGUMENTS)
        positional = [p.name for p in parameters if p.kind is inspect.Parameter.POSITIONAL_ONLY]
        if positional:
            raise ValueError(f"reward function {self.name}: it is called with keyword arguments, and {positional} are positional-only")
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
            self.wants = names
        else:
            self.wants = tuple(n for n in names if n in {p.name for p in parameters})
            unknown = [p.name for p in parameters if p.name not in names and p.default is inspect.Parameter.empty
                       and p.kind is not inspect.Parameter.VAR_POSITIONAL]  # fmt: skip
            if unknown:
                raise ValueError(f"reward function {self.name}: parameters {unknown} are not among {list(names)}")

    def __call__(self, items: list[Item]) -> list[Any]:
        if not self.batched:
            arguments = [_arguments(c, p) for c, p in items]
            return self._await([self._call({n: a[n] for n in self.wants}) for a in arguments])
        try:
            return self._batch(items)
        except TermFailure as failure:  # the function's own fault (a wrong count), not a sample's
            return [failure] * len(items)
        except Exception as exc:  # noqa: BLE001 - find the sample that broke it
            if len(items) == 1:
                return [exc]
            return [value for item in items for value in self(items=[item])]

    def _batch(self, items: list[Item]) -> list[Any]:
        arguments = [_arguments(c, p) for c, p in items]
        (values,) = self._await([self._call({n: [a[n.removesuffix("s")] for a in arguments] for n in self.wants})])
        if isinstance(values, BaseException):
            raise values
        if hasattr(values, "tolist"):  # a numpy array or a tensor
            values = values.tolist()
        if not isinstance(values, (list, tuple)) or len(values) != len(items):
            got = f"{len(values)} values" if isinstance(values, (list, tuple)) else type(values).__name__
            raise TermFailure(f"batched reward {self.name} returned {got} for {len(items)} samples")
        return list(values)

    def _call(self, kwargs: dict) -> Any:
        try:
            return self.function(**kwargs)
        except Exception as exc:  # noqa: BLE001 - one call's failure, handled by on_error
            return exc

    def _await(self, results: list[Any]) -> list[Any]:
        """``results`` with every awaitable among them awaited (on the term's loop)."""
        pending = [i for i, r in enumerate(results) if inspect.isawaitable(r)]
        if not pending:
            return results
        if self._loop is None:
            self._loop = asyncio.new_event_loop()
            threading.Thread(target=self._loop.run_forever, name=f"reward-{self.name}", daemon=True).start()
        done = asyncio.run_coroutine_threadsafe(_gather([results[i] for i in pending]), self._loop).result()
        for i, value in zip(pending, done):
            results[i] = value
        return results


ASYNC_CONCURRENCY = 32  # a per-sample async function's calls in flight at once, per verifier


async def _gather(awaitables: list) -> list[Any]:
    limit = asyncio.Semaphore(ASYNC_CONCURRENCY)

    async def one(awaitable):
        async with limit:
            return await awaitable

    return list(await asyncio.gather(*(one(a) for a in awaitables), return_exceptions=True))


# -- an HTTP reward server --------------------------------------------------------------------


@dataclass(frozen=True)
class HttpReward:
    """An HTTP reward server (the config's ``reward.http``), like OpenRLHF's remote reward model.

    Each request is ``POST url`` with ``{"samples": [{"uid", "task", "question", "completion",
    "answer", "example"}, ...]}`` (at most ``batch_size`` samples); the reply is
    ``{"rewards": [value, ...]}``, one value per sample in order: a number, or a dict with
    ``reward`` and further components. A request that fails (no connection, a status other
    than 200, past ``timeout_s``, a reply that is not that JSON) is retried ``retries`` times
    with a short back-off (a client error, 4xx, is not: its samples are sent one by one);
    then its samples meet ``on_error``. ``max_concurrency`` bounds the requests in flight from
    the whole verifier pool (at least one per verifier actor). A verifier call holds
    ``verifier.samples_per_call`` samples, so a request holds at most that many."""

    url: str = ""  # the server's http:// or https:// address (POSTed to)
    weight: float = 1.0  # the term's weight in the reward
    name: str = "http"  # the component's name (train/reward/<name>)
    timeout_s: float = 10.0  # per request, in all; (retries + 1) * (timeout_s + 2) must fit verifier.timeout_s
    max_concurrency: int = 4  # requests in flight from the whole verifier pool
    batch_size: int = 16  # samples per request at most
    retries: int = 2  # tries after the first, with back-off (not for 4xx answers)
    on_error: OnError = "mask"  # a sample it fails on: mask (left out of training), zero (reward 0), stop (the run)
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
        """One request's rewards; a request the server refuses as a client error (4xx) is
        split into single samples, so one sample it cannot take fails alone."""
        s = self.settings
        body = json.dumps({"samples": [{"uid": p.uid, "task": p.task, "question": p.question, "completion": c, "answer": p.answer,
                                        "example": _example(p)} for c, p in items]}, default=str).encode()  # fmt: skip
        error = ""
        for attempt in range(s.retries + 1):
            if attempt:
                time.sleep(min(2.0, 0.2 * 2**attempt))
            try:
                payload = json.loads(self._post(body))
                rewards = payload.get("rewards") if isinstance(payload, dict) else None
                if isinstance(rewards, list) and len(rewards) == len(items):
                    return rewards
                error = f"reply is not {{'rewards': [{len(items)} values]}}: {json.dumps(payload)[:120]}"
            except urllib.error.HTTPError as exc:
                error = f"HTTP {exc.code} {exc.reason}"
                if 400 <= exc.code < 500 and exc.code not in (408, 429):  # the request's fault: no retry
                    if len(items) > 1:
                        return [value for item in items for value in self._one(item)]
                    break
            except Exception as exc:  # noqa: BLE001 - refused, reset, cut short, timed out, not JSON
                error = f"{type(exc).__name__}: {exc}"
        return TermFailure(f"reward server {s.url}: {error} (after {attempt} retries)")

    def _one(self, item: Item) -> list[Any]:
        result = self._request([item])
        return result if isinstance(result, list) else [result]

    def _post(self, body: bytes) -> bytes:
        """The reply's body, within ``timeout_s`` in all (a server that trickles its reply out
        is cut off, not only one that goes silent)."""
        deadline = time.monotonic() + self.settings.timeout_s
        request = urllib.request.Request(self.settings.url, data=body, headers={"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(request, timeout=self.settings.timeout_s) as reply:
            chunks = []
            while chunk := reply.read(1 << 16):
                chunks.append(chunk)
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the reply took longer than {self.settings.timeout_s:.0f}s")
            return b"".join(chunks)


# -- models served by Ray actors (actors.reward_models serves them; settings only here) ------


@dataclass(frozen=True)
class ServedReward:
    """What every reward served by Ray actors has: its weight and name, each actor's
    resources, and how a verifier's request to them fails (``timeout_s`` per request,
    ``retries`` on the next actor, then ``on_error``;
    ``(retries + 1) * (timeout_s + 2)`` must fit ``verifier.timeout_s``)."""

    weight: float = 1.0  # the term's weight in the reward
    name: str = "served"  # the component's name (train/reward/<name>)
    num_cpus: float = 1.0  # per actor
    num_gpus: float = 0.0  # per actor
    timeout_s: float = 20.0  # per request
    retries: int = 1  # tries after the first, each on the next actor
    on_error: OnError = "mask"  # a sample it fails on: mask (left out of training), zero (reward 0), stop (the run)

    @property
    def label(self) -> str:
        return self.name


@dataclass(frozen=True)
class RewardModelSettings(ServedReward):
    """A reward model (the config's ``reward.model``): a Hugging Face sequence-classification
    model (a causal LM's checkpoint with a score head loads as one) served by
    ``num_actors`` Ray actors that batch the verifiers' requests. It scores the chat
    [user: question, assistant: completion]; one label: its logit is the reward; several: the
    probability of the last."""

    path: str = ""  # a model folder, a Hub name, or "tiny-classifier" (a random one, for tests)
    name: str = "reward_model"  # the component's name (train/reward/<name>)
    num_actors: int = 1  # Ray actors serving the model
    batch_size: int = 16  # samples per forward pass, gathered across verifiers
    max_wait_ms: float = 20.0  # a partial batch waits at most this long for more requests
    max_length: int = 1024  # tokens per sample; longer ones keep their end
    dtype: str = "auto"  # auto: bfloat16 on a GPU, else float32


@dataclass(frozen=True)
class JudgeSettings(ServedReward):
    """An LLM judge (the config's ``reward.judge``): a model served by its own vLLM generator
    actors reads ``prompt`` (with ``{question}``, ``{completion}``, ``{reference}``) and its
    greedy reply is parsed into a reward: ``number`` (the first number, divided by ``scale``),
    ``letter`` (the first of ``letters``, the first best: 1.0 down to 0.0) or ``yes_no`` (1/0).
    A reply that does not parse is a failure (masked by default)."""

    model: str = ""  # a model folder, "smollm2", or "base": the run's own model, frozen
    # what the judge reads: {question}, {completion} and {reference} are filled in
    prompt: str = (
        "Rate the answer to the question from 0 (wrong) to 10 (perfect).\n\nQuestion: {question}\n\n"
        "Reference answer: {reference}\n\nAnswer to rate:\n<<<\n{completion}\n>>>\n\nReply with the rating only."
    )
    # the judge's reply read as a number / scale, a letter of `letters` (the first best), or yes/no
    parse: Literal["number", "letter", "yes_no"] = "number"
    scale: float = 10.0  # parse=number: the reply divided by this is the reward
    letters: str = "ABCDE"  # parse=letter: the grades, best first (1.0 down to 0.0)
    max_tokens: int = 16  # the judge's greedy reply, at most
    name: str = "judge"  # the component's name (train/reward/<name>)
    num_generators: int = 1  # the judge's vLLM generator actors
    max_completion_chars: int = 4000  # a longer completion is judged by its head and tail
    timeout_s: float = 25.0


@dataclass(frozen=True)
class TeacherSettings:
    """On-policy distillation (the config's ``reward.teacher``): a teacher on its own vLLM
    actors scores the student's own sampled tokens (its log-prob of each, given the tokens
    before); the reward is the negative reverse KL, log pi_teacher - log pi_student of each
    token. ``token``: per token, as dense rewards the learner adds to each token's advantage;
    ``sequence``: summed, added to the sample's reward before the advantages. The teacher must
    share the student's tokenizer (checked when it starts)."""

    model: str = ""  # a model folder, "smollm2", or a Hub name
    # token: each token's reward added to its advantage; sequence: summed into the sample's reward
    mode: Literal["token", "sequence"] = "token"
    weight: float = 1.0  # the term's weight
    name: str = "teacher"  # the component's name (train/reward/<name>)
    num_generators: int = 1  # the teacher's vLLM actors
    num_cpus: float = 1.0  # per actor
    num_gpus: float = 0.0  # per actor
    timeout_s: float = 120.0  # per call of up to 32 sequences; a teacher past it is restarted and the call repeated once

    @property
    def label(self) -> str:
        return self.name


NUMBER = r"(-?\d+(?:\.\d+)?)"
# where a judge states its verdict: the reply's start, or after a label; never a number or a
# letter quoted from the middle of its reasoning
RATING_AT = (rf"^\W*{NUMBER}", rf"\b(?:rating|score|grade|verdict)\b\W{{0,3}}{NUMBER}", rf"{NUMBER}\s*(?:/|out of)\s*\d+")


def parse_judgement(text: str, settings: JudgeSettings) -> float:
    """The reward a judge's reply gives, or a ``TermFailure`` quoting the reply. A number must
    open the reply, follow ``rating``/``score``/``grade``/``verdict``, or come as ``N/10`` (a
    reply with one number and nothing else to go by is read as that number); a letter must
    follow such a label (or ``answer``), or be the whole reply, or open it in parentheses;
    yes/no must open the reply or follow ``answer``/``verdict``."""
    import re

    found = None
    if settings.parse == "number":
        for pattern in RATING_AT:
            found = found or re.search(pattern, text, re.IGNORECASE)
        numbers = re.findall(NUMBER, text)
        value = float(found.group(1)) if found else float(numbers[0]) if len(numbers) == 1 else None
        if value is not None and 0.0 <= value <= settings.scale:
            return value / settings.scale
    elif settings.parse == "letter":
        letters = re.escape(settings.letters)
        labelled = rf"\b(?:rating|score|grade|verdict|answer)\b\W{{0,3}}([{letters}])\b"
        found = re.search(labelled, text, re.IGNORECASE) or re.search(rf"^\W*([{letters}])\W*$|^\W*\(([{letters}])\)", text)
        if found:
            letter = next(g for g in found.groups() if g)
            return 1.0 - settings.letters.index(letter) / max(1, len(settings.letters) - 1)
    else:
        found = re.search(r"^\W*(yes|no)\b", text, re.IGNORECASE) or re.search(r"\b(?:answer|verdict)\b\W{0,3}(yes|no)\b", text, re.IGNORECASE)
        if found:
            return float(found.group(1).lower() == "yes")
    raise TermFailure(f"judge reply does not parse as {settings.parse}: {text[:120]!r}")


def judge_prompt(settings: JudgeSettings, completion: str, problem: Problem) -> str:
    """The judge's prompt for one sample; an overlong completion keeps its head and tail."""
    limit = settings.max_completion_chars
    if len(completion) > limit:
        completion = completion[: limit // 2] + "\n[... cut ...]\n" + completion[-limit // 2 :]
    return settings.prompt.format(question=problem.question, completion=completion, reference=problem.answer or "(none)")


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
    except (Exception, asyncio.CancelledError) as exc:  # noqa: BLE001 - the whole batch failed
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
        except (Exception, asyncio.CancelledError) as exc:  # noqa: BLE001 - what the user's code raised
            results.append(Scored(failure=f"reward {term.name} raised {type(exc).__name__}: {exc}"[:500]))
            _log_once(term.name, f"reward {term.name} raised", exc)
    return results


def _log_once(name: str, message: str, exc: BaseException | None) -> None:
    if name in _logged:
        return
    _logged.add(name)
    logger.error("%s (pid %d; later failures of this reward are counted, not logged)", message, os.getpid(), exc_info=exc)
