"""Rewards from outside the project (``rewards.terms``, ``rewards.scoring.Judge``): a user's
functions written to a module outside the repository (per sample or batched, sync or async,
a float or a dict), combined by weight with a task's scorer or alone; failures handled by
``on_error`` and counted, never a silent 0; an HTTP reward server started here on 127.0.0.1
that answers, hangs, fails with 500, returns garbage and dies, behind the real verifier pool."""

from __future__ import annotations

import logging
import math
import textwrap
import time

import pytest

from actors.verifier import RewardStopError, VerifierPool, VerifierPoolSettings
from cluster.observe.samples import sample_metrics
from contracts import Completion, PolicyRef, Problem, Prompt, Sample
from rewards.scoring import Judge, RewardSettings, ScorerSpec, TaskJudge
from rewards.terms import FunctionReward, HttpReward, import_function, value_of, TermFailure
from reward_server import RewardServer

USER_MODULE = '''
import asyncio, time

def length(completion):
    return len(completion) / 10

def exact(completion, answer, example):
    right = completion.strip() == answer
    return {"reward": float(right), "correct": right, "shouting": float(completion.isupper()), "row_id": example.get("id", -1)}

async def slow_half(completion, **kwargs):
    await asyncio.sleep(0.01)
    return 0.5 if "question" in kwargs else -1.0

def batch_exact(completions, answers):
    return [float(c == a) for c, a in zip(completions, answers)]

async def batch_async(completions):
    return [len(c) for c in completions]

def raises(completion):
    if "boom" in completion:
        raise KeyError("boom")
    return 1.0

def wrong_type(completion):
    return {"none": None, "str": "abc", "nan": float("nan"), "dict": {"score": 1.0}}.get(completion, 1.0)

def batch_short(completions):
    return [1.0]

def hang(completion):
    if completion == "hang":
        time.sleep(3600)
    return 1.0

def needs_more(completion, temperature):
    return 1.0

def positional(completion, /):
    return 1.0

LIMIT = asyncio.Semaphore(2)  # made at import: bound to the loop the term keeps

async def limited(completion):
    async with LIMIT:
        await asyncio.sleep(0.001)
        return 1.0

class Scorer:
    async def __call__(self, completion):
        return 0.25

scorer_object = Scorer()

def numpy_values(completions):
    import numpy as np
    return np.array([np.float32(len(c)) for c in completions])

def numpy_scalar(completion):
    import numpy as np
    return {"reward": np.float64(0.5), "hits": np.int64(2)}

def batch_breaks_on_boom(completions):
    if "boom" in completions:
        raise RuntimeError("boom in the batch")
    return [1.0] * len(completions)
'''


@pytest.fixture
def user_dir(tmp_path):
    """A user's project outside the repository: a package ``my_rewards`` with the functions."""
    package = tmp_path / "project" / "my_rewards"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "scores.py").write_text(textwrap.dedent(USER_MODULE))
    return str(tmp_path / "project")


def fn(user_dir: str, function: str, **settings) -> FunctionReward:
    return FunctionReward(path=f"my_rewards.scores:{function}", search=(user_dir,), **settings)


def problem(answer: str = "7", task: str = "mine", **meta) -> Problem:
    return Problem(uid=f"u{answer}", question="What is 3 + 4?", answer=answer, meta={"example": {"id": 3}, **meta}, task=task)


def judge(*terms, scorer: str = "reward", **reward) -> TaskJudge:
    return TaskJudge({"mine": ScorerSpec(scorer=scorer, reward=RewardSettings(**reward), terms=terms)})


