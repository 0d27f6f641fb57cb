"""The self-improvement recipe and the solution bank in real runs (local Ray cluster, vLLM CPU
engine, verifier pool, tiny model).

- ``configs/self_improve.yaml`` end to end with the tiny model and a text-dependent reward (a
  random model never writes passing code): each round banks solutions and fine-tunes on the
  bank; a driver SIGKILLed after its second checkpoint resumes to the same rounds and bank.
- The same recipe with its real code scorer and sandbox: nothing passes, the bank stays empty
  and the monitor says so (``bank_empty``), the run goes on.
- GRPO fed by the bank: groups with no correct sample (the real numeric scorer on GSM8K-style
  fixture rows) get the stored correct solution as an extra sample.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from cluster.config import load_config
from cluster.loop.driver import Trainer
from cluster.keeping.rundir import RunDir
from contracts import Completion, PolicyRef, Sample
from helpers import kill_driver_after, learned, spread_reward, tiny_trainer

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs/self_improve.yaml"
ROUNDS = 4


def tiny(tiny_model_path: str, run_dir: Path, *more: str) -> list[str]:
    """The recipe shrunk to the tiny model: small rounds, a checkpoint every round."""
    return [
        f"model.path={tiny_model_path}", f"run.run_dir={run_dir}", f"run.steps={ROUNDS}", "run.checkpoint_every=1",
        "rollout.prompts_per_step=4", "rollout.group_size=4", "rollout.max_tokens=16", "eval.n=8", "eval.max_tokens=16",
        "generator.max_model_len=256", "generator.kv_cache_gib=1", "algorithm.lr=0.05", "bank.sft_max_samples=16", *more,
    ]  # fmt: skip


def final_bank(run_dir: Path) -> dict:
    return json.loads((run_dir / "checkpoints" / f"step_{ROUNDS:06d}" / "bank.json").read_text())


@pytest.fixture(scope="module")
def rounds(ray_cluster, tiny_model_path, tmp_path_factory):
    """Four rounds of the recipe, uninterrupted; the reward is the share of letters (>= 0.3 banks)."""
    run_dir = tmp_path_factory.mktemp("self_improve")
    config = load_config(RECIPE, tiny(tiny_model_path, run_dir, "bank.threshold=0.3"))
    trainer = Trainer(config, RunDir(run_dir), scorer=spread_reward)
    try:
        trainer.train(ROUNDS)
    finally:
        trainer.shutdown()
    return run_dir


def test_each_round_banks_verified_solutions_and_fine_tunes_on_the_bank(rounds):
    rows = RunDir(rounds).read_metrics()
    assert [r["step"] for r in rows] == list(range(ROUNDS + 1))
    trained = rows[1:]
    sizes = [r["bank/size"] for r in trained]
    assert sizes[0] > 0 and sizes == sorted(sizes), sizes  # per_problem 2, new problems every round
    assert all(r["bank/updates"] >= r["bank/size"] for r in trained)
    for r in trained:  # the per-round report: pass rate on the training problems, held-out accuracy, bank size
        assert {"train/accuracy", "eval/accuracy", "bank/size"} <= r.keys()
        assert math.isfinite(r["train/sft_loss"]) and r["train/batch_size"] == min(16, r["bank/size"])
        assert r["train/updates"] >= 1
    assert trained[-1]["policy_version"] == ROUNDS
    bank = final_bank(rounds)
    assert len(bank["solutions"]) == trained[-1]["bank/size"]
    assert all(e["reward"] >= 0.3 for e in bank["solutions"])
    assert not [e for e in map(json.loads, (rounds / "events.jsonl").read_text().splitlines()) if e["rule"] == "bank_empty"]


def test_the_bank_survives_a_killed_driver_and_resume(rounds, tiny_model_path, tmp_path):
    """A separate driver is SIGKILLed once its second checkpoint is complete; the resumed run
    holds that checkpoint's bank and ends with the uninterrupted run's rounds and bank."""
    run_dir = tmp_path / "killed"
    marker = run_dir / "checkpoints" / "step_000002" / "COMPLETE.json"
    kill_driver_after(marker, RECIPE, tiny(tiny_model_path, run_dir, "bank.threshold=0.3"))
    assert not (run_dir / "final_adapter").exists()
    resumed = Trainer.resume(run_dir, scorer=spread_reward)
    try:
        saved = json.loads((resumed.keeper.checkpoints.latest().path / "bank.json").read_text())
        assert resumed.stages.batches.bank.state() == saved and len(resumed.stages.batches.bank) > 0
        resumed.train(ROUNDS)
    finally:
        resumed.shutdown()
    assert learned(RunDir(run_dir).read_metrics()) == learned(RunDir(rounds).read_metrics(), tolerant=True)
    assert final_bank(run_dir) == final_bank(rounds)


def test_code_mode_with_the_real_sandbox_reports_an_empty_bank(ray_cluster, tiny_model_path, tmp_path):
    """The recipe as shipped (infix puzzles in code mode, scored in the bubblewrap sandbox): the
    random model's code never passes, the bank stays empty, ``bank_empty`` fires at its window
    (3 in the recipe) and the rounds go on without an update."""
    run_dir = tmp_path / "empty"
    config = load_config(RECIPE, tiny(tiny_model_path, run_dir, "run.steps=3", "eval.at_start=false"))
    trainer = Trainer(config, RunDir(run_dir))
    try:
        summary = trainer.train(3)
    finally:
        trainer.shutdown()
    assert summary["stopped_by"] is None
    rows = RunDir(run_dir).read_metrics()
    assert [(r["bank/size"], r["bank/updates"]) for r in rows] == [(0.0, 0.0)] * 3
    assert rows[-1]["policy_version"] == 0 and rows[-1]["verifier/infra_errors"] == 0
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    assert [(e["step"], e["rule"]) for e in events if e["rule"] == "bank_empty"] == [(3, "bank_empty")]


def test_grpo_groups_without_a_correct_sample_get_the_banked_solution(ray_cluster, tiny_model_path, tmp_path):
    """GSM8K-style fixture rows, the real numeric scorer: the bank holds a verified solution
    for each training problem before the run; the tiny model never answers right, so every
    group is all wrong and gets that solution as an extra sample, with the group's positive
    advantage. Training accuracy counts the policy's own samples only."""
    data = tmp_path / "gsm8k"
    data.mkdir()
    for split, offset in (("train", 0), ("test", 100)):  # validation is carved from train
        rows = [{"question": f"Ann has {i} apples and buys 3 more. How many?", "answer": f"{i} + 3 = {i + 3}\n#### {i + 3}"} for i in range(offset, offset + 20)]
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run_dir = tmp_path / "fed"
    trainer = tiny_trainer(
        tiny_model_path, run_dir, "run.steps=2", "eval.at_start=false", "eval.n=4", "tasks.0.name=gsm8k", f"tasks.0.source={data}",
        "tasks.0.difficulty=null", "algorithm.kl_coef=0.0", "bank.enabled=true", "bank.feed_groups=true", "bank.threshold=1.0",
        scorer=None,
    )  # fmt: skip
    try:
        problems = trainer.tasks.tasks["gsm8k"].load("train")
        prompts = trainer.stages.prompts.render(problems)
        solutions = []
        for prompt in prompts:
            text = f"{prompt.problem.answer} apples. Answer: {prompt.problem.answer}"
            ids = tuple(trainer.tokenizer.encode(text, add_special_tokens=False))
            solutions.append(Sample(prompt, Completion(ids, text, (0.0,) * len(ids), "stop"), PolicyRef(), 0))
        verdicts = trainer.crew.verifiers.score(solutions)  # the real scorer, as a run scores
        assert all(v.correct for v in verdicts), verdicts
        assert len(trainer.stages.batches.bank.write(solutions, verdicts, step=0)) == len(problems)
        trainer.train(2)
    finally:
        trainer.shutdown()
    rows = RunDir(run_dir).read_metrics()
    assert [r["bank/hits"] for r in rows] == [4.0, 8.0]  # every group of both steps
    assert all(r["train/accuracy"] == 0.0 and r["train/updates"] == 1.0 for r in rows)
    table = pq.read_table(run_dir / "rollouts" / "step_000001.parquet").to_pylist()
    replayed = [r for r in table if r["replayed"]]
    assert len(replayed) == 4 and all(r["advantage"] > 0 and r["finish_reason"] == "bank" for r in replayed)
    assert all(r["advantage"] < 0 for r in table if not r["replayed"])
