"""The learner: one training step on one rollout batch, on one or several data-parallel ranks.

A step reads top to bottom:
1. guard: a non-finite reward, advantage or generator log-prob skips the whole step;
2. prepare (no gradients): the learner's own log-probs (for truncated importance sampling),
   the reference log-probs (KL), the critic's values (GAE);
3. advantages per token (outcome advantages from the batch, plus the KL reward penalty, or
   REINFORCE++ returns, or GAE), whitened over the global batch where the estimator says so;
4. ``ppo_epochs`` passes over shuffled mini-batches, each one optimizer update, each split
   into micro-batches whose gradients accumulate exactly to the mini-batch's.

Data parallelism: every rank holds its shard of the rollout batch; losses are normalised by
global token / sequence counts, gradients are summed with ``torch.distributed`` (gloo; the
learner computes on CPU so far), so after each update all ranks hold identical parameters and equal one learner
that saw the whole batch. A plain object (no Ray): the learner actor wraps it, tests drive it
in-process.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from learners.algorithms import (
    OUTCOME_ESTIMATORS,
    WHITENED_BY_DEFINITION,
    AdaptiveKLController,
    AdvantageEstimator,
    KLEstimator,
    LossAggregation,
    PolicyLossType,
    aggregate_loss,
    cosine_schedule,
    discounted_returns,
    gae_advantages,
    kl_penalty,
    masked_mean,
    masked_moments,
    masked_whiten,
    outcome_token_rewards,
    policy_loss,
    truncated_is_weights,
    value_loss,
)
from learners.policy import LoraSettings, Policy, pack
from contracts import DEFAULT_ADAPTER, PolicyRef, TrainBatch, WeightUpdate

logger = logging.getLogger(__name__)

# reported by every step, NaN (JSON null) when not computed
REQUIRED_METRICS = ("train/loss", "train/kl", "train/entropy")


@dataclass(frozen=True)
class LearnerSettings:
    # optimisation
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.99)
    warmup_steps: int = 0
    lr_schedule: str = "constant"  # "constant" or "cosine" (after warm-up, to min_lr_ratio * lr)
    min_lr_ratio: float = 0.0
    total_steps: int = 0  # the cosine schedule's length in learner steps
    max_grad_norm: float = 1.0
    ppo_epochs: int = 1
    mini_batch_size: int = 0  # sequences per optimizer update (global); 0 = the whole batch
    micro_batch_size: int = 16
    # policy loss
    policy_loss: PolicyLossType = "ppo"
    clip_eps_low: float = 0.2
    clip_eps_high: float = 0.2
    dual_clip_c: float | None = None
    loss_agg: LossAggregation = "token-mean"
    # token-sum-norm's constant (Dr. GRPO: the generation budget); None = the batch's longest completion
    loss_norm_constant: float | None = None
    entropy_coef: float = 0.0
    # advantages
    advantage: AdvantageEstimator = "grpo"
    whiten_advantages: bool | None = None  # None: as the estimator is defined (REINFORCE++, GAE: yes)
    gamma: float = 1.0
    lam: float = 0.95
    # KL to the reference policy
    kl_coef: float = 0.0
    kl_estimator: KLEstimator = "k3"
    kl_mode: str = "loss"  # "loss": a loss term; "reward": a per-token reward penalty
    kl_target: float | None = None  # adaptive coefficient toward this KL (Ziegler et al.)
    kl_horizon: float = 10000.0
    # rollout/trainer mismatch: cap of the truncated importance weights; None = off
    tis_cap: float | None = None
    # critic (GAE)
    critic_lr: float | None = None  # None = lr
    value_clip: float | None = 0.2
    value_coef: float = 1.0
    # model
    full_weights: bool = False  # train every weight instead of a LoRA adapter
    temperature: float = 1.0
    dtype: str = "float32"
    autocast_dtype: str | None = None  # e.g. "bfloat16": matmuls in bf16, params and LM head fp32
    seed: int = 0
    threads: int = 0  # torch threads; 0 = every core (Ray sets OMP_NUM_THREADS=1 in actors)

    @property
    def uses_critic(self) -> bool:
        return self.advantage == "gae"

    @property
    def uses_reference(self) -> bool:
        return self.kl_coef > 0


def _extreme(key: str):
    """How a metric combines across micro-batches, updates and ranks: max, min, or None (sum)."""
    return max if key.endswith("_max") else min if key.endswith("_min") else None


def _padded(rows: list[torch.Tensor], width: int) -> torch.Tensor:
    out = torch.zeros(len(rows), width)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out


class Learner:
    """Owns the policy and its optimizer; ``step`` consumes a TrainBatch and bumps the version."""

    def __init__(self, model_path: str | Path, lora: LoraSettings | None, settings: LearnerSettings):
        s = settings
        self.settings = s
        self._check()
        torch.manual_seed(s.seed)
        torch.set_num_threads(s.threads or os.cpu_count() or 1)
        self.policy = Policy(
            model_path,
            None if s.full_weights else lora,
            dtype=s.dtype,
            autocast_dtype=s.autocast_dtype,
            critic=s.uses_critic,
            reference=s.uses_reference,
        )
        groups = [{"params": self.policy.policy_parameters(), "lr": s.lr}]
        if s.uses_critic:
            groups.append({"params": self.policy.critic_parameters(), "lr": s.critic_lr or s.lr})
        self.optimizer = torch.optim.AdamW(groups, lr=s.lr, betas=s.betas, weight_decay=s.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.kl = AdaptiveKLController(s.kl_coef, s.kl_target, s.kl_horizon) if s.kl_target else None
        self.policy_version = 0
        self.steps_done = 0
        self.skipped_steps = 0
        self.skipped_updates = 0
        self.rank, self.world_size = 0, 1

    def _check(self) -> None:
        s = self.settings
        if s.lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"unknown lr_schedule {s.lr_schedule!r}")
        if s.lr_schedule == "cosine" and s.total_steps <= s.warmup_steps:
            raise ValueError(f"cosine schedule needs total_steps ({s.total_steps}) > warmup_steps ({s.warmup_steps})")
        if s.kl_mode not in ("loss", "reward"):
            raise ValueError(f"unknown kl_mode {s.kl_mode!r}")

    def _lr_factor(self, step: int) -> float:
        s = self.settings
        if s.lr_schedule == "cosine":
            return cosine_schedule(step, s.total_steps, s.warmup_steps, s.min_lr_ratio)
        return min(1.0, (step + 1) / max(1, s.warmup_steps))

    @property
    def kl_coef(self) -> float:
        return self.kl.coef if self.kl else self.settings.kl_coef

    # -- data parallelism ----------------------------------------------------------------------

    def init_distributed(self, address: str, port: int, rank: int, world_size: int, backend: str = "gloo") -> None:
        """Join the learners' process group and start from rank 0's parameters."""
        import torch.distributed as dist

        dist.init_process_group(backend, init_method=f"tcp://{address}:{port}", rank=rank, world_size=world_size)
        self.rank, self.world_size = rank, world_size
        with torch.no_grad():
            for p in self.policy.trainable_parameters():
                dist.broadcast(p.data, src=0)

    def _all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        if self.world_size > 1:
            import torch.distributed as dist

            dist.all_reduce(tensor, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op])
        return tensor

    def _global(self, *values: float) -> list[float]:
        return self._all_reduce(torch.tensor(values, dtype=torch.float64)).tolist()

    # -- the step ------------------------------------------------------------------------------

    def _micro_batches(self, indices: list[int]):
        size = self.settings.micro_batch_size
        for start in range(0, len(indices), size):
            yield indices[start : start + size]

    def _packed_micro_batches(self, batch: TrainBatch):
        """(completion lengths, packed tensors) for each micro-batch of the whole batch, in order."""
        for micro in self._micro_batches(list(range(len(batch)))):
            part = batch.select(micro)
            packed = pack(part.prompt_token_ids, part.completion_token_ids, self.policy.pad_id)
            yield [len(c) for c in part.completion_token_ids], packed

    def _prepare(self, batch: TrainBatch) -> dict[str, list[torch.Tensor]]:
        """Per-row tensors fixed for the whole step, computed without gradients."""
        s = self.settings
        prep: dict[str, list[torch.Tensor]] = {"generator": [torch.tensor(r, dtype=torch.float32) for r in batch.old_logprobs]}
        need = {
            "learner": s.tis_cap is not None,
            "reference": s.uses_reference,
            "values": s.uses_critic,
        }
        for key in (k for k, wanted in need.items() if wanted):
            prep[key] = []
        if len(prep) == 1:
            return prep
        self.policy.model.eval()
        with torch.no_grad():
            for lengths, packed in self._packed_micro_batches(batch):
                outputs = {}
                if need["learner"]:
                    outputs["learner"] = self.policy.forward(packed, s.temperature)[0]
                if need["reference"]:
                    outputs["reference"] = self.policy.reference_forward(packed, s.temperature)
                if need["values"]:
                    outputs["values"] = self.policy.values(packed)
                for key, tensor in outputs.items():
                    prep[key] += [tensor[i, :n].clone() for i, n in enumerate(lengths)]
        return prep

    def _advantages(self, batch: TrainBatch, prep: dict) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, float]]:
        """Per-token advantages [B, T] (and GAE returns) for this rank's rows."""
        s = self.settings
        lengths = [len(c) for c in batch.completion_token_ids]
        width = max(1, max(lengths))
        mask = _padded([torch.ones(n) for n in lengths], width)
        old = _padded(prep.get("learner", prep["generator"]), width)
        metrics: dict[str, float] = {}
        kl_reward = torch.zeros_like(mask)
        if s.uses_reference:
            kl_tokens = kl_penalty(old, _padded(prep["reference"], width), s.kl_estimator) * mask
            if s.kl_mode == "reward":
                kl_reward = self.kl_coef * kl_tokens
            metrics["train/kl_old"] = masked_mean(kl_tokens, mask).item()
        returns = None
        if s.advantage in OUTCOME_ESTIMATORS:
            # the KL penalty's REINFORCE return (gamma = 1) on top of the outcome advantage
            advantages = torch.tensor(batch.advantages).unsqueeze(-1) * mask - discounted_returns(kl_reward, mask)
        else:
            token_rewards = outcome_token_rewards(torch.tensor(batch.rewards), mask) - kl_reward
            if s.advantage == "reinforce++":
                advantages = discounted_returns(token_rewards, mask, s.gamma)
            elif s.advantage == "gae":
                advantages, returns = gae_advantages(token_rewards, _padded(prep["values"], width), mask, s.gamma, s.lam)
            else:
                raise ValueError(f"unknown advantage estimator {s.advantage!r}")
        whiten = s.whiten_advantages if s.whiten_advantages is not None else s.advantage in WHITENED_BY_DEFINITION
        if whiten:
            advantages = masked_whiten(advantages, mask, self._all_reduce(masked_moments(advantages, mask)))
        metrics["train/advantage_abs_mean"] = masked_mean(advantages.abs(), mask).item()
        if returns is not None:
            metrics["train/return_mean"] = masked_mean(returns, mask).item()
        return advantages, returns, metrics

    def _micro_loss(self, batch, rows, prep, advantages, returns, num_tokens, num_sequences, norm_constant):
        s = self.settings
        part = batch.select(rows)
        packed = pack(part.prompt_token_ids, part.completion_token_ids, self.policy.pad_id)
        mask = packed.response_mask
        width = mask.shape[1]
        generator = _padded([prep["generator"][i] for i in rows], width)
        old = _padded([prep["learner"][i] for i in rows], width) if "learner" in prep else generator
        adv = advantages[rows, :width]
        logprobs, entropy = self.policy.forward(packed, s.temperature, with_entropy=True, entropy_grad=s.entropy_coef > 0)
        is_weights = truncated_is_weights(old, generator, s.tis_cap) * mask if s.tis_cap is not None else None
        totals = dict(num_tokens=num_tokens, num_sequences=num_sequences)
        loss, metrics = policy_loss(
            logprobs, old, adv, mask, s.policy_loss, s.clip_eps_low, s.clip_eps_high, s.dual_clip_c,
            s.loss_agg, norm_constant, is_weights, **totals,
        )
        metrics["train/pg_loss"] = loss.item()
        kl = torch.tensor(float("nan"))  # not computed: no reference pass when kl_coef == 0
        if s.uses_reference:
            kl_tokens = kl_penalty(logprobs, _padded([prep["reference"][i] for i in rows], width), s.kl_estimator)
            kl = masked_mean(kl_tokens.detach(), mask)
            if s.kl_mode == "loss":
                loss = loss + self.kl_coef * aggregate_loss(kl_tokens, mask, s.loss_agg, norm_constant, **totals)
        if s.entropy_coef > 0:
            loss = loss - s.entropy_coef * aggregate_loss(entropy, mask, s.loss_agg, norm_constant, **totals)
        if returns is not None:
            values = self.policy.values(packed)
            old_values = _padded([prep["values"][i] for i in rows], width)
            v_loss, value_metrics = value_loss(values, old_values, returns[rows, :width], mask, s.value_clip, num_tokens)
            loss = loss + s.value_coef * v_loss
            metrics |= value_metrics
        with torch.no_grad():
            # generator vs learner under the same weights: the recomputed old log-probs, else
            # this pass's (exact in a step's first update, before the weights move)
            learner_logprobs = old if "learner" in prep else logprobs.detach()
            metrics |= {
                "train/kl": kl.item(),
                "train/entropy": masked_mean(entropy.detach(), mask).item(),
                "train/logprob_mismatch": masked_mean((learner_logprobs - generator).abs(), mask).item(),
            }
            if is_weights is not None:
                metrics["train/tis_weight_mean"] = masked_mean(is_weights, mask).item()
        return loss, metrics

    def _update(self, batch, rows, prep, advantages, returns, norm_constant) -> tuple[bool, dict[str, float]]:
        """One optimizer update over ``rows`` of this rank (all ranks call it in lockstep)."""
        s = self.settings
        local_tokens = sum(len(batch.completion_token_ids[i]) for i in rows)
        num_tokens, num_sequences = self._global(local_tokens, len(rows))
        num_tokens = max(1.0, num_tokens)
        self.optimizer.zero_grad(set_to_none=False)
        sums: dict[str, float] = {}
        finite = True
        for micro in self._micro_batches(rows):
            loss, metrics = self._micro_loss(batch, micro, prep, advantages, returns, num_tokens, num_sequences, norm_constant)
            finite = finite and bool(torch.isfinite(loss))
            if finite:
                loss.backward()
            share = sum(len(batch.completion_token_ids[i]) for i in micro) / num_tokens
            for key, value in metrics.items():
                if _extreme(key):
                    sums[key] = _extreme(key)(sums.get(key, value), value)
                else:  # losses are already normalised globally: they add up
                    sums[key] = sums.get(key, 0.0) + (value if key.endswith("loss") else share * value)
            sums["train/loss"] = sums.get("train/loss", 0.0) + loss.item()
        finite = self._global(float(not finite))[0] == 0
        if self.world_size > 1:
            for p in self.policy.trainable_parameters():
                if p.grad is None:  # a rank whose share of this mini-batch was empty
                    p.grad = torch.zeros_like(p)
                self._all_reduce(p.grad)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.policy.policy_parameters(), s.max_grad_norm)
        if s.uses_critic:
            sums["train/critic_grad_norm"] = torch.nn.utils.clip_grad_norm_(self.policy.critic_parameters(), s.max_grad_norm).item()
        sums["train/grad_norm"] = grad_norm.item()
        applied = finite and math.isfinite(grad_norm.item()) and math.isfinite(sums.get("train/critic_grad_norm", 0.0))
        if applied:
            self.optimizer.step()
        return applied, self._reduce_metrics(sums)

    def _reduce_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        """Every rank's metrics combined: sums for shares and losses, max / min for extremes."""
        if self.world_size == 1:
            return metrics
        out = {}
        for op, extreme in (("max", max), ("min", min), ("sum", None)):
            chosen = [k for k in sorted(metrics) if _extreme(k) is extreme]
            if chosen:
                values = self._all_reduce(torch.tensor([metrics[k] for k in chosen], dtype=torch.float64), op).tolist()
                out |= dict(zip(chosen, values))
        for key in ("train/grad_norm", "train/critic_grad_norm"):  # identical on every rank
            if key in out:
                out[key] = metrics[key]
        return out

    def _skip(self, reason: str) -> dict[str, float]:
        self.skipped_steps += 1
        logger.warning("%s at policy version %d: update skipped", reason, self.policy_version)
        return {
            **dict.fromkeys(REQUIRED_METRICS, float("nan")),
            "train/grad_norm": float("nan"),
            "train/lr": self.scheduler.get_last_lr()[0],
            "train/skipped_steps": float(self.skipped_steps),
            "train/skipped_updates": float(self.skipped_updates),
        }

    def step(self, batch: TrainBatch) -> dict[str, float]:
        """One learner step on a rollout batch (this rank's shard of it).

        A non-finite input skips the step; a non-finite loss or gradient skips that update.
        Either way the weights stay as they were and the counters rise.
        """
        s = self.settings
        numbers = [*batch.advantages, *batch.rewards, *(x for row in batch.old_logprobs for x in row)]
        bad_input = not all(math.isfinite(x) for x in numbers)
        if self._global(float(bad_input))[0] > 0:
            return self._skip("non-finite reward, advantage or log-prob in the batch")
        prep = self._prepare(batch)
        advantages, returns, adv_metrics = self._advantages(batch, prep)
        adv_metrics = self._reduce_metrics({k: v / self.world_size for k, v in adv_metrics.items()})
        longest = max((len(c) for c in batch.completion_token_ids), default=1)
        # one constant for the whole batch, so micro-batching and sharding do not change the loss
        norm_constant = s.loss_norm_constant or self._all_reduce(torch.tensor(float(longest)), "max").item()
        global_rows = int(self._global(len(batch))[0])
        updates = -(-global_rows // s.mini_batch_size) if s.mini_batch_size else 1
        shuffle = torch.Generator().manual_seed(s.seed * 1_000_003 + self.steps_done)
        self.policy.model.train()
        sums: dict[str, float] = {}
        applied = 0
        mismatch = None
        for _ in range(s.ppo_epochs):
            order = torch.randperm(len(batch), generator=shuffle) if updates > 1 else torch.arange(len(batch))
            for rows in torch.tensor_split(order, updates):
                ok, metrics = self._update(batch, rows.tolist(), prep, advantages, returns, norm_constant)
                if mismatch is None:  # measured before any update of this step moved the weights
                    mismatch = metrics.get("train/logprob_mismatch")
                applied += ok
                if not ok:
                    self.skipped_updates += 1
                    logger.warning("non-finite loss or gradient at policy version %d: update skipped", self.policy_version)
                for key, value in metrics.items():
                    sums[key] = _extreme(key)(sums.get(key, value), value) if _extreme(key) else sums.get(key, 0.0) + value
        total = s.ppo_epochs * updates
        out = {k: v if _extreme(k) else v / total for k, v in sums.items()} | adv_metrics
        if mismatch is not None:
            out["train/logprob_mismatch"] = mismatch
        self.steps_done += 1
        if applied:
            self.policy_version += 1
            self.scheduler.step()
        else:
            self.skipped_steps += 1
        if self.kl:
            self.kl.update(out.get("train/kl", float("nan")), n_steps=global_rows)
        for key in REQUIRED_METRICS:
            out.setdefault(key, float("nan"))
        return out | {
            "train/lr": self.scheduler.get_last_lr()[0],
            "train/kl_coef": self.kl_coef,
            "train/updates": float(applied),
            "train/skipped_steps": float(self.skipped_steps),
            "train/skipped_updates": float(self.skipped_updates),
        }

    # -- queries ---------------------------------------------------------------------------

    @torch.no_grad()
    def logprobs(self, batch: TrainBatch) -> list[list[float]]:
        """The current policy's log-probs of each completion token (for rollout/trainer checks)."""
        self.policy.model.eval()
        out = []
        for lengths, packed in self._packed_micro_batches(batch):
            logprobs, _ = self.policy.forward(packed, self.settings.temperature)
            out += [logprobs[i, :n].tolist() for i, n in enumerate(lengths)]
        return out

    def parameter_digest(self) -> dict[str, str]:
        """SHA-256 of the trainable and of the frozen parameters (cheap equality checks)."""
        digests = {"trainable": hashlib.sha256(), "frozen": hashlib.sha256()}
        trainable = {id(p) for p in self.policy.trainable_parameters()}
        named = sorted(self.policy.model.named_parameters()) + [(n, p) for n, p in self.policy.named_trainable() if n.startswith("value_head")]
        for name, p in named:
            digests["trainable" if id(p) in trainable else "frozen"].update(p.detach().float().numpy().tobytes())
        return {k: v.hexdigest() for k, v in digests.items()}

    def get_policy_version(self) -> int:
        return self.policy_version

    # -- checkpoints -----------------------------------------------------------------------

    def state_dict(self, weights: bool = True) -> dict:
        """What this rank needs to continue exactly where it is: the trainable tensors (the
        adapter, or every weight, and the critic), optimizer, scheduler, KL coefficient,
        counters and torch RNG state. ``weights=False``: only the RNG (the other ranks, whose
        weights and optimizer equal rank 0's)."""
        state: dict = {"rank": self.rank, "rng": torch.get_rng_state()}
        if weights:
            state |= {
                "trainable": {n: p.detach().to("cpu", copy=True) for n, p in self.policy.named_trainable()},
                # copies: the optimizer keeps updating its moment tensors in place
                "optimizer": copy.deepcopy(self.optimizer.state_dict()),
                # the schedule's function is code, rebuilt from the settings: not saved
                "scheduler": {k: copy.deepcopy(v) for k, v in self.scheduler.state_dict().items() if k != "lr_lambdas"},
                "kl_coef": self.kl.coef if self.kl else None,
                "policy_version": self.policy_version,
                "steps_done": self.steps_done,
                "skipped_steps": self.skipped_steps,
                "skipped_updates": self.skipped_updates,
            }
        return state

    def load_state_dict(self, state: dict, rng: torch.Tensor | None = None, policy_version: int | None = None) -> int:
        """Continue from ``state`` (rank 0's), with this rank's ``rng`` state if given; a
        ``policy_version`` replaces the saved one (a rollback serves old weights as a new
        version). Returns the version now held."""
        named = dict(self.policy.named_trainable())
        saved = state["trainable"]
        missing, unexpected = set(named) - set(saved), set(saved) - set(named)
        reshaped = [n for n in set(named) & set(saved) if named[n].shape != saved[n].shape]
        if missing or unexpected or reshaped:
            raise ValueError(
                f"checkpoint does not fit this policy: missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}, "
                f"other shapes {sorted(reshaped)[:3]} (was it written with another model, lora.rank or lora.target_modules?)"
            )
        with torch.no_grad():
            for name, param in named.items():
                param.copy_(saved[name])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict({**state["scheduler"], "lr_lambdas": [None] * len(self.scheduler.lr_lambdas)})
        if self.kl and state["kl_coef"] is not None:
            self.kl.coef = state["kl_coef"]
        self.policy_version = state["policy_version"] if policy_version is None else policy_version
        self.steps_done, self.skipped_steps, self.skipped_updates = state["steps_done"], state["skipped_steps"], state["skipped_updates"]
        torch.set_rng_state(rng if rng is not None else state["rng"])
        return self.policy_version

    def scale_lr(self, factor: float) -> float:
        """Multiply the learning rate (and its schedule) by ``factor``; returns the new rate."""
        self.scheduler.base_lrs = [lr * factor for lr in self.scheduler.base_lrs]
        for group, lr in zip(self.optimizer.param_groups, self.scheduler.get_last_lr()):
            group["lr"] = lr * factor
        self.scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]
        return self.scheduler.get_last_lr()[0]

    def weight_update(self) -> WeightUpdate:
        kind = "full" if self.policy.lora is None else "lora"
        return WeightUpdate(PolicyRef(DEFAULT_ADAPTER, self.policy_version), self.policy.weight_state(), self.policy.adapter_config(), kind)

    def save(self, folder: str | Path) -> Path:
        return self.policy.save(folder)
