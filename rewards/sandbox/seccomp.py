"""The seccomp filter every sandboxed program runs under: the system calls a scoring program
never needs, refused before its first line runs.

Refused with ``EPERM``: new namespaces (``unshare``, ``setns``, ``clone`` with any
``CLONE_NEW*`` flag), ``io_uring_*``, keys (``keyctl``, ``add_key``, ``request_key``), ``bpf``,
``userfaultfd``, ``perf_event_open``, ``fanotify_init``, ``ptrace`` and reading or writing
another process's memory (``process_vm_*``, ``kcmp``, ``pidfd_getfd``), ``memfd_secret``,
mounting and its new API (``mount``, ``umount2``, ``pivot_root``, ``chroot``, ``fsopen`` ..
``mount_setattr``, ``open_tree_attr``), file handles (``open_by_handle_at``), kernel modules,
``kexec``, swap, ``reboot``, ``acct``, ``syslog``, ``quotactl`` (and ``quotactl_fd``),
``lookup_dcookie``, legacy AIO (``io_setup`` .. ``io_pgetevents``) and ``vhangup``; on x86-64
also ``modify_ldt``, ``iopl``, ``ioperm``, ``uselib``, ``ustat``, ``sysfs`` and ``_sysctl``.
``personality`` may only ask or set the plain Linux personality (not ``ADDR_NO_RANDOMIZE`` or
``READ_IMPLIES_EXEC``). Sockets may only be Unix ones: a program has no network to use (its
loopback is down), and an IP socket would still reach the kernel's TCP, UDP and MPTCP code and
move its network namespace's counters (``/proc/net/snmp``), which the next program could read;
netlink, packet, vsock (which no network namespace separates) and the rest answer
``EAFNOSUPPORT`` too. ``clone3`` answers
``ENOSYS``: its flags sit behind a pointer a filter cannot read, and C libraries fall back to
``clone`` on that answer (threads, ``fork``, ``posix_spawn`` all keep working). A call from
another architecture's table (32-bit ``int 0x80`` or x32 on x86-64) kills the process.

Most of these already fail for want of a capability; the filter removes the kernel code behind
them from what a program can reach at all (most recent Linux privilege escalations start in a
fresh user namespace, io_uring, BPF or userfaultfd).

Built by hand as classic BPF for x86-64 and aarch64 (stdlib only, no libseccomp): the zygote
installs the same bytes inside the sandbox, and the ``rlimits`` mode in the child before exec.
"""

from __future__ import annotations

import ctypes
import errno
import platform
import struct
import sys

# classic BPF opcodes (linux/filter.h)
BPF_LD_W_ABS = 0x20  # BPF_LD | BPF_W | BPF_ABS
BPF_JEQ_K = 0x15  # BPF_JMP | BPF_JEQ | BPF_K
BPF_JGE_K = 0x35  # BPF_JMP | BPF_JGE | BPF_K
BPF_JSET_K = 0x45  # BPF_JMP | BPF_JSET | BPF_K
BPF_RET_K = 0x06  # BPF_RET | BPF_K

SECCOMP_RET_KILL_PROCESS = 0x80000000
SECCOMP_RET_ERRNO = 0x00050000
SECCOMP_RET_ALLOW = 0x7FFF0000

# struct seccomp_data: int nr; __u32 arch; __u64 instruction_pointer; __u64 args[6]
NR_OFFSET, ARCH_OFFSET = 0, 4
ARG0_LOW_OFFSET = 16 if sys.byteorder == "little" else 20  # the low 32 bits of args[0]

# CLONE_NEWNS | CLONE_NEWCGROUP | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWUSER | CLONE_NEWPID | CLONE_NEWNET
CLONE_NAMESPACES = 0x00020000 | 0x02000000 | 0x04000000 | 0x08000000 | 0x10000000 | 0x20000000 | 0x40000000
X32_SYSCALL_BIT = 0x40000000

