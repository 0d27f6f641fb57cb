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
            assert all("perf/generator_sleep_seconds" in m and "perf/generator_wake_seconds" in m for m in metrics if m["step"] > 0)
    finally:
        trainer.shutdown()
    deadline = time.monotonic() + 30  # the group goes with the run (Ray removes it asynchronously)
    while f"CPU_group_{group}" in ray.available_resources() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert f"CPU_group_{group}" not in ray.available_resources()
