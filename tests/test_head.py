"""The learner's log-prob path: the chunked head against plain logits, the attention kernels
against each other, micro-batches grouped by length, and the precision defaults."""

from __future__ import annotations

import pytest
import torch

from helpers import make_learner
from learners import head
from learners.algorithms import entropy_from_logits, token_logprobs
from learners.head import selected_logprobs
from learners.policy import LoraSettings, native_bf16, pack, weights_dtype
from test_learner import random_batch


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_selected_logprobs_equal_the_plain_logits_path(monkeypatch, temperature):
    """Values, entropies and the gradient to the hidden states, over several chunks."""
    monkeypatch.setattr(head, "CHUNK_VALUES", 500 * 64)  # 64 tokens per chunk: 5 chunks of 300
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(300, 16, generator=generator, requires_grad=True)
    weight, targets = torch.randn(500, 16, generator=generator), torch.randint(0, 500, (300,), generator=generator)
    upstream = torch.randn(300, generator=generator)
    logprobs, entropy = selected_logprobs(hidden, weight, targets, temperature, with_entropy=True)
    (logprobs * upstream).sum().backward()
    fused_grad, hidden.grad = hidden.grad.clone(), None
    logits = hidden @ weight.T / temperature
    plain = token_logprobs(logits, targets)
    (plain * upstream).sum().backward()
    torch.testing.assert_close(logprobs, plain, rtol=0, atol=1e-5)
    torch.testing.assert_close(entropy, entropy_from_logits(logits).detach(), rtol=0, atol=1e-5)
    torch.testing.assert_close(fused_grad, hidden.grad, rtol=0, atol=1e-5)
    assert not entropy.requires_grad


def test_selected_logprobs_refuse_a_trained_head():
    weight = torch.randn(10, 4, requires_grad=True)
    with pytest.raises(ValueError, match="no gradient"):
        selected_logprobs(torch.randn(3, 4), weight, torch.tensor([1, 2, 3]))


def test_policy_forward_equals_the_plain_head_and_the_learner_keeps_row_order(tiny_model_path):
    """The chunked head (the usual path) gives the log-probs and gradients of the plain logits
    path (taken with an entropy gradient); rows of different lengths come back in batch order
    although micro-batches group them by length."""
    learner = make_learner(tiny_model_path, LoraSettings(rank=4, alpha=8), micro_batch_size=3)
    policy = learner.policy
    batch = random_batch(7)
    packed = pack(batch.prompt_token_ids, batch.completion_token_ids, policy.pad_id)
    results = []
    for entropy_grad in (False, True):  # True: the plain logits path
        policy.model.zero_grad(set_to_none=True)
        logprobs, entropy = policy.forward(packed, 0.9, with_entropy=True, entropy_grad=entropy_grad)
        (logprobs * packed.response_mask).sum().backward()
        grads = {n: p.grad.clone() for n, p in policy.named_trainable() if p.grad is not None}
        results.append((logprobs.detach() * packed.response_mask, entropy.detach() * packed.response_mask, grads))
    (a, ea, ga), (b, eb, gb) = results
    torch.testing.assert_close(a, b, rtol=2e-5, atol=1e-5)  # log-probs near -10: float32 sums in another order
    torch.testing.assert_close(ea, eb, rtol=2e-5, atol=1e-5)
    assert ga.keys() == gb.keys() and ga
    for name in ga:  # relative to the gradient's size, as the micro-batch equivalence tests do
        assert (ga[name] - gb[name]).norm() <= 1e-4 * ga[name].norm() + 1e-9, name
    alone = [learner.logprobs(batch.select([i]))[0] for i in range(len(batch))]
    together = learner.logprobs(batch)
    assert [len(x) for x in together] == [len(c) for c in batch.completion_token_ids]
    for x, y in zip(together, alone):
        torch.testing.assert_close(torch.tensor(x), torch.tensor(y), rtol=0, atol=1e-5)
    sizes = [len(m) for m in learner._micro_batches(batch, list(range(7)))]
    lengths = [[len(batch.prompt_token_ids[i]) + len(batch.completion_token_ids[i]) for i in m] for m in learner._micro_batches(batch, list(range(7)))]
    assert sizes == [3, 3, 1] and all(min(a) >= max(b) for a, b in zip(lengths, lengths[1:]))


def test_eager_and_sdpa_attention_agree(tiny_model_path, monkeypatch):
    """A CPU policy picks eager attention for small batches, SDPA above the size limit: the
    same log-probs either way."""
    from learners import policy as policy_module

    learner = make_learner(tiny_model_path, LoraSettings(rank=4, alpha=8))
    batch = random_batch(5)
    eager = learner.logprobs(batch)
    assert learner.policy.causal_lm.config._attn_implementation == "eager"
    monkeypatch.setattr(policy_module, "EAGER_ATTENTION_VALUES", 0)
    sdpa = learner.logprobs(batch)
    assert learner.policy.causal_lm.config._attn_implementation == "sdpa"
    for x, y in zip(eager, sdpa):
        torch.testing.assert_close(torch.tensor(x), torch.tensor(y), rtol=0, atol=1e-5)


def test_precision_defaults_follow_the_hardware(tiny_model_path):
    """model.dtype auto: bf16 weights for a LoRA policy where the device has bf16 units (the
    adapter stays fp32), fp32 for full weights; generator.dtype auto likewise."""
    from rollout.engines import EngineSettings, concrete

    cpu = torch.device("cpu")
    bf16 = native_bf16(cpu)
    assert weights_dtype("auto", cpu, lora=True) is (torch.bfloat16 if bf16 else torch.float32)
    assert weights_dtype("auto", cpu, lora=False) is torch.float32
    assert weights_dtype("float32", cpu, lora=True) is torch.float32
    assert weights_dtype("auto", torch.device("cuda", 0), lora=True) is torch.bfloat16
    assert concrete(EngineSettings()).dtype == ("bfloat16" if bf16 else "float32")
    assert concrete(EngineSettings(dtype="float32")).dtype == "float32"
    learner = make_learner(tiny_model_path, LoraSettings(rank=4, alpha=8), dtype="auto")
    dtypes = {n: p.dtype for n, p in learner.policy.model.named_parameters()}
    assert {d for n, d in dtypes.items() if "lora_" in n} == {torch.float32}
    embeddings = next(d for n, d in dtypes.items() if "embed_tokens" in n)  # the tied head's weight too
    assert embeddings is (torch.bfloat16 if bf16 else torch.float32)
    metrics = learner.step(random_batch(4))
    assert metrics["train/updates"] == 1.0 and all(torch.isfinite(p).all() for p in learner.policy.trainable_parameters())
