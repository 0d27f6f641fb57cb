"""A real two-node Ray cluster on this machine: ``ray start --head`` (with its dashboard and
Ray 2.60's token authentication on) and a second node (``ray start --address``, its own temp
dir, a ``generator_node`` resource), each its own set of processes.

- generators are placed on the second node by a config key, and the tiny config runs to the end;
- a model folder the second node cannot read (hidden there by a mount namespace, where the
  machine allows one) stops the run with an error naming that node;
- ``ray job submit --working-dir .`` runs ``raylight train`` as a job, with token auth.

What cannot run here: nodes on separate machines (the nodes share this machine's file system
except where the test hides a folder) and GPUs.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from helpers import free_port

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
TINY_RUN = ["eval.n=4", "eval.at_start=false", "run.steps=2", "run.save_rollouts=false", "cluster.dashboard=false"]


def ray_env() -> dict[str, str]:
    """The venv first on PATH (the job's shell finds its python there) and token auth on."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["RAY_AUTH_MODE"] = "token"
    return env


class Node:
    """One ``ray start --block`` process group, stopped by signalling the group (``ray stop``
    would stop every Ray cluster on the machine, the test session's own included)."""

    def __init__(self, args: list[str], temp_dir: Path, hide: Path | None = None):
        command = [str(Path(sys.executable).parent / "ray"), "start", "--block", "--disable-usage-stats", f"--temp-dir={temp_dir}", *args]
        if hide is not None:  # a private mount namespace where `hide` is an empty tmpfs
            command = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                       f'mount -t tmpfs none "{hide}" && exec "$@"', "sh", *command]  # fmt: skip
        temp_dir.mkdir(parents=True, exist_ok=True)
        self.temp_dir = temp_dir
        self.log = temp_dir / "start.log"
        self.process = subprocess.Popen(command, env=ray_env(), stdout=self.log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)

    def stop(self) -> None:
        for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
            try:
                os.killpg(self.process.pid, sig)
                self.process.wait(timeout=wait)
                break
            except ProcessLookupError:
                break
            except subprocess.TimeoutExpired:
                continue
        # what the node started in sessions of its own (its workers) names its temp dir
        subprocess.run(["pkill", "-KILL", "-f", str(self.temp_dir)], check=False)


def nodes(address: str) -> list[dict]:
    script = "import json, ray; ray.init(address=%r, logging_level='ERROR'); print(json.dumps([n for n in ray.nodes() if n['Alive']]))" % address
    out = subprocess.run([sys.executable, "-c", script], env=ray_env(), capture_output=True, text=True, timeout=120)
    return json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else []


def can_hide_folders() -> bool:
    try:
        probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "true"], capture_output=True)
    except FileNotFoundError:  # no util-linux unshare
        return False
    return probe.returncode == 0


@pytest.fixture(scope="module")
def two_nodes(tiny_model_path):
    """(GCS address, dashboard URL, worker node id, folder hidden from the worker or None)."""
    base = Path(tempfile.mkdtemp(prefix="rn-"))  # short: Ray's socket paths have a length limit
    hidden = base / "hidden"
    hidden.mkdir()
    shutil.copytree(tiny_model_path, hidden / "tiny")
    gcs, dashboard = free_port(), free_port()
    head = Node(["--head", f"--port={gcs}", "--num-cpus=2", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
                 f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}"], base / "head")  # fmt: skip
    address = f"127.0.0.1:{gcs}"
    started = []
    try:
        started.append(head)
        deadline = time.monotonic() + 120
        while not nodes(address):
            assert head.process.poll() is None and time.monotonic() < deadline, head.log.read_text()[-3000:]
            time.sleep(1)
        hide = hidden if can_hide_folders() else None
        worker = Node([f"--address={address}", "--num-cpus=2", '--resources={"generator_node": 1}',
                       f"--dashboard-agent-listen-port={free_port()}"], base / "worker", hide=hide)  # fmt: skip
        started.append(worker)
        while len(found := nodes(address)) < 2:
            assert worker.process.poll() is None and time.monotonic() < deadline, worker.log.read_text()[-3000:]
            time.sleep(1)
        worker_id = next(n["NodeID"] for n in found if "generator_node" in n["Resources"])
        yield address, f"http://127.0.0.1:{dashboard}", worker_id, hide
    finally:
        for node in reversed(started):
            node.stop()
        shutil.rmtree(base, ignore_errors=True)


def train(address: str, run_dir: Path, model: str, *overrides: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "cluster.commands.cli", "train", "configs/tiny.yaml", "--run-dir", str(run_dir), f"model.path={model}", *TINY_RUN, *overrides]
    return subprocess.run(command, cwd=ROOT, env={**ray_env(), "RAY_ADDRESS": address}, capture_output=True, text=True, timeout=600)


def test_generators_go_to_the_node_a_config_key_names(two_nodes, tiny_model_path, tmp_path):
    address, _, worker_id, _ = two_nodes
    done = train(address, tmp_path / "run", tiny_model_path, "generator.resources={generator_node: 1}")
    assert done.returncode == 0, done.stderr[-4000:]
    placed = json.loads((tmp_path / "run" / "placement.json").read_text())
    assert [p["node_id"] for p in placed if p["role"] == "generator"] == [worker_id]
    assert [p for p in placed if p["role"] == "learner"]
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2] and (tmp_path / "run" / "final_adapter" / "adapter_model.safetensors").is_file()


