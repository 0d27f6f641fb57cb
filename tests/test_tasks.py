"""The task interface: procedural puzzles (determinism, disjoint splits, difficulty that really
changes the problems, answers checked by an independent evaluation), the mixture and the
curriculum, and the packaged sets (HumanEval, ARC-AGI, reasoning-gym)."""

import itertools
import random
import re
import statistics

import pytest

from rewards.scoring import ScorerSpec, TaskJudge, build_scorer
from rollout.tasks import Curriculum, TaskMixture, build_task
from rollout.tasks.procedural import FAMILIES, LEVELS, ProceduralTask, nesting_depth

FAMILY_NAMES = sorted(FAMILIES)


def independent_value(family: str, x: str):
    """Each family's answer computed another way than the generator's own evaluator."""
    if family == "infix":
        assert re.fullmatch(r"[\d+\-*() ]+", x)
        return eval(x)  # noqa: S307 - digits and operators only (checked above)
    if family == "rpn":  # rebuild a fully parenthesised infix string, let Python evaluate it
        stack = []
        for token in x.split():
            if token in "+-*":
                right, left = stack.pop(), stack.pop()
                stack.append(f"({left} {token} {right})")
            else:
                stack.append(token)
        (expression,) = stack
        return eval(expression)  # noqa: S307 - built from digits and operators
    previous = None
    while previous != x:  # remove matched pairs until nothing changes
        previous, x = x, x.replace("()", "").replace("[]", "").replace("{}", "")
    return x == ""


@pytest.mark.parametrize("family", FAMILY_NAMES)
@pytest.mark.parametrize("mode", ["text", "code"])
def test_seeded_streams_repeat(family, mode):
    take = lambda seed: [p.uid for p in itertools.islice(ProceduralTask(family, mode=mode, seed=seed).problems("train"), 30)]  # noqa: E731
    assert take(3) == take(3) and take(3) != take(4)
    held_out = lambda seed: [p.uid for p in ProceduralTask(family, mode=mode, seed=seed, eval_size=20).problems("validation")]  # noqa: E731
    assert held_out(3) == held_out(4)  # the held-out sets do not depend on the run's seed


@pytest.mark.parametrize("family", FAMILY_NAMES)
@pytest.mark.parametrize("difficulty", [1, 4, 10])
def test_splits_never_share_a_problem(family, difficulty):
    task = ProceduralTask(family, difficulty=difficulty, eval_size=50)
    inputs = {split: {p.meta["input"] for p in (itertools.islice(task.problems(split), 2000) if split == "train" else task.problems(split))} for split in ("train", "validation", "test")}
    assert inputs["validation"] and inputs["test"]
    assert not inputs["train"] & inputs["validation"]
    assert not inputs["train"] & inputs["test"]
    assert not inputs["validation"] & inputs["test"]


def test_code_mode_tests_come_from_the_problems_split():
    task = ProceduralTask("infix", mode="code", difficulty=5, eval_size=10, code_tests=6)
    train = {p.meta["input"] for p in itertools.islice(ProceduralTask("infix", difficulty=5).problems("train"), 3000)}
    for problem in task.problems("test"):
        inputs = [args[0] for args, _ in problem.meta["tests"]]
        assert len(inputs) == 6 and problem.meta["entry_point"] == "solve"
        assert not set(inputs) & train
        assert [want for _, want in problem.meta["tests"]] == [independent_value("infix", i) for i in inputs]


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_answers_match_an_independent_evaluation(family):
    for difficulty in (1, 5, 10):
        for problem in itertools.islice(ProceduralTask(family, difficulty=difficulty).problems("train"), 150):
            expected = independent_value(family, problem.meta["input"])
            assert problem.answer == str(expected), problem


def rpn_stack_depth(x: str) -> int:
    depth = deepest = 0
    for token in x.split():
        depth += -1 if token in "+-*" else 1
        deepest = max(deepest, depth)
    return deepest


@pytest.mark.parametrize(
    ("family", "measure"),
    [
        ("infix", lambda x: len(x.split())),  # tokens: operands, operators, parentheses
        ("infix", nesting_depth),
        ("rpn", lambda x: len(x.split())),
        ("rpn", rpn_stack_depth),
        ("brackets", len),
        ("brackets", nesting_depth),
    ],
    ids=["infix-tokens", "infix-nesting", "rpn-tokens", "rpn-stack", "brackets-length", "brackets-nesting"],
)
def test_difficulty_really_changes_the_problems(family, measure):
    means = []
    for difficulty in range(1, 11):
        rng = random.Random(difficulty)
        means.append(statistics.mean(measure(FAMILIES[family].generate(rng, LEVELS[family][difficulty])) for _ in range(300)))
    # never easier (levels that only grow the operands keep the shape: sampling noise allowed)
    assert all(b >= 0.95 * a for a, b in zip(means, means[1:])), means
    assert means[-1] > 2 * means[0] or means[-1] >= means[0] + 2, means  # and much harder at 10


