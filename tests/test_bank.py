"""The solution bank of verified solutions (``rollout.bank``): what enters, duplicates, limits
and eviction, its checkpoint state; feeding a GRPO group that has no correct sample; and, on a
tiny model in-process, that one round of supervised fine-tuning on banked solutions raises
their likelihood and that a replayed sample enters the loss at ratio 1."""

from __future__ import annotations

import json

import pytest

from cluster.config import ConfigError, load_config
from cluster.observe.monitor import Monitor
from contracts import Completion, PolicyRef, Problem, Prompt, Sample, Verdict
from helpers import make_learner
from learners.batch import build_train_batch, group_indices
from learners.objectives import PolicyGradientObjective
from learners.policy import LoraSettings
from learners.settings import AlgorithmSettings
from rollout.bank import BankSettings, SolutionBank

LORA = LoraSettings(rank=4, alpha=8)


def prompt(uid: str, tokens: tuple[int, ...] = (101, 102, 103)) -> Prompt:
    return Prompt(Problem(uid=uid, question=f"question {uid}", answer="42"), text=f"question {uid}", token_ids=tokens)


def sample(uid: str, text: str, index: int = 0, version: int = 0, tokens: tuple[int, ...] | None = None) -> Sample:
    ids = tokens or tuple(200 + (ord(c) % 50) for c in text)[:6] or (200,)
    return Sample(prompt(uid), Completion(ids, text, tuple(-1.0 for _ in ids), "stop"), PolicyRef("policy", version), index)


def verdict(reward: float, status: str = "ok") -> Verdict:
    return Verdict(reward=reward, correct=reward >= 1.0) if status == "ok" else Verdict.infra_error("sandbox died")


def test_the_threshold_decides_what_enters_and_duplicates_are_skipped():
    bank = SolutionBank(BankSettings(enabled=True, threshold=0.8))
    samples = [sample("a", "x = 1"), sample("a", "x  =  1\n", 1), sample("a", "y = 2", 2), sample("b", "z", 0), sample("b", "w", 1)]
    written = bank.write(samples, [verdict(1.0), verdict(0.9), verdict(0.5), verdict(1.0, "infra_error"), verdict(0.8)], step=3)
    # "x  =  1" is "x = 1" up to whitespace; 0.5 is below the threshold; an infra error never enters
    assert [(s.uid, s.text, s.step) for s in written] == [("a", "x = 1", 3), ("b", "w", 3)]
    assert bank.metrics() == {"bank/size": 2.0, "bank/problems": 2.0, "bank/updates": 2.0, "bank/hits": 0.0, "bank/duplicates": 1.0, "bank/evictions": 0.0}
    # a replayed sample is the bank's own solution: never written again
    replayed = Sample(prompt("c"), Completion((7,), "new", (), "bank"), PolicyRef(), 0, replayed=True)
    assert bank.write([replayed], [verdict(1.0)], step=4) == [] and len(bank) == 2


@pytest.mark.parametrize(
    "eviction, kept",
    [("oldest", ["s1", "s2"]), ("lowest_reward", ["s0", "s2"])],
)
def test_a_full_problem_evicts_by_the_rule(eviction, kept):
    bank = SolutionBank(BankSettings(enabled=True, threshold=0.5, per_problem=2, eviction=eviction))
    bank.write([sample("a", "s0")], [verdict(1.0)], step=1)
    bank.write([sample("a", "s1")], [verdict(0.6)], step=2)
    bank.write([sample("a", "s2")], [verdict(0.9)], step=3)
    assert sorted(s.text for s in bank.of("a")) == kept
    assert bank.metrics()["bank/evictions"] == 1.0 and bank.metrics()["bank/updates"] == 3.0
    assert [s.text for s in bank.of("a")] == sorted(kept, key=lambda t: -{"s0": 1.0, "s1": 0.6, "s2": 0.9}[t])  # best first


