"""Every algorithm variant is selectable from the config and runs through ``raylight train``.

Each case is the real command (in-process, on the session's Ray cluster): tiny model, vLLM
generator, verifier pool, learner actors, 2 steps. The second learner actor of the
data-parallel case talks gloo; nccl (several GPUs) cannot run here.
"""

import json
import math

import pytest
import torch

from cluster.commands.cli import main

CASES = {
    "pg-rloo-cosine": ["algorithm.policy_loss=pg", "algorithm.advantage=rloo", "algorithm.lr_schedule=cosine"],
    "gspo-dr-grpo": ["algorithm.policy_loss=gspo", "algorithm.advantage=dr-grpo", "algorithm.loss_agg=token-sum-norm",
                     "algorithm.clip_eps_low=3e-4", "algorithm.clip_eps_high=4e-4"],
    "ppo-epochs-dual-clip-tis-adaptive-kl": [
        "algorithm.advantage=batch-std", "algorithm.dual_clip_c=3.0", "algorithm.tis_cap=2.0", "algorithm.kl_coef=0.05",
        "algorithm.kl_target=0.01", "algorithm.kl_horizon=100", "algorithm.ppo_epochs=2", "algorithm.mini_batch_size=8",
        "algorithm.entropy_coef=0.001", "algorithm.micro_batch_size=4",
    ],
    "reinforce++-kl-reward": ["algorithm.advantage=reinforce++", "algorithm.kl_mode=reward", "algorithm.kl_coef=0.05", "algorithm.kl_estimator=k1"],
    "reinforce++-baseline": ["algorithm.advantage=reinforce++-baseline", "algorithm.kl_coef=0.0"],
    "ppo-gae-critic": ["algorithm.advantage=gae", "algorithm.lam=0.95", "algorithm.critic_lr=1e-3"],
    "full-weights": ["model.train=full", "algorithm.kl_coef=0.05", "algorithm.lr=1e-5"],
    "two-learners": ["learner.num_learners=2", "learner.num_cpus=0.5"],
    "frozen-backbone": ["model.train=modules", "model.trainable_modules=[model.layers.1,lm_head]", "algorithm.kl_coef=0.05", "algorithm.lr=1e-4"],
    "k3+-seq-mean-token-sum": ["algorithm.kl_estimator=k3+", "algorithm.kl_coef=0.05", "algorithm.loss_agg=seq-mean-token-sum"],
}

