"""What a learner step minimises: the objectives, as an explicit dict.

The learner (``learners.learner``) is blind to the algorithm: it packs micro-batches, runs the
optimizer updates, all-reduces gradients and skips non-finite ones. An objective says what to
compute before the updates (``prepare``: log-probs, reference, values, advantages, without
gradients) and the loss of each micro-batch (``loss``), and keeps its own state across steps
(the adaptive KL coefficient).

- ``ppo``: the PPO family over a rollout batch: PPO / GSPO / plain policy-gradient losses with
  any advantage estimator, KL to the reference as a loss or a reward penalty, entropy bonus,
  truncated importance sampling, and GAE's critic.
  With ``policy_loss: sac`` the rollout objective is token-level soft actor-critic instead
  (``SoftActorCriticObjective``).
- ``sft``: supervised fine-tuning: the negative log-likelihood of the completion tokens (for
  example the run's own verified solutions), averaged over the batch's tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator, Protocol

import torch

from contracts import TrainBatch
from learners.algorithms import (
    OUTCOME_ESTIMATORS,
    WHITENED_BY_DEFINITION,
    AdaptiveKLController,
    aggregate_loss,
    discounted_returns,
    gae_advantages,
    kl_penalty,
    masked_mean,
    masked_moments,
    masked_whiten,
    outcome_token_rewards,
    policy_loss,
    soft_consistency_loss,
    truncated_is_weights,
    value_loss,
)
from learners.policy import PackedBatch, Policy, pack
from learners.settings import AlgorithmSettings, ObjectiveName


def padded(rows: list[torch.Tensor], width: int) -> torch.Tensor:
    """Right-pad 1-D tensors with zeros into [len(rows), width]."""
    out = torch.zeros(len(rows), width)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out


@dataclass
class Prepared:
    """What an objective fixed for a whole step, before any update moved the weights.

    ``rows[key][i]``: a per-token tensor of row i (the generator's log-probs, the learner's,
    the reference's, the critic's values); ``advantages`` and ``returns``: [B, T];
    ``norm_constant``: token-sum-norm's divisor, one for the whole batch."""

    rows: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    advantages: torch.Tensor | None = None
    returns: torch.Tensor | None = None
    norm_constant: float = 1.0
    metrics: dict[str, float] = field(default_factory=dict)


class Learner(Protocol):
    """What an objective uses of the learner running it (``learners.learner.Learner``)."""

    policy: Policy
    world_size: int

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor: ...

    def reduce_metrics(self, metrics: dict[str, float]) -> dict[str, float]: ...

    def packed_micro_batches(self, batch: TrainBatch) -> Iterator[tuple[list[int], list[int], PackedBatch]]: ...

    def logprobs(self, batch: TrainBatch) -> list[list[float]]: ...


