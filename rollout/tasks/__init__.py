"""Tasks behind one interface (``rollout.tasks.base.Task``), chosen and mixed by the run config.

``build_task(name, **settings)`` makes any task by name; ``TaskMixture`` draws each step's
prompts from several tasks by weight (seeded) and raises a procedural task's difficulty when
its recent accuracy passes a threshold (``Curriculum``).
"""

from __future__ import annotations

import collections
import inspect
import random
from dataclasses import dataclass
from typing import Any, Iterator

from contracts import Problem
from rollout.tasks.arithmetic import ArithmeticTask
from rollout.tasks.base import SPLITS, NoUsableRows, Split, Task, TaskReward, split_of
from rollout.tasks.datasets import DATASETS, GENERIC, DatasetTask
from rollout.tasks.packaged import ArcTask, HumanEvalTask, ReasoningGymTask
from rollout.tasks.procedural import FAMILIES, ProceduralTask

TASK_NAMES = (GENERIC, "arithmetic", *FAMILIES, *DATASETS, "humaneval", "arc_agi", "reasoning_gym")

__all__ = ["SPLITS", "TASK_NAMES", "Curriculum", "NoUsableRows", "Split", "Task", "TaskMixture", "TaskReward", "build_task", "split_of"]


def build_task(name: str, **settings: Any) -> Task:
    """A task by name; ``settings`` are the constructor's keyword arguments (unknown ones are
    an error naming them)."""
    if name == "arithmetic":
        return _construct(ArithmeticTask, name, **settings)
    if name in FAMILIES:
        return _construct(ProceduralTask, name, family=name, **settings)
    if name in DATASETS or name == GENERIC:
        return _construct(DatasetTask, name, dataset=name, **settings)
    if name == "humaneval":
        return _construct(HumanEvalTask, name, **settings)
    if name == "arc_agi":
        return _construct(ArcTask, name, **settings)
    if name == "reasoning_gym":
        return _construct(ReasoningGymTask, name, **settings)
    raise ValueError(f"unknown task {name!r}; known: {list(TASK_NAMES)}")


def _construct(cls, name: str, **settings: Any):
    accepted = set(inspect.signature(cls).parameters)
    unknown = sorted(set(settings) - accepted)
    if unknown:
        raise ValueError(f"task {name}: unknown settings {unknown}; it takes {sorted(accepted - {'family', 'dataset'})}")
    return cls(**settings)


@dataclass
class Curriculum:
    """Difficulty of a procedural task follows its recent training accuracy: up one level when
    the mean over the last ``window`` steps reaches ``raise_at``, down one when it falls to
    ``lower_at``; the window restarts after each change."""

    raise_at: float = 0.8
    lower_at: float = 0.2
    window: int = 4
    min_difficulty: int = 1
    max_difficulty: int = 10

    def __post_init__(self):
        self.history: collections.deque[float] = collections.deque(maxlen=self.window)

    def update(self, task: Task, accuracy: float) -> int:
        """Record one step's accuracy and return the (possibly changed) difficulty."""
        self.history.append(accuracy)
        difficulty = task.difficulty
        if len(self.history) == self.window:
            mean = sum(self.history) / self.window
            if mean >= self.raise_at and difficulty < self.max_difficulty:
                difficulty += 1
            elif mean <= self.lower_at and difficulty > self.min_difficulty:
                difficulty -= 1
            if difficulty != task.difficulty:
                task.difficulty = difficulty
                self.history.clear()
        return task.difficulty


