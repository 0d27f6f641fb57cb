"""On-policy distillation (``reward.teacher``, ``cluster.features.distill``).

End to end on real Ray and vLLM: SmolLM2 is the teacher, on its own vLLM actor, scoring the
student's own tokens with prompt log-probs, and the student's reverse KL to it falls. The
student is SmolLM2 cut to its first two layers (``smollm2-2-layers``): the random tiny model
shares the tokenizer but is near-uniform over 49,152 tokens, and its reverse KL did not fall in
30 policy-gradient updates of a plain PyTorch loop (measured while building this), so it
cannot show learning in a test's few steps. The stage's arithmetic (sequence and token mode,
a teacher that fails) is tested without actors, against a stand-in pool."""

from __future__ import annotations

import json

import pytest

from actors.reward_models import TeacherFailure
from cluster.features.distill import TeacherReward
from contracts import Completion, PolicyRef, Problem, Prompt, Sample, Verdict
from helpers import tiny_trainer
from rewards.terms import TeacherSettings

TEACHER = "reward.teacher={model: smollm2, mode: token, weight: 1.0, num_cpus: 1}"
DISTILL = ["algorithm.kl_coef=0.0", "algorithm.drop_zero_variance_groups=false", "eval.at_start=false", "eval.n=4", "run.save_rollouts=false"]


class StandIn:
    """A teacher pool's interface: each token's log-prob is -1, or it fails."""

    restarts = 0
    max_model_len = 8

    def __init__(self, fail: bool = False):
        self.fail, self.calls = fail, []

    def score_tokens(self, sequences, starts):
        self.calls.append((sequences, starts))
        if self.fail:
            raise TeacherFailure("the distillation teacher failed twice: RayActorError")
        return [[-1.0] * (len(seq) - start) for seq, start in zip(sequences, starts)]


def sample(logprobs: tuple[float, ...], replayed: bool = False) -> Sample:
    prompt = Prompt(Problem("u", "q", "a"), "p", (1, 2, 3))
    return Sample(prompt, Completion(tuple(range(10, 10 + len(logprobs))), "text", logprobs, "stop"), PolicyRef(), 0, replayed)


def test_sequence_mode_adds_the_summed_teacher_reward_and_token_mode_fills_the_batch_columns():
    samples = [sample((-2.0, -3.0)), sample((-0.5,)), sample((-4.0,)), sample((), replayed=True)]
    verdicts = [Verdict(1.0, True), Verdict(0.0, False), Verdict.infra_error("gone"), Verdict(1.0, True)]
    pool = StandIn()
    scored, metrics = TeacherReward(TeacherSettings(model="t", mode="sequence", weight=0.5), pool).score(samples, verdicts)
    assert pool.calls == [([[1, 2, 3, 10, 11], [1, 2, 3, 10]], [3, 3])]  # the judged samples' prompt and completion ids
    assert scored[0].reward == pytest.approx(1.0 + 0.5 * 3.0) and scored[0].components == {"teacher": 3.0, "teacher/reverse_kl": -1.5}
    assert scored[1].reward == pytest.approx(-0.25) and scored[2] is verdicts[2] and scored[3] is verdicts[3]
    assert metrics["teacher/reverse_kl"] == pytest.approx((-1.5 + 0.5) / 2) and metrics["teacher/tokens_scored"] == 3.0

    token = TeacherReward(TeacherSettings(model="t", mode="token", weight=2.0), StandIn())
    scored, _ = token.score(samples, verdicts)
    assert scored[0].reward == 1.0 and scored[0].components["teacher"] == 3.0  # the reward goes to the learner per token
    columns = token.columns(samples, scored, [0.5, -0.5, None, 0.0])
    assert columns == {"teacher_logprobs": ((-1.0, -1.0), (-1.0,), ()), "teacher_weights": (2.0, 2.0, 0.0)}


def test_a_failing_teacher_masks_the_steps_samples_never_scoring_them_zero():
    samples, verdicts = [sample((-2.0,)), sample((-1.0,))], [Verdict(1.0, True), Verdict.infra_error("x")]
    scored, _ = TeacherReward(TeacherSettings(model="t"), StandIn(fail=True)).score(samples, verdicts)
    assert scored[0].status == "masked" and scored[0].faults == ("teacher",) and "failed twice" in scored[0].error
    assert scored[1] is verdicts[1]
    # a sample longer than the teacher's engine takes is masked alone; the others are scored
    pool = StandIn()
    scored, metrics = TeacherReward(TeacherSettings(model="t"), pool).score([sample((-1.0,) * 5), sample((-1.0,))], [Verdict(1.0, True)] * 2)
    assert scored[0].status == "masked" and "do not fit the teacher's max_model_len 8" in scored[0].error and "(8 tokens)" in scored[0].error
    assert scored[1].status == "ok" and len(pool.calls[0][0]) == 1 and metrics["teacher/masked"] == 1.0


@pytest.mark.slow
def test_the_student_reverse_kl_to_the_teacher_falls(ray_cluster, tiny_model_path, tmp_path):
    overrides = [TEACHER, *DISTILL, "run.steps=8", "model.path=smollm2-2-layers", "model.train=full", "algorithm.lr=1e-4", "algorithm.whiten_advantages=true"]
    trainer = tiny_trainer(tiny_model_path, tmp_path / "run", *overrides, scorer=None)
    try:
        trainer.train(trainer.config.run.steps)
    finally:
        trainer.shutdown()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if json.loads(line)["step"] > 0]
    kl = [r["teacher/reverse_kl"] for r in rows]
    assert len(kl) == 8 and all(r["train/masked_share"] == 0.0 for r in rows)
    assert sum(kl[-3:]) / 3 < sum(kl[:3]) / 3 - 0.5, kl  # measured: 5.37, 4.38, 4.47 ... 3.56, 3.71, 3.35


def test_settings_a_teacher_cannot_run_with_are_refused(tmp_path, tiny_model_path):
    from cluster.config import ConfigError, load_config
    from cluster.loop.wiring import same_tokenizer

    base = ["reward.teacher={model: smollm2}", "algorithm.drop_zero_variance_groups=false"]
    for extra, message in [("rollout.temperature=0.7", "temperature=1.0"), ("algorithm.drop_zero_variance_groups=true", "groups whose verifier rewards tie"),
                           ("bank.enabled=true", "the solution bank replays"), ("markovian.enabled=true", "markovian")]:  # fmt: skip
        with pytest.raises(ConfigError, match=message):
            load_config("configs/tiny.yaml", [*base, extra])
    from transformers import AutoTokenizer

    other = AutoTokenizer.from_pretrained(tiny_model_path)
    other.add_tokens(["<not-in-the-student>"])
    other.save_pretrained(tmp_path / "other")
    (tmp_path / "other" / "config.json").write_text("{}")
    same_tokenizer(tiny_model_path, tiny_model_path)
    with pytest.raises(ValueError, match="has another tokenizer than the student"):
        same_tokenizer(tiny_model_path, str(tmp_path / "other"))
