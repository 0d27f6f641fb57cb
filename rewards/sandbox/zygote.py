"""The warm interpreter of one sandbox slot: it runs inside the slot's long-lived bubblewrap
sandbox and forks a fresh process for every sample, so a sample costs a few forks instead of a
bwrap start and a Python start-up.

``rewards.sandbox.runner`` starts it as ``python -I -S -c <this file's text> FD LIMITS...
SECCOMP`` and sends each request over the control socket ``FD``: one byte and three
descriptors (the program's source, its stdout, its stderr, all opened outside the sandbox).
The answer (``ANSWER``) is the exit code (negative: killed by that signal), whether the
wall-clock limit stopped the program and whether it started. (A program past its CPU or memory
budget is killed by the sandbox from outside; this interpreter just sees it end.)

Whether it started is told out of band: the program's process writes one byte into a pipe
that only this interpreter reads, after its namespaces, limits and filter are in place and
just before the program's first line, and closes its end; nothing the program does to its
output can change that answer, and a program that breaks its own output is the program's
``error``.

Each sample gets, per request:
- a fresh process, forked from this interpreter, which never runs sample code itself; no memory
  of a previous sample can be inherited;
- its own user, PID, mount and IPC namespaces, made by ``holder`` below: the sample is PID 2
  under an init of its own (PID 1), so ``kill(-1)``, a fork bomb or a daemon reaches nothing
  outside, and all of them die with that init when the sample's own process exits; no user
  namespace can be made inside it (``max_user_namespaces`` is 0 in its own);
- a fresh, size-limited tmpfs on ``/tmp`` (its working directory) and on ``/dev/shm``, a fresh
  IPC namespace (System V and POSIX queues), and a network namespace with no socket in it (its
  loopback down): this interpreter's own, replaced by a fresh one whenever a program leaves a
  socket behind (``sockets_left``), so no socket, abstract Unix name or TCP state of one program
  is seen by the next; everything else is read-only (the slot's root, ``/dev``, the
  interpreter's files): nothing it writes is there for the next one;
- no capabilities, its rlimits (CPU time, address space, file size, open files, processes), a
  new session and the seccomp filter of ``rewards.sandbox.seccomp``.

Stdlib only, and it imports little: the sample inherits these modules already loaded.
"""

import atexit  # noqa: F401 - imported here so that a program's exit finds it loaded
import ctypes
import os
import resource
import select
import signal
import socket
import struct
import sys

CLONE_NEWNS = 0x00020000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
MS_NOSUID, MS_NODEV, MS_NOEXEC = 0x2, 0x4, 0x8
MS_REC, MS_PRIVATE = 0x4000, 0x40000
PR_CAPBSET_DROP = 24
PR_SET_CHILD_SUBREAPER = 36
PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 47, 4
PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 38, 22, 2
CAPABILITY_VERSION_3 = 0x20080522
LAST_CAPABILITY = 63  # drop from the bounding set up to this; the kernel answers EINVAL past its own last
ANSWER = "<iBB"  # exit code (negative: signal), stopped at the wall-clock limit (0/1), started (0/1)

libc = ctypes.CDLL(None, use_errno=True)


def check(result: int, what: str) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")


def mount(source: str, target: str, fstype: str | None, flags: int, data: str | None) -> None:
    encode = lambda value: None if value is None else value.encode()  # noqa: E731
    check(libc.mount(encode(source), encode(target), encode(fstype), flags, encode(data)), f"mount {target}")


class _FilterProgram(ctypes.Structure):  # struct sock_fprog
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def seccomp_program(program: bytes) -> tuple:
    """``program`` as the ``struct sock_fprog`` the kernel takes, with the buffer it points to
    (built once: every sample inherits it)."""
    buffer = ctypes.create_string_buffer(program, len(program))
    return _FilterProgram(len(program) // 8, ctypes.cast(buffer, ctypes.c_void_p)), buffer


def install_seccomp(fprog: _FilterProgram) -> None:
    """``rewards.sandbox.seccomp.install``, for good, in this process and its children."""
    check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no new privileges")
    check(libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0), "install the seccomp filter")


