"""What a learner is built from: the config's ``algorithm`` section and the learner's settings.

Its own module, below the learner and its objectives, which both read it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from learners.algorithms import AdvantageEstimator, KLEstimator, LossAggregation, PolicyLossType
from learners.policy import LoraSettings

ObjectiveName = Literal["ppo", "sft"]  # the keys of learners.objectives.OBJECTIVES


@dataclass(frozen=True)
class AlgorithmSettings:
    """The policy-optimisation method and its knobs: the run config's ``algorithm`` section
    (docs/algorithms.md#the-knobs). Defaults follow the GRPO paper where it has a choice."""

    # what each step minimises: the PPO family on the rollouts, or supervised NLL on the solution
    # bank's verified solutions (expert iteration / STaR; docs/algorithms.md#self-improvement-and-the-solution-bank)
    objective: ObjectiveName = "ppo"
    sft_epochs: int = 1  # objective=sft: passes over each round's solutions
    # how advantages are estimated: group-relative (grpo, dr-grpo, rloo, reinforce++-baseline),
    # batch-normalised (batch-std), per token (reinforce++, gae: a learned critic)
    advantage: AdvantageEstimator = "grpo"
    # ppo: clipped ratio per token; gspo: per sequence; pg: plain policy gradient; sac: soft Q-learning
    policy_loss: PolicyLossType = "ppo"
    # -- optimisation --
    lr: float = 1e-5  # AdamW's learning rate (the peak one, under a schedule)
    weight_decay: float = 0.0  # AdamW's decoupled weight decay
    betas: tuple[float, float] = (0.9, 0.99)  # AdamW's moment decay rates
    warmup_steps: int = 0  # steps of linear learning-rate warm-up from 0
    lr_schedule: Literal["constant", "cosine"] = "constant"  # after the warm-up: constant, or cosine to min_lr_ratio * lr
    min_lr_ratio: float = 0.0  # cosine decays to min_lr_ratio * lr at run.steps
    max_grad_norm: float = 1.0  # gradients clipped to this global norm
    ppo_epochs: int = 1  # passes over each rollout batch
    mini_batch_size: int = 0  # sequences per optimizer update (global); 0 = the whole batch
    micro_batch_size: int = 16  # sequences per forward/backward (gradient accumulation)
    # -- policy loss --
    clip_eps_low: float = 0.2  # the ratio's clip below 1 - clip_eps_low
    clip_eps_high: float = 0.2  # ... and above 1 + clip_eps_high (DAPO's clip-higher: 0.28)
    dual_clip_c: float | None = None  # e.g. 3.0: bound the loss of negative-advantage tokens
    # how token losses become the loss: token-mean (DAPO), seq-mean-token-mean (GRPO),
    # seq-mean-token-sum, token-sum-norm (Dr. GRPO)
    loss_agg: LossAggregation = "seq-mean-token-mean"
    # token-sum-norm's divisor (Dr. GRPO: the generation budget); None = the batch's longest completion
    loss_norm_constant: float | None = None
    entropy_coef: float = 0.0  # an entropy bonus: loss -= entropy_coef * the tokens' entropy
    # policy_loss=sac (docs/algorithms.md#sac-for-the-language-model): the temperature of the KL to the
    # reference in the soft Q-function (the soft optimum is pi_ref * exp(Q / alpha): scale it to the rewards)
    sac_alpha: float = 0.01
    sac_lambda: float = 1.0  # policy_loss=sac: its soft target's lambda (0: one-step TD, 1: the soft Monte-Carlo return)
    # Markovian CoT (docs/algorithms.md#markovian-chain-of-thought-training): > 0 rewards a CoT by the policy's
    # own answer log-prob and adds its chain-rule term -w * log pi(answer | CoT) / sigma(group rewards)
    actor_reward_weight: float = 0.0
    # -- advantages --
    whiten_advantages: bool | None = None  # None: as the estimator defines (reinforce++, gae: yes)
    gamma: float = 1.0  # the per-token discount of reinforce++ and GAE returns
    lam: float = 0.95  # GAE lambda
    # -- KL to the reference policy --
    kl_coef: float = 0.04  # beta: the KL term's weight (0: no reference model is run)
    kl_estimator: KLEstimator = "k3"  # Schulman's estimators k1, k2, k3 (and abs, k1+, k3+)
    kl_mode: Literal["loss", "reward"] = "loss"  # a loss term, or a per-token reward penalty
    kl_target: float | None = None  # adaptive coefficient toward this KL (Ziegler et al.); None = fixed
    kl_horizon: float = 10000.0  # kl_target: the adaptive coefficient's horizon, in steps
    # rollout/trainer mismatch: cap of the truncated importance weights (e.g. 2.0); None = off
    tis_cap: float | None = None
    # -- critic (GAE) --
    critic_lr: float | None = None  # advantage=gae: the critic's learning rate; None = lr
    value_clip: float | None = 0.2  # the critic's value clip around its old values; None = off
    value_coef: float = 1.0  # the value loss's weight beside the policy loss
    # -- batch building (driver) --
    # leave all-equal-reward groups out of the batch (they carry no GRPO signal)
    drop_zero_variance_groups: bool = False
    # the learner's matmuls under autocast in this dtype, parameters and LM head as model.dtype:
    # "bfloat16" (~1.5x on AVX512-BF16 CPUs), "float32" (no autocast); None: bfloat16 where the
    # device has bf16 units (a GPU, a CPU with AMX / AVX512-BF16), none elsewhere
    autocast_dtype: str | None = None

    @property
    def uses_critic(self) -> bool:
        return self.advantage == "gae" or self.policy_loss == "sac"

    @property
    def uses_reference(self) -> bool:
        return self.kl_coef > 0 or self.policy_loss == "sac"


@dataclass(frozen=True)
class LearnerSettings:
    """What one learner is built from: the config's ``algorithm`` and ``lora`` sections as
    they are, and the values other sections decide for it. Nothing here has a default: each
    knob's one default lives in its own section (``model.dtype``, ``rollout.temperature``...)."""

    model_path: str
    algorithm: AlgorithmSettings
    lora: LoraSettings | None  # None: train every weight (model.train: full)
    dtype: str  # model.dtype: the parameters' dtype
    temperature: float  # rollout.temperature: log-probs of the distribution the generators sampled
    total_steps: int  # run.steps: the cosine schedule's length
    seed: int  # run.seed
    threads: int  # torch threads; 0 = every core of this node, divided among the learners on it
    gradient_checkpointing: bool  # learner.gradient_checkpointing: recompute activations in the backward pass
    trainable_modules: tuple[str, ...] = ()  # model.train: modules: the only modules trained (lora is None)
    attention_controls: bool = False  # a phase schedule with a surgeon: per-head attention-output scales
    # learner.sharding: "fsdp" shards the policy over the data-parallel group (learners.sharding)
    sharding: Literal["none", "fsdp"] = "none"
    offload_optimizer: bool = False  # learner.offload_optimizer: sharded state in host memory
