"""The loop's seams (``cluster.stages``) and the one wiring function that chooses them
(``cluster.loop.wiring.build_stages``), in-process: which stages each feature's config puts in
the loop, and what the batch sources build. No actor runs here: the crew's pools are never
called while stages are chosen (an empty ``Crew`` holds their place)."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from cluster.features.bank import BankedRollouts, BankPart, BankRounds
from cluster.features.markovian import ActorRewardColumns, MarkovianEvaluator, MarkovianReward
from cluster.loop.wiring import build_stages, build_tasks
from cluster.stages import Crew, GreedyEvaluator, RolloutBatches, TaskPrompts
from contracts import Completion, PolicyRef, Problem, Prompt, Sample, Verdict
from helpers import tiny_config


def stages_of(tiny_model_path: str, tmp_path, *overrides: str):
    config = tiny_config(tiny_model_path, tmp_path, *overrides)
    tasks = build_tasks(config)
    return build_stages(config, AutoTokenizer.from_pretrained(tiny_model_path), tasks, Crew(None, None))


def test_a_plain_run_has_the_plain_stages(tiny_model_path, tmp_path):
    stages = stages_of(tiny_model_path, tmp_path, "eval.n=4")
    assert isinstance(stages.prompts, TaskPrompts) and stages.model_rewards == () and stages.participants == () and stages.parts == ()
    assert type(stages.batches) is RolloutBatches and stages.batches.columns is None
    assert isinstance(stages.evaluator, GreedyEvaluator) and not stages.evaluator.needs_learners
    assert len(stages.evaluator.prompts_by_task["arithmetic"]) == 4 and stages.prompts.sampling.n == 4  # tiny.yaml's group size


@pytest.mark.parametrize(
    "overrides, source, feeds",
    [
        (["bank.enabled=true"], BankedRollouts, False),
        (["bank.enabled=true", "bank.feed_groups=true"], BankedRollouts, True),
        (["bank.enabled=true", "algorithm.objective=sft"], BankRounds, None),
    ],
)
def test_the_bank_chooses_the_batch_source_and_is_checkpointed(tiny_model_path, tmp_path, overrides, source, feeds):
    stages = stages_of(tiny_model_path, tmp_path, *overrides)
    assert type(stages.batches) is source and [type(p) for p in stages.parts] == [BankPart]
    assert stages.parts[0].bank is stages.batches.bank  # the part checkpoints the bank the batches read
    if feeds is not None:
        assert stages.batches.feed is feeds


def test_markovian_chooses_prompts_reward_columns_and_evaluator(tiny_model_path, tmp_path):
    stages = stages_of(
        tiny_model_path, tmp_path, "markovian.enabled=true", "generator.adapter_mode=lora", "algorithm.actor_reward_weight=0.5",
        "algorithm.policy_loss=pg", "markovian.cot_length=8",
    )  # fmt: skip
    assert isinstance(stages.prompts, MarkovianReward) and stages.model_rewards == (stages.prompts,)
    assert stages.prompts.sampling.min_tokens == stages.prompts.sampling.max_tokens == 8  # exactly cot_length tokens
    assert isinstance(stages.batches.columns, ActorRewardColumns) and stages.batches.columns.weight == 0.5
    assert isinstance(stages.evaluator, MarkovianEvaluator) and stages.evaluator.needs_learners


def sample(uid: str, index: int, text: str) -> Sample:
    prompt = Prompt(Problem(uid=uid, question=f"q {uid}", answer="1"), f"q {uid}", (1, 2))
    return Sample(prompt, Completion((3, 4, 5)[: len(text)], text, (-0.5,) * min(3, len(text)), "stop"), PolicyRef(), index)


def test_batch_sources_build_with_their_objective_and_columns():
    """Rollouts train by PPO's objective with a feature's columns filled as the batch is built
    (one value per trained sample: the group of equal rewards is left out); a bank round
    trains by the supervised objective on the bank, recording the rollouts untrained."""
    from rollout.bank import BankSettings, SolutionBank

    samples = [sample("a", 0, "x"), sample("a", 1, "yy"), sample("b", 0, "z"), sample("b", 1, "w")]
    verdicts = [Verdict(reward=1.0, correct=True), Verdict(reward=0.0, correct=False), Verdict(reward=0.5, correct=False), Verdict(reward=0.5, correct=False)]

    def answer_rows(samples, verdicts, advantages):
        kept = [s for s, a in zip(samples, advantages) if a is not None]
        return {"answer_prompt_token_ids": tuple((9,) for _ in kept), "answer_token_ids": tuple((8,) for _ in kept), "answer_weights": tuple(0.5 for _ in kept)}

    built = RolloutBatches("grpo", drop_zero_variance=True, columns=answer_rows).build(1, samples, verdicts, PolicyRef())
    assert built.objective == "ppo" and len(built.batch) == 2 and built.advantages[2:] == [None, None]
    assert built.batch.answer_token_ids == ((8,), (8,)) and built.batch.answer_weights == (0.5, 0.5)

    bank = SolutionBank(BankSettings(enabled=True, threshold=1.0))
    round_ = BankRounds(bank, seed=lambda step: step).build(1, samples, verdicts, PolicyRef())
    assert round_.objective == "sft" and len(round_.batch) == 1 and round_.batch.completion_token_ids == ((3,),)
    assert round_.advantages == [None] * 4 and round_.metrics["bank/updates"] == 1.0
