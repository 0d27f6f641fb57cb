"""Learner actors: one ``learners.learner.Learner`` per Ray actor, and the data-parallel group.

``LearnerGroup`` starts N learner actors, joins them in one ``torch.distributed`` process
group (NCCL when Ray gave them GPUs, gloo on CPUs), hands each its contiguous shard of the
batch and returns rank 0's (globally reduced) metrics. All ranks hold the same parameters
after every step, so the weight broadcast to the generators is taken from rank 0 only: one
``ObjectRef``, sent once. Queries go to rank 0 through typed methods, never by method name.
"""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass, field

import ray
import torch

from contracts import PolicyRef, TrainBatch, WeightUpdate
from learners.learner import Learner
from learners.settings import LearnerSettings
from learners.objectives import ObjectiveName

logger = logging.getLogger(__name__)


def assigned_device() -> torch.device:
    """The device Ray gave this actor: its first GPU (Ray sets CUDA_VISIBLE_DEVICES to the
    GPUs it assigned, so that one is ``cuda:0``), or the CPU when it assigned none."""
    return torch.device("cuda", 0) if ray.get_gpu_ids() else torch.device("cpu")


class LearnerActor:
    """A Learner (held, not inherited) on the device Ray gave the actor, plus what a rank
    needs to find its peers."""

    def __init__(self, settings: LearnerSettings):
        self.learner = Learner(settings, device=assigned_device())

    def rendezvous(self) -> tuple[str, int]:
        """This node's address and a free TCP port, for rank 0 to host the process group."""
        with socket.socket() as sock:
            sock.bind(("", 0))
            port = sock.getsockname()[1]
        return ray.util.get_node_ip_address(), port

    def init_distributed(self, address: str, port: int, rank: int, world_size: int) -> None:
        self.learner.init_distributed(address, port, rank, world_size)

    def step(self, batch: TrainBatch, objective: ObjectiveName = "ppo") -> dict[str, float]:
        return self.learner.step(batch, objective)

    def policy_version(self) -> PolicyRef:
        return self.learner.policy_version()

    def logprobs(self, batch: TrainBatch) -> list[list[float]]:
        return self.learner.logprobs(batch)

    def sequence_logprob(self, contexts: list[list[int]], targets: list[list[int]], reference: bool = False) -> list[float]:
        return self.learner.sequence_logprob(contexts, targets, reference)

    def parameter_digest(self) -> dict[str, str]:
        return self.learner.parameter_digest()

    def weight_update(self) -> WeightUpdate:
        return self.learner.weight_update()

    def state_dict(self, weights: bool = True) -> dict:
        return self.learner.state_dict(weights)

    def load_state_dict(self, state: dict, rng: torch.Tensor | None = None, policy_version: int | None = None) -> PolicyRef:
        return self.learner.load_state_dict(state, rng, policy_version)

    def scale_lr(self, factor: float) -> float:
        return self.learner.scale_lr(factor)


def learner_actor(num_cpus: float = 1.0, num_gpus: float = 0.0):
    """The Ray actor class for a learner, with its resource request."""
    return ray.remote(num_cpus=num_cpus, num_gpus=num_gpus)(LearnerActor)


@dataclass(frozen=True)
class LearnerGroupSettings:
    """How many learner actors, and what each asks of the cluster (the config's ``learner`` section)."""

    num_learners: int = 1  # data-parallel learner actors (gradients all-reduced)
    num_cpus: float = 1.0  # per learner
    num_gpus: float = 0.0  # per learner: trains on the GPU Ray assigns (bf16 autocast, NCCL between learners)
    threads: int = 0  # torch threads per learner (0: every core, divided among the learners)
    gradient_checkpointing: bool = False  # recompute activations in the backward pass: less memory, ~1/3 more compute
    resources: dict[str, float] = field(default_factory=dict)  # custom Ray resources per learner (pins them to nodes)


class LearnerGroup:
    """N data-parallel learner actors driven as one learner."""

    def __init__(self, settings: LearnerSettings, group: LearnerGroupSettings = LearnerGroupSettings(), options: list[dict] | None = None):
        """``options``: each rank's ``.options(...)`` (its placement group bundle and share)."""
        actor = learner_actor(num_cpus=group.num_cpus, num_gpus=group.num_gpus)
        self.actors = [(actor.options(**options[rank]) if options else actor).remote(settings) for rank in range(group.num_learners)]
        if group.num_learners > 1:
            address, port = ray.get(self.actors[0].rendezvous.remote())
            ray.get([a.init_distributed.remote(address, port, rank, group.num_learners) for rank, a in enumerate(self.actors)])

    def step(self, batch: TrainBatch, objective: ObjectiveName = "ppo") -> dict[str, float]:
        shards = batch.shards(len(self.actors))
        return ray.get([a.step.remote(shard, objective) for a, shard in zip(self.actors, shards)])[0]

    # -- rank 0's answers (all ranks hold the same weights) ---------------------------------

    def policy_version(self) -> PolicyRef:
        return ray.get(self.actors[0].policy_version.remote())

    def logprobs(self, batch: TrainBatch) -> list[list[float]]:
        return ray.get(self.actors[0].logprobs.remote(batch))

    def sequence_logprob(self, contexts: list[list[int]], targets: list[list[int]], reference: bool = False) -> list[float]:
        return ray.get(self.actors[0].sequence_logprob.remote(contexts, targets, reference))

    def parameter_digest(self) -> dict[str, str]:
        return ray.get(self.actors[0].parameter_digest.remote())

    def weight_update_ref(self) -> ray.ObjectRef:
        """Rank 0's weights as one object-store reference, to broadcast without a copy here."""
        return self.actors[0].weight_update.remote()

    def weight_update(self) -> WeightUpdate:
        return ray.get(self.weight_update_ref())

    # -- every rank -------------------------------------------------------------------------

    def scale_lr(self, factor: float) -> float:
        return ray.get([a.scale_lr.remote(factor) for a in self.actors])[0]

    def state_dicts(self) -> list[dict]:
        """Rank 0's whole state, then each further rank's RNG state (for a checkpoint)."""
        return ray.get([a.state_dict.remote(weights=rank == 0) for rank, a in enumerate(self.actors)])

    def load_state_dicts(self, states: list[dict], policy_version: int | None = None) -> PolicyRef:
        """Every rank continues from rank 0's state, with its own RNG state where saved."""
        if len(states) != len(self.actors):
            logger.warning("checkpoint has %d learner ranks, this run %d: ranks without a saved RNG state take rank 0's", len(states), len(self.actors))
        ref = ray.put(states[0])
        rngs = [states[r]["rng"] if r < len(states) else None for r in range(len(self.actors))]
        return ray.get([a.load_state_dict.remote(ref, rng, policy_version) for a, rng in zip(self.actors, rngs)])[0]

    def kill(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
