"""Learner actors: one ``learners.learner.Learner`` per Ray actor, and the data-parallel group.

``LearnerGroup`` starts N learner actors, joins them in one ``torch.distributed`` process
group (gloo: the learner computes on CPU so far), hands each its contiguous shard of the
rollout batch and returns rank 0's (globally reduced) metrics. All ranks hold the same
parameters after every step, so the weight broadcast to the generators is taken from rank 0
only: one ``ObjectRef``, sent once.
"""

from __future__ import annotations

import logging
import socket
from pathlib import Path

import ray

from learners.learner import Learner, LearnerSettings
from learners.policy import LoraSettings
from contracts import TrainBatch

logger = logging.getLogger(__name__)


class _LearnerActor(Learner):
    """The Learner plus what a rank needs to find its peers."""

    def rendezvous(self) -> tuple[str, int]:
        """This node's address and a free TCP port, for rank 0 to host the process group."""
        with socket.socket() as sock:
            sock.bind(("", 0))
            port = sock.getsockname()[1]
        return ray.util.get_node_ip_address(), port


def learner_actor(num_cpus: float = 1.0, num_gpus: float = 0.0):
    """The Ray actor class for a learner, with its resource request."""
    return ray.remote(num_cpus=num_cpus, num_gpus=num_gpus)(_LearnerActor)


class LearnerGroup:
    """N data-parallel learner actors driven as one learner."""

    def __init__(
        self,
        model_path: str,
        lora: LoraSettings | None,
        settings: LearnerSettings,
        num_learners: int = 1,
        num_cpus: float = 1.0,
        num_gpus: float = 0.0,
    ):
        actor = learner_actor(num_cpus=num_cpus, num_gpus=num_gpus)
        self.actors = [actor.remote(model_path, lora, settings) for _ in range(num_learners)]
        if num_learners > 1:
            address, port = ray.get(self.actors[0].rendezvous.remote())
            ray.get([a.init_distributed.remote(address, port, rank, num_learners, "gloo") for rank, a in enumerate(self.actors)])

    def step(self, batch: TrainBatch) -> dict[str, float]:
        shards = batch.shards(len(self.actors))
        return ray.get([a.step.remote(shard) for a, shard in zip(self.actors, shards)])[0]

    def weight_update_ref(self) -> ray.ObjectRef:
        """Rank 0's weights as one object-store reference (all ranks are identical)."""
        return self.actors[0].weight_update.remote()

    def call(self, method: str, *args):
        """Rank 0's answer to a query (``logprobs``, ``parameter_digest``, ``weight_update``...)."""
        return ray.get(getattr(self.actors[0], method).remote(*args))

    def call_all(self, method: str, *args) -> list:
        return ray.get([getattr(a, method).remote(*args) for a in self.actors])

    def state_dicts(self) -> list[dict]:
        """Rank 0's whole state, then each further rank's RNG state (for a checkpoint)."""
        return ray.get([a.state_dict.remote(weights=rank == 0) for rank, a in enumerate(self.actors)])

    def load_state_dicts(self, states: list[dict], policy_version: int | None = None) -> int:
        """Every rank continues from rank 0's state, with its own RNG state where saved."""
        if len(states) != len(self.actors):
            logger.warning("checkpoint has %d learner ranks, this run %d: ranks without a saved RNG state take rank 0's", len(states), len(self.actors))
        ref = ray.put(states[0])
        rngs = [states[r]["rng"] if r < len(states) else None for r in range(len(self.actors))]
        return ray.get([a.load_state_dict.remote(ref, rng, policy_version) for a, rng in zip(self.actors, rngs)])[0]

    def save(self, folder: str | Path) -> Path:
        return self.call("save", str(folder))

    def kill(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
