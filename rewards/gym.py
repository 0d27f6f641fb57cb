"""Scoring ``reasoning-gym`` problems with each dataset's own ``score_answer``.

The answer is taken from ``<answer>...</answer>`` if present, else from after the last
``Answer:``, else the last non-empty line; the dataset scores it (often partial credit in
[0, 1]). ``correct`` is a full score.

The dataset's scorer runs in the verifier process, on the completion's answer: datasets whose
scorer evaluates the answer as code are refused (``UNSAFE_DATASETS``), an answer longer than
``MAX_ANSWER_CHARS`` scores 0 unseen, and whatever the scorer raises scores 0 (the answer broke
it; the first traceback of each dataset is logged). Not covered: a dataset's scorer that is
slow on some answer (the verifier pool's per-sample timeout bounds it).
"""

from __future__ import annotations

import functools
import logging
import re
from typing import Mapping

from rewards.text import repetition_stats
from rewards.weights import weigh
from contracts import Verdict

DEFAULT_WEIGHTS = {"score": 1.0}
MAX_ANSWER_CHARS = 2000
# datasets whose score_answer runs the answer as Python (eval) or through sympy's parse_expr
# (which evals too): model-written code in the verifier process (reasoning-gym 0.1.25)
UNSAFE_DATASETS = frozenset({
    "binary_matrix", "n_queens", "spiral_matrix", "string_insertion",  # eval(answer)
    "countdown", "puzzle24", "simple_integration", "intermediate_integration", "polynomial_multiplication",  # parse_expr
})  # fmt: skip
_OPEN = re.compile("<answer>", re.IGNORECASE)
_CLOSE = re.compile("</answer>", re.IGNORECASE)
_LABELLED = re.compile(r"answer\s*:\s*(.+)", re.IGNORECASE)
_logged: set[str] = set()
log = logging.getLogger(__name__)


def _refuse_unsafe(name: str, config: tuple) -> None:
    """A composite's sub-datasets (``config``'s ``datasets``, each with a ``name``) are checked too."""
    specs = dict(config).get("datasets", ()) if name == "composite" else ()
    names = [name, *(s["name"] if isinstance(s, Mapping) else getattr(s, "name", "") for s in specs)]
    unsafe = sorted(set(names) & UNSAFE_DATASETS)
    if unsafe:
        raise ValueError(
            f"reasoning-gym dataset {unsafe[0]!r} is refused: its score_answer evaluates the model's answer as "
            f"Python code (eval or sympy's parse_expr) in the verifier process; refused: {sorted(UNSAFE_DATASETS)}"
        )


@functools.lru_cache(maxsize=16)
def gym_dataset(name: str, size: int, seed: int, config: tuple = ()):
    _refuse_unsafe(name, config)
    import reasoning_gym

    return reasoning_gym.create_dataset(name, size=size, seed=seed, **dict(config))


def _last_tagged(text: str) -> str | None:
    """The content of the last ``<answer>...</answer>`` pair as ``re.findall`` of
    ``<answer>(.*?)</answer>`` pairs them (each opening tag with the first closing tag after it,
    then on from there), in linear time: the regex retried every opening tag, quadratic on
    ``<answer>`` repeated. Once an opening tag has no closing tag after it, no later one has."""
    last, position = None, 0
    while (opening := _OPEN.search(text, position)) and (closing := _CLOSE.search(text, opening.end())):
        last, position = text[opening.end() : closing.start()], closing.end()
    return last


def extract_gym_answer(text: str) -> str | None:
    tagged = _last_tagged(text)
    if tagged is not None:
        return tagged.strip()
    labelled = _LABELLED.findall(text)
    if labelled:
        return labelled[-1].strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else None


def _score(dataset, extracted: str | None, entry) -> float:
    """The dataset's score of the answer; 0 for one too long to show it or one that breaks it."""
    if extracted is not None and len(extracted) > MAX_ANSWER_CHARS:
        return 0.0
    try:
        return float(dataset.score_answer(extracted, entry))
    except Exception:
        name = type(dataset).__name__
        if name not in _logged:
            _logged.add(name)
            log.warning("%s.score_answer raised on a completion's answer; scored 0 (logged once per dataset)", name, exc_info=True)
        return 0.0


def gym_reward(completion: str, dataset, index: int, weights: Mapping[str, float] = DEFAULT_WEIGHTS) -> Verdict:
    extracted = extract_gym_answer(completion)
    score = _score(dataset, extracted, dataset[index])
    components = {"score": score, "correct": float(score >= 1.0), "repetition": float(repetition_stats(completion)["repetitive"])}
    return Verdict(reward=weigh(components, weights), correct=score >= 1.0, components=components, extracted=extracted)
