"""Checkpoint and resume through real runs (local Ray cluster, vLLM CPU engine, tiny model).

The reference is one uninterrupted run of four steps. A run of two steps resumed to four, and a
run killed (SIGKILL, a separate driver process) after its second checkpoint and resumed, must
end with the same metrics and bit-identical adapter weights. Sampling is reproducible because
each step reseeds the engine's sampler from (run seed, step).

The runs train with the plain policy gradient (``policy_loss=pg``), whose loss reads only the
learner's log-probs, so the weights depend on the sampled tokens alone. The engine's own
log-probs can differ in their last bits between engine processes (seen once in a full-suite
run: 6e-7 in a mean log-prob), and under PPO's ratio Adam's first steps turn that into a
0.01 difference in the adapter. The metrics made from the engine's log-probs (``ENGINE_NOISE``)
are compared to 1e-5, every other value exactly. Also here: the Ray metrics of a run, scraped
from the cluster's Prometheus endpoint, and a rollback rule in a real run.
"""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path

import pytest

from cluster.commands.cli import main
from cluster.config import load_config
from cluster.exits import ExitCode
from cluster.observe.metrics import run_label
from cluster.loop.driver import Trainer
from cluster.keeping.rundir import RunDir
from helpers import final_adapter, kill_driver_after, learned, spread_reward, wandb_history, wandb_records

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
STEPS = 4


def overrides(tiny_model_path: str, run_dir: Path, steps: int = STEPS) -> list[str]:
    return [
        f"model.path={tiny_model_path}", f"run.run_dir={run_dir}", f"run.steps={steps}", "run.checkpoint_every=1",
        "algorithm.lr=0.05", "algorithm.kl_coef=0.05", "algorithm.policy_loss=pg", "eval.every=2", "eval.n=8",
    ]  # fmt: skip


def train(tiny_model_path: str, run_dir: Path, steps: int) -> Trainer:
    config = load_config(ROOT / "configs/tiny.yaml", overrides(tiny_model_path, run_dir, steps))
    return Trainer(config, RunDir(run_dir), scorer=spread_reward)


def assert_same_run(run_dir: Path, reference: Path) -> None:
    rows, expected = RunDir(run_dir).read_metrics(), RunDir(reference).read_metrics()
    assert [r["step"] for r in rows] == list(range(STEPS + 1))
    assert learned(rows) == learned(expected, tolerant=True)
    got, want = final_adapter(run_dir), final_adapter(reference)
    assert got.keys() == want.keys() and all((got[k] == want[k]).all() for k in want)