def serve(control: socket.socket, limits: dict[str, int]) -> None:
    """Answer requests until the control socket closes. Returns only in a sample's process,
    with its descriptors in place, for the top level to run its source."""
    check(libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0), "become a subreaper")
    enter_user_namespace(CLONE_NEWNET)
    control.sendall(b"R")  # up
    while True:
        message, fds, _, _ = socket.recv_fds(control, 1, 3)
        if not message:
            os._exit(0)  # the sandbox's owner closed the socket, or died
        started, started_end = os.pipe()
        holder = os.fork()
        if holder == 0:
            control.close()
            os.close(started)
            os.setpgid(0, 0)
            hold(fds, started_end, limits)
            return
        os.setpgid(holder, holder)  # here too, so a kill at once finds the group
        os.close(started_end)
        for fd in fds:
            os.close(fd)
        code, wall_clock = wait(holder, control, limits["wall_s"])
        control.sendall(struct.pack(ANSWER, code, wall_clock, read_started(started)))
        collect_socket_loops()
        if sockets_left():
            check(libc.unshare(CLONE_NEWNET), "a fresh network namespace")


def collect_socket_loops() -> None:
    """Closing a Unix socket has the kernel collect Unix sockets that only hold each other's
    descriptors, none held by a process: a program can leave such a loop behind, holding
    memory charged to the slot (queued data, pages spliced into pipes) and counting against
    its uid's descriptors in flight, which the next program could measure."""
    for end in socket.socketpair():
        end.close()


def enter_user_namespace(others: int) -> None:
    """A user namespace of its own mapping only this process's uid and gid (full capabilities
    in it, none outside), and ``others`` namespaces owned by it."""
    uid, gid = os.getuid(), os.getgid()
    check(libc.unshare(CLONE_NEWUSER | others), "unshare")
    for name, text in (("uid_map", f"{uid} {uid} 1"), ("setgroups", "deny"), ("gid_map", f"{gid} {gid} 1")):
        with open(f"/proc/self/{name}", "w") as handle:
            handle.write(text)


def sockets_left() -> bool:
    """Whether a socket of any kind is open in this network namespace, now that the last program
    is gone: one kept alive past its program (in a cycle of Unix sockets holding each other's
    descriptors), which the next program must not reach, see or count. The programs share this
    interpreter's namespace (its loopback down, owned by its user namespace, so they can change
    nothing in it) until one leaves a socket behind; then it takes a fresh one, which costs far
    less than one per program."""
    with open("/proc/self/net/protocols") as handle:
        return any(line.split()[2] != "0" for line in handle.readlines()[1:])


def wait(holder: int, control: socket.socket, wall_s: float) -> tuple[int, bool]:
    """The holder's exit code and whether the wall clock stopped it, once nothing of the
    request is left. When the wall-clock limit strikes or the owner goes away, the holder's
    process group is killed: the holder and the namespace's init, whose death takes every
    process of the namespace with it. The group is killed too once the holder has exited for
    any reason (killed from outside, say): init must not outlive it. This process is a
    subreaper, so the orphaned init is reaped here, and reaped only once its namespace is
    empty."""
    pidfd = os.pidfd_open(holder)
    try:
        ready, _, _ = select.select([pidfd, control], [], [], wall_s)
    finally:
        os.close(pidfd)
    wall_clock, owner_gone = not ready, control in ready
    if wall_clock or owner_gone:
        kill_group(holder)
    _, status = os.waitpid(holder, 0)
    kill_group(holder)  # init, if the holder went first
    while True:
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            break
    if owner_gone:
        os._exit(0)
    return os.waitstatus_to_exitcode(status), wall_clock


def kill_group(leader: int) -> None:
    try:
        os.killpg(leader, signal.SIGKILL)
    except ProcessLookupError:
        pass


def read_started(started: int) -> int:
    """1 if the program's process reported that it reached the program (every writer is gone by
    now, so this does not block), else 0."""
    try:
        return int(os.read(started, 1) == b"S")
    finally:
        os.close(started)


def hold(fds: list[int], started: int, limits: dict[str, int]) -> None:
    """The sample's namespaces, entered by this process: a user namespace (where it may make
    the others) mapping only its own uid and gid, then PID, mount and IPC namespaces; its first
    child is the namespace's init, which does the mounts and forks the sample. Exits
    with the sample's code. Where the slot's cgroup could not turn the OOM killer off, the
    program's processes are its first choice."""
    os.dup2(fds[2], 2)  # this setup's own errors go to the request's stderr
    with open("/proc/self/oom_score_adj", "w") as handle:
        handle.write("1000")
    enter_user_namespace(CLONE_NEWPID | CLONE_NEWNS | CLONE_NEWIPC)
    init = os.fork()
    if init == 0:
        init_namespace(fds, started, limits)
        return
    os.close(started)
    os._exit(exit_code(os.waitpid(init, 0)[1]))