class TaskMixture:
    """Several tasks, drawn by weight; each problem carries its task's id (``Problem.task``)."""

    def __init__(self, tasks: list[Task], weights: list[float], seed: int = 0, curricula: dict[str, Curriculum] | None = None):
        ids = [t.id for t in tasks]
        if len(set(ids)) != len(ids):
            raise ValueError(f"task ids must be unique in a mixture: {ids} (give each an 'id')")
        if not tasks or any(w <= 0 for w in weights) or len(weights) != len(tasks):
            raise ValueError(f"a mixture needs at least one task and a positive weight for each: {dict(zip(ids, weights))}")
        self.tasks = {t.id: t for t in tasks}
        self.weights = dict(zip(ids, weights))
        self.curricula = curricula or {}
        for task_id in self.curricula:
            if not hasattr(self.tasks[task_id], "difficulty"):
                raise ValueError(f"task {task_id}: a curriculum needs a task with a difficulty (arithmetic or a procedural task)")
        self._rng = random.Random(seed)
        self._streams: dict[str, Iterator[Problem]] = {}
        # the data position: problems drawn per task, and the draw count at each difficulty change
        self._drawn: collections.Counter[str] = collections.Counter()
        self._changes: dict[str, list[tuple[int, int]]] = {}

    def check(self, splits: tuple[Split, ...] = ("train", "validation")) -> None:
        """Load every task's splits now: a task without usable rows stops the run here,
        before any model is loaded."""
        for task in self.tasks.values():
            for split in splits:
                next(task.problems(split))  # raises NoUsableRows naming the task

    def sample(self, n: int) -> list[Problem]:
        """``n`` training problems, each from a task drawn by weight."""
        ids = self._rng.choices(list(self.weights), weights=list(self.weights.values()), k=n)
        problems = []
        for task_id in ids:
            if task_id not in self._streams:
                self._streams[task_id] = self.tasks[task_id].problems("train")
            problems.append(next(self._streams[task_id]))
            self._drawn[task_id] += 1
        return problems

    def eval_sets(self, split: Split = "validation") -> dict[str, list[Problem]]:
        return {task_id: list(task.problems(split)) for task_id, task in self.tasks.items()}

    def update_curricula(self, accuracy_by_task: dict[str, float]) -> dict[str, float]:
        """Feed each curriculum its task's accuracy this step; returns ``task/<id>/difficulty``."""
        metrics = {}
        for task_id, curriculum in self.curricula.items():
            task = self.tasks[task_id]
            if task_id in accuracy_by_task:
                before = task.difficulty
                if curriculum.update(task, accuracy_by_task[task_id]) != before:
                    self._changes.setdefault(task_id, []).append((self._drawn[task_id], task.difficulty))
            metrics[f"task/{task_id}/difficulty"] = float(task.difficulty)
        return metrics

    # -- the data position (a checkpoint keeps it) -------------------------------------------

    def state(self) -> dict:
        """JSON-ready: the mixing RNG, problems drawn per task, difficulty changes, curricula."""
        version, internal, gauss = self._rng.getstate()
        return {
            "rng": [version, list(internal), gauss],
            "drawn": dict(self._drawn),
            "difficulty_changes": {k: [list(c) for c in v] for k, v in self._changes.items()},
            "curricula": {k: list(c.history) for k, c in self.curricula.items()},
        }

    def load_state(self, state: dict) -> None:
        """Continue from ``state`` on a freshly built mixture (tasks at their configured
        difficulty): each task's stream is replayed to its position, changing the difficulty
        where it changed, so the next problems are exactly those the saved run would draw."""
        unknown = sorted(set(state["drawn"]) - set(self.tasks))
        if unknown:
            raise ValueError(f"saved data position names tasks this config lacks: {unknown}")
        version, internal, gauss = state["rng"]
        self._rng.setstate((version, tuple(internal), gauss))
        self._changes = {k: [(int(a), int(b)) for a, b in v] for k, v in state["difficulty_changes"].items()}
        self._drawn = collections.Counter()
        self._streams = {}
        for task_id, task in self.tasks.items():
            count, changes = state["drawn"].get(task_id, 0), list(self._changes.get(task_id, []))
            for i in range(count):
                while changes and changes[0][0] == i:
                    task.difficulty = changes.pop(0)[1]
                if task_id not in self._streams:  # made at the first draw, as in sample()
                    self._streams[task_id] = task.problems("train")
                next(self._streams[task_id])
            self._drawn[task_id] = count
            for _, difficulty in changes:  # changed after its last draw
                task.difficulty = difficulty
        for task_id, history in state["curricula"].items():
            if task_id in self.curricula:
                self.curricula[task_id].history.clear()
                self.curricula[task_id].history.extend(history)
