"""Checkpoints without Ray: the atomic store (corrupt, half-written and killed writes), the
learner's state round trip, the data position of a task mixture, and the learning-rate cut of
a rollback."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cluster.keeping.checkpoint import MARKER, CheckpointStore
from cluster.commands.cli import main
from helpers import learner_settings, make_learner
from learners.learner import Learner
from rollout.tasks import Curriculum, TaskMixture, build_task
from test_learner import LORA, nonzero_adapter, random_batch

ROOT = Path(__file__).resolve().parents[1]


def files(step: int) -> dict:
    return {"learner.pt": f"weights of step {step}".encode(), "trainer.json": b'{"step": %d}' % step}


def test_save_keeps_the_last_k_and_the_best(tmp_path):
    store = CheckpointStore(tmp_path, keep=2)
    metrics = {1: 0.5, 2: 0.9, 3: 0.4, 4: None, 5: 0.6}
    for step, metric in metrics.items():
        store.save(step, files(step), metric)
    assert [c.step for c in store.complete()] == [2, 4, 5]  # the best (0.9 at step 2) and the last two
    assert store.best().step == 2
    assert os.readlink(tmp_path / "best") == "step_000002"
    latest = store.latest()
    assert latest.step == 5 and latest.metric == 0.6
    assert latest.file("learner.pt").read_bytes() == b"weights of step 5"
    assert not list(tmp_path.glob(".tmp-*"))


def test_a_corrupt_checkpoint_is_skipped_with_a_warning(tmp_path, caplog):
    store = CheckpointStore(tmp_path, keep=5)
    for step in (1, 2, 3):
        store.save(step, files(step))
    (tmp_path / "step_000003" / "learner.pt").write_bytes(b"weights of step 9")  # same size, other bytes
    (tmp_path / "step_000002" / "trainer.json").unlink()
    with caplog.at_level(logging.WARNING):
        assert store.latest().step == 1
    assert "step_000003 is unusable (file learner.pt does not match its checksum)" in caplog.text
    assert "step_000002 is unusable (file trainer.json is missing)" in caplog.text
    assert store.latest(before_step=1) is None


def test_a_folder_without_marker_is_never_used(tmp_path, caplog):
    store = CheckpointStore(tmp_path)
    store.save(1, files(1))
    half = tmp_path / "step_000002"
    half.mkdir()
    (half / "learner.pt").write_bytes(b"half")
    with caplog.at_level(logging.WARNING):
        assert store.latest().step == 1
    assert "no completeness marker" in caplog.text


SLOW_WRITER = """
import sys, time
from pathlib import Path
from cluster.keeping.checkpoint import CheckpointStore

def slow(path: Path) -> None:
    path.write_bytes(b"x" * 1000)
    print("writing", flush=True)
    time.sleep(60)  # killed here, in the middle of the checkpoint

