"""The task interface: problems for named splits, a prompt template, and the reward they need.

A task is a plain object. ``problems(split)`` yields ``Problem``s: for ``train`` an endless
stream (procedural tasks generate, dataset tasks cycle through their rows in a seeded order),
for ``validation`` and ``test`` a fixed, finite list. ``reward`` names the scorer (a name in
``rewards.scoring.SCORERS``) and its settings. Every problem carries its task's id
(``Problem.task``), so a mixture of tasks is scored by the right scorer.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from typing import Iterator, Literal, Protocol

from contracts import Problem

Split = Literal["train", "validation", "test"]
SPLITS: tuple[Split, ...] = ("train", "validation", "test")


@dataclass(frozen=True)
class TaskReward:
    """What a task's problems are scored with: a scorer name and its settings (the run's
    ``reward`` section adds weights and extraction methods)."""

    scorer: str = "numeric"
    options: dict = field(default_factory=dict, hash=False)  # scorer-specific (labels, gym dataset)


class Task(Protocol):
    id: str
    reward: TaskReward
    system_prompt: str | None

    def problems(self, split: Split) -> Iterator[Problem]: ...


class NoUsableRows(ValueError):
    """A task has no usable problem in a split it needs; the message names the task."""


def split_of(key: str, validation_percent: int, test_percent: int) -> Split:
    """A fixed function of the problem's text: no seed or sample size can move a problem from
    one split to another, so the splits never share a problem."""
    bucket = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) % 100
    if bucket < validation_percent:
        return "validation"
    if bucket < validation_percent + test_percent:
        return "test"
    return "train"


def check_split(split: str) -> Split:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; known: {list(SPLITS)}")
    return split  # type: ignore[return-value]


def endless(problems: list[Problem], seed: int) -> Iterator[Problem]:
    """A fixed set as an endless training stream, reshuffled each pass (seeded)."""
    rng = random.Random(seed)
    while True:
        order = list(range(len(problems)))
        rng.shuffle(order)
        for i in order:
            yield problems[i]
