"""Helpers shared by test modules (importable: pytest puts tests/ on the path): test learners,
the tiny run's config and its reward, reading a run's final adapter, and drivers killed and
resumed in separate processes."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import ray

from contracts import TrainBatch, Verdict
from learners.learner import Learner
from learners.settings import AlgorithmSettings, LearnerSettings
from learners.policy import LoraSettings

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"

# Ray workers cannot import the tests' modules: ship this module's functions (the scorers) by value
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def spread_reward(completion: str, problem) -> Verdict:
    """A random tiny model never solves arithmetic, so the numeric reward would be 0 for every
    sample and the gradient exactly 0. This reward varies with the text (the share of ASCII
    letters), so every group carries signal and the weights must move."""
    letters = sum(c.isascii() and c.isalpha() for c in completion)
    return Verdict(reward=letters / max(1, len(completion)), correct=False)


def tiny_config(tiny_model_path: str, run_dir: str | Path, *overrides: str, recipe: Path = TINY):
    """``recipe`` (the tiny config by default) on the tiny test model, writing to ``run_dir``."""
    from cluster.config import load_config

    return load_config(recipe, [f"model.path={tiny_model_path}", f"run.run_dir={run_dir}", *overrides])


def tiny_trainer(tiny_model_path: str, run_dir: str | Path, *overrides: str, recipe: Path = TINY, scorer=spread_reward):
    """A Trainer of ``tiny_config`` scored by ``scorer`` (``spread_reward``; None: the task's own)."""
    from cluster.keeping.rundir import RunDir
    from cluster.loop.driver import Trainer

    return Trainer(tiny_config(tiny_model_path, run_dir, *overrides, recipe=recipe), RunDir(run_dir), scorer=scorer)


# metrics computed from the engine's log-probs (the last bits of which vary between engines)
ENGINE_NOISE = ("train/logprob_mean", "eval/logprob_mean", "train/logprob_mismatch", "train/ratio_mean", "train/ratio_max", "train/ratio_min")


def learned(rows: list[dict], tolerant: bool = False) -> list[dict]:
    """What must match between runs: every value that is not a timing or a pool statistic;
    ``tolerant``: those made from the engine's log-probs as values within 1e-5."""
    return [
        {k: pytest.approx(v, rel=1e-5, abs=1e-5) if tolerant and k in ENGINE_NOISE else v for k, v in row.items() if not k.startswith(("perf/", "verifier/"))}
        for row in rows
    ]


def adapter(run_dir: Path) -> dict:
    return load_file(str(run_dir / "final_adapter" / "adapter_model.safetensors"))


def final_adapter(run_dir: Path) -> dict:
    """The tensors of the run's trained adapter."""
    from safetensors.torch import load_file

    return load_file(str(run_dir / "final_adapter" / "adapter_model.safetensors"))


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


def engine_gap(learner: Learner, prompts: list[list[int]], completions: list, version: int = 0) -> float:
    """The largest gap between an engine's sampled tokens' log-probs and the learner's own for
    the same tokens; ``completions``: each prompt's, in order, as many per prompt."""
    n = len(completions) // len(prompts)
    batch = TrainBatch(
        prompt_token_ids=tuple(tuple(p) for p in prompts for _ in range(n)),
        completion_token_ids=tuple(c.token_ids for c in completions),
        old_logprobs=tuple(c.logprobs for c in completions),
        advantages=(0.0,) * len(completions),
        policy_versions=(version,) * len(completions),
    )
    return max(abs(a - b) for c, row in zip(completions, learner.logprobs(batch)) for a, b in zip(c.logprobs, row))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def kill_actor(handle, timeout_s: float = 30.0) -> None:
    """Kill a Ray actor for good and return once its process is gone: ``ray.kill`` only asks,
    a call sent just after it may still be answered, and the objects it owns stay readable
    until its process exits (well after Ray reports the actor dead)."""
    import os
    import time

    pid = ray.get(handle.__ray_call__.remote(lambda actor: os.getpid()))  # an actor on this machine
    ray.kill(handle, no_restart=True)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        assert time.monotonic() < deadline, f"the killed actor {handle} (pid {pid}) still runs after {timeout_s:.0f} s"
        time.sleep(0.1)


def wait_until_lost(ref, timeout_s: float = 30.0) -> None:
    """Return once ``ref``'s object is gone with its owner: for a while after the owner's
    process exits, the node's object store may still hand it out."""
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            ray.get(ref, timeout=5)
        except ray.exceptions.ObjectLostError:
            return
        assert time.monotonic() < deadline, f"{ref} is still readable {timeout_s:.0f} s after its owner died"
        time.sleep(0.2)


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
from helpers import spread_reward

config = load_config({config!r}, {overrides!r})
if {resume_if_exists!r}:  # what `raylight train --resume-if-exists` does
    trainer = Trainer.resume_or_start(config, scorer=spread_reward)
else:
    trainer = Trainer(config, RunDir(config.run.run_dir), scorer=spread_reward)
trainer.train(config.run.steps)
trainer.shutdown()
"""


def driver_command(config: Path, overrides: list[str], resume_if_exists: bool = False) -> tuple[list[str], dict]:
    """A training driver as a separate process joined to this test's Ray cluster: (argv, env)."""
    import os

    tests = Path(__file__).resolve().parent
    script = DRIVER_SCRIPT.format(tests=str(tests), config=str(config), overrides=overrides, resume_if_exists=resume_if_exists)
    return [sys.executable, "-c", script], {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}


def kill_driver_after(marker: Path, config: Path, overrides: list[str], timeout_s: float = 300.0, resume_if_exists: bool = False) -> None:
    """Run a training driver (scored by ``spread_reward``) in a separate process joined to this
    test's Ray cluster, and SIGKILL it, with its process group, as soon as ``marker`` exists."""
    import os
    import signal
    import subprocess
    import time

    argv, env = driver_command(config, overrides, resume_if_exists)
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


def wandb_records(run_dir: Path) -> list[tuple[str, object]]:
    """The records of the offline W&B run(s) under ``run_dir``/wandb, in order, as
    ``(kind, message)`` (``history``, ``config``, ``run``, ``exit``, ...). W&B's run file is a
    LevelDB-style log (32 KiB blocks of chunks with a 7-byte header: CRC, length, type) of
    ``wandb_internal_pb2.Record`` messages after a 7-byte file header; the wandb package has no
    public reader for it."""
    import struct

    from wandb.proto import wandb_internal_pb2

    records = []
    for path in sorted(Path(run_dir, "wandb").glob("offline-run-*/run-*.wandb")):
        data, pos, pending = path.read_bytes(), 7, b""
        assert data[:4] == b":W&B", f"{path} is not a W&B run file"
        while pos + 7 <= len(data):
            if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
                pos += 32768 - pos % 32768
                continue
            _crc, length, chunk = struct.unpack("<IHB", data[pos:pos + 7])
            pending, pos = pending + data[pos + 7:pos + 7 + length], pos + 7 + length
            if chunk in (1, 4):  # FULL or LAST: a whole record
                record = wandb_internal_pb2.Record()
                record.ParseFromString(pending)
                records.append((record.WhichOneof("record_type"), record))
                pending = b""
    return records


def wandb_history(run_dir: Path) -> list[dict]:
    """Each ``log`` call of the offline W&B run(s) under ``run_dir``, W&B's own keys left out."""
    import json

    rows = []
    for kind, record in wandb_records(run_dir):
        if kind == "history":
            items = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            rows.append({k: v for k, v in items.items() if not k.startswith("_")})
    return rows


def run_as_nobody(argv: list[str], extra: dict[str, Path] | None = None, timeout: float = 120.0):
    """Run ``argv`` with ``/usr/bin/python3`` as uid ``nobody`` (root only) over a copy of the
    sandbox package and its bwrap that this uid can read (mode 755 under ``/tmp``), plus the
    ``extra`` folders copied under their names; ``{tree}`` in ``argv`` is that copy. Returns
    the ``CompletedProcess`` (text). The image runs as an unprivileged user, like this."""
    import os
    import shutil
    import subprocess
    import tempfile

    from rewards.sandbox.filesystem import find_bwrap

    root = Path(__file__).resolve().parents[1]
    tree = Path(tempfile.mkdtemp(prefix="raylight-nobody-", dir="/tmp"))
    try:
        shutil.copytree(root / "rewards" / "sandbox", tree / "rewards" / "sandbox", ignore=shutil.ignore_patterns("__pycache__"))
        (tree / "rewards" / "__init__.py").write_text("")
        for name, source in (extra or {}).items():
            shutil.copytree(source, tree / name, ignore=shutil.ignore_patterns("__pycache__", "grafana"))
        bwrap = Path(find_bwrap()).resolve()
        shutil.copytree(bwrap.parents[1], tree / "bin" / bwrap.parents[1].name)
        libs = bwrap.parents[2] / f"{bwrap.parents[1].name}.libs"
        if libs.is_dir():
            shutil.copytree(libs, tree / "bin" / libs.name)
        for item in [tree, *tree.rglob("*")]:
            item.chmod(0o755)
        env = {"PATH": f"{tree / 'bin' / bwrap.parent.relative_to(bwrap.parents[1].parent)}:/usr/bin:/bin", "PYTHONPATH": str(tree), "HOME": "/"}

        def nobody() -> None:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)

        command = ["/usr/bin/python3", *(a.replace("{tree}", str(tree)) for a in argv)]
        return subprocess.run(command, capture_output=True, text=True, cwd="/", env=env, preexec_fn=nobody, timeout=timeout)
    finally:
        shutil.rmtree(tree, ignore_errors=True)
