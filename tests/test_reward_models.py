"""Rewards that need a model of their own, on real Ray actors behind the real verifier pool:
a tiny random sequence classifier as the reward model (its scores equal the model's own
forward pass, requests from several verifiers are batched together, a killed server is
restarted by Ray and its samples masked meanwhile, never scored 0), and SmolLM2 as an LLM
judge on its own vLLM engine (replies parsed; an unparseable one masked and counted)."""

from __future__ import annotations

import dataclasses
import sys

import pytest
import ray

from actors.reward_models import RewardServices, ServedTerm
from actors.verifier import VerifierPool, VerifierPoolSettings
from contracts import Problem
from helpers import kill_actor
from rewards.scoring import ScorerSpec, TaskJudge
from rewards.terms import JudgeSettings, RewardModelSettings
from rollout.engines import EngineSettings
from rollout.models import build_tiny_classifier, prepare_smollm2

pytestmark = pytest.mark.slow
# Ray workers cannot import this test module: ship its classes by value
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

PROBLEM = Problem(uid="u", question="What is 2 + 2?", answer="4", task="mine")
TEXTS = ["4", "The answer is 4.", "five", "I do not know, maybe 22?", "4!!!!", "Answer: 4", "x" * 50, "two plus two is four"]


def pool(*terms, **settings) -> VerifierPool:
    spec = ScorerSpec(scorer="reward", terms=terms)
    defaults = {"min_verifiers": 2, "max_verifiers": 2, "samples_per_call": 2, "max_retries": 0, "timeout_s": 60.0}
    return VerifierPool(lambda: TaskJudge({"mine": spec}), VerifierPoolSettings(**(defaults | settings)))


def direct_scores(texts: list[str]) -> list[float]:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = build_tiny_classifier()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    scores = []
    for text in texts:  # one at a time: no padding involved
        chat = tokenizer.apply_chat_template([{"role": "user", "content": PROBLEM.question}, {"role": "assistant", "content": text}], tokenize=False)
        with torch.inference_mode():
            scores.append(model(**tokenizer(chat, return_tensors="pt", add_special_tokens=False)).logits[0, 0].item())
    return scores


def test_a_reward_model_scores_batches_across_verifiers_and_survives_a_killed_server(ray_cluster):
    settings = RewardModelSettings(path="tiny-classifier", num_cpus=0.5, batch_size=16, max_wait_ms=300, timeout_s=30, retries=2)
    services = RewardServices(settings, None)
    verifiers = pool(*services.terms)
    try:
        verdicts = verifiers.score_items([(t, PROBLEM) for t in TEXTS])
        assert all(v.status == "ok" for v in verdicts)
        assert [v.reward for v in verdicts] == pytest.approx(direct_scores(TEXTS), abs=1e-4)
        assert [v.components["reward_model"] for v in verdicts] == pytest.approx([v.reward for v in verdicts])
        counters = ray.get(services.actors[0].counters.remote())
        assert counters["samples"] == len(TEXTS)
        requests = [services.actors[0].score.remote([(PROBLEM.question, t)]) for t in TEXTS]  # eight callers at once
        assert [s for (s,) in ray.get(requests)] == pytest.approx(direct_scores(TEXTS), abs=1e-4)
        batched = ray.get(services.actors[0].counters.remote())
        assert batched["samples"] - counters["samples"] == 8 and batched["batches"] - counters["batches"] < 8  # gathered together

        ray.kill(services.actors[0], no_restart=False)  # Ray restarts it
        verdicts = verifiers.score_items([(t, PROBLEM) for t in TEXTS[:4]])
        assert all(v.status in ("ok", "masked") for v in verdicts)
        assert all(v.reward == pytest.approx(s, abs=1e-4) for v, s in zip(verdicts, direct_scores(TEXTS[:4])) if v.status == "ok")
        assert all("reward_model" in v.faults and "reward_model server" in v.error for v in verdicts if v.status == "masked")
        again = verifiers.score_items([(t, PROBLEM) for t in TEXTS[:2]])
        assert [v.status for v in again] == ["ok", "ok"]  # the restarted server answers
    finally:
        verifiers.kill()
        services.kill()


def test_smollm2_judges_and_an_unparseable_judgement_is_masked(ray_cluster):
    judge = JudgeSettings(model="smollm2", num_cpus=1, max_tokens=8, timeout_s=120)
    engine = EngineSettings(dtype="float32", max_model_len=512, kv_cache_gib=1, threads=1)
    env = {"OMP_NUM_THREADS": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1"}
    services = RewardServices(None, judge, str(prepare_smollm2()), engine, env)
    (term,) = services.terms
    never = dataclasses.replace(term, name="picky", judge=dataclasses.replace(judge, parse="letter", letters="QZ"))
    verifiers = pool(never)
    try:
        replies = ray.get(services.actors[0].judge.remote(["Rate the answer '4' to 'What is 2 + 2?' from 0 to 10. Reply with the rating only."], 8))
        assert len(replies) == 1 and isinstance(replies[0], str)
        verdicts = verifiers.score_items([(t, PROBLEM) for t in TEXTS[:4]])
        assert all(v.status == "masked" and v.faults == ("picky",) for v in verdicts)  # no Q or Z in a rating
        assert all("does not parse as letter" in v.error for v in verdicts)
        alone = pool(term)
        try:
            judged = alone.score_items([(t, PROBLEM) for t in TEXTS[:4]])
        finally:
            alone.kill()
        parsed = [v for v in judged if v.status == "ok"]
        assert parsed, [v.error for v in judged]  # SmolLM2 answers with a rating
        assert all(0.0 <= v.components["judge"] <= 1.0 and v.reward == v.components["judge"] for v in parsed)
        assert all(v.status == "masked" and v.faults == ("judge",) for v in judged if v.status != "ok")
    finally:
        verifiers.kill()
        services.kill()


def test_a_judge_server_that_is_gone_masks_its_samples(ray_cluster):
    """Its actor killed for good: each retry fails at once, and every sample gets the failure."""
    handle = ray.remote(num_cpus=0)(_Echo).remote()
    assert ray.get(handle.judge.remote(["any prompt"], 4)) == ["Score: 7"]
    term = ServedTerm("judge", 1.0, "mask", 5.0, 1, (handle,), JudgeSettings(model="x"))
    assert term([("4", PROBLEM)]) == [pytest.approx(0.7)]  # the reply "parsed" as a rating
    kill_actor(handle)
    values = term([("4", PROBLEM), ("5", PROBLEM)])
    assert len(values) == 2 and all("judge server:" in str(v) and "after 1 retries" in str(v) for v in values), values


class _Echo:
    """A judge that rates everything 7."""

    def judge(self, prompts, max_tokens):
        return ["Score: 7"] * len(prompts)
