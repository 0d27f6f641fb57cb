"""Scorers: (completion text, problem) -> Verdict, chosen by name; and judges, which score a
batch of samples with a task's scorer plus the reward terms from outside the project
(``rewards.terms``: a user's function, an HTTP server).

A ``Judge`` is built inside each verifier actor: the code scorers open their own sandbox there
(one uid leased per slot) and the terms import the user's module there, so nothing
unpicklable crosses Ray.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import re
from dataclasses import dataclass, field
from typing import Callable, Literal, Mapping

from rewards import choice, code, grid, gym, humaneval, label, numeric, overlap
from rewards.choice import ChoiceMethod, choice_reward
from rewards.code import code_reward
from rewards.grid import grid_reward
from rewards.humaneval import humaneval_reward
from rewards.label import label_reward
from rewards.overlap import overlap_reward
from rewards.numeric import ExtractionMethod, numeric_reward
from rewards.sandbox import CgroupMode, Sandbox, SandboxLimits, SandboxMode
from rewards.terms import FunctionReward, HttpReward, Item, JudgeSettings, RewardModelSettings, TeacherSettings, TermSource, score_term
from rewards.text import format_score
from contracts import Problem, Verdict

logger = logging.getLogger(__name__)

ScorerName = Literal["numeric", "choice", "label", "overlap", "grid", "code", "humaneval", "reasoning_gym"]
# a task scored by the run's reward terms alone (reward.functions, reward.http), no scorer of its own
TERMS_ONLY = "reward"
Scorer = Callable[[str, Problem], Verdict]
BatchScorer = Callable[[list[Item]], list[Verdict]]  # (completion, problem) pairs -> verdicts, in order


@dataclass(frozen=True)
class SandboxSettings:
    """Where model-written code runs (docs/sandbox.md): the config's ``verifier.sandbox``;
    the limits apply per program run."""

    # bwrap: namespaces, a read-only root and seccomp (docs/sandbox.md); rlimits: resource limits
    # only, no isolation (for machines without user namespaces; warns on every run)
    mode: SandboxMode = "bwrap"
    limits: SandboxLimits = SandboxLimits()
    python: str = "/usr/bin/python3"  # a system interpreter the unprivileged uid can read
    slots: int = 1  # programs one verifier runs at once (one uid each; more than 1 needs root)
    # auto: a cgroup per slot where one can be made, per-process limits (and a warning) where
    # not; required: refuse to start without one; off: per-process limits
    cgroup: CgroupMode = "auto"
    allow_own_uid: bool = False  # rlimits mode without root: programs as the verifier's own uid

    def open(self) -> Sandbox:
        """This process's sandbox for these settings (one per process, shared by its scorers)."""
        return _open_sandbox(self)


@functools.cache
def _open_sandbox(settings: SandboxSettings) -> Sandbox:
    return Sandbox(
        settings.limits, slots=settings.slots, mode=settings.mode, python=settings.python, cgroup=settings.cgroup,
        allow_own_uid=settings.allow_own_uid,
    )  # fmt: skip


@dataclass(frozen=True)
class RewardSettings:
    """How rewards are weighted and extracted (docs/tasks-and-rewards.md#rewards): the config's ``reward``
    section, for every task (a task's own ``weights`` replace these)."""

    # None: the scorer's own (numeric: correct 1.0 + format 0.1; code: all_passed 1.0; others: correct 1.0)
    weights: dict[str, float] | None = None
    # how a numeric answer is found in a completion: anchor (after "answer is", "####" or in
    # \boxed{}, else the last number), last, first, or simple (the first number after the last
    # "=", else the first number)
    extraction: ExtractionMethod = "anchor"
    choice_extraction: ChoiceMethod = "word-boundary"  # how a multiple-choice letter is found: word-boundary or legacy
    # regular expressions the completion must contain (e.g. "<think>.*</think>"); their share
    # is the ``format_tags`` component (give it a weight to pay)
    required_format: tuple[str, ...] = ()
    # DAPO's soft overlong punishment (rewards.shaping): the last overlong_buffer tokens before
    # rollout.max_tokens cost up to overlong_penalty reward, linearly; 0 = off
    overlong_buffer: int = 0
    overlong_penalty: float = 1.0  # the overlong punishment's largest cost (see overlong_buffer)
    # reward terms from outside the project (rewards.terms; docs/your-problem.md), added with their
    # weights to every task's reward (a task's ``rewards`` picks some): the user's functions
    functions: tuple[FunctionReward, ...] = ()
    http: HttpReward | None = None  # an HTTP reward server
    model: RewardModelSettings | None = None  # a reward model served by Ray actors
    judge: JudgeSettings | None = None  # an LLM judge on its own vLLM actors
    # on-policy distillation: a teacher's log-probs of the student's tokens (scored beside the
    # verifiers, before the advantages: cluster.features.distill)
    teacher: TeacherSettings | None = None
    # a task scored by terms alone counts a sample correct when a term's dict says so
    # (``correct``), else when the summed reward reaches this
    correct_at: float = 1.0

    def terms(self) -> tuple[FunctionReward | HttpReward | RewardModelSettings | JudgeSettings, ...]:
        """Every configured reward term's settings, in the order the terms apply."""
        return (*self.functions, *(t for t in (self.http, self.model, self.judge) if t is not None))


