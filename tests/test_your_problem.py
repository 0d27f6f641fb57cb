"""Bring your own problem, end to end on the tiny model with real Ray, vLLM and the verifier
pool: the worked example of docs/your-problem.md (a JSONL of questions and a reward function in
the user's own file, copied outside the repository) run exactly as the page says, with
``raylight train`` from its folder; and a run whose HTTP reward server dies mid-run and whose
reward function raises on some samples, which finishes with those samples masked and counted
in metrics.jsonl, the rollouts' Parquet, the report and the Ray metrics the dashboard reads."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import ray

from cluster.observe.metrics import run_label
from helpers import tiny_trainer
from reward_server import RewardServer
from test_resume import scrape

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "docs" / "your-problem"
# the tiny model in place of SmolLM2, and a short run; nothing else of the example changes
TINY = ["generator.dtype=float32", "generator.max_model_len=256", "generator.kv_cache_gib=1", "algorithm.autocast_dtype=float32",
        "model.dtype=float32", "run.steps=2", "eval.n=4", "cluster.dashboard=false"]  # fmt: skip


def test_the_worked_example_trains_with_raylight_train_from_its_folder(ray_cluster, tiny_model_path, tmp_path):
    """The user's folder, outside the repository; the driver joins this session's cluster (as
    under ``ray job submit``), so the verifier actors do not start in that folder and import
    the reward module from the folder the run was started in."""
    folder = shutil.copytree(EXAMPLE, tmp_path / "capitals")
    run_dir = tmp_path / "run"
    raylight = Path(sys.executable).parent / "raylight"
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    done = subprocess.run([str(raylight), "train", "config.yaml", "--run-dir", str(run_dir), f"model.path={tiny_model_path}", *TINY],
                          cwd=folder, env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in rows if r["step"] > 0]
    assert [r["step"] for r in trained] == [1, 2]
    for row in trained:
        assert {"train/reward/capital", "train/reward/capital/brief", "train/reward/capital/correct"} <= set(row)
        assert row["train/masked_share"] == 0.0
    table = pq.read_table(run_dir / "rollouts" / "step_000001.parquet").to_pylist()
    components = [r["reward_components"] for r in table]
    assert all({"capital", "capital/brief", "capital/correct"} <= set(c) for c in components)
    assert all(r["reward"] == pytest.approx(c["capital"]) for r, c in zip(table, components))  # weight 1, the only term
    assert "What is the capital of" in table[0]["prompt"]
    report = subprocess.run([str(raylight), "report", str(run_dir)], env=env, capture_output=True, text=True, timeout=300)
    assert report.returncode == 0, report.stderr[-2000:]
    text = (run_dir / "report.md").read_text()
    assert "## Reward components" in text and "| `capital` |" in text and "| `capital/brief` |" in text


def test_a_dying_reward_server_and_a_raising_function_mask_and_count_never_crash(ray_cluster, ray_metrics_port, tiny_model_path, tmp_path):
    module = tmp_path / "user" / "flaky_reward.py"
    module.parent.mkdir()
    module.write_text("def flaky(completion):\n    if len(completion) % 3 == 0:\n        raise ValueError('cannot score this one')\n    return 0.5\n")
    with RewardServer(die_after=3) as server:
        overrides = [f"reward.http={{url: '{server.url}', timeout_s: 2.0, retries: 1, batch_size: 4}}",
                     f"reward.functions=[{{path: 'flaky_reward.py:flaky', search: ['{module.parent}'], on_error: mask}}]",
                     "run.steps=3", "eval.at_start=false", "eval.n=4", "verifier.samples_per_call=4"]  # fmt: skip
        trainer = tiny_trainer(tiny_model_path, tmp_path / "run", *overrides, scorer=None)
        try:
            trainer.train(trainer.config.run.steps)
        finally:
            trainer.shutdown()
    assert server.requests >= 3 and not server.alive
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r["step"] > 0]
    assert [r["step"] for r in steps] == [1, 2, 3]
    samples = 16  # 4 prompts x 4
    assert steps[-1]["train/reward_errors/http"] == samples and steps[-1]["train/masked_share"] == 1.0  # the server is gone
    assert sum(r.get("train/reward_errors/flaky", 0) for r in steps) > 0
    first = steps[0]
    assert first.get("train/reward/http") is not None and first["train/masked_share"] < 1.0
    table = pq.read_table(tmp_path / "run" / "rollouts" / "step_000003.parquet").to_pylist()
    assert all(r["status"] == "masked" and "http" in r["reward_faults"] and r["advantage"] is None for r in table)
    assert "reward server" in table[0]["error"]
    errors = float(sum(r.get("train/reward_errors/http", 0) for r in steps))  # a counter: the run's total
    assert scrape(ray_metrics_port, "ray_raylight_reward_errors_total", run_label(tmp_path / "run"), value=errors)