_COMMON = (
    "unshare", "setns", "io_uring_setup", "io_uring_enter", "io_uring_register", "keyctl", "add_key",
    "request_key", "bpf", "userfaultfd", "perf_event_open", "ptrace", "process_vm_readv", "process_vm_writev",
    "kcmp", "pidfd_getfd", "mount", "umount2", "pivot_root", "chroot", "fsopen", "fsconfig", "fsmount", "fspick",
    "move_mount", "open_tree", "mount_setattr", "open_by_handle_at", "init_module", "finit_module",
    "delete_module", "kexec_load", "kexec_file_load", "swapon", "swapoff", "reboot", "acct", "syslog",
    "quotactl", "vhangup", "memfd_secret", "open_tree_attr", "quotactl_fd", "fanotify_init", "lookup_dcookie",
    "io_setup", "io_destroy", "io_getevents", "io_submit", "io_cancel", "io_pgetevents",
)  # fmt: skip

# (audit architecture, system call numbers by name) from the kernel's tables
# (asm/unistd_64.h for x86-64, asm-generic/unistd.h for aarch64)
ARCHITECTURES: dict[str, tuple[int, dict[str, int]]] = {
    "x86_64": (0xC000003E, {
        "unshare": 272, "setns": 308, "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427,
        "keyctl": 250, "add_key": 248, "request_key": 249, "bpf": 321, "userfaultfd": 323, "perf_event_open": 298,
        "ptrace": 101, "process_vm_readv": 310, "process_vm_writev": 311, "kcmp": 312, "pidfd_getfd": 438,
        "mount": 165, "umount2": 166, "pivot_root": 155, "chroot": 161, "fsopen": 430, "fsconfig": 431,
        "fsmount": 432, "fspick": 433, "move_mount": 429, "open_tree": 428, "mount_setattr": 442,
        "open_by_handle_at": 304, "init_module": 175, "finit_module": 313, "delete_module": 176,
        "kexec_load": 246, "kexec_file_load": 320, "swapon": 167, "swapoff": 168, "reboot": 169, "acct": 163,
        "syslog": 103, "quotactl": 179, "vhangup": 153, "memfd_secret": 447, "open_tree_attr": 467,
        "quotactl_fd": 443, "fanotify_init": 300, "lookup_dcookie": 212, "io_setup": 206, "io_destroy": 207,
        "io_getevents": 208, "io_submit": 209, "io_cancel": 210, "io_pgetevents": 333,
        "modify_ldt": 154, "iopl": 172, "ioperm": 173, "uselib": 134, "ustat": 136, "sysfs": 139, "_sysctl": 156,
        "clone": 56, "clone3": 435, "socket": 41, "socketpair": 53, "personality": 135,
    }),
    "aarch64": (0xC00000B7, {
        "unshare": 97, "setns": 268, "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427,
        "keyctl": 219, "add_key": 217, "request_key": 218, "bpf": 280, "userfaultfd": 282, "perf_event_open": 241,
        "ptrace": 117, "process_vm_readv": 270, "process_vm_writev": 271, "kcmp": 272, "pidfd_getfd": 438,
        "mount": 40, "umount2": 39, "pivot_root": 41, "chroot": 51, "fsopen": 430, "fsconfig": 431,
        "fsmount": 432, "fspick": 433, "move_mount": 429, "open_tree": 428, "mount_setattr": 442,
        "open_by_handle_at": 265, "init_module": 105, "finit_module": 273, "delete_module": 106,
        "kexec_load": 104, "kexec_file_load": 294, "swapon": 224, "swapoff": 225, "reboot": 142, "acct": 89,
        "syslog": 116, "quotactl": 60, "vhangup": 58, "memfd_secret": 447, "open_tree_attr": 467,
        "quotactl_fd": 443, "fanotify_init": 262, "lookup_dcookie": 18, "io_setup": 0, "io_destroy": 1,
        "io_getevents": 4, "io_submit": 2, "io_cancel": 3, "io_pgetevents": 292,
        "clone": 220, "clone3": 435, "socket": 198, "socketpair": 199, "personality": 92,
    }),
}  # fmt: skip
_X86_ONLY = ("modify_ldt", "iopl", "ioperm", "uselib", "ustat", "sysfs", "_sysctl")
AF_UNIX = 1
# calls allowed only for some values of their first argument: (allowed values, errno otherwise)
FIRST_ARGUMENT = {
    "socket": ((AF_UNIX,), errno.EAFNOSUPPORT),
    "socketpair": ((AF_UNIX,), errno.EAFNOSUPPORT),
    # PER_LINUX, PER_LINUX32, UNAME26 and both, and 0xffffffff: the query
    "personality": ((0x0, 0x8, 0x20000, 0x20008, 0xFFFFFFFF), errno.EPERM),
}