@dataclass(frozen=True)
class ScorerSpec:
    """Everything a verifier needs to build one task's scorer: which scorer, the run's reward
    settings, the sandbox, and the task's own options."""

    scorer: ScorerName | Literal["reward"] = "numeric"  # "reward": the terms alone
    reward: RewardSettings = RewardSettings()
    sandbox: SandboxSettings = SandboxSettings()
    # scorer-specific: ``labels`` for ``label``; ``dataset``, ``size``, ``seed``, ``config`` for ``reasoning_gym``
    options: dict = field(default_factory=dict, hash=False)
    terms: tuple[TermSource, ...] = ()  # the reward terms added to this task's reward, opened in the actor


def _weights(spec: ScorerSpec, defaults: Mapping[str, float]) -> Mapping[str, float]:
    if spec.reward.weights is None:
        return defaults
    return {k: v for k, v in spec.reward.weights.items() if k != "format_tags"}  # paid in build_scorer


def numeric_scorer(spec: ScorerSpec) -> Scorer:
    weights = _weights(spec, numeric.DEFAULT_WEIGHTS)
    return lambda completion, problem: numeric_reward(completion, problem.answer, weights, spec.reward.extraction)


def choice_scorer(spec: ScorerSpec) -> Scorer:
    """The problem's ``meta["letters"]`` (e.g. "ABCD") are the options; A-E by default."""
    weights = _weights(spec, choice.DEFAULT_WEIGHTS)
    return lambda completion, problem: choice_reward(
        completion, problem.answer, weights, spec.reward.choice_extraction, problem.meta.get("letters", choice.CHOICES)
    )


def label_scorer(spec: ScorerSpec) -> Scorer:
    labels = tuple(spec.options.get("labels", ("True", "False")))
    weights = _weights(spec, label.DEFAULT_WEIGHTS)
    return lambda completion, problem: label_reward(completion, problem.answer, labels, weights)


def overlap_scorer(spec: ScorerSpec) -> Scorer:
    weights = _weights(spec, overlap.DEFAULT_WEIGHTS)
    return lambda completion, problem: overlap_reward(completion, problem.answer, weights)


def grid_scorer(spec: ScorerSpec) -> Scorer:
    weights = _weights(spec, grid.DEFAULT_WEIGHTS)
    return lambda completion, problem: grid_reward(completion, problem.answer, weights)


def code_scorer(spec: ScorerSpec) -> Scorer:
    """Problems carry ``meta["entry_point"]`` and ``meta["tests"]``: [[arguments], expected] pairs,
    and may carry ``meta["reference"]``, a reference solution (``token_accuracy``)."""
    sandbox = spec.sandbox.open()
    weights = _weights(spec, code.DEFAULT_WEIGHTS)

    def score(completion: str, problem: Problem) -> Verdict:
        try:
            entry_point, tests = problem.meta["entry_point"], problem.meta["tests"]
            cases = [(tuple(args), expected) for args, expected in tests]
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"code problem {problem.uid!r} needs meta entry_point and tests [[args], expected]: {exc!r}") from None
        return code_reward(sandbox, completion, entry_point, cases, weights, problem.meta.get("reference"))

    return score