def test_one_solution_per_problem_replaces_it():
    """The eviction empties the problem's list before the new solution goes in."""
    bank = SolutionBank(BankSettings(enabled=True, per_problem=1))
    bank.write([sample("a", "first")], [verdict(1.0)], step=1)
    bank.write([sample("a", "second")], [verdict(1.0)], step=2)
    assert [s.text for s in bank.of("a")] == ["second"] and bank.metrics()["bank/evictions"] == 1.0
    # the total limit at 1 evicts the other problem's only solution the same way
    full = SolutionBank(BankSettings(enabled=True, max_size=1))
    full.write([sample("a", "first")], [verdict(1.0)], step=1)
    full.write([sample("b", "second")], [verdict(1.0)], step=2)
    assert sorted(full.solutions) == ["b"] and len(full) == 1


def test_the_bank_size_limit_evicts_across_problems():
    bank = SolutionBank(BankSettings(enabled=True, max_size=3, per_problem=4))
    for step, uid in enumerate("abcd", 1):
        bank.write([sample(uid, f"solution of {uid}")], [verdict(1.0)], step)
    assert len(bank) == 3 and sorted(bank.solutions) == ["b", "c", "d"]  # "a" was the oldest


def test_the_state_round_trips_through_json():
    bank = SolutionBank(BankSettings(enabled=True, per_problem=2))
    bank.write([sample("a", "one"), sample("a", "two", 1), sample("b", "three")], [verdict(1.0)] * 3, step=1)
    bank.write([sample("a", "four", version=1)], [verdict(1.0)], step=2)  # evicts "one"
    bank.feed([sample("b", "wrong")], [verdict(0.0)], PolicyRef("policy", 2), [[0]])
    again = SolutionBank(bank.settings)
    assert json.loads(json.dumps(bank.state())) == bank.state()  # JSON-shaped as it is
    again.load_state(bank.state())
    assert again.solutions == bank.solutions and again.metrics() == bank.metrics() and again.written == bank.written
    # the restored clock keeps evicting in the same order
    for b in (bank, again):
        b.write([sample("a", "five")], [verdict(1.0)], step=3)
    assert again.solutions == bank.solutions


def test_a_group_without_a_correct_sample_gets_a_stored_solution():
    bank = SolutionBank(BankSettings(enabled=True, threshold=1.0, feed_groups=True, feed_per_group=1))
    bank.write([sample("a", "good a", tokens=(301, 302))], [verdict(1.0)], step=1)
    bank.write([sample("b", "good b")], [verdict(1.0)], step=1)
    # step 2: group "a" all wrong, group "b" has a correct sample, group "c" all wrong but nothing stored
    samples = [sample(u, f"try {u}{i}", i, version=1) for u in "abc" for i in range(3)]
    verdicts = [verdict(0.0)] * 3 + [verdict(0.0), verdict(1.0), verdict(0.0)] + [verdict(0.0)] * 3
    fed, fed_verdicts = bank.feed(samples, verdicts, PolicyRef("policy", 1), group_indices(samples))
    assert len(fed) == 10
    extra = fed[3]
    assert extra.replayed and extra.group_index == 3 and extra.prompt == samples[0].prompt
    assert extra.completion.token_ids == (301, 302) and extra.completion.logprobs == () and extra.policy == PolicyRef("policy", 1)
    assert fed_verdicts[3].reward == 1.0 and fed_verdicts[3].outcome == "bank"
    assert bank.metrics()["bank/hits"] == 1.0
    # the group now has signal: the stored solution gets the positive advantage
    batch, advantages, metrics = build_train_batch(fed, fed_verdicts, "grpo", drop_zero_variance=True)
    assert advantages[3] > 0 > advantages[0] and metrics["train/zero_variance_groups"] == 1.0  # group "c"
    assert batch.replayed == (False, False, False, True, False, False, False)


def test_sft_batch_is_the_bank_or_the_new_solutions_with_a_seeded_draw():
    settings = BankSettings(enabled=True, per_problem=8, sft_max_samples=3)
    bank = SolutionBank(settings)
    first = bank.write([sample("a", f"s{i}", i) for i in range(4)], [verdict(1.0)] * 4, step=1)
    new = bank.write([sample("b", "t0"), sample("b", "t1", 1)], [verdict(1.0)] * 2, step=2)
    batch = bank.sft_batch(new, seed=5)
    assert len(batch) == 3 and batch == bank.sft_batch(new, seed=5)  # the seed decides the draw
    every = {s.token_ids for s in first + new}
    assert set(batch.completion_token_ids) <= every and batch.old_logprobs == ((),) * 3
    only_new = SolutionBank(BankSettings(enabled=True, per_problem=8, sft_on="new"))
    assert only_new.sft_batch(new, seed=5).completion_token_ids == tuple(s.token_ids for s in new)


