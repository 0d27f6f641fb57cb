"""``raylight train``'s capacity check before any actor starts, and the facts it reads.

Not pure (the planner is): it reads this machine (logical CPUs, physical memory, bf16 units,
local GPUs), or a joined Ray cluster's resources, and the policy's ``config.json``. A config
that cannot fit is a ``ConfigError`` (exit code 2) naming the key to change.

What a joined cluster (``RAY_ADDRESS``) is checked on: its CPUs and GPUs
(``ray.cluster_resources()``, GPUs per node from ``ray.nodes()``). Its GPUs' memory and its
nodes' host memory are not known to Ray in a form to plan with, so they are not checked there;
``raylight plan --gpu-memory --host-memory`` checks them.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from cluster.capacity.planner import Machine, Problem, Shapes, cpu_problems, gpu_problems, make_plan
from cluster.capacity.shapes import ModelShape, read_shape
from cluster.config import Config, ConfigError

logger = logging.getLogger(__name__)

# the longest prompt the check assumes (tokens; `raylight plan --prompt-tokens` sets it)
PROMPT_TOKENS = 256


def host_memory_gib() -> float:
    """This machine's physical memory, GiB."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30


def bf16_cpu() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AMX or AVX512-BF16), as the learner and
    the engine decide ``dtype: auto``."""
    import torch

    return bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())


def local_gpus() -> tuple[int, float | None]:
    """The GPUs torch sees here and the first one's memory, GiB ((0, None) without CUDA)."""
    import torch

    if not torch.cuda.is_available():
        return 0, None
    return torch.cuda.device_count(), torch.cuda.get_device_properties(0).total_memory / 2**30


def local_machine(config: Config) -> Machine:
    """The embedded local cluster ``raylight train`` starts: ``run.num_cpus`` logical CPUs
    (null: every core), this machine's memory and GPUs."""
    gpus, gpu_gib = local_gpus()
    cpus = config.run.num_cpus if config.run.num_cpus is not None else os.cpu_count() or 1
    return Machine(1, float(cpus), gpus, gpu_gib, host_memory_gib(), bf16_cpu(), local=True)


def joined_machine() -> Machine:
    """A running Ray cluster, as Ray reports it: its CPUs, and its GPUs node by node."""
    import ray

    return machine_of_nodes([n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")], ray.cluster_resources().get("CPU", 0.0))


def machine_of_nodes(nodes: list[dict], cpus: float) -> Machine:
    """The machine a cluster of ``nodes`` (each node's Ray resources) with ``cpus`` CPUs in all
    is planned as: its GPU nodes (all nodes on a CPU cluster), each with an equal share of the
    CPUs. The totals are exact; the split is exact for alike GPU nodes."""
    counted = [n for n in nodes if n.get("GPU", 0) > 0] or nodes or [{}]
    gpus_per_node = int(max(n.get("GPU", 0) for n in counted))
    return Machine(len(counted), float(cpus) / len(counted), gpus_per_node, None, None, bf16_cpu())


def shapes_of(config: Config, model_path: str) -> Shapes:
    """The policy's shape and its checkpoint's bytes per parameter, and the served models'
    shapes where they can be read offline."""
    served: dict[str, ModelShape] = {}
    r = config.reward
    for spec in (r.model and r.model.path, r.judge and r.judge.model, r.teacher and r.teacher.model):
        if spec and spec not in ("base", "tiny-classifier"):
            try:
                served[spec] = read_shape(spec)
            except (FileNotFoundError, KeyError, ValueError) as exc:
                logger.info("capacity: no shape for %s (%s)", spec, exc)
    return Shapes(read_shape(model_path), checkpoint_bytes(model_path), served)


def checkpoint_bytes(model_path: str) -> int:
    """Bytes per parameter of a model folder's files (its config's dtype; 2 when unknown)."""
    config = Path(model_path) / "config.json"
    if not config.is_file():
        return 2
    data = json.loads(config.read_text())
    dtype = data.get("dtype") or data.get("torch_dtype") or "bfloat16"
    return 4 if dtype == "float32" else 2


def refuse_unless_fits(problems: tuple[Problem, ...] | list[Problem]) -> None:
    """A ``ConfigError`` listing every problem (each names its key), if there is one."""
    if problems:
        raise ConfigError("the config does not fit (`raylight plan CONFIG` shows each actor's share): "
                          + "; ".join(f"{p.key}: {p.message}" for p in problems))  # fmt: skip


def problems_on(config: Config, model_path: str, machine: Machine, prompt_tokens: int = PROMPT_TOKENS) -> tuple[Problem, ...]:
    """What stops ``config`` on ``machine``. A policy whose shape cannot be read offline (a Hub
    name neither cached nor in the table: each node downloads it at start) is checked for CPUs
    and GPUs only."""
    try:
        shapes = shapes_of(config, model_path)
    except FileNotFoundError as exc:
        logger.warning("capacity check: %s; checking CPUs and GPUs only", exc)
        return (*cpu_problems(config, machine), *gpu_problems(config, machine))
    return make_plan(config, shapes, machine, prompt_tokens).problems


def check_before_start(config: Config, model_path: str, prompt_tokens: int = PROMPT_TOKENS) -> bool:
    """Before ``raylight train`` starts a local Ray cluster: ``config`` must fit this machine
    (``run.num_cpus``, its memory and GPUs). Returns False, having checked nothing, when the
    run joins a cluster (``RAY_ADDRESS``, or Ray already running in this process): then
    ``check_joined_cluster`` checks once connected."""
    import ray

    if os.environ.get("RAY_ADDRESS") or ray.is_initialized():
        return False
    refuse_unless_fits(problems_on(config, model_path, local_machine(config), prompt_tokens))
    return True


def check_joined_cluster(config: Config, model_path: str, prompt_tokens: int = PROMPT_TOKENS) -> None:
    """Connected to a running cluster: its CPUs and GPUs must hold the actors, before the
    placement group is asked for."""
    refuse_unless_fits(problems_on(config, model_path, joined_machine(), prompt_tokens))
