"""The surgeon: RLlib's SAC (new API stack: ``SACConfig``, its RLModule, its torch Learner and
its prioritized episode replay buffer) acting on the policy's attention scales.

The environment (``learners.surgery.SurgeonEnv``) is the training run itself, stepped by the
driver: RLlib's own env runners cannot step it. So the agent is fed from outside, the way an
external environment feeds RLlib: the driver asks ``act(observation)``, steps the environment,
and hands back the transition (``observe``), which goes into RLlib's replay buffer; each
transition is followed by ``updates_per_transition`` updates of RLlib's SAC learner on batches
sampled from that buffer (once ``learning_starts`` transitions are in), and the acting module
takes the learner's new weights. What is not RLlib's: the loop around it (RLlib's
``training_step`` would sample its env runners), and the replay buffer's state in checkpoints
(``Algorithm.save_to_path`` leaves it out; it is saved beside).

``Surgeon`` is the plain object (tests drive it in-process); ``surgeon_actor`` the Ray shell.
"""

from __future__ import annotations

import io
import math
import pickle
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import ray

from learners.surgeon_env import SurgeonEnv
from learners.surgery import Granularity


@dataclass(frozen=True)
class SurgeonSettings:
    """The config's ``surgeon`` section: the environment's knobs and SAC's."""

    horizon: int = 2  # language-model steps per surgeon action (the reward's window)
    granularity: Granularity = "layer"  # "layer": one scale change per layer (all its heads); "head": one per head
    max_delta: float = 0.001  # the largest change of a scale per action
    scale_min: float = 0.5  # the smallest attention scale
    scale_max: float = 1.5  # the largest attention scale
    reward_metric: str = "train/reward_mean"  # its window mean's change is the surgeon's reward
    gamma: float = 0.9  # SAC's discount
    tau: float = 0.005  # target-network Polyak coefficient
    actor_lr: float = 3e-4  # SAC's policy learning rate
    critic_lr: float = 3e-4  # SAC's Q-networks' learning rate
    alpha_lr: float = 3e-4  # SAC's entropy temperature's learning rate (tuned automatically)
    initial_alpha: float = 0.1  # SAC's starting entropy temperature
    hidden: list[int] = field(default_factory=lambda: [64, 64])  # the networks' hidden layer widths
    batch_size: int = 16  # transitions per SAC update
    learning_starts: int = 4  # transitions in the buffer before the first update
    updates_per_transition: int = 4  # SAC updates per new transition
    buffer_capacity: int = 10_000  # transitions the replay buffer keeps
    num_cpus: float = 0.0  # the actor's CPU request (it computes little next to the language model)

    def env_config(self, layers: int, heads: int) -> dict:
        keys = ("granularity", "horizon", "max_delta", "scale_min", "scale_max", "reward_metric")
        return {"layers": layers, "heads": heads, **{k: getattr(self, k) for k in keys}}

    def problems(self) -> list[str]:
        problems = []
        if not 0 < self.scale_min <= 1 <= self.scale_max:
            problems.append(f"surgeon.scale_min ({self.scale_min}) and surgeon.scale_max ({self.scale_max}) must hold 1 (the identity) with scale_min > 0")
        if self.horizon < 1 or self.batch_size < 1 or self.updates_per_transition < 0 or self.max_delta <= 0:
            problems.append("surgeon.horizon and surgeon.batch_size must be >= 1, surgeon.updates_per_transition >= 0, surgeon.max_delta > 0")
        return problems


# RLlib's learner results -> the run's metric names (the per-module dict of SACTorchLearner)
SAC_METRICS = {
    "qf_loss": "sac/critic_loss",
    "policy_loss": "sac/actor_loss",
    "alpha_loss": "sac/alpha_loss",
    "alpha_value": "sac/alpha",
    "qf_mean": "sac/q_mean",
    "qf_max": "sac/q_max",
    "qf_min": "sac/q_min",
    "td_error_mean": "sac/td_error_mean",
}


