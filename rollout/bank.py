"""A solution bank of verified solutions, per problem: what self-improvement trains on and what
GRPO can fall back on when a group has no correct sample.

- **What enters.** A sample whose verdict is ``ok`` and whose reward reaches
  ``threshold`` (the verifier's score; 1.0 = every test passed for code). A solution whose
  text (whitespace-normalised) is already stored for the problem is skipped and counted.
- **Limits and eviction.** At most ``per_problem`` solutions per problem and ``max_size`` in
  all; a full problem or bank evicts one entry first, by ``eviction``: ``oldest`` (first in,
  first out) or ``lowest_reward`` (the lowest reward, the oldest of those).
- **Expert iteration / STaR** (``algorithm.objective: sft``): every round fine-tunes on
  ``sft_batch`` (the whole bank, or this round's new solutions, at most ``sft_max_samples``).
- **Feeding GRPO** (``feed_groups``): a group without a sample at the threshold gets up to
  ``feed_per_group`` stored solutions of its problem as extra samples (``Sample.replayed``:
  the learner scores them under its current weights, so they enter the loss as on-policy
  samples of ratio 1 with the group's advantage). Off-policy guidance in the manner of
  LUFFY (Yan et al. 2025), without its policy shaping.
- **Counters.** ``bank/updates`` (solutions written), ``bank/hits`` (solutions read
  back into groups), ``bank/size``, ``bank/problems``, ``bank/duplicates``,
  ``bank/evictions``: running totals, kept in checkpoints with the entries (``state``).

Pure data over the contracts: no model, no Ray.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
from dataclasses import dataclass
from typing import Literal

from contracts import Completion, PolicyRef, Sample, TrainBatch, Verdict

BANK_FINISH_REASON = "bank"  # a replayed sample's finish_reason, so rollout files show it


@dataclass(frozen=True)
class BankSettings:
    """The solution bank: the run config's ``bank`` section (docs/algorithms.md#self-improvement-and-the-solution-bank; a config
that still says ``memory`` is read as ``bank``)."""

    enabled: bool = False  # keep verified solutions (the bank) during the run
    threshold: float = 1.0  # a verdict's reward at or above this banks the solution
    per_problem: int = 4  # solutions kept per problem
    max_size: int = 4096  # solutions kept in all
    eviction: Literal["oldest", "lowest_reward"] = "oldest"  # which solution a full bank drops
    # GRPO: a group without a sample at the threshold gets up to feed_per_group stored solutions
    feed_groups: bool = False
    feed_per_group: int = 1  # see feed_groups
    # algorithm.objective=sft: fine-tune each round on the whole bank or on this round's new solutions
    sft_on: Literal["bank", "new"] = "bank"
    sft_max_samples: int = 256  # a seeded draw when there are more (0 = all)

    def problems(self) -> list[str]:
        """What cannot work, one sentence each naming the key."""
        out = []
        if self.per_problem < 1 or self.max_size < 1:
            out.append(f"bank.per_problem ({self.per_problem}) and bank.max_size ({self.max_size}) must be at least 1")
        if self.feed_per_group < 1:
            out.append("bank.feed_per_group must be at least 1")
        if self.sft_max_samples < 0:
            out.append("bank.sft_max_samples must be >= 0 (0 = the whole set)")
        return out


@dataclass(frozen=True)
class Solution:
    """One banked solution: the tokens that train on it, and where it came from."""

    uid: str  # the problem's
    prompt_token_ids: tuple[int, ...]
    token_ids: tuple[int, ...]
    text: str
    reward: float
    step: int  # written at this step
    version: int  # by this policy version
    order: int  # the bank's running count when written: the eviction's clock

    def digest(self) -> str:
        """The text's identity, whitespace aside (what makes a duplicate)."""
        return hashlib.sha1(" ".join(self.text.split()).encode()).hexdigest()