@pytest.fixture(scope="module")
def uninterrupted(ray_cluster, tiny_model_path, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    trainer = train(tiny_model_path, run_dir, STEPS)
    try:
        trainer.train(STEPS)
    finally:
        trainer.shutdown()
    return run_dir


def scrape(port: int, name: str, run: str, value: float | None = None, timeout_s: float = 40.0) -> list[float]:
    """Values of ``name`` for ``run`` on the Prometheus endpoint, once there is one (equal to
    ``value`` if given); Ray's agent exports every few seconds."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        found = [float(line.rsplit(" ", 1)[1]) for line in body.splitlines() if line.startswith(name + "{") and f'run="{run}"' in line]
        if found and (value is None or any(v == pytest.approx(value) for v in found)):
            return found
        time.sleep(1)
    return []


def test_run_resumed_after_two_steps_equals_the_uninterrupted_run(uninterrupted, ray_metrics_port, tiny_model_path, tmp_path):
    run_dir = tmp_path / "resumed"
    first = train(tiny_model_path, run_dir, 2)
    try:
        first.train(2)
        # the run's metrics on the cluster's Prometheus endpoint, while the run's actors are up
        last = RunDir(run_dir).read_metrics()[-1]["train/reward_mean"]
        label = run_label(run_dir)
        assert scrape(ray_metrics_port, "ray_raylight_reward_mean", label, last), "step 2's train/reward_mean never reached the Ray metrics endpoint"
        for name in ("train_loss", "train_kl", "train_entropy", "train_ratio_max", "span_seconds",
                     "tokens_per_second", "verifier_queue_depth", "accuracy_ratio"):  # fmt: skip
            assert scrape(ray_metrics_port, f"ray_raylight_{name}", label, timeout_s=5), name
    finally:
        first.shutdown()
    assert [c.step for c in first.keeper.checkpoints.complete()] == [1, 2]
    second = Trainer.resume(run_dir, steps=STEPS, scorer=spread_reward)
    try:
        assert (second.run.step, second.run.policy.version) == (2, 2)
        second.train(STEPS)
    finally:
        second.shutdown()
    assert_same_run(run_dir, uninterrupted)
    # the last K (3) and the best by eval accuracy are kept
    assert [c.step for c in second.keeper.checkpoints.complete()][-3:] == [2, 3, 4]


def test_run_killed_after_a_checkpoint_resumes_to_the_same_result(uninterrupted, tiny_model_path, tmp_path):
    """A separate driver process (joined to the test's Ray cluster) is SIGKILLed once its second
    checkpoint is complete; ``Trainer.resume`` continues from its newest checkpoint."""
    run_dir = tmp_path / "killed"
    marker = run_dir / "checkpoints" / "step_000002" / "COMPLETE.json"
    kill_driver_after(marker, ROOT / "configs/tiny.yaml", overrides(tiny_model_path, run_dir))
    assert not (run_dir / "final_adapter").exists()  # it really died mid-run
    resumed = Trainer.resume(run_dir, scorer=spread_reward)
    try:
        assert resumed.run.step in (2, 3)
        resumed.train(STEPS)
    finally:
        resumed.shutdown()
    assert_same_run(run_dir, uninterrupted)


def test_a_job_run_again_after_its_driver_was_killed_resumes_and_finishes_the_same(uninterrupted, tiny_model_path, tmp_path):
    """``--resume-if-exists`` (``Trainer.resume_or_start``): the first attempt starts the run
    and is SIGKILLed after its second checkpoint; the same command run again continues from it
    and ends as the uninterrupted run did: every step's metrics once, the same adapter bits."""
    import subprocess

    from helpers import driver_command

    run_dir = tmp_path / "retried"
    config, settings = ROOT / "configs/tiny.yaml", overrides(tiny_model_path, run_dir)
    kill_driver_after(run_dir / "checkpoints" / "step_000002" / "COMPLETE.json", config, settings, resume_if_exists=True)
    assert not (run_dir / "final_adapter").exists()
    argv, env = driver_command(config, settings, resume_if_exists=True)
    retried = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert retried.returncode == 0, retried.stderr[-3000:]
    assert "holds a run with a checkpoint: resuming it" in retried.stderr
    assert_same_run(run_dir, uninterrupted)
    # a third attempt finds the run finished: it changes nothing
    again = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert_same_run(run_dir, uninterrupted)


def test_rollback_rule_restores_the_last_checkpoint_and_halves_the_lr(ray_cluster, tiny_model_path, tmp_path, monkeypatch):
    """``plateau`` with an impossible band fires at step 2 (its window): the run goes back to
    step 1's checkpoint with half the learning rate; at step 3 it fires again, the one allowed
    rollback is used up, and the run stops with the monitor's exit code."""
    run_dir = tmp_path / "rollback"
    argv = ["train", "configs/tiny.yaml", "--run-dir", str(run_dir), "--steps", "5", f"model.path={tiny_model_path}", "eval.n=4",
            "run.checkpoint_every=1", "monitor.max_rollbacks=1", "algorithm.lr=0.01", "run.tensorboard=true",
            "monitor.rules={plateau: {action: rollback, threshold: 1000.0, window: 2}}",
            "run.wandb={project: raylight-test, mode: offline}"]  # fmt: skip
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    assert main(argv) == ExitCode.MONITOR_STOP  # a RayJob must not report Succeeded
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    plateau = [e for e in events if e["rule"] == "plateau"]
    assert [(e["step"], e["action"]) for e in plateau] == [(2, "rollback"), (3, "rollback")]
    assert plateau[0]["evidence"]["rolled_back_to_step"] == 1 and plateau[0]["evidence"]["lr"] == pytest.approx(0.005)
    assert "cannot roll back (monitor.max_rollbacks=1 used up): stopping" in plateau[1]["message"]
    rows = {r["step"]: r for r in RunDir(run_dir).read_metrics()}
    assert max(rows) == 3 and rows[2]["monitor/rollbacks"] == 1.0
    assert rows[1]["train/lr"] == pytest.approx(0.01) and rows[3]["train/lr"] == pytest.approx(0.005)
    # step 2's update was undone: the old weights came back as a new version (versions only rise)
    assert [rows[s]["policy_version"] for s in (1, 2, 3)] == [1, 2, 4]
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))  # run.tensorboard
    # run.wandb (offline): every recorded row against its step, steps run again after the rollback included
    logged = wandb_history(run_dir)
    assert [row["step"] for row in logged] == [r["step"] for r in RunDir(run_dir).read_metrics()]
    assert logged[1]["train/lr"] == pytest.approx(0.01)
    assert next(r for kind, r in wandb_records(run_dir) if kind == "exit").exit.exit_code == ExitCode.MONITOR_STOP



def test_eval_command_reproduces_the_runs_first_and_last_evaluation(uninterrupted, tiny_model_path, capsys):
    """``raylight eval`` with the run's final adapter, and with none (the base model), decodes
    exactly what the run's evaluations at step 4 and step 0 decoded (same greedy outputs: the
    same completion lengths; the run scored with a test reward, eval with the config's)."""
    rows = RunDir(uninterrupted).read_metrics()
    config = str(uninterrupted / "config.yaml")
    for adapter, row in ((str(uninterrupted / "final_adapter"), rows[-1]), ("none", rows[0])):
        assert main(["eval", config, "--adapter", adapter, f"model.path={tiny_model_path}"]) == 0
        metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert metrics["eval/n"] == row["eval/n"] == 8
        assert metrics["eval/completion_length"] == pytest.approx(row["eval/completion_length"])
        assert metrics["eval/truncated_fraction"] == pytest.approx(row["eval/truncated_fraction"])
