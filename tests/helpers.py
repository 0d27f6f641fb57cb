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
    trainable_modules: tuple[str, ...] = (),
    attention_controls: bool = False,
    **algorithm,
) -> LearnerSettings:
    """A test learner's settings: ``algorithm`` overrides the section's knobs, on top of no
    KL, a token-mean loss and exact fp32 (no autocast; what the hand-computed checks assume)."""
    knobs = AlgorithmSettings(**{"kl_coef": 0.0, "loss_agg": "token-mean", "autocast_dtype": "float32", **algorithm})
    return LearnerSettings(model_path, knobs, lora, dtype, temperature, total_steps, seed, threads, gradient_checkpointing, trainable_modules, attention_controls)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_learner(model_path: str, lora: LoraSettings | None, **settings) -> Learner:
    return Learner(learner_settings(model_path, lora, **settings))


DRIVER_SCRIPT = """
import logging
import sys
sys.path.insert(0, {tests!r})
logging.basicConfig(level=logging.INFO)
from cluster.config import load_config
from cluster.loop.driver import Trainer
from cluster.keeping.rundir import RunDir
from {scorer_module} import spread_reward

config = load_config({config!r}, {overrides!r})
if {resume_if_exists!r}:  # what `raylight train --resume-if-exists` does
    trainer = Trainer.resume_or_start(config, scorer=spread_reward)
else:
    trainer = Trainer(config, RunDir(config.run.run_dir), scorer=spread_reward)
trainer.train(config.run.steps)
trainer.shutdown()
"""


def driver_command(config: Path, overrides: list[str], scorer_module: str, resume_if_exists: bool = False) -> tuple[list[str], dict]:
    """A training driver as a separate process joined to this test's Ray cluster: (argv, env)."""
    import os
    import sys

    import ray

    tests = Path(__file__).resolve().parent
    script = DRIVER_SCRIPT.format(tests=str(tests), scorer_module=scorer_module, config=str(config), overrides=overrides, resume_if_exists=resume_if_exists)
    return [sys.executable, "-c", script], {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}


def kill_driver_after(marker: Path, config: Path, overrides: list[str], scorer_module: str, timeout_s: float = 300.0, resume_if_exists: bool = False) -> None:
    """Run a training driver in a separate process (joined to this test's Ray cluster) and
    SIGKILL it, with its process group, as soon as ``marker`` exists."""
    import os
    import signal
    import subprocess
    import time

    argv, env = driver_command(config, overrides, scorer_module, resume_if_exists)
    driver = subprocess.Popen(argv, cwd=Path(__file__).resolve().parents[1], env=env, start_new_session=True)
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


# wrong HumanEval/0 answers that try to get themselves masked instead of failed: each erases
# the trace of its failure from its own stderr, the old sign that the sandbox never started
SELF_MASKING = [
    "    return False\n\nimport os, sys\nif not has_close_elements([1.0, 2.8, 3.0, 4.0, 5.0, 2.0], 0.3):\n"
    "    sys.stderr.flush()\n    os.ftruncate(2, 0)\n    os._exit(1)\n",
    "    return False\n\nimport os\nos.close(2)\n",
    "    import os\n    os.dup2(os.open('/dev/null', os.O_WRONLY), 2)\n    raise SystemExit(3)\n",
    "    import os\n    os.ftruncate(2, 0)\n    return len(numbers) > 99\n",
]
