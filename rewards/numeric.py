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
decides.
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
    re.compile(r"answer\s*(?:is)?\s*[:=]?\s*\**\s*\$?(" + _NUMBER + ")", re.IGNORECASE),
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


def math_equal(predicted: str, expected: str) -> bool:
    """``math-verify``'s judgement of ``predicted`` against the gold ``expected``. Its timeouts use
    ``signal.alarm``, which only works in the main thread; elsewhere they are off (the verifier
    pool's per-sample timeout still bounds the call)."""
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