def test_functions_per_sample_batched_sync_and_async_combined_by_weight(user_dir):
    j = judge(fn(user_dir, "length", weight=0.5), fn(user_dir, "exact"), fn(user_dir, "slow_half", name="half"),
              fn(user_dir, "batch_exact", batched=True, weight=2.0), fn(user_dir, "batch_async", batched=True, weight=0.0))  # fmt: skip
    right, wrong = j([("7", problem()), ("WRONG", problem())])
    assert right.components == {"length": 0.1, "exact": 1.0, "exact/correct": 1.0, "exact/shouting": 0.0, "exact/row_id": 3.0,
                                "half": 0.5, "batch_exact": 1.0, "batch_async": 1.0}  # fmt: skip
    assert right.reward == pytest.approx(0.5 * 0.1 + 1.0 + 0.5 + 2.0 * 1.0)
    assert right.correct and not wrong.correct  # a term's "correct" says so
    assert wrong.reward == pytest.approx(0.5 * 0.5 + 0.5) and wrong.components["exact/shouting"] == 1.0
    assert right.status == wrong.status == "ok" and right.faults == ()


def test_terms_add_to_a_tasks_own_scorer(user_dir):
    """TRL's pattern: the task's correctness plus a format function, each reported."""
    j = judge(fn(user_dir, "length", weight=1.0), scorer="numeric", weights={"correct": 1.0})
    (verdict,) = j([("Answer: 7", problem())])
    assert verdict.correct and verdict.reward == pytest.approx(1.0 + 0.9) and verdict.components["length"] == pytest.approx(0.9)
    assert verdict.components["correct"] == 1.0 and verdict.outcome == "correct"
    (alone,) = judge(fn(user_dir, "length"), correct_at=0.5)([("Answer: 7", problem())])
    assert alone.correct and alone.reward == pytest.approx(0.9)  # no "correct" from any term: the reward reaches correct_at


@pytest.mark.parametrize("text", ["boom", "none", "str", "nan", "dict"])
def test_a_failing_function_is_masked_by_default_never_a_silent_zero(user_dir, text, caplog):
    name = "raises" if text == "boom" else "wrong_type"
    j = judge(fn(user_dir, name), fn(user_dir, "length"))
    with caplog.at_level(logging.ERROR, logger="rewards.terms"):
        bad, good = j([(text, problem()), ("fine", problem())])
    assert bad.status == "masked" and bad.faults == (name,) and bad.outcome == "reward_error"
    assert {"boom": "KeyError", "none": "NoneType", "str": "str 'abc'", "nan": "nan", "dict": "without 'reward'"}[text] in bad.error
    assert good.status == "ok" and good.reward == pytest.approx(1.0 + 0.4)
    metrics = sample_metrics([_sample(text), _sample("fine")], [bad, good], "train")
    assert metrics["train/masked_share"] == 0.5 and metrics[f"train/reward_errors/{name}"] == 1.0


def test_on_error_zero_scores_zero_and_counts_it_and_stop_stops(user_dir):
    (zeroed,) = judge(fn(user_dir, "raises", on_error="zero"), fn(user_dir, "length"))([("boom", problem())])
    assert zeroed.status == "ok" and zeroed.components["raises"] == 0.0 and zeroed.reward == pytest.approx(0.4) and zeroed.faults == ("raises",)
    (stopped,) = judge(fn(user_dir, "raises", on_error="stop"))([("boom", problem())])
    assert stopped.status == "stop" and "KeyError" in stopped.error


def test_the_first_traceback_of_each_function_is_logged_once_per_process(user_dir, caplog):
    j = judge(fn(user_dir, "raises", name="raises_once"))
    with caplog.at_level(logging.ERROR, logger="rewards.terms"):
        j([("boom", problem()), ("boom", problem())])
        j([("boom", problem())])
    logged = [r for r in caplog.records if "raises_once" in r.getMessage()]
    assert len(logged) == 1 and logged[0].exc_info is not None and "KeyError" in "".join(__import__("traceback").format_exception(*logged[0].exc_info))


def test_a_batched_failure_is_narrowed_to_the_sample_that_caused_it(user_dir):
    verdicts = judge(fn(user_dir, "batch_breaks_on_boom", batched=True))([("a", problem()), ("boom", problem()), ("c", problem())])
    assert [v.status for v in verdicts] == ["ok", "masked", "ok"] and "boom in the batch" in verdicts[1].error


