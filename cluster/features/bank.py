"""The solution bank in the loop (``bank.*``; the bank itself: ``rollout.bank``): two
``BatchSource`` stages and the bank's checkpoint part.

- ``BankedRollouts`` (``bank.enabled`` with the PPO objective): each step banks its verified
  solutions, then trains on the rollouts; with ``bank.feed_groups`` a group without a
  correct sample first gets banked solutions of its problem (LUFFY-style guidance).
- ``BankRounds`` (``algorithm.objective=sft``): every step is a self-improvement round that
  fine-tunes on the bank (expert iteration / STaR), not on the rollouts.
- ``BankPart``: the bank's entries and counters in a checkpoint (``bank.json``); a run that
  starts again from step 0 starts with an empty bank, a rollback keeps it.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Callable

from actors.learner import LearnerGroup
from cluster.stages import Built, ReadFile, RolloutBatches
from contracts import PolicyRef, Sample, Verdict
from learners.batch import group_indices
from rollout.bank import SolutionBank

BANK_FILE = "bank.json"
OLD_BANK_FILE = "memory.json"  # a checkpoint written before the bank had its name


@dataclass(frozen=True)
class BankedRollouts:
    """Bank each step's solutions, then build the rollout batch (bank-fed when ``feed``)."""

    bank: SolutionBank
    rollouts: RolloutBatches
    feed: bool

    def build(self, step: int, samples: list[Sample], verdicts: list[Verdict], policy: PolicyRef) -> Built:
        self.bank.write(samples, verdicts, step)
        if self.feed:
            samples, verdicts = self.bank.feed(samples, verdicts, policy, group_indices(samples))
        built = self.rollouts.build(step, samples, verdicts, policy)
        return dataclasses.replace(built, metrics=built.metrics | self.bank.metrics())


@dataclass(frozen=True)
class BankRounds:
    """Self-improvement: bank the step's solutions, fine-tune on the bank (or on the new ones);
    the rollouts are recorded, not trained on. ``seed(step)`` draws a round's subset."""

    bank: SolutionBank
    seed: Callable[[int], int]

    def build(self, step: int, samples: list[Sample], verdicts: list[Verdict], policy: PolicyRef) -> Built:
        new = self.bank.write(samples, verdicts, step)
        batch = self.bank.sft_batch(new, self.seed(step))
        return Built(batch, samples, verdicts, [None] * len(samples), {"train/batch_size": float(len(batch)), **self.bank.metrics()}, objective="sft")


@dataclass(frozen=True)
class BankPart:
    """The bank in a checkpoint (a ``Stateful`` part)."""

    bank: SolutionBank

    def state(self) -> dict[str, bytes]:
        return {BANK_FILE: json.dumps(self.bank.state()).encode()}

    def load_state(self, read: ReadFile) -> None:
        self.bank.clear()
        saved = read(BANK_FILE) or read(OLD_BANK_FILE)
        if saved is not None:
            self.bank.load_state(json.loads(saved))

    def rewind(self, learners: LearnerGroup, restart: bool) -> None:
        if restart:  # the run starts again from step 0
            self.bank.clear()