EXPECT = {  # metrics that show the variant really ran
    "ppo-epochs-dual-clip-tis-adaptive-kl": lambda row: row["train/updates"] == 4 and row["train/tis_weight_mean"] > 0,
    "reinforce++-kl-reward": lambda row: math.isfinite(row["train/kl_old"]),
    "ppo-gae-critic": lambda row: "train/value_loss" in row and "train/critic_grad_norm" in row,
    "full-weights": lambda row: math.isfinite(row["train/kl"]),
    "k3+-seq-mean-token-sum": lambda row: math.isfinite(row["train/kl"]),
    "frozen-backbone": lambda row: math.isfinite(row["train/kl"]),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_variant_runs_through_raylight_train(ray_cluster, tiny_model_path, tmp_path, case, capsys):
    run_dir = tmp_path / "run"
    args = ["train", "configs/tiny.yaml", "--run-dir", str(run_dir), "--steps", "2",
            "eval.at_start=false", "eval.n=4", "run.save_rollouts=false", *CASES[case]]
    assert main(args) == 0
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    last = rows[-1]
    assert last["policy_version"] == 2, last
    assert math.isfinite(last["train/loss"]) and math.isfinite(last["train/grad_norm"])
    assert last["train/skipped_steps"] == 0
    if case in EXPECT:
        assert EXPECT[case](last), last
    if case == "ppo-epochs-dual-clip-tis-adaptive-kl":
        assert rows[0]["train/kl_coef"] != 0.05 or rows[1]["train/kl_coef"] != 0.05  # adapted
    final = run_dir / "final_adapter"
    whole_model = case in ("full-weights", "frozen-backbone")
    assert (final / "config.json").is_file() if whole_model else (final / "adapter_config.json").is_file()


@pytest.mark.slow
def test_full_weight_training_reaches_vllm(ray_cluster, tiny_model_path, tmp_path):
    """Full-weight updates go to vLLM through reload_weights, streamed in buckets (128 KiB here:
    a bucket per decoder layer): after training, the generator's sampled-token log-probs equal the
    learner's (the whole model moved, not an adapter). The buckets belong to the learner
    that made them: once it is gone, a generator's load of them is a ``WeightUpdateLost``
    (which the driver answers by rebuilding the learners), not a generator's fault."""
    from helpers import kill_actor, spread_reward, wait_until_lost

    from actors.generator import WeightUpdateLost
    from cluster.config import load_config
    from cluster.loop.driver import Trainer
    from cluster.keeping.rundir import RunDir
    from contracts import SamplingSettings, TrainBatch

    config = load_config("configs/tiny.yaml", [
        f"model.path={tiny_model_path}", "model.train=full", "algorithm.lr=1e-3", "algorithm.kl_coef=0.0",
        "eval.at_start=false", "eval.n=4", "run.save_rollouts=false", "learner.weight_bucket_mb=0.125",
    ])
    trainer = Trainer(config, RunDir(tmp_path / "run"), scorer=spread_reward)
    try:
        before = trainer.crew.learners.parameter_digest()
        for step in (1, 2):
            trainer.step(step)
        assert trainer.crew.learners.parameter_digest()["trainable"] != before["trainable"]
        assert trainer.crew.learners.weight_update().kind == "full"
        samples = trainer.crew.generators.generate(trainer.stages.evaluator.prompts_by_task["arithmetic"][:4], SamplingSettings(n=4, temperature=1.0, top_p=1.0, max_tokens=16))
        assert {s.policy.version for s in samples} == {2}
        learner_logprobs = trainer.crew.learners.logprobs(TrainBatch.from_samples(samples, [0.0] * len(samples)))
        diffs = [abs(a - b) for s, row in zip(samples, learner_logprobs) for a, b in zip(s.completion.logprobs, row)]
        assert len(diffs) > 50 and max(diffs) < 1e-3, max(diffs)
        # the final model is written by the driver from the object store, and loads as a HF model
        trainer.keeper.save_final()
        from transformers import AutoModelForCausalLM

        saved = AutoModelForCausalLM.from_pretrained(trainer.run_dir.final_adapter).state_dict()
        whole = trainer.crew.learners.weight_update().tensors
        for name, tensor in whole.items():
            torch.testing.assert_close(saved[name], tensor, rtol=0, atol=0)
        streamed = trainer.crew.learners.weight_update_ref(streamed=True)
        buckets = [ray_cluster.get(bucket) for bucket in ray_cluster.get(streamed).buckets]
        assert len(buckets) == 4 and {name for bucket in buckets for name in bucket} == set(whole)
        kill_actor(trainer.crew.learners.actors[0])
        wait_until_lost(ray_cluster.get(streamed).buckets[0])
        with pytest.raises(WeightUpdateLost, match="could not fetch the weight update"):
            trainer.crew.generators.broadcast(streamed, trainer.run.policy)
        assert trainer.crew.generators.stats["faults/generator_restarts"] == 0
    finally:
        trainer.shutdown()


# the recipes of configs/ shrunk to the tiny model (their own tests: test_self_improve.py)
RECIPES = {
    "dapo.yaml": ["reward.overlong_buffer=8"],
    "grpo_bank.yaml": ["generator.max_model_len=1024", "eval.every=0"],
}


@pytest.mark.slow
@pytest.mark.parametrize("recipe", list(RECIPES))
def test_recipe_config_runs_end_to_end_on_the_tiny_model(ray_cluster, tiny_model_path, tmp_path, recipe):
    """The shipped recipe through ``raylight train``, only the sizes shrunk: its own task, scorer
    (HumanEval in the sandbox for grpo_bank) and algorithm keys."""
    run_dir = tmp_path / "run"
    args = ["train", f"configs/{recipe}", "--run-dir", str(run_dir), "--steps", "2", f"model.path={tiny_model_path}",
            "rollout.prompts_per_step=4", "rollout.group_size=4", "rollout.max_tokens=16", "eval.at_start=false", "eval.n=4",
            "eval.max_tokens=16", "generator.max_model_len=256", "generator.kv_cache_gib=1", "run.checkpoint_every=0",
            *RECIPES[recipe]]  # fmt: skip
    assert main(args) == 0
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    if recipe == "dapo.yaml":
        assert all(r["dynamic/rounds"] >= 1 for r in rows) and "train/reward/overlong" in rows[-1]
    else:  # a random model passes no HumanEval test: the bank stays empty and is reported
        assert [r["bank/size"] for r in rows] == [0.0, 0.0] and rows[-1]["verifier/infra_errors"] == 0
