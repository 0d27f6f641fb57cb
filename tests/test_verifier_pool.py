"""Fault injection on the verifier pool (real Ray actors): a verifier that dies or hangs is
replaced and its chunk retried; one that keeps failing yields masked samples, never reward 0."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest
import ray

from actors.verifier import VerifierPool
from rollout.contracts import Completion, Problem, Prompt, Sample, Verdict

pytestmark = pytest.mark.slow
# Ray workers cannot import this test module: ship its functions (the scorers) by value
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def samples(n: int) -> list[Sample]:
    prompt = Prompt(Problem(uid="p", question="q", answer="7"), text="q", token_ids=(1,))
    return [Sample(prompt, Completion((2,), "Answer: 7" if i % 2 else "8", (-0.1,), "stop"), 0, i) for i in range(n)]


def exact(completion: str, answer: str) -> Verdict:
    correct = completion.endswith(answer)
    return Verdict(reward=float(correct), correct=correct)


def fail_once(marker: Path, how: str):
    """A scorer whose first call (over all actors) kills its process or hangs."""

    def scorer(completion: str, answer: str) -> Verdict:
        try:
            marker.touch(exist_ok=False)
        except FileExistsError:
            return exact(completion, answer)
        if how == "die":
            os._exit(1)
        time.sleep(60)
        return exact(completion, answer)

    return scorer


def always_die(completion: str, answer: str) -> Verdict:
    os._exit(1)


@pytest.mark.parametrize("how", ["die", "hang"])
def test_dead_or_hung_verifier_is_replaced_and_retried(ray_cluster, tmp_path, how):
    pool = VerifierPool(fail_once(tmp_path / "failed", how), size=1, timeout_s=5.0, max_retries=2)
    verdicts = pool.score(samples(4))
    assert [v.reward for v in verdicts] == [0.0, 1.0, 0.0, 1.0]
    assert all(v.status == "ok" for v in verdicts)
    assert pool.stats["verifier/restarts"] == 1 and pool.stats["verifier/infra_errors"] == 0


def test_persistent_failure_masks_instead_of_scoring_zero(ray_cluster):
    pool = VerifierPool(always_die, size=2, timeout_s=5.0, max_retries=1)
    verdicts = pool.score(samples(4))
    assert all(v.status == "infra_error" for v in verdicts)
    assert all("verifier" in v.error for v in verdicts)
    assert pool.stats["verifier/infra_errors"] == 4 and pool.stats["verifier/restarts"] == 4


def test_pool_keeps_sample_order_across_actors(ray_cluster):
    pool = VerifierPool(exact, size=3)
    verdicts = pool.score(samples(7))
    assert [v.correct for v in verdicts] == [i % 2 == 1 for i in range(7)]
