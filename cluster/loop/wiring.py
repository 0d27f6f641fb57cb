"""Wiring a run: the Ray cluster, the actors with their settings and resources, the tasks, and
the stages of the loop.

Everything a driver (training, ``raylight eval``, a benchmark) needs to start the parts of a
run from its config; each setting object is built from the config's sections as they are.
``build_stages`` is the one place that reads which run-level features are on
(``markovian.enabled``, ``bank.*``, ``reward.teacher``, ``algorithm.objective``, ``phases``) and chooses the
stages they plug into the loop (``cluster.stages``).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import os
import shutil
import subprocess
from typing import Callable

import numpy as np
import ray

from actors.generator import GeneratorPool, generator_actor
from actors.pool import HEARTBEAT_S, NAMESPACE, PoolClient, Tenancy, find_pool, pool_actor_name, pool_server_actor
from actors.learner import LearnerGroup
from actors.reward_models import RewardServices
from actors.tools import ToolPool
from actors.verifier import ScorerFactory, VerifierPool
from cluster.config import Config, ConfigError, TaskConfig
from cluster.features.bank import BankedRollouts, BankPart, BankRounds
from cluster.features.distill import TeacherReward
from cluster.features.markovian import ActorRewardColumns, MarkovianEvaluator, MarkovianReward
from cluster.features.surgery import Surgery
from cluster.loop.episodes import EpisodePrompts, EpisodeRunner
from cluster.loop.placement import Placement
from cluster.loop.rollouts import step_seed
from cluster.phases import PhaseSchedule
from cluster.stages import BatchSource, Crew, Evaluator, GreedyEvaluator, ModelReward, Participant, Prompts, RolloutBatches, Stages, Stateful, TaskPrompts
from contracts import Problem, SamplingSettings
from learners.settings import LearnerSettings
from rewards.environments import environment_factory
from rewards.scoring import ScorerSpec, TaskJudge
from rewards.terms import TermSource
from rollout.engines import EngineSettings
from rollout.episodes import ChatDelta
from rollout.models import resolve_model
from rollout.bank import SolutionBank
from rollout.tasks import Curriculum, Split, Task, TaskMixture, build_task

logger = logging.getLogger(__name__)

CODE_SCORERS = ("code", "humaneval")  # scorers that run a program against tests

# truncated importance sampling cap used in async mode when algorithm.tis_cap is not set
ASYNC_TIS_CAP = 2.0


def init_ray(config: Config) -> None:
    """Join the cluster named by RAY_ADDRESS (``ray job submit`` sets it), else start a local
    one, with its dashboard unless ``cluster.dashboard`` is off."""
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address="auto", log_to_driver=True)
        return
    if config.generator.pool:  # a shared pool runs on a cluster that outlives its runs: join it
        join_cluster(log_to_driver=True)
        return
    dashboard = config.cluster.dashboard
    context = ray.init(num_cpus=config.run.num_cpus, include_dashboard=dashboard, dashboard_host="127.0.0.1", log_to_driver=True)
    if dashboard and context.dashboard_url:
        logger.info("Ray dashboard: http://%s (turn it off with --no-dashboard)", context.dashboard_url)


def join_cluster(config: Config | None = None, start: bool = False, log_to_driver: bool = False) -> None:
    """Join the running Ray cluster (``RAY_ADDRESS``, else the one started on this machine);
    with ``start``, start one on this machine when none runs (``ray start --head``), which
    outlives this process: a pool must outlive the command that started it."""
    if ray.is_initialized():
        return
    try:
        ray.init(address=os.environ.get("RAY_ADDRESS", "auto"), namespace=NAMESPACE, log_to_driver=log_to_driver)
        return
    except ConnectionError:
        if not start:
            raise ConnectionError("no Ray cluster runs here: start a pool first (`raylight pool start CONFIG --name NAME` starts a local cluster), or set RAY_ADDRESS") from None
    ray_cli = shutil.which("ray") or "ray"
    cpus = (config.run.num_cpus if config is not None and config.run.num_cpus else None) or os.cpu_count() or 1
    logger.info("no Ray cluster runs here: starting one on this machine (`ray stop` stops it)")
    subprocess.run([ray_cli, "start", "--head", f"--num-cpus={cpus}", "--include-dashboard=false", "--disable-usage-stats"], check=True, capture_output=True)
    ray.init(address="auto", namespace=NAMESPACE, log_to_driver=log_to_driver)


def generator_env(config: Config) -> dict[str, str]:
    """Environment for generator actors: the in-process vLLM engine (faster start, less memory).
    The engine takes its thread count itself, from the node it runs on (``generator.threads``,
    0 = all of that node's cores; ``rollout.engines.VLLMEngine``)."""
    env = {
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "VLLM_CPU_KVCACHE_SPACE": str(config.generator.kv_cache_gib),
        "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING"),
    }
    if config.generator.tensor_parallel_size > 1:
        # weight and adapter loads reach the engine's worker processes as functions with their
        # tensors (collective_rpc), which vLLM pickles only when allowed; the workers are the
        # actor's own children on its node
        env["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
    for name in ("VLLM_CACHE_ROOT", "VLLM_RPC_BASE_PATH", "TORCHINDUCTOR_CACHE_DIR", "TMPDIR", "RAYLIGHT_CACHE"):
        if name in os.environ:
            env[name] = os.environ[name]
    return env


def start_generator(config: Config, model_path: str, rank: int = 0, settings: EngineSettings | None = None, placement: Placement | None = None, asleep: bool = False):
    """A generator actor serving ``model_path`` with the resources and environment ``config``
    asks for (in its bundle of ``placement``, if given); its engine runs as ``settings`` say
    (default: the config's generator section), built only when woken if ``asleep``."""
    g = config.generator
    settings = settings or engine_settings(config)
    streaming = settings.serving == "stream"
    options = placement.generator_options(rank) if placement else {"num_cpus": g.num_cpus, "num_gpus": g.num_gpus}
    actor = generator_actor(streaming=streaming).options(runtime_env={"env_vars": generator_env(config)}, **options)
    partial = config.rollout.partial and streaming
    return actor.remote(model_path, settings, seed=config.run.seed, max_lora_rank=config.lora.rank, rank=rank, asleep=asleep, partial=partial)


def engine_settings(config: Config) -> EngineSettings:
    """The generators' engine settings, with what the run decides of the ``auto`` choices.
    ``serving``: ``stream`` (continuous batching) for a vLLM run whose requests come one by
    one (an environment's turns) or are interrupted (``rollout.partial``), else ``batch``.
    ``adapter_mode``: full or chosen-module weights are reloaded in place (``merged``); a run
    whose frozen model writes beside the policy (the Markovian baseline) needs the base
    reachable (``lora``); otherwise each engine picks by its device
    (``rollout.engines.concrete``)."""
    g = config.generator
    if g.serving == "auto":  # continuous batching where requests come one by one: episodes' turns, partial rollouts
        streams = g.engine == "vllm" and (config.env.name is not None or config.rollout.partial)
        g = dataclasses.replace(g, serving="stream" if streams else "batch")
    if g.adapter_mode != "auto":
        return g
    if config.model.train != "lora":
        return dataclasses.replace(g, adapter_mode="merged")
    if needs_base_model(config):
        return dataclasses.replace(g, adapter_mode="lora")
    return g


def needs_base_model(config: Config) -> bool:
    """The run asks its generators for the base model beside its adapter: its frozen model
    writes beside the policy (the Markovian baseline), so the adapter must stay a LoRA."""
    return config.markovian.enabled and config.markovian.baseline


def start_generators(config: Config, model_path: str, placement: Placement | None = None) -> GeneratorPool:
    """The run's ``generator.num_generators`` actors as one pool, which replaces a failed one
    in its bundle."""
    start = functools.partial(start_generator, config, model_path, placement=placement)
    handles = [start(rank=i) for i in range(config.generator.num_generators)]
    streaming = engine_settings(config).serving == "stream"
    return GeneratorPool(handles, config.generator, factory=lambda rank, asleep: start(rank=rank, asleep=asleep), streaming=streaming)


def _pool_generator(config: Config, model_path: str, rank: int, asleep: bool):
    return start_generator(config, model_path, rank=rank, asleep=asleep)


def start_pool(config: Config, model_path: str, name: str, detach_after_s: float = 60.0):
    """A shared generator pool named ``name``: a detached actor that outlives this process,
    with ``config``'s generators serving its runs' adapters (``actors.pool``): as LoRAs side
    by side on GPUs (``generator.adapter_mode`` auto or lora, at most ``generator.max_loras``
    runs), merged in per call on CPUs (auto or merged; no limit but host memory). Returns its
    actor once every engine is up."""
    if config.model.train != "lora":
        raise ConfigError(f"a shared pool serves LoRA adapters on one base model: model.train must be lora, not {config.model.train}")
    if config.generator.engine != "vllm":
        raise ConfigError("a shared pool holds several adapters at once, which only the vLLM engine does: set generator.engine=vllm")
    if detach_after_s < 3 * HEARTBEAT_S:
        raise ConfigError(f"a pool's detach_after_s ({detach_after_s:g}) must be at least {3 * HEARTBEAT_S:g} s: runs send a heartbeat every {HEARTBEAT_S:g} s")
    # a pool's generators serve several runs: never asleep, and one run's update never interrupts the others' sequences
    g = dataclasses.replace(config.generator, pool=None, sleep_mode=False)
    config = dataclasses.replace(config, generator=g, rollout=dataclasses.replace(config.rollout, partial=False))
    engine = engine_settings(config)
    streaming = engine.serving == "stream"
    factory = functools.partial(_pool_generator, config, model_path)
    server = pool_server_actor().options(name=pool_actor_name(name), namespace=NAMESPACE, lifetime="detached")
    lora = engine.adapter_mode == "lora" or (engine.adapter_mode == "auto" and g.num_gpus > 0)  # as each engine picks by its device
    server = server.remote(name, model_path, config.lora.rank, g.max_loras if lora else None, factory, g.num_generators, g, streaming, detach_after_s)
    try:
        ray.get(server.status.remote(), timeout=g.startup_s + g.call_timeout_s)
    except BaseException:
        ray.kill(server, no_restart=True)
        raise
    return server


def attach_pool(config: Config, model_path: str) -> PoolClient:
    """This run's place on the shared pool ``generator.pool``, its adapter named after its
    run folder (a resumed run takes its own place again)."""
    g = config.generator
    run_dir = os.path.abspath(config.run.run_dir)
    adapter = f"{os.path.basename(run_dir)}-{hashlib.sha1(run_dir.encode()).hexdigest()[:6]}"
    tenancy = Tenancy(run_dir, adapter, model_path, config.lora.rank, g.share, g.max_in_flight, needs_base_model(config))
    return PoolClient(find_pool(g.pool), tenancy)


def start_learners(config: Config, model_path: str, placement: Placement | None = None) -> LearnerGroup:
    """The run's ``learner.num_learners`` data-parallel learner actors as one group, each in
    its bundle of ``placement`` (or wherever Ray puts them, without one)."""
    options = [placement.learner_options(rank) for rank in range(config.learner.num_learners)] if placement else None
    return LearnerGroup(learner_settings(config, model_path), config.learner, options)


def learner_settings(config: Config, model_path: str) -> LearnerSettings:
    """A learner's settings: the config's algorithm and lora sections, and what the model,
    rollout and run sections decide for it."""
    c = config
    algorithm = c.algorithm
    if c.rollout.mode == "async" and algorithm.tis_cap is None:
        # off-policy samples: correct them by default (docs/concepts.md#asynchronous-mode)
        algorithm = dataclasses.replace(algorithm, tis_cap=ASYNC_TIS_CAP)
    return LearnerSettings(
        model_path=model_path,
        algorithm=algorithm,
        lora=c.lora if c.model.train == "lora" else None,
        dtype=c.model.dtype,
        temperature=c.rollout.temperature,
        total_steps=c.run.steps,
        seed=c.run.seed,
        threads=c.learner.threads,
        gradient_checkpointing=c.learner.gradient_checkpointing,
        trainable_modules=tuple(c.model.trainable_modules) if c.model.train == "modules" else (),
        attention_controls=PhaseSchedule(c.phases).has_surgeon,
        sharding=c.learner.sharding,
        offload_optimizer=c.learner.offload_optimizer,
    )


def scorer_spec(config: Config, task: Task, task_config: TaskConfig, services: RewardServices | None = None) -> ScorerSpec:
    """How ``task``'s samples are scored: its scorer and options, the run's reward settings
    (with the task's own weights, if it has them), the sandbox, and the reward terms it adds."""
    reward = config.reward if task_config.weights is None else dataclasses.replace(config.reward, weights=task_config.weights)
    terms = tuple(t for t in reward_terms(config, services) if task_config.rewards is None or t.label in task_config.rewards)
    return ScorerSpec(task.reward.scorer, reward, config.verifier.sandbox, dict(task.reward.options), terms)


def reward_terms(config: Config, services: RewardServices | None = None) -> tuple[TermSource, ...]:
    """The run's reward terms as the verifier actors open them: functions also searched for in
    the folder the run started in (a local run's actors do not start there), an HTTP server's
    concurrency shared out over the pool's largest size, and the clients of the reward model's
    and the judge's actors."""
    terms: list[TermSource] = [dataclasses.replace(f, search=(*f.search, os.getcwd())) for f in config.reward.functions]
    if config.reward.http is not None:
        http = config.reward.http
        terms.append(dataclasses.replace(http, per_actor=max(1, http.max_concurrency // config.verifier.max_verifiers)))
    if services is not None:
        terms += services.terms
    return tuple(terms)


def start_reward_services(config: Config, model_path: str, teacher: bool = True) -> RewardServices | None:
    """The reward model's, the judge's and (with ``teacher``) the distillation teacher's actors
    ``config.reward`` asks for (None: none of them). The judge's and the teacher's engines run
    as the generators' do (the generator section's engine settings), each on its own CPUs or
    GPUs; a judge with ``model: base`` judges with the run's own model, frozen. A teacher whose
    tokenizer is not the student's is refused here."""
    r = config.reward
    distill = r.teacher if teacher else None
    if r.model is None and r.judge is None and distill is None:
        return None

    def engine(served) -> tuple:
        if served is None:
            return None, None
        threads = max(1, int(served.num_cpus))
        settings = dataclasses.replace(config.generator, threads=threads, num_gpus=served.num_gpus, adapter_mode="merged")
        return settings, generator_env(config)

    judge_path = (model_path if r.judge.model == "base" else resolve_model(r.judge.model)) if r.judge is not None else ""
    teacher_path = resolve_model(distill.model) if distill is not None else ""
    if distill is not None:
        same_tokenizer(model_path, teacher_path)
    (judge_engine, judge_env), (teacher_engine, teacher_env) = engine(r.judge), engine(distill)
    return RewardServices(r.model, r.judge, judge_path, judge_engine, judge_env, config.run.seed, distill, teacher_path, teacher_engine, teacher_env)


def same_tokenizer(student: str, teacher: str) -> None:
    """Distillation compares log-probs token by token: the two vocabularies must be one."""
    from transformers import AutoTokenizer

    ours, theirs = AutoTokenizer.from_pretrained(student).get_vocab(), AutoTokenizer.from_pretrained(teacher).get_vocab()
    if ours != theirs:
        differ = len(set(ours.items()) ^ set(theirs.items()))
        raise ValueError(f"reward.teacher.model {teacher} has another tokenizer than the student {student} ({len(theirs)} vs {len(ours)} tokens, "
                         f"{differ} entries differ): distillation scores the student's own token ids, so the teacher must share its tokenizer")  # fmt: skip


def build_tasks(config: Config) -> TaskMixture:
    """The run's tasks, mixed by weight, with their curricula."""
    tasks, curricula = [], {}
    for t in config.tasks:
        task = build_task(t.name, **t.settings(config.run.seed, config.eval.n))
        tasks.append(task)
        if t.curriculum.enabled:
            c = t.curriculum
            curricula[task.id] = Curriculum(c.raise_at, c.lower_at, c.window, c.min_difficulty, c.max_difficulty)
    return TaskMixture(tasks, [t.weight for t in config.tasks], config.run.seed, curricula)


def start_verifiers(config: Config, mixture: TaskMixture | None = None, factory: ScorerFactory | None = None, services: RewardServices | None = None) -> VerifierPool:
    """The verifier pool ``config`` asks for; each actor builds the judges of ``mixture``'s
    tasks, with the reward terms (asking ``services``' actors), or runs ``factory``'s scorer."""
    if factory is None:
        mixture = mixture or build_tasks(config)
        specs = {t.id: scorer_spec(config, t, tc, services) for t, tc in zip(mixture.tasks.values(), config.tasks)}
        factory = functools.partial(TaskJudge, specs)
    return VerifierPool(factory, config.verifier)


def start_crew(config: Config, model_path: str, placement: Placement, tasks: TaskMixture, factory: ScorerFactory | None = None) -> Crew:
    """The run's learner group, generator pool and verifier pool, in ``placement``'s bundles,
    and the reward model's and judge's actors the verifiers ask.

    Colocated, the generators start first and the learners only once every engine is up (and,
    in sleep mode, asleep): vLLM sizes itself from the device's free memory, which a learner
    started first would already hold (docs/cluster.md#colocation-on-one-gpu)."""
    generators = learners = services = verifiers = None
    try:
        if config.cluster.placement == "colocated":
            generators = start_generators(config, model_path, placement)
            generators.started(config.generator.startup_s + config.generator.call_timeout_s)
            if config.generator.sleep_mode:
                generators.sleep()
            learners = start_learners(config, model_path, placement)
            learners.wait_started()  # its load peak passes while the engines sleep; they wake for the first broadcast
        else:
            learners = start_learners(config, model_path, placement)
            generators = attach_pool(config, model_path) if config.generator.pool else start_generators(config, model_path, placement)
        services = start_reward_services(config, model_path)
        verifiers = start_verifiers(config, tasks, factory, services if factory is None else None)
        tools = start_tools(config)
    except BaseException:
        for part in (verifiers, services, generators, learners):
            if part is not None:
                part.kill()
        raise
    return Crew(generators, verifiers, learners, services, update_dtype(config), tools)


def start_tools(config: Config) -> ToolPool | None:
    """The sandbox hosts of an environment that runs code (``env.name``), with the code
    rewards' sandbox settings; None where the environment runs none."""
    env = config.env
    if not env.runs_code:
        return None
    return ToolPool(config.verifier.sandbox, env.tool_hosts, env.tool_timeout_s, startup_s=config.verifier.startup_s)


def update_dtype(config: Config) -> str | None:
    """The generators' weights dtype where the driver knows it (a stated one, or ``auto`` on
    GPUs: bfloat16); None where each engine decides by its node's CPU (sent as trained)."""
    g = config.generator
    if g.dtype != "auto":
        return g.dtype
    return "bfloat16" if g.num_gpus > 0 else None


def training_sampling(config: Config) -> SamplingSettings:
    """A training step's sampling: ``rollout.group_size`` completions of each prompt."""
    r = config.rollout
    return SamplingSettings(n=r.group_size, temperature=r.temperature, top_p=r.top_p, max_tokens=r.max_tokens, stop=tuple(r.stop))


def eval_sampling(config: Config) -> SamplingSettings:
    """Greedy decoding with the run's stop strings and the evaluation's token budget."""
    r = config.rollout
    return SamplingSettings(n=1, temperature=0.0, top_p=1.0, max_tokens=config.eval.max_tokens, stop=tuple(r.stop))


def episode_runner(config: Config, tokenizer, tasks: TaskMixture, crew: Crew) -> EpisodeRunner:
    """Episodes in ``env.name``'s environment, each opened with its task's system prompt."""

    def system_prompt(problem: Problem) -> str | None:
        task = tasks.tasks.get(problem.task)
        return task.system_prompt if task is not None else None

    code = sorted(t.id for t in tasks.tasks.values() if t.reward.scorer in CODE_SCORERS)
    if config.env.name == "python_tool" and code:
        raise ConfigError(f"env.name=python_tool ends an episode at a turn without code, which a code scorer fails: use env.name=code_repair for {code}")
    tested = [t.id for t in tasks.tasks.values() if t.reward.scorer == "code"]  # problems that carry their tests (meta.tests)
    if config.env.name == "code_repair" and len(tested) != len(tasks.tasks):
        raise ConfigError(f"env.name=code_repair runs each problem's own tests (meta.entry_point, meta.tests): {sorted(set(tasks.tasks) - set(tested))} carry none")
    make_env = environment_factory(config.env, crew.tools, system_prompt)
    delta = ChatDelta(tokenizer)
    for role in sorted({config.env.observation_role, "user"}):  # a template that cannot append turns fails now, not mid-run
        delta.observation([{"role": role, "content": "probe"}])
    return EpisodeRunner(crew.generators, crew.verifiers, make_env, delta, config.env, config.generator.max_model_len)


def build_stages(
    config: Config, tokenizer, tasks: TaskMixture, crew: Crew, set_scales: Callable[[np.ndarray], None] | None = None, split: Split = "validation"
) -> Stages:
    """The run's stages, chosen once from its config. ``set_scales`` serves new attention
    scales (a training run's; an evaluation has no surgeon); ``split``: the evaluation's."""
    a, schedule = config.algorithm, PhaseSchedule(config.phases)
    rollouts = RolloutBatches(a.advantage, a.drop_zero_variance_groups or config.rollout.dynamic_sampling)
    prompts: Prompts = TaskPrompts(tokenizer, tasks, training_sampling(config))
    rewards: tuple[ModelReward, ...] = ()
    markovian = None
    if config.reward.teacher is not None:  # on-policy distillation: the teacher's log-probs of the student's tokens
        teacher = TeacherReward(config.reward.teacher, crew.rewards.teacher if crew.rewards else None)
        rewards = (teacher,)
        if config.reward.teacher.mode == "token":
            rollouts = RolloutBatches(rollouts.estimator, rollouts.drop_zero_variance, teacher.columns)
    if config.markovian.enabled:  # chains of thought rewarded by the frozen model's answer log-prob
        prompts = markovian = MarkovianReward(config, tokenizer, tasks, crew)
        rewards = (markovian,)
        if a.actor_reward_weight > 0:
            rollouts = RolloutBatches(rollouts.estimator, rollouts.drop_zero_variance, ActorRewardColumns(markovian, a.actor_reward_weight, a.advantage))
    if config.env.name is not None:  # multi-turn episodes in an environment
        prompts = EpisodePrompts(episode_runner(config, tokenizer, tasks, crew), training_sampling(config))
    eval_prompts = {task_id: prompts.render(problems) for task_id, problems in tasks.eval_sets(split).items()}
    if markovian is None:  # episodes in the environment's own runner: an evaluation runs beside the rollouts
        episodes = episode_runner(config, tokenizer, tasks, crew).run if config.env.name is not None else None
        evaluator: Evaluator = GreedyEvaluator(crew, eval_prompts, eval_sampling(config), episodes=episodes)
    else:
        evaluator = MarkovianEvaluator(markovian, crew, eval_prompts)
    batches: BatchSource = rollouts
    parts: list[Stateful] = []
    participants: list[Participant] = []
    if config.bank.enabled:  # the solution bank: banked each step; self-improvement rounds or bank-fed groups
        bank = SolutionBank(config.bank)
        parts.append(BankPart(bank))
        sft = a.objective == "sft"
        batches = BankRounds(bank, functools.partial(step_seed, config.run.seed)) if sft else BankedRollouts(bank, rollouts, config.bank.feed_groups)
    if schedule.has_surgeon and set_scales is not None:  # the SAC surgeon on the attention scales
        surgery = Surgery(config.surgeon, schedule, crew.learners.attention_scales(), config.run.seed, set_scales)
        participants.append(surgery)
        parts.append(surgery)
    return Stages(prompts, batches, evaluator, schedule, rewards, tuple(participants), tuple(parts))
