"""The SAC surgery: a participant of the loop that changes the policy's attention scales
(docs/algorithms.md#the-sac-surgeon; the phase schedule: ``cluster.phases``).

In the phases where the surgeon acts, every ``surgeon.horizon`` steps a window opens before its
first step: the surgeon's action changes the learner's attention scales (a new policy version,
broadcast to the generators like an adapter); the window's steps run as any other step; after
its last step the environment judges the window (the reward metric's change) and the
transition (observation, action, reward, next observation) goes to the surgeon, which stores it
in RLlib's replay buffer and updates. Its metrics (``surgery/*``, ``sac/*``) ride on the next
recorded step's row (a checkpoint keeps them for a resumed run's first step). A window never
crosses a phase boundary or the run's end: one cut short is a truncated transition. A window
the run leaves (a stop, a rollback, a learner recovery) teaches nothing: the next starts afresh.

A checkpoint holds the surgeon (RLlib's checkpoint and its replay buffer), the environment's
state (the scales, the last observation and reward baseline) and, through the learner's state,
the scales themselves; a run resumed in the middle of a window starts a new window there.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import ray
import torch

from actors.learner import LearnerGroup
from actors.surgeon import SurgeonSettings, surgeon_actor
from cluster.phases import PhaseSchedule
from cluster.stages import ReadFile
from learners.surgeon_env import SurgeonEnv

logger = logging.getLogger(__name__)

@dataclass
class Window:
    """A surgeon transition in progress: its action, its last step, the rows of its steps so far."""

    action: np.ndarray
    last_step: int
    rows: list[dict] = field(default_factory=list)


class Surgery:
    """The surgeon actor, its environment and its pending metrics: a ``Participant`` of the
    loop and a ``Stateful`` part of its checkpoints. ``set_scales(scales)`` puts new attention
    scales on the learners and serves them (a new policy version)."""

    def __init__(self, settings: SurgeonSettings, schedule: PhaseSchedule, scales: torch.Tensor, seed: int, set_scales: Callable[[np.ndarray], None]):
        layers, heads = scales.shape
        self.settings, self.schedule, self.set_scales = settings, schedule, set_scales
        self.actor = surgeon_actor(settings.num_cpus).remote(settings, layers, heads, seed)
        self.env = SurgeonEnv(settings.env_config(layers, heads))
        self.observation: np.ndarray | None = None  # None: the environment needs a reset
        self.window: Window | None = None
        self.recent: list[dict] = []  # the last steps' rows (the reset window)
        self.pending: dict[str, float] = {}  # surgeon metrics for the next recorded step
        self.env.scales = scales.numpy().astype(np.float32)

    # -- a participant of the loop ----------------------------------------------------------

    def before_step(self, step: int, last_step: int) -> None:
        """Open a window at ``step`` when the surgeon acts there and none is open: act."""
        if self.window is not None or not self.schedule.surgeon_acts(step):
            return
        if self.observation is None:
            self.observation, _ = self.env.reset(options={"window": self.recent})
        action = ray.get(self.actor.act.remote(self.observation))
        self.set_scales(self.env.act(action))
        self.window = Window(action, min(step + self.settings.horizon - 1, self.schedule.last_step(step, last_step)))

    def after_step(self, step: int, row: dict, stopping: bool) -> dict[str, float]:
        """The pending metrics go on this step's row; the row joins the window, and the
        window's last step (unless the run stops there) is judged and learned from."""
        added, self.pending = self.pending, {}
        row = row | added
        self.recent = (self.recent + [row])[-self.settings.horizon :]
        if self.window is not None and stopping:
            self._leave_window()
        elif self.window is not None:
            self.window.rows.append(row)
            if step >= self.window.last_step:
                self._learn(self.window)
        return added

    def _learn(self, window: Window) -> None:
        observation, reward, terminated, truncated, info = self.env.judge(window.rows)
        learned = ray.get(self.actor.observe.remote(self.observation, window.action, reward, observation, terminated, truncated))
        self.pending |= info | learned
        self.observation, self.window = observation, None

    def _leave_window(self) -> None:
        """The run left the window (a stop, a rollback, a recovery): no transition to learn."""
        self.window, self.observation = None, None

    # -- a part of the checkpoints ------------------------------------------------------------

    def rewind(self, learners: LearnerGroup, restart: bool) -> None:
        """The learners went back to older weights and scales: the next window starts afresh."""
        self.env.scales = learners.attention_scales().numpy().astype(np.float32)
        self._leave_window()

    def state(self) -> dict[str, bytes]:
        """The environment's state (JSON) and the agent's bytes."""
        env = {
            "phase": self.schedule.index(self.last_recorded),
            "scales": self.env.scales.tolist(),
            "baseline": self.env.baseline,
            "observation": None if self.observation is None else self.observation.tolist(),
            "recent": self.recent,
            "pending": self.pending,
        }
        return {"surgeon.pkl": ray.get(self.actor.state.remote()), "surgery.json": json.dumps(env, default=str).encode()}

    @property
    def last_recorded(self) -> int:
        return int(self.recent[-1]["step"]) if self.recent else 0

    def load_state(self, read: ReadFile) -> None:
        """Continue from a checkpoint's surgeon and environment. A recovery inside a window
        leaves it: the next window starts afresh (a reset, not the saved observation)."""
        left = self.window is not None
        saved = read("surgery.json")
        if saved is not None:
            env = json.loads(saved)
            self.env.scales = np.asarray(env["scales"], np.float32)
            self.env.baseline = env["baseline"] if env["baseline"] is not None else float("nan")
            self.observation = None if env["observation"] is None else np.asarray(env["observation"], np.float32)
            self.recent = env["recent"]
            self.pending = env.get("pending", {})
        agent = read("surgeon.pkl")
        if agent is not None:
            ray.get(self.actor.load_state.remote(agent))
        if left:
            self._leave_window()

    def kill(self) -> None:
        ray.kill(self.actor)
