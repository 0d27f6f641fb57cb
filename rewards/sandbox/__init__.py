"""Run model-written Python and say what happened, from channels the program never holds.

How it runs a program (``runner``): each slot keeps one bubblewrap sandbox with a warm
interpreter in it (``zygote``), which forks a fresh process per program in namespaces of its
own; a program so costs a few forks, not a bwrap and Python start-up. What it protects against
(each has a test in ``tests/test_sandbox.py``):

- a program choosing its own verdict: whether it started and how it ended are told by the slot
  interpreter (a pipe written before the program's first line, the exit status, the wall
  clock) and the slot's cgroup (CPU time, OOM kills); stdout and stderr only carry results and
  tell failures apart. A program that damages its own output fails, it is not masked;
- runaway programs: a wall-clock limit enforced by the slot's interpreter (it kills the
  program's namespace; the parent gives up on an interpreter that does not answer a few
  seconds later); memory, CPU time and process count for the program's whole process tree in
  the slot's cgroup (``cgroup``; the kernel's OOM killer off there, a program past its memory
  or CPU budget killed from outside, so that no program can steer the killer at the slot's own
  processes), and per process address-space, CPU-time, file-size, open-file and process-count
  rlimits;
- fork bombs and daemons: a PID namespace per program (when its init exits every process in
  it dies, and ``kill(-1, 9)`` reaches nothing outside it), one unprivileged uid per concurrent
  slot so the process limit never reaches a sibling sandbox; the uids are leased with
  ``flock`` on files under ``/tmp/raylight-sandbox-uids``, so sandboxes in different processes
  of one machine (several verifier actors, several runs) never share one;
- the host: no network (Unix sockets only, in a network namespace with no other socket in it,
  its loopback down), no
  ``/etc``, no home folders, nothing of ``/usr`` but the interpreter's own files
  (``filesystem``: a dataset installed on the machine is not there to read), everything
  read-only but a program's own size-limited ``/tmp`` and ``/dev/shm``; stdout and stderr are
  memory files capped by the file-size limit, so 1 GB of output cannot fill memory;
- the kernel's less travelled code: no capabilities, no user namespace can be made inside
  (``max_user_namespaces`` 0 in the program's own), and a seccomp filter (``seccomp``) refuses
  namespaces, io_uring, BPF, userfaultfd, perf events, ptrace, keys and mounts;
- secrets: bwrap gets a minimal environment (``--clearenv`` alone would still leak the
  launcher's environment through ``/proc/1/environ``);
- the previous program of the slot: a fresh process forked from an interpreter that never runs
  a program itself, fresh tmpfs mounts on ``/tmp`` and ``/dev/shm``, a fresh IPC namespace, a
  fresh network namespace whenever a program left a socket behind, no ptys, and a read-only
  everything else, so nothing one program writes or binds is there for the next; loops of Unix
  sockets a program leaves holding each other are collected after it, and memory still charged
  past its end sends the slot to a fresh cgroup, so it never counts against the next program;
  a slot whose program ended in ``sandbox_error`` starts again from scratch.

What it does not protect against: kernel exploits through the system calls it allows, CPU and
page-cache side channels (a program can time whether a file of the interpreter's was read
recently, a few bits a second between programs), and wrong programs that look right. Programs
of one slot are forks of one interpreter: they share its memory layout (library addresses,
heap, stack canary) and its hash seed. The caller decides correctness in the parent from
serialised results, never from the exit code (a program can ``sys.exit(0)``, override
``__eq__`` or read its own source).

Modes, and what each isolates (docs/sandbox.md#modes has the table):

- ``bwrap`` as root: all of the above;
- ``bwrap`` without root: one slot, whose programs run as this process's own uid (sharing its
  per-user kernel quotas) and without a cgroup: limits per process, their ceiling logged;
- ``rlimits`` (where bwrap cannot run; without root only with ``allow_own_uid``): a plain
  process per program under the rlimits, the seccomp filter and (as root) the slot's uid and
  cgroup; no namespaces, so no filesystem or network isolation. It warns on every run.
"""

from rewards.sandbox.processes import live_processes
from rewards.sandbox.runner import (
    CgroupMode,
    Execution,
    ExecutionStatus,
    Sandbox,
    SandboxLimits,
    SandboxMode,
    SandboxUnavailable,
    launcher_command,
)

__all__ = [
    "CgroupMode",
    "Execution",
    "ExecutionStatus",
    "Sandbox",
    "SandboxLimits",
    "SandboxMode",
    "SandboxUnavailable",
    "launcher_command",
    "live_processes",
]
