"""The verifier pool on real Ray actors (and, for code, the real sandbox): a verifier that dies
or hangs is replaced and its samples retried; a hanging sample is isolated from the others;
sandbox errors are retried, then masked, never scored 0; the pool grows with the queue and
shrinks back; its metrics count what happened."""

from __future__ import annotations

import dataclasses
import functools
import os
import statistics
import sys
import time
from pathlib import Path

import pytest
import ray

from actors.verifier import VerifierPool, VerifierPoolSettings
from rewards.sandbox import SandboxLimits
from rewards.scoring import SandboxSettings, ScorerSpec, build_scorer
from contracts import Problem, Verdict

pytestmark = pytest.mark.slow
# Ray workers cannot import this test module: ship its functions (the scorers) by value
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

PROBLEM = Problem(uid="p", question="q", answer="7")


def items(n: int) -> list[tuple[str, Problem]]:
    return [("Answer: 7" if i % 2 else "8", PROBLEM) for i in range(n)]


def exact(completion: str, problem: Problem) -> Verdict:
    correct = completion.endswith(problem.answer)
    return Verdict(reward=float(correct), correct=correct)


def fail_once(marker: Path, how: str):
    """A scorer factory whose first call (over all actors) kills its process or hangs."""

    def scorer(completion: str, problem: Problem) -> Verdict:
        try:
            marker.touch(exist_ok=False)
        except FileExistsError:
            return exact(completion, problem)
        if how == "die":
            os._exit(1)
        time.sleep(60)
        return exact(completion, problem)

    return lambda: scorer


def always_die(completion: str, problem: Problem) -> Verdict:
    os._exit(1)


def hang_on(text: str):
    def scorer(completion: str, problem: Problem) -> Verdict:
        if completion == text:
            time.sleep(60)
        return exact(completion, problem)

    return lambda: scorer


def flaky_sandbox(marker: Path, failures: int):
    """Reports a sandbox error for the first ``failures`` calls (counted in a file across actors)."""

    def scorer(completion: str, problem: Problem) -> Verdict:
        count = int(marker.read_text()) if marker.exists() else 0
        marker.write_text(str(count + 1))
        if count < failures:
            return Verdict.infra_error("sandbox_error: bwrap: creating new namespace failed", outcome="sandbox_error")
        return exact(completion, problem)

    return lambda: scorer


@pytest.mark.parametrize("how", ["die", "hang"])
def test_dead_or_hung_verifier_is_replaced_and_retried(ray_cluster, tmp_path, how):
    pool = VerifierPool(fail_once(tmp_path / "failed", how), VerifierPoolSettings(min_verifiers=1, max_verifiers=1, timeout_s=3.0, max_retries=2))
    verdicts = pool.score_items(items(4))
    assert [v.reward for v in verdicts] == [0.0, 1.0, 0.0, 1.0]
    assert all(v.status == "ok" for v in verdicts)
    assert pool.stats["verifier/restarts"] == 1 and pool.stats["verifier/infra_errors"] == 0
    assert pool.stats["verifier/retries"] == 4  # the whole first job, one sample at a time
    pool.kill()


def test_persistent_failure_masks_instead_of_scoring_zero(ray_cluster):
    pool = VerifierPool(lambda: always_die, VerifierPoolSettings(min_verifiers=2, max_verifiers=2, timeout_s=5.0, max_retries=1))
    verdicts = pool.score_items(items(4))
    assert all(v.status == "infra_error" and "verifier died" in v.error for v in verdicts)
    assert pool.stats["verifier/infra_errors"] == 4 and pool.stats["verifier/verdict/infra_error"] == 4
    pool.kill()


def test_a_hanging_sample_does_not_take_its_job_down(ray_cluster):
    batch = [(f"Answer: {i}", Problem(uid=str(i), question="q", answer=str(i))) for i in range(6)]
    batch[2] = ("hang", batch[2][1])
    pool = VerifierPool(hang_on("hang"), VerifierPoolSettings(min_verifiers=2, max_verifiers=2, timeout_s=1.5, max_retries=1, samples_per_call=3))
    verdicts = pool.score_items(batch)
    assert [v.status for v in verdicts] == ["ok", "ok", "infra_error", "ok", "ok", "ok"]
    assert all(v.correct for i, v in enumerate(verdicts) if i != 2)
    assert "timed out" in verdicts[2].error
    pool.kill()


def test_sandbox_errors_are_retried_then_masked(ray_cluster, tmp_path):
    pool = VerifierPool(flaky_sandbox(tmp_path / "calls", failures=2), VerifierPoolSettings(min_verifiers=1, max_verifiers=1, max_retries=2, samples_per_call=1))
    verdicts = pool.score_items(items(1))
    assert verdicts[0].status == "ok" and pool.stats["verifier/retries"] == 2
    pool = VerifierPool(flaky_sandbox(tmp_path / "calls2", failures=99), VerifierPoolSettings(min_verifiers=1, max_verifiers=1, max_retries=2))
    verdicts = pool.score_items(items(2))
    assert all(v.status == "infra_error" and v.outcome == "sandbox_error" for v in verdicts)
    assert pool.stats["verifier/verdict/sandbox_error"] == 2
    pool.kill()


