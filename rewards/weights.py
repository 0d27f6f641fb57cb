"""A reward is a sum of named weighted components; every component is reported."""

from __future__ import annotations

from typing import Mapping


def weigh(components: Mapping[str, float], weights: Mapping[str, float]) -> float:
    """Sum of weight x value; a component without a weight pays nothing, a weight for an
    unknown component is an error naming it."""
    unknown = set(weights) - set(components)
    if unknown:
        raise ValueError(f"unknown reward components {sorted(unknown)}; known: {sorted(components)}")
    return sum(weights.get(name, 0.0) * value for name, value in components.items())
