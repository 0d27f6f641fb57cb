"""A shared generator pool (``actors.pool``) on the session's real Ray cluster, with the real
vLLM CPU engine serving the tiny random model's adapters as LoRAs (fp32):

- runs attach with their own adapters (as LoRAs side by side, or merged in per call: the CPU
  default); each request runs on its run's adapter, and samples come back under the run's
  own adapter name and version; an attach past ``max_loras`` (LoRAs) or for another base
  model is refused with a clear error;
- weighted fair sharing: a run that queues 10x the work of another does not starve it;
- a detached run's adapter leaves every engine while the other run goes on;
- training runs as separate driver processes share one pool; one is SIGKILLed mid-run, the
  other two finish every step without a fault, and the killed run's adapter is dropped.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import ray
import torch

from actors.pool import PoolClient, PoolRefused, Tenancy
from cluster.config import load_config
from cluster.loop.wiring import start_pool
from contracts import PolicyRef, Problem, Prompt, SamplingSettings, WeightUpdate
from helpers import driver_command
from learners.policy import LoraSettings, Policy
from rollout.generator import BASE_POLICY

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

PROBLEM = Problem(uid="p", question="q", answer="1")
PROMPTS = [Prompt(PROBLEM, "q", (1, 5, 9, 13 + i)) for i in range(2)]
GREEDY = SamplingSettings(n=1, temperature=0.0, top_p=1.0, max_tokens=12, min_tokens=12)


def adapter_update(policy: Policy, version: int, noise: float) -> WeightUpdate:
    """``policy``'s adapter as version ``version`` of the run's own adapter name, its LoRA B
    matrices ``noise``-random (0: the base model exactly)."""
    state = policy.weight_state()
    if noise:
        gen = torch.Generator().manual_seed(version)
        state = {k: torch.randn(v.shape, generator=gen) * noise if "lora_B" in k else v for k, v in state.items()}
    return WeightUpdate(PolicyRef("policy", version), state, policy.adapter_config())


def pool_config(tiny_model_path: str, *overrides: str):
    return load_config(ROOT / "configs" / "tiny.yaml", [f"model.path={tiny_model_path}", "generator.max_loras=2", *overrides])


def tenancy(tiny_model_path: str, run: str, **kw) -> Tenancy:
    return Tenancy(run, run, tiny_model_path, 8, **kw)


def ids(samples) -> list:
    return [s.completion.token_ids for s in samples]


@pytest.mark.parametrize("mode", ["lora", "merged"])
def test_runs_get_their_own_adapters_and_a_fair_share(ray_cluster, tiny_model_path, mode):
    """``lora``: the adapters side by side (at most ``max_loras``); ``merged`` (the CPU
    default): each adapter merged in for the calls that name it."""
    name = f"test-{uuid.uuid4().hex[:6]}"
    server = start_pool(pool_config(tiny_model_path, f"generator.adapter_mode={mode}"), tiny_model_path, name, detach_after_s=15.0)
    policy = Policy(tiny_model_path, LoraSettings(rank=8, alpha=16))
    plain = PoolClient(server, tenancy(tiny_model_path, "plain"))
    noisy = PoolClient(server, tenancy(tiny_model_path, "noisy"))
    try:
        plain.broadcast(ray.put(adapter_update(policy, 3, 0.0)), PolicyRef("policy", 3))
        noisy.broadcast(ray.put(adapter_update(policy, 7, 0.5)), PolicyRef("policy", 7))
        with pytest.raises(PoolRefused, match="base model"):
            PoolClient(server, Tenancy("other", "other", "/elsewhere/model", 8))

        mine, theirs = plain.generate(PROMPTS, GREEDY), noisy.generate(PROMPTS, GREEDY)
        assert {s.policy for s in mine} == {PolicyRef("policy", 3)} and {s.policy for s in theirs} == {PolicyRef("policy", 7)}
        assert ids(theirs) != ids(mine)  # the noisy run's adapter changes the text
        if mode == "merged":  # swapped back in, the zero adapter gives its text again
            assert ids(plain.generate(PROMPTS, GREEDY)) == ids(mine)
            # no limit but host memory; shares 1 : 3 give about three calls to one
            one = PoolClient(server, tenancy(tiny_model_path, "one", share=1.0, max_in_flight=8))
            three = PoolClient(server, tenancy(tiny_model_path, "three", share=3.0, max_in_flight=8))
            plain.kill()
            noisy.kill()
            for client in (one, three):
                client.broadcast(ray.put(adapter_update(policy, 1, 0.0)), PolicyRef("policy", 1))
            queued = {run: ray.get(server.submit.remote(run, client._token, [(PROMPTS, GREEDY, run)] * 8)) for run, client in (("one", one), ("three", three))}
            starts = []
            for run, client in (("one", one), ("three", three)):
                waiting = list(queued[run])
                while waiting:
                    done = ray.get(server.collect.remote(run, client._token, waiting, 30.0))["done"]
                    starts += [(span[0], run) for _, span in done.values()]
                    waiting = [i for i in waiting if i not in done]
            order = [run for _, run in sorted(starts)]
            after = order[order.index("three") :][:10]
            assert after.count("three") >= 7, order
            one.kill()
            three.kill()
            return
        with pytest.raises(PoolRefused, match="max_loras"):
            PoolClient(server, tenancy(tiny_model_path, "third"))
        # the zero adapter is the base model exactly
        assert ids(mine) == ids(plain.generate(PROMPTS, GREEDY, BASE_POLICY))

        # one run queues 10x the other's work, the other comes just after: its call starts on
        # the engine within the first few, not behind all ten (first come, first served)
        long = SamplingSettings(n=1, temperature=0.0, top_p=1.0, max_tokens=64, min_tokens=64)
        heavy = [plain.submit(PROMPTS, long)[0] for _ in range(10)]
        light = noisy.submit(PROMPTS, long)[0]
        noisy.result(light)
        for request in heavy:
            plain.result(request)
        before = sum(r.span[0] < light.span[0] for r in heavy)
        assert before <= 4, f"{before} of the heavy run's 10 calls started before the light run's one"
        now = time.time()
        light_metrics, heavy_metrics = noisy.metrics(now - 120, now), plain.metrics(now - 120, now)
        assert light_metrics["pool/noisy/wait_seconds"] < heavy_metrics["pool/plain/wait_seconds"]
        assert 0 < light_metrics["pool/noisy/busy_share"] < heavy_metrics["pool/plain/busy_share"]

        # a call the engine refuses (a prompt past max_model_len) fails its own run, not the pool
        too_long = [Prompt(PROBLEM, "q", tuple(range(1, 300)))]
        with pytest.raises(RuntimeError, match="failed in a generate call"):
            noisy.generate(too_long, GREEDY)
        assert {s.policy for s in plain.generate(PROMPTS, GREEDY)} == {PolicyRef("policy", 3)}

        # a run that leaves takes its adapter with it; the other goes on
        noisy.kill()
        status = ray.get(server.status.remote())
        assert list(status["runs"]) == ["plain"] and [g["adapters"] for g in status["generators"]] == [{"plain": 3}]
        assert ids(plain.generate(PROMPTS, GREEDY)) == ids(mine)
    finally:
        plain.kill()
        noisy.kill()
        ray.get(server.stop.remote())
        ray.kill(server)


def test_three_runs_share_a_pool_and_one_killed_leaves_the_others_unharmed(ray_cluster, tiny_model_path, tmp_path):
    """Three training drivers (separate processes, the tiny config, 3 steps) attach to one pool;
    the first is SIGKILLed once it has trained a step (mid-run: it was to train 50). The other two finish every step, with
    no generator fault, and the killed run's adapter leaves the pool once it is not heard from."""
    name = f"test-{uuid.uuid4().hex[:6]}"
    server = start_pool(pool_config(tiny_model_path, "generator.max_loras=3"), tiny_model_path, name, detach_after_s=15.0)
    drivers = {}
    try:
        for run in ("killed", "a", "b"):
            steps = 50 if run == "killed" else 3  # the killed run is surely mid-run when it dies
            overrides = [f"model.path={tiny_model_path}", f"generator.pool={name}", f"run.run_dir={tmp_path / run}", "eval.n=4", f"run.steps={steps}"]
            argv, env = driver_command(ROOT / "configs" / "tiny.yaml", overrides)
            drivers[run] = subprocess.Popen(argv, cwd=ROOT, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=open(tmp_path / f"{run}.log", "w"))
        marker = tmp_path / "killed" / "metrics.jsonl"
        deadline = time.monotonic() + 300
        while not (marker.exists() and len(marker.read_text().splitlines()) >= 2) and time.monotonic() < deadline and drivers["killed"].poll() is None:
            time.sleep(0.2)  # its first step trained
        assert marker.exists() and len(marker.read_text().splitlines()) >= 2, (tmp_path / "killed.log").read_text()[-3000:]
        os.killpg(drivers["killed"].pid, signal.SIGKILL)
        for run in ("a", "b"):
            assert drivers[run].wait(timeout=600) == 0, (tmp_path / f"{run}.log").read_text()[-3000:]
            rows = [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
            steps = [r for r in rows if "train/reward_mean" in r]
            assert [r["step"] for r in steps] == [1, 2, 3]
            assert all(r["faults/generator_restarts"] == 0 and r["faults/requests_reissued"] == 0 for r in steps)
            assert any(k.startswith("pool/") and k.endswith("/busy_share") for k in steps[-1])
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            status = ray.get(server.status.remote())
            if not any(run.endswith("killed") for run in status["runs"]):
                break
            time.sleep(1)
        assert not any(run.endswith("killed") for run in status["runs"])
        assert status["stats"]["faults/generator_restarts"] == 0 and status["stats"]["faults/requests_reissued"] == 0
        assert not any(a.startswith("killed-") for g in status["generators"] for a in g["adapters"])
    finally:
        for driver in drivers.values():
            if driver.poll() is None:
                os.killpg(driver.pid, signal.SIGKILL)
        ray.get(server.stop.remote())
        ray.kill(server)


def test_a_run_whose_pool_dies_stops_with_a_checkpoint_and_resumes_on_a_new_pool(ray_cluster, tiny_model_path, tmp_path):
    """The pool's actor is killed once the attached run has trained a step: the run stops as a
    run that lost its generators does (checkpoint, ``raylight resume`` named); resumed once a
    pool of the same name runs again, it takes its place there and trains the remaining steps
    exactly once each."""
    import threading

    from actors.generator import GeneratorsLost
    from cluster.keeping.rundir import RunDir
    from cluster.loop.driver import Trainer
    from helpers import spread_reward

    name = f"test-{uuid.uuid4().hex[:6]}"
    config_overrides = [f"generator.pool={name}", f"run.run_dir={tmp_path / 'run'}", "eval.n=4", "run.steps=4", "run.checkpoint_every=1"]
    server = start_pool(pool_config(tiny_model_path), tiny_model_path, name, detach_after_s=15.0)
    metrics = tmp_path / "run" / "metrics.jsonl"

    def kill_after_a_step():
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
            time.sleep(0.1)
        ray.kill(server)

    killer = threading.Thread(target=kill_after_a_step, daemon=True)
    killer.start()
    trainer = Trainer(pool_config(tiny_model_path, *config_overrides), RunDir(tmp_path / "run"), scorer=spread_reward)
    try:
        with pytest.raises(GeneratorsLost, match="raylight resume"):
            trainer.train(4)
    finally:
        trainer.shutdown()
    stopped_at = trainer.run.step
    assert 1 <= stopped_at < 4 and (tmp_path / "run" / "checkpoints" / f"step_{stopped_at:06d}" / "COMPLETE.json").exists()

    server = start_pool(pool_config(tiny_model_path), tiny_model_path, name, detach_after_s=15.0)
    try:
        resumed = Trainer.resume(tmp_path / "run", scorer=spread_reward)
        try:
            resumed.train(4)
        finally:
            resumed.shutdown()
        rows = [json.loads(line) for line in metrics.read_text().splitlines()]
        assert [r["step"] for r in rows if "train/reward_mean" in r] == [1, 2, 3, 4]
    finally:
        ray.get(server.stop.remote())
        ray.kill(server)


def test_a_sweep_runs_its_grid_at_once_on_one_pool_and_compares_the_runs(ray_cluster, tiny_model_path, tmp_path):
    """``raylight sweep`` with ``--pool``: it starts the pool (none of that name runs), runs the
    grid's two runs at once attached to it, stops it, and writes the comparison."""
    from actors.pool import find_pool

    name = f"sweep-{uuid.uuid4().hex[:6]}"
    argv = [sys.executable, "-m", "cluster.commands.cli", "sweep", str(ROOT / "configs" / "tiny.yaml"), "--grid", "algorithm.lr=1e-3,5e-3",
            "--pool", name, "--out", str(tmp_path / "sweep"), f"model.path={tiny_model_path}", "eval.n=4", "run.steps=2"]  # fmt: skip
    _, env = driver_command(ROOT / "configs" / "tiny.yaml", [])
    done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    for run in ("lr=1e-3", "lr=5e-3"):
        rows = [json.loads(line) for line in (tmp_path / "sweep" / run / "metrics.jsonl").read_text().splitlines()]
        steps = [r for r in rows if "train/reward_mean" in r]
        assert [r["step"] for r in steps] == [1, 2] and steps[-1]["pool/runs"] >= 1
        assert steps[-1]["train/lr"] == pytest.approx(float(run.split("=")[1]), rel=0.5)  # each run trained with its own value
    table = (tmp_path / "sweep" / "comparison.md").read_text()
    assert "| lr=1e-3 | 0.001 |" in table and "| lr=5e-3 | 0.005 |" in table
    with pytest.raises(PoolRefused, match="no generator pool"):
        find_pool(name)  # the sweep started it, so it stopped it
