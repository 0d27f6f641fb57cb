"""ARC grids: parse a grid of digits from the model's text and compare it exactly.

Accepted forms, the last one in the text wins: a JSON-style list of lists (``[[1, 2], [3, 4]]``)
or a block of consecutive lines of digits, optionally separated by spaces or commas
(``12`` / ``1 2`` / ``1,2``). A grid must be rectangular; anything else is no grid.
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
_ROW = re.compile(r"^\s*\[?\s*(\d(?:[\s,]*\d)*)\s*\]?\s*,?\s*$")


def _rectangular(grid: Grid) -> Grid | None:
    if grid and all(row for row in grid) and len({len(row) for row in grid}) == 1:
        return grid
    return None


def _row_cells(row: str) -> list[int]:
    parts = re.split(r"[\s,]+", row.strip())
    if len(parts) == 1:  # "123": one digit per cell
        return [int(c) for c in parts[0]]
    return [int(p) for p in parts]


def parse_grid(text: str) -> Grid | None:
    """The last grid written in ``text``, or None."""
    candidates: list[tuple[int, Grid]] = []
    for match in _JSON_GRID.finditer(text):
        try:
            value = json.loads(match.group(0))
        except json.JSONDecodeError:
            continue
        if isinstance(value, list) and all(isinstance(r, list) and all(isinstance(c, int) for c in r) for r in value):
            if grid := _rectangular(value):
                candidates.append((match.end(), grid))
    block: Grid = []
    position = 0
    for line in text.splitlines(keepends=True):
        position += len(line)
        row = _ROW.match(line)
        if row and "[[" not in line:
            block.append(_row_cells(row.group(1)))
            continue
        if block and (grid := _rectangular(block)):
            candidates.append((position - len(line), grid))
        block = []
    if block and (grid := _rectangular(block)):
        candidates.append((position, grid))
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