def test_one_round_of_sft_on_banked_solutions_raises_their_likelihood(tiny_model_path):
    """The tiny model, in-process: the bank's SFT batch through ``Learner.step(batch, "sft")``."""
    bank = SolutionBank(BankSettings(enabled=True, threshold=1.0))
    solutions = [sample(f"p{i}", f"solution {i}", tokens=(400 + i, 500 + i, 600 + i, 700 + i)) for i in range(4)]
    bank.write(solutions, [verdict(1.0)] * 4, step=1)
    learner = make_learner(tiny_model_path, LORA, lr=2e-2, sft_epochs=2, micro_batch_size=2)
    contexts = [list(s.prompt.token_ids) for s in solutions]
    targets = [list(s.completion.token_ids) for s in solutions]
    before = learner.sequence_logprob(contexts, targets)
    metrics = learner.step(bank.sft_batch([], seed=0), "sft")
    after = learner.sequence_logprob(contexts, targets)
    assert metrics["train/updates"] == 2.0 and learner.policy_version().version == 1  # two epochs, one step
    assert all(a > b + 0.1 for a, b in zip(after, before)), (before, after)


def test_a_replayed_sample_is_scored_by_the_learner_before_the_update(tiny_model_path):
    """Its generator log-probs are the learner's own: ratio 1 at the step's first update."""
    learner = make_learner(tiny_model_path, LORA, lr=1e-2)
    bank = SolutionBank(BankSettings(enabled=True, feed_groups=True))
    bank.write([sample("a", "stored", tokens=(410, 411, 412))], [verdict(1.0)], step=1)
    group = [sample("a", f"try {i}", i, tokens=(420 + i, 421)) for i in range(3)]
    fed, fed_verdicts = bank.feed(group, [verdict(0.0)] * 3, PolicyRef("policy", 0), [[0, 1, 2]])
    batch, _, _ = build_train_batch(fed, fed_verdicts, "grpo")
    objective = PolicyGradientObjective(AlgorithmSettings(kl_coef=0.0), temperature=1.0)
    rows = objective.prepare(learner, batch).rows["generator"]
    assert rows[3].tolist() == pytest.approx(learner.logprobs(batch.select([3]))[0], abs=1e-6)
    assert rows[0].tolist() == [-1.0, -1.0]  # sampled rows keep the generator's
    metrics = learner.step(batch)
    assert metrics["train/updates"] == 1.0 and metrics["train/ratio_max"] < 1.5


def test_the_monitor_warns_when_the_bank_stays_empty():
    monitor = Monitor()
    events = [monitor.observe({"step": s, "bank/size": 0.0, "bank/updates": 0.0}) for s in range(1, 12)]
    fired = [(e.step, e.rule) for step in events for e in step]
    assert fired == [(10, "bank_empty")]
    assert "bank.threshold" in events[9][0].message
    filled = Monitor()
    rows = [{"step": s, "bank/size": float(s > 3)} for s in range(1, 12)]
    assert not [e for r in rows for e in filled.observe(r)]
    assert not [e for s in range(1, 12) for e in Monitor().observe({"step": s})]  # no bank, no rule


@pytest.mark.parametrize(
    "overrides, culprit",
    [
        (["algorithm.objective=sft"], "set bank.enabled=true"),
        (["bank.feed_groups=true"], "bank.feed_groups adds banked solutions"),
        (["bank.enabled=true", "bank.per_problem=0"], "bank.per_problem (0)"),
        (["algorithm.sft_epochs=0"], "algorithm.sft_epochs must be at least 1"),
    ],
)
def test_bank_settings_that_cannot_run_are_named(overrides, culprit):
    with pytest.raises(ConfigError, match=culprit.replace("(", r"\(").replace(")", r"\)")):
        load_config(None, overrides)