def test_brackets_are_balanced_about_half_the_time():
    answers = [p.answer for p in itertools.islice(ProceduralTask("brackets", difficulty=6).problems("train"), 400)]
    assert 0.35 < answers.count("True") / len(answers) < 0.65


def test_text_answers_are_scored_by_the_tasks_scorer():
    for family in FAMILY_NAMES:
        task = ProceduralTask(family, difficulty=3)
        problem = next(task.problems("validation"))
        scorer = build_scorer(ScorerSpec(scorer=task.reward.scorer, options=dict(task.reward.options)))
        assert scorer(f"Working... Answer: {problem.answer}", problem).correct
        wrong = "False" if problem.answer == "True" else "True" if problem.answer == "False" else str(int(problem.answer) + 1)
        assert not scorer(f"Answer: {wrong}", problem).correct


def test_code_answers_run_in_the_sandbox():
    task = ProceduralTask("brackets", mode="code", difficulty=4, eval_size=2)
    problem = next(task.problems("validation"))
    scorer = build_scorer(ScorerSpec(scorer="code"))
    good = (
        "```python\ndef solve(s):\n    pairs = {')': '(', ']': '[', '}': '{'}\n    stack = []\n    for c in s:\n"
        "        if c in '([{':\n            stack.append(c)\n        elif not stack or stack.pop() != pairs[c]:\n"
        "            return False\n    return not stack\n```"
    )
    assert scorer(good, problem).outcome == "passed"
    assert scorer("```python\ndef solve(s):\n    return s.count('(') == s.count(')')\n```", problem).outcome in ("passed", "failed")
    assert scorer("```python\ndef solve(s):\n    return True\n```", problem).components["passed_fraction"] < 1.0 or all(
        want is True for _, want in problem.meta["tests"]
    )


def test_mixture_draws_by_weight_and_scores_each_task_with_its_own_scorer():
    mixture = TaskMixture([build_task("infix", difficulty=2), build_task("brackets", difficulty=2)], [3.0, 1.0], seed=0)
    problems = mixture.sample(400)
    share = sum(p.task == "infix" for p in problems) / len(problems)
    assert 0.68 < share < 0.82
    again = TaskMixture([build_task("infix", difficulty=2), build_task("brackets", difficulty=2)], [3.0, 1.0], seed=0)
    assert [p.uid for p in again.sample(50)] == [p.uid for p in problems[:50]]
    judge = TaskJudge({t.id: ScorerSpec(scorer=t.reward.scorer, options=dict(t.reward.options)) for t in mixture.tasks.values()})
    verdicts = judge([(f"Answer: {problem.answer}", problem) for problem in problems[:20]])
    assert all(v.correct for v in verdicts) and {p.task for p in problems[:20]} == {"infix", "brackets"}
    with pytest.raises(ValueError, match="unique"):
        TaskMixture([build_task("infix"), build_task("infix")], [1.0, 1.0])


def test_curriculum_raises_and_lowers_difficulty():
    task = build_task("rpn", difficulty=3)
    mixture = TaskMixture([task], [1.0], curricula={"rpn": Curriculum(raise_at=0.8, lower_at=0.2, window=2)})
    assert mixture.update_curricula({"rpn": 0.9}) == {"task/rpn/difficulty": 3.0}
    assert mixture.update_curricula({"rpn": 0.9}) == {"task/rpn/difficulty": 4.0}
    lengths = [len(p.meta["input"].split()) for p in itertools.islice(task.problems("train"), 50)]
    assert statistics.mean(lengths) == pytest.approx(2 * LEVELS["rpn"][4].operators + 1)
    for accuracy in (0.1, 0.1):
        metrics = mixture.update_curricula({"rpn": accuracy})
    assert metrics == {"task/rpn/difficulty": 3.0}
    with pytest.raises(ValueError, match="difficulty"):
        TaskMixture([build_task("humaneval")], [1.0], curricula={"humaneval": Curriculum()})


def test_unknown_task_and_settings_are_named():
    with pytest.raises(ValueError, match="unknown task 'sudoku'"):
        build_task("sudoku")
    with pytest.raises(ValueError, match=r"gsm8k: unknown settings \['difficulty'\]"):
        build_task("gsm8k", difficulty=3)
    with pytest.raises(ValueError, match="difficulty must be 1..10"):
        build_task("infix", difficulty=11)


def test_humaneval_task():
    task = build_task("humaneval", validation_percent=20, test_percent=20)
    splits = {s: task.load(s) for s in ("train", "validation", "test")}
    ids = [{p.meta["task_id"] for p in problems} for problems in splits.values()]
    assert sum(len(i) for i in ids) == 164 and not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    problem = splits["validation"][0]
    assert "```python" in problem.question and task.reward.scorer == "humaneval"


