"""Learner actors: one ``learners.learner.Learner`` per Ray actor, and the data-parallel group.

``LearnerGroup`` starts N learner actors, joins them in one ``torch.distributed`` process
group (NCCL when Ray gave them GPUs, gloo on CPUs), hands each its contiguous shard of the
batch and returns rank 0's (globally reduced) metrics. All ranks hold the same parameters
after every step, so the weight broadcast to the generators is taken from rank 0 only: one
``ObjectRef``, sent once. Queries go to rank 0 through typed methods, never by method name.
With ``sharding: fsdp`` each rank holds a shard of the weights, and a query that reads them
(a forward pass, a weight export, a digest) is a collective: it goes to every rank with the
same arguments, and rank 0's answer is returned.

Every wait on the learners has a deadline (``learner.call_timeout_s``), and so has every
collective inside the group: a rank that dies or hangs raises ``LearnerFailure`` in the
driver, which kills the whole group (its surviving ranks would wait on the lost one) and
builds a new one from the newest checkpoint (``Trainer.recover_learners``).
"""

from __future__ import annotations

import collections
import ctypes
import logging
import socket
import time
from dataclasses import dataclass, field
from typing import Literal

import ray
import torch
from ray.exceptions import RayActorError, RayTaskError

from contracts import PolicyRef, TrainBatch, WeightUpdate
from contracts.footprint import peak_rss_gib
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
        self.events: collections.deque[tuple[str, float]] = collections.deque([("start", time.time())], maxlen=1000)
        self.learner = Learner(settings, device=assigned_device())

    @ray.method(concurrency_group="health")
    def alive(self) -> bool:
        """Answers on its own thread, while a step runs: a rank that does not is frozen."""
        return True

    @ray.method(concurrency_group="health")
    def peak_rss_gib(self) -> float:
        """This rank's peak memory, GiB (answered beside a running step)."""
        return peak_rss_gib()

    def rendezvous(self) -> tuple[str, int]:
        """This node's address and a free TCP port, for rank 0 to host the process group."""
        with socket.socket() as sock:
            sock.bind(("", 0))
            port = sock.getsockname()[1]
        return ray.util.get_node_ip_address(), port

    def init_distributed(self, address: str, port: int, rank: int, world_size: int, timeout_s: float) -> None:
        self.learner.init_distributed(address, port, rank, world_size, timeout_s)

    def step(self, batch: TrainBatch, objective: ObjectiveName = "ppo") -> dict[str, float]:
        self.events.append(("step", time.time()))
        try:
            return self.learner.step(batch, objective)
        finally:
            release_free_memory()
            self.events.append(("release memory", time.time()))

    @ray.method(concurrency_group="health")
    def recorded(self) -> list[tuple[str, float]]:
        """When this rank started and each step began and released its memory (wall clock):
        the colocated hand-over's order, for diagnosis and tests."""
        return list(self.events)

    def policy_version(self) -> PolicyRef:
        return self.learner.policy_version()

    def logprobs(self, batch: TrainBatch) -> list[list[float]]:
        return self.learner.logprobs(batch)

    def sequence_logprob(self, contexts: list[list[int]], targets: list[list[int]], reference: bool = False) -> list[float]:
        return self.learner.sequence_logprob(contexts, targets, reference)

    def parameter_digest(self) -> dict[str, str]:
        return self.learner.parameter_digest()

    def load_adapter(self, update: WeightUpdate) -> PolicyRef:
        return self.learner.load_adapter(update)

    def attention_scales(self) -> torch.Tensor | None:
        return self.learner.attention_scales()

    def set_attention_scales(self, scales: torch.Tensor) -> PolicyRef:
        return self.learner.set_attention_scales(scales)

    def weight_update(self, complete: bool = False, dtype: str | None = None, bucket_bytes: int = 0) -> WeightUpdate:
        """``bucket_bytes``: model weights in buckets, each put in the object store as it fills
        (owned by this actor: lost with it, which a receiver reports)."""
        return self.learner.weight_update(complete, dtype, bucket_bytes, keep=ray.put)

    def state_dict(self, weights: bool = True) -> dict:
        return self.learner.state_dict(weights)

    def load_state_dict(self, state: dict, rng: dict | torch.Tensor | None = None, policy_version: int | None = None) -> PolicyRef:
        return self.learner.load_state_dict(state, rng, policy_version)

    def save_shards(self, folder: str) -> dict:
        return self.learner.save_shards(folder)

    def load_shards(self, folder: str, state: dict, rng: dict | torch.Tensor | None = None, policy_version: int | None = None) -> PolicyRef:
        return self.learner.load_shards(folder, state, rng, policy_version)

    def scale_lr(self, factor: float) -> float:
        return self.learner.scale_lr(factor)