store = CheckpointStore(sys.argv[1])
store.save(1, {"learner.pt": b"one", "trainer.json": b"{}"})
store.save(2, {"learner.pt": b"two", "trainer.json": slow})
"""


def test_a_process_killed_while_writing_leaves_the_previous_checkpoint(tmp_path):
    """A real process, SIGKILLed between two files of its second checkpoint."""
    child = subprocess.Popen([sys.executable, "-c", SLOW_WRITER, str(tmp_path)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert child.stdout.readline().strip() == "writing"
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        child.kill()
    partial = list(tmp_path.glob(".tmp-step_000002-*"))
    assert len(partial) == 1 and not (partial[0] / MARKER).exists()
    store = CheckpointStore(tmp_path)
    latest = store.latest()
    assert latest.step == 1 and latest.file("learner.pt").read_bytes() == b"one"
    store.save(2, files(2))  # the next write clears the debris
    assert not list(tmp_path.glob(".tmp-*")) and store.latest().step == 2


def test_learner_state_round_trip_continues_exactly(tiny_model_path):
    """Learner A takes three steps; learner B, built fresh, loads A's state after the first and
    takes the other two: the same metrics, weights, optimizer moments and version."""
    settings = learner_settings(tiny_model_path, LORA, lr=0.05, kl_coef=0.1, kl_target=0.01, lr_schedule="cosine", total_steps=5, warmup_steps=1, mini_batch_size=4)
    batches = [random_batch(8, seed) for seed in range(3)]
    a = Learner(settings)
    nonzero_adapter(a)
    a.step(batches[0])
    state = a.state_dict()
    expected = [a.step(b) for b in batches[1:]]
    b = Learner(settings)  # fresh: LoRA B = 0, A moved away from that
    assert b.load_state_dict(state).version == 1
    got = [b.step(batch) for batch in batches[1:]]
    assert got == expected
    for (name, pa), (_, pb) in zip(a.policy.named_trainable(), b.policy.named_trainable()):
        assert torch.equal(pa, pb), name
    assert b.policy_version().version == a.policy_version().version == 3 and b.kl_coef == a.kl_coef
    with pytest.raises(ValueError, match="does not fit this policy"):
        Learner(dataclasses.replace(settings, lora=dataclasses.replace(LORA, rank=2))).load_state_dict(state)


def test_rollback_lowers_the_learning_rate_and_its_schedule(tiny_model_path):
    learner = make_learner(tiny_model_path, LORA, lr=0.01, warmup_steps=4)
    assert learner.scheduler.get_last_lr()[0] == pytest.approx(0.0025)
    assert learner.scale_lr(0.5) == pytest.approx(0.00125)
    learner.step(random_batch(4))
    assert learner.scheduler.get_last_lr()[0] == pytest.approx(0.0025)  # warm-up step 2 of 4, halved


def test_mixture_data_position_survives_a_restart():
    """The next problems after a restore are the ones the saved mixture would draw, across a
    curriculum's difficulty changes."""

    def mixture():
        tasks = [build_task("rpn", difficulty=3, seed=1), build_task("arithmetic", difficulty=2, seed=1)]
        return TaskMixture(tasks, [1.0, 2.0], seed=5, curricula={"rpn": Curriculum(raise_at=0.5, window=1)})

    a = mixture()
    for accuracy in (0.9, 0.1, 0.9, 0.9):
        a.sample(6)
        a.update_curricula({"rpn": accuracy})
    state = a.state()
    expected = [p.uid for p in a.sample(12)]
    b = mixture()
    b.load_state(json.loads(json.dumps(state)))  # through JSON, as on disk
    assert b.tasks["rpn"].difficulty == a.tasks["rpn"].difficulty == 5
    assert [p.uid for p in b.sample(12)] == expected
    assert list(b.curricula["rpn"].history) == list(a.curricula["rpn"].history)


def test_resume_without_a_checkpoint_names_the_folder(tmp_path, capsys):
    run_dir = tmp_path / "empty"
    run_dir.mkdir()
    assert main(["resume", str(run_dir)]) == 2
    assert "has no config.yaml" in capsys.readouterr().err
    (run_dir / "config.yaml").write_text("run: {steps: 2}\n")
    assert main(["resume", str(run_dir)]) == 2
    assert f"no usable checkpoint in {run_dir / 'checkpoints'}" in capsys.readouterr().err


def test_a_new_run_sets_an_earlier_one_aside(tmp_path):
    from cluster.keeping.rundir import RunDir

    run_dir = RunDir(tmp_path / "run")
    assert run_dir.set_aside_previous() is None  # nothing there yet
    run_dir.append_metrics({"step": 1})
    CheckpointStore(run_dir.checkpoints).save(1, files(1))
    previous = run_dir.set_aside_previous()
    assert sorted(p.name for p in previous.iterdir()) == ["checkpoints", "metrics.jsonl"]
    assert not run_dir.metrics_path.exists() and CheckpointStore(run_dir.checkpoints).latest() is None
    assert (run_dir.path / "rollouts").is_dir()