def test_the_old_memory_keys_still_configure_the_bank(tmp_path, caplog):
    """``memory`` was the bank's section before it was named: a config, an override or a saved
    run's config.yaml that still writes it configures ``bank``, with a warning naming the new
    key; both at once is an error naming both."""
    recipe = tmp_path / "old.yaml"
    recipe.write_text("memory:\n  enabled: true\n  threshold: 0.5\nmonitor:\n  rules:\n    memory_empty: {window: 3}\n")
    with caplog.at_level("WARNING"):
        config = load_config(recipe, ["memory.per_problem=2"])
    assert (config.bank.enabled, config.bank.threshold, config.bank.per_problem) == (True, 0.5, 2)
    assert config.monitor.rules["bank_empty"].window == 3
    assert "config key memory is now bank" in caplog.text and "monitor.rules.bank_empty" in caplog.text
    both = tmp_path / "both.yaml"
    both.write_text("memory:\n  enabled: true\nbank:\n  enabled: false\n")
    with pytest.raises(ConfigError, match="'memory' and 'bank' are both given"):
        load_config(both)


def test_a_checkpoint_from_before_the_rename_restores_its_bank():
    """A checkpoint written as ``memory.json`` restores the bank; a rollback keeps the bank,
    a restart from step 0 empties it."""
    from cluster.features.bank import BankPart

    saved = SolutionBank(BankSettings(enabled=True))
    saved.write([sample("a", "x")], [verdict(1.0)], step=1)
    files = {"memory.json": json.dumps(saved.state()).encode()}
    part = BankPart(SolutionBank(BankSettings(enabled=True)))
    part.load_state(files.get)
    assert part.bank.state() == saved.state() and len(part.bank) == 1
    assert BankPart(saved).state().keys() == {"bank.json"}
    part.rewind(None, restart=False)
    assert len(part.bank) == 1
    part.rewind(None, restart=True)
    assert len(part.bank) == 0 and part.bank.metrics()["bank/updates"] == 0.0


def test_real_verdicts_decide_what_enters_for_code_puzzles_humaneval_and_arc():
    """The scorers a self-improvement run uses, as they score (code in the bubblewrap sandbox):
    a right solution reaches the threshold and is banked, a wrong one is not."""
    from rewards.humaneval import judge_for
    from rewards.scoring import ScorerSpec, build_scorer
    from rollout.tasks import build_task

    infix = build_task("infix", mode="code", difficulty=2, seed=0)
    humaneval = build_task("humaneval", seed=0)
    arc = build_task("arc_agi", seed=0)
    puzzle, task_problem, grid_problem = next(infix.problems("train")), next(humaneval.problems("train")), next(arc.problems("train"))
    canonical = judge_for(task_problem.meta["task_id"]).problem.canonical_solution
    grid = json.loads(grid_problem.answer)
    wrong_grid = [[(c + 1) % 10 for c in row] for row in grid]
    as_text = lambda g: "Answer:\n" + "\n".join(" ".join(map(str, row)) for row in g)  # noqa: E731
    cases = [
        (infix, puzzle, "```python\ndef solve(expression):\n    return eval(expression)\n```", "```python\ndef solve(expression):\n    return 0\n```"),
        (humaneval, task_problem, canonical, "    return None\n"),
        (arc, grid_problem, as_text(grid), as_text(wrong_grid)),
    ]
    bank = SolutionBank(BankSettings(enabled=True, threshold=1.0))
    for task, problem, right, wrong in cases:
        scorer = build_scorer(ScorerSpec(scorer=task.reward.scorer, options=dict(task.reward.options)))
        p = Prompt(problem, problem.question, (1, 2, 3))
        samples = [Sample(p, Completion((5,), right, (-1.0,), "stop"), PolicyRef(), 0), Sample(p, Completion((6,), wrong, (-1.0,), "stop"), PolicyRef(), 1)]
        written = bank.write(samples, [scorer(s.completion.text, problem) for s in samples], step=1)
        assert [s.text for s in written] == [right], task.id
    assert sorted(bank.solutions) == sorted(p.uid for p in (puzzle, task_problem, grid_problem))
