"""Stream serving (continuous batching) and partial rollouts, on the real vLLM CPU engine with
the tiny random model in fp32: calls join the running batch, loads take their place by the
pool's numbers, a partial-rollout load resumes the running sequences on the new weights with
every token's log-prob from the policy that sampled it; on a real Ray cluster, a streaming
pool survives a weight update lost with its maker."""

from __future__ import annotations

import dataclasses
import sys
import threading
import time

import pytest
import ray
import torch

from contracts import PolicyRef, Problem, Prompt, SamplingSettings, WeightUpdate
from learners.policy import LoraSettings, Policy
from rollout.engines import EngineSettings
from rollout.generator import Generator

pytestmark = pytest.mark.slow

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

PROBLEM = Problem(uid="p", question="q", answer="1")
PROMPTS = [Prompt(PROBLEM, "q", (1, 5, 9, 13 + i)) for i in range(3)]
LONG = SamplingSettings(n=2, temperature=1.0, top_p=1.0, max_tokens=160, min_tokens=160)


def update(policy: Policy, version: int, noise: float = 0.0) -> WeightUpdate:
    """``policy``'s adapter as version ``version``, its LoRA B matrices ``noise``-random."""
    state = policy.weight_state()
    if noise:
        gen = torch.Generator().manual_seed(version)
        state = {k: torch.randn(v.shape, generator=gen) * noise if "lora_B" in k else v for k, v in state.items()}
    return WeightUpdate(PolicyRef("default", version), state, policy.adapter_config())


@pytest.fixture(scope="module")
def served(tiny_model_path):
    policy = Policy(tiny_model_path, LoraSettings(rank=8, alpha=16))
    settings = EngineSettings(serving="stream", dtype="float32", kv_cache_gib=1, max_model_len=512)
    generator = Generator(tiny_model_path, settings, seed=0, max_lora_rank=8, partial=True)
    generator.load_weights(update(policy, 0))
    yield generator, policy
    generator._stream.close()


class Numbered:
    """The pool's numbering of one generator's calls."""

    def __init__(self, generator: Generator):
        self.generator, self.next = generator, generator._stream._next

    def take(self) -> int:
        self.next += 1
        return self.next - 1


def in_thread(fn) -> tuple[threading.Thread, dict]:
    out: dict = {}

    def run():
        out["value"] = fn()
        out["at"] = time.monotonic()

    thread = threading.Thread(target=run)
    thread.start()
    return thread, out


def test_a_call_joins_the_running_batch_and_returns_before_it(served):
    generator, _ = served
    seq = Numbered(generator)
    long, long_out = in_thread(lambda: generator.generate(PROMPTS, LONG, seq=seq.take()))
    time.sleep(0.3)
    assert long.is_alive()
    short = dataclasses.replace(LONG, n=1, max_tokens=4, min_tokens=4)
    samples = generator.generate(PROMPTS[:1], short, seq=seq.take())
    done = time.monotonic()
    assert long.is_alive(), "the short call waited for the long one (no continuous batching)"
    long.join()
    assert [len(s.completion.token_ids) for s in samples] == [4]
    assert [len(s.completion.token_ids) for s in long_out["value"]] == [160] * 6
    assert long_out["at"] > done


def test_a_call_for_another_adapter_waits_where_adapters_cannot_share_a_batch(served):
    """A shared pool's generator holding two adapters merged in per call (the CPU default:
    they cannot share a batch): a call for the second adapter waits until the first adapter's
    running sequences are done, then runs on its own weights, under its own name."""
    generator, policy = served
    seq = Numbered(generator)
    other = dataclasses.replace(update(policy, 4, noise=0.5), policy=PolicyRef("other", 4))
    generator.load_weights(other, seq=seq.take())
    try:
        assert not generator.engine.mixes_adapters and set(generator.adapters()) == {"default", "other"}
        long, long_out = in_thread(lambda: generator.timed_generate(PROMPTS, LONG, "default", seq=seq.take()))
        time.sleep(0.3)
        short = dataclasses.replace(LONG, n=1, max_tokens=4, min_tokens=4)
        samples, started, _ = generator.timed_generate(PROMPTS[:1], short, "other", seq=seq.take())
        long.join()
        first, first_started, first_finished = long_out["value"]
        assert [s.policy for s in samples] == [PolicyRef("other", 4)] and {s.policy.adapter for s in first} == {"default"}
        # it started once the first adapter's sequences were done (joining them, it would have
        # started 0.3 s into a call of 6 x 160 tokens)
        assert started - first_started > 0.8 * (first_finished - first_started) > 0.3
    finally:
        generator.drop_adapter("other", seq=seq.take())
    assert set(generator.adapters()) == {"default"}