def humaneval_scorer(spec: ScorerSpec) -> Scorer:
    """The problem's ``meta["task_id"]`` (else its uid) names the HumanEval problem. Refuses
    to start where the sandbox's programs could read the package's canonical solutions."""
    sandbox = spec.sandbox.open()
    sandbox.refuse_exposed(humaneval.hidden_data(), "HumanEval's tests and canonical solutions")
    weights = _weights(spec, code.DEFAULT_WEIGHTS)
    return lambda completion, problem: humaneval_reward(sandbox, problem.meta.get("task_id", problem.uid), completion, weights)


def reasoning_gym_scorer(spec: ScorerSpec) -> Scorer:
    """``options``: the dataset's ``dataset`` name, ``size``, ``seed`` and ``config``, as the task
    built it; the problem's ``meta["index"]`` is the entry."""
    o = spec.options
    try:
        data = gym.gym_dataset(o["dataset"], o["size"], o["seed"], tuple(sorted(o.get("config", {}).items())))
    except KeyError as exc:
        raise ValueError(f"reasoning_gym scorer needs options dataset, size and seed: missing {exc}") from None
    weights = _weights(spec, gym.DEFAULT_WEIGHTS)
    return lambda completion, problem: gym.gym_reward(completion, data, problem.meta["index"], weights)


# the components each scorer reports (``format_tags`` too, with ``required_format``)
# token_accuracy: only where the problem has a reference solution (HumanEval, meta["reference"])
_CODE = ("passed_fraction", "all_passed", "syntax_valid", "compiles", "repetition", "token_accuracy")
COMPONENTS: dict[str, tuple[str, ...]] = {
    "numeric": ("correct", "correct_anchor", "correct_last", "correct_first", "correct_simple", "format", "repetition"),
    "choice": ("correct", "correct_legacy", "correct_word_boundary", "repetition"),
    "label": ("correct", "repetition"),
    "overlap": ("f1", "correct", "repetition"),
    "grid": ("correct", "parsed", "repetition"),
    "code": _CODE,
    "humaneval": _CODE,
    "reasoning_gym": ("score", "correct", "repetition"),
}


SCORERS: dict[str, Callable[[ScorerSpec], Scorer]] = {
    "numeric": numeric_scorer,
    "choice": choice_scorer,
    "label": label_scorer,
    "overlap": overlap_scorer,
    "grid": grid_scorer,
    "code": code_scorer,
    "humaneval": humaneval_scorer,
    "reasoning_gym": reasoning_gym_scorer,
}


# what a completion's shape alone (deep nesting, huge literals) can make a parser raise: the
# completion's failure, scored as one, never masked as the verifier's (a completion that could
# break its scorer would otherwise choose to be left out of training)
COMPLETION_FAULTS = (RecursionError, MemoryError, OverflowError)


def unscorable(scorer: Scorer) -> Scorer:
    """``scorer``, with ``COMPLETION_FAULTS`` turned into a failed verdict (reward 0, outcome
    ``unscorable``); any other exception is still the verifier's own (an infrastructure error)."""

    def score(completion: str, problem: Problem) -> Verdict:
        try:
            return scorer(completion, problem)
        except COMPLETION_FAULTS as exc:
            return Verdict(reward=0.0, correct=False, outcome="unscorable", error=f"the completion broke its scorer: {type(exc).__name__}: {exc}"[:300])

    return score


def build_scorer(spec: ScorerSpec) -> Scorer:
    if spec.scorer not in SCORERS:
        raise ValueError(f"unknown scorer {spec.scorer!r}; known: {sorted(SCORERS)}")
    scorer = unscorable(SCORERS[spec.scorer](spec))
    required = spec.reward.required_format
    if not required:
        return scorer
    for pattern in required:
        re.compile(pattern)  # a bad pattern fails here, naming itself, not in every sample
    pay = (spec.reward.weights or {}).get("format_tags", 0.0)

    def with_format(completion: str, problem: Problem) -> Verdict:
        verdict = scorer(completion, problem)
        if verdict.status != "ok":
            return verdict
        share = format_score(completion, required)
        components = {**verdict.components, "format_tags": share}
        return dataclasses.replace(verdict, reward=verdict.reward + pay * share, components=components)

    return with_format


