"""The trainable policy: a causal LM with a PEFT LoRA adapter, all its weights, or only
chosen modules of it (the rest frozen).

Log-probs are computed only at completion tokens: the LM head (a fifth of SmolLM2's forward
cost per token) never runs on prompt or padding positions, and its logits are never kept
(``learners.head``). Micro-batches group rows of similar length (``Learner._micro_batches``).

The model lives on one device (a GPU, or the CPU). Packed batches are built on the CPU and
moved in; the per-token results ([B, T] log-probs, entropies, values) come back to the CPU,
where the objectives form their losses: they are small next to the model's work, and the
backward pass runs back through the copy onto the device.

Every forward pass enters the model through one module call, the ``Trunk`` (embeddings,
decoder layers, final norm), and then reads the LM head's weight: what FSDP2 needs to
all-gather a sharded policy's parameters in its hooks (``Policy.shard``,
``learners.sharding``).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch

from learners.algorithms import entropy_from_logits, token_logprobs
from learners.head import selected_logprobs
from learners.surgery import AttentionControls


@dataclass(frozen=True)
class LoraSettings:
    """The LoRA adapter the policy trains (the config's ``lora`` section)."""

    rank: int = 16  # r: the adapter matrices' inner dimension
    alpha: int = 32  # the update is scaled by alpha / rank
    dropout: float = 0.0  # dropout on the adapter's input while training
    # the modules that get an adapter (the names of a Llama-style model's linear layers)
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


def pack(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], pad_id: int, masks: Sequence[Sequence[int]] = ()) -> PackedBatch:
    """``masks``: each completion's trained tokens (``TrainBatch.loss_masks``; an empty row or
    none at all: every token), the response mask."""
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
        response_mask[i, :n] = torch.tensor(masks[i], dtype=torch.float32) if i < len(masks) and masks[i] else 1.0
    return PackedBatch(input_ids, attention_mask, positions, targets, response_mask)


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` multiplies bf16 matrices in hardware: a GPU (every one raylight
    targets), or a CPU with AMX or AVX512-BF16 units."""
    if device.type == "cuda":
        return True
    return device.type == "cpu" and (torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())


def autocast_of(name: str | None, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``algorithm.autocast_dtype`` on ``device``: the named one
    ("float32": none); unset, bfloat16 where the device has bf16 units, else none."""
    if name is None:
        return torch.bfloat16 if native_bf16(device) else None
    return None if name == "float32" else getattr(torch, name)


def weights_dtype(name: str, device: torch.device, lora: bool) -> torch.dtype:
    """The parameters' dtype for ``model.dtype``: the named one; "auto", bfloat16 for a LoRA
    policy on a device with bf16 units (the frozen base needs no fp32 master copy; PEFT keeps
    the adapter in fp32), else float32. On this project's AMX CPU the learner's step of the
    TRL benchmark takes 11.0 s with bf16 weights, 11.3 s with fp32 weights under bf16
    autocast, 21.2 s in fp32 (docs/benchmarks.md#step-speed-and-memory)."""
    if name == "auto":
        return torch.bfloat16 if lora and native_bf16(device) else torch.float32
    return getattr(torch, name)


# eager attention keeps [B, heads, L, L] probabilities per layer for the backward pass; below
# this many values in all layers together it is the faster kernel on a CPU (bf16 backward of
# torch's CPU flash attention took 5.2 s of a 20 s step at B=32, L=108; eager's, 0.3 s)
EAGER_ATTENTION_VALUES = 1 << 28


def eager_attention_fits(config, rows: int, length: int) -> bool:
    """Whether a CPU batch of ``rows`` x ``length`` tokens keeps few enough attention
    probabilities for eager attention (``EAGER_ATTENTION_VALUES``); ``config``: anything with a
    HF config's ``num_attention_heads`` and ``num_hidden_layers`` (the capacity planner's shapes too)."""
    return rows * config.num_attention_heads * length * length * config.num_hidden_layers <= EAGER_ATTENTION_VALUES


class Trunk(torch.nn.Module):
    """A causal LM's body as one module: its forward is the one call a policy's forward makes
    into the model, so FSDP2 (whose root this is when sharded) gathers the embeddings, final
    norm and LM head before it and keeps them gathered for the head that follows."""

    def __init__(self, causal_lm: torch.nn.Module):
        super().__init__()
        self.causal_lm = causal_lm

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Final hidden states [B, L, H]."""
        return self.causal_lm.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state


class Policy:
    """A HF causal LM trained with a LoRA adapter (base frozen), in full (``lora=None``), or
    only in the modules named by ``trainable_modules`` (``lora=None``; parameter-name prefixes
    such as ``lm_head`` or ``model.layers.29``; the rest frozen, the ARC experiment's frozen
    backbone). With tied embeddings (SmolLM2) ``lm_head`` is the embedding matrix: training the
    head trains the embeddings too.

    The reference policy is the base with the adapter disabled (LoRA: no extra memory), a
    frozen copy made at start (full weights, only when KL needs it), or the model with the
    trained modules' starting values swapped in (chosen modules: a copy of those only).

    The critic (``critic=True``, LoRA only) is a second LoRA adapter on the same frozen base plus
    a linear value head. A separate adapter rather than a head on the policy's trunk keeps the
    value loss from pulling on the policy's features (the reason verl and OpenRLHF train a
    separate critic model), while sharing the base weights costs no memory; the price is one
    more forward and backward pass per micro-batch.
    """

    def __init__(
        self,
        model_path: str | Path,
        lora: LoraSettings | None,
        dtype: str = "float32",
        autocast_dtype: str | None = None,
        critic: bool = False,
        reference: bool = False,
        device: torch.device | str = "cpu",
        gradient_checkpointing: bool = False,
        trainable_modules: Sequence[str] = (),
        attention_controls: bool = False,
    ):
        """``attention_controls``: per-layer, per-head attention-output scales a surgeon sets
        (``learners.surgery.AttentionControls``; part of the policy, not of the reference)."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.device = torch.device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        base = AutoModelForCausalLM.from_pretrained(model_path, dtype=weights_dtype(dtype, self.device, lora is not None)).to(self.device)
        if gradient_checkpointing:
            # recompute each layer's activations in the backward pass; the non-reentrant variant
            # needs no input that requires grad, so it works with a frozen base and LoRA
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.lora = lora
        self.reference_model = None
        self.reference_weights: dict[str, torch.Tensor] = {}  # chosen modules: their starting values
        self.value_head = None
        if trainable_modules and lora is not None:
            raise ValueError("trainable_modules trains chosen modules of the model itself: it needs lora=None (model.train: modules)")
        if lora is None:
            if critic:
                raise ValueError("a critic needs LoRA training (model.train: lora); full-weight PPO with a critic is not supported")
            self.model = base
            if trainable_modules:
                trained = _freeze_all_but(base, trainable_modules)
                if reference:
                    self.reference_weights = {name: p.detach().clone() for name, p in trained.items()}
            elif reference:
                import copy

                self.reference_model = copy.deepcopy(base).requires_grad_(False).eval()
        else:
            from peft import get_peft_model

            self.model = get_peft_model(base, self._peft_config(lora))
            if critic:
                self.model.add_adapter("critic", self._peft_config(lora))
                self.model.set_adapter("default")
                hidden = base.config.hidden_size
                self.value_head = torch.nn.Linear(hidden, 1, dtype=torch.float32, device=self.device)
                torch.nn.init.zeros_(self.value_head.weight)
                torch.nn.init.zeros_(self.value_head.bias)
        self.controls = AttentionControls(self.causal_lm) if attention_controls else None
        self.trunk = Trunk(self.causal_lm)
        self.reference_trunk = Trunk(self.reference_model) if self.reference_model is not None else None
        self.sharded = False
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.autocast_dtype = autocast_of(autocast_dtype, self.device)

    @staticmethod
    def _peft_config(lora: LoraSettings):
        from peft import LoraConfig

        return LoraConfig(
            r=lora.rank,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=list(lora.target_modules),
            task_type="CAUSAL_LM",
        )

    @property
    def causal_lm(self):
        return self.model if self.lora is None else self.model.get_base_model()

    def policy_parameters(self) -> list[torch.nn.Parameter]:
        if self.lora is None:
            return [p for p in self.model.parameters() if p.requires_grad]
        return [p for n, p in self.model.named_parameters() if "lora_" in n and ".default." in n]

    def critic_parameters(self) -> list[torch.nn.Parameter]:
        if self.value_head is None:
            return []
        lora = [p for n, p in self.model.named_parameters() if "lora_" in n and ".critic." in n]
        return lora + list(self.value_head.parameters())

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return self.policy_parameters() + self.critic_parameters()

    def named_trainable(self) -> list[tuple[str, torch.nn.Parameter]]:
        ids = {id(p) for p in self.trainable_parameters()}
        named = [(n, p) for n, p in self.model.named_parameters() if id(p) in ids]
        if self.value_head is not None:
            named += [(f"value_head.{n}", p) for n, p in self.value_head.named_parameters()]
        return named

    def shard(self, offload: bool = False) -> None:
        """Shard the policy (and a full-weight reference copy) over the default process group
        with FSDP2 (``learners.sharding.shard_trunk``): each decoder layer, then the trunk.
        The caller builds its optimizer afterwards: the parameters become DTensors.

        Not covered: a critic (its second adapter is switched by ``set_adapter``, which flips
        ``requires_grad`` inside FSDP units), and chosen modules (their reference swaps
        parameter storage); both are refused."""
        from learners.sharding import shard_trunk

        if self.value_head is not None or self.reference_weights:
            raise ValueError(
                "a sharded policy trains LoRA or every weight, without a critic: not model.train=modules, algorithm.advantage=gae or policy_loss=sac"
            )
        shard_trunk(self.trunk, self.causal_lm.model.layers, self.autocast_dtype, offload)
        if self.reference_trunk is not None:
            shard_trunk(self.reference_trunk, self.reference_model.model.layers, self.autocast_dtype, offload=False)
        self.sharded = True
        # FSDP2 fixes each unit's gradient dtypes at its first forward, from the parameters
        # that require gradients then: make it now, before PEFT's disable_adapter (the LoRA
        # reference) freezes the adapter for a while
        with torch.no_grad():
            self.forward(self.filler_batch())

    def filler_batch(self) -> PackedBatch:
        """One padding token scoring one: what a sharded rank short of micro-batches passes
        through the model while its peers score theirs (``learners.sharding.Shards.most``)."""
        return pack([[self.pad_id]], [[self.pad_id]], self.pad_id)

    def filler_pass(self) -> None:
        """A training pass that changes nothing: the filler batch's forward pass, and a
        backward pass of zero (its reduce-scatters add nothing to the gradients)."""
        logprobs, _ = self.forward(self.filler_batch())
        (logprobs.sum() * 0.0).backward()

    def _hidden(self, batch: PackedBatch, trunk: Trunk | None = None) -> torch.Tensor:
        """Final hidden states at the positions that predict each completion token: [B, T, H],
        on the policy's device."""
        trunk = trunk or self.trunk
        causal_lm = trunk.causal_lm
        input_ids, attention_mask = batch.input_ids.to(self.device), batch.attention_mask.to(self.device)
        attention = self._attention_kernel(causal_lm.config, *input_ids.shape)
        if causal_lm.config._attn_implementation != attention:
            causal_lm.set_attn_implementation(attention)
        autocast = self.autocast_dtype or torch.bfloat16
        with torch.autocast(self.device.type, dtype=autocast, enabled=self.autocast_dtype is not None):
            hidden = trunk(input_ids, attention_mask)
        index = batch.positions.to(self.device).unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
        return hidden.gather(1, index)

    def _attention_kernel(self, config, rows: int, length: int) -> str:
        """Eager attention on a CPU for batches whose attention probabilities are small
        (``EAGER_ATTENTION_VALUES``), torch's fused SDPA otherwise and on GPUs."""
        if self.device.type != "cpu":
            return "sdpa"
        return "eager" if eager_attention_fits(config, rows, length) else "sdpa"

    def forward(
        self, batch: PackedBatch, temperature: float = 1.0, with_entropy: bool = False, entropy_grad: bool = False, trunk: Trunk | None = None
    ):
        """Log-probs [B, T] of the completion tokens (and entropy [B, T] if asked), under the
        policy or under ``trunk`` (the full-weight reference copy's); fp32, on the CPU."""
        trunk = trunk or self.trunk
        try:
            return self._scores(batch, trunk, temperature, with_entropy, entropy_grad)
        finally:
            if self.sharded and not torch.is_grad_enabled():
                # no backward will free the root's gathered weights; stale after the next update
                trunk.reshard()

    def _scores(self, batch: PackedBatch, trunk: Trunk, temperature: float, with_entropy: bool, entropy_grad: bool):
        head = trunk.causal_lm.lm_head
        hidden = self._hidden(batch, trunk)
        targets = batch.targets.to(self.device)
        grad = torch.is_grad_enabled()
        if head.bias is None and not (head.weight.requires_grad and grad) and not (with_entropy and entropy_grad and grad):
            # the usual case: in fp32, chunked, on completion tokens only, no [B, T, V] logits kept
            mask = batch.response_mask.to(self.device) > 0
            chosen, entropy = selected_logprobs(hidden[mask], head.weight, targets[mask], temperature, with_entropy)
            logprobs = torch.zeros(mask.shape, device=self.device).masked_scatter(mask, chosen).cpu()
            if entropy is not None:
                entropy = torch.zeros(mask.shape, device=self.device).masked_scatter(mask, entropy).cpu()
            return logprobs, entropy
        # a trained head, or an entropy bonus: the plain logits, through autograd, in the
        # parameters' dtype, outside autocast
        logits = head(hidden.to(head.weight.dtype)).float() / temperature
        logprobs = token_logprobs(logits, targets).cpu()
        entropy = None
        if with_entropy:
            with torch.set_grad_enabled(entropy_grad and grad):
                entropy = entropy_from_logits(logits).cpu()
        return logprobs, entropy

    def reference_forward(self, batch: PackedBatch, temperature: float = 1.0) -> torch.Tensor:
        """Log-probs under the reference (the base model, without attention controls), without
        gradients."""
        with torch.no_grad(), self.controls.bypass() if self.controls is not None else contextlib.nullcontext():
            if self.reference_weights:
                with self._starting_weights():
                    return self.forward(batch, temperature)[0]
            if self.lora is None:
                if self.reference_model is None:
                    raise RuntimeError("no reference model: build the Policy with reference=True")
                return self.forward(batch, temperature, trunk=self.reference_trunk)[0]
            with self.model.disable_adapter():
                return self.forward(batch, temperature)[0]

    def values(self, batch: PackedBatch) -> torch.Tensor:
        """The critic's V(s_t) before each completion token: [B, T] (fp32)."""
        if self.value_head is None:
            raise RuntimeError("no critic: build the Policy with critic=True")
        self.model.set_adapter("critic")
        try:
            hidden = self._hidden(batch)
        finally:
            # set_adapter also flips requires_grad to the active adapter; restore the policy's
            self.model.set_adapter("default")
            for p in self.critic_parameters():
                p.requires_grad_(True)
        return self.value_head(hidden.float()).squeeze(-1).cpu()

    @contextlib.contextmanager
    def _starting_weights(self):
        """The trained modules' starting values in place of their current ones, for a while."""
        named = dict(self.model.named_parameters())
        current = {name: named[name].data for name in self.reference_weights}
        try:
            for name, value in self.reference_weights.items():
                named[name].data = value
            yield
        finally:
            for name, value in current.items():
                named[name].data = value

    def weight_state(self, complete: bool = False, whole=iter) -> dict[str, torch.Tensor]:
        """What the generators need, as detached CPU copies: the policy adapter's tensors with
        PEFT's saved-file keys, or the trained parameters under their HF names (tied ones
        once; every parameter with ``complete``, for a model folder). ``whole``: maps
        (name, tensor) pairs to (name, whole tensor) pairs (a sharded learner's gather,
        ``learners.sharding``)."""
        return dict(self.weight_items(complete, whole))

    def weight_items(self, complete: bool = False, whole=iter, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """``weight_state``'s (name, tensor) pairs one at a time, each copied to the CPU as it
        comes (floating-point ones cast to ``dtype`` on the way): only the one in hand is held."""
        if self.lora is None:
            named = ((n, p) for n, p in self.model.named_parameters() if complete or p.requires_grad)
        else:
            from peft import get_peft_model_state_dict

            named = get_peft_model_state_dict(self.model, adapter_name="default").items()
        for name, tensor in whole(named):
            cast = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
            yield name, tensor.detach().to("cpu", cast, copy=True).contiguous()

    def load_adapter(self, tensors: dict[str, torch.Tensor]) -> None:
        """Take a saved adapter's tensors (PEFT's file keys, what ``weight_state`` gives) as the
        policy adapter's weights."""
        from peft import set_peft_model_state_dict

        if self.lora is None:
            raise ValueError("this policy trains no LoRA adapter (model.train is not lora): it cannot load one")
        current = self.weight_state()
        if set(tensors) != set(current) or any(tensors[k].shape != v.shape for k, v in current.items()):
            raise ValueError(
                f"the adapter does not fit this policy: keys missing {sorted(set(current) - set(tensors))[:3]}, unexpected {sorted(set(tensors) - set(current))[:3]} "
                "(was it trained with another model, lora.rank or lora.target_modules?)"
            )
        set_peft_model_state_dict(self.model, tensors, adapter_name="default")

    def adapter_config(self) -> dict:
        if self.lora is None:
            return {}
        config = self.model.peft_config["default"].to_dict()
        return {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.items()}


def _freeze_all_but(model: torch.nn.Module, prefixes: Sequence[str]) -> dict[str, torch.nn.Parameter]:
    """Freeze every parameter but those whose name (any of its names, for tied ones) is a
    prefix in ``prefixes`` or lies below one; returns the trained ones under their first names.
    A prefix that names nothing is an error naming it, with the model's top-level modules."""
    model.requires_grad_(False)
    below = lambda name, prefix: name == prefix or name.startswith(prefix + ".")  # noqa: E731
    matched = {prefix: False for prefix in prefixes}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        for prefix in prefixes:
            if below(name, prefix):
                parameter.requires_grad_(True)
                matched[prefix] = True
    unknown = [prefix for prefix, hit in matched.items() if not hit]
    if unknown:
        tops = sorted({name.split(".")[0] for name, _ in model.named_parameters(remove_duplicate=False)})
        layers = sorted({".".join(name.split(".")[:2]) for name, _ in model.named_parameters(remove_duplicate=False)})
        raise ValueError(f"model.trainable_modules {unknown} name no parameter of the model; it has {tops} and {layers[:6]}...")
    return {name: p for name, p in model.named_parameters() if p.requires_grad}
