"""The hybrid run: a phase schedule that switches which agent learns, and the surgery that
steps the surgeon's environment through the training run.

Phases (``phases: [{name: grpo, until: 600}, {name: surgery, until: 900}, {name: joint}]``):
- ``grpo``: the language model learns; the surgeon waits (the scales stay where they are);
- ``surgery``: the surgeon acts every ``surgeon.horizon`` steps and learns from the reward
  window after each action; the language model's updates pause (its rollouts are still drawn
  and scored: they are the surgeon's measurements);
- ``joint``: both learn.

``until`` is a phase's last step (steps count from 1); the last phase may leave it out (to the
run's end). A surgeon window never crosses a phase boundary or the run's end: one cut short is
a truncated transition.

Each window: the surgeon's action changes the learner's attention scales (a new policy
version, broadcast to the generators like an adapter), the window's steps run as any other
step, and the transition (observation, action, reward, next observation) goes to the surgeon,
which stores it in RLlib's replay buffer and updates. Its metrics (``surgery/*``, ``sac/*``)
ride on the next recorded step's row (a checkpoint keeps them for a resumed run's first step).

A checkpoint holds the surgeon (RLlib's checkpoint and its replay buffer), the environment's
state (the scales, the last observation and reward baseline) and, through the learner's state,
the scales themselves; a run resumed in the middle of a window starts a new window there.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Literal

import numpy as np
import ray
import torch

from actors.surgeon import SurgeonSettings, surgeon_actor
from learners.surgeon_env import SurgeonEnv

logger = logging.getLogger(__name__)

PhaseName = Literal["grpo", "surgery", "joint"]
# which agents learn in a phase: (the language model, the surgeon)
PHASE_AGENTS: dict[str, tuple[bool, bool]] = {"grpo": (True, False), "surgery": (False, True), "joint": (True, True)}


@dataclass
class PhaseConfig:
    """One phase of the schedule (the config's ``phases`` list)."""

    name: PhaseName = "grpo"
    until: int | None = None  # the phase's last step; None: to the run's end (the last phase only)


class PhaseSchedule:
    """Which phase a step is in, and what learns there. No phases: GRPO throughout."""

    def __init__(self, phases: list[PhaseConfig]):
        self.phases = list(phases) or [PhaseConfig("grpo")]

    def problems(self) -> list[str]:
        problems, previous = [], 0
        for i, phase in enumerate(self.phases):
            if phase.until is None and i < len(self.phases) - 1:
                problems.append(f"phases[{i}] ({phase.name}) has no 'until': only the last phase may run to the end")
            elif phase.until is not None and phase.until <= previous:
                problems.append(f"phases[{i}].until ({phase.until}) must be above the previous phase's ({previous})")
            previous = phase.until or previous
        return problems

    @property
    def has_surgeon(self) -> bool:
        return any(PHASE_AGENTS[p.name][1] for p in self.phases)

    def index(self, step: int) -> int:
        for i, phase in enumerate(self.phases):
            if phase.until is None or step <= phase.until:
                return i
        return len(self.phases) - 1  # past the last 'until': the last phase goes on

    def at(self, step: int) -> PhaseConfig:
        return self.phases[self.index(step)]

    def language_model_learns(self, step: int) -> bool:
        return PHASE_AGENTS[self.at(step).name][0]

    def surgeon_acts(self, step: int) -> bool:
        return PHASE_AGENTS[self.at(step).name][1]

    def last_step(self, step: int, run_end: int) -> int:
        """The last step of ``step``'s phase (at most ``run_end``)."""
        i = self.index(step)
        until = self.phases[i].until if i < len(self.phases) - 1 else None
        return min(until, run_end) if until is not None else run_end

    def starts(self) -> list[tuple[int, str]]:
        """(first step, name) of every phase, for the report."""
        out, first = [], 1
        for phase in self.phases:
            out.append((first, phase.name))
            first = (phase.until or first) + 1
        return out


class Surgery:
    """The surgeon actor, its environment (stepped through the run) and its pending metrics."""

    def __init__(self, settings: SurgeonSettings, scales: torch.Tensor, seed: int):
        layers, heads = scales.shape
        self.settings = settings
        self.actor = surgeon_actor(settings.num_cpus).remote(settings, layers, heads, seed)
        self.env = SurgeonEnv(settings.env_config(layers, heads))
        self.observation: np.ndarray | None = None  # None: the environment needs a reset
        self.recent: list[dict] = []  # the last steps' metrics (the reset window)
        self.pending: dict[str, float] = {}  # surgeon metrics for the next recorded step
        self.env.scales = scales.numpy().astype(np.float32)

    def note_step(self, metrics: dict) -> None:
        """Every recorded step's metrics: the window a (re)started environment observes."""
        self.recent = (self.recent + [metrics])[-self.settings.horizon :]

    def take_pending(self) -> dict[str, float]:
        pending, self.pending = self.pending, {}
        return pending

    def window(self, first_step: int, last_step: int, set_scales: Callable[[np.ndarray], None], run_step: Callable[[int], dict | None]) -> bool:
        """One surgeon transition over steps ``first_step``..``last_step``: act, run the steps
        (``run_step(step)`` returns the step's metrics, or None when the run stopped or went
        back), learn. Returns whether every step of the window ran."""
        if self.observation is None:
            self.observation, _ = self.env.reset(options={"window": self.recent})
        action = ray.get(self.actor.act.remote(self.observation))
        completed = True

        def run_window(scales: np.ndarray) -> list[dict]:
            nonlocal completed
            set_scales(scales)
            window = []
            for step in range(first_step, last_step + 1):
                metrics = run_step(step)
                if metrics is None:
                    completed = False
                    break
                window.append(metrics)
            return window

        self.env.run_window = run_window
        observation, reward, terminated, truncated, info = self.env.step(action)
        if not completed:  # the run stopped or rewound: no transition to learn from
            self.observation = None
            return False
        learned = ray.get(self.actor.observe.remote(self.observation, action, reward, observation, terminated, truncated))
        self.pending |= info | learned
        self.observation = observation
        return True

    def rewind(self, scales: torch.Tensor) -> None:
        """The learners went back to older weights and scales: the next window starts afresh."""
        self.env.scales = scales.numpy().astype(np.float32)
        self.observation = None

    # -- checkpoints ----------------------------------------------------------------------

    def state(self) -> dict:
        """The environment's state (JSON) and the agent's bytes."""
        env = {
            "scales": self.env.scales.tolist(),
            "baseline": self.env.baseline,
            "observation": None if self.observation is None else self.observation.tolist(),
            "recent": self.recent,
            "pending": self.pending,
        }
        return {"env": env, "agent": ray.get(self.actor.state.remote())}

    def load_state(self, env: dict, agent: bytes | None) -> None:
        self.env.scales = np.asarray(env["scales"], np.float32)
        self.env.baseline = env["baseline"] if env["baseline"] is not None else float("nan")
        self.observation = None if env["observation"] is None else np.asarray(env["observation"], np.float32)
        self.recent = env["recent"]
        self.pending = env.get("pending", {})
        if agent is not None:
            ray.get(self.actor.load_state.remote(agent))

    def kill(self) -> None:
        ray.kill(self.actor)
