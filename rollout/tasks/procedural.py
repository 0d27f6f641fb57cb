"""Procedural puzzles on a 1-10 difficulty scale: infix arithmetic, reverse Polish notation and
bracket matching; answered in text, or by a Python function run in the sandbox.

Difficulty changes the problems themselves (``LEVELS``): operand size, number of operators,
parenthesis nesting (infix), expression-tree size (RPN), sequence length, bracket kinds and
nesting depth (brackets). Generation is seeded and endless. A problem's split is a fixed
function of its text (``split_of``), so train, validation and test never share a problem.

In ``code`` mode the model writes ``solve(x)`` for the whole family; it is run in the sandbox on
held-out inputs of the same difficulty and split, and compared with the known outputs.
"""

from __future__ import annotations

import itertools
import logging
import random
from dataclasses import dataclass
from typing import Callable, Iterator, Literal

from contracts import Problem
from rollout.tasks.base import NoUsableRows, Split, TaskReward, check_split, split_of

logger = logging.getLogger(__name__)

Family = Literal["infix", "rpn", "brackets"]
Mode = Literal["text", "code"]
DIFFICULTIES = range(1, 11)
MAX_MISSES = 20_000


@dataclass(frozen=True)
class Level:
    max_operand: int = 9
    operators: int = 1  # infix / RPN: binary operators in the expression
    depth: int = 0  # infix: parenthesis nesting; brackets: nesting depth
    ops: str = "+-*"
    length: int = 0  # brackets: characters
    kinds: str = "()"  # brackets: the pairs in use


