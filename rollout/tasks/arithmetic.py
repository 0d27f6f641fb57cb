"""Procedural arithmetic: integer expressions with + - * and parentheses.

Seeded and infinite. The train and held-out splits never share a problem: an expression's
split is a fixed function of its text (``rollout.tasks.base.split_of``, as for every task), so
no seed or sample size can leak a held-out problem into training.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Iterator

from contracts import Problem
from rollout.tasks.base import NoUsableRows, Split, TaskReward, check_split, split_of

DEFAULT_TEMPLATE = "What is {expression}? Give the final answer as 'Answer: <number>'."


@dataclass(frozen=True)
class ArithmeticLevel:
    num_operands: int
    max_operand: int
    ops: str
    parentheses: bool


# difficulty -> shape of the expressions. 1 is "a + b" / "a - b" with operands up to 20.
LEVELS = {
    1: ArithmeticLevel(num_operands=2, max_operand=20, ops="+-", parentheses=False),
    2: ArithmeticLevel(num_operands=2, max_operand=20, ops="+-*", parentheses=False),
    3: ArithmeticLevel(num_operands=3, max_operand=12, ops="+-*", parentheses=False),
    4: ArithmeticLevel(num_operands=3, max_operand=12, ops="+-*", parentheses=True),
    5: ArithmeticLevel(num_operands=4, max_operand=20, ops="+-*", parentheses=True),
}


def random_expression(rng: random.Random, level: ArithmeticLevel) -> str:
    operands = [str(rng.randint(0, level.max_operand)) for _ in range(level.num_operands)]
    ops = [rng.choice(level.ops) for _ in range(level.num_operands - 1)]
    terms = [operands[0]]
    for op, operand in zip(ops, operands[1:]):
        terms += [op, operand]
    if level.parentheses and level.num_operands >= 3:
        # wrap one adjacent pair of operands: terms index 2k is an operand
        start = 2 * rng.randrange(level.num_operands - 1)
        terms[start] = "(" + terms[start]
        terms[start + 2] = terms[start + 2] + ")"
    return " ".join(terms)


def evaluate(expression: str) -> int:
    """Evaluate an expression built by ``random_expression`` (digits, + - *, parentheses)."""
    if not set(expression) <= set("0123456789+-*() "):
        raise ValueError(f"not an arithmetic expression: {expression!r}")
    return int(eval(expression, {"__builtins__": {}}, {}))  # noqa: S307 - checked alphabet


class ArithmeticTask:
    """Seeded stream of arithmetic problems; ``difficulty`` picks a row of ``LEVELS``.

    Splits: ``validation`` is the held-out set (``eval_size`` problems, the same for every run
    of this difficulty, ``eval_percent`` of all expressions); ``test`` takes the next
    ``test_percent`` (0 by default: no test split).
    """

    def __init__(
        self,
        difficulty: int = 1,
        seed: int = 0,
        eval_percent: int = 20,
        template: str = DEFAULT_TEMPLATE,
        id: str = "arithmetic",
        eval_size: int = 200,
        test_percent: int = 0,
        system_prompt: str | None = None,
    ):
        if "{expression}" not in template:
            raise ValueError(f"arithmetic prompt template must contain '{{expression}}': {template!r}")
        self.id = id
        self.template = template
        self.difficulty = difficulty
        self.seed = seed
        self.eval_percent = eval_percent
        self.eval_size = eval_size
        self.test_percent = test_percent
        self.system_prompt = system_prompt
        self.reward = TaskReward("numeric")

    @property
    def difficulty(self) -> int:
        return self._difficulty

    @difficulty.setter
    def difficulty(self, value: int) -> None:
        if value not in LEVELS:
            raise ValueError(f"arithmetic difficulty must be one of {sorted(LEVELS)}, got {value}")
        self._difficulty = value
        self.level = LEVELS[value]

    def _problems(self, split: Split, seed: int) -> Iterator[Problem]:
        rng = random.Random(seed)
        while True:
            expression = random_expression(rng, self.level)
            if split_of(expression, self.eval_percent, self.test_percent) != split:
                continue
            yield Problem(
                uid=f"{'eval' if split == 'validation' else split}:{expression}",
                question=self.template.format(expression=expression),
                answer=str(evaluate(expression)),
                split=split,
                meta={"expression": expression},
                task=self.id,
                difficulty=self._difficulty,
            )

    def train_stream(self) -> Iterator[Problem]:
        """Endless training problems (repeats allowed, as in any sampled curriculum)."""
        return self._problems("train", self.seed)

    def eval_set(self, n: int, split: Split = "validation") -> list[Problem]:
        """``n`` distinct held-out problems, the same for every run of this difficulty."""
        problems: dict[str, Problem] = {}
        stream = self._problems(split, seed=10_007)
        repeats = 0
        for _ in range(200 * n):
            problem = next(stream)
            repeats = repeats + 1 if problem.uid in problems else 0
            problems.setdefault(problem.uid, problem)
            if len(problems) == n:
                return list(problems.values())
            # k problems found and 20 (k + 1) draws in a row repeat them: were there one more,
            # a draw would miss it with odds under e^-20
            if repeats > 20 * (len(problems) + 1):
                break
        raise ValueError(f"difficulty has fewer than {n} distinct held-out problems ({len(problems)} found)")

    def problems(self, split: str) -> Iterator[Problem]:
        """The task interface: ``train`` endless, ``validation`` the held-out set, ``test``
        (only with ``test_percent``) cut from the training side."""
        if check_split(split) == "train":
            return self.train_stream()
        if split == "test" and not self.test_percent:
            raise NoUsableRows(f"task {self.id}: no test split (set test_percent above 0)")
        return iter(self.eval_set(self.eval_size, split))
