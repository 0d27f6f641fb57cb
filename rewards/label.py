"""Answers from a fixed set of labels (``True``/``False``, ``yes``/``no``, class names).

Extraction: an explicit ``Answer: <label>`` wins (the last one if several); otherwise the last
label standing alone as a word. Matching ignores case; the canonical spelling is reported.

The ``Answer:`` label's whitespace runs are possessive, so a failed match is linear in the text
(with plain ``\\s*`` three adjacent runs cost n^4 on ``answer`` followed by n spaces). The one
change in what it matches: a label that itself begins with whitespace is no longer found after
``Answer:`` (the runs keep all the whitespace); it is still found standing alone.
"""

from __future__ import annotations

import functools
import re
from typing import Mapping, Sequence

from rewards.text import repetition_stats
from rewards.weights import weigh
from contracts import Verdict

DEFAULT_WEIGHTS = {"correct": 1.0}


@functools.lru_cache(maxsize=64)
def _patterns(labels: tuple[str, ...]) -> tuple[re.Pattern, re.Pattern]:
    alternatives = "|".join(re.escape(label) for label in sorted(labels, key=len, reverse=True))
    labelled = re.compile(rf"answer\s*+(?:is)?\s*+[:=]?\s*+\**\s*+({alternatives})\b", re.IGNORECASE)
    isolated = re.compile(rf"(?<![\w-])({alternatives})(?![\w-])", re.IGNORECASE)
    return labelled, isolated


def extract_label(text: str, labels: Sequence[str]) -> str | None:
    """The label a completion commits to, in its canonical spelling, or None."""
    labelled, isolated = _patterns(tuple(labels))
    found = labelled.findall(text) or isolated.findall(text)
    if not found:
        return None
    by_lower = {label.lower(): label for label in labels}
    return by_lower[found[-1].lower()]


def label_reward(completion: str, answer: str, labels: Sequence[str], weights: Mapping[str, float] = DEFAULT_WEIGHTS) -> Verdict:
    """``correct``: the extracted label equals ``answer`` (case-insensitive); ``repetition``."""
    extracted = extract_label(completion, labels)
    correct = extracted is not None and extracted.lower() == answer.strip().lower()
    components = {"correct": float(correct), "repetition": float(repetition_stats(completion)["repetitive"])}
    return Verdict(reward=weigh(components, weights), correct=correct, components=components, extracted=extracted)