LEVELS: dict[str, dict[int, Level]] = {
    "infix": {
        d: Level(max_operand=m, operators=n, depth=p, ops="+-" if d == 1 else "+-*")
        for d, (m, n, p) in zip(DIFFICULTIES, [(9, 1, 0), (9, 2, 0), (20, 2, 1), (20, 3, 1), (50, 3, 2), (50, 4, 2), (100, 5, 2), (100, 6, 3), (200, 7, 3), (500, 8, 4)])
    },
    "rpn": {
        d: Level(max_operand=m, operators=n, ops="+-" if d == 1 else "+-*")
        for d, (m, n) in zip(DIFFICULTIES, [(9, 1), (9, 2), (20, 2), (20, 3), (50, 3), (50, 4), (100, 5), (100, 6), (200, 7), (500, 8)])
    },
    "brackets": {
        d: Level(length=2 * (d + 2), depth=1 + (d + 1) // 2, kinds="()[]" if d <= 3 else "()[]{}")
        for d in DIFFICULTIES
    },
}

# -- infix --------------------------------------------------------------------------------


def random_infix(rng: random.Random, level: Level, operators: int | None = None, depth: int | None = None) -> str:
    """A chain of terms joined by operators; with nesting allowed, some terms are
    parenthesised sub-chains that hold the remaining operators."""
    operators = level.operators if operators is None else operators
    depth = level.depth if depth is None else depth
    own = operators if depth == 0 or operators < 2 else rng.randint(1, operators - 1)
    terms = [str(rng.randint(0, level.max_operand)) for _ in range(own + 1)]
    rest = operators - own
    if rest:  # split the remaining operators over 1..len(terms) parenthesised groups
        groups = rng.randint(1, min(rest, len(terms)))
        cuts = sorted(rng.sample(range(1, rest), groups - 1))
        sizes = [b - a for a, b in zip([0, *cuts], [*cuts, rest])]
        for slot, size in zip(rng.sample(range(len(terms)), groups), sizes):
            terms[slot] = "(" + random_infix(rng, level, size, depth - 1) + ")"
    ops = [rng.choice(level.ops) for _ in range(own)]
    return " ".join(itertools.chain.from_iterable(zip(terms, ops))) + " " + terms[-1] if ops else terms[0]


def evaluate_infix(expression: str) -> int:
    """Precedence climbing over integers, + - * and parentheses (* binds tighter)."""
    tokens = expression.replace("(", " ( ").replace(")", " ) ").split()
    position = 0

    def take() -> str:
        nonlocal position
        position += 1
        return tokens[position - 1]

    def atom() -> int:
        token = take()
        if token == "(":
            value = sum_()
            if take() != ")":
                raise ValueError(f"unbalanced parentheses in {expression!r}")
            return value
        return int(token)

    def product() -> int:
        value = atom()
        while position < len(tokens) and tokens[position] == "*":
            take()
            value *= atom()
        return value

    def sum_() -> int:
        value = product()
        while position < len(tokens) and tokens[position] in "+-":
            value = value + product() if take() == "+" else value - product()
        return value

    value = sum_()
    if position != len(tokens):
        raise ValueError(f"trailing tokens in {expression!r}")
    return value


def nesting_depth(text: str, openers: str = "([{") -> int:
    depth = deepest = 0
    for char in text:
        depth += char in openers
        depth -= char in ")]}"
        deepest = max(deepest, depth)
    return deepest


# -- reverse Polish notation ----------------------------------------------------------------


def random_rpn(rng: random.Random, level: Level, operators: int | None = None) -> str:
    """A random expression tree with ``operators`` inner nodes, written in postfix."""
    operators = level.operators if operators is None else operators
    if operators == 0:
        return str(rng.randint(0, level.max_operand))
    left = rng.randint(0, operators - 1)
    return f"{random_rpn(rng, level, left)} {random_rpn(rng, level, operators - 1 - left)} {rng.choice(level.ops)}"


def evaluate_rpn(expression: str) -> int:
    stack: list[int] = []
    apply = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
    for token in expression.split():
        if token in apply:
            if len(stack) < 2:
                raise ValueError(f"operator {token!r} without two operands in {expression!r}")
            right, left = stack.pop(), stack.pop()
            stack.append(apply[token](left, right))
        else:
            stack.append(int(token))
    if len(stack) != 1:
        raise ValueError(f"{expression!r} leaves {len(stack)} values")
    return stack[0]


# -- brackets ---------------------------------------------------------------------------------

_CLOSE = {"(": ")", "[": "]", "{": "}"}


def balanced(sequence: str) -> bool:
    stack: list[str] = []
    for char in sequence:
        if char in _CLOSE:
            stack.append(_CLOSE[char])
        elif not stack or stack.pop() != char:
            return False
    return not stack


def random_brackets(rng: random.Random, level: Level) -> str:
    """A balanced sequence of ``level.length`` characters nesting up to ``level.depth``, then,
    half the time, one corruption (a changed kind, a swap, a flipped bracket) that unbalances it."""
    openers = level.kinds[0::2]
    pairs, out, stack = level.length // 2, [], []
    opened = 0
    while len(out) < level.length:
        can_open = opened < pairs and len(stack) < level.depth
        if can_open and (not stack or rng.random() < 0.5):
            char = rng.choice(openers)
            stack.append(_CLOSE[char])
            out.append(char)
            opened += 1
        else:
            out.append(stack.pop())
    if rng.random() < 0.5:
        return "".join(out)
    for _ in range(20):
        corrupted = list(out)
        i = rng.randrange(len(corrupted))
        kind = rng.randrange(3)
        if kind == 0:  # another bracket of the same direction
            same = [c for c in level.kinds if (c in _CLOSE) == (corrupted[i] in _CLOSE) and c != corrupted[i]]
            if not same:
                continue
            corrupted[i] = rng.choice(same)
        elif kind == 1:  # swap two positions
            j = rng.randrange(len(corrupted))
            corrupted[i], corrupted[j] = corrupted[j], corrupted[i]
        else:  # flip a bracket's direction
            flips = {**_CLOSE, **{v: k for k, v in _CLOSE.items()}}
            corrupted[i] = flips[corrupted[i]]
        if not balanced("".join(corrupted)):
            return "".join(corrupted)
    return "".join(out)


# -- the task ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class FamilySpec:
    generate: Callable[[random.Random, Level], str]
    answer: Callable[[str], str]
    text_template: str
    code_template: str
    reward: TaskReward


FAMILIES: dict[str, FamilySpec] = {
    "infix": FamilySpec(
        random_infix,
        lambda e: str(evaluate_infix(e)),
        "Evaluate {x} (multiplication before addition and subtraction). Give the final answer as 'Answer: <number>'.",
        "Write a Python function solve(expression) that takes an arithmetic expression such as '{x}' "
        "(integers, + - * and parentheses, multiplication before addition and subtraction) as a string "
        "and returns its integer value. Put the function in a ```python code block.",
        TaskReward("numeric"),
    ),
    "rpn": FamilySpec(
        random_rpn,
        lambda e: str(evaluate_rpn(e)),
        "Evaluate the reverse Polish notation expression {x} (each operator applies to the two values "
        "before it). Give the final answer as 'Answer: <number>'.",
        "Write a Python function solve(expression) that takes a reverse Polish notation expression such as "
        "'{x}' (integers and + - * separated by spaces) as a string and returns its integer value. "
        "Put the function in a ```python code block.",
        TaskReward("numeric"),
    ),
    "brackets": FamilySpec(
        random_brackets,
        lambda s: str(balanced(s)),
        "Is the bracket sequence {x} balanced (every bracket closed by one of the same kind, properly "
        "nested)? Give the final answer as 'Answer: True' or 'Answer: False'.",
        "Write a Python function solve(sequence) that takes a string of the brackets ()[]{{}} such as '{x}' "
        "and returns True when it is balanced (every bracket closed by one of the same kind, properly "
        "nested) and False otherwise. Put the function in a ```python code block.",
        TaskReward("label", options={"labels": ["True", "False"]}),
    ),
}


class ProceduralTask:
    """One family at one difficulty (changeable by a curriculum), in text or code mode."""

    def __init__(
        self,
        family: Family,
        id: str | None = None,
        difficulty: int = 3,
        mode: Mode = "text",
        seed: int = 0,
        validation_percent: int = 10,
        test_percent: int = 10,
        eval_size: int = 100,
        code_tests: int = 8,
        system_prompt: str | None = None,
    ):
        if family not in FAMILIES:
            raise ValueError(f"unknown procedural family {family!r}; known: {sorted(FAMILIES)}")
        if mode not in ("text", "code"):
            raise ValueError(f"{family}: mode must be 'text' or 'code', got {mode!r}")
        self.family, self.spec = family, FAMILIES[family]
        self.id = id or family
        self.mode = mode
        self.seed = seed
        self.validation_percent, self.test_percent = validation_percent, test_percent
        self.eval_size = eval_size
        self.code_tests = code_tests
        self.system_prompt = system_prompt
        self.reward = TaskReward("code") if mode == "code" else self.spec.reward
        self.difficulty = difficulty  # checked by the setter

    @property
    def difficulty(self) -> int:
        return self._difficulty

    @difficulty.setter
    def difficulty(self, value: int) -> None:
        if value not in DIFFICULTIES:
            raise ValueError(f"{self.id}: difficulty must be 1..10, got {value}")
        self._difficulty = value

    def _instances(self, split: Split, rng: random.Random) -> Iterator[str]:
        """Endless instances (expression or sequence texts) of the current difficulty in ``split``;
        ends if ``MAX_MISSES`` draws in a row fall in other splits (a tiny problem space)."""
        misses = 0
        while misses < MAX_MISSES:
            x = self.spec.generate(rng, LEVELS[self.family][self._difficulty])
            if split_of(f"{self.family}:{x}", self.validation_percent, self.test_percent) == split:
                misses = 0
                yield x
            else:
                misses += 1
        logger.warning("%s: no %s problem in %d draws at difficulty %d", self.id, split, MAX_MISSES, self._difficulty)

    def _problem(self, split: Split, x: str, rng: random.Random, stream: Iterator[str]) -> Problem:
        meta = {"family": self.family, "input": x}
        typed = dict(task=self.id, difficulty=self._difficulty)
        if self.mode == "text":
            return Problem(f"{self.id}:{split}:{x}", self.spec.text_template.format(x=x), self.spec.answer(x), split, meta, **typed)
        inputs = [x, *itertools.islice(stream, self.code_tests - 1)]
        tests = [[[i], _typed(self.spec.answer(i))] for i in inputs]
        meta |= {"entry_point": "solve", "tests": tests}
        return Problem(f"{self.id}:{split}:code:{'|'.join(inputs)}", self.spec.code_template.format(x=x), "", split, meta, **typed)

    def problems(self, split: Split) -> Iterator[Problem]:
        """``train``: endless (repeats allowed). ``validation`` / ``test``: ``eval_size`` distinct
        problems, the same for every run at this difficulty."""
        split = check_split(split)
        if split == "train":
            rng = random.Random(self.seed)
            stream = self._instances(split, rng)
            problems = (self._problem(split, x, rng, stream) for x in stream)
        else:
            problems = iter(self._fixed(split))
        first = next(problems, None)
        if first is None:
            raise NoUsableRows(f"task {self.id}: no {split} problems at difficulty {self._difficulty}")
        return itertools.chain([first], problems)

    def _fixed(self, split: Split) -> list[Problem]:
        rng = random.Random(f"{self.family}:{split}:{self._difficulty}")  # independent of the run's seed
        stream = self._instances(split, rng)
        seen: dict[str, Problem] = {}
        for attempt, x in enumerate(stream):
            if x not in seen:
                seen[x] = self._problem(split, x, rng, stream)
            if len(seen) == self.eval_size or attempt > 50 * self.eval_size:
                break
        if len(seen) < self.eval_size:
            logger.warning("%s: only %d distinct %s problems at difficulty %d", self.id, len(seen), split, self._difficulty)
        return list(seen.values())


def _typed(answer: str) -> int | bool:
    return answer == "True" if answer in ("True", "False") else int(answer)
