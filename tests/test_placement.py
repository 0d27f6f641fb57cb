"""Placement groups: the bundles each layout asks for, the config combinations that cannot
work, and runs whose actors land in their bundles (CPU bundles here: what cannot run on
this machine is a GPU bundle; the same code adds the GPU to each bundle and request)."""

import json
import time

import pytest
import ray

from cluster.config import ConfigError, load_config
from cluster.loop.placement import PlacementError, Request, bundles, check_model_on_nodes, place


def test_disaggregated_gives_each_learner_and_generator_a_bundle():
    config = load_config(None, ["learner.num_learners=2", "learner.num_gpus=1", "generator.num_generators=3",
                                "generator.num_gpus=2", "generator.tensor_parallel_size=2", "generator.resources={gen: 1}"])  # fmt: skip
    specs, learners, generators = bundles(config)
    assert specs == [{"CPU": 1.0, "GPU": 1.0}] * 2 + [{"CPU": 0.5, "gen": 1.0, "GPU": 2.0}] * 3
    assert learners == [(0, Request(1.0, 1.0)), (1, Request(1.0, 1.0))]
    assert generators == [(2, Request(0.5, 2.0)), (3, Request(0.5, 2.0)), (4, Request(0.5, 2.0))]


def test_colocated_pairs_a_learner_and_a_generator_on_one_device():
    config = load_config(None, ["cluster.placement=colocated", "learner.num_learners=2", "generator.num_generators=2",
                                "learner.num_gpus=1", "generator.num_gpus=1", "generator.sleep_mode=true"])  # fmt: skip
    specs, learners, generators = bundles(config)
    assert specs == [{"CPU": 1.5, "GPU": 1.0}] * 2
    # half the slot's GPU each: Ray hands both actors the same device
    assert learners == [(0, Request(1.0, 0.5)), (1, Request(1.0, 0.5))]
    assert generators == [(0, Request(0.5, 0.5)), (1, Request(0.5, 0.5))]


@pytest.mark.parametrize(
    "overrides, culprit",
    [
        (["cluster.placement=colocated", "generator.num_generators=2"], "learner.num_learners (1) must equal generator.num_generators (2)"),
        (["cluster.placement=colocated", "learner.num_gpus=1"], "set learner.num_gpus and generator.num_gpus both to 1"),
        (["cluster.placement=colocated", "learner.num_gpus=1", "generator.num_gpus=1"], "set generator.sleep_mode=true, or generator.gpu_memory_utilization <= 0.6"),
        (["generator.tensor_parallel_size=2"], "set generator.num_gpus=2"),
        (["generator.sleep_mode=true"], "generator.sleep_mode releases GPU memory: it needs GPU generators"),
        (["generator.sleep_mode=true", "generator.engine=hf", "rollout.mode=async", "rollout.max_staleness=1"], "needs rollout.mode=sync"),
        (["generator.sleep_level=2"], "use generator.sleep_level=1"),
        (["generator.sleep_level=3"], r"generator.sleep_level: 3 is not one of \[1, 2\]"),
    ],
)
def test_placements_that_cannot_work_name_the_keys(overrides, culprit):
    with pytest.raises(ConfigError, match=culprit.replace("(", r"\(").replace(")", r"\)")):
        load_config(None, overrides)


def test_a_cluster_too_small_for_the_bundles_is_told_at_once(ray_cluster):
    config = load_config(None, ["learner.num_gpus=1", "learner.num_learners=2"])
    with pytest.raises(PlacementError, match=r"needs \{'CPU': 2.5, 'GPU': 2.0\} in all, but the Ray cluster has .*short of \['GPU'\]"):
        place(config)


