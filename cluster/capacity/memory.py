"""The bytes each part of an actor takes: pure functions over numbers (no torch, no config).

Conventions: a *value* is one element of a tensor; ``b`` is the bytes of one activation value
(2 under bf16 autocast or bf16 weights, 4 in fp32); ``tokens`` are positions of a micro-batch
(rows x padded length). Every function says what it counts and what it leaves out.

Sources of the counts: the tensors HF Llama/Qwen layers save for the backward pass (read from
transformers 5.19's modeling code and PEFT 0.21's LoRA layer), torch's AdamW (two moments per
trainable parameter, in the parameter's dtype), vLLM's KV cache layout (a key and a value of
head_dim per KV head per layer per token). The measured process baselines are the planner's
(``cluster.capacity.planner``, docs/capacity.md).
"""

from __future__ import annotations

import math

from cluster.capacity.shapes import ModelShape, linear_shapes

GIB = 2**30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}

# learners.head.CHUNK_VALUES: logits values computed at once by the chunked log-prob head
HEAD_CHUNK_VALUES = 1 << 25


# -- the model's state -----------------------------------------------------------------------


def state_bytes(params: int, trainable: int, weight_bytes: int, trainable_bytes: int, shards: int = 1) -> dict[str, float]:
    """Weights, gradients and AdamW state of one rank. ``params``: the model's (frozen or
    not) parameters in ``weight_bytes``; ``trainable``: those with gradients and optimizer state
    (a LoRA adapter: extra parameters in fp32, beside the frozen base), in ``trainable_bytes``.
    torch's AdamW keeps its two moments (exp_avg, exp_avg_sq) in the parameter's dtype and no
    fp32 master copy: this project trains full weights in fp32 under ``model.dtype: auto``, so
    there is none to count. ``shards``: FSDP divides all three over the ranks."""
    return {
        "weights": params * weight_bytes / shards,
        "gradients": trainable * trainable_bytes / shards,
        "optimizer": 2 * trainable * trainable_bytes / shards,  # m_t and v_t
    }


# -- activations ------------------------------------------------------------------------------


def layer_activation_bytes(shape: ModelShape, b: int, length: int, eager: bool, lora_rank: int = 0, lora_targets: tuple[str, ...] = ()) -> float:
    """Bytes one token of one decoder layer keeps for the backward pass, for rows ``length`` long.

    Counted (HF Llama / Qwen, no gradient checkpointing): two RMSNorms (their fp32 input and their
    normalised output: 4 + b bytes per hidden value each), q and attention output and the keys and
    values repeated to every head (4 x heads x head_dim), the gated MLP's gate, its SiLU, up and
    their product (4 x intermediate), the softmax probabilities of eager attention (heads x length
    in fp32, and their cast to ``b``; fused SDPA keeps none). A LoRA adapter in fp32 under bf16
    casts each adapted linear's input to fp32 and back under autocast (4 + b bytes per input value,
    PEFT's ``_cast_input_dtype``) and keeps its rank-r intermediate; in fp32 it shares the input.
    Left out: dropout masks (dropout is 0 here), RoPE's cos/sin (shared), biases."""
    h, i, heads = shape.hidden_size, shape.intermediate_size, shape.num_attention_heads
    kept = b * (4 * shape.q_width + 4 * i) + 2 * h * (4 + b)
    if eager:
        kept += heads * length * (4 + (b if b != 4 else 0))
    linears = linear_shapes(shape)
    for name in (t for t in lora_targets if t in linears):
        n_in = linears[name][0]
        kept += (4 + b) * (n_in + lora_rank) if b != 4 else 4 * lora_rank
    return kept


def activation_bytes(shape: ModelShape, b: int, rows: int, length: int, eager: bool, checkpointing: bool,
                     lora_rank: int = 0, lora_targets: tuple[str, ...] = (), residual_bytes: int = 4) -> float:  # fmt: skip
    """Activations of one micro-batch of ``rows`` x ``length`` tokens through the decoder.
    Without checkpointing every layer keeps ``layer_activation_bytes``; with it (HF's
    non-reentrant checkpointing) each layer keeps its input (the residual stream, in
    ``residual_bytes``) and one layer at a time is recomputed in full."""
    tokens = rows * length
    per_layer = layer_activation_bytes(shape, b, length, eager, lora_rank, lora_targets) * tokens
    if checkpointing:
        return shape.num_hidden_layers * tokens * shape.hidden_size * residual_bytes + per_layer
    return shape.num_hidden_layers * per_layer


def head_bytes(shape: ModelShape, completion_tokens: int, trained_head: bool, b: int) -> float:
    """The log-prob head's peak for ``completion_tokens`` positions. A frozen head (LoRA,
    chosen modules without the head) goes through ``learners.head``'s chunks of at most
    ``HEAD_CHUNK_VALUES`` fp32 logits: logits, their exponentials and the recomputed backward
    (3 chunks). A trained head (full training, tied embeddings trained) takes the plain
    [tokens, vocab] logits: in ``b``, in fp32, divided by the temperature, log-softmax and its
    gradient (b + 4 x 4 bytes per value)."""
    values = completion_tokens * shape.vocab_size
    if trained_head:
        return values * (b + 16)
    return 3 * 4 * min(values, max(1, HEAD_CHUNK_VALUES // shape.vocab_size) * shape.vocab_size)


# -- generation -------------------------------------------------------------------------------


def kv_bytes_per_token(shape: ModelShape, kv_bytes: int, tensor_parallel: int = 1) -> float:
    """One token's key and value in every layer, on one GPU of a ``tensor_parallel`` engine
    (KV heads are split over the GPUs; with fewer heads than GPUs each GPU holds one)."""
    heads = max(1, shape.num_key_value_heads / tensor_parallel)
    return 2 * shape.num_hidden_layers * heads * shape.head_dim * kv_bytes


def sampler_bytes(shape: ModelShape, sequences: int) -> float:
    """vLLM's sampler on a decode step of ``sequences``: fp32 logits, their softmax and the
    log-probs returned (3 x sequences x vocab x 4 bytes)."""
    return 3 * sequences * shape.vocab_size * 4


def prefill_bytes(shape: ModelShape, tokens: int, b: int) -> float:
    """A forward pass's live tensors over ``tokens`` at once (no autograd: one layer's worth):
    the residual, the normed input, q/k/v, the gate and up projections and their product."""
    return tokens * b * (3 * shape.hidden_size + shape.q_width + 2 * shape.kv_width + 3 * shape.intermediate_size)


def max_sequences(kv_cache_bytes: float, per_token: float, max_model_len: int) -> int:
    """Sequences of ``max_model_len`` tokens the KV cache holds at once."""
    return max(0, math.floor(kv_cache_bytes / (per_token * max_model_len)))


def largest_batch(budget: float, fixed: float, per_row: float) -> int:
    """Rows that fit in ``budget`` bytes after ``fixed`` bytes, at ``per_row`` bytes each."""
    if per_row <= 0:
        return 0
    return max(0, math.floor((budget - fixed) / per_row))