def test_calls_run_in_the_order_the_pool_numbered_them(served, monkeypatch):
    """A generate call that arrives before the load numbered ahead of it waits for the load,
    also while the load's place is only held (its update still being fetched); a load that
    gives up its place lets the calls behind it run; a number that never comes is skipped
    after ``GAP_S``, and the call, if it comes after all, runs as it comes."""
    from rollout import serving

    generator, policy = served
    seq = Numbered(generator)
    load_at, generate_at = seq.take(), seq.take()
    short = dataclasses.replace(LONG, n=1, max_tokens=3, min_tokens=0)
    thread, out = in_thread(lambda: generator.generate(PROMPTS[:1], short, seq=generate_at))
    place = generator.hold(load_at)
    time.sleep(0.3)
    assert thread.is_alive()
    assert generator.load_weights(update(policy, 7), seq=place).version == 7
    thread.join()
    assert out["value"][0].policy.version == 7
    generator.skip(generator.hold(seq.take()))  # a load whose update could not be fetched gives up its place
    assert generator.generate(PROMPTS[:1], short, seq=seq.take())[0].policy.version == 7

    monkeypatch.setattr(serving, "GAP_S", 0.5)
    lost, behind = seq.take(), seq.take()
    assert generator.generate(PROMPTS[:1], short, seq=behind)[0].policy.version == 7  # waited GAP_S for `lost`
    assert generator.stream_stats()["skipped"] >= 1
    assert generator.generate(PROMPTS[:1], short, seq=lost)[0].policy.version == 7


def test_a_failed_partial_load_ends_the_stopped_sequences_as_neither_policys(served, monkeypatch):
    """A partial-rollout load that fails after it stopped the running sequences (a streamed
    update's bucket lost) ends them where they were, tagged version -1 (the pool reloads and
    re-issues such a call); the generator serves the next load as usual."""
    generator, policy = served
    seq = Numbered(generator)
    generator.load_weights(update(policy, 20), seq=seq.take())
    thread, out = in_thread(lambda: generator.generate(PROMPTS[:1], LONG, seq=seq.take()))
    time.sleep(0.5)
    with monkeypatch.context() as patched:
        patched.setattr(generator.engine, "load_weights", lambda update: (_ for _ in ()).throw(RuntimeError("a bucket was lost")))
        with pytest.raises(RuntimeError, match="a bucket was lost"):
            generator.load_weights(update(policy, 21), seq=seq.take())
    thread.join()
    assert {s.policy.version for s in out["value"]} == {-1}
    assert all(s.completion.finish_reason == "abort" and 0 < len(s.completion.token_ids) < 160 for s in out["value"])
    assert generator.load_weights(update(policy, 22), seq=seq.take()).version == 22
    assert {s.policy.version for s in generator.generate(PROMPTS[:1], dataclasses.replace(LONG, max_tokens=4, min_tokens=4), seq=seq.take())} == {22}


