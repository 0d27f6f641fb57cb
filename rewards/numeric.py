"""Numeric answer extraction and the reward for tasks with a numeric answer.

Extraction methods (each selectable, as users of other trainers compare them):
- ``anchor``: an explicit label wins (``Answer: N``, ``#### N``, ``\\boxed{N}``), the last
  labelled one if several; otherwise the last number in the text.
- ``last``: the last number in the text.
- ``first``: the first number in the text.
"""

from __future__ import annotations

import re
from fractions import Fraction
from typing import Literal, Mapping

from rewards.text import repetition_stats
from rewards.weights import weigh
from rollout.contracts import Verdict

ExtractionMethod = Literal["anchor", "last", "first"]

_NUMBER = r"-?\d[\d,]*(?:\.\d+)?"
_NUMBER_RE = re.compile(_NUMBER)
_ANCHORS = (
    re.compile(r"answer\s*(?:is)?\s*[:=]?\s*\**\s*\$?(" + _NUMBER + ")", re.IGNORECASE),
    re.compile(r"####\s*\$?(" + _NUMBER + ")"),
    re.compile(r"\\boxed\{\s*(" + _NUMBER + r")\s*\}"),
)
_LABEL_RE = re.compile(r"Answer:\s*" + _NUMBER)


def _clean(number: str) -> str:
    return number.replace(",", "")


def extract_number(text: str, method: ExtractionMethod = "anchor") -> str | None:
    """The number a completion commits to, or None if it has none."""
    if method == "anchor":
        for pattern in _ANCHORS:
            labelled = pattern.findall(text)
            if labelled:
                return _clean(labelled[-1])
        method = "last"
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
    """Reward = sum of named weighted components (``correct``, ``format``, ``repetition``), each
    reported; components without a weight pay nothing."""
    extracted = extract_number(completion, method)
    correct = numbers_equal(extracted, answer)
    components = {
        "correct": float(correct),
        "format": float(has_answer_label(completion)),
        "repetition": float(repetition_stats(completion)["repetitive"]),
    }
    reward = weigh(components, weights)
    return Verdict(reward=reward, correct=correct, components=components, extracted=extracted)
