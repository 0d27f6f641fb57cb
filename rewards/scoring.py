"""Scorers: (completion text, problem) -> Verdict, chosen by name.

``build_scorer`` runs inside each verifier actor: the code scorers open their own sandbox there
(one uid leased per slot), so nothing unpicklable crosses Ray.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Callable, Literal, Mapping

from rewards import choice, code, grid, numeric
from rewards.choice import ChoiceMethod, choice_reward
from rewards.code import code_reward
from rewards.grid import grid_reward
from rewards.humaneval import humaneval_reward
from rewards.numeric import ExtractionMethod, numeric_reward
from rewards.sandbox import Sandbox, SandboxLimits, SandboxMode
from rewards.text import format_score
from rollout.contracts import Problem, Verdict

ScorerName = Literal["numeric", "choice", "grid", "code", "humaneval"]
Scorer = Callable[[str, Problem], Verdict]


@dataclass(frozen=True)
class SandboxSettings:
    mode: SandboxMode = "bwrap"
    limits: SandboxLimits = SandboxLimits()
    python: str = "/usr/bin/python3"
    slots: int = 1

    def open(self) -> Sandbox:
        return Sandbox(self.limits, slots=self.slots, mode=self.mode, python=self.python)


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


def _weights(settings: RewardSettings, defaults: Mapping[str, float]) -> Mapping[str, float]:
    if settings.weights is None:
        return defaults
    return {k: v for k, v in settings.weights.items() if k != "format_tags"}  # paid in build_scorer


def numeric_scorer(settings: RewardSettings) -> Scorer:
    weights = _weights(settings, numeric.DEFAULT_WEIGHTS)
    return lambda completion, problem: numeric_reward(completion, problem.answer, weights, settings.extraction)


def choice_scorer(settings: RewardSettings) -> Scorer:
    weights = _weights(settings, choice.DEFAULT_WEIGHTS)
    return lambda completion, problem: choice_reward(completion, problem.answer, weights, settings.choice_extraction)


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


SCORERS: dict[str, Callable[[RewardSettings], Scorer]] = {
    "numeric": numeric_scorer,
    "choice": choice_scorer,
    "grid": grid_scorer,
    "code": code_scorer,
    "humaneval": humaneval_scorer,
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
