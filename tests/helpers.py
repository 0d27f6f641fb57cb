"""Helpers shared by test modules (importable: pytest puts tests/ on the path)."""

from __future__ import annotations

from pathlib import Path

from learners.learner import Learner
from learners.settings import AlgorithmSettings, LearnerSettings
from learners.policy import LoraSettings


def learner_settings(
    model_path: str,
    lora: LoraSettings | None,
    *,
    total_steps: int = 0,
    threads: int = 0,
    seed: int = 0,
    dtype: str = "float32",
    temperature: float = 1.0,
    gradient_checkpointing: bool = False,
    **algorithm,
) -> LearnerSettings:
    """A test learner's settings: ``algorithm`` overrides the section's knobs, on top of no
    KL and a token-mean loss (what most hand-computed checks assume)."""
    knobs = AlgorithmSettings(**{"kl_coef": 0.0, "loss_agg": "token-mean", **algorithm})
    return LearnerSettings(model_path, knobs, lora, dtype, temperature, total_steps, seed, threads, gradient_checkpointing)


def make_learner(model_path: str, lora: LoraSettings | None, **settings) -> Learner:
    return Learner(learner_settings(model_path, lora, **settings))


KILLED_DRIVER = """
import sys
sys.path.insert(0, {tests!r})
from cluster.config import load_config
from cluster.driver import Trainer
from cluster.rundir import RunDir
from {scorer_module} import spread_reward

config = load_config({config!r}, {overrides!r})
trainer = Trainer(config, RunDir(config.run.run_dir), scorer=spread_reward)
trainer.train(config.run.steps)
"""


def kill_driver_after(marker: Path, config: Path, overrides: list[str], scorer_module: str, timeout_s: float = 300.0) -> None:
    """Run a training driver in a separate process (joined to this test's Ray cluster) and
    SIGKILL it, with its process group, as soon as ``marker`` exists."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import ray

    tests = Path(__file__).resolve().parent
    script = KILLED_DRIVER.format(tests=str(tests), scorer_module=scorer_module, config=str(config), overrides=overrides)
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    driver = subprocess.Popen([sys.executable, "-c", script], cwd=tests.parent, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout_s
        while not marker.exists() and driver.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert marker.exists(), f"the driver never wrote {marker} (exit code {driver.poll()})"
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait(timeout=30)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
