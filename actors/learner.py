"""Learner actor shell: the plain ``learners.learner.Learner`` is the actor's class.

``ray.remote(Learner)`` exposes ``step``, ``logprobs``, ``adapter_update`` and
``save_adapter`` unchanged; this module only fixes the resources it asks Ray for.
"""

from __future__ import annotations

import ray

from learners.learner import Learner


def learner_actor(num_cpus: float = 1.0):
    """The Ray actor class for a learner, with its resource request."""
    return ray.remote(num_cpus=num_cpus)(Learner)
