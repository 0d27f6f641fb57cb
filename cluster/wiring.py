"""Wiring a run: the Ray cluster, the actors with their settings and resources, the tasks.

Everything a driver (training, ``raylight eval``, a benchmark) needs to start the parts of a
run from its config; each setting object is built from the config's sections as they are.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os

import ray

from actors.generator import GeneratorPool, generator_actor
from actors.learner import LearnerGroup
from actors.verifier import ScorerFactory, VerifierPool
from cluster.surgery import PhaseSchedule
from cluster.config import Config, TaskConfig
from cluster.placement import Placement
from contracts import Problem, Prompt
from learners.settings import LearnerSettings
from rewards.scoring import ScorerSpec, build_task_scorer
from rollout.engines import EngineSettings
from rollout.prompts import render_prompts
from rollout.tasks import Curriculum, Task, TaskMixture, build_task

logger = logging.getLogger(__name__)

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
    dashboard = config.cluster.dashboard
    context = ray.init(num_cpus=config.run.num_cpus, include_dashboard=dashboard, dashboard_host="127.0.0.1", log_to_driver=True)
    if dashboard and context.dashboard_url:
        logger.info("Ray dashboard: http://%s (turn it off with --no-dashboard)", context.dashboard_url)


def generator_env(config: Config) -> dict[str, str]:
    """Environment for generator actors: the in-process vLLM engine (faster start, less memory),
    computing on ``generator.threads`` cores (all by default). Ray would otherwise start a
    fractional-CPU actor with OMP_NUM_THREADS=1, which halves generation on 2 cores."""
    env = {
        "OMP_NUM_THREADS": str(config.generator.threads or os.cpu_count() or 1),
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "VLLM_CPU_KVCACHE_SPACE": str(config.generator.kv_cache_gib),
        "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING"),
    }
    for name in ("VLLM_CACHE_ROOT", "VLLM_RPC_BASE_PATH", "TORCHINDUCTOR_CACHE_DIR", "TMPDIR", "RAYLIGHT_CACHE"):
        if name in os.environ:
            env[name] = os.environ[name]
    return env


def start_generator(config: Config, model_path: str, rank: int = 0, settings: EngineSettings | None = None, placement: Placement | None = None):
    """A generator actor serving ``model_path`` with the resources and environment ``config``
    asks for (in its bundle of ``placement``, if given); its engine runs as ``settings`` say
    (default: the config's generator section)."""
    g = config.generator
    options = placement.generator_options(rank) if placement else {"num_cpus": g.num_cpus, "num_gpus": g.num_gpus}
    actor = generator_actor().options(runtime_env={"env_vars": generator_env(config)}, **options)
    return actor.remote(model_path, settings or g, seed=config.run.seed, max_lora_rank=config.lora.rank, rank=rank)


def start_generators(config: Config, model_path: str, placement: Placement | None = None) -> GeneratorPool:
    """The run's ``generator.num_generators`` actors as one pool, which replaces a failed one
    in its bundle."""
    start = functools.partial(start_generator, config, model_path, placement=placement)
    handles = [start(rank=i) for i in range(config.generator.num_generators)]
    return GeneratorPool(handles, config.generator, factory=lambda rank: start(rank=rank))


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
        # off-policy samples: correct them by default (README: "Asynchronous mode")
        algorithm = dataclasses.replace(algorithm, tis_cap=ASYNC_TIS_CAP)
    return LearnerSettings(
        model_path=model_path,
        algorithm=algorithm,
        lora=c.lora if c.model.train == "lora" else None,
        dtype=c.model.dtype,
        temperature=c.rollout.temperature,
        total_steps=c.run.steps,
        seed=c.run.seed,
        threads=c.learner.threads or max(1, (os.cpu_count() or 1) // c.learner.num_learners),
        gradient_checkpointing=c.learner.gradient_checkpointing,
        trainable_modules=tuple(c.model.trainable_modules) if c.model.train == "modules" else (),
        attention_controls=PhaseSchedule(c.phases).has_surgeon,
    )


def scorer_spec(config: Config, task: Task, task_config: TaskConfig) -> ScorerSpec:
    """How ``task``'s samples are scored: its scorer and options, the run's reward settings
    (with the task's own weights, if it has them) and the sandbox."""
    reward = config.reward if task_config.weights is None else dataclasses.replace(config.reward, weights=task_config.weights)
    return ScorerSpec(task.reward.scorer, reward, config.verifier.sandbox, dict(task.reward.options))


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


def start_verifiers(config: Config, mixture: TaskMixture | None = None, factory: ScorerFactory | None = None) -> VerifierPool:
    """The verifier pool ``config`` asks for; each actor builds the scorers of ``mixture``'s
    tasks (or runs ``factory``'s scorer)."""
    if factory is None:
        mixture = mixture or build_tasks(config)
        specs = {t.id: scorer_spec(config, t, tc) for t, tc in zip(mixture.tasks.values(), config.tasks)}
        factory = functools.partial(build_task_scorer, specs)
    return VerifierPool(factory, config.verifier)


def render(tokenizer, tasks: TaskMixture, problems: list[Problem]) -> list[Prompt]:
    """Chat-template problems with their own task's system prompt, keeping their order."""
    prompts: list[Prompt | None] = [None] * len(problems)
    by_task: dict[str, list[int]] = {}
    for i, problem in enumerate(problems):
        by_task.setdefault(problem.task, []).append(i)
    for task_id, indices in by_task.items():
        system = tasks.tasks[task_id].system_prompt if task_id in tasks.tasks else None
        for i, prompt in zip(indices, render_prompts(tokenizer, [problems[i] for i in indices], system)):
            prompts[i] = prompt
    return prompts  # type: ignore[return-value]
