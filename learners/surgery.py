"""Attention surgery: the continuous controls a SAC "surgeon" acts on while GRPO trains the
language model, and the pure parts of the environment it acts in (``learners.surgeon_env``).

The controls are one scale per layer and attention head on the head's share of the attention
output through the frozen base projection: ``o_proj(x) = W_o diag(s) x + lora(x)``, with
``s`` the [layers, heads] scales repeated over each head's ``head_dim`` input columns. A scale
of 1 is the model as it is. The learner applies them with a forward pre-hook on the base
``o_proj`` linear (no copy of any weight; the LoRA branch sees the unscaled input); a generator
applies them as a weight transform (``W_o diag(s)``, reloaded in place). Both compute the same
function, so the learner's log-probs and the generators' agree after a change (tested).

What the environment simplifies, against the experiment it reproduces:
- an action is a bounded change of the scales (per layer, or per head), applied for
  ``horizon`` language-model steps; the reward is the change of a training metric's mean
  (default ``train/reward_mean``: the rolling reward of the run's own rollouts, not a separate
  held-out set) over that window against the window before;
- the observation is a handful of the run's training statistics plus the controls, not
  per-layer attention entropies (which would need an extra forward pass with attention maps);
- one episode is the whole run: nothing terminates it; a window cut short by a phase change
  or the run's end is a truncation.
"""

from __future__ import annotations

import contextlib
import math
from typing import Literal, Sequence

import numpy as np
import torch

Granularity = Literal["layer", "head"]

# the training statistics a surgeon observes (NaN, e.g. the loss while GRPO pauses, reads 0)
OBSERVED_METRICS = (
    "train/reward_mean",
    "train/accuracy",
    "train/entropy",
    "train/kl",
    "train/loss",
    "train/grad_norm",
    "train/completion_length",
)


class AttentionControls:
    """Per-layer, per-head scales on a Llama-style model's attention output (see the module
    docstring), applied by forward pre-hooks on each layer's base ``o_proj`` linear.

    ``bypass()`` switches them off for a while (the reference policy is the model without
    them). The scales start at identity and are part of the policy: the learner versions and
    checkpoints them with its adapter.
    """

    def __init__(self, causal_lm: torch.nn.Module):
        config = causal_lm.config
        self.num_layers, self.num_heads = config.num_hidden_layers, config.num_attention_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.scales = torch.ones(self.num_layers, self.num_heads)
        self._columns: list[torch.Tensor | None] = [None] * self.num_layers  # per layer: s repeated over its columns; None at identity
        self._active = True
        for index, layer in enumerate(causal_lm.model.layers):
            linear = layer.self_attn.o_proj
            linear = getattr(linear, "base_layer", linear)  # under PEFT: the frozen base, not the LoRA branch
            linear.register_forward_pre_hook(self._hook(index))

    def _hook(self, layer: int):
        def scale_input(module, args):
            columns = self._columns[layer]
            if not self._active or columns is None:
                return None
            (x, *rest) = args
            # x @ (W diag(s)).T == (x * s) @ W.T, s repeated over each head's columns
            return (x * columns.to(device=x.device, dtype=x.dtype), *rest)

        return scale_input

    def set(self, scales: torch.Tensor) -> None:
        scales = torch.as_tensor(scales, dtype=torch.float32)
        if scales.shape != self.scales.shape:
            raise ValueError(f"attention scales of shape {tuple(scales.shape)}: this model has {tuple(self.scales.shape)} (layers, heads)")
        if not bool(torch.isfinite(scales).all()) or bool((scales <= 0).any()):
            raise ValueError("attention scales must be finite and positive")
        self.scales = scales.clone()
        self._columns = [None if bool((row == 1).all()) else row.repeat_interleave(self.head_dim) for row in self.scales]

    @contextlib.contextmanager
    def bypass(self):
        self._active = False
        try:
            yield
        finally:
            self._active = True


def apply_action(
    scales: np.ndarray, action: np.ndarray, max_delta: float, bounds: tuple[float, float], granularity: Granularity
) -> tuple[np.ndarray, np.ndarray]:
    """The scales after an action, and the change applied.

    scales: [L, H]; action in [-1, 1]^L (``layer``: one change for all heads of a layer) or
    [-1, 1]^(L*H) (``head``). s' = clip(s + max_delta * a, lo, hi).
    """
    layers, heads = scales.shape
    a = np.clip(np.asarray(action, dtype=np.float64), -1.0, 1.0)
    expected = layers if granularity == "layer" else layers * heads
    if a.size != expected:
        raise ValueError(f"a {granularity}-granular action has {expected} values, got {a.size}")
    delta = max_delta * (np.repeat(a.reshape(layers, 1), heads, axis=1) if granularity == "layer" else a.reshape(layers, heads))
    new = np.clip(scales + delta, *bounds)
    return new.astype(np.float32), (new - scales).astype(np.float32)


def action_size(layers: int, heads: int, granularity: Granularity) -> int:
    return layers if granularity == "layer" else layers * heads


def observation(window: Sequence[dict], scales: np.ndarray, granularity: Granularity) -> np.ndarray:
    """The surgeon's view after a window of steps: the mean of each observed metric over the
    window (NaN and missing read 0), then the controls' deviations from identity (per layer:
    the mean over its heads)."""
    means = [window_mean(window, key) for key in OBSERVED_METRICS]
    stats = [mean if math.isfinite(mean) else 0.0 for mean in means]
    controls = scales.mean(axis=1) if granularity == "layer" else scales.reshape(-1)
    return np.concatenate([np.asarray(stats, dtype=np.float32), (controls - 1.0).astype(np.float32)])


def observation_size(layers: int, heads: int, granularity: Granularity) -> int:
    return len(OBSERVED_METRICS) + action_size(layers, heads, granularity)


def window_mean(window: Sequence[dict], metric: str) -> float:
    """The mean of ``metric`` over the window's steps that report it finitely (NaN if none)."""
    values = [float(m[metric]) for m in window if m.get(metric) is not None and math.isfinite(float(m[metric]))]
    return sum(values) / len(values) if values else float("nan")
