"""Scorers: (completion text, problem) -> Verdict, chosen by name.

``build_scorer`` runs inside each verifier actor: the code scorers open their own sandbox there
(one uid leased per slot), so nothing unpicklable crosses Ray.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

from rewards import choice, code, grid, numeric
from rewards.choice import ChoiceMethod, choice_reward
from rewards.code import code_reward
from rewards.grid import grid_reward
from rewards.humaneval import humaneval_reward
from rewards.numeric import ExtractionMethod, numeric_reward
from rewards.sandbox import Sandbox, SandboxLimits, SandboxMode
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


def numeric_scorer(settings: RewardSettings) -> Scorer:
    weights = settings.weights or numeric.DEFAULT_WEIGHTS
    return lambda completion, problem: numeric_reward(completion, problem.answer, weights, settings.extraction)


def choice_scorer(settings: RewardSettings) -> Scorer:
    weights = settings.weights or choice.DEFAULT_WEIGHTS
    return lambda completion, problem: choice_reward(completion, problem.answer, weights, settings.choice_extraction)


def grid_scorer(settings: RewardSettings) -> Scorer:
    weights = settings.weights or grid.DEFAULT_WEIGHTS
    return lambda completion, problem: grid_reward(completion, problem.answer, weights)


def code_scorer(settings: RewardSettings) -> Scorer:
    """Problems carry ``meta["entry_point"]`` and ``meta["tests"]``: [[arguments], expected] pairs."""
    sandbox = settings.sandbox.open()
    weights = settings.weights or code.DEFAULT_WEIGHTS

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
    weights = settings.weights or code.DEFAULT_WEIGHTS
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
    return SCORERS[settings.scorer](settings)