def init_namespace(fds: list[int], started: int, limits: dict[str, int]) -> None:
    """PID 1 of the sample's namespace: fresh mounts, no user namespaces below this one, then
    the sample as PID 2; reaps orphans until the sample exits, then exits with its code (the
    kernel kills whatever is left)."""
    mount("none", "/", None, MS_REC | MS_PRIVATE, None)
    scratch = f"size={limits['tmpfs_mb']}m,mode=1777"
    mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, scratch)
    if os.path.isdir("/dev/shm"):
        mount("tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, scratch)
    mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None)
    with open("/proc/sys/user/max_user_namespaces", "w") as handle:
        handle.write("0")  # this namespace's own limit: the sample can make no user namespace
    sample = os.fork()
    if sample == 0:
        become_sample(fds, started, limits)
        return
    os.close(started)
    while True:
        pid, status = os.waitpid(-1, 0)
        if pid == sample:
            os._exit(exit_code(status))


def exit_code(status: int) -> int:
    """An exit status to pass up as this process's own: a death by signal N as 128 + N, as
    bwrap reports it."""
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code


def become_sample(fds: list[int], started: int, limits: dict[str, int]) -> None:
    """Descriptors 0-2 are the request's files and nothing else is open; no capabilities (none
    in the bounding set either); the rlimits; a new session in the fresh ``/tmp``; the seccomp
    filter; then it reports that the program starts, and closes that pipe."""
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
    os.closerange(3, started)
    os.closerange(started + 1, 1 << 16)
    check(libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0), "clear ambient capabilities")
    for capability in range(LAST_CAPABILITY + 1):
        if libc.prctl(PR_CAPBSET_DROP, capability, 0, 0, 0) != 0:
            break
    header = (ctypes.c_uint32 * 2)(CAPABILITY_VERSION_3, 0)
    check(libc.capset(header, (ctypes.c_uint32 * 6)()), "drop capabilities")
    cpu = limits["cpu_s"]  # SIGXCPU at the soft limit, SIGKILL a second later
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    for name, key in (
        (resource.RLIMIT_AS, "memory_bytes"),
        (resource.RLIMIT_FSIZE, "output_bytes"),
        (resource.RLIMIT_NOFILE, "open_files"),
        (resource.RLIMIT_NPROC, "processes"),
    ):
        resource.setrlimit(name, (limits[key], limits[key]))
    os.setsid()
    os.chdir("/tmp")
    sys.argv = ["-c"]
    install_seccomp(limits["seccomp"][0])
    os.write(started, b"S")
    os.close(started)


def run_program() -> None:
    """The program as ``python -c`` would run it, ending as the interpreter does (threads
    joined, ``atexit`` handlers run, the program's globals cleared so their ``__del__`` runs,
    streams flushed, the exit status of ``SystemExit`` or 1 after a traceback) but without
    tearing down every module, which is half the cost of a short program and which a program
    could only notice through a module's own finaliser."""
    code = 0
    namespace = {"__name__": "__main__"}
    try:
        exec(compile(sys.stdin.read(), "<sample>", "exec"), namespace)
    except SystemExit as exc:
        code = exit_status(exc)
    except BaseException as exc:  # noqa: BLE001 - the program's own error: its traceback, status 1
        exc = exc.with_traceback(exc.__traceback__.tb_next)  # from the program's frame down
        sys.excepthook(type(exc), exc, exc.__traceback__)
        code = 1
    finishing = (getattr(sys.modules.get("threading"), "_shutdown", None), sys.modules["atexit"]._run_exitfuncs, namespace.clear)
    for finish in finishing:  # namespace.clear: the __del__ of the program's globals
        try:
            if finish is not None:
                finish()
        except SystemExit as exc:
            code = exit_status(exc)
        except BaseException:  # noqa: BLE001 - reported as the interpreter reports it
            sys.excepthook(*sys.exc_info())
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:  # noqa: BLE001 - a full disk or a closed stream: as at exit, status 120
            code = code or 120
    os._exit(code)


def exit_status(exc: SystemExit) -> int:
    if exc.code is None:
        return 0
    if isinstance(exc.code, int):
        return exc.code & 0xFF
    print(exc.code, file=sys.stderr)
    return 1


if __name__ == "__main__":
    _control = socket.socket(fileno=int(sys.argv[1]))
    _limits = dict(zip(("wall_s", "cpu_s", "memory_bytes", "output_bytes", "tmpfs_mb", "open_files", "processes"), map(float, sys.argv[2:9])))
    _limits = {key: value if key == "wall_s" else int(value) for key, value in _limits.items()}
    _limits["seccomp"] = seccomp_program(bytes.fromhex(sys.argv[9]))
    serve(_control, _limits)
    del _control, _limits
    run_program()
