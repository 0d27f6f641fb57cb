"""Tool hosts: Ray actors that run an episode's tool calls in the sandbox the code rewards use.

``ToolPool.run(source)`` has the sandbox's own ``run`` signature, so an environment calls it
as it would call a ``Sandbox``; many environment steps call it at once, from the episode
runner's threads, and each call takes a free sandbox slot (``verifier.sandbox.slots`` per
host; it waits for one while all are busy). The limits are the config's ``verifier.sandbox``,
exactly as for code rewards.

A host that dies, or does not answer within ``timeout_s`` (well past the sandbox's own
wall-clock limit, which turns a slow program into a ``timeout`` result: the config refuses a
``env.tool_timeout_s`` that could cut a program's own time-out short), is replaced and the call
retried once (on the next free host: the replacement or another); a second failure comes back
as ``sandbox_error``, and the environment masks that episode: it is never the program's fault.
"""

from __future__ import annotations

import logging
import queue
import threading

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from contracts.footprint import peak_rss_gib
from rewards.sandbox import Execution
from rewards.scoring import SandboxSettings

logger = logging.getLogger(__name__)


class ToolHost:
    """One sandbox in its own process; ``ray.remote(ToolHost)`` is the actor."""

    def __init__(self, settings: SandboxSettings):
        self.sandbox = settings.open()

    def ready(self) -> bool:
        return True

    def peak_rss_gib(self) -> float:
        """This actor's peak memory plus its largest sandbox process's, GiB."""
        return peak_rss_gib(children=True)

    def run(self, source: str) -> Execution:
        return self.sandbox.run(source)


class ToolPool:
    """``size`` tool hosts behind one thread-safe ``run``; ``stats`` counts restarts."""

    def __init__(self, settings: SandboxSettings, size: int = 1, timeout_s: float = 60.0, num_cpus: float = 0.1, startup_s: float = 60.0):
        if size < 1:
            raise ValueError(f"a tool pool needs at least one host, not {size}")
        self.settings, self.timeout_s, self.startup_s = settings, timeout_s, startup_s
        self._fresh: set[int] = set()  # hosts replaced and not yet answered (still opening their sandbox)
        # a host runs as many calls at once as its sandbox has slots
        self._actor_class = ray.remote(num_cpus=num_cpus, max_restarts=0, max_concurrency=settings.slots)(ToolHost)
        self.hosts = [self._actor_class.remote(settings) for _ in range(size)]
        self._free: queue.Queue[int] = queue.Queue()
        self._lock = threading.Lock()
        self.stats = {"tools/host_restarts": 0.0, "tools/retries": 0.0}
        try:
            ray.get([host.ready.remote() for host in self.hosts], timeout=startup_s)
        except (GetTimeoutError, RayActorError) as exc:
            self.kill()
            raise RuntimeError(f"the tool hosts could not open the sandbox: {str(exc).strip().splitlines()[-1]}") from exc
        for _ in range(settings.slots):
            for i in range(size):
                self._free.put(i)

    def run(self, source: str) -> Execution:
        """Run ``source`` in a free host's sandbox; hosts lost or hung twice in a row on it are
        a ``sandbox_error`` (the first time, the call is retried on the next free host)."""
        execution = self._run_once(source)
        if execution.status == "sandbox_error":
            self.stats["tools/retries"] += 1
            execution = self._run_once(source)
        return execution

    def _run_once(self, source: str) -> Execution:
        index = self._free.get()
        try:
            with self._lock:
                host, fresh = self.hosts[index], index in self._fresh
            deadline = self.timeout_s + (self.startup_s if fresh else 0.0)  # a replacement's first call also waits for its sandbox to open
            execution = ray.get(host.run.remote(source), timeout=deadline)
            self._fresh.discard(index)
            return execution
        except (GetTimeoutError, RayActorError, RayTaskError) as exc:
            why = f"did not answer within {deadline:.0f}s" if isinstance(exc, GetTimeoutError) else f"failed ({type(exc).__name__})"
            logger.warning("tool host %d %s: replacing it", index, why)
            self._replace(index, host)
            return Execution(status="sandbox_error", returncode=None, stdout="", stderr="", wall_s=0.0, detail=f"tool host {why}")
        finally:
            self._free.put(index)

    def _replace(self, index: int, host) -> None:
        """Replace ``host`` in slot ``index`` (unless a call beside this one already did)."""
        with self._lock:
            if self.hosts[index] is not host:
                return
            ray.kill(host, no_restart=True)
            self.hosts[index] = self._actor_class.remote(self.settings)
            self._fresh.add(index)
            self.stats["tools/host_restarts"] += 1

    def kill(self) -> None:
        with self._lock:
            for host in self.hosts:
                ray.kill(host, no_restart=True)