def test_pool_keeps_sample_order_and_scales_with_the_queue(ray_cluster):
    pool = VerifierPool(lambda: exact, VerifierPoolSettings(min_verifiers=1, max_verifiers=3, samples_per_verifier=4, samples_per_call=2, scale_down_after=2))
    assert len(pool.actors) == 1
    verdicts = pool.score_items(items(11))  # 11 waiting at 4 per actor: 3 actors
    assert [v.correct for v in verdicts] == [i % 2 == 1 for i in range(11)]
    assert len(pool.actors) == 3 and pool.stats["verifier/size"] == 3
    assert pool.stats["verifier/queue_depth"] == 11 and pool.stats["verifier/executions_per_second"] > 0
    assert pool.stats["verifier/verdict/correct"] == 5 and pool.stats["verifier/verdict/wrong"] == 6
    pool.score_items(items(2))
    assert len(pool.actors) == 3  # one quiet call is not enough to shrink
    pool.score_items(items(2))
    assert len(pool.actors) == 1
    pool.kill()


def test_scorer_that_cannot_start_fails_the_pool_at_once(ray_cluster):
    settings = ScorerSpec(scorer="code", sandbox=SandboxSettings(python="/nowhere/python3"))
    with pytest.raises(RuntimeError, match="verifier actors could not start.*does not exist"):
        VerifierPool(functools.partial(build_scorer, settings), VerifierPoolSettings(min_verifiers=1, max_verifiers=1))


def test_code_is_scored_in_the_sandbox_through_the_pool(ray_cluster):
    """Two actors, each with its own sandbox uid; a fork bomb next to correct code."""
    add = Problem("add", "q", "", meta={"entry_point": "add", "tests": [[[1, 2], 3], [[5, 5], 10]]})
    batch = [
        ("def add(a, b):\n    return a + b\n", add),
        ("import os\nwhile True:\n    os.fork()\n", add),
        ("def add(a, b):\n    return a - b\n", add),
        ("def add(a, b):\n    while True: pass\n", add),
    ]
    pool = VerifierPool(functools.partial(build_scorer, ScorerSpec(scorer="code")), VerifierPoolSettings(min_verifiers=2, max_verifiers=2, samples_per_call=1))
    verdicts = pool.score_items(batch)
    assert [v.outcome for v in verdicts][::2] == ["passed", "failed"]
    assert verdicts[1].outcome in ("error", "timeout") and verdicts[3].outcome == "timeout"
    assert all(v.status == "ok" for v in verdicts)
    pool.kill()


def timed_scorer(spec: ScorerSpec):
    """The configured scorer, with each sample's scoring time in ``components['seconds']``."""
    scorer = build_scorer(spec)

    def timed(completion: str, problem: Problem) -> Verdict:
        start = time.perf_counter()
        verdict = scorer(completion, problem)
        return dataclasses.replace(verdict, components={**verdict.components, "seconds": time.perf_counter() - start})

    return timed


RIGHT, WRONG = "def add(a, b):\n    return a + b\n", "def add(a, b):\n    return a - b\n"
HOSTILE = {
    "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n": ("timeout", "error"),  # fork bomb
    "def add(a, b):\n    while True:\n        pass\n": ("timeout",),  # infinite loop
    "x = []\nwhile True:\n    x.append(bytearray(1 << 20))\n": ("memory", "error"),  # memory hog
}


def test_hostile_samples_at_full_concurrency_neither_corrupt_nor_slow_the_honest_ones(ray_cluster):
    """The pool at full concurrency (2 verifiers, one sample per call, each with its sandbox)
    scores 24 honest programs alone, then the same 24 with 2 fork bombs, 2 infinite loops and
    2 memory hogs among them. Every honest verdict is the same and right, each hostile one a
    typed failure (not an infrastructure error, not a retry), and an honest program's scoring
    time beside the hostile ones stays within 2x of the clean run's (the median; the batch as a
    whole waits for the hostile programs' wall-clock limit, by design)."""
    add = Problem("add", "q", "", meta={"entry_point": "add", "tests": [[[1, 2], 3], [[5, 5], 10]]})
    spec = ScorerSpec(scorer="code", sandbox=SandboxSettings(limits=SandboxLimits(wall_s=2.0, cpu_s=2)))
    pool = VerifierPool(functools.partial(timed_scorer, spec), VerifierPoolSettings(min_verifiers=2, max_verifiers=2, samples_per_call=1, max_retries=0))
    honest = [(RIGHT if i % 2 else WRONG, add) for i in range(24)]
    mixed = list(honest)
    for i, source in enumerate([s for s in HOSTILE for _ in range(2)]):
        mixed.insert(4 * i + 2, (source, add))
    try:
        pool.score_items(honest[:2])  # warm: the actors' sandboxes are open
        clean = pool.score_items(honest)
        beside = pool.score_items(mixed)
    finally:
        pool.kill()
    expected = ["passed" if text == RIGHT else "failed" for text, _ in honest]
    assert [v.outcome for v in clean] == expected
    honest_beside = [v for (text, _), v in zip(mixed, beside) if text in (RIGHT, WRONG)]
    assert [v.outcome for v in honest_beside] == expected
    for (text, _), verdict in zip(mixed, beside):
        if text in HOSTILE:
            assert verdict.status == "ok" and verdict.outcome in HOSTILE[text], (text, verdict)
    seconds = lambda verdicts: statistics.median(v.components["seconds"] for v in verdicts)  # noqa: E731
    print(f"honest median {seconds(honest_beside):.4f} s beside hostile, {seconds(clean):.4f} s alone")
    assert seconds(honest_beside) <= 2 * seconds(clean), (seconds(honest_beside), seconds(clean))
    assert pool.stats["verifier/restarts"] == 0 and pool.stats["verifier/retries"] == 0
