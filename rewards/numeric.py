"""Numeric answer extraction and the reward for tasks with a numeric (or math) answer.

Extraction methods (each selectable, all reported, as users of other trainers compare them):
- ``anchor``: an explicit label wins (``Answer: N``, ``#### N``, ``\\boxed{N}``), the last
  labelled one if several; a ``\\boxed{...}`` holding an expression (``\\frac{1}{2}``) counts
  as a label too; otherwise the last number in the text.
- ``last``: the last number in the text.
- ``first``: the first number in the text.
- ``simple``: the first number after the last ``=``, else the first number in the text (the
  "simple" extractor of the Markovian chain-of-thought experiments, kept for comparison with
  their figures).

Equivalence: two plain numbers are compared as exact rationals (``12.0`` equals ``12``); when
either side is not a plain number (a fraction in LaTeX, an expression, a set) ``math-verify``
decides, unless the prediction is one it could spend unbounded time on (``too_costly``).

Completions are untrusted: every pattern here runs in linear time on any text (the whitespace
runs of the ``answer is:`` label are possessive; with plain ``\\s*`` three adjacent runs made
a failed match cost n^4 on ``answer`` followed by n spaces).
"""

from __future__ import annotations

import logging
import re
import threading
from fractions import Fraction
from typing import Literal, Mapping, get_args

from rewards.text import repetition_stats
from rewards.weights import weigh
from contracts import Verdict

ExtractionMethod = Literal["anchor", "last", "first", "simple"]

_NUMBER = r"-?\d[\d,]*(?:\.\d+)?"
_NUMBER_RE = re.compile(_NUMBER)
_ANCHORS = (
    re.compile(r"answer\s*+(?:is)?\s*+[:=]?\s*+\**\s*+\$?(" + _NUMBER + ")", re.IGNORECASE),
    re.compile(r"####\s*\$?(" + _NUMBER + ")"),
    re.compile(r"\\boxed\{\s*(" + _NUMBER + r")\s*\}"),
)
_LABEL_RE = re.compile(r"Answer:\s*" + _NUMBER)
_PLAIN_NUMBER_RE = re.compile(r"\s*" + _NUMBER + r"\s*")
METHODS: tuple[str, ...] = get_args(ExtractionMethod)


def _clean(number: str) -> str:
    return number.replace(",", "")


def last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}``, braces balanced, or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1 : j].strip()
    return None


def extract_number(text: str, method: ExtractionMethod = "anchor") -> str | None:
    """The answer a completion commits to (a number, or under ``anchor`` a boxed expression),
    or None if it has none."""
    if method not in METHODS:
        raise ValueError(f"unknown extraction method {method!r}; known: {list(METHODS)}")
    if method == "anchor":
        for pattern in _ANCHORS:
            labelled = pattern.findall(text)
            if labelled:
                return _clean(labelled[-1])
        boxed = last_boxed(text)
        if boxed:
            return boxed
        method = "last"
    if method == "simple" and "=" in text:
        after = _NUMBER_RE.findall(text.rsplit("=", 1)[1])
        if after:
            return _clean(after[0])
    numbers = _NUMBER_RE.findall(text)
    if not numbers:
        return None
    return _clean(numbers[-1] if method == "last" else numbers[0])


def numbers_equal(predicted: str | None, expected: str) -> bool:
    """Exact rational equality (so '12.0' equals '12'); unparsable predictions are wrong."""
    if predicted is None:
        return False
    try:
        return Fraction(predicted) == Fraction(_clean(expected))
    except (ValueError, ZeroDivisionError):
        return False


def _plain(text: str) -> bool:
    return _PLAIN_NUMBER_RE.fullmatch(text) is not None


def answers_equal(predicted: str | None, expected: str) -> bool:
    """Plain numbers: exact rationals. Anything else: ``math-verify`` (LaTeX, expressions, sets)."""
    if predicted is None:
        return False
    if _plain(predicted) and _plain(expected):
        return numbers_equal(predicted, expected)
    return math_equal(predicted, expected)


