"""Multiple-choice answers (A-E): the two extraction methods users compare, both reported.

- ``legacy``: the first capital letter among the choices anywhere in the text. It is what
  early evaluation scripts did, and it is wrong in a known way: "Because ..." answers B and
  "An apple ..." answers A. Reported so results can be compared with runs that used it.
- ``word-boundary``: an explicit label wins (``Answer: C``, ``the answer is (C)``), the last
  one if several; otherwise the first letter standing alone as a word ("C", "(C)", "C.").

The label's whitespace runs are possessive, so a failed match is linear in the text (with plain
``\\s*`` three adjacent runs cost n^4 on ``answer`` followed by n spaces); what it matches is
unchanged, as nothing after a run can start with whitespace.
"""

from __future__ import annotations

import functools
import re
from typing import Literal, Mapping

from rewards.text import repetition_stats
from rewards.weights import weigh
from contracts import Verdict

ChoiceMethod = Literal["legacy", "word-boundary"]
CHOICES = "ABCDE"


@functools.lru_cache(maxsize=None)
def _patterns(letters: str) -> tuple[re.Pattern, re.Pattern]:
    letter = f"[{letters}]"
    labelled = re.compile(rf"answer\s*+(?:is)?\s*+[:=]?\s*+\**\s*+\(?({letter})\)?(?![A-Za-z])", re.IGNORECASE)
    isolated = re.compile(rf"(?<![A-Za-z]){letter}(?![A-Za-z])")
    return labelled, isolated


def extract_choice(text: str, method: ChoiceMethod = "word-boundary", letters: str = CHOICES) -> str | None:
    """The letter a completion picks, or None."""
    if method == "legacy":
        found = re.search(f"[{letters}]", text)
        return found.group(0) if found else None
    if method != "word-boundary":
        raise ValueError(f"unknown choice extraction method {method!r}")
    labelled, isolated = _patterns(letters)
    # the label's letter must itself be a capital choice letter ("answer is a" is English, not A)
    picks = [m.group(1) for m in labelled.finditer(text) if m.group(1) in letters]
    if picks:
        return picks[-1]
    found = isolated.search(text)
    return found.group(0) if found else None


DEFAULT_WEIGHTS = {"correct": 1.0}


def choice_reward(
    completion: str,
    answer: str,
    weights: Mapping[str, float] = DEFAULT_WEIGHTS,
    method: ChoiceMethod = "word-boundary",
    letters: str = CHOICES,
) -> Verdict:
    """``correct`` follows ``method``; ``correct_legacy`` and ``correct_word_boundary`` are both
    reported (weight 0 unless given one), as is ``repetition``."""
    expected = answer.strip().upper()
    by_method = {m: extract_choice(completion, m, letters) for m in ("legacy", "word-boundary")}
    extracted = by_method[method]
    components = {
        "correct": float(extracted == expected),
        "correct_legacy": float(by_method["legacy"] == expected),
        "correct_word_boundary": float(by_method["word-boundary"] == expected),
        "repetition": float(repetition_stats(completion)["repetitive"]),
    }
    reward = weigh(components, weights)
    return Verdict(reward=reward, correct=extracted == expected, components=components, extracted=extracted)