class Objective(Protocol):
    epochs: int  # passes over the batch per step

    def prepare(self, learner: Learner, batch: TrainBatch) -> Prepared: ...

    def loss(self, learner: Learner, batch: TrainBatch, rows: list[int], prepared: Prepared, num_tokens: float, num_sequences: float) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss of micro-batch ``rows``, normalised by the update's global token and
        sequence counts, so that micro-batch losses add up to the update's."""
        ...

    def finish(self, metrics: dict[str, float], global_rows: int) -> dict[str, float]:
        """After the step's updates: adapt internal state; returns metrics to add."""
        ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class PolicyGradientObjective:
    """The PPO family (``algorithm.policy_loss``: ppo, gspo, pg) over a rollout batch.

    1. prepare (no gradients): the learner's own log-probs (truncated importance sampling),
       the reference log-probs (KL), the critic's values (GAE); then per-token advantages
       (outcome advantages from the batch, plus the KL reward penalty, or REINFORCE++
       returns, or GAE), whitened over the global batch where the estimator says so;
    2. loss per micro-batch: the clipped policy loss, KL as a loss term, entropy bonus, the
       critic's clipped value loss, and the Markovian actor reward (``TrainBatch.answer_weights``).
    """

    def __init__(self, algorithm: AlgorithmSettings, temperature: float):
        self.settings = algorithm
        self.temperature = temperature
        self.epochs = algorithm.ppo_epochs
        self.kl = AdaptiveKLController(algorithm.kl_coef, algorithm.kl_target, algorithm.kl_horizon) if algorithm.kl_target else None

    @property
    def kl_coef(self) -> float:
        return self.kl.coef if self.kl else self.settings.kl_coef

    @property
    def recompute_learner_logprobs(self) -> bool:
        """Truncated IS needs the learner's pre-update log-probs. With one update per step they
        are the loss's own forward pass, detached (the weights have not moved yet): no extra
        pass. Several updates (epochs, mini-batches), or a KL reward estimated from them,
        need them computed before the first update."""
        s = self.settings
        one_update = s.ppo_epochs == 1 and s.mini_batch_size == 0
        return s.tis_cap is not None and not (one_update and not (s.uses_reference and s.kl_mode == "reward"))

    def prepare(self, learner: Learner, batch: TrainBatch) -> Prepared:
        rows = self._passes(learner, batch)
        advantages, returns, metrics = self._advantages(learner, batch, rows)
        metrics = learner.reduce_metrics({k: v / learner.world_size for k, v in metrics.items()})
        longest = max((len(c) for c in batch.completion_token_ids), default=1)
        # one constant for the whole batch, so micro-batching and sharding do not change the loss
        norm_constant = self.settings.loss_norm_constant or learner.all_reduce(torch.tensor(float(longest)), "max").item()
        return Prepared(rows, advantages, returns, norm_constant, metrics)

    def _passes(self, learner: Learner, batch: TrainBatch) -> dict[str, list[torch.Tensor]]:
        """Per-row tensors fixed for the whole step, computed without gradients."""
        s = self.settings
        rows: dict[str, list[torch.Tensor]] = {"generator": [torch.tensor(r, dtype=torch.float32) for r in batch.old_logprobs]}
        replayed = [i for i, r in enumerate(batch.replayed) if r]
        if replayed:  # stored solutions: scored by the weights about to be updated (ratio 1)
            for i, logprobs in zip(replayed, learner.logprobs(batch.select(replayed))):
                rows["generator"][i] = torch.tensor(logprobs, dtype=torch.float32)
        need = {"learner": self.recompute_learner_logprobs, "reference": s.uses_reference, "values": s.uses_critic}
        for key in (k for k, wanted in need.items() if wanted):
            rows[key] = [torch.empty(0)] * len(batch)
        if len(rows) == 1:
            return rows
        policy = learner.policy
        policy.model.eval()
        with torch.no_grad():
            for micro, lengths, packed in learner.packed_micro_batches(batch):
                outputs = {}
                if need["learner"]:
                    outputs["learner"] = policy.forward(packed, self.temperature)[0]
                if need["reference"]:
                    outputs["reference"] = policy.reference_forward(packed, self.temperature)
                if need["values"]:
                    outputs["values"] = policy.values(packed)
                for key, tensor in outputs.items():
                    for i, (row, n) in enumerate(zip(micro, lengths)):
                        rows[key][row] = tensor[i, :n].clone()
        return rows

    def _advantages(self, learner: Learner, batch: TrainBatch, rows: dict) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, float]]:
        """Per-token advantages [B, T] (and GAE returns) for this rank's rows."""
        s = self.settings
        width = max(1, max(len(c) for c in batch.completion_token_ids))
        mask = padded([torch.tensor(batch.loss_mask(i), dtype=torch.float32) for i in range(len(batch))], width)
        old = padded(rows.get("learner", rows["generator"]), width)
        metrics: dict[str, float] = {}
        kl_reward = torch.zeros_like(mask)
        if s.uses_reference:
            kl_tokens = kl_penalty(old, padded(rows["reference"], width), s.kl_estimator) * mask
            if s.kl_mode == "reward":
                kl_reward = self.kl_coef * kl_tokens
            metrics["train/kl_old"] = masked_mean(kl_tokens, mask).item()
        # on-policy distillation: w * (log pi_teacher - log pi_student) per token, a dense reward
        distill = torch.zeros_like(mask)
        if any(batch.teacher_weights):
            taught = torch.tensor([float(w != 0) for w in batch.teacher_weights]).unsqueeze(-1) * mask
            gap = (padded([torch.tensor(t, dtype=torch.float32) for t in batch.teacher_logprobs], width) - old) * taught
            distill = torch.tensor(batch.teacher_weights).unsqueeze(-1) * gap  # (no metric: a shard may have no taught row)
        returns = None
        if s.advantage in OUTCOME_ESTIMATORS:
            # the KL penalty's REINFORCE return (gamma = 1) on top of the outcome advantage, and each
            # token's own teacher reward (discount 0, as on-policy distillation does: low variance)
            advantages = torch.tensor(batch.advantages).unsqueeze(-1) * mask - discounted_returns(kl_reward, mask) + distill
        else:
            token_rewards = outcome_token_rewards(torch.tensor(batch.rewards), mask) - kl_reward + distill
            if s.advantage == "reinforce++":
                advantages = discounted_returns(token_rewards, mask, s.gamma)
            elif s.advantage == "gae":
                advantages, returns = gae_advantages(token_rewards, padded(rows["values"], width), mask, s.gamma, s.lam)
            else:
                raise ValueError(f"unknown advantage estimator {s.advantage!r}")
        whiten = s.whiten_advantages if s.whiten_advantages is not None else s.advantage in WHITENED_BY_DEFINITION
        if whiten:
            advantages = masked_whiten(advantages, mask, learner.all_reduce(masked_moments(advantages, mask)))
        metrics["train/advantage_abs_mean"] = masked_mean(advantages.abs(), mask).item()
        if returns is not None:
            metrics["train/return_mean"] = masked_mean(returns, mask).item()
        return advantages, returns, metrics

    def loss(self, learner: Learner, batch: TrainBatch, rows: list[int], prepared: Prepared, num_tokens: float, num_sequences: float):
        s, prep = self.settings, prepared.rows
        part = batch.select(rows)
        packed = pack(part.prompt_token_ids, part.completion_token_ids, learner.policy.pad_id, part.loss_masks)
        mask = packed.response_mask
        width = mask.shape[1]
        generator = padded([prep["generator"][i] for i in rows], width)
        adv = prepared.advantages[rows, :width]
        logprobs, entropy = learner.policy.forward(packed, self.temperature, with_entropy=True, entropy_grad=s.entropy_coef > 0)
        if "learner" in prep:
            old = padded([prep["learner"][i] for i in rows], width)
        elif s.tis_cap is not None:  # the only update of the step: this pass is the pre-update policy
            old = logprobs.detach()
        else:
            old = generator
        is_weights = truncated_is_weights(old, generator, s.tis_cap) * mask if s.tis_cap is not None else None
        totals = dict(num_tokens=num_tokens, num_sequences=num_sequences)
        norm_constant = prepared.norm_constant
        loss, metrics = policy_loss(
            logprobs, old, adv, mask, s.policy_loss, s.clip_eps_low, s.clip_eps_high, s.dual_clip_c,
            s.loss_agg, norm_constant, is_weights, **totals,
        )  # fmt: skip
        metrics["train/pg_loss"] = loss.item()
        kl = torch.tensor(float("nan"))  # not computed: no reference pass when kl_coef == 0
        if s.uses_reference:
            kl_tokens = kl_penalty(logprobs, padded([prep["reference"][i] for i in rows], width), s.kl_estimator)
            kl = masked_mean(kl_tokens.detach(), mask)
            if s.kl_mode == "loss":
                loss = loss + self.kl_coef * aggregate_loss(kl_tokens, mask, s.loss_agg, norm_constant, **totals)
        if s.entropy_coef > 0:
            loss = loss - s.entropy_coef * aggregate_loss(entropy, mask, s.loss_agg, norm_constant, **totals)
        if any(part.answer_weights):
            actor_reward = self._actor_reward_loss(learner, part, num_sequences)
            loss = loss + actor_reward
            metrics["train/actor_reward_loss"] = actor_reward.item()
        if prepared.returns is not None:
            values = learner.policy.values(packed)
            old_values = padded([prep["values"][i] for i in rows], width)
            v_loss, value_metrics = value_loss(values, old_values, prepared.returns[rows, :width], mask, s.value_clip, num_tokens)
            loss = loss + s.value_coef * v_loss
            metrics |= value_metrics
        with torch.no_grad():
            # generator vs learner under the same weights: the recomputed old log-probs, else
            # this pass's (exact in a step's first update, before the weights move)
            learner_logprobs = old if "learner" in prep else logprobs.detach()
            sampled = mask * torch.tensor([not part.replayed[i] for i in range(len(rows))], dtype=mask.dtype).unsqueeze(-1)
            metrics |= {
                "train/kl": kl.item(),
                "train/entropy": masked_mean(entropy.detach(), mask).item(),
                "train/logprob_mismatch": masked_mean((learner_logprobs - generator).abs(), sampled).item(),
            }
            if is_weights is not None:
                metrics["train/tis_weight_mean"] = masked_mean(is_weights, mask).item()
        return loss, metrics

    def _actor_reward_loss(self, learner: Learner, part: TrainBatch, num_sequences: float) -> torch.Tensor:
        """The Markovian actor reward: -(1 / N_seq) * sum_i w_i * log pi(answer_i | CoT_i, question
        redacted), at temperature 1, over the rows with a weight (``TrainBatch.answer_weights``).
        Its gradient reaches the policy through the answer's log-prob, not the sampled CoT."""
        rows = [i for i, weight in enumerate(part.answer_weights) if weight]
        packed = pack([part.answer_prompt_token_ids[i] for i in rows], [part.answer_token_ids[i] for i in rows], learner.policy.pad_id)
        logprobs, _ = learner.policy.forward(packed, 1.0)
        weights = torch.tensor([part.answer_weights[i] for i in rows]).unsqueeze(-1)
        return -(weights * logprobs * packed.response_mask).sum() / num_sequences

    def finish(self, metrics: dict[str, float], global_rows: int) -> dict[str, float]:
        if self.kl:
            self.kl.update(metrics.get("train/kl", float("nan")), n_steps=global_rows)
        return {"train/kl_coef": self.kl_coef}

    def state_dict(self) -> dict:
        return {"kl_coef": self.kl.coef if self.kl else None}

    def load_state_dict(self, state: dict) -> None:
        if self.kl and state.get("kl_coef") is not None:
            self.kl.coef = state["kl_coef"]