# what a prediction handed to math-verify may hold; past these one prediction cost seconds to
# forever (measured in a thread, where math-verify has no timeout, on a 2-core CPU: 20 nested
# parentheses 1.3 s, 999999! 4.8 s, 999999^{999999} 2.8 s; 9^{9^{9}} and 99999999! unfinished
# after 60 s, (10^{100})^{999999} after 40 s, holding the GIL all along)
MAX_MATH_CHARS = 200
MAX_MATH_NESTING = 10  # brackets of any kind; 10 nested parentheses cost 0.6 s
MAX_POWER_DIGITS = 7  # in a power's base and exponent together; 9^{999999} costs 0.3 s
MAX_FACTORIAL_DIGITS = 5  # in a factorial's or binomial's operands; 99999! costs 0.1 s
# an exponent holds no power, factorial or function (a tower: 9^{9^{9}}), only these
_SAFE_EXPONENT = re.compile(r"(?:[\w\s+\-*/.,()\[\]{}]|\\(?:[dt]?frac|sqrt|pi|cdot|times|left|right)(?![A-Za-z]))*+")
_BINOMIAL = re.compile(r"\\[dt]?binom(?![A-Za-z])")


def _digits(text: str) -> int:
    return sum(c.isdigit() for c in text)


def _nesting(text: str) -> int:
    depth = deepest = 0
    for c in text:
        depth += (c in "([{") - (c in ")]}")
        deepest = max(deepest, depth)
    return deepest


def _group_end(text: str, i: int) -> int:
    """Just past the bracket group that opens at ``text[i]`` (all bracket kinds count alike)."""
    depth = 0
    for j in range(i, len(text)):
        depth += (text[j] in "([{") - (text[j] in ")]}")
        if depth == 0:
            return j + 1
    return len(text)


def _group_start(text: str, end: int) -> int:
    """Where the bracket group that closes just before ``end`` opens."""
    depth = 0
    for j in range(end - 1, -1, -1):
        depth += (text[j] in ")]}") - (text[j] in "([{")
        if depth == 0:
            return j
    return 0


def _operand_after(text: str, i: int) -> str:
    """What follows ``text[i]`` (a '^' or a command): bracket groups, else a command and its
    groups, else a number, else one character."""
    start = j = len(text) - len(text[i + 1 :].lstrip())
    if j < len(text) and text[j] == "\\":
        j += 1 + len(re.match(r"[A-Za-z]*", text[j + 1 :]).group(0))
    elif j < len(text) and text[j].isdigit():
        j += len(re.match(r"\d*", text[j:]).group(0))
    elif j < len(text) and text[j] not in "([{":
        j += 1
    while j < len(text) and text[j] in "([{":
        j = _group_end(text, j)
    return text[start:j]


def _operand_before(text: str, i: int) -> str:
    """What precedes ``text[i]`` (a '^' or a '!'): bracket groups and the run of digits,
    letters and points before them (a number, a name, a command such as ``\\frac``), and a
    power they are the exponent of (``9^{9}^{9}`` is ``(9^9)^9`` to math-verify)."""
    end = j = len(text[:i].rstrip())
    while True:
        while j > 0 and text[j - 1] in ")]}":
            j = _group_start(text, j)
        while j > 0 and (text[j - 1].isalnum() or text[j - 1] in "._"):
            j -= 1
        if j == 0 or text[j - 1] != "^":
            return text[j:end]
        j -= 1


def _costly_power(text: str, i: int) -> bool:
    exponent = _operand_after(text, i)
    if _SAFE_EXPONENT.fullmatch(exponent) is None:
        return True
    return _digits(_operand_before(text, i)) + _digits(exponent) > MAX_POWER_DIGITS


