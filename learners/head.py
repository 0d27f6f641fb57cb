"""Log-probs of chosen tokens straight from the final hidden states, without the logits.

The output layer of a small model is wide (SmolLM2: 576 -> 49,152): the logits of one
micro-batch of 32 x 64 completion tokens take 400 MB in fp32, and autograd keeps them and the
log-softmax for the backward pass, next to the entropy's copies. ``selected_logprobs`` computes
the same numbers chunk by chunk (the idea of Liger-Kernel's fused linear cross-entropy, in plain
torch so that it runs on CPUs as on GPUs): per chunk of tokens, the logits, their log-sum-exp,
the chosen token's log-prob, the entropy, and the log-prob's gradient with respect to the hidden
state, which is known in the forward pass because a token's log-prob depends on its own hidden
state only:

    d log p(y | h) / d h = (W[y] - sum_v p_v W[v]) / temperature.

Autograd keeps that [N, H] gradient instead of [N, V] logits; the backward pass is one multiply.
The head's weight gets no gradient here (it is frozen under LoRA); the entropy carries none.
"""

from __future__ import annotations

import torch

# logits computed at once: 32M fp32 values (128 MB) per temporary, three temporaries at most
CHUNK_VALUES = 1 << 25


class _SelectedLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature: float, with_entropy: bool, need_grad: bool):
        ctx.hidden_dtype = hidden.dtype
        n = hidden.shape[0]
        # in fp32 whatever the weights' dtype: the log-probs feed importance ratios
        hidden, weight = hidden.float(), weight.float()
        chunk = max(1, CHUNK_VALUES // weight.shape[0])
        logprobs = torch.empty(n, dtype=torch.float32, device=hidden.device)
        entropy = torch.empty(n if with_entropy else 0, dtype=torch.float32, device=hidden.device)
        direction = torch.empty(hidden.shape if need_grad else (0,), dtype=torch.float32, device=hidden.device)
        for start in range(0, n, chunk):
            end = min(n, start + chunk)
            y = targets[start:end]
            logits = hidden[start:end] @ weight.T
            if temperature != 1.0:
                logits.div_(temperature)
            logits.sub_(torch.logsumexp(logits, dim=-1, keepdim=True))  # now log p
            logprobs[start:end] = logits.gather(1, y.unsqueeze(1)).squeeze(1)
            p = logits.exp()
            if with_entropy:  # H = -sum_v p_v log p_v, as a batched dot product (no [chunk, V] product)
                entropy[start:end] = -(p.unsqueeze(1) @ logits.unsqueeze(2)).view(-1)
            if need_grad:
                direction[start:end] = (weight[y] - p @ weight) / temperature
        ctx.save_for_backward(direction)
        ctx.mark_non_differentiable(entropy)
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy):
        (direction,) = ctx.saved_tensors
        return (grad_logprobs.unsqueeze(1) * direction).to(ctx.hidden_dtype), None, None, None, None, None


def selected_logprobs(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0, with_entropy: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log softmax(hidden @ weight.T / temperature)[targets] for hidden [N, H], weight [V, H],
    targets [N]: fp32 [N] log-probs with a gradient to ``hidden`` (none to ``weight``), and the
    entropies [N] (no gradient) with ``with_entropy``."""
    if weight.requires_grad and torch.is_grad_enabled():
        raise ValueError("selected_logprobs gives the head's weight no gradient: train it through the plain logits")
    need_grad = hidden.requires_grad and torch.is_grad_enabled()
    logprobs, entropy = _SelectedLogprobs.apply(hidden, weight, targets, float(temperature), with_entropy, need_grad)
    return logprobs, entropy if with_entropy else None
