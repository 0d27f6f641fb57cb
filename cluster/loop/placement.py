"""Where a run's learners and generators go: one Ray placement group, a bundle per role.

``cluster.placement`` chooses the layout:

- ``disaggregated``: a bundle per learner (its CPUs and GPUs) and a bundle per generator (its
  CPUs, its GPUs: ``generator.num_gpus``, which is ``tensor_parallel_size`` on a GPU cluster).
  Learners and generators never share a device, so in async mode both compute all the time.
- ``colocated``: a bundle per slot, holding learner *i* and generator *i* on the same device
  (one GPU per slot on a GPU cluster, their CPUs summed here). Each actor asks for half the
  slot's GPU, so Ray gives both the same one; the memory is shared either by a split stated in
  the config (``generator.gpu_memory_utilization`` leaves the rest to the learner) or by vLLM's
  sleep mode (``generator.sleep_mode``: the generators release their memory while the learner
  steps, and take it back for the weight broadcast).

A role's ``resources`` (custom Ray resources, e.g. ``{generator_node: 1}`` that only some nodes
advertise) go into its bundles: that is how a role is pinned to nodes. The verifier pool stays
outside the group: it grows and shrinks with the queue.

Before any actor starts, the group must be placed within ``cluster.placement_timeout_s``,
else the run stops naming the bundles the cluster cannot hold; then each node that holds a
bundle must be able to read the model folder (``check_model_on_nodes``).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import uuid
from pathlib import Path

import ray
from ray.exceptions import GetTimeoutError
from ray.util.placement_group import PlacementGroup, placement_group, placement_group_table, remove_placement_group
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy, PlacementGroupSchedulingStrategy

from cluster.config import Config

logger = logging.getLogger(__name__)


class PlacementError(RuntimeError):
    """The cluster cannot hold the run's actors, or a node cannot read what they need."""


@dataclasses.dataclass(frozen=True)
class Request:
    """What one actor asks of its bundle."""

    num_cpus: float
    num_gpus: float


@dataclasses.dataclass
class Placement:
    """A ready placement group and which bundle each learner and generator rank takes."""

    group: PlacementGroup
    layout: str
    learners: list[tuple[int, Request]]  # rank -> (bundle, request)
    generators: list[tuple[int, Request]]

    def _options(self, bundle: int, request: Request) -> dict:
        strategy = PlacementGroupSchedulingStrategy(self.group, placement_group_bundle_index=bundle, placement_group_capture_child_tasks=False)
        return {"num_cpus": request.num_cpus, "num_gpus": request.num_gpus, "scheduling_strategy": strategy}

    def learner_options(self, rank: int) -> dict:
        """``.options(...)`` for learner ``rank``: its bundle and its share of it."""
        return self._options(*self.learners[rank])

    def generator_options(self, rank: int) -> dict:
        return self._options(*self.generators[rank])

    def bundle_nodes(self) -> list[str]:
        """The node id each bundle was placed on, by bundle index."""
        table = placement_group_table(self.group)
        return [table["bundles_to_node_id"][i] for i in range(len(table["bundles"]))]

    def learner_nodes(self) -> list[str]:
        """The node id of each learner rank."""
        nodes = self.bundle_nodes()
        return [nodes[bundle] for bundle, _ in self.learners]

    def describe(self) -> list[dict]:
        """Each actor's role, rank, bundle and node: what the run directory records."""
        nodes = self.bundle_nodes()
        addresses = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()}
        rows = []
        for role, ranks in (("learner", self.learners), ("generator", self.generators)):
            for rank, (bundle, request) in enumerate(ranks):
                node = nodes[bundle]
                rows.append({"role": role, "rank": rank, "bundle": bundle, "node_id": node, "node_address": addresses.get(node),
                             "num_cpus": request.num_cpus, "num_gpus": request.num_gpus})  # fmt: skip
        return rows

    def remove(self) -> None:
        remove_placement_group(self.group)


def bundles(config: Config) -> tuple[list[dict], list[tuple[int, Request]], list[tuple[int, Request]]]:
    """The bundles ``config`` asks for, and each learner's and generator's (bundle, request)."""
    learner, generator = config.learner, config.generator
    if generator.pool is not None:  # a shared pool's generators are the pool's, placed when it started
        generator = dataclasses.replace(generator, num_generators=0)
    if config.cluster.placement == "disaggregated":
        learner_bundle = _bundle(learner.num_cpus, learner.num_gpus, learner.resources)
        generator_bundle = _bundle(generator.num_cpus, generator.num_gpus, generator.resources)
        specs = [learner_bundle] * learner.num_learners + [generator_bundle] * generator.num_generators
        learners = [(i, Request(learner.num_cpus, learner.num_gpus)) for i in range(learner.num_learners)]
        generators = [(learner.num_learners + i, Request(generator.num_cpus, generator.num_gpus)) for i in range(generator.num_generators)]
        return specs, learners, generators
    # colocated: slot i holds learner i and generator i on one device
    gpus = learner.num_gpus
    resources = {k: learner.resources.get(k, 0.0) + generator.resources.get(k, 0.0) for k in {*learner.resources, *generator.resources}}
    slot = _bundle(learner.num_cpus + generator.num_cpus, gpus, resources)
    slots = learner.num_learners
    return (
        [slot] * slots,
        [(i, Request(learner.num_cpus, gpus / 2)) for i in range(slots)],
        [(i, Request(generator.num_cpus, gpus / 2)) for i in range(slots)],
    )