class Surgeon:
    """RLlib's SAC algorithm for the surgeon's environment, driven transition by transition."""

    def __init__(self, settings: SurgeonSettings, layers: int, heads: int, seed: int = 0):
        from ray.rllib.algorithms.sac import SACConfig

        self.settings = s = settings
        env_config = s.env_config(layers, heads)
        self.config = (
            SACConfig()
            .environment(SurgeonEnv, env_config=env_config)
            .env_runners(num_env_runners=0)
            .learners(num_learners=0)
            .debugging(seed=seed)
            .training(
                gamma=s.gamma,
                tau=s.tau,
                actor_lr=s.actor_lr,
                critic_lr=s.critic_lr,
                alpha_lr=s.alpha_lr,
                initial_alpha=s.initial_alpha,
                n_step=1,
                train_batch_size_per_learner=s.batch_size,
                num_steps_sampled_before_learning_starts=s.learning_starts,
                replay_buffer_config={"type": "PrioritizedEpisodeReplayBuffer", "capacity": s.buffer_capacity, "alpha": 0.6, "beta": 0.4},
            )
            .rl_module(model_config={"fcnet_hiddens": list(s.hidden), "head_fcnet_hiddens": []})
        )
        self.algo = self.config.build_algo()
        # RLlib draws the replay buffer's samples from an unseeded generator: seed it, so a run's
        # surgeon is reproducible (and saved with the checkpoint)
        self.buffer.rng = np.random.default_rng(seed)
        self.env = SurgeonEnv(env_config)  # its spaces
        self.transitions = 0
        self.updates = 0
        self._rng = np.random.default_rng(seed)

    @property
    def buffer(self):
        return self.algo.local_replay_buffer

    def act(self, observation: np.ndarray, explore: bool = True) -> np.ndarray:
        """An action in [-1, 1]^n: a sample of the squashed Gaussian policy (``explore``), or its
        mean. Before ``learning_starts`` transitions, uniform at random (SAC's warm-up)."""
        import torch

        if explore and self.transitions < self.settings.learning_starts:
            return self._rng.uniform(-1.0, 1.0, self.env.action_space.shape).astype(np.float32)
        module = self.algo.get_module()
        with torch.no_grad():
            batch = {"obs": torch.as_tensor(np.asarray(observation, np.float32))[None]}
            out = module.forward_exploration(batch) if explore else module.forward_inference(batch)
            dist_cls = module.get_exploration_action_dist_cls() if explore else module.get_inference_action_dist_cls()
            dist = dist_cls.from_logits(out["action_dist_inputs"])
            action = dist.sample() if explore else dist.to_deterministic().sample()
        return np.clip(action[0].numpy().astype(np.float32), -1.0, 1.0)

    def observe(self, observation, action, reward: float, next_observation, terminated: bool = False, truncated: bool = False) -> dict[str, float]:
        """Store one transition in the replay buffer and run SAC's updates; returns their
        metrics (means over the updates; none before ``learning_starts``)."""
        from ray.rllib.env.single_agent_episode import SingleAgentEpisode

        # a one-step episode: SAC bootstraps from next_observation unless terminated
        episode = SingleAgentEpisode(
            observations=[np.asarray(observation, np.float32), np.asarray(next_observation, np.float32)],
            actions=[np.asarray(action, np.float32)],
            rewards=[float(reward)],
            terminated=terminated,
            truncated=not terminated,
            len_lookback_buffer=0,
            observation_space=self.env.observation_space,
            action_space=self.env.action_space,
        )
        self.buffer.add([episode])
        self.transitions += 1
        metrics = {"sac/transitions": float(self.transitions), "sac/buffer_size": float(self.buffer.get_num_timesteps())}
        if self.transitions < self.settings.learning_starts:
            return metrics
        results = [self._update() for _ in range(self.settings.updates_per_transition)]
        if results:
            self.algo.env_runner_group.sync_weights(from_worker_or_learner_group=self.algo.learner_group, inference_only=True)
            metrics |= {key: float(np.mean([r[key] for r in results])) for key in results[0]}
        return metrics | {"sac/updates": float(self.updates)}

    def _update(self) -> dict[str, float]:
        """One SAC update of RLlib's learner on a prioritized batch from the buffer; the
        batch's TD errors become its new priorities (what RLlib's training_step does)."""
        from ray.rllib.core import DEFAULT_MODULE_ID
        from ray.rllib.utils.metrics import TD_ERROR_KEY
        from ray.rllib.utils.replay_buffers.utils import update_priorities_in_episode_replay_buffer

        s = self.settings
        episodes = self.buffer.sample(num_items=s.batch_size, n_step=1, gamma=s.gamma, beta=0.4, sample_episodes=True)
        results = {k: _value(v) for k, v in self.algo.learner_group.update(episodes=episodes, timesteps={})[0][DEFAULT_MODULE_ID].items()}
        if TD_ERROR_KEY in results:
            td = np.asarray(results.pop(TD_ERROR_KEY)).reshape(-1)
            update_priorities_in_episode_replay_buffer(replay_buffer=self.buffer, td_errors={DEFAULT_MODULE_ID: {TD_ERROR_KEY: td}})
        self.updates += 1
        out = {name: float(np.mean(results[key])) for key, name in SAC_METRICS.items() if key in results}
        if "logps" in results:  # the policy's entropy estimate: -E[log pi(a|s)]
            out["sac/entropy"] = -float(np.mean(results["logps"]))
        return {k: v for k, v in out.items() if math.isfinite(v)}

    # -- checkpoints ----------------------------------------------------------------------

    def state(self) -> bytes:
        """The agent as bytes: RLlib's checkpoint folder (``Algorithm.save_to_path``: modules,
        optimizers, alpha) as a tar archive, plus the replay buffer and the counters (the
        driver writes it into the run's checkpoint, wherever this actor runs)."""
        with tempfile.TemporaryDirectory() as folder:
            self.algo.save_to_path(str(Path(folder) / "algorithm"))
            archive = io.BytesIO()
            with tarfile.open(fileobj=archive, mode="w") as tar:
                tar.add(str(Path(folder) / "algorithm"), arcname="algorithm")
        rngs = {"rng": self._rng.bit_generator.state, "buffer_rng": self.buffer.rng.bit_generator.state}
        extra = {"buffer": self.buffer.get_state(), "transitions": self.transitions, "updates": self.updates, **rngs}
        return pickle.dumps({"algorithm": archive.getvalue(), **extra})

    def load_state(self, blob: bytes) -> None:
        state = pickle.loads(blob)
        with tempfile.TemporaryDirectory() as folder:
            with tarfile.open(fileobj=io.BytesIO(state["algorithm"]), mode="r") as tar:
                tar.extractall(folder, filter="data")
            self.algo.restore_from_path(str(Path(folder) / "algorithm"))
        self.buffer.set_state(state["buffer"])
        self.transitions, self.updates = state["transitions"], state["updates"]
        self._rng.bit_generator.state = state["rng"]
        self.buffer.rng.bit_generator.state = state["buffer_rng"]


def _value(result):
    """A learner result's value (RLlib wraps most in a stats object that ``peek``s)."""
    return result.peek() if hasattr(result, "peek") else result


class SurgeonActor:
    """The Ray shell around a Surgeon."""

    def __init__(self, settings: SurgeonSettings, layers: int, heads: int, seed: int):
        self.surgeon = Surgeon(settings, layers, heads, seed)

    def act(self, observation: np.ndarray, explore: bool = True) -> np.ndarray:
        return self.surgeon.act(observation, explore)

    def observe(self, observation, action, reward: float, next_observation, terminated: bool = False, truncated: bool = False) -> dict[str, float]:
        return self.surgeon.observe(observation, action, reward, next_observation, terminated, truncated)

    def state(self) -> bytes:
        return self.surgeon.state()

    def load_state(self, blob: bytes) -> None:
        self.surgeon.load_state(blob)


def surgeon_actor(num_cpus: float = 0.0):
    return ray.remote(num_cpus=num_cpus)(SurgeonActor)