def test_a_model_folder_missing_on_a_node_is_named(ray_cluster, tmp_path):
    """Here every node shares one file system: a folder without config.json stands in for one
    a node cannot read (the multi-node test hides a folder from a real second node)."""
    (tmp_path / "model").mkdir()
    node = ray.get_runtime_context().get_node_id()
    with pytest.raises(PlacementError, match=rf"model.path {tmp_path / 'model'} cannot be read on node .* \(node id {node}\)"):
        check_model_on_nodes(str(tmp_path / "model"), [node])
    check_model_on_nodes("org/hub-name", [node])  # a Hub name: each node fetches it, nothing to check


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["disaggregated", "colocated"])
def test_a_run_places_its_actors_in_their_bundles_and_completes(ray_cluster, tiny_model_path, tmp_path, layout):
    """The HF engine (CPU), so that colocated sleep mode runs its sleep/wake calls: a generator
    asked to generate or load weights while asleep raises, so a finished run shows the order."""
    from cluster.loop.driver import Trainer
    from cluster.keeping.rundir import RunDir
    from helpers import spread_reward

    config = load_config("configs/tiny.yaml", [
        f"model.path={tiny_model_path}", f"cluster.placement={layout}", "generator.engine=hf",
        f"generator.sleep_mode={'true' if layout == 'colocated' else 'false'}", "eval.n=4", "run.steps=2", "run.save_rollouts=false",
    ])  # fmt: skip
    trainer = Trainer(config, RunDir(tmp_path / "run"), scorer=spread_reward)
    try:
        group = trainer.placement.group.id.hex()
        free = ray.available_resources()
        # every bundle's CPUs are taken by the actors placed in it
        bundle_count = 1 if layout == "colocated" else 2
        assert [free.get(f"CPU_group_{i}_{group}", 0.0) for i in range(bundle_count)] == [0.0] * bundle_count
        summary = trainer.train(2)
        assert summary["policy_version"] == 2
        placed = json.loads((tmp_path / "run" / "placement.json").read_text())
        assert [(p["role"], p["bundle"]) for p in placed] == ([("learner", 0), ("generator", 0)] if layout == "colocated" else [("learner", 0), ("generator", 1)])
        if layout == "colocated":
            metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
            assert all("perf/generator_sleep_seconds" in m and "perf/weight_sync_seconds" in m for m in metrics if m["step"] > 0)
            check_hand_over(trainer.crew)
    finally:
        trainer.shutdown()
    deadline = time.monotonic() + 30  # the group goes with the run (Ray removes it asynchronously)
    while f"CPU_group_{group}" in ray.available_resources() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert f"CPU_group_{group}" not in ray.available_resources()


def check_hand_over(crew) -> None:
    """The colocated hand-over, from the calls the actors recorded: the engine starts (and
    falls asleep) before the learner loads; every learner step runs while the engine sleeps,
    releases its memory, and only then the engine wakes its weights, loads the new ones and
    wakes its KV cache."""
    events = sorted(
        [(t, "generator", what) for what, t in ray.get(crew.generators.handles[0].recorded.remote())]
        + [(t, "learner", what) for what, t in ray.get(crew.learners.actors[0].recorded.remote())]
    )
    order = [f"{role} {what}" for _, role, what in events]
    assert order[:3] == ["generator start", "generator sleep", "learner start"], order
    steps = [i for i, name in enumerate(order) if name == "learner step"]
    assert len(steps) == 2, order
    for i in steps:
        assert order[i - 1] == "generator sleep", order  # the engine sleeps through the step
        # verl's order: the weights wake, the new ones load, then the KV cache comes back
        assert order[i + 1 : i + 5] == ["learner release memory", "generator wake weights", "generator load weights", "generator wake kv_cache"], order


