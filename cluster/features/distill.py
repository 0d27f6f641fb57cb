"""On-policy distillation (``reward.teacher``), plugged into the loop's stages: ``TeacherReward``
is a ``ModelReward`` (the teacher's log-probs of the student's own tokens, asked of the
teacher's vLLM actors before the advantages) and, in ``token`` mode, the ``Columns`` that put
them in the batch for the learner.

For each judged sample the student's log-probs are the generator's (temperature 1, the
quantity the learner recomputes) and the teacher's are ``TeacherPool.score_tokens`` of the
prompt and completion. The per-token reward is the negative reverse KL, log pi_teacher -
log pi_student, as in the on-policy distillation of verl, prime-rl, NeMo-RL, AReaL and TRL:

- ``sequence``: its sum, times ``weight``, is added to the sample's reward (the component
  ``teacher`` is the sum itself), and the outcome estimator sees it like any reward;
- ``token``: the learner adds ``weight`` times each token's own reward to that token's
  advantage (outcome estimators: discount 0; ``reinforce++`` / ``gae``: a token reward;
  ``TrainBatch.teacher_logprobs``; the student's side is the learner's own log-prob).

Either way the step reports ``teacher/reverse_kl`` (per token, over the judged samples): a
student learning from its teacher sees it fall. A teacher that fails twice in a step masks the
step's samples (``faults: teacher``), never scoring them 0; so does a sample too long for the
teacher's engine. Replayed samples (the bank's) have no generator log-probs and are left to
the verifiers' reward.
"""

from __future__ import annotations

import dataclasses
import logging
import time

from actors.reward_models import TeacherFailure, TeacherPool
from contracts import Sample, Verdict
from rewards.terms import TeacherSettings

logger = logging.getLogger(__name__)


class TeacherReward:
    """The teacher's reward of a step's samples; see the module docstring."""

    span = "teacher_reward"  # perf/teacher_reward_seconds

    def __init__(self, settings: TeacherSettings, teachers: TeacherPool):
        self.settings, self.teachers = settings, teachers
        self.by_completion: dict[int, tuple[float, ...]] = {}  # id(completion) -> teacher log-probs, this step's

    def score(self, samples: list[Sample], verdicts: list[Verdict]) -> tuple[list[Verdict], dict[str, float]]:
        self.by_completion.clear()
        judged = [i for i, v in enumerate(verdicts) if v.status == "ok" and not samples[i].replayed and samples[i].completion.token_ids]
        if not judged:
            return verdicts, {}
        name = self.settings.name
        out = list(verdicts)
        length = lambda i: len(samples[i].prompt.token_ids) + len(samples[i].completion.token_ids)  # noqa: E731
        overlong = [i for i in judged if length(i) >= self.teachers.max_model_len]  # the teacher's engine cannot take them
        self._mask(out, overlong, f"prompt and completion ({{}} tokens) do not fit the teacher's max_model_len {self.teachers.max_model_len}", length)
        judged = [i for i in judged if length(i) < self.teachers.max_model_len]
        started = time.perf_counter()
        try:
            teacher = self.teachers.score_tokens(
                [list(samples[i].prompt.token_ids) + list(samples[i].completion.token_ids) for i in judged],
                [len(samples[i].prompt.token_ids) for i in judged],
            ) if judged else []  # fmt: skip
        except TeacherFailure as exc:
            logger.error("%s: masking the step's %d samples", exc, len(judged))
            self._mask(out, judged, str(exc))
            return out, {f"{name}/restarts": float(self.teachers.restarts), f"{name}/masked": float(len(judged) + len(overlong))}
        gaps = []
        for i, logprobs in zip(judged, teacher):
            student = samples[i].completion.logprobs
            gap = sum(t - s for t, s in zip(logprobs, student))  # log pi_teacher - log pi_student, summed
            gaps.append(-gap / max(1, len(student)))
            v = verdicts[i]
            components = {**v.components, name: gap, f"{name}/reverse_kl": -gap / max(1, len(student))}
            if self.settings.mode == "sequence":
                out[i] = dataclasses.replace(v, reward=v.reward + self.settings.weight * gap, components=components)
            else:
                out[i] = dataclasses.replace(v, components=components)
                self.by_completion[id(samples[i].completion)] = tuple(logprobs)
        metrics = {
            f"{name}/reverse_kl": sum(gaps) / max(1, len(gaps)),  # per token, the student's sampled tokens
            f"{name}/masked": float(len(overlong)),
            f"{name}/tokens_scored": float(sum(len(samples[i].completion.token_ids) for i in judged)),
            f"{name}/seconds": time.perf_counter() - started,
            f"{name}/restarts": float(self.teachers.restarts),
        }
        return out, metrics

    def _mask(self, out: list[Verdict], indices: list[int], error: str, length=None) -> None:
        for i in indices:
            v = out[i]
            text = error.format(length(i)) if length else error
            out[i] = dataclasses.replace(v, reward=0.0, correct=False, status="masked", error=text[:500], outcome="reward_error", faults=(*v.faults, self.settings.name))

    def columns(self, samples: list[Sample], verdicts: list[Verdict], advantages: list[float | None]) -> dict[str, tuple]:
        """``token`` mode's batch columns: each trained sample's teacher log-probs and weight
        (0 where the teacher did not score it)."""
        trained = [s for s, adv in zip(samples, advantages) if adv is not None]
        logprobs = [self.by_completion.get(id(s.completion), ()) for s in trained]
        return {"teacher_logprobs": tuple(logprobs), "teacher_weights": tuple(self.settings.weight if lp else 0.0 for lp in logprobs)}

    def kill(self) -> None:
        self.teachers.kill()
