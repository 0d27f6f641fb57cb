"""The trainable policy: a causal LM with a PEFT LoRA adapter.

The reference policy is the same model with the adapter disabled, so KL to the reference costs
no extra memory. Log-probs are computed only at completion positions: the LM head (a third of
SmolLM2's parameters) never runs on prompt tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from learners.algorithms import entropy_from_logits, token_logprobs


@dataclass(frozen=True)
class LoraSettings:
    rank: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class PackedBatch:
    """Right-padded prompt+completion rows and where each completion token's logits sit.

    input_ids, attention_mask: [B, L]; positions, targets, response_mask: [B, T] where
    ``positions[i, t]`` is the index in row i whose logits predict completion token t.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    positions: torch.Tensor
    targets: torch.Tensor
    response_mask: torch.Tensor


def pack(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], pad_id: int) -> PackedBatch:
    rows = [list(p) + list(c) for p, c in zip(prompts, completions)]
    length = max(len(r) for r in rows)
    width = max(1, max(len(c) for c in completions))
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    targets = torch.zeros((len(rows), width), dtype=torch.long)
    response_mask = torch.zeros((len(rows), width), dtype=torch.float32)
    for i, (prompt, completion) in enumerate(zip(prompts, completions)):
        input_ids[i, : len(rows[i])] = torch.tensor(rows[i])
        attention_mask[i, : len(rows[i])] = 1
        n = len(completion)
        # logits at position p-1+t predict completion token t
        positions[i, :n] = torch.arange(len(prompt) - 1, len(prompt) - 1 + n)
        targets[i, :n] = torch.tensor(completion, dtype=torch.long)
        response_mask[i, :n] = 1.0
    return PackedBatch(input_ids, attention_mask, positions, targets, response_mask)


class LoraPolicy:
    """A HF causal LM wrapped with a LoRA adapter; base weights frozen."""

    def __init__(self, model_path: str | Path, lora: LoraSettings, dtype: str = "float32", autocast_dtype: str | None = None):
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        base = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, dtype))
        config = LoraConfig(
            r=lora.rank,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=list(lora.target_modules),
            task_type="CAUSAL_LM",
        )
        self.model = get_peft_model(base, config)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.autocast_dtype = getattr(torch, autocast_dtype) if autocast_dtype else None

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def forward(self, batch: PackedBatch, temperature: float = 1.0, with_entropy: bool = False):
        """Log-probs [B, T] of the completion tokens (and entropy [B, T] if asked)."""
        causal_lm = self.model.get_base_model()
        with torch.autocast("cpu", dtype=self.autocast_dtype or torch.bfloat16, enabled=self.autocast_dtype is not None):
            hidden = causal_lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
        index = batch.positions.unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
        head = causal_lm.lm_head
        logits = head(hidden.gather(1, index).to(head.weight.dtype)) / temperature  # fp32 head
        logprobs = token_logprobs(logits, batch.targets)
        entropy = None
        if with_entropy:
            with torch.no_grad():
                entropy = entropy_from_logits(logits)
        return logprobs, entropy

    def reference_forward(self, batch: PackedBatch, temperature: float = 1.0) -> torch.Tensor:
        """Log-probs under the base model (adapter disabled), without gradients."""
        with torch.no_grad(), self.model.disable_adapter():
            return self.forward(batch, temperature)[0]

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """The adapter's tensors with PEFT's saved-file keys, detached CPU copies."""
        from peft import get_peft_model_state_dict

        return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in get_peft_model_state_dict(self.model).items()}

    def adapter_config(self) -> dict:
        config = self.model.peft_config["default"].to_dict()
        return {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.items()}

    def save_adapter(self, folder: str | Path) -> Path:
        self.model.save_pretrained(folder)
        return Path(folder)