def test_arc_task_renders_grids_and_is_scored_exactly():
    task = build_task("arc_agi", eval_size=5)
    problem = next(task.problems("test"))
    assert "Test input:" in problem.question and problem.meta["arc_id"]
    import json

    grid = json.loads(problem.answer)
    scorer = build_scorer(ScorerSpec(scorer="grid"))
    text = "Answer:\n" + "\n".join(" ".join(str(c) for c in row) for row in grid)
    assert scorer(text, problem).correct
    grid[0][0] = (grid[0][0] + 1) % 10
    assert not scorer("Answer:\n" + "\n".join(" ".join(str(c) for c in row) for row in grid), problem).correct
    train_ids = {p.meta["arc_id"] for p in task.load("train")}
    assert not train_ids & {p.meta["arc_id"] for p in task.load("validation")}


def test_reasoning_gym_task_uses_the_datasets_own_scorer():
    task = build_task("reasoning_gym", dataset="leg_counting", size=40, seed=3)
    problem = next(task.problems("train"))
    scorer = build_scorer(ScorerSpec(scorer="reasoning_gym", options=dict(task.reward.options)))
    assert scorer(f"I count them. <answer>{problem.answer}</answer>", problem).correct
    assert scorer(f"Answer: {int(problem.answer) + 1}", problem).components["score"] < 1.0
    with pytest.raises(Exception, match="nonexistent"):
        build_task("reasoning_gym", dataset="nonexistent_gym", size=5).load("train")


# -- reasoning-gym: what a completion can do to the dataset's own scorer --------------------------

OLD_TAGGED = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)


def test_gym_answer_tags_are_found_as_before_in_linear_time():
    """The tag scan returns what the last match of the old ``findall`` did, on random texts of
    tags; on "<answer>" repeated the old regex took 14 s for 20,000 tags (quadratic)."""
    import time

    from rewards.gym import _last_tagged, extract_gym_answer

    rng = random.Random(0)
    tokens = ["<answer>", "</answer>", "<ANSWER>", "</Answer>", "<answer", "answer>", "a", "\n", " "]
    tagged = 0
    for _ in range(5000):
        text = "".join(rng.choice(tokens) for _ in range(rng.randint(0, 10)))
        old = OLD_TAGGED.findall(text)
        assert _last_tagged(text) == (old[-1] if old else None), text
        tagged += bool(old)
    assert tagged > 1000
    assert extract_gym_answer("x <answer> 4 </answer> <answer>5") == "4"
    hostile = "<answer>" * 200_000
    start = time.perf_counter()
    assert extract_gym_answer(hostile) == hostile
    assert time.perf_counter() - start < 1.0


def test_gym_datasets_that_run_the_answer_as_code_are_refused():
    from rewards.gym import UNSAFE_DATASETS, gym_dataset

    for name in sorted(UNSAFE_DATASETS):
        with pytest.raises(ValueError, match=f"'{name}' is refused: its score_answer evaluates"):
            gym_dataset(name, 5, 0)
    with pytest.raises(ValueError, match="'countdown' is refused"):
        build_scorer(ScorerSpec(scorer="reasoning_gym", options={"dataset": "countdown", "size": 5, "seed": 0}))
    composite = (("datasets", ({"name": "leg_counting"}, {"name": "puzzle24"})),)
    with pytest.raises(ValueError, match="'puzzle24' is refused"):
        gym_dataset.__wrapped__("composite", 5, 0, composite)  # lru_cache cannot hash such a config


def test_gym_scorer_failures_and_long_answers_score_zero(caplog, monkeypatch):
    """prime_factorization's score_answer raises ValueError on "[[": that is the answer's
    failure (reward 0, logged once), not the verifier's; an answer past MAX_ANSWER_CHARS is
    never shown to the dataset."""
    from contracts import Problem
    from rewards import gym

    data = gym.gym_dataset("prime_factorization", 5, 0)
    with pytest.raises(ValueError):
        data.score_answer("[[", data[0])
    scorer = build_scorer(ScorerSpec(scorer="reasoning_gym", options={"dataset": "prime_factorization", "size": 5, "seed": 0}))
    problem = Problem("u", "q", "", meta={"index": 0})
    monkeypatch.setattr(gym, "_logged", set())
    with caplog.at_level("WARNING", logger="rewards.gym"):
        for _ in range(2):
            verdict = scorer("<answer>[[</answer>", problem)
            assert verdict.outcome == "wrong" and verdict.reward == 0.0 and verdict.components["score"] == 0.0
    (logged,) = [r for r in caplog.records if "score_answer raised" in r.getMessage()]
    assert logged.exc_info[0] is ValueError
    assert scorer(f"<answer>{data[0]['answer']}</answer>", problem).correct

    class Counting:
        calls = 0

        def __getitem__(self, index):
            return data[index]

        def score_answer(self, answer, entry):
            Counting.calls += 1
            return 1.0

    too_long = "7" * (gym.MAX_ANSWER_CHARS + 1)
    assert gym.gym_reward(f"<answer>{too_long}</answer>", Counting(), 0).components["score"] == 0.0
    assert Counting.calls == 0
    assert gym.gym_reward(f"<answer>{too_long[1:]}</answer>", Counting(), 0).correct and Counting.calls == 1
