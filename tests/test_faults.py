"""Fault injection into real runs (local Ray cluster, vLLM CPU engines, tiny model, sync mode).

Every run here is the tiny config with 2 generators and 2 data-parallel learners, a checkpoint
after every step. The reference is the same run without a fault. Each test breaks one actor
at a chosen moment, by signals to its real process (SIGKILL: it dies; SIGSTOP: it hangs) or
by a load sneaked past the pool, and asserts that the run still finishes with every step's
metrics exactly once, the same learned metrics and bit-identical adapter weights (sync mode is
deterministic: a re-issued chunk keeps its sampling seed, a rebuilt learner group restores its
checkpoint exactly), and the fault counted and reported. The driver killed and its job run
again is in ``test_resume.py``.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import ray

from actors.generator import GeneratorsLost, generator_actor
from cluster.loop.driver import Trainer
from cluster.keeping.rundir import RunDir
from helpers import final_adapter, spread_reward, tiny_trainer

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
STEPS = 3
VARYING = ("perf/", "verifier/", "rollout/", "faults/", "monitor/actor_faults")  # timings, pool statistics, the faults


def trainer(tiny_model_path: str, run_dir: Path, *extra: str) -> Trainer:
    return tiny_trainer(
        tiny_model_path, run_dir, f"run.steps={STEPS}", "run.checkpoint_every=1", "generator.num_generators=2", "learner.num_learners=2",
        "algorithm.lr=0.05", "algorithm.kl_coef=0.05", "eval.n=8", "run.metrics_export=false", *extra,
    )  # fmt: skip


def pid(handle) -> int:
    return ray.get(handle.__ray_call__.remote(lambda self: os.getpid()))


def break_once(t: Trainer, obj, method: str, after_step: int, action) -> list:
    """Replace ``obj.method`` so that its first call once step ``after_step`` is done runs
    ``action(original, *args, **kwargs)`` instead; the returned list is non-empty once it has."""
    original, fired = getattr(obj, method), []

    def wrapped(*args, **kwargs):
        if not fired and t.run.step == after_step:
            fired.append(True)
            return action(original, *args, **kwargs)
        return original(*args, **kwargs)

    setattr(obj, method, wrapped)
    return fired


def run_with_fault(t: Trainer, obj, method: str, after_step: int, action, reference: Path) -> dict:
    """Run ``t`` to its end with ``obj.method`` broken once (``break_once``); it must end as
    ``reference`` did. Returns its last metrics row."""
    fired = break_once(t, obj, method, after_step, action)
    run(t)
    assert fired, f"{method} was never called after step {after_step}"
    return assert_same_as(t.run_dir.path, reference)


def run(t: Trainer) -> None:
    try:
        t.train(STEPS)
    finally:
        t.shutdown()


def learned(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in row.items() if not k.startswith(VARYING)} for row in RunDir(run_dir).read_metrics()]


def assert_same_as(run_dir: Path, reference: Path) -> dict:
    """Every step once, the reference's learned metrics and adapter bits; the last row."""
    rows = RunDir(run_dir).read_metrics()
    assert [r["step"] for r in rows] == list(range(STEPS + 1))
    assert learned(run_dir) == learned(reference)
    got, want = final_adapter(run_dir), final_adapter(reference)
    assert got.keys() == want.keys() and all((got[k] == want[k]).all() for k in want)
    return rows[-1]


def events(run_dir: Path, rule: str) -> list[dict]:
    return [e for e in map(json.loads, (run_dir / "events.jsonl").read_text().splitlines()) if e["rule"] == rule]


@pytest.fixture(scope="module")
def reference(ray_cluster, tiny_model_path, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("fault_free")
    run(trainer(tiny_model_path, run_dir))
    return run_dir


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGSTOP], ids=["killed", "hung"])
def test_a_generator_killed_or_hung_mid_rollout_is_replaced_and_its_chunk_reissued(reference, tiny_model_path, tmp_path, signum):
    """Step 2's chunks are sent; generator 1 is then SIGKILLed (found dead at once) or
    SIGSTOPped (found hung when its call passes ``generator.call_timeout_s``)."""
    t = trainer(tiny_model_path, tmp_path, "generator.call_timeout_s=8")
    victim = pid(t.crew.generators.handles[1])

    def submit_then_break(submit, *args, **kwargs):
        requests = submit(*args, **kwargs)
        os.kill(victim, signum)
        return requests

    last = run_with_fault(t, t.crew.generators, "submit", 1, submit_then_break, reference)
    assert last["faults/generator_restarts"] == 1 and last["faults/requests_reissued"] == 1
    assert last["faults/generator_seconds_lost"] >= (8 if signum == signal.SIGSTOP else 0)
    assert [e["step"] for e in events(tmp_path, "actor_faults")] == [2]
    assert gone(victim, within_s=30), f"generator process {victim} outlived its replacement"


