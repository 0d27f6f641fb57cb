"""Text-level checks reported per sample: repetition (the "4444..." collapse) and format.

Pure functions over the completion text; they measure, the reward weights decide whether they
also pay.
"""

from __future__ import annotations

import re
from typing import Sequence


def longest_char_run(text: str) -> int:
    """Length of the longest run of one repeated non-space character ("4444" -> 4)."""
    longest, run, previous = 0, 0, None
    for char in text:
        run = run + 1 if char == previous and not char.isspace() else 1
        previous = char
        longest = max(longest, run)
    return longest if text else 0


def repeated_ngram_fraction(text: str, n: int = 4) -> float:
    """Share of the word n-grams that repeat an earlier one: 0 for varied text, -> 1 for loops."""
    words = text.split()
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


def repetition_stats(text: str, n: int = 4, max_run: int = 16, max_fraction: float = 0.5) -> dict:
    """Both measures and the verdict ``repetitive`` (a long character run or mostly repeated n-grams)."""
    run = longest_char_run(text)
    fraction = repeated_ngram_fraction(text, n)
    return {"longest_char_run": run, "repeated_ngram_fraction": fraction, "repetitive": run >= max_run or fraction >= max_fraction}


def format_score(text: str, required: Sequence[str]) -> float:
    """Share of the required patterns (regular expressions, e.g. ``<think>``, ``Answer:``) present."""
    if not required:
        return 1.0
    return sum(re.search(pattern, text) is not None for pattern in required) / len(required)