def per_item(scorer: Scorer) -> BatchScorer:
    """``scorer`` on a batch: a sample whose scoring raised gets an infrastructure error (the
    pool retries it), the others their verdicts."""

    def score(items: list[Item]) -> list[Verdict]:
        verdicts = []
        for completion, problem in items:
            try:
                verdicts.append(scorer(completion, problem))
            except Exception as exc:  # noqa: BLE001 - one bad sample must not sink its batch
                logger.exception("scorer failed on problem %s", problem.uid)
                verdicts.append(Verdict.infra_error(f"scorer raised {type(exc).__name__}: {exc}"[:500]))
        return verdicts

    return score


class Judge:
    """One task's judge: its scorer's verdict (none where the task is scored by terms alone)
    plus each reward term's ``weight * value``, the values reported as components; a term's
    failure is handled by its ``on_error`` (``rewards.terms``)."""

    batch = True  # scores a batch (a verifier calls it once per job)

    def __init__(self, spec: ScorerSpec):
        self.scorer = None if spec.scorer == TERMS_ONLY else per_item(build_scorer(spec))
        if self.scorer is None and not spec.terms and spec.reward.teacher is None:
            raise ValueError(f"scorer {TERMS_ONLY!r} scores with the run's reward terms, and none is configured (reward.functions, http, model, judge, teacher)")
        self.terms = [source.open() for source in spec.terms]
        self.correct_at = spec.reward.correct_at

    def __call__(self, items: list[Item]) -> list[Verdict]:
        base: list[Verdict | None] = self.scorer(items) if self.scorer else [None] * len(items)
        judged = [i for i, v in enumerate(base) if v is None or v.status == "ok"]  # infrastructure errors are retried
        results = [score_term(term, [items[i] for i in judged]) for term in self.terms]
        verdicts = list(base)
        for k, i in enumerate(judged):
            verdicts[i] = self._combine(base[i], [r[k] for r in results])
        return verdicts

    def _combine(self, base: Verdict | None, scored: list) -> Verdict:
        reward = base.reward if base else 0.0
        components = dict(base.components) if base else {}
        corrects, faults, masked, stop = [], [], None, None
        for term, result in zip(self.terms, scored):
            if result.failure is not None:
                faults.append(term.name)
                if term.on_error == "stop":
                    stop = stop or result.failure
                elif term.on_error == "mask":
                    masked = masked or result.failure
                else:  # zero: counted, not silent
                    components[term.name] = 0.0
                continue
            reward += term.weight * result.reward
            components[term.name] = result.reward
            components |= {f"{term.name}/{key}": v for key, v in result.components.items()}
            if "correct" in result.components:
                corrects.append(result.components["correct"] > 0.5)
        if stop is not None or masked is not None:
            status = "stop" if stop is not None else "masked"
            return Verdict(reward=0.0, correct=False, components=components, status=status, error=stop or masked, faults=tuple(faults))
        if base is not None:
            return dataclasses.replace(base, reward=reward, components=components, faults=tuple(faults))
        correct = all(corrects) if corrects else reward >= self.correct_at
        return Verdict(reward=reward, correct=correct, components=components, faults=tuple(faults))


class TaskJudge:
    """One judge for a mixture: each problem is judged by its task's (``Problem.task``)."""

    batch = True

    def __init__(self, specs_by_task: dict[str, ScorerSpec]):
        self.judges = {task: Judge(spec) for task, spec in specs_by_task.items()}

    def __call__(self, items: list[Item]) -> list[Verdict]:
        verdicts: list[Verdict | None] = [None] * len(items)
        by_task: dict[str, list[int]] = {}
        for i, (_, problem) in enumerate(items):
            if problem.task in self.judges:
                by_task.setdefault(problem.task, []).append(i)
            else:
                verdicts[i] = Verdict.infra_error(f"problem {problem.uid!r} is from task {problem.task!r}; this run scores {sorted(self.judges)}")
        for task, indices in by_task.items():
            for i, verdict in zip(indices, self.judges[task]([items[i] for i in indices])):
                verdicts[i] = verdict
        return verdicts  # type: ignore[return-value]


def as_batch(scorer: Scorer | BatchScorer) -> BatchScorer:
    """A judge as it is (``batch = True``); a per-sample scorer through ``per_item``."""
    return scorer if getattr(scorer, "batch", False) else per_item(scorer)  # type: ignore[arg-type]
