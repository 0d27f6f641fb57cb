"""How much memory a process has held at most: each actor answers for its own process (the
driver reads the per-role sums as ``perf/peak_rss_gib/<role>``; ``cluster.observe.footprint``)."""

from __future__ import annotations

import resource


def peak_rss_gib(children: bool = False) -> float:
    """This process's peak resident set size in GiB; with ``children``, plus the largest
    peak among its waited-for child processes (a verifier's sandboxes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    if children:
        peak += resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return peak / 2**20