def release_free_memory() -> None:
    """Hand the memory a step freed back: the GPU blocks torch's caching allocator keeps (a
    colocated engine wakes into them next), and host memory to the system (glibc's
    ``malloc_trim``: batches of other lengths every step leave glibc's heaps fragmented, and
    without it a learner actor's peak grew from 6.8 to 9.8 GiB over 5 steps of the TRL
    benchmark's work; a no-op off glibc)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def learner_actor(num_cpus: float = 1.0, num_gpus: float = 0.0):
    """The Ray actor class for a learner, with its resource request. Its calls run one at a
    time; ``alive`` answers beside them (the ``health`` concurrency group)."""
    return ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, concurrency_groups={"health": 1})(LearnerActor)


@dataclass(frozen=True)
class LearnerGroupSettings:
    """How many learner actors, and what each asks of the cluster (the config's ``learner`` section)."""

    num_learners: int = 1  # data-parallel learner actors (gradients all-reduced)
    # none: every learner holds the whole model and optimizer state; fsdp: PyTorch FSDP2 shards
    # parameters, gradients and optimizer state over the learners (docs/cluster.md#sharded-learners)
    sharding: Literal["none", "fsdp"] = "none"
    # sharding=fsdp: FSDP2's CPU offload, the shards, their gradients and the optimizer state in host memory (the step runs there)
    offload_optimizer: bool = False
    num_cpus: float = 1.0  # per learner
    num_gpus: float = 0.0  # per learner: trains on the GPU Ray assigns (bf16 autocast, NCCL between learners)
    threads: int = 0  # torch threads per learner (0: every core, divided among the learners)
    gradient_checkpointing: bool = False  # recompute activations in the backward pass: less memory, ~1/3 more compute
    resources: dict[str, float] = field(default_factory=dict)  # custom Ray resources per learner (pins them to nodes)
    # model weights (model.train: full or modules) stream to the generators in buckets of this
    # many MB; the learner and each generator process hold one at a time (0: all in one piece)
    weight_bucket_mb: float = 512.0
    call_timeout_s: float = 1800.0  # a learner call (a step, a checkpoint) or collective running longer: the rank is lost
    heartbeat_s: float = 30.0  # a rank that does not answer a ping for this long while it works is frozen: lost
    max_recoveries: int = 3  # lost learner groups rebuilt from the newest checkpoint in one run; one more stops it


class LearnerFailure(RuntimeError):
    """A learner rank died or missed its deadline: the group cannot go on (build a new one)."""


class LearnerGroup:
    """N data-parallel learner actors driven as one learner."""

    def __init__(self, settings: LearnerSettings, group: LearnerGroupSettings = LearnerGroupSettings(), options: list[dict] | None = None):
        """``options``: each rank's ``.options(...)`` (its placement group bundle and share)."""
        self.timeout_s, self.heartbeat_s = group.call_timeout_s, group.heartbeat_s
        self.bucket_bytes = int(group.weight_bucket_mb * 2**20)
        sharded = settings.sharding == "fsdp" and group.num_learners > 1  # what the learners do (wiring copies learner.sharding)
        actor = learner_actor(num_cpus=group.num_cpus, num_gpus=group.num_gpus)
        self.actors = [(actor.options(**options[rank]) if options else actor).remote(settings) for rank in range(group.num_learners)]
        self._started = [a.alive.remote() for a in self.actors]  # ready once every rank has loaded its model
        if group.num_learners > 1:
            # no heartbeat yet: a rank answers pings once its model is loaded
            address, port = self._get(self.actors[0].rendezvous.remote(), "the rendezvous", heartbeat=False)
            joins = [a.init_distributed.remote(address, port, rank, group.num_learners, self.timeout_s) for rank, a in enumerate(self.actors)]
            self._get(joins, "joining the process group", heartbeat=False)
        # the ranks a query that reads the weights goes to: rank 0, or all of them when sharded
        self.readers = self.actors if sharded else self.actors[:1]

    def _get(self, refs, what: str, heartbeat: bool = True):
        """``ray.get`` with the group's deadline. A rank that dies, or fails because a peer
        died under it (a broken collective), is a ``LearnerFailure``; an error of a healthy
        group is raised as it is. With ``heartbeat``, every ``heartbeat_s`` of waiting pings
        the ranks: a frozen one is found long before the deadline."""
        pending = [refs] if isinstance(refs, ray.ObjectRef) else list(refs)
        deadline = time.monotonic() + self.timeout_s
        while pending:
            wait_s = deadline - time.monotonic()
            ready, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, min(self.heartbeat_s, wait_s) if heartbeat else wait_s))
            if not ready:
                if time.monotonic() >= deadline:
                    lost = self.lost_ranks() or "every rank answers, one is stuck"
                    raise LearnerFailure(f"the learners did not finish {what} within learner.call_timeout_s={self.timeout_s:.0f}s: {lost}")
                if self.started() and (lost := self.lost_ranks()):  # a heartbeat while the call runs
                    raise LearnerFailure(f"learner {lost} (learner.heartbeat_s={self.heartbeat_s:.0f}s) during {what}: frozen or gone")
                continue
            try:
                ray.get(ready[0])
            except (RayActorError, RayTaskError) as exc:
                lost = self.lost_ranks()
                if not lost:
                    raise
                raise LearnerFailure(f"learner {lost} during {what} ({type(exc).__name__})") from exc
        return ray.get(refs)

    def wait_started(self) -> None:
        """Wait until every rank has loaded its model (within ``call_timeout_s``)."""
        self._get(self._started, "loading the model", heartbeat=False)

    def started(self) -> bool:
        """Whether every rank has loaded its model (before that, no rank answers a ping)."""
        return len(ray.wait(self._started, num_returns=len(self._started), timeout=0)[0]) == len(self._started)

    def lost_ranks(self) -> str:
        """Which ranks are dead or do not answer a ping within ``heartbeat_s``, in words (''
        when every rank answers; a busy rank answers on its health thread)."""
        pings = [a.alive.remote() for a in self.actors]
        answered, _ = ray.wait(pings, num_returns=len(pings), timeout=self.heartbeat_s)
        dead, silent = [], []
        for rank, ping in enumerate(pings):
            if ping not in answered:
                silent.append(rank)
                continue
            try:
                ray.get(ping)
            except RayActorError:
                dead.append(rank)
        return "; ".join(f"rank {', '.join(map(str, ranks))} {words}" for ranks, words in ((dead, "died"), (silent, "did not answer")) if ranks)

    def step(self, batch: TrainBatch, objective: ObjectiveName = "ppo") -> dict[str, float]:
        shards = batch.shards(len(self.actors))
        return self._get([a.step.remote(shard, objective) for a, shard in zip(self.actors, shards)], "a training step")[0]

    # -- rank 0's answers (all ranks hold the same weights, or take part in reading them) ----

    def policy_version(self) -> PolicyRef:
        return self._get(self.actors[0].policy_version.remote(), "a policy query")

    def logprobs(self, batch: TrainBatch) -> list[list[float]]:
        return self._get([a.logprobs.remote(batch) for a in self.readers], "a log-prob query")[0]

    def sequence_logprob(self, contexts: list[list[int]], targets: list[list[int]], reference: bool = False) -> list[float]:
        return self._get([a.sequence_logprob.remote(contexts, targets, reference) for a in self.readers], "a log-prob query")[0]

    def parameter_digest(self) -> dict[str, str]:
        return self._get([a.parameter_digest.remote() for a in self.readers], "a parameter digest")[0]

    def attention_scales(self) -> torch.Tensor | None:
        return self._get([a.attention_scales.remote() for a in self.readers], "an attention-scale query")[0]

    def weight_update_ref(self, complete: bool = False, dtype: str | None = None, streamed: bool = False) -> ray.ObjectRef:
        """Rank 0's weights as one object-store reference, to broadcast without a copy here
        (``complete``: every parameter, not only the trained ones; ``dtype``: model weights
        sent in the generators' dtype; ``streamed``: model weights in buckets of
        ``learner.weight_bucket_mb``, for generators to load one at a time). Sharded, every
        rank takes part in the gather; the others' (empty) answers are dropped, and each
        rank's next call waits behind this one."""
        bucket_bytes = self.bucket_bytes if streamed else 0
        return [a.weight_update.remote(complete, dtype, bucket_bytes) for a in self.readers][0]

    def weight_update(self, complete: bool = False) -> WeightUpdate:
        return self._get(self.weight_update_ref(complete), "a weight export")

    # -- every rank -------------------------------------------------------------------------

    def scale_lr(self, factor: float) -> float:
        return self._get([a.scale_lr.remote(factor) for a in self.actors], "a learning-rate change")[0]

    def load_adapter(self, update: WeightUpdate) -> PolicyRef:
        return self._get([a.load_adapter.remote(update) for a in self.actors], "an adapter load")[0]

    def set_attention_scales(self, scales: torch.Tensor) -> PolicyRef:
        return self._get([a.set_attention_scales.remote(scales) for a in self.actors], "an attention-scale change")[0]

    def state_dicts(self) -> list[dict]:
        """Rank 0's whole state, then each further rank's RNG state (for a checkpoint; sharded,
        every rank helps gather rank 0's whole tensors)."""
        return self._get([a.state_dict.remote(weights=rank == 0) for rank, a in enumerate(self.actors)], "a state export")

    def load_state_dicts(self, states: list[dict], policy_version: int | None = None) -> PolicyRef:
        """Every rank continues from rank 0's state, with its own RNG state where saved."""
        ref, rngs = self._spread(states)
        return self._get([a.load_state_dict.remote(ref, rng, policy_version) for a, rng in zip(self.actors, rngs)], "a state restore")[0]

    def save_shards(self, folder: str) -> list[dict]:
        """Every rank writes its shards of the weights and optimizer state into ``folder``
        (which each must be able to write: a shared file system); returns ``state_dicts``'s
        list without those tensors."""
        return self._get([a.save_shards.remote(folder) for a in self.actors], "a sharded checkpoint")

    def load_shards(self, folder: str, states: list[dict], policy_version: int | None = None) -> PolicyRef:
        """``load_state_dicts`` from ``save_shards``'s ``folder`` and states: every rank reads
        its shards from the files (a group of another size reshards)."""
        ref, rngs = self._spread(states)
        return self._get([a.load_shards.remote(folder, ref, rng, policy_version) for a, rng in zip(self.actors, rngs)], "a sharded restore")[0]

    def _spread(self, states: list[dict]) -> tuple[ray.ObjectRef, list]:
        """Rank 0's state in the object store once, and each rank's saved RNG state (None for
        a rank the checkpoint has none of: it takes rank 0's)."""
        if len(states) != len(self.actors):
            logger.warning("checkpoint has %d learner ranks, this run %d: ranks without a saved RNG state take rank 0's", len(states), len(self.actors))
        return ray.put(states[0]), [states[r]["rng"] if r < len(states) else None for r in range(len(self.actors))]

    def kill(self) -> None:
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
