"""ARC grids: parse a grid of digits from the model's text and compare it exactly.

Accepted forms, the last one in the text wins: a JSON-style list of lists (``[[1, 2], [3, 4]]``)
or a block of consecutive lines of digits, optionally separated by spaces or commas
(``12`` / ``1 2`` / ``1,2``). A grid must be rectangular; anything else is no grid.

Completions are untrusted: parsing is linear in the text (``_ROW``'s runs are possessive; a
line ``1``, n spaces, ``x`` cost n^3 with plain ones), and nothing a completion writes makes
it raise (too deep a list, a number past ``int``'s digit limit: no grid).
"""

from __future__ import annotations

import json
import re
from typing import Mapping

from rewards.text import repetition_stats
from rewards.weights import weigh
from contracts import Verdict

Grid = list[list[int]]

_JSON_GRID = re.compile(r"\[\s*\[[\d\s,\[\]]*\]\s*\]")
_GRID_CHARS = re.compile(r"[\d\s,\[\]]+")  # a run of the characters _JSON_GRID spans
_GRID_OPEN = re.compile(r"\[\s*+\[")
_ROW = re.compile(r"^\s*+\[?\s*+(\d(?:[\s,]*+\d)*+)\s*+\]?\s*+,?\s*+$")


def _rectangular(grid: Grid) -> Grid | None:
    if grid and all(row for row in grid) and len({len(row) for row in grid}) == 1:
        return grid
    return None


def _row_cells(row: str) -> list[int] | None:
    """The row's cells; None where a cell is past ``int``'s digit limit (no row)."""
    parts = re.split(r"[\s,]+", row.strip())
    if len(parts) == 1:  # "123": one digit per cell
        return [int(c) for c in parts[0]]
    try:
        return [int(p) for p in parts]
    except ValueError:
        return None


def _json_grids(text: str):
    """What ``_JSON_GRID.finditer(text)`` finds, in linear time. A match cannot leave a run of
    the characters it spans, and within a run only the first ``[[`` can start one: a match
    from a later start would need a ``]]`` after it, which the first start's greedy match
    reaches too (and past it none is left). Searching from every start, as ``finditer`` does,
    cost quadratic time on ``[`` repeated."""
    for run in _GRID_CHARS.finditer(text):
        start = _GRID_OPEN.search(text, run.start(), run.end())
        if start and (match := _JSON_GRID.match(text, start.start(), run.end())):
            yield match


def _json_grid(candidate: str) -> Grid | None:
    """``candidate`` as a rectangular grid of ints, or None: invalid JSON, nesting deeper than
    the recursion limit and numbers past ``int``'s digit limit are no grid."""
    try:
        value = json.loads(candidate)
    except (ValueError, RecursionError):
        return None
    if isinstance(value, list) and all(isinstance(r, list) and all(isinstance(c, int) for c in r) for r in value):
        return _rectangular(value)
    return None


def _block_grids(text: str) -> list[tuple[int, Grid]]:
    """Each block of consecutive digit rows that is a grid, with where it ends."""
    candidates: list[tuple[int, Grid]] = []
    block: Grid = []
    position = 0
    for line in text.splitlines(keepends=True):
        position += len(line)
        row = _ROW.match(line)
        if row and "[[" not in line and (cells := _row_cells(row.group(1))) is not None:
            block.append(cells)
            continue
        if block and (grid := _rectangular(block)):
            candidates.append((position - len(line), grid))
        block = []
    if block and (grid := _rectangular(block)):
        candidates.append((position, grid))
    return candidates


def parse_grid(text: str) -> Grid | None:
    """The last grid written in ``text``, or None."""
    candidates = [(m.end(), grid) for m in _json_grids(text) if (grid := _json_grid(m.group(0)))]
    candidates += _block_grids(text)
    return max(candidates, key=lambda c: c[0])[1] if candidates else None


DEFAULT_WEIGHTS = {"correct": 1.0}


def grid_reward(completion: str, answer: str, weights: Mapping[str, float] = DEFAULT_WEIGHTS) -> Verdict:
    """``correct``: the parsed grid equals the expected one (``answer`` is the grid as JSON)."""
    expected = json.loads(answer)
    grid = parse_grid(completion)
    components = {
        "correct": float(grid == expected),
        "parsed": float(grid is not None),
        "repetition": float(repetition_stats(completion)["repetitive"]),
    }
    reward = weigh(components, weights)
    return Verdict(reward=reward, correct=grid == expected, components=components, extracted=json.dumps(grid) if grid else None)
