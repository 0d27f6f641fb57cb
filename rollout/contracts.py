"""Frozen dataclasses that flow between the stages of a step.

problem (task) -> Prompt (tokenised) -> Completion (engine) -> Sample (+ policy_version)
-> Verdict (verifier) -> the learner's TrainBatch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass(frozen=True)
class Problem:
    """One task instance. ``answer`` never reaches the generator."""

    uid: str
    question: str
    answer: str
    split: Literal["train", "eval"] = "train"
    meta: dict = field(default_factory=dict, hash=False, compare=False)


@dataclass(frozen=True)
class Prompt:
    """A problem rendered through the chat template and tokenised once, by the driver."""

    problem: Problem
    text: str
    token_ids: tuple[int, ...]


@dataclass(frozen=True)
class SamplingSettings:
    """Engine-independent sampling settings. ``temperature == 0`` means greedy."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 64
    stop: tuple[str, ...] = ()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class Completion:
    """One sampled continuation as an engine returns it.

    ``logprobs[i]`` is the log-prob of ``token_ids[i]`` under the sampling distribution at
    temperature 1 (raw logits), the quantity the learner recomputes.
    """

    token_ids: tuple[int, ...]
    text: str
    logprobs: tuple[float, ...]
    finish_reason: str


@dataclass(frozen=True)
class Sample:
    """A completion tied to its prompt and to the policy version that produced it."""

    prompt: Prompt
    completion: Completion
    policy_version: int
    group_index: int


@dataclass(frozen=True)
class Verdict:
    """A verifier's judgement of one sample.

    ``status == "infra_error"`` means the verifier itself failed: the sample is masked out of
    the advantage computation and never scored as reward 0.
    """

    reward: float
    correct: bool
    components: dict[str, float] = field(default_factory=dict, hash=False)
    extracted: str | None = None
    status: Literal["ok", "infra_error"] = "ok"
    error: str | None = None

    @classmethod
    def infra_error(cls, error: str) -> "Verdict":
        return cls(reward=0.0, correct=False, status="infra_error", error=error)


@dataclass(frozen=True)
class TrainBatch:
    """What the learner consumes: one row per sample, token lists unpadded.

    ``old_logprobs`` are the generator's log-probs of the completion tokens; ``advantages`` are
    per sequence; rows with ``loss_weight == 0`` (masked samples) contribute nothing.
    """

    prompt_token_ids: tuple[tuple[int, ...], ...]
    completion_token_ids: tuple[tuple[int, ...], ...]
    old_logprobs: tuple[tuple[float, ...], ...]
    advantages: tuple[float, ...]
    policy_versions: tuple[int, ...]

    @classmethod
    def from_samples(cls, samples: "list[Sample]", advantages: "list[float]") -> "TrainBatch":
        """One row per sample, with the generator's log-probs as ``old_logprobs``."""
        return cls(
            prompt_token_ids=tuple(s.prompt.token_ids for s in samples),
            completion_token_ids=tuple(s.completion.token_ids for s in samples),
            old_logprobs=tuple(s.completion.logprobs for s in samples),
            advantages=tuple(advantages),
            policy_versions=tuple(s.policy_version for s in samples),
        )

    def __len__(self) -> int:
        return len(self.advantages)

    def select(self, indices: list[int]) -> "TrainBatch":
        pick = lambda rows: tuple(rows[i] for i in indices)  # noqa: E731
        return TrainBatch(
            prompt_token_ids=pick(self.prompt_token_ids),
            completion_token_ids=pick(self.completion_token_ids),
            old_logprobs=pick(self.old_logprobs),
            advantages=pick(self.advantages),
            policy_versions=pick(self.policy_versions),
        )


@dataclass(frozen=True)
class AdapterUpdate:
    """What the weight broadcast carries: one policy version's adapter tensors (PEFT keys)
    and its PEFT config, so a receiver can serve it without touching the learner's disk."""

    version: int
    tensors: dict = field(hash=False, compare=False)
    config: dict = field(hash=False, compare=False)
