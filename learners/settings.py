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
    (README: "Algorithm knobs"). Defaults follow the GRPO paper where it has a choice."""

    # what each step minimises: the PPO family on the rollouts, or supervised NLL on the memory
    # bank's verified solutions (expert iteration / STaR; README: "Self-improvement")
    objective: ObjectiveName = "ppo"
    sft_epochs: int = 1  # objective=sft: passes over each round's solutions
    advantage: AdvantageEstimator = "grpo"
    policy_loss: PolicyLossType = "ppo"
    # optimisation
    lr: float = 1e-5
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.99)
    warmup_steps: int = 0
    lr_schedule: Literal["constant", "cosine"] = "constant"
    min_lr_ratio: float = 0.0  # cosine decays to min_lr_ratio * lr at run.steps
    max_grad_norm: float = 1.0
    ppo_epochs: int = 1  # passes over each rollout batch
    mini_batch_size: int = 0  # sequences per optimizer update (global); 0 = the whole batch
    micro_batch_size: int = 16  # sequences per forward/backward (gradient accumulation)
    # policy loss
    clip_eps_low: float = 0.2
    clip_eps_high: float = 0.2
    dual_clip_c: float | None = None  # e.g. 3.0: bound the loss of negative-advantage tokens
    loss_agg: LossAggregation = "seq-mean-token-mean"
    # token-sum-norm's divisor (Dr. GRPO: the generation budget); None = the batch's longest completion
    loss_norm_constant: float | None = None
    entropy_coef: float = 0.0
    # policy_loss=sac (README: "SAC for the language model"): the temperature of the KL to the
    # reference in the soft Q-function (the soft optimum is pi_ref * exp(Q / alpha): scale it to the
    # rewards), and the lambda of its soft target (0: one-step TD, 1: the soft Monte-Carlo return)
    sac_alpha: float = 0.01
    sac_lambda: float = 1.0
    # Markovian CoT (README: "Markovian chain-of-thought training"): > 0 rewards a CoT by the policy's
    # own answer log-prob and adds its chain-rule term -w * log pi(answer | CoT) / sigma(group rewards)
    actor_reward_weight: float = 0.0
    # advantages
    whiten_advantages: bool | None = None  # None: as the estimator defines (reinforce++, gae: yes)
    gamma: float = 1.0
    lam: float = 0.95  # GAE lambda
    # KL to the reference policy
    kl_coef: float = 0.04
    kl_estimator: KLEstimator = "k3"
    kl_mode: Literal["loss", "reward"] = "loss"  # a loss term, or a per-token reward penalty
    kl_target: float | None = None  # adaptive coefficient toward this KL (Ziegler et al.); None = fixed
    kl_horizon: float = 10000.0
    # rollout/trainer mismatch: cap of the truncated importance weights (e.g. 2.0); None = off
    tis_cap: float | None = None
    # critic (GAE)
    critic_lr: float | None = None  # None = lr
    value_clip: float | None = 0.2
    value_coef: float = 1.0
    # batch building (driver): leave all-equal-reward groups out of the batch
    drop_zero_variance_groups: bool = False
    # the learner's matmuls under autocast in this dtype, parameters and LM head as model.dtype:
    # "bfloat16" (~1.5x on AVX512-BF16 CPUs), "float32" (no autocast); None: bfloat16 on a GPU,
    # none on the CPU
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
    threads: int  # torch threads; 0 = every core (Ray sets OMP_NUM_THREADS=1 in actors)
    gradient_checkpointing: bool  # learner.gradient_checkpointing: recompute activations in the backward pass
    trainable_modules: tuple[str, ...] = ()  # model.train: modules: the only modules trained (lora is None)
    attention_controls: bool = False  # a phase schedule with a surgeon: per-head attention-output scales