def test_a_model_folder_a_node_cannot_read_stops_the_run_naming_it(two_nodes, tmp_path):
    address, _, worker_id, hidden = two_nodes
    if hidden is None:
        pytest.skip("this machine allows no private mount namespace (unshare --mount), so no folder can be hidden from one node")
    done = train(address, tmp_path / "run", str(hidden / "tiny"), "generator.resources={generator_node: 1}")
    assert done.returncode != 0
    assert f"model.path {hidden / 'tiny'} cannot be read on node" in done.stderr and f"(node id {worker_id})" in done.stderr


def run_job(dashboard: str, folder: Path, job: str, entrypoint: list[str]) -> tuple[str, str]:
    """``ray job submit --working-dir .`` from ``folder``, waited for: (its status, its logs)."""
    ray = str(Path(sys.executable).parent / "ray")
    submit = [ray, "job", "submit", "--address", dashboard, "--working-dir", ".", "--submission-id", job, "--no-wait", "--", *entrypoint]
    submitted = subprocess.run(submit, cwd=folder, env=ray_env(), capture_output=True, text=True, timeout=120)
    assert submitted.returncode == 0, submitted.stderr[-3000:]
    deadline, status = time.monotonic() + 600, ""
    while time.monotonic() < deadline:
        status = subprocess.run([ray, "job", "status", "--address", dashboard, job], env=ray_env(), capture_output=True, text=True).stdout.lower()
        if any(f"job '{job}' {word}" in status for word in ("succeeded", "failed", "stopped")):
            break
        time.sleep(3)
    logs = subprocess.run([ray, "job", "logs", "--address", dashboard, job], env=ray_env(), capture_output=True, text=True).stdout
    assert f"job '{job}' succeeded" in status, f"{status}\n{logs[-4000:]}"
    return status, logs


def test_ray_job_submit_runs_a_training_job_with_token_auth(two_nodes, tiny_model_path, tmp_path):
    _, dashboard, _, _ = two_nodes
    run_dir = tmp_path / "job-run"
    entrypoint = ["python", "-m", "cluster.commands.cli", "train", "configs/tiny.yaml", "--run-dir", str(run_dir), f"model.path={tiny_model_path}", *TINY_RUN]
    _, logs = run_job(dashboard, ROOT, f"raylight-test-{os.getpid()}", entrypoint)
    assert f"run directory: {run_dir}" in logs
    assert (run_dir / "config.yaml").is_file() and (run_dir / "final_adapter" / "adapter_model.safetensors").is_file()
    assert [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_the_worked_example_as_a_job_imports_the_users_reward_on_the_cluster(two_nodes, tiny_model_path, tmp_path):
    """docs/your-problem.md's example, submitted from its own folder (outside the repository)
    with ``--working-dir .``: the reward module travels with the job and the verifier actors
    import it there."""
    _, dashboard, _, _ = two_nodes
    folder = shutil.copytree(ROOT / "docs" / "your-problem", tmp_path / "capitals")
    run_dir = tmp_path / "capitals-run"
    tiny = [f"model.path={tiny_model_path}", "generator.dtype=float32", "generator.max_model_len=256", "generator.kv_cache_gib=1",
            "algorithm.autocast_dtype=float32", "model.dtype=float32", *TINY_RUN]  # fmt: skip
    entrypoint = ["python", "-m", "cluster.commands.cli", "train", "config.yaml", "--run-dir", str(run_dir), *tiny]
    run_job(dashboard, folder, f"raylight-capitals-{os.getpid()}", entrypoint)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert all({"train/reward/capital", "train/reward/capital/brief"} <= set(r) and r["train/masked_share"] == 0.0 for r in rows)
