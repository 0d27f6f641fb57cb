"""Scorers: (completion text, problem) -> Verdict, chosen by name.

``build_scorer`` runs inside each verifier actor: the code scorers open their own sandbox there
(one uid leased per slot), so nothing unpicklable crosses Ray.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from dataclasses import dataclass, field
from typing import Callable, Literal, Mapping

from rewards import choice, code, grid, gym, label, numeric, overlap
from rewards.choice import ChoiceMethod, choice_reward
from rewards.code import code_reward
from rewards.grid import grid_reward
from rewards.humaneval import humaneval_reward
from rewards.label import label_reward
from rewards.overlap import overlap_reward
from rewards.numeric import ExtractionMethod, numeric_reward
from rewards.sandbox import Sandbox, SandboxLimits, SandboxMode
from rewards.text import format_score
from contracts import Problem, Verdict

ScorerName = Literal["numeric", "choice", "label", "overlap", "grid", "code", "humaneval", "reasoning_gym"]
Scorer = Callable[[str, Problem], Verdict]


@dataclass(frozen=True)
class SandboxSettings:
    mode: SandboxMode = "bwrap"
    limits: SandboxLimits = SandboxLimits()
    python: str = "/usr/bin/python3"
    slots: int = 1

    def open(self) -> Sandbox:
        """This process's sandbox for these settings (one per process, shared by its scorers)."""
        return _open_sandbox(self)


@functools.cache
def _open_sandbox(settings: SandboxSettings) -> Sandbox:
    return Sandbox(settings.limits, slots=settings.slots, mode=settings.mode, python=settings.python)


@dataclass(frozen=True)
class RewardSettings:
    scorer: ScorerName = "numeric"
    weights: dict[str, float] | None = None  # None: the scorer's own defaults
    extraction: ExtractionMethod = "anchor"
    choice_extraction: ChoiceMethod = "word-boundary"
    sandbox: SandboxSettings = SandboxSettings()
    # regular expressions the completion must contain (e.g. "<think>.*</think>"); their share
    # is the ``format_tags`` component, paid by its weight
    required_format: tuple[str, ...] = ()
    # scorer-specific: ``labels`` for ``label``; ``dataset``, ``size``, ``seed``, ``config`` for ``reasoning_gym``
    options: dict = field(default_factory=dict, hash=False)


def _weights(settings: RewardSettings, defaults: Mapping[str, float]) -> Mapping[str, float]:
    if settings.weights is None:
        return defaults
    return {k: v for k, v in settings.weights.items() if k != "format_tags"}  # paid in build_scorer


def numeric_scorer(settings: RewardSettings) -> Scorer:
    weights = _weights(settings, numeric.DEFAULT_WEIGHTS)
    return lambda completion, problem: numeric_reward(completion, problem.answer, weights, settings.extraction)


def choice_scorer(settings: RewardSettings) -> Scorer:
    """The problem's ``meta["letters"]`` (e.g. "ABCD") are the options; A-E by default."""
    weights = _weights(settings, choice.DEFAULT_WEIGHTS)
    return lambda completion, problem: choice_reward(
        completion, problem.answer, weights, settings.choice_extraction, problem.meta.get("letters", choice.CHOICES)
    )


def label_scorer(settings: RewardSettings) -> Scorer:
    labels = tuple(settings.options.get("labels", ("True", "False")))
    weights = _weights(settings, label.DEFAULT_WEIGHTS)
    return lambda completion, problem: label_reward(completion, problem.answer, labels, weights)


def overlap_scorer(settings: RewardSettings) -> Scorer:
    weights = _weights(settings, overlap.DEFAULT_WEIGHTS)
    return lambda completion, problem: overlap_reward(completion, problem.answer, weights)


def grid_scorer(settings: RewardSettings) -> Scorer:
    weights = _weights(settings, grid.DEFAULT_WEIGHTS)
    return lambda completion, problem: grid_reward(completion, problem.answer, weights)


