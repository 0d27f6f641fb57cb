"""The sandbox's processes seen from the host: unprivileged uids leased per slot, and the
killing and reaping of whatever a slot leaves behind."""

from __future__ import annotations

import fcntl
import logging
import os
import select
import signal
import subprocess
import time
from pathlib import Path
from typing import Callable, Literal

logger = logging.getLogger(__name__)

UID_LOCKS = Path("/tmp/raylight-sandbox-uids")
Ended = Literal["exited", "wall", "stopped"]  # by itself; at the wall-clock limit; stopped past a budget


class UidsExhausted(RuntimeError):
    """Every sandbox uid of the range is leased by a live sandbox on this machine."""


def lease_uids(count: int, base: int, span: int) -> dict[int, object]:
    """``count`` uids from ``base`` .. ``base + span`` that no other live sandbox on this machine
    holds: each is an exclusive ``flock`` on its own file, released when the holder exits."""
    UID_LOCKS.mkdir(mode=0o700, exist_ok=True)
    leases: dict[int, object] = {}
    for uid in range(base, base + span):
        if len(leases) == count:
            break
        handle = open(UID_LOCKS / str(uid), "a")  # noqa: SIM115 - held open for the lease
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            continue
        leases[uid] = handle
    if len(leases) < count:
        for handle in leases.values():
            handle.close()
        raise UidsExhausted(f"all {span} sandbox uids from {base} are in use on this machine; raise uid_count")
    return leases


def wait_exit(process: subprocess.Popen, timeout_s: float, over_budget: Callable[[], bool] | None = None, poll_s: float = 0.05) -> Ended:
    """How ``process`` ended: ``exited`` within ``timeout_s``, ``wall`` if not, ``stopped`` as
    soon as ``over_budget()`` (asked every ``poll_s`` while it runs) says so. A pidfd wakes
    up the moment it exits (``Popen.wait(timeout)`` polls with sleeps that grow to 50 ms, a
    third of a short run)."""
    deadline = time.monotonic() + timeout_s
    fd = os.pidfd_open(process.pid)
    try:
        while (remaining := deadline - time.monotonic()) > 0:
            if select.select([fd], [], [], min(remaining, poll_s) if over_budget else remaining)[0]:
                return "exited"
            if over_budget is not None and over_budget():
                return "stopped"
        return "wall"
    finally:
        os.close(fd)


def kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def live_processes(uid: int, zombies: bool = False) -> list[int]:
    """Pids of running processes owned by ``uid`` (with ``zombies``, also exited ones that
    their new parent has not reaped yet). Reads each ``status`` file: the owner of a
    ``/proc/<pid>`` folder is not enough, a non-dumpable process shows as root there."""
    pids = []
    wanted = f"\nUid:\t{uid}\t"
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/status") as handle:
                status = handle.read()
        except OSError:
            continue
        if wanted not in status:
            continue
        state = status[status.find("\nState:") + 8 :].lstrip()[:1]
        if zombies or state not in ("Z", "X"):
            pids.append(int(entry.name))
    return pids


def kill_uid(uid: int, patience_s: float = 2.0) -> None:
    """Kill whatever still runs under a slot uid (only sandboxes of this slot use it): a
    process that left the namespace's process group must not outlive its run. Its zombies are
    reaped here too (this process is their subreaper): they would count against the uid's
    process limit, and a fork bomb's leftovers would stop the next run from starting."""
    me = os.getpid()
    deadline = time.monotonic() + patience_s
    while (pids := live_processes(uid, zombies=True)) and time.monotonic() < deadline:
        waited = False
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
                if _parent(pid) == me:  # ours since its parent died: SIGKILLed, so this returns soon
                    os.waitpid(pid, 0)
                    waited = True
            except (ProcessLookupError, ChildProcessError):
                pass
        if not waited:  # still someone else's child: give its parent a moment to die
            time.sleep(0.002)
    if not pids:
        return
    if live := live_processes(uid):
        logger.error("sandbox slot uid %d still has processes %s after the run", uid, live)
    else:
        logger.warning("sandbox slot uid %d: %d exited processes not reaped after %.0fs", uid, len(pids), patience_s)


def _parent(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def become_subreaper() -> None:
    """Orphans of the sandboxes (bwrap's inner process when the outer one is killed) become
    children of this process instead of the host's init, so ``_kill_uid`` can reap them at
    once; some inits reap only every few seconds."""
    import ctypes

    PR_SET_CHILD_SUBREAPER = 36
    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        logger.warning("could not become a child subreaper: sandbox zombies wait for the host's init")