def test_a_load_waits_for_the_running_sequences_unless_partial(served):
    """Without partial rollouts a load lands after the sequences running finish (each sample
    one policy's); with them, it aborts and resumes them on the new weights: each token's
    log-prob is the policy's that sampled it (scored again by the engine under each policy),
    its version in ``Completion.versions``, the sample's policy the oldest."""
    generator, policy = served
    seq = Numbered(generator)
    generator.load_weights(update(policy, 10, noise=0.5), seq=seq.take())

    generator.partial = False
    thread, out = in_thread(lambda: generator.generate(PROMPTS, LONG, seq=seq.take()))
    time.sleep(0.5)
    generator.load_weights(update(policy, 11, noise=0.5), seq=seq.take())
    thread.join()
    assert {s.policy.version for s in out["value"]} == {10}
    assert all(s.completion.versions == () for s in out["value"])
    tokenizer = generator.engine.llm.get_tokenizer()
    assert all(s.completion.text == tokenizer.decode(s.completion.token_ids, skip_special_tokens=True) for s in out["value"])

    generator.partial = True
    resumed = generator.stream_stats().get("resumed", 0)
    # a stop string that never matches: vLLM holds back its length of text while a sequence
    # runs, which the abort must not lose
    stopping = dataclasses.replace(LONG, stop=("@@@@@@@@@@@@",))
    thread, out = in_thread(lambda: generator.generate(PROMPTS, stopping, seq=seq.take()))
    time.sleep(0.5)
    generator.load_weights(update(policy, 12, noise=0.5), seq=seq.take())
    thread.join()
    samples = out["value"]
    assert generator.stream_stats()["resumed"] == resumed + len(samples)
    for sample in samples:
        c = sample.completion
        assert sample.policy.version == 11 and len(c.token_ids) == len(c.logprobs) == len(c.versions) == 160
        switch = c.versions.index(12)
        assert 0 < switch and set(c.versions[:switch]) == {11} and set(c.versions[switch:]) == {12}
        assert c.text == tokenizer.decode(c.token_ids, skip_special_tokens=True)
    # each token scored again under the policy that sampled it, and under the other one
    sequences = [s.prompt.token_ids + s.completion.token_ids for s in samples]
    starts = [len(s.prompt.token_ids) for s in samples]
    under_12 = generator._stream.run(seq.take(), lambda: generator.engine.score_tokens(sequences, starts))
    generator.load_weights(update(policy, 11, noise=0.5), seq=seq.take())
    under_11 = generator._stream.run(seq.take(), lambda: generator.engine.score_tokens(sequences, starts))
    for sample, new, old in zip(samples, under_12, under_11):
        c, switch = sample.completion, sample.completion.versions.index(12)
        sampled = torch.tensor(c.logprobs)
        assert torch.allclose(sampled[:switch], torch.tensor(old[:switch]), atol=1e-3)
        assert torch.allclose(sampled[switch:], torch.tensor(new[switch:]), atol=1e-3)
        assert not torch.allclose(sampled[switch:], torch.tensor(old[switch:]), atol=1e-2)  # the two policies differ


def test_a_streaming_pool_survives_an_update_lost_with_its_maker(ray_cluster, tiny_model_path):
    """The pool numbers its calls and sends a streaming generator the update's reference
    inside a list: a load whose update is gone with its maker fails as ``WeightUpdateLost``
    (the run's to answer) and gives up its number, so the next load and generate still run."""
    from actors.generator import GeneratorPool, WeightUpdateLost
    from cluster.config import load_config
    from cluster.loop.wiring import engine_settings, start_generator
    from helpers import kill_actor, wait_until_lost

    config = load_config("configs/tiny.yaml", [f"model.path={tiny_model_path}", "generator.serving=stream", "generator.kv_cache_gib=1", "generator.max_model_len=256"])
    assert engine_settings(config).serving == "stream"
    start = lambda rank, asleep: start_generator(config, tiny_model_path, rank=rank, asleep=asleep)  # noqa: E731
    pool = GeneratorPool([start(0, False)], config.generator, factory=start, streaming=True)
    maker = ray_cluster.remote(num_cpus=0)(_Maker).remote(tiny_model_path)
    try:
        pool.broadcast(ray_cluster.put(update(Policy(tiny_model_path, LoraSettings(rank=8, alpha=16)), 1)), PolicyRef("default", 1))
        [lost] = ray_cluster.get(maker.update.remote(2))  # put by the maker: gone with it
        kill_actor(maker)
        wait_until_lost(lost)
        with pytest.raises(WeightUpdateLost, match="could not fetch the weight update"):
            pool.broadcast(lost, PolicyRef("default", 2))
        newer = update(Policy(tiny_model_path, LoraSettings(rank=8, alpha=16)), 3)
        pool.broadcast(ray_cluster.put(newer), newer.policy)
        short = SamplingSettings(n=2, temperature=1.0, top_p=1.0, max_tokens=4)
        assert {s.policy for s in pool.generate(PROMPTS, short)} == {newer.policy}
        assert pool.stats["faults/generator_restarts"] == 0
    finally:
        pool.kill()


class _Maker:
    """An actor that makes weight updates (the learner's part), to be killed."""

    def __init__(self, path: str):
        self.policy = Policy(path, LoraSettings(rank=8, alpha=16))

    def update(self, version: int) -> list:
        return [ray.put(update(self.policy, version))]