def denied(machine: str) -> dict[str, int]:
    """The refused calls of ``machine`` (``platform.machine()``), by name: number."""
    table = ARCHITECTURES[machine][1]
    return {name: table[name] for name in (*_COMMON, *_X86_ONLY) if name in table}


def _instruction(code: int, k: int, jt: int = 0, jf: int = 0) -> bytes:
    return struct.pack("=HBBI", code, jt, jf, k)


def build_filter(machine: str | None = None) -> bytes:
    """The filter program as ``struct sock_filter`` bytes for ``machine`` (this one's by
    default); raises ValueError on an architecture without a table here."""
    machine = machine or platform.machine()
    if machine not in ARCHITECTURES:
        raise ValueError(f"no seccomp table for {machine!r} (known: {sorted(ARCHITECTURES)})")
    arch, table = ARCHITECTURES[machine]
    # (opcode, k, label if true, label if false), or a label's own name; jumps go to labels
    body: list = [(BPF_LD_W_ABS, ARCH_OFFSET, None, None), (BPF_JEQ_K, arch, None, "kill")]
    body.append((BPF_LD_W_ABS, NR_OFFSET, None, None))
    if machine == "x86_64":
        body.append((BPF_JGE_K, X32_SYSCALL_BIT, "kill", None))
    body += [(BPF_JEQ_K, number, f"errno:{errno.EPERM}", None) for number in denied(machine).values()]
    body.append((BPF_JEQ_K, table["clone3"], f"errno:{errno.ENOSYS}", None))
    for name in ("clone", *FIRST_ARGUMENT):
        body.append((BPF_JEQ_K, table[name], f"check:{name}", None))
    body.append((BPF_RET_K, SECCOMP_RET_ALLOW, None, None))
    body += ["check:clone", (BPF_LD_W_ABS, ARG0_LOW_OFFSET, None, None), (BPF_JSET_K, CLONE_NAMESPACES, f"errno:{errno.EPERM}", "allow")]
    for name, (allowed, code) in FIRST_ARGUMENT.items():
        body += [f"check:{name}", (BPF_LD_W_ABS, ARG0_LOW_OFFSET, None, None)]
        body += [(BPF_JEQ_K, value, "allow", None) for value in allowed]
        body.append((BPF_RET_K, SECCOMP_RET_ERRNO | code, None, None))
    codes = sorted({int(op.split(":")[1]) for op in _labels_used(body) if op.startswith("errno:")})
    body += ["allow", (BPF_RET_K, SECCOMP_RET_ALLOW, None, None), "kill", (BPF_RET_K, SECCOMP_RET_KILL_PROCESS, None, None)]
    for code in codes:
        body += [f"errno:{code}", (BPF_RET_K, SECCOMP_RET_ERRNO | code, None, None)]
    return _assemble(body)


def _labels_used(body: list) -> set[str]:
    return {label for op in body if isinstance(op, tuple) for label in op[2:] if label}


def _assemble(body: list) -> bytes:
    """Instructions with their jump labels resolved to BPF's relative offsets (forward only,
    each under 256)."""
    where: dict[str, int] = {}
    instructions = []
    for op in body:
        if isinstance(op, str):
            where[op] = len(instructions)
        else:
            instructions.append(op)
    program = b""
    for i, (code, k, on_true, on_false) in enumerate(instructions):
        offset = lambda label: 0 if label is None else where[label] - i - 1  # noqa: E731
        jt, jf = offset(on_true), offset(on_false)
        if not (0 <= jt < 256 and 0 <= jf < 256):
            raise ValueError(f"seccomp jump out of range at instruction {i}")
        program += _instruction(code, k, jt, jf)
    return program


PR_SET_NO_NEW_PRIVS = 38
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2


class _Program(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def install(program: bytes) -> None:
    """Load ``program`` into this process (and every process it starts); for good.

    The zygote carries its own copy of these lines: it may import nothing of the project."""
    libc = ctypes.CDLL(None, use_errno=True)
    buffer = ctypes.create_string_buffer(program, len(program))
    fprog = _Program(len(program) // 8, ctypes.cast(buffer, ctypes.c_void_p))
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 or libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"installing the seccomp filter: {errno.errorcode.get(code, code)}")
