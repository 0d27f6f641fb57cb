"""``raylight pool start|status|stop``: a shared generator pool that runs attach to by name
(``generator.pool``; ``actors.pool``)."""

from __future__ import annotations

import json
import logging

import ray

from actors.pool import find_pool
from cluster.config import Config
from cluster.loop.wiring import join_cluster, start_pool

logger = logging.getLogger(__name__)


def start(config: Config, name: str, detach_after_s: float) -> dict:
    """Start pool ``name`` with ``config``'s model and generator section; its status."""
    from rollout.models import resolve_model

    join_cluster(config, start=True)
    try:
        find_pool(name)
    except ValueError:
        pass
    else:
        raise FileExistsError(f"a generator pool named {name!r} already runs: `raylight pool stop {name}` first, or pick another --name")
    server = start_pool(config, str(resolve_model(config.model.path)), name, detach_after_s)
    return ray.get(server.status.remote())


def status(name: str) -> dict:
    join_cluster()
    return ray.get(find_pool(name).status.remote(), timeout=120)


def stop(name: str) -> None:
    join_cluster()
    server = find_pool(name)
    try:
        ray.get(server.stop.remote(), timeout=60)
    finally:
        ray.kill(server, no_restart=True)


def print_status(state: dict) -> None:
    print(json.dumps(state, indent=2))
