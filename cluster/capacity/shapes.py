"""A decoder-only model's shape and its parameter counts, without loading its weights.

The shape comes from the model folder's ``config.json``, or, for a few well-known Hugging Face
models without a local copy, from ``KNOWN_SHAPES`` (their published config values), so GPU
recipes can be planned offline. Nothing here downloads.

Counted: Llama / Qwen2 / Qwen3 style layers (attention with grouped KV heads, optional q/k/v
biases and q/k norms, a gated MLP, two RMSNorms per layer), embeddings, a final norm and the LM
head when it is not tied. Not covered: mixture-of-experts, sliding-window or linear-attention
layers, multimodal towers; their counts would be wrong.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ModelShape:
    """What the memory model needs of a model (the names of HF's ``config.json``)."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    tie_word_embeddings: bool
    head_dim: int
    attention_bias: bool = False  # q/k/v projections with biases (Qwen2)
    qk_norm: bool = False  # per-head RMSNorm on queries and keys (Qwen3)

    @property
    def q_width(self) -> int:
        """Output width of q_proj (and input width of o_proj): heads x head_dim."""
        return self.num_attention_heads * self.head_dim

    @property
    def kv_width(self) -> int:
        """Output width of k_proj and of v_proj: KV heads x head_dim."""
        return self.num_key_value_heads * self.head_dim


# published config.json values of well-known Hub models (their model cards' config files)
KNOWN_SHAPES: dict[str, ModelShape] = {
    "Qwen/Qwen2.5-0.5B-Instruct": ModelShape(896, 4864, 24, 14, 2, 151936, True, 64, attention_bias=True),
    "Qwen/Qwen2.5-1.5B-Instruct": ModelShape(1536, 8960, 28, 12, 2, 151936, True, 128, attention_bias=True),
    "Qwen/Qwen2.5-7B-Instruct": ModelShape(3584, 18944, 28, 28, 4, 152064, False, 128, attention_bias=True),
    "meta-llama/Llama-3.1-8B-Instruct": ModelShape(4096, 14336, 32, 32, 8, 128256, False, 128),
    "Qwen/Qwen3-4B": ModelShape(2560, 9728, 36, 32, 8, 151936, True, 128, qk_norm=True),
    "Qwen/Qwen3-8B": ModelShape(4096, 12288, 36, 32, 8, 151936, False, 128, qk_norm=True),
}


def shape_from_config(config: dict) -> ModelShape:
    """A ``config.json``'s shape (a nested ``text_config`` is read when present); ``head_dim``
    defaults to hidden_size / heads; ``attention_bias`` to the Qwen2 family's True."""
    config = config.get("text_config", config)
    heads = config["num_attention_heads"]
    qwen2 = config.get("model_type") == "qwen2"
    return ModelShape(
        hidden_size=config["hidden_size"],
        intermediate_size=config["intermediate_size"],
        num_hidden_layers=config["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=config.get("num_key_value_heads") or heads,
        vocab_size=config["vocab_size"],
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        head_dim=config.get("head_dim") or config["hidden_size"] // heads,
        attention_bias=bool(config.get("attention_bias", qwen2)),
        qk_norm=config.get("model_type") == "qwen3",
    )


def read_shape(model: str) -> ModelShape:
    """The shape of ``model``: a folder with a ``config.json``, a Hub name cached on this machine
    (no download), or a name of ``KNOWN_SHAPES``; else a ``FileNotFoundError`` saying how to
    give a folder. The project's own names (``smollm2``, ``tiny``) are prepared locally first."""
    from rollout.models import resolve_model

    path = Path(resolve_model(model) if model in ("smollm2", "tiny", "smollm2-2-layers") else model).expanduser()
    if (path / "config.json").is_file():
        return shape_from_config(json.loads((path / "config.json").read_text()))
    cached = _cached_hub_config(model)
    if cached is not None:
        return shape_from_config(json.loads(Path(cached).read_text()))
    if model in KNOWN_SHAPES:
        return KNOWN_SHAPES[model]
    raise FileNotFoundError(
        f"model.path={model!r}: no model folder there and no shape known for it offline; give model.path as a folder "
        f"holding the model's config.json (e.g. `huggingface-cli download {model} config.json --local-dir DIR`), "
        f"or one of {sorted(KNOWN_SHAPES)}"
    )


def _cached_hub_config(name: str) -> str | None:
    """This machine's Hugging Face cache copy of a Hub model's config.json, if any (no network)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    try:
        found = try_to_load_from_cache(name, "config.json")
    except Exception:  # noqa: BLE001 - a name the cache cannot hold (not org/name)
        return None
    return found if isinstance(found, str) else None


def linear_shapes(shape: ModelShape) -> dict[str, tuple[int, int]]:
    """Each layer's linear modules, by their HF names: (in_features, out_features)."""
    h, i = shape.hidden_size, shape.intermediate_size
    return {
        "q_proj": (h, shape.q_width),
        "k_proj": (h, shape.kv_width),
        "v_proj": (h, shape.kv_width),
        "o_proj": (shape.q_width, h),
        "gate_proj": (h, i),
        "up_proj": (h, i),
        "down_proj": (i, h),
    }


def layer_parameters(shape: ModelShape) -> int:
    """Parameters of one decoder layer: its linears, biases, norms."""
    linears = sum(n_in * n_out for n_in, n_out in linear_shapes(shape).values())
    biases = shape.q_width + 2 * shape.kv_width if shape.attention_bias else 0
    norms = 2 * shape.hidden_size + (2 * shape.head_dim if shape.qk_norm else 0)
    return linears + biases + norms


def parameter_count(shape: ModelShape) -> int:
    """Every parameter: layers, embeddings (once more for an untied LM head), final norm."""
    embeddings = shape.vocab_size * shape.hidden_size
    head = 0 if shape.tie_word_embeddings else embeddings
    return shape.num_hidden_layers * layer_parameters(shape) + embeddings + head + shape.hidden_size


def lora_parameter_count(shape: ModelShape, rank: int, target_modules: tuple[str, ...] | list[str]) -> int:
    """A LoRA adapter's parameters: r x (in + out) per adapted linear, in every layer (names
    that are not a layer linear, such as lm_head, are not counted)."""
    linears = linear_shapes(shape)
    per_layer = sum(rank * sum(linears[name]) for name in target_modules if name in linears)
    return shape.num_hidden_layers * per_layer


def modules_parameter_count(shape: ModelShape, prefixes: tuple[str, ...] | list[str]) -> int:
    """Parameters under ``model.train: modules`` prefixes: ``lm_head`` (the embeddings, when
    tied), ``model.embed_tokens``, ``model.norm`` and whole layers ``model.layers.K``; finer
    prefixes inside a layer count as the whole layer (an upper bound)."""
    total, layers = 0, set()
    embeddings = shape.vocab_size * shape.hidden_size
    for prefix in prefixes:
        parts = prefix.split(".")
        if prefix == "lm_head" or prefix.startswith("model.embed_tokens"):
            total += embeddings
        elif prefix.startswith("model.norm"):
            total += shape.hidden_size
        elif len(parts) >= 3 and parts[:2] == ["model", "layers"] and parts[2].isdigit():
            layers.add(int(parts[2]))
        elif prefix in ("model", "model.layers"):
            return parameter_count(shape)
    return total + len(layers) * layer_parameters(shape)