class SoftActorCriticObjective:
    """Token-level soft actor-critic on a rollout batch (``algorithm.policy_loss: sac``; the
    math and what deviates from SAC: ``learners.algorithms.soft_consistency_loss``).

    1. prepare (no gradients): the reference's log-probs of the sampled tokens;
    2. loss per micro-batch: the soft consistency error of the policy (log-probs at the sampling
       temperature) and the critic (a second LoRA adapter with a value head, as GAE's) against
       each sequence's raw reward. The advantages in the batch are not used: the critic is the
       baseline. ``ppo_epochs`` > 1 replays the batch (sound: the consistency holds off-policy).
    """

    def __init__(self, algorithm: AlgorithmSettings, temperature: float):
        self.settings = algorithm
        self.temperature = temperature
        self.epochs = algorithm.ppo_epochs

    def prepare(self, learner: Learner, batch: TrainBatch) -> Prepared:
        rows: dict[str, list[torch.Tensor]] = {"generator": [torch.tensor(r, dtype=torch.float32) for r in batch.old_logprobs]}
        rows["reference"] = [torch.empty(0)] * len(batch)
        learner.policy.model.eval()
        for micro, lengths, packed in learner.packed_micro_batches(batch):
            reference = learner.policy.reference_forward(packed, self.temperature)
            for i, (row, n) in enumerate(zip(micro, lengths)):
                rows["reference"][row] = reference[i, :n].clone()
        return Prepared(rows)

    def loss(self, learner: Learner, batch: TrainBatch, rows: list[int], prepared: Prepared, num_tokens: float, num_sequences: float):
        part = batch.select(rows)
        packed = pack(part.prompt_token_ids, part.completion_token_ids, learner.policy.pad_id, part.loss_masks)
        mask = packed.response_mask
        width = mask.shape[1]
        logprobs, entropy = learner.policy.forward(packed, self.temperature, with_entropy=True)
        reference = padded([prepared.rows["reference"][i] for i in rows], width)
        values = learner.policy.values(packed)
        s = self.settings
        loss, metrics = soft_consistency_loss(logprobs, reference, values, torch.tensor(part.rewards), mask, s.sac_alpha, s.sac_lambda, num_tokens)
        with torch.no_grad():
            generator = padded([prepared.rows["generator"][i] for i in rows], width)
            sampled = mask * torch.tensor([not r for r in part.replayed], dtype=mask.dtype).unsqueeze(-1)
            metrics |= {
                "train/kl": masked_mean(logprobs.detach() - reference, mask).item(),
                "train/entropy": masked_mean(entropy, mask).item(),
                "train/logprob_mismatch": masked_mean((logprobs.detach() - generator).abs(), sampled).item(),
            }
        return loss, metrics

    def finish(self, metrics: dict[str, float], global_rows: int) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class SupervisedObjective:
    """Supervised fine-tuning on the batch's completions (self-improvement on verified
    solutions): NLL = -sum of the completion tokens' log-probs / the global token count.

    Rewards, advantages and the generator's log-probs are ignored; log-probs are taken at
    temperature 1 (the model's own distribution), whatever the rollouts were sampled at. One
    ``epochs`` passes over the batch per step (``algorithm.sft_epochs``)."""

    def __init__(self, epochs: int = 1):
        self.epochs = epochs

    def prepare(self, learner: Learner, batch: TrainBatch) -> Prepared:
        return Prepared()

    def loss(self, learner: Learner, batch: TrainBatch, rows: list[int], prepared: Prepared, num_tokens: float, num_sequences: float):
        part = batch.select(rows)
        packed = pack(part.prompt_token_ids, part.completion_token_ids, learner.policy.pad_id, part.loss_masks)
        mask = packed.response_mask
        logprobs, entropy = learner.policy.forward(packed, 1.0, with_entropy=True)
        # NLL = -(1 / N_tokens) * sum_t log pi(y_t | y_<t, x)
        loss = -(logprobs * mask).sum() / num_tokens
        with torch.no_grad():
            metrics = {"train/sft_loss": loss.item(), "train/entropy": masked_mean(entropy, mask).item()}
        return loss, metrics

    def finish(self, metrics: dict[str, float], global_rows: int) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


# name -> how a learner builds it from its algorithm settings and sampling temperature
OBJECTIVES: dict[ObjectiveName, Callable[[AlgorithmSettings, float], Objective]] = {
    # the rollout objective: the PPO family, or token-level SAC when policy_loss names it
    "ppo": lambda algorithm, temperature: (SoftActorCriticObjective if algorithm.policy_loss == "sac" else PolicyGradientObjective)(algorithm, temperature),
    "sft": lambda algorithm, temperature: SupervisedObjective(algorithm.sft_epochs),
}