def test_a_generator_wakes_its_weights_loads_then_wakes_its_kv_cache(tiny_model_path):
    """Woken in parts: with only its weights back it loads a policy but refuses to generate;
    with its KV cache back too it generates from the policy it loaded."""
    from contracts import PolicyRef, Problem, Prompt, SamplingSettings, WeightUpdate
    from learners.policy import LoraSettings, Policy
    from rollout.engines import EngineSettings
    from rollout.generator import Generator

    generator = Generator(tiny_model_path, EngineSettings(engine="hf", dtype="float32"), seed=0, max_lora_rank=8)
    policy = Policy(tiny_model_path, LoraSettings(rank=8, alpha=16))
    generator.sleep()
    with pytest.raises(RuntimeError, match="asleep"):
        generator.load_weights(WeightUpdate(PolicyRef("default", 1), policy.weight_state(), policy.adapter_config()))
    generator.wake(("weights",))
    assert generator.load_weights(WeightUpdate(PolicyRef("default", 1), policy.weight_state(), policy.adapter_config())) == PolicyRef("default", 1)
    sampling = SamplingSettings(n=1, temperature=1.0, top_p=1.0, max_tokens=2)
    prompts = [Prompt(Problem(uid="p", question="2+2", answer="4"), "2+2", (1, 2, 3))]
    with pytest.raises(RuntimeError, match="asleep .* before it can generate"):
        generator.generate(prompts, sampling)
    generator.wake(("kv_cache",))
    assert not generator.asleep and [s.policy for s in generator.generate(prompts, sampling)] == [PolicyRef("default", 1)]
    assert [what for what, _ in generator.recorded()] == ["start", "sleep", "wake weights", "load weights", "wake kv_cache"]


@pytest.mark.slow
def test_a_generator_replaced_while_the_pool_sleeps_starts_asleep(ray_cluster, tiny_model_path):
    """A generator that dies while the pool sleeps is replaced by one that takes no memory
    (its engine is built only when woken), then loads the newest policy on waking, whether the
    pool is woken whole or by a broadcast (weights, load, KV cache)."""
    from actors.generator import GeneratorPool
    from cluster.loop.wiring import start_generator
    from contracts import PolicyRef, Problem, Prompt, SamplingSettings, WeightUpdate
    from helpers import kill_actor
    from learners.policy import LoraSettings, Policy

    config = load_config("configs/tiny.yaml", [f"model.path={tiny_model_path}", "generator.engine=hf"])
    start = lambda rank, asleep: start_generator(config, tiny_model_path, rank=rank, asleep=asleep)  # noqa: E731
    pool = GeneratorPool([start(0, False)], config.generator, factory=start)
    try:
        policy = Policy(tiny_model_path, LoraSettings(rank=config.lora.rank, alpha=config.lora.alpha))
        update = WeightUpdate(PolicyRef("default", 3), policy.weight_state(), policy.adapter_config())
        pool.broadcast(ray.put(update), update.policy)
        pool.sleep()
        kill_actor(pool.handles[0])
        pool.sleep()  # finds it dead: the replacement starts asleep, no weights sent
        assert pool.stats["faults/generator_restarts"] == 1
        assert [what for what, _ in ray.get(pool.handles[0].recorded.remote())] == ["start asleep"]
        pool.wake()
        pool.confirm()
        assert [what for what, _ in ray.get(pool.handles[0].recorded.remote())] == ["start asleep", "wake", "load weights"]
        prompt = Prompt(Problem(uid="p", question="2+2", answer="4"), "2+2", (1, 2, 3))
        samples = pool.generate([prompt], SamplingSettings(n=2, temperature=1.0, top_p=1.0, max_tokens=4))
        assert {s.policy for s in samples} == {update.policy}
        # one that dies while the learner steps is found at the broadcast's weights wake: its
        # replacement is built at the KV-cache wake and loads the new policy then
        pool.sleep()
        kill_actor(pool.handles[0])
        newer = WeightUpdate(PolicyRef("default", 4), policy.weight_state(), policy.adapter_config())
        pool.broadcast(ray.put(newer), newer.policy)
        assert pool.stats["faults/generator_restarts"] == 2 and not pool.asleep
        assert [what for what, _ in ray.get(pool.handles[0].recorded.remote())] == ["start asleep", "wake kv_cache", "load weights"]
        assert {s.policy for s in pool.generate([prompt], SamplingSettings(n=2, temperature=1.0, top_p=1.0, max_tokens=4))} == {newer.policy}
    finally:
        pool.kill()
