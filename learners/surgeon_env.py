"""The surgeon's environment: a ``gymnasium.Env`` whose steps are the training run's (what it
simplifies: ``learners.surgery``). Its own module, so that the policy's import of the controls
does not pull in gymnasium."""

from __future__ import annotations

import math
from typing import Callable

import gymnasium as gym
import numpy as np

from learners.surgery import Granularity, action_size, apply_action, observation, observation_size, window_mean


class SurgeonEnv(gym.Env):
    """The surgeon's environment: one step = one change of the attention scales, then
    ``horizon`` steps of the language-model run (see the module docstring).

    ``run_window(scales)`` is the run: it applies the scales, runs up to ``horizon`` steps and
    returns their metrics (fewer when a phase or the run ends: a truncation). Without it the
    environment only describes its spaces (what RLlib needs to build the agent).
    ``reset(options={"window": [metrics...]})`` starts from the steps before the surgery.
    """

    metadata: dict = {}

    def __init__(self, config: dict | None = None, run_window: Callable[[np.ndarray], list[dict]] | None = None):
        config = dict(config or {})
        self.layers, self.heads = int(config.get("layers", 1)), int(config.get("heads", 1))
        self.granularity: Granularity = config.get("granularity", "layer")
        self.horizon = int(config.get("horizon", 1))
        self.max_delta = float(config.get("max_delta", 0.01))
        self.bounds = (float(config.get("scale_min", 0.5)), float(config.get("scale_max", 1.5)))
        self.reward_metric = config.get("reward_metric", "train/reward_mean")
        self.run_window = run_window
        n_act = action_size(self.layers, self.heads, self.granularity)
        n_obs = observation_size(self.layers, self.heads, self.granularity)
        self.action_space = gym.spaces.Box(-1.0, 1.0, (n_act,), np.float32)
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (n_obs,), np.float32)
        self.scales = np.ones((self.layers, self.heads), np.float32)
        self.baseline = float("nan")  # the metric's mean over the window before the current one
        self._delta = np.zeros(n_act, np.float32)  # the last action's change of the scales

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        options = options or {}
        window = list(options.get("window", []))
        if "scales" in options:
            self.scales = np.asarray(options["scales"], np.float32).reshape(self.layers, self.heads)
        self.baseline = window_mean(window, self.reward_metric)
        return observation(window, self.scales, self.granularity), {}

    def act(self, action) -> np.ndarray:
        """Apply the surgeon's action: the new scales (the run serves them before the window)."""
        self.scales, self._delta = apply_action(self.scales, action, self.max_delta, self.bounds, self.granularity)
        return self.scales

    def judge(self, window: list[dict]):
        """The transition after a window of the run under the acted scales: (observation,
        reward, terminated, truncated, info), as ``step`` returns them. ``window``: the metrics
        of its steps (fewer than ``horizon`` when a phase or the run ended: a truncation)."""
        after = window_mean(window, self.reward_metric)
        # r = mean(metric | window after the change) - mean(metric | window before); 0 if either is missing
        reward = after - self.baseline if math.isfinite(after) and math.isfinite(self.baseline) else 0.0
        if math.isfinite(after):
            self.baseline = after
        info = {
            "surgery/action_magnitude": float(np.abs(self._delta).mean()),
            "surgery/reward_improvement": reward,
            "surgery/scale_mean": float(self.scales.mean()),
            "surgery/scale_min": float(self.scales.min()),
            "surgery/scale_max": float(self.scales.max()),
            "surgery/window_steps": float(len(window)),
        }
        truncated = len(window) < self.horizon
        return observation(window, self.scales, self.granularity), float(reward), False, truncated, info

    def step(self, action):
        """Gymnasium's step: act, run the window (``run_window``), judge it. The training loop
        calls ``act`` and ``judge`` itself, around the steps it runs (``cluster.features.surgery``)."""
        if self.run_window is None:
            raise RuntimeError("this SurgeonEnv describes spaces only: its steps are the training run's (give run_window)")
        return self.judge(self.run_window(self.act(action)))