def test_async_functions_share_one_loop_and_awaitables_and_numpy_values_count(user_dir):
    j = judge(fn(user_dir, "limited"), fn(user_dir, "scorer_object", name="obj"), fn(user_dir, "numpy_values", batched=True, weight=0.0),
              fn(user_dir, "numpy_scalar", name="np"))  # fmt: skip
    for _ in range(3):  # the module's semaphore is bound to the term's loop: every call uses that loop
        verdicts = j([("ab", problem()), ("abc", problem())])
        assert [v.status for v in verdicts] == ["ok", "ok"], [v.error for v in verdicts]
    assert verdicts[1].components == {"limited": 1.0, "obj": 0.25, "numpy_values": 3.0, "np": 0.5, "np/hits": 2.0}


def test_a_batched_function_returning_the_wrong_count_fails_every_sample(user_dir):
    verdicts = judge(fn(user_dir, "batch_short", batched=True))([("a", problem()), ("b", problem())])
    assert [v.status for v in verdicts] == ["masked", "masked"] and "returned 1 values for 2 samples" in verdicts[0].error


def test_bad_paths_and_signatures_are_named_errors(user_dir, tmp_path):
    with pytest.raises(ValueError, match="must be 'package.module:function'"):
        import_function("my_rewards.scores")
    with pytest.raises(ValueError, match="cannot import no_such_pkg"):
        import_function("no_such_pkg.mod:fn", (user_dir,))
    with pytest.raises(ValueError, match="has no function 'nope'"):
        import_function("my_rewards.scores:nope", (user_dir,))
    with pytest.raises(ValueError, match=r"parameters \['temperature'\] are not among"):
        Judge(ScorerSpec(scorer="reward", terms=(fn(user_dir, "needs_more"),)))
    with pytest.raises(ValueError, match=r"\['completion'\] are positional-only"):
        Judge(ScorerSpec(scorer="reward", terms=(fn(user_dir, "positional"),)))
    (tmp_path / "with_dataclass.py").write_text(
        "from __future__ import annotations\nimport dataclasses\n@dataclasses.dataclass\nclass Hit:\n    score: float\n"
        "def score(completion):\n    return Hit(0.75).score\n")
    assert import_function("with_dataclass.py:score", (str(tmp_path),))("x") == 0.75
    (tmp_path / "loose.py").write_text("def score(completion):\n    return 0.25\n")
    assert import_function("loose.py:score", (str(tmp_path),))("x") == 0.25  # a file beside the config
    with pytest.raises(ValueError, match="scores with the run's reward terms, and none is configured"):
        Judge(ScorerSpec(scorer="reward"))


def test_values_a_term_may_return():
    assert value_of("t", True) == (1.0, {}) and value_of("t", 3) == (3.0, {})
    assert value_of("t", {"reward": 0.5, "correct": False, "n": 2}) == (0.5, {"correct": 0.0, "n": 2.0})
    import numpy as np

    assert value_of("t", np.float32(0.5)) == (0.5, {}) and value_of("t", np.bool_(True)) == (1.0, {})
    for bad in (None, "1", [1.0], math.inf, np.float64("nan"), {"reward": "x"}, {"reward": 1.0, "note": "text"}):
        with pytest.raises(TermFailure):
            value_of("t", bad)


def _sample(text: str) -> Sample:
    prompt = Prompt(problem(), "p", (1,))
    return Sample(prompt, Completion((1,), text, (-0.1,), "stop"), PolicyRef(), 0)


# -- through the verifier pool (real Ray actors) ---------------------------------------------


def pool(ray_cluster, *terms, **settings) -> VerifierPool:
    spec = ScorerSpec(scorer="reward", terms=terms)
    defaults = {"min_verifiers": 2, "max_verifiers": 2, "samples_per_call": 2, "max_retries": 1, "timeout_s": 5.0}
    return VerifierPool(lambda: TaskJudge({"mine": spec}), VerifierPoolSettings(**(defaults | settings)))


