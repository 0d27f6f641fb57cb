"""Peak memory of every process of a run, by role: ``perf/peak_rss_gib/<role>`` each step.

Each actor answers for its own process (``contracts.footprint.peak_rss_gib``: the kernel's
peak resident set size), so the figures hold on any number of nodes; the driver adds its own
and Ray's processes on its node (raylet, GCS, dashboard, log monitor, idle workers). A role's
figure is the sum of its processes' peaks, an upper bound of what they held at one moment.
An actor busy with a long call is never waited for: the probe asks at the start of every
step and reads the answers that have arrived at its end, so a busy generator's figure may be
one step old.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Iterator

import psutil
import ray

from contracts.footprint import peak_rss_gib

logger = logging.getLogger(__name__)

# the processes Ray runs on a node besides the actors (their command lines name these)
RAY_PROCESSES = ("raylet", "gcs_server", "ray/dashboard", "ray-dashboard", "ray.dashboard", "log_monitor.py", "_private/monitor.py", "ray_client_server")
# Ray's own workers, titled like actors
RAY_WORKERS = ("ray::IDLE", "ray::DashboardAgent", "ray::RuntimeEnvAgent")


def is_ray_process(cmdline: str) -> bool:
    """Whether a command line is one of Ray's own processes (not an actor's worker)."""
    if cmdline.startswith("ray::"):
        return cmdline.startswith(RAY_WORKERS)
    return any(name in cmdline for name in RAY_PROCESSES)


def vm_hwm_gib(pid: int) -> float:
    """A process's peak resident set size (Linux /proc ``VmHWM``), GiB; 0 if it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    except (OSError, ValueError):
        pass
    return 0.0


def _node_processes() -> Iterator[tuple[psutil.Process, str]]:
    """Every process on this node with its command line."""
    for process in psutil.process_iter(["cmdline"]):
        yield process, " ".join(process.info["cmdline"] or ())


def ray_processes_gib() -> float:
    """The summed peaks of Ray's own processes on this node (not the actors: their workers'
    command lines name their class)."""
    return sum(vm_hwm_gib(p.pid) for p, cmdline in _node_processes() if p.pid != os.getpid() and is_ray_process(cmdline))


class MemoryProbe:
    """Asks the actors of each role for their peak memory and keeps the latest answers."""

    def __init__(self):
        self.pending: dict[ray.ObjectRef, tuple[str, str]] = {}  # ask -> (role, actor id)
        self.peaks: dict[tuple[str, str], float] = {}
        self.current: set[tuple[str, str]] = set()

    def ask(self, actors: dict[str, list]) -> None:
        """Ask every actor of every role that has no question outstanding."""
        asked = set(self.pending.values())
        self.current = set()
        for role, handles in actors.items():
            for handle in handles:
                key = (role, handle._actor_id.hex())
                self.current.add(key)
                if key not in asked:
                    self.pending[handle.peak_rss_gib.remote()] = key

    def collect(self, timeout: float = 0.0) -> None:
        """Read the answers that arrived within ``timeout`` seconds; a dead actor's is dropped."""
        if not self.pending:
            return
        ready, _ = ray.wait(list(self.pending), num_returns=len(self.pending), timeout=timeout)
        for ref in ready:
            key = self.pending.pop(ref)
            try:
                self.peaks[key] = ray.get(ref)
            except Exception as error:  # a replaced or lost actor: the pools report that themselves
                logger.debug("no memory figure from %s: %s", key, error)

    def metrics(self) -> dict[str, float]:
        """``perf/peak_rss_gib/<role>`` for the driver, Ray's processes and each actor role,
        and their sum ``perf/peak_rss_gib/all``."""
        by_role = {"driver": peak_rss_gib(), "ray": ray_processes_gib()}
        for (role, actor), gib in self.peaks.items():
            if (role, actor) in self.current:
                by_role[role] = by_role.get(role, 0.0) + gib
        by_role["all"] = sum(by_role.values())
        return {f"perf/peak_rss_gib/{role}": gib for role, gib in by_role.items()}


def run_processes() -> list[psutil.Process]:
    """This node's processes of a run driven from this process: the driver, its actors and
    Ray's own processes."""
    return [p for p, cmdline in _node_processes() if p.pid == os.getpid() or cmdline.startswith("ray::") or is_ray_process(cmdline)]


class PssSampler:
    """The largest total proportional set size (shared pages split among the processes that
    map them, so a library or the object store counts once) of the run's processes on this
    node, sampled every ``interval_s`` on a thread: what the run took from the machine at
    one moment. For benchmarks: reading every process's page map costs a little CPU."""

    def __init__(self, interval_s: float = 2.0):
        import threading

        self.interval_s = interval_s
        self.peak_gib = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pss-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            total = 0
            for process in run_processes():
                try:
                    total += process.memory_full_info().pss
                except (psutil.Error, OSError):
                    pass
            self.peak_gib = max(self.peak_gib, total / 2**30)
            self._stop.wait(self.interval_s)

    def __enter__(self) -> "PssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