def _bundle(cpus: float, gpus: float, resources: dict[str, float]) -> dict[str, float]:
    bundle = {"CPU": cpus, **resources}
    if gpus:
        bundle["GPU"] = gpus
    return bundle


def place(config: Config) -> Placement:
    """Create the run's placement group and wait until Ray has placed it; a group the cluster
    cannot hold is a ``PlacementError`` naming what was asked and what the cluster has."""
    specs, learners, generators = bundles(config)
    demand: dict[str, float] = {}
    for spec in specs:
        for key, amount in spec.items():
            demand[key] = demand.get(key, 0.0) + amount
    total = ray.cluster_resources()
    short = {k: v for k, v in demand.items() if v > total.get(k, 0.0) + 1e-9}
    if short:  # Ray would wait forever: say so now
        raise PlacementError(
            f"cluster.placement={config.cluster.placement} needs {_resources(demand)} in all, but the Ray cluster has "
            f"{_resources(total)} (short of {sorted(short)}; see `ray status`): lower the learner/generator counts, "
            "num_cpus or num_gpus, or add nodes"
        )
    # named for the dashboard's placement-group view; unique, as Ray's named groups must be
    name = f"raylight-{Path(config.run.run_dir).name}-{uuid.uuid4().hex[:8]}"
    group = placement_group(specs, strategy=config.cluster.strategy, name=name)
    try:
        ray.get(group.ready(), timeout=config.cluster.placement_timeout_s)
    except GetTimeoutError:
        remove_placement_group(group)
        raise PlacementError(
            f"cluster.placement={config.cluster.placement}: Ray could not place the bundles {specs} "
            f"(strategy {config.cluster.strategy}) within {config.cluster.placement_timeout_s:.0f} s; the cluster has "
            f"{_resources(ray.available_resources())} free of {_resources(ray.cluster_resources())} "
            "(lower learner/generator num_cpus, num_gpus or counts, or add nodes)"
        ) from None
    placement = Placement(group, config.cluster.placement, learners, generators)
    logger.info("placement (%s): %s", config.cluster.placement, placement.describe())
    return placement


def _resources(resources: dict) -> str:
    shown = {k: round(v, 2) for k, v in sorted(resources.items()) if not k.startswith(("node:", "memory", "object_store"))}
    return str(shown)


@ray.remote(num_cpus=0)
def _readable(path: str) -> tuple[bool, str]:
    folder = Path(path)
    ok = (folder / "config.json").is_file() and os.access(folder / "config.json", os.R_OK)
    return ok, ray.util.get_node_ip_address()


def check_model_on_nodes(model_path: str, node_ids: list[str], timeout_s: float = 60.0) -> None:
    """Every node in ``node_ids`` can read the model folder ``model_path``, or a
    ``PlacementError`` names the first that cannot. A Hub name (not a folder on the driver)
    is fetched by each node into its own cache, so it is not checked."""
    if not Path(model_path).is_dir():
        return
    nodes = sorted(set(node_ids))
    refs = [_readable.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(model_path) for node in nodes]
    for node, (ok, address) in zip(nodes, ray.get(refs, timeout=timeout_s)):
        if not ok:
            raise PlacementError(
                f"model.path {model_path} cannot be read on node {address} (node id {node}), which hosts learners or "
                "generators: put the model on a path every node can read (a shared file system), prepare it on each "
                "node, or give model.path as a Hugging Face name that each node downloads"
            )


def shared_probe(folder: str, token: str, node: str) -> str | None:
    """On one node: why ``folder`` is not the driver's (it lacks the driver's probe file
    ``token``) or not writable here, or None after writing ``token.<node>``."""
    seen = Path(folder) / token
    if not seen.is_file():
        return f"{folder} does not hold the file the driver wrote there"
    try:
        (Path(folder) / f"{token}.{node}").write_bytes(b"ok")
    except OSError as exc:
        return f"{folder} is not writable ({exc.strerror})"
    return None


@ray.remote(num_cpus=0)
def _shared_probe(folder: str, token: str, node: str) -> tuple[str | None, str]:
    return shared_probe(folder, token, node), ray.util.get_node_ip_address()


def check_shared_folder(folder: str, node_ids: list[str], timeout_s: float = 60.0) -> str | None:
    """Why ``folder`` (a folder on the driver) is not one that every node in ``node_ids``
    sees and writes, naming the first node that does not, or None when they all do (always on
    one node). Each node must see a file the driver wrote, and the driver each node's file;
    the probe files are removed."""
    token = f".shared-probe-{uuid.uuid4().hex[:8]}"
    probe = Path(folder) / token
    try:
        probe.write_bytes(b"driver")
    except OSError as exc:
        return f"the driver cannot write {folder} ({exc.strerror})"
    try:
        nodes = sorted(set(node_ids))
        refs = [_shared_probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(folder, token, node) for node in nodes]
        for node, (problem, address) in zip(nodes, ray.get(refs, timeout=timeout_s)):
            if problem is None and not (Path(folder) / f"{token}.{node}").is_file():
                problem = f"the driver does not see what node {address} wrote into {folder}"
            if problem is not None:
                return f"on node {address} (node id {node}): {problem}"
        return None
    finally:
        for path in Path(folder).glob(f"{token}*"):
            path.unlink(missing_ok=True)