def gone(pid: int, within_s: float) -> bool:
    """The process has exited (or is a zombie) within ``within_s`` seconds."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/status").read_text().split("State:")[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return True
        if state == "Z":
            return True
        time.sleep(0.5)
    return False


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGSTOP], ids=["dies", "times_out"])
def test_a_generator_lost_during_a_weight_broadcast_is_replaced_with_the_new_weights(reference, tiny_model_path, tmp_path, signum):
    """Generator 1 is frozen before step 2's weights are pushed, so the push cannot land;
    then it is killed (its load fails) or left frozen (its load passes
    ``generator.broadcast_timeout_s``). Its replacement starts with step 2's weights."""
    t = trainer(tiny_model_path, tmp_path, "generator.broadcast_timeout_s=8")
    victim = pid(t.crew.generators.handles[1])

    def push_to_a_frozen_generator(push, *args, **kwargs):
        os.kill(victim, signal.SIGSTOP)
        push(*args, **kwargs)
        if signum == signal.SIGKILL:
            os.kill(victim, signal.SIGKILL)

    last = run_with_fault(t, t.crew.generators, "push", 1, push_to_a_frozen_generator, reference)
    assert last["faults/generator_restarts"] == 1 and last["faults/requests_reissued"] == 0
    assert [e["step"] for e in events(tmp_path, "actor_faults")] == [2]


def test_a_generator_serving_the_wrong_policy_is_reloaded(reference, tiny_model_path, tmp_path):
    """After step 2's broadcast is confirmed, generator 1 is given the untrained weights
    behind the pool's back: its step-3 samples say version 0, not 2; the pool sends it
    version 2 again and re-issues the chunk."""
    t = trainer(tiny_model_path, tmp_path)
    untrained = t.crew.learners.weight_update()

    def confirm_then_corrupt(confirm, *args, **kwargs):
        confirm(*args, **kwargs)
        assert ray.get(t.crew.generators.handles[1].load_weights.remote(untrained)).version == 0

    last = run_with_fault(t, t.crew.generators, "confirm", 1, confirm_then_corrupt, reference)
    assert last["faults/weight_reloads"] == 1 and last["faults/requests_reissued"] == 1 and last["faults/generator_restarts"] == 0


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGSTOP], ids=["killed", "hung"])
def test_a_learner_rank_killed_or_hung_mid_step_rebuilds_the_group_from_the_checkpoint(reference, tiny_model_path, tmp_path, signum):
    """Learner rank 1 is SIGKILLed or SIGSTOPped as step 3 is handed to the group: rank 0
    would wait for it in the gradient all-reduce. The driver finds the dead rank at once, or
    the frozen one when it misses a ping (``learner.heartbeat_s``, long before the call's
    deadline), kills the group, builds a new one, restores step 2's checkpoint and runs step
    3 again."""
    t = trainer(tiny_model_path, tmp_path, "learner.heartbeat_s=3")
    victim = pid(t.crew.learners.actors[1])

    def break_rank_1_then_step(step, *args, **kwargs):
        os.kill(victim, signum)
        return step(*args, **kwargs)

    last = run_with_fault(t, t.crew.learners, "step", 2, break_rank_1_then_step, reference)
    assert last["faults/learner_recoveries"] == 1 and last["faults/generator_restarts"] == 0
    [recovery] = events(tmp_path, "learner_recovery")
    assert recovery["step"] == 3 and recovery["evidence"]["resumed_at_step"] == 2
    if signum == signal.SIGKILL:
        assert "learner rank 1 died during a training step" in recovery["message"]
    else:
        assert "rank 1 did not answer (learner.heartbeat_s=3s) during a training step: frozen or gone" in recovery["message"]
    assert gone(victim, within_s=30)