@pytest.mark.slow
def test_in_the_pool_masks_are_not_retried_a_hang_is_the_pools_timeout_and_stop_raises(ray_cluster, user_dir):
    p = pool(ray_cluster, fn(user_dir, "raises"), fn(user_dir, "hang"))
    try:
        verdicts = p.score_items([("fine", problem()), ("boom", problem()), ("hang", problem()), ("ok", problem())])
        assert [v.status for v in verdicts] == ["ok", "masked", "infra_error", "ok"]
        assert "timed out" in verdicts[2].error and p.stats["verifier/retries"] == 2  # the hang: its job (2 samples), then alone
        assert p.stats["verifier/verdict/reward_error"] == 1.0
    finally:
        p.kill()
    stopper = pool(ray_cluster, fn(user_dir, "raises", on_error="stop"))
    try:
        with pytest.raises(RewardStopError, match="KeyError"):
            stopper.score_items([("fine", problem()), ("boom", problem())])
    finally:
        stopper.kill()


def http(url: str, **settings) -> HttpReward:
    return HttpReward(url=url, **({"timeout_s": 1.0, "retries": 1, "batch_size": 2, "per_actor": 1} | settings))


@pytest.mark.slow
def test_an_http_server_that_answers_hangs_fails_returns_garbage_and_dies(ray_cluster):
    batch = [(text, problem()) for text in ("aaaa", "abab", "bbbb", "a", "ba", "xyz")]
    with RewardServer() as server:
        p = pool(ray_cluster, http(server.url, max_concurrency=2), samples_per_call=3)
        try:
            verdicts = p.score_items(batch)
            assert [v.reward for v in verdicts] == pytest.approx([1.0, 0.5, 0.0, 1.0, 0.5, 0.0])
            assert verdicts[0].components == {"http": 1.0, "http/length": 4.0} and all(v.status == "ok" for v in verdicts)
            sent = next(s for s in server.samples if s["completion"] == "aaaa")
            assert len(server.samples) == 6 and sent == {
                "uid": "u7", "task": "mine", "question": "What is 3 + 4?", "completion": "aaaa", "answer": "7", "example": {"id": 3}}
            assert server.most_in_flight <= 2  # two actors, one request each
            for mode, error in (("500", "HTTP 500"), ("garbage", "JSONDecodeError"), ("short", "is not {'rewards': [2 values]}"), ("hang", "timed out")):
                server.mode, server.requests = mode, 0
                started = time.monotonic()
                verdicts = p.score_items(batch[:2])
                assert [v.status for v in verdicts] == ["masked", "masked"], mode
                assert error in verdicts[0].error and "after 1 retries" in verdicts[0].error and verdicts[0].faults == ("http",)
                assert server.requests == 2, mode  # the request and its one retry
                assert time.monotonic() - started < 10
            server.mode, server.requests = "413", 0
            verdicts = p.score_items(batch[:2])  # too large for the server: sent again one sample at a time
            assert [v.status for v in verdicts] == ["ok", "ok"] and server.requests == 3
            server.mode = "ok"
            server.stop()  # dies: connection refused
            verdicts = p.score_items(batch[:2])
            assert [v.status for v in verdicts] == ["masked", "masked"] and "Connection refused" in verdicts[0].error
        finally:
            p.kill()


@pytest.mark.parametrize(
    ("parse", "reply", "value"),
    [("number", "7", 0.7), ("number", "Rating: 8", 0.8), ("number", "I rate it 7/10", 0.7), ("number", "Score - 9. Since 3 + 4 = 7", 0.9),
     ("number", "The answer 12 is wrong: 2", None), ("number", "11", None), ("number", "no idea", None),
     ("letter", "A clear answer. Grade: C", 0.5), ("letter", "B", 0.75), ("letter", "(D) because", 0.25), ("letter", "A good try", None),
     ("yes_no", "Yes.", 1.0), ("yes_no", "Answer: no", 0.0), ("yes_no", "I think no one would", None)],
)  # fmt: skip
def test_a_judgement_is_read_where_a_judge_states_it_not_from_quoted_text(parse, reply, value):
    """A number or a letter quoted from the judged text (or an article "A") is no verdict."""
    from rewards.terms import JudgeSettings, parse_judgement

    if value is None:
        with pytest.raises(TermFailure, match=f"does not parse as {parse}"):
            parse_judgement(reply, JudgeSettings(parse=parse))
    else:
        assert parse_judgement(reply, JudgeSettings(parse=parse)) == pytest.approx(value)
