"""The procedural arithmetic task."""

from itertools import islice

import pytest

from rollout.tasks.arithmetic import LEVELS, ArithmeticTask, evaluate, random_expression


def test_seeded_streams_repeat():
    a = [p.uid for p in islice(ArithmeticTask(2, seed=3).train_stream(), 50)]
    b = [p.uid for p in islice(ArithmeticTask(2, seed=3).train_stream(), 50)]
    c = [p.uid for p in islice(ArithmeticTask(2, seed=4).train_stream(), 50)]
    assert a == b and a != c


@pytest.mark.parametrize("difficulty", sorted(LEVELS))
def test_train_and_eval_never_share_a_problem(difficulty):
    task = ArithmeticTask(difficulty, seed=0)
    held_out = {p.meta["expression"] for p in task.eval_set(100)}
    train = {p.meta["expression"] for p in islice(task.train_stream(), 3000)}
    assert len(held_out) == 100
    assert not held_out & train


def test_answers_are_correct():
    for problem in islice(ArithmeticTask(4).train_stream(), 200):
        expression = problem.meta["expression"]
        assert problem.answer == str(evaluate(expression))
        assert expression in problem.question


def test_difficulty_knob_changes_shape():
    import random

    rng = random.Random(0)
    easy = [random_expression(rng, LEVELS[1]) for _ in range(100)]
    hard = [random_expression(rng, LEVELS[4]) for _ in range(100)]
    assert all(e.count(" ") == 2 and "*" not in e for e in easy)
    assert all(h.count(" ") == 4 for h in hard) and any("(" in h for h in hard)


def test_bad_difficulty_and_bad_expression():
    with pytest.raises(ValueError, match="difficulty"):
        ArithmeticTask(99)
    with pytest.raises(ValueError, match="must contain"):
        ArithmeticTask(1, template="What is it?")
    with pytest.raises(ValueError, match="not an arithmetic expression"):
        evaluate("__import__('os')")


def test_eval_set_too_large_is_a_clear_error():
    with pytest.raises(ValueError, match="distinct held-out"):
        ArithmeticTask(1).eval_set(5000)


def test_splits_are_the_shared_hash_split():
    """Arithmetic splits with the function every task uses: validation and test never meet
    training, and the test split exists only when asked for."""
    from rollout.tasks.base import NoUsableRows, split_of

    task = ArithmeticTask(2, seed=0, test_percent=10, eval_size=50)
    splits = {split: {p.meta["expression"] for p in task.problems(split)} for split in ("validation", "test")}
    train = {p.meta["expression"] for p in islice(task.problems("train"), 2000)}
    assert len(splits["validation"]) == len(splits["test"]) == 50
    assert not (splits["validation"] & splits["test"]) and not (train & (splits["validation"] | splits["test"]))
    assert all(split_of(e, 20, 10) == "test" for e in splits["test"])
    problem = next(task.problems("validation"))
    assert (problem.task, problem.difficulty, problem.split) == ("arithmetic", 2, "validation")
    with pytest.raises(NoUsableRows, match="no test split"):
        ArithmeticTask(1).problems("test")
