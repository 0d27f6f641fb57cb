"""Free-text answers (a text continuation): word-overlap F1 against the reference.

SQuAD-style normalisation (lower case, no punctuation or articles); the completion is cut to
twice the reference's length so that rambling on cannot buy recall.
"""

from __future__ import annotations

import collections
import re
import string
from typing import Mapping

from rewards.text import repetition_stats
from rewards.weights import weigh
from contracts import Verdict

DEFAULT_WEIGHTS = {"f1": 1.0}
_PUNCTUATION = re.compile(f"[{re.escape(string.punctuation)}]")
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalise(text: str) -> list[str]:
    return _ARTICLES.sub(" ", _PUNCTUATION.sub(" ", text.lower())).split()


def word_f1(prediction: str, reference: str) -> float:
    predicted, wanted = normalise(prediction), normalise(reference)
    predicted = predicted[: 2 * max(1, len(wanted))]
    common = sum((collections.Counter(predicted) & collections.Counter(wanted)).values())
    if not predicted or not wanted or not common:
        return 0.0
    precision, recall = common / len(predicted), common / len(wanted)
    return 2 * precision * recall / (precision + recall)


def overlap_reward(completion: str, reference: str, weights: Mapping[str, float] = DEFAULT_WEIGHTS, threshold: float = 0.5) -> Verdict:
    """``f1`` (word overlap), ``correct`` (F1 at least ``threshold``), ``repetition``."""
    f1 = word_f1(completion, reference)
    words = completion.split()[: 2 * max(1, len(reference.split()))]
    components = {"f1": f1, "correct": float(f1 >= threshold), "repetition": float(repetition_stats(completion)["repetitive"])}
    extracted = " ".join(words) or None
    return Verdict(reward=weigh(components, weights), correct=f1 >= threshold, components=components, extracted=extracted)