def test_learner_recoveries_are_bounded(ray_cluster, tiny_model_path, tmp_path):
    """With ``learner.max_recoveries=0`` the first lost rank stops the run with a clear error."""
    from actors.learner import LearnerFailure

    t = trainer(tiny_model_path, tmp_path, "learner.max_recoveries=0", "learner.num_learners=1", "generator.num_generators=1")
    os.kill(pid(t.crew.learners.actors[0]), signal.SIGKILL)
    with pytest.raises(LearnerFailure, match=r"learner rank 0 died during .*learner.max_recoveries=0 recoveries are used up"):
        run(t)


def test_losing_every_generator_past_the_grace_period_stops_with_a_checkpoint_and_resumes(reference, tiny_model_path, tmp_path):
    """After step 2's broadcast both generators are SIGKILLed and no replacement can be placed
    (they ask for a resource no node has): after ``generator.grace_s`` the run stops, with
    step 2 checkpointed and a message saying how to go on; resumed, it ends as the reference."""
    t = trainer(tiny_model_path, tmp_path, "generator.grace_s=5")
    victims = [pid(h) for h in t.crew.generators.handles]

    def confirm_then_lose_all(confirm, *args, **kwargs):
        confirm(*args, **kwargs)
        for victim in victims:
            os.kill(victim, signal.SIGKILL)
        t.crew.generators.factory = lambda rank, asleep: generator_actor().options(resources={"no_such_node": 1}).remote("nowhere", None, seed=0, max_lora_rank=8)

    fired = break_once(t, t.crew.generators, "confirm", 1, confirm_then_lose_all)
    with pytest.raises(GeneratorsLost, match=r"no generator has been up for \d+s \(generator.grace_s=5\).*stopped after step 2, checkpointed; continue it with `raylight resume"):
        run(t)
    assert fired and [c.step for c in t.keeper.checkpoints.complete()] == [1, 2]
    assert [e["step"] for e in events(tmp_path, "generators_lost")] == [3]
    resumed = Trainer.resume(tmp_path, scorer=spread_reward)
    run(resumed)
    assert_same_as(tmp_path, reference)


def test_an_async_run_absorbs_a_lost_generator_and_a_lost_learner_rank_without_losing_a_prompt(reference, tiny_model_path, tmp_path):
    """Async mode (k = 1) is not deterministic (which policy version generates a chunk depends
    on timing), so the tolerance is what the mode promises: after a generator SIGKILLed right
    after a submission and a learner rank SIGKILLed at step 3 (the group rebuilt from step 2's
    checkpoint while the producer held prompts drawn ahead), every step is trained once, on
    exactly the fault-free run's prompts (none lost, none repeated), with samples at most one
    version stale."""
    from test_async import prompts_by_step

    t = trainer(tiny_model_path, tmp_path, "rollout.mode=async", "rollout.max_staleness=1")
    generator, rank_1 = pid(t.crew.generators.handles[1]), pid(t.crew.learners.actors[1])

    def submit_then_kill(submit, *args, **kwargs):
        requests = submit(*args, **kwargs)
        os.kill(generator, signal.SIGKILL)
        return requests

    def kill_rank_1_then_step(step, *args, **kwargs):
        os.kill(rank_1, signal.SIGKILL)
        return step(*args, **kwargs)

    fired = [break_once(t, t.crew.generators, "submit", 1, submit_then_kill), break_once(t, t.crew.learners, "step", 2, kill_rank_1_then_step)]
    run(t)
    assert all(fired)
    rows = RunDir(tmp_path).read_metrics()
    assert [r["step"] for r in rows] == list(range(STEPS + 1))
    assert [r["policy_version"] for r in rows[1:]] == [1, 2, 3]
    assert all(r["train/staleness_max"] <= 1 and r["train/stale_dropped"] == 0 for r in rows[1:])
    assert prompts_by_step(tmp_path) == prompts_by_step(reference)
    last = rows[-1]
    assert last["faults/generator_restarts"] == 1 and last["faults/requests_reissued"] >= 1 and last["faults/learner_recoveries"] == 1
