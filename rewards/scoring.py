"""Scorers: pure functions (completion text, expected answer) -> Verdict, chosen by name."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal

from rewards.choice import ChoiceMethod, choice_reward
from rewards.grid import grid_reward
from rewards.numeric import DEFAULT_WEIGHTS, ExtractionMethod, numeric_reward
from rollout.contracts import Verdict

ScorerName = Literal["numeric", "choice", "grid"]


@dataclass(frozen=True)
class RewardSettings:
    scorer: ScorerName = "numeric"
    weights: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_WEIGHTS))
    extraction: ExtractionMethod = "anchor"
    choice_extraction: ChoiceMethod = "word-boundary"


def numeric_scorer(settings: RewardSettings) -> Callable[[str, str], Verdict]:
    return lambda completion, answer: numeric_reward(completion, answer, settings.weights, settings.extraction)


def choice_scorer(settings: RewardSettings) -> Callable[[str, str], Verdict]:
    return lambda completion, answer: choice_reward(completion, answer, settings.weights, settings.choice_extraction)


def grid_scorer(settings: RewardSettings) -> Callable[[str, str], Verdict]:
    return lambda completion, answer: grid_reward(completion, answer, settings.weights)


SCORERS: dict[str, Callable[[RewardSettings], Callable[[str, str], Verdict]]] = {
    "numeric": numeric_scorer,
    "choice": choice_scorer,
    "grid": grid_scorer,
}


def build_scorer(settings: RewardSettings) -> Callable[[str, str], Verdict]:
    if settings.scorer not in SCORERS:
        raise ValueError(f"unknown scorer {settings.scorer!r}; known: {sorted(SCORERS)}")
    return SCORERS[settings.scorer](settings)