def _costly_factorial(text: str, i: int) -> bool:
    operand = _operand_before(text, i)
    return _digits(operand) > MAX_FACTORIAL_DIGITS or "!" in operand or "^" in operand


def too_costly(expression: str) -> bool:
    """Whether ``expression`` (a prediction) is past what math-verify is handed: more than
    ``MAX_MATH_CHARS`` characters, brackets nested deeper than ``MAX_MATH_NESTING``, a power
    whose exponent holds a power, factorial or function (``9^{9^{9}}``, ``9^{\\lfloor e^{99}\\rfloor}``)
    or whose base and exponent hold more than ``MAX_POWER_DIGITS`` digits, a factorial of an
    operand with a power, a factorial or more than ``MAX_FACTORIAL_DIGITS`` digits, a binomial
    of more than ``MAX_FACTORIAL_DIGITS`` digits. A heuristic on the text, not a bound on
    sympy's work: large numbers made other ways (``\\lfloor e^{999999}\\rfloor``, a product of
    many powers) still reach math-verify, and the verifier pool's per-sample timeout is left to
    bound those."""
    if len(expression) > MAX_MATH_CHARS or _nesting(expression) > MAX_MATH_NESTING:
        return True
    marks = list(enumerate(expression))
    return (
        any(_costly_power(expression, i) for i, c in marks if c == "^")
        or any(_costly_factorial(expression, i) for i, c in marks if c == "!")
        or any(_digits(_operand_after(expression, m.end() - 1)) > MAX_FACTORIAL_DIGITS for m in _BINOMIAL.finditer(expression))
    )


def _squashed(text: str) -> str:
    return "".join(text.split())


def math_equal(predicted: str, expected: str) -> bool:
    """``math-verify``'s judgement of ``predicted`` against the gold ``expected``. Its timeouts use
    ``signal.alarm``, which only works in the main thread; elsewhere they are off, so a
    prediction that is ``too_costly`` never reaches it: it equals the gold only if it is the
    gold's own text (whitespace aside), so a gold answer such as ``e^{-x^{2}}`` is matched only as
    written."""
    if too_costly(predicted):
        return _squashed(predicted) == _squashed(expected)
    from math_verify import parse, verify  # sympy: imported on first use

    logging.getLogger("math_verify").setLevel(logging.ERROR)
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    wrap = lambda s: s if "$" in s else f"${s}$"  # noqa: E731 - math-verify finds LaTeX between $
    gold = parse(wrap(expected), parsing_timeout=timeout)
    target = parse(wrap(predicted), parsing_timeout=timeout)
    return bool(gold and target and verify(gold, target, timeout_seconds=timeout))


def has_answer_label(text: str) -> bool:
    """Format check: the completion states its result as ``Answer: <number>``."""
    return _LABEL_RE.search(text) is not None


DEFAULT_WEIGHTS = {"correct": 1.0, "format": 0.1}


def numeric_reward(
    completion: str,
    answer: str,
    weights: Mapping[str, float] = DEFAULT_WEIGHTS,
    method: ExtractionMethod = "anchor",
) -> Verdict:
    """Reward = sum of named weighted components, each reported; components without a weight
    pay nothing. ``correct`` follows ``method``; ``correct_anchor``, ``correct_last``,
    ``correct_first`` and ``correct_simple`` report every method; ``format`` and
    ``repetition`` as named."""
    by_method = {m: extract_number(completion, m) for m in METHODS}
    extracted = by_method[method]
    judged: dict[str | None, bool] = {}
    for value in by_method.values():
        if value not in judged:
            judged[value] = answers_equal(value, answer)
    correct = judged[extracted]
    components = {
        "correct": float(correct),
        **{f"correct_{m}": float(judged[v]) for m, v in by_method.items()},
        "format": float(has_answer_label(completion)),
        "repetition": float(repetition_stats(completion)["repetitive"]),
    }
    reward = weigh(components, weights)
    return Verdict(reward=reward, correct=correct, components=components, extracted=extracted)
