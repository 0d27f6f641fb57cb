"""One control group per sandbox slot, so that a program's limits hold for its whole process
tree: memory (with what it writes to its tmpfs mounts), process count and CPU time.

cgroup v1 (the ``memory``, ``pids`` and ``cpuacct`` controllers, each mounted on its own
hierarchy): the slot's group is created inside this process's own group of each controller
(so an outer limit, a container's, still holds) as ``raylight-sandbox-<pid>-<slot uid>``. The
slot's sandbox, its warm interpreter and every program it forks live in it; one program runs
in a slot at a time, so the group's usage while it runs is the program's plus the
interpreter's few MiB, which are measured once and added to the limit.

- memory: ``memory.limit_in_bytes`` (and ``memory.memsw.limit_in_bytes`` where swap is
  accounted); tmpfs pages are charged to the group that writes them. Past the limit the
  kernel's OOM killer stops the largest process in the group (programs run with
  ``oom_score_adj`` 1000, so theirs go first) and ``memory.oom_control`` counts it;
- processes: ``pids.max``;
- CPU time: ``cpuacct.usage``, which the sandbox reads while the program runs, stopping it
  past its budget (the kernel has no limit on accumulated CPU time of a group).

Creating groups needs root (or a delegated hierarchy); cgroup v2 is not used yet. Where no
group can be made the sandbox falls back to per-process limits and says what that allows.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)

CONTROLLERS = ("memory", "pids", "cpuacct")
COUNTERS = (("cpuacct", "cpuacct.usage"), ("memory", "memory.oom_control"))
PREFIX = "raylight-sandbox-"


class CgroupUnavailable(RuntimeError):
    """No cgroup can be made here; the message says why."""


def _own_groups() -> dict[str, Path]:
    """This process's group folder for each v1 controller mounted here."""
    mounts: dict[str, tuple[str, str]] = {}  # controller -> (root inside the hierarchy, mount point)
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        separator = fields.index("-")
        if fields[separator + 1] != "cgroup":
            continue
        options = set(fields[separator + 3].split(","))
        for controller in options & set(CONTROLLERS):
            mounts[controller] = (fields[3], fields[4])
    groups = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, names, path = line.split(":", 2)
        for controller in set(names.split(",")) & mounts.keys():
            root, point = mounts[controller]
            if path == root or path.startswith(root.rstrip("/") + "/"):  # else: not reachable from this mount
                relative = os.path.relpath(path, root)
                groups[controller] = Path(point) if relative == "." else Path(point) / relative
    return groups


def _remove_stale(parent: Path) -> None:
    """Groups left by sandboxes of processes that died without closing them (empty ones only)."""
    for folder in parent.glob(f"{PREFIX}*"):
        owner = folder.name[len(PREFIX) :].split("-")[0]
        if owner.isdigit() and not Path(f"/proc/{owner}").exists():
            try:
                folder.rmdir()
            except OSError:
                pass


class SlotCgroup:
    """The cgroups of one slot: ``join`` (from the slot's first process, before it drops root),
    ``cpu_seconds`` and ``oom_kills`` while it runs, ``close`` at the end."""

    def __init__(self, slot: str, memory_bytes: int, processes: int):
        groups = _own_groups()
        missing = [c for c in CONTROLLERS if c not in groups]
        if missing:
            raise CgroupUnavailable(f"no cgroup v1 hierarchy for {', '.join(missing)} is mounted")
        self.folders: dict[str, Path] = {}
        try:
            for controller in CONTROLLERS:
                _remove_stale(groups[controller])
                folder = groups[controller] / f"{PREFIX}{os.getpid()}-{slot}"
                folder.mkdir(exist_ok=True)
                self.folders[controller] = folder
            self.set_memory(memory_bytes)
            self._write("pids", "pids.max", processes)
        except OSError as exc:
            self.close()
            raise CgroupUnavailable(f"cannot make a cgroup under {groups.get('memory')}: {exc}") from None
        # read at every program's start and end: kept open, re-read with pread (a twentieth of
        # the cost of opening them each time)
        self._counters = {name: os.open(self.folders[controller] / name, os.O_RDONLY) for controller, name in COUNTERS}

    def _write(self, controller: str, name: str, value: int) -> None:
        (self.folders[controller] / name).write_text(str(value))

    def _read(self, controller: str, name: str) -> str:
        return (self.folders[controller] / name).read_text()

    def set_memory(self, limit: int) -> None:
        """The group's memory limit, swap included where the kernel accounts it (memsw may never
        be below the memory limit, hence the order)."""
        memsw = self.folders["memory"] / "memory.memsw.limit_in_bytes"
        current = int(self._read("memory", "memory.limit_in_bytes"))
        order = ["memory.limit_in_bytes", "memory.memsw.limit_in_bytes"]
        for name in order if limit <= current else reversed(order):
            if name == order[1] and not memsw.exists():
                continue
            self._write("memory", name, limit)

    def memory_usage(self) -> int:
        return int(self._read("memory", "memory.usage_in_bytes"))

    def procs_files(self) -> list[str]:
        """The ``cgroup.procs`` files a process writes its pid into to join the slot."""
        return [str(folder / "cgroup.procs") for folder in self.folders.values()]

    def cpu_seconds(self) -> float:
        """CPU time used by every process that ever ran in the group."""
        return int(os.pread(self._counters["cpuacct.usage"], 64, 0)) / 1e9

    def oom_kills(self) -> int:
        """Processes of the group the OOM killer has stopped so far."""
        for line in os.pread(self._counters["memory.oom_control"], 4096, 0).decode().splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        return 0

    def close(self) -> None:
        """Remove the groups (their processes must be gone)."""
        for fd in getattr(self, "_counters", {}).values():
            os.close(fd)
        self._counters = {}
        for controller, folder in self.folders.items():
            try:
                folder.rmdir()
            except FileNotFoundError:
                pass
            except OSError as exc:
                logger.warning("sandbox cgroup %s (%s) not removed: %s", folder, controller, exc)
        self.folders = {}


def join(procs_files: list[str]) -> None:
    """Move the calling process into the slot's groups (called in a child before exec; no
    logging, no allocation worth mentioning)."""
    pid = str(os.getpid())
    for path in procs_files:
        with open(path, "w") as handle:
            handle.write(pid)
