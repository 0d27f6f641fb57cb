"""``raylight plan CONFIG``: whether a config fits, before anything starts (docs/capacity.md).

Without machine options it plans for this machine as ``raylight train`` would start it (an
embedded local cluster of ``run.num_cpus`` CPUs, this machine's memory and GPUs); with
``--gpus-per-node``, ``--gpu-memory``, ``--nodes``, ``--cpus-per-node`` or ``--host-memory``
it plans for the cluster they describe (an option left out is not checked). Exit code 0: it
fits; 2: it does not (each problem names the key to change).
"""

from __future__ import annotations

import dataclasses
import json
import re

from cluster.capacity.check import PROMPT_TOKENS, bf16_cpu, local_machine, shapes_of
from cluster.capacity.planner import Machine, Plan, make_plan
from cluster.config import Config, ConfigError, load_config
from cluster.exits import ExitCode


def parse_gib(text: str | None) -> float | None:
    """'80GiB', '80GB', '80G' or '80' -> 80.0 (GiB); None stays None."""
    if text is None:
        return None
    match = re.fullmatch(r"\s*([0-9.]+)\s*(gib|gb|g)?\s*", text.lower())
    if not match:
        raise ConfigError(f"a memory size like 80GiB, got {text!r}")
    return float(match.group(1))


def described_machine(config: Config, nodes: int | None, cpus_per_node: float | None, gpus_per_node: int | None,
                      gpu_memory_gib: float | None, host_memory_gib: float | None) -> Machine:  # fmt: skip
    """The machine the options describe (its CPUs' bf16 units taken to be this machine's), or
    this one (as ``raylight train`` sees it) when none is given."""
    if all(v is None for v in (nodes, cpus_per_node, gpus_per_node, gpu_memory_gib, host_memory_gib)):
        return local_machine(config)
    return Machine(nodes or 1, cpus_per_node, gpus_per_node or 0, gpu_memory_gib, host_memory_gib, bf16_cpu())


def plan_config(config: Config, machine: Machine, prompt_tokens: int = PROMPT_TOKENS) -> Plan:
    from rollout.models import resolve_model

    return make_plan(config, shapes_of(config, resolve_model(config.model.path)), machine, prompt_tokens)


def plan_json(plan: Plan, machine: Machine) -> dict:
    """The plan as plain data: the machine, each actor's parts in GiB, the totals, the problems."""
    actors = []
    for a in plan.actors:
        row = dataclasses.asdict(a)
        row["device_gib"] = {k: round(v, 3) for k, v in a.device_gib}
        row["peak_gib"], row["host_gib"] = round(a.peak_gib, 3), round(a.host_gib, 3)
        actors.append(row)
    return {
        "fits": plan.fits,
        "machine": dataclasses.asdict(machine),
        "actors": actors,
        "cpus": {"asked": plan.cpus[0], "available": plan.cpus[1]},
        "gpus": {"asked": plan.gpus[0], "available": plan.gpus[1]},
        "host_gib": {"asked": round(plan.host_gib[0], 3), "available": plan.host_gib[1]},
        "problems": [dataclasses.asdict(p) for p in plan.problems],
        "notes": list(plan.notes),
    }


def plan_table(plan: Plan, machine: Machine) -> str:
    """A readable table: one row per kind of actor, its memory by part, its largest batch."""
    lines = [f"{'actor':<13}{'n':>3}{'cpus':>6}{'gpus':>6}  {'on':<4}{'peak GiB':>9}{'host GiB':>9}  parts (GiB)"]
    for a in plan.actors:
        parts = ", ".join(f"{k} {v:.2f}" for k, v in a.device_gib if abs(v) >= 0.005)
        lines.append(f"{a.role:<13}{a.count:>3}{a.num_cpus:>6g}{a.num_gpus:>6g}  {a.device:<4}{a.peak_gib:>9.2f}{a.host_gib:>9.2f}  {parts}")
        if a.largest_batch is not None:
            lines.append(f"{'':<13}   largest batch that fits: {a.batch_key} <= {a.largest_batch}")
    cpus, gpus, host = plan.cpus, plan.gpus, plan.host_gib
    lines.append(f"Ray CPUs: {cpus[0]:g} asked of {_known(cpus[1])}; GPUs: {gpus[0]:g} of {gpus[1]:g}; "
                 f"host memory: {host[0]:.1f} GiB (with the driver and Ray) of {_known(host[1], ' GiB')}")  # fmt: skip
    lines += [f"note: {n}" for n in plan.notes]
    lines += [f"DOES NOT FIT: {p.key}: {p.message}" for p in plan.problems] or ["fits"]
    return "\n".join(lines)


def _known(value: float | None, unit: str = "") -> str:
    return "(not given)" if value is None else f"{value:.1f}{unit}" if unit else f"{value:g}"


def main(config_path: str, overrides: list[str], machine_options: dict, prompt_tokens: int, as_json: bool) -> int:
    """Print the plan (a table, or one JSON object); ExitCode.USAGE when it does not fit."""
    config = load_config(config_path, overrides)
    machine = described_machine(config, **machine_options)
    plan = plan_config(config, machine, prompt_tokens)
    print(json.dumps(plan_json(plan, machine)) if as_json else plan_table(plan, machine))
    return ExitCode.OK if plan.fits else ExitCode.USAGE
