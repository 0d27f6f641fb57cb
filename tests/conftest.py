"""Shared fixtures: a per-session scratch area for vLLM/Ray/torch, cached models, one Ray cluster.

vLLM, Ray and torch write outside the project by default (caches, sockets); every test
session points them at its own folder.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

_SCRATCH = Path(tempfile.mkdtemp(prefix="rl-"))  # short: Ray's socket paths have a length limit
for _name, _sub in {
    "VLLM_CACHE_ROOT": "vllm",
    "VLLM_RPC_BASE_PATH": "rpc",
    "TORCHINDUCTOR_CACHE_DIR": "inductor",
    "RAY_TMPDIR": "ray",
}.items():
    os.environ.setdefault(_name, str(_SCRATCH / _sub))
    Path(os.environ[_name]).mkdir(parents=True, exist_ok=True)
os.environ.setdefault("RAYLIGHT_CACHE", str(Path(__file__).resolve().parents[1] / ".cache"))
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_SCRATCH, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_model_path() -> str:
    from rollout.models import build_tiny_model

    return str(build_tiny_model())


@pytest.fixture(scope="session")
def ray_metrics_port() -> int:
    """The Prometheus export port of the session's Ray cluster."""
    from helpers import free_port

    return free_port()


@pytest.fixture(scope="session")
def ray_cluster(ray_metrics_port):
    """One embedded local Ray cluster for every integration test of the session."""
    import ray

    ray.init(num_cpus=4, include_dashboard=False, _temp_dir=os.environ["RAY_TMPDIR"], _metrics_export_port=ray_metrics_port)
    yield ray
    ray.shutdown()