class SolutionBank:
    """Verified solutions per problem uid, with the counters the run reports."""

    COUNTERS = ("updates", "hits", "duplicates", "evictions")

    def __init__(self, settings: BankSettings):
        self.settings = settings
        self.clear()

    def clear(self) -> None:
        """No solutions, every counter at 0."""
        self.solutions: dict[str, list[Solution]] = {}
        self.counts = dict.fromkeys(self.COUNTERS, 0)
        self.written = 0  # the eviction clock (every write, evicted ones included)

    def __len__(self) -> int:
        return sum(len(s) for s in self.solutions.values())

    def of(self, uid: str) -> list[Solution]:
        """The problem's solutions, best first (highest reward, then newest)."""
        return sorted(self.solutions.get(uid, []), key=lambda s: (-s.reward, -s.order))

    # -- writing --------------------------------------------------------------------------

    def write(self, samples: list[Sample], verdicts: list[Verdict], step: int) -> list[Solution]:
        """Bank the samples that pass the threshold (replayed ones are not new); returns the
        solutions written."""
        written = []
        for sample, verdict in zip(samples, verdicts):
            if sample.replayed or not self.passes(verdict):
                continue
            solution = Solution(
                sample.prompt.problem.uid, sample.prompt.token_ids, sample.completion.token_ids, sample.completion.text,
                verdict.reward, step, sample.policy.version, self.written,
            )  # fmt: skip
            if self._add(solution):
                written.append(solution)
        return written

    def passes(self, verdict: Verdict) -> bool:
        return verdict.status == "ok" and verdict.reward >= self.settings.threshold

    def _add(self, solution: Solution) -> bool:
        stored = self.solutions.get(solution.uid, [])
        if any(s.digest() == solution.digest() for s in stored):
            self.counts["duplicates"] += 1
            return False
        if len(stored) >= self.settings.per_problem:
            self._evict(stored)
        elif len(self) >= self.settings.max_size:
            self._evict([s for group in self.solutions.values() for s in group])
        # after the eviction: it drops a problem's list once it is empty
        self.solutions.setdefault(solution.uid, []).append(solution)
        self.written += 1
        self.counts["updates"] += 1
        return True

    def _evict(self, candidates: list[Solution]) -> None:
        """Drop one of ``candidates`` by the eviction rule."""
        if self.settings.eviction == "lowest_reward":
            victim = min(candidates, key=lambda s: (s.reward, s.order))
        else:
            victim = min(candidates, key=lambda s: s.order)
        group = self.solutions[victim.uid]
        group.remove(victim)
        if not group:
            del self.solutions[victim.uid]
        self.counts["evictions"] += 1

    # -- reading --------------------------------------------------------------------------

    def feed(self, samples: list[Sample], verdicts: list[Verdict], policy: PolicyRef, groups: list[list[int]]) -> tuple[list[Sample], list[Verdict]]:
        """The samples with stored solutions appended to each group (``groups``: indices per
        prompt) that has no sample at the threshold; a replayed sample carries ``policy`` (the
        learner scores it under those weights) and its banked reward."""
        out_samples: list[Sample] = []
        out_verdicts: list[Verdict] = []
        for group in groups:
            out_samples += [samples[i] for i in group]
            out_verdicts += [verdicts[i] for i in group]
            if any(self.passes(verdicts[i]) for i in group):
                continue
            first = samples[group[0]]
            for k, solution in enumerate(self.of(first.prompt.problem.uid)[: self.settings.feed_per_group]):
                completion = Completion(solution.token_ids, solution.text, (), BANK_FINISH_REASON)
                out_samples.append(Sample(first.prompt, completion, policy, len(group) + k, replayed=True))
                out_verdicts.append(Verdict(reward=solution.reward, correct=True, outcome=BANK_FINISH_REASON))
                self.counts["hits"] += 1
        return out_samples, out_verdicts

    def sft_batch(self, new: list[Solution], seed: int) -> TrainBatch:
        """What a self-improvement round fine-tunes on: the bank (or ``new``, this round's
        solutions, by ``sft_on``), a seeded draw of ``sft_max_samples`` when there are more."""
        pool = new if self.settings.sft_on == "new" else sorted((s for g in self.solutions.values() for s in g), key=lambda s: s.order)
        limit = self.settings.sft_max_samples
        if limit and len(pool) > limit:
            pool = sorted(random.Random(seed).sample(pool, limit), key=lambda s: s.order)
        return TrainBatch(
            prompt_token_ids=tuple(s.prompt_token_ids for s in pool),
            completion_token_ids=tuple(s.token_ids for s in pool),
            old_logprobs=tuple(() for _ in pool),
            advantages=(0.0,) * len(pool),
            policy_versions=tuple(s.version for s in pool),
            rewards=tuple(s.reward for s in pool),
        )

    def metrics(self) -> dict[str, float]:
        return {
            "bank/size": float(len(self)),
            "bank/problems": float(len(self.solutions)),
            **{f"bank/{name}": float(n) for name, n in self.counts.items()},
        }

    # -- checkpoints ----------------------------------------------------------------------

    def state(self) -> dict:
        """JSON-ready: every entry and counter (the settings come from the run's config)."""
        entries = [{**dataclasses.asdict(s), "prompt_token_ids": list(s.prompt_token_ids), "token_ids": list(s.token_ids)} for g in self.solutions.values() for s in g]
        return {"solutions": entries, "counts": dict(self.counts), "written": self.written}

    def load_state(self, state: dict) -> None:
        self.solutions = {}
        for entry in sorted(state["solutions"], key=lambda e: e["order"]):
            solution = Solution(**{**entry, "prompt_token_ids": tuple(entry["prompt_token_ids"]), "token_ids": tuple(entry["token_ids"])})
            self.solutions.setdefault(solution.uid, []).append(solution)
        self.counts = {**dict.fromkeys(self.COUNTERS, 0), **state["counts"]}
        self.written = state["written"]
