"""Scoring ``reasoning-gym`` problems with each dataset's own ``score_answer``.

The answer is taken from ``<answer>...</answer>`` if present, else from after the last
``Answer:``, else the last non-empty line; the dataset scores it (often partial credit in
[0, 1]). ``correct`` is a full score.
"""

from __future__ import annotations

import functools
import re
from typing import Mapping

from rewards.text import repetition_stats
from rewards.weights import weigh
from contracts import Verdict

DEFAULT_WEIGHTS = {"score": 1.0}
_TAGGED = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)
_LABELLED = re.compile(r"answer\s*:\s*(.+)", re.IGNORECASE)


@functools.lru_cache(maxsize=16)
def gym_dataset(name: str, size: int, seed: int, config: tuple = ()):
    import reasoning_gym

    return reasoning_gym.create_dataset(name, size=size, seed=seed, **dict(config))


def extract_gym_answer(text: str) -> str | None:
    tagged = _TAGGED.findall(text)
    if tagged:
        return tagged[-1].strip()
    labelled = _LABELLED.findall(text)
    if labelled:
        return labelled[-1].strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else None


def gym_reward(completion: str, dataset, index: int, weights: Mapping[str, float] = DEFAULT_WEIGHTS) -> Verdict:
    extracted = extract_gym_answer(completion)
    score = float(dataset.score_answer(extracted, dataset[index]))
    components = {"score": score, "correct": float(score >= 1.0), "repetition": float(repetition_stats(completion)["repetitive"])}
    return Verdict(reward=weigh(components, weights), correct=score >= 1.0, components=components, extracted=extracted)
