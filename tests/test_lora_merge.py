"""Merging an adapter into base weights equals PEFT's own merge."""

import pytest
import torch

from learners.policy import Policy, LoraSettings
from rollout.lora_merge import lora_pairs, lora_scaling, merge_lora


def test_merge_matches_peft_merge_and_unload(tiny_model_path):
    policy = Policy(tiny_model_path, LoraSettings(rank=4, alpha=8))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in policy.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    adapter, config = policy.weight_state(), policy.adapter_config()
    base = {k: v.detach().clone() for k, v in policy.model.get_base_model().state_dict().items() if "lora" not in k}
    base = {k.replace(".base_layer", ""): v for k, v in base.items()}
    merged = merge_lora(base, adapter, config, torch.float32)
    reference = policy.model.merge_and_unload().state_dict()
    assert set(merged) == set(lora_pairs(adapter))
    assert len(merged) == 2 * 7  # 2 layers x 7 target modules
    for name, weight in merged.items():
        torch.testing.assert_close(weight, reference[name], rtol=1e-5, atol=1e-6)
        assert not torch.equal(weight, base[name])


def test_scaling_and_errors():
    assert lora_scaling({"r": 8, "lora_alpha": 16}) == 2.0
    assert lora_scaling({"r": 16, "lora_alpha": 16, "use_rslora": True}) == 4.0
    with pytest.raises(ValueError, match="no LoRA tensors"):
        lora_pairs({"x.weight": torch.zeros(1)})
    with pytest.raises(KeyError, match="lora_B"):
        lora_pairs({"base_model.model.q.lora_A.weight": torch.zeros(1)})
