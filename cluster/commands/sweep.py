"""``raylight sweep CONFIG --grid key=v1,v2 ... [--pool NAME]``: every combination of the grid's
values as one run, all at once, on one shared generator pool (docs/shared-pool.md#sweeps).

Each run is ``raylight train CONFIG key=value ...`` with its own run folder under ``--out``
(named by its values), launched as a local driver process, or with ``--ray-jobs`` as a Ray job
on the cluster (``ray job submit``'s API; the job runs ``raylight train`` where Ray puts it).
With ``--pool NAME`` every run attaches to that pool, started from CONFIG (sized for the
grid's runs) when none of that name runs and stopped at the end. When every run has ended,
``raylight report``'s comparison of them is written to ``--out``/comparison.md.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SweepRun:
    name: str  # its run folder's name: its grid values
    overrides: tuple[str, ...]  # key=value, one per grid key


def parse_grid(items: list[str]) -> dict[str, list[str]]:
    """``["algorithm.lr=1e-3,3e-3", "run.seed=1,2"]`` -> ``{key: [values]}``, refusing a malformed item."""
    grid: dict[str, list[str]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        parts = [v.strip() for v in values.split(",")]
        key = key.strip()
        if not sep or not key or not all(parts):
            raise ValueError(f"--grid {item!r}: write key=value1,value2 (a dotted config key and comma-separated values)")
        if key in grid:
            raise ValueError(f"--grid names {key} twice")
        grid[key] = parts
    return grid


def expand(grid: dict[str, list[str]]) -> list[SweepRun]:
    """Every combination of the grid's values, in order, each named by its values."""
    runs = []
    for values in itertools.product(*grid.values()):
        pairs = list(zip(grid, values))
        name = ",".join(f"{key.rsplit('.', 1)[-1]}={re.sub(r'[^A-Za-z0-9_.+-]', '_', value)}" for key, value in pairs)
        runs.append(SweepRun(name or "run", tuple(f"{key}={value}" for key, value in pairs)))
    if len({r.name for r in runs}) != len(runs):
        runs = [SweepRun(f"{i:02d}-{r.name}", r.overrides) for i, r in enumerate(runs)]
    return runs


def train_argv(config: str, run: SweepRun, out: Path, pool: str | None, extra: list[str]) -> list[str]:
    overrides = [*extra, *run.overrides, *([f"generator.pool={pool}"] if pool else [])]
    return ["raylight", "train", config, "--run-dir", str(out / run.name), "--no-dashboard", *overrides]


def sweep(config: str, grid: dict[str, list[str]], out: Path, pool: str | None = None, ray_jobs: bool = False, extra: list[str] = ()) -> dict[str, int]:
    """Run the grid (see the module docstring); each run's exit code, by name."""
    runs = expand(grid)
    config, out = str(Path(config).resolve()), out.resolve()  # a Ray job runs elsewhere: the paths must not depend on where
    out.mkdir(parents=True, exist_ok=True)
    started_pool = _ensure_pool(config, pool, len(runs), list(extra)) if pool else False
    try:
        codes = _jobs(config, runs, out, pool, list(extra)) if ray_jobs else _local(config, runs, out, pool, list(extra))
    finally:
        if started_pool:
            from cluster.commands.pool import stop

            stop(pool)
    finished = [str(out / name) for name in codes if (out / name / "metrics.jsonl").is_file()]
    if finished:
        from cluster.commands.report import write_comparison

        print(write_comparison(finished, out))
    else:
        logger.warning("sweep: no run wrote metrics under %s (Ray jobs write on the node they ran on: compare them with `raylight report` there)", out)
    return codes


def _ensure_pool(config: str, name: str, runs: int, extra: list[str]) -> bool:
    """Start pool ``name`` from ``config`` with room for ``runs`` adapters unless it runs; whether it was started here."""
    import ray

    from actors.pool import PoolRefused, find_pool
    from cluster.commands.pool import start
    from cluster.config import load_config
    from cluster.loop.wiring import join_cluster

    loaded = load_config(config, extra)
    join_cluster(loaded, start=True)
    try:
        find_pool(name)
        logger.info("sweep: the runs attach to the running pool %r", name)
        return False
    except PoolRefused:
        pass
    loaded = load_config(config, [*extra, f"generator.max_loras={max(runs, loaded.generator.max_loras)}"])
    start(loaded, name, detach_after_s=60.0)
    logger.info("sweep: started pool %r for %d runs", name, runs)
    ray.shutdown()  # the runs join the cluster themselves
    return True


def _local(config: str, runs: list[SweepRun], out: Path, pool: str | None, extra: list[str]) -> dict[str, int]:
    """Each run as a driver process here, all at once; their exit codes once all have ended."""
    raylight = [sys.executable, "-m", "cluster.commands.cli"]
    processes, logs = {}, []
    codes = {}
    try:
        for run in runs:
            argv = raylight + train_argv(config, run, out, pool, extra)[1:]
            logs.append(open(out / f"{run.name}.log", "w"))
            processes[run.name] = subprocess.Popen(argv, stdout=logs[-1], stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
            logger.info("sweep: started %s (log %s)", run.name, logs[-1].name)
        while len(codes) < len(processes):
            for name, process in processes.items():
                if name not in codes and process.poll() is not None:
                    codes[name] = process.returncode
                    logger.info("sweep: %s ended with exit code %d (%d of %d)", name, process.returncode, len(codes), len(processes))
            time.sleep(1.0)
    finally:  # interrupted: the runs stop with it (each checkpoints as a stopped run does)
        for process in processes.values():
            if process.poll() is None:
                process.terminate()
        for process in processes.values():
            process.wait()
        for log in logs:
            log.close()
    return codes


def _jobs(config: str, runs: list[SweepRun], out: Path, pool: str | None, extra: list[str]) -> dict[str, int]:
    """Each run as a Ray job (the cluster of ``RAY_ADDRESS``'s dashboard, or the local one's);
    exit code 0 for a job that succeeded, 1 otherwise."""
    import shlex

    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(os.environ.get("RAY_DASHBOARD_ADDRESS") or os.environ.get("RAY_ADDRESS") or "http://127.0.0.1:8265")
    ids = {run.name: client.submit_job(entrypoint=shlex.join(train_argv(config, run, out, pool, extra)), submission_id=None) for run in runs}
    codes: dict[str, int] = {}
    while len(codes) < len(ids):
        for name, job in ids.items():
            status = client.get_job_status(job)
            if name not in codes and status.is_terminal():
                codes[name] = 0 if status == JobStatus.SUCCEEDED else 1
                logger.info("sweep: job %s (%s) ended %s", job, name, status)
        time.sleep(2.0)
    return codes
