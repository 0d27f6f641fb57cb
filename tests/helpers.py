"""Helpers shared by test modules (importable: pytest puts tests/ on the path)."""

from __future__ import annotations

from learners.learner import AlgorithmSettings, Learner, LearnerSettings
from learners.policy import LoraSettings


def learner_settings(
    model_path: str,
    lora: LoraSettings | None,
    *,
    total_steps: int = 0,
    threads: int = 0,
    seed: int = 0,
    dtype: str = "float32",
    temperature: float = 1.0,
    **algorithm,
) -> LearnerSettings:
    """A test learner's settings: ``algorithm`` overrides the section's knobs, on top of no
    KL and a token-mean loss (what most hand-computed checks assume)."""
    knobs = AlgorithmSettings(**{"kl_coef": 0.0, "loss_agg": "token-mean", **algorithm})
    return LearnerSettings(model_path, knobs, lora, dtype, temperature, total_steps, seed, threads)


def make_learner(model_path: str, lora: LoraSettings | None, **settings) -> Learner:
    return Learner(learner_settings(model_path, lora, **settings))
