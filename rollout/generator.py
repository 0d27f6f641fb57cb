"""Generator: owns a generation engine, tags every sample with the policy version it served.

A plain object; ``actors.generator`` wraps it as the Ray generator actor.
"""

from __future__ import annotations

import logging

from rollout.contracts import WeightUpdate, Prompt, Sample, SamplingSettings
from rollout.engines import EngineSettings, build_engine

logger = logging.getLogger(__name__)


class Generator:
    """Serves one policy version at a time; every sample records which one produced it."""

    def __init__(self, settings: EngineSettings, rank: int = 0):
        self.rank = rank
        self.engine = build_engine(settings)
        self.policy_version = -1

    def load_weights(self, update: WeightUpdate) -> int:
        """Serve ``update`` from now on; returns the version now live."""
        self.engine.load_weights(update)
        self.policy_version = update.version
        return self.policy_version

    def serve_base(self) -> int:
        """Serve the base model alone (as version 0), e.g. to evaluate the untrained model."""
        self.engine.serve_base()
        self.policy_version = 0
        return self.policy_version

    def generate(self, prompts: list[Prompt], sampling: SamplingSettings) -> list[Sample]:
        """``sampling.n`` samples per prompt, each group contiguous, tagged with the live version."""
        if self.policy_version < 0:
            raise RuntimeError(f"generator {self.rank} has no policy loaded yet")
        version = self.policy_version
        outputs = self.engine.generate([p.token_ids for p in prompts], sampling)
        return [
            Sample(prompt=prompt, completion=completion, policy_version=version, group_index=i)
            for prompt, completions in zip(prompts, outputs)
            for i, completion in enumerate(completions)
        ]

    def ping(self) -> int:
        return self.policy_version