def code_scorer(settings: RewardSettings) -> Scorer:
    """Problems carry ``meta["entry_point"]`` and ``meta["tests"]``: [[arguments], expected] pairs."""
    sandbox = settings.sandbox.open()
    weights = _weights(settings, code.DEFAULT_WEIGHTS)

    def score(completion: str, problem: Problem) -> Verdict:
        try:
            entry_point, tests = problem.meta["entry_point"], problem.meta["tests"]
            cases = [(tuple(args), expected) for args, expected in tests]
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"code problem {problem.uid!r} needs meta entry_point and tests [[args], expected]: {exc!r}") from None
        return code_reward(sandbox, completion, entry_point, cases, weights)

    return score


def humaneval_scorer(settings: RewardSettings) -> Scorer:
    """The problem's ``meta["task_id"]`` (else its uid) names the HumanEval problem."""
    sandbox = settings.sandbox.open()
    weights = _weights(settings, code.DEFAULT_WEIGHTS)
    return lambda completion, problem: humaneval_reward(sandbox, problem.meta.get("task_id", problem.uid), completion, weights)


def reasoning_gym_scorer(settings: RewardSettings) -> Scorer:
    """``options``: the dataset's ``dataset`` name, ``size``, ``seed`` and ``config``, as the task
    built it; the problem's ``meta["index"]`` is the entry."""
    o = settings.options
    try:
        data = gym.gym_dataset(o["dataset"], o["size"], o["seed"], tuple(sorted(o.get("config", {}).items())))
    except KeyError as exc:
        raise ValueError(f"reasoning_gym scorer needs options dataset, size and seed: missing {exc}") from None
    weights = _weights(settings, gym.DEFAULT_WEIGHTS)
    return lambda completion, problem: gym.gym_reward(completion, data, problem.meta["index"], weights)


# the components each scorer reports (``format_tags`` too, with ``required_format``)
_CODE = ("passed_fraction", "all_passed", "syntax_valid", "compiles", "repetition")
COMPONENTS: dict[str, tuple[str, ...]] = {
    "numeric": ("correct", "correct_anchor", "correct_last", "correct_first", "format", "repetition"),
    "choice": ("correct", "correct_legacy", "correct_word_boundary", "repetition"),
    "label": ("correct", "repetition"),
    "overlap": ("f1", "correct", "repetition"),
    "grid": ("correct", "parsed", "repetition"),
    "code": _CODE,
    "humaneval": _CODE,
    "reasoning_gym": ("score", "correct", "repetition"),
}


SCORERS: dict[str, Callable[[RewardSettings], Scorer]] = {
    "numeric": numeric_scorer,
    "choice": choice_scorer,
    "label": label_scorer,
    "overlap": overlap_scorer,
    "grid": grid_scorer,
    "code": code_scorer,
    "humaneval": humaneval_scorer,
    "reasoning_gym": reasoning_gym_scorer,
}


def build_scorer(settings: RewardSettings) -> Scorer:
    if settings.scorer not in SCORERS:
        raise ValueError(f"unknown scorer {settings.scorer!r}; known: {sorted(SCORERS)}")
    scorer = SCORERS[settings.scorer](settings)
    if not settings.required_format:
        return scorer
    for pattern in settings.required_format:
        re.compile(pattern)  # a bad pattern fails here, naming itself, not in every sample
    pay = (settings.weights or {}).get("format_tags", 0.0)

    def with_format(completion: str, problem: Problem) -> Verdict:
        verdict = scorer(completion, problem)
        if verdict.status != "ok":
            return verdict
        share = format_score(completion, settings.required_format)
        components = {**verdict.components, "format_tags": share}
        return dataclasses.replace(verdict, reward=verdict.reward + pay * share, components=components)

    return with_format


def build_task_scorer(settings_by_task: dict[str, RewardSettings]) -> Scorer:
    """One scorer for a mixture: each problem is judged by its task's scorer (``Problem.task``)."""
    scorers = {task: build_scorer(settings) for task, settings in settings_by_task.items()}

    def score(completion: str, problem: Problem) -> Verdict:
        if problem.task not in scorers:
            raise ValueError(f"problem {problem.uid!r} is from task {problem.task!r}; this run scores {sorted(scorers)}")
        return scorers[problem.task](completion, problem)

    return score
