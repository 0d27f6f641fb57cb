"""Generator actor shell around the plain ``rollout.generator.Generator``."""

from __future__ import annotations

import ray

from rollout.generator import Generator


def generator_actor(num_cpus: float = 1.0, max_restarts: int = 0):
    """The Ray actor class for a generator, with its resource request.

    A restarted generator re-runs its constructor and serves no policy until the driver
    pushes the current adapter again (the driver does so when it sees version -1).
    """
    return ray.remote(num_cpus=num_cpus, max_restarts=max_restarts)(Generator)
