"""The run's phase schedule: which agent learns at each step (the config's ``phases`` list).

- ``grpo``: the language model learns; the surgeon waits (the scales stay where they are);
- ``surgery``: the surgeon acts every ``surgeon.horizon`` steps and learns from the reward
  window after each action; the language model's updates pause (its rollouts are still drawn
  and scored: they are the surgeon's measurements);
- ``joint``: both learn.

``until`` is a phase's last step (steps count from 1); the last phase may leave it out (to the
run's end). No phases: GRPO throughout. A "phase" is only ever one of these; the parts of a
step (generate, verify, learn, ...) are its spans (``perf/<span>_seconds``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

PhaseName = Literal["grpo", "surgery", "joint"]
# which agents learn in a phase: (the language model, the surgeon)
PHASE_AGENTS: dict[str, tuple[bool, bool]] = {"grpo": (True, False), "surgery": (False, True), "joint": (True, True)}


@dataclass
class PhaseConfig:
    """One phase of the schedule (the config's ``phases`` list)."""

    name: PhaseName = "grpo"  # grpo: the policy learns; surgery: the surgeon alone; joint: both
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
