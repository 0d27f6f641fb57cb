"""The whole loop on an embedded local Ray cluster with the real vLLM CPU engine and a tiny model.

Nothing is faked: generator, verifier and learner are Ray actors; weights travel through the
object store. One Trainer (one vLLM engine) serves every test in this module.
"""

from __future__ import annotations

import dataclasses
import json

import pyarrow.parquet as pq
import pytest
import ray
import torch

from cluster.keeping.rundir import RunDir
from contracts import DEFAULT_ADAPTER, PolicyRef, SamplingSettings, TrainBatch
from helpers import tiny_trainer

pytestmark = pytest.mark.slow

STEPS = 3
REQUIRED_KEYS = {
    "step", "policy_version", "train/reward_mean", "train/accuracy", "train/loss", "train/kl", "train/entropy",
    "perf/step_seconds", "perf/generate_seconds", "perf/verify_seconds", "perf/learn_seconds",
    "perf/weight_sync_seconds", "perf/generated_tokens_per_second",
}





@pytest.fixture(scope="module")
def trained(ray_cluster, tiny_model_path, tmp_path_factory):
    """Three steps of the tiny config; records greedy output and adapter before training."""
    run_dir = RunDir(tmp_path_factory.mktemp("run"))
    trainer = tiny_trainer(tiny_model_path, run_dir.path, "algorithm.lr=0.05", "algorithm.kl_coef=0.05")
    greedy = SamplingSettings(n=1, temperature=0.0, top_p=1.0, max_tokens=8)
    probe = trainer.stages.evaluator.prompts_by_task["arithmetic"][:4]
    before = {
        "version": ray.get(trainer.crew.generators.handles[0].ping.remote()),
        "samples": trainer.crew.generators.generate(probe, greedy),
        "adapter": trainer.crew.learners.weight_update().tensors,
        "digest": trainer.crew.learners.parameter_digest(),
    }
    summary = trainer.train(STEPS)
    yield trainer, run_dir, summary, before, probe, greedy
    trainer.shutdown()


def test_policy_version_advanced_on_generators(trained):
    trainer, _, summary, before, _, _ = trained
    assert before["version"] == PolicyRef(DEFAULT_ADAPTER, 0)
    assert summary["policy_version"] == STEPS
    assert ray.get([g.ping.remote() for g in trainer.crew.generators.handles]) == [PolicyRef(DEFAULT_ADAPTER, STEPS)]


def test_generators_serve_the_new_weights(trained):
    """Same prompts, greedy, after the broadcast: the tokens or their log-probs moved."""
    trainer, _, _, before, probe, greedy = trained
    after = trainer.crew.generators.generate(probe, greedy)
    assert all(s.policy == PolicyRef(DEFAULT_ADAPTER, STEPS) for s in after)
    changed = [
        a.completion.token_ids != b.completion.token_ids
        or max(abs(x - y) for x, y in zip(a.completion.logprobs, b.completion.logprobs)) > 1e-4
        for a, b in zip(after, before["samples"])
    ]
    assert any(changed)


def test_lora_changed_and_base_did_not(trained):
    trainer, _, _, before, _, _ = trained
    after = trainer.crew.learners.weight_update().tensors
    lora_b = [k for k in after if "lora_B" in k]
    assert lora_b and all(not torch.equal(after[k], before["adapter"][k]) for k in lora_b)
    digest = trainer.crew.learners.parameter_digest()
    assert digest["frozen"] == before["digest"]["frozen"]
    assert digest["trainable"] != before["digest"]["trainable"]


