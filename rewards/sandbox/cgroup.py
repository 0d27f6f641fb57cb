"""One control group per sandbox slot, so that a program's limits hold for its whole process
tree: memory (with what it writes to its tmpfs mounts), process count and CPU time.

cgroup v1 (the ``memory``, ``pids`` and ``cpuacct`` controllers, each mounted on its own
hierarchy): the slot's group is created inside this process's own group of each controller
(so an outer limit, a container's, still holds) as ``raylight-sandbox-<pid>-<slot>``. The
slot's sandbox, its warm interpreter and every program it forks live in it; one program runs
in a slot at a time, so the group's use while it runs is the program's.

- memory: ``memory.limit_in_bytes`` (and ``memory.memsw.limit_in_bytes`` where swap is
  accounted) is the program's limit plus what the slot's own processes use, measured once they
  are up; tmpfs pages are charged to the group that writes them. The kernel's OOM killer is off
  in the group (``memory.oom_control``): past the limit the allocating processes wait, the
  sandbox sees ``under_oom`` and kills the program's processes from outside. No process of the
  slot is ever chosen by a killer a program could steer (through its processes' sizes and
  ``oom_score_adj``), and a slot interpreter that waits for memory with the program resumes
  when the program is gone;
- processes: ``pids.max`` on the slot's group;
- CPU time: ``cpuacct.usage`` of the slot's group, which the sandbox reads while the program
  runs, stopping it past its budget (the kernel has no limit on accumulated CPU time of a
  group).

Creating groups needs root (or a delegated hierarchy); cgroup v2 is not used yet. Where no
group can be made the sandbox falls back to per-process limits and says what that allows.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)

CONTROLLERS = ("memory", "pids", "cpuacct")
PREFIX = "raylight-sandbox-"
# read at every program's start and end: kept open and re-read with pread (a twentieth of the
# cost of opening them each time)
COUNTERS = ("cpuacct.usage", "memory.oom_control", "memory.stat", "memory.failcnt", "memory.usage_in_bytes")


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
    """The cgroups of one slot (``slot`` names it): ``procs_files`` for its first process to
    join, the program's counters while it runs, ``close`` at the end."""

    def __init__(self, slot: str, memory_bytes: int, processes: int):
        groups = _own_groups()
        missing = [c for c in CONTROLLERS if c not in groups]
        if missing:
            raise CgroupUnavailable(f"no cgroup v1 hierarchy for {', '.join(missing)} is mounted")
        self.folders: dict[str, Path] = {}
        self._counters: dict[str, int] = {}
        try:
            for controller in CONTROLLERS:
                _remove_stale(groups[controller])
                self.folders[controller] = groups[controller] / f"{PREFIX}{os.getpid()}-{slot}"
                self.folders[controller].mkdir(exist_ok=True)
            self.set_memory(memory_bytes)
            (self.folders["pids"] / "pids.max").write_text(str(processes))
            self.oom_killer = not self._disable_oom_killer()
            for name in COUNTERS:
                self._counters[name] = os.open(self.folders[name.split(".")[0]] / name, os.O_RDONLY)
        except OSError as exc:
            self.close()
            raise CgroupUnavailable(f"cannot make a cgroup under {groups.get('memory')}: {exc}") from None
        self.baseline = 0

    def _disable_oom_killer(self) -> bool:
        try:
            (self.folders["memory"] / "memory.oom_control").write_text("1")
            return True
        except OSError as exc:
            logger.warning("sandbox cgroup: the OOM killer stays on (%s): a program's processes are killed past its memory limit", exc)
            return False

    def set_memory(self, limit: int) -> None:
        """The group's memory limit, swap included where the kernel accounts it (memsw may never
        be below the memory limit, hence the order)."""
        folder = self.folders["memory"]
        current = int((folder / "memory.limit_in_bytes").read_text())
        names = ["memory.limit_in_bytes", "memory.memsw.limit_in_bytes"]
        for name in names if limit <= current else reversed(names):
            if (folder / name).exists():
                (folder / name).write_text(str(limit))

    def procs_files(self) -> list[str]:
        """The ``cgroup.procs`` files a process writes its pid into to join the slot."""
        return [str(folder / "cgroup.procs") for folder in self.folders.values()]

    def _read(self, name: str) -> str:
        return os.pread(self._counters[name], 1 << 16, 0).decode()

    def cpu_seconds(self) -> float:
        """CPU time used by every process that ever ran in the slot."""
        return int(self._read("cpuacct.usage")) / 1e9

    def _oom_control(self) -> dict[str, int]:
        return {key: int(value) for key, _, value in (line.partition(" ") for line in self._read("memory.oom_control").splitlines())}

    def oom_kills(self) -> int:
        """Processes the OOM killer has stopped so far (where it could not be turned off)."""
        return self._oom_control().get("oom_kill", 0)

    def under_oom(self) -> bool:
        """Whether processes of the group wait for memory past the limit (with the killer off)."""
        return self._oom_control().get("under_oom", 0) == 1

    def limit_hits(self) -> int:
        """How often a charge to the group hit its limit (``memory.failcnt``) so far."""
        return int(self._read("memory.failcnt"))

    def resident(self) -> int:
        """What the group holds but file pages, which reclaim frees: anonymous and shared
        memory (tmpfs, System V, memfd) and the kernel's (socket buffers, pipe pages, page
        tables), all of which a program can keep charged past its end."""
        values = dict(line.split(" ", 1) for line in self._read("memory.stat").splitlines())
        return int(self._read("memory.usage_in_bytes")) - int(values.get("active_file", 0)) - int(values.get("inactive_file", 0))

    def settle(self, memory_bytes: int) -> None:
        """Once the slot's own processes are up: the limit becomes their use plus
        ``memory_bytes``, and what they hold is the baseline ``left_behind`` counts from."""
        self.set_memory(int(self._read("memory.usage_in_bytes")) + memory_bytes)
        self.baseline = self.resident()

    def left_behind(self) -> int:
        """Resident memory above the baseline (after a program: what it left behind)."""
        return self.resident() - self.baseline

    def close(self) -> None:
        """Remove the groups (their processes must be gone)."""
        for fd in self._counters.values():
            os.close(fd)
        self._counters = {}
        for folder in self.folders.values():
            try:
                folder.rmdir()
            except FileNotFoundError:
                pass
            except OSError as exc:
                logger.warning("sandbox cgroup %s not removed: %s", folder, exc)
        self.folders = {}


def join(procs_files: list[str]) -> None:
    """Move the calling process into the slot's groups (called in a child before exec; no
    logging, no allocation worth mentioning)."""
    pid = str(os.getpid())
    for path in procs_files:
        with open(path, "w") as handle:
            handle.write(pid)
