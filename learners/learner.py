"""The learner: one optimisation step of GRPO (clipped ratio, optional KL) on a LoRA policy.

A plain object (no Ray): the learner actor wraps it, tests drive it in-process.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from learners.algorithms import LossAggregation, KLEstimator, kl_penalty, masked_mean, policy_loss
from learners.policy import LoraPolicy, LoraSettings, pack
from rollout.contracts import AdapterUpdate, TrainBatch

logger = logging.getLogger(__name__)

# reported by every step, NaN (JSON null) when not computed
REQUIRED_METRICS = ("train/loss", "train/kl", "train/entropy")


@dataclass(frozen=True)
class LearnerSettings:
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.99)
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    micro_batch_size: int = 16
    clip_eps_low: float = 0.2
    clip_eps_high: float = 0.2
    loss_agg: LossAggregation = "token-mean"
    # token-sum-norm's constant (Dr. GRPO: the generation budget); None = the batch's longest completion
    loss_norm_constant: float | None = None
    kl_coef: float = 0.0
    kl_estimator: KLEstimator = "k3"
    temperature: float = 1.0
    dtype: str = "float32"
    autocast_dtype: str | None = None  # e.g. "bfloat16": matmuls in bf16, params and LM head fp32
    seed: int = 0
    threads: int = 0  # torch threads; 0 = every core (Ray sets OMP_NUM_THREADS=1 in actors)


class Learner:
    """Owns the policy and its optimizer; ``step`` consumes a TrainBatch and bumps the version."""

    def __init__(self, model_path: str | Path, lora: LoraSettings, settings: LearnerSettings):
        torch.manual_seed(settings.seed)
        torch.set_num_threads(settings.threads or os.cpu_count() or 1)
        self.settings = settings
        self.policy = LoraPolicy(model_path, lora, dtype=settings.dtype, autocast_dtype=settings.autocast_dtype)
        self.optimizer = torch.optim.AdamW(
            self.policy.trainable_parameters(), lr=settings.lr, betas=settings.betas, weight_decay=settings.weight_decay
        )
        warmup = max(1, settings.warmup_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: min(1.0, (s + 1) / warmup))
        self.policy_version = 0
        self.skipped_steps = 0

    def _micro_batches(self, batch: TrainBatch):
        size = self.settings.micro_batch_size
        for start in range(0, len(batch), size):
            yield batch.select(list(range(start, min(start + size, len(batch)))))

    def _micro_weight(self, micro: TrainBatch, batch: TrainBatch) -> float:
        """Share of the whole batch's loss that one micro-batch carries (exact accumulation)."""
        if self.settings.loss_agg == "token-mean":
            tokens = lambda b: sum(len(c) for c in b.completion_token_ids)  # noqa: E731
            return tokens(micro) / max(1, tokens(batch))
        return len(micro) / len(batch)

    def _micro_loss(self, micro: TrainBatch, norm_constant: float) -> tuple[torch.Tensor, dict[str, float]]:
        s = self.settings
        packed = pack(micro.prompt_token_ids, micro.completion_token_ids, self.policy.pad_id)
        old_logprobs = torch.zeros_like(packed.response_mask)
        for i, row in enumerate(micro.old_logprobs):
            old_logprobs[i, : len(row)] = torch.tensor(row)
        advantages = torch.tensor(micro.advantages, dtype=torch.float32)
        logprobs, entropy = self.policy.forward(packed, s.temperature, with_entropy=True)
        mask = packed.response_mask
        loss, metrics = policy_loss(
            logprobs, old_logprobs, advantages, mask, s.clip_eps_low, s.clip_eps_high, s.loss_agg, norm_constant
        )
        metrics["train/pg_loss"] = loss.item()
        kl = torch.tensor(float("nan"))  # not computed: no reference pass when kl_coef == 0
        if s.kl_coef > 0:
            ref_logprobs = self.policy.reference_forward(packed, s.temperature)
            kl = masked_mean(kl_penalty(logprobs, ref_logprobs, s.kl_estimator), mask)
            loss = loss + s.kl_coef * kl
        with torch.no_grad():
            mismatch = masked_mean((logprobs.detach() - old_logprobs).abs(), mask)
        metrics |= {
            "train/loss": loss.item(),
            "train/kl": kl.item(),
            "train/entropy": masked_mean(entropy, mask).item(),
            "train/logprob_mismatch": mismatch.item(),
        }
        return loss, metrics

    def step(self, batch: TrainBatch) -> dict[str, float]:
        """One optimizer step over the whole batch (micro-batched, gradients accumulated).

        A non-finite loss or gradient skips the update (weights unchanged) and is counted.
        """
        self.policy.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        totals: dict[str, float] = {}
        finite = True
        # one constant for the whole batch, so micro-batching does not change the loss
        norm_constant = self.settings.loss_norm_constant or max(len(c) for c in batch.completion_token_ids)
        for micro in self._micro_batches(batch):
            weight = self._micro_weight(micro, batch)
            loss, metrics = self._micro_loss(micro, norm_constant)
            if not torch.isfinite(loss):
                finite = False
                break
            (loss * weight).backward()
            for key, value in metrics.items():
                reduce = max if key.endswith("_max") else min if key.endswith("_min") else None
                totals[key] = reduce(totals.get(key, value), value) if reduce else totals.get(key, 0.0) + weight * value
        grad_norm = torch.nn.utils.clip_grad_norm_(self.policy.trainable_parameters(), self.settings.max_grad_norm)
        if not finite or not math.isfinite(grad_norm.item()):
            self.optimizer.zero_grad(set_to_none=True)
            self.skipped_steps += 1
            logger.warning("non-finite loss or gradient at policy version %d: update skipped", self.policy_version)
        else:
            self.optimizer.step()
            self.scheduler.step()
            self.policy_version += 1
        for key in REQUIRED_METRICS:
            totals.setdefault(key, float("nan"))  # a skipped first micro-batch still reports them
        totals |= {
            "train/grad_norm": grad_norm.item(),
            "train/lr": self.scheduler.get_last_lr()[0],
            "train/skipped_steps": float(self.skipped_steps),
        }
        return totals

    @torch.no_grad()
    def logprobs(self, batch: TrainBatch) -> list[list[float]]:
        """The current policy's log-probs of each completion token (for rollout/trainer checks)."""
        self.policy.model.eval()
        out = []
        for micro in self._micro_batches(batch):
            packed = pack(micro.prompt_token_ids, micro.completion_token_ids, self.policy.pad_id)
            logprobs, _ = self.policy.forward(packed, self.settings.temperature)
            out += [logprobs[i, : len(c)].tolist() for i, c in enumerate(micro.completion_token_ids)]
        return out

    def parameter_digest(self) -> dict[str, str]:
        """SHA-256 of the trainable and of the frozen parameters (cheap equality checks)."""
        import hashlib

        digests = {"trainable": hashlib.sha256(), "frozen": hashlib.sha256()}
        for name, p in sorted(self.policy.model.named_parameters()):
            digests["trainable" if p.requires_grad else "frozen"].update(p.detach().float().numpy().tobytes())
        return {k: v.hexdigest() for k, v in digests.items()}

    def get_policy_version(self) -> int:
        return self.policy_version

    def adapter_update(self) -> AdapterUpdate:
        return AdapterUpdate(self.policy_version, self.policy.adapter_state(), self.policy.adapter_config())

    def save_adapter(self, folder: str | Path) -> Path:
        return self.policy.save_adapter(folder)