def test_learner_logprobs_match_generator(trained):
    """vLLM's sampled-token log-probs vs the learner's under the same weights (both fp32)."""
    trainer, _, _, _, _, _ = trained
    samples = trainer.crew.generators.generate(trainer.stages.evaluator.prompts_by_task["arithmetic"][:8], SamplingSettings(n=4, temperature=1.0, top_p=1.0, max_tokens=16))
    batch = TrainBatch.from_samples(samples, [0.0] * len(samples))
    learner_logprobs = trainer.crew.learners.logprobs(batch)
    diffs = [abs(a - b) for s, row in zip(samples, learner_logprobs) for a, b in zip(s.completion.logprobs, row)]
    assert len(diffs) == sum(len(s.completion.token_ids) for s in samples) > 100
    max_diff, mean_diff = max(diffs), sum(diffs) / len(diffs)
    print(f"\nlearner vs generator log-probs over {len(diffs)} tokens: max |diff| {max_diff:.2e}, mean {mean_diff:.2e}")
    assert max_diff < 1e-3 and mean_diff < 1e-4


def test_run_directory_contents(trained):
    _, run_dir, _, _, _, _ = trained
    path = run_dir.path
    assert (path / "config.yaml").is_file()
    rows = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r["step"] > 0]
    assert [r["step"] for r in steps] == list(range(1, STEPS + 1))
    for row in steps:
        assert REQUIRED_KEYS <= set(row), REQUIRED_KEYS - set(row)
        # the verifier pool's metrics: 4 prompts x 4 samples judged (spread_reward: never correct)
        assert row["verifier/queue_depth"] == 16 and row["verifier/verdict/wrong"] == 16
        assert row["verifier/executions_per_second"] > 0 and row["verifier/size"] >= 1
        # every process role's peak memory (the actors answer for their own processes); the
        # tiny model's processes still hold the Python, torch and (generator) vLLM runtime
        memory = {role: row[f"perf/peak_rss_gib/{role}"] for role in ("driver", "learners", "generators", "ray")}
        assert all(0.05 < gib < 16 for gib in memory.values()), memory
        assert row["perf/peak_rss_gib/all"] == pytest.approx(sum(v for k, v in row.items() if k.startswith("perf/peak_rss_gib/") and k != "perf/peak_rss_gib/all"))
        assert row["perf/learner_tokens_per_second"] > 0
    assert "perf/peak_rss_gib/verifiers" in steps[-1]  # answered once the pool has started
    assert {"eval/accuracy", "eval/reward_mean", "eval/n"} <= set(rows[0]) and rows[0]["step"] == 0
    assert {"eval/accuracy", "eval/n"} <= set(steps[-1])
    table = pq.read_table(path / "rollouts" / "step_000001.parquet")
    for column in ("prompt", "completion", "completion_token_ids", "reward", "verdict", "policy_version", "generator_logprobs"):
        assert column in table.column_names
    assert table.num_rows == 4 * 4 and set(table.column("policy_version").to_pylist()) == {0}


def test_final_adapter_loads_in_peft_and_vllm_lora(trained, tiny_model_path, tmp_path):
    """final_adapter/ is a PEFT folder; ``raylight export`` of it is one too, and vLLM's LoRA
    path serves the exported adapter with the same greedy output as the merged path that
    trained (a second engine, started only here)."""
    trainer, run_dir, _, _, probe, greedy = trained
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_path), run_dir.final_adapter)
    assert any("lora_B" in name for name, _ in model.named_parameters())

    from cluster.commands.export import export_run
    from cluster.loop.wiring import start_generator
    from rollout.engines import read_adapter

    exported = export_run(run_dir.path, tmp_path / "exported")
    update = read_adapter(exported, PolicyRef(DEFAULT_ADAPTER, STEPS))
    lora_generator = start_generator(trainer.config, tiny_model_path, settings=dataclasses.replace(trainer.config.generator, adapter_mode="lora"))
    try:
        assert ray.get(lora_generator.load_weights.remote(update)) == update.policy
        via_lora = ray.get(lora_generator.generate.remote(probe, greedy))
    finally:
        ray.kill(lora_generator)
    via_merge = trainer.crew.generators.generate(probe, greedy)
    for a, b in zip(via_lora, via_merge):
        assert a.completion.token_ids == b.completion.token_ids
        assert max(abs(x - y) for x, y in zip(a.completion.logprobs, b.completion.logprobs)) < 1e-3
