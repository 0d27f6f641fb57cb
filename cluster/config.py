"""The run config: typed dataclasses loaded from YAML plus ``dotted.key=value`` overrides.

One config tree: a component's own frozen settings class is its section (``algorithm`` is
``learners.settings.AlgorithmSettings``, ``lora`` is ``learners.policy.LoraSettings``, ``reward``
and ``verifier.sandbox`` are ``rewards.scoring``'s; ``generator`` extends the engine's
``rollout.engines.EngineSettings`` with the actors' count and CPUs), so every knob has one
class and one default. An unknown key or a value of the wrong type is a ``ConfigError``
naming the dotted key (and the closest known key, for typos).
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import logging
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from actors.generator import GeneratorPoolSettings
from actors.learner import LearnerGroupSettings
from actors.surgeon import SurgeonSettings
from actors.verifier import VerifierPoolSettings
from cluster.observe.wandb_logger import WandbSettings
from cluster.phases import PhaseConfig, PhaseSchedule
from learners.settings import AlgorithmSettings
from learners.policy import LoraSettings
from rewards.environments import EnvironmentSettings
from rewards.scoring import RewardSettings, SandboxSettings
from rollout.engines import EngineSettings
from rollout.markovian import MarkovianSettings
from rollout.bank import BankSettings
from rollout.tasks import TASK_NAMES


logger = logging.getLogger(__name__)

# the most of a shared GPU's memory a colocated generator may take without sleep mode
COLOCATED_MEMORY_SHARE = 0.6
SEEDS_PER_STEP = 1024  # sampling seeds of one step: one per chunk (generator) and dynamic-sampling round


class ConfigError(ValueError):
    """A config key or value the run cannot use; the message names the dotted key."""


@dataclass
class ModelConfig:
    """The policy's base model and which of its weights train."""

    path: str = "smollm2"  # "smollm2", "tiny", or a HF model folder
    dtype: str = "auto"  # the learner's parameter dtype: "auto" (bf16 for LoRA on bf16 hardware, else fp32), "float32", "bfloat16"
    train: Literal["lora", "full", "modules"] = "lora"  # a LoRA adapter, every weight, or trainable_modules only
    # model.train: modules: parameter-name prefixes trained, the rest frozen (e.g. [lm_head, model.layers.29])
    trainable_modules: list[str] = field(default_factory=list)


@dataclass
class CurriculumConfig:
    """Procedural tasks: difficulty follows the task's recent training accuracy."""

    enabled: bool = False  # move the task's difficulty with its training accuracy
    raise_at: float = 0.8  # mean accuracy over `window` steps that raises the difficulty one level
    lower_at: float = 0.2  # ... and that lowers it
    window: int = 4  # steps of accuracy averaged
    min_difficulty: int = 1  # the difficulty never goes below this
    max_difficulty: int = 10  # ... nor above this


@dataclass
class TaskConfig:
    """One task of the mixture (docs/tasks-and-rewards.md#tasks). Settings left null take the task's default;
    a setting the task does not take is an error naming it."""

    # the task: a built-in one (arithmetic, gsm8k, ...) or `dataset` (your own data, docs/your-problem.md)
    name: Literal[TASK_NAMES] = "arithmetic"  # type: ignore[valid-type]
    id: str | None = None  # unique name in the mixture and in metrics (default: name)
    weight: float = 1.0  # share of each step's prompts
    system_prompt: str | None = "You are a helpful assistant. Answer briefly."  # null: no system turn
    weights: dict[str, float] | None = None  # reward weights for this task (default: reward.weights)
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)
    difficulty: int | None = None  # arithmetic 1-5, infix / rpn / brackets 1-10
    mode: Literal["text", "code"] | None = None  # infix / rpn / brackets: answer in text or as code
    source: str | None = None  # datasets: a Hub name, a local JSONL/Parquet file, or a folder of split files
    fields: dict[str, str] | None = None  # datasets: our field name -> the file's field name
    # the prompt template ({question}, or {expression} for arithmetic; the dataset task: any row field)
    template: str | None = None
    # the dataset task (docs/your-problem.md):
    prompt_field: str | None = None  # dataset: the row's field holding the prompt
    answer_field: str | None = None  # dataset: the row's field holding the reference answer
    messages_field: str | None = None  # dataset: a chat ([{role, content}, ...]) instead of a prompt
    # dataset: numeric, choice, label, overlap, code, or reward (the run's reward terms alone)
    scorer: str | None = None
    labels: list[str] | None = None  # dataset, scorer label: the allowed labels
    # dataset: our split (train, validation, test) -> the dataset's; default: train only, the rest cut from it
    splits: dict[str, str] | None = None
    subset: str | None = None  # dataset: the Hub dataset's configuration name
    # the reward terms (names under reward.functions / reward.http) added to this task's reward;
    # default: all of them
    rewards: list[str] | None = None
    dataset: str | None = None  # reasoning_gym: the dataset name
    size: int | None = None  # reasoning_gym: entries generated
    gym_config: dict[str, int | float | str | bool] | None = None  # reasoning_gym: the dataset's settings
    eval_percent: int | None = None  # arithmetic: share of expressions held out
    validation_percent: int | None = None  # dataset: share of train cut for validation when the data has none
    test_percent: int | None = None  # dataset: share of train cut for test when the data has none
    eval_size: int | None = None  # held-out problems evaluated (default: eval.n)
    max_rows: int | None = None  # datasets: rows read per split
    code_tests: int | None = None  # code mode: held-out inputs per problem

    def settings(self, seed: int, eval_size: int) -> dict:
        """The task constructor's keyword arguments: what is set, plus the run's seed."""
        names = ("difficulty", "mode", "source", "fields", "template", "dataset", "size", "eval_percent",
                 "validation_percent", "test_percent", "max_rows", "code_tests", "prompt_field", "answer_field",
                 "messages_field", "scorer", "labels", "splits", "subset")  # fmt: skip
        chosen = {n: getattr(self, n) for n in names if getattr(self, n) is not None}
        if self.gym_config is not None:
            chosen["config"] = self.gym_config
        return {"id": self.id or self.name, "seed": seed, "eval_size": self.eval_size or eval_size,
                "system_prompt": self.system_prompt, **chosen}  # fmt: skip


@dataclass
class RolloutConfig:
    """What each step samples: prompts, groups, sampling, and sync or async generation."""

    prompts_per_step: int = 16  # prompts drawn per step
    group_size: int = 8  # completions sampled per prompt (GRPO's group)
    temperature: float = 1.0  # sampling temperature
    top_p: float = 1.0  # nucleus sampling's probability mass
    max_tokens: int = 64  # completion tokens at most
    stop: list[str] = field(default_factory=list)  # stop strings (sampling and evaluation)
    # sync: generate, verify, learn, broadcast in turn; async: the generators run up to
    # max_staleness steps ahead of the learner (docs/concepts.md#asynchronous-mode)
    mode: Literal["sync", "async"] = "sync"
    max_staleness: int = 0  # policy versions a trained sample may lag the learner (async: >= 1)
    # DAPO's dynamic sampling: draw more prompts until the step has prompts_per_step groups whose
    # rewards differ, at most max_sampling_rounds rounds of prompts_per_step prompts (docs/algorithms.md#dapo)
    dynamic_sampling: bool = False
    max_sampling_rounds: int = 3  # see dynamic_sampling
    # partial rollouts: a weight update aborts the sequences being generated and resumes them on
    # the new weights, each token tagged with its policy version (needs generator.serving=stream
    # or auto; docs/concepts.md#partial-rollouts)
    partial: bool = False


@dataclass(frozen=True)
class GeneratorConfig(GeneratorPoolSettings, EngineSettings):
    """The generator actors: how many, what each asks of the cluster, their engine's own
    settings and the pool's deadlines (docs/fault-tolerance.md#faults)."""

    num_generators: int = 1  # generator actors, each with its own engine
    num_cpus: float = 0.5  # per generator
    num_gpus: float = 0.0  # per generator: on a GPU cluster, tensor_parallel_size
    resources: dict[str, float] = field(default_factory=dict)  # custom Ray resources per generator (pins them to nodes)
    # a shared generator pool (`raylight pool start CONFIG --name NAME`) this run attaches to
    # instead of starting generators of its own; its adapter is one of the pool's (docs/shared-pool.md)
    pool: str | None = None
    share: float = 1.0  # on a shared pool: this run's weight in the fair share of its generators
    max_in_flight: int = 4  # on a shared pool: this run's requests on the generators at once


@dataclass
class ClusterConfig:
    """Where the actors go (docs/cluster.md#where-the-actors-go)."""

    # disaggregated: learners and generators in bundles of their own; colocated: learner i and
    # generator i share a bundle (one GPU), handing memory over by a split or by sleep mode
    placement: Literal["disaggregated", "colocated"] = "disaggregated"
    strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"  # Ray's placement group strategy
    placement_timeout_s: float = 120.0  # the bundles must be placed by then, or the run stops naming them
    dashboard: bool = True  # a local cluster (no RAY_ADDRESS) starts the Ray dashboard and prints its URL


@dataclass(frozen=True)
class VerifierConfig(VerifierPoolSettings):
    """The verifier pool's settings, and the sandbox its code scorers run in."""

    sandbox: SandboxSettings = field(default_factory=SandboxSettings)


@dataclass
class EvalConfig:
    """Held-out evaluation: greedy answers on each task's validation split."""

    every: int = 0  # steps between held-out evaluations; 0 = only at start and end
    n: int = 100  # held-out problems per evaluation (a task's eval_size overrides)
    max_tokens: int = 64  # completion tokens per greedy answer
    at_start: bool = True  # evaluate before the first step (step 0)
    best_metric: str = "eval/accuracy"  # higher is better; picks the "best" checkpoint


@dataclass
class RuleConfig:
    """One health-monitor rule (docs/fault-tolerance.md#health-monitor); null keeps the rule's default."""

    action: Literal["warn", "stop", "rollback", "off"] | None = None  # what the rule does when it fires
    threshold: float | None = None  # the rule's limit (its meaning depends on the rule)
    window: int | None = None  # steps the rule looks back over


@dataclass
class MonitorConfig:
    """The health monitor: rules over each step's metrics that warn, stop or roll back."""

    enabled: bool = True  # watch the run's metrics and act on the rules
    rules: dict[str, RuleConfig] = field(default_factory=dict)  # rule name -> overrides
    # a rule with action "rollback" restores the last good checkpoint and multiplies the learning rate by this
    rollback_lr_factor: float = 0.5
    max_rollbacks: int = 3  # then the run stops


@dataclass
class ReportConfig:
    """``raylight report``: the targets its forecast aims at, and the recent window it fits."""

    targets: dict[str, float] = field(default_factory=dict)  # metric -> target, e.g. {eval/accuracy: 0.6}
    forecast_window: int = 20  # recent steps (or evaluations, for eval/ metrics) the trend is fitted on


@dataclass
class RunConfig:
    """The run itself: its length, seed, directory, checkpoints and where metrics go."""

    steps: int = 20  # training steps
    seed: int = 0  # seeds data order, sampling and initialisation
    run_dir: str = "runs/default"  # where metrics, rollouts, checkpoints and the report go
    save_rollouts: bool = True  # write each step's samples to RUN_DIR/rollouts (Parquet)
    num_cpus: int | None = None  # CPUs of the embedded local Ray cluster (None: all)
    checkpoint_every: int = 10  # steps between checkpoints (and one at the end); 0 = only at the end
    keep_checkpoints: int = 3  # the newest kept, plus the best by eval.best_metric
    metrics_export: bool = True  # every metric as a Ray metric (the dashboard's Prometheus export)
    tensorboard: bool = False  # also write RUN_DIR/tensorboard (tensorboardX event files)
    # also log the config and every step's metrics to Weights & Biases (docs/observability.md); null: off
    wandb: WandbSettings | None = None


@dataclass
class Config:
    """A run's whole config: one section per component (``raylight config`` prints it)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    tasks: list[TaskConfig] = field(default_factory=lambda: [TaskConfig()])
    reward: RewardSettings = field(default_factory=RewardSettings)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    verifier: VerifierConfig = field(default_factory=VerifierConfig)
    algorithm: AlgorithmSettings = field(default_factory=AlgorithmSettings)
    bank: BankSettings = field(default_factory=BankSettings)  # the solution bank (docs/algorithms.md#self-improvement-and-the-solution-bank)
    markovian: MarkovianSettings = field(default_factory=MarkovianSettings)
    env: EnvironmentSettings = field(default_factory=EnvironmentSettings)  # multi-turn episodes (docs/multi-turn.md)
    # the hybrid run's schedule (docs/algorithms.md#the-sac-surgeon); empty: GRPO throughout
    phases: list[PhaseConfig] = field(default_factory=list)
    surgeon: SurgeonSettings = field(default_factory=SurgeonSettings)
    learner: LearnerGroupSettings = field(default_factory=LearnerGroupSettings)
    eval: EvalConfig = field(default_factory=EvalConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    run: RunConfig = field(default_factory=RunConfig)


def _check_value(value: Any, hint: Any, key: str) -> Any:
    """Return ``value`` converted to ``hint`` or raise ConfigError naming ``key``."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _check_value(value, option, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0])
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {list(args)}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        return [_check_value(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        hints = [args[0]] * len(value) if len(args) == 2 and args[1] is Ellipsis else list(args)
        if len(hints) != len(value):
            raise ConfigError(f"{key}: expected {len(hints)} values, got {len(value)}: {value!r}")
        return tuple(_check_value(v, h, f"{key}[{i}]") for i, (v, h) in enumerate(zip(value, hints)))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__} {value!r}")
        return {_check_value(k, args[0], key): _check_value(v, args[1], f"{key}.{k}") for k, v in value.items()}
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        # PyYAML (YAML 1.1) reads "3e-4" as a string; accept any valid float literal
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{key}: expected float, got str {value!r}") from None
    if hint in (int, float, str, bool):
        if type(value) is not hint:
            raise ConfigError(f"{key}: expected {hint.__name__}, got {type(value).__name__} {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {hint}")


def _build(cls, data: Any, prefix: str = ""):
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{prefix + '.' if prefix else ''}{close[0]}'?)" if close else ""
            raise ConfigError(f"unknown config key '{dotted}'{hint}; known keys here: {', '.join(names)}")
        kwargs[key] = _check_value(value, hints[key], dotted)
    return cls(**kwargs)


def apply_override(data: dict, override: str) -> None:
    """Apply ``a.b.c=value`` (value parsed as YAML) to nested dicts in place; a number indexes
    a list (``tasks.0.difficulty=3``; a missing list or item is started empty)."""
    if "=" not in override:
        raise ConfigError(f"override {override!r} is not of the form dotted.key=value")
    dotted, raw = override.split("=", 1)
    keys = dotted.strip().split(".")
    node: Any = data
    for key, following in zip(keys, keys[1:]):
        empty: Any = [] if following.isdigit() else {}
        if isinstance(node, list):
            index = int(key)
            if index > len(node):
                raise ConfigError(f"override {override!r}: item {index} of a list of {len(node)}")
            if index == len(node):
                node.append(empty)
            node = node[index]
        elif isinstance(node, dict):
            node = node.setdefault(key, empty)
        else:
            raise ConfigError(f"override {override!r}: '{key}' is not a section")
    last = keys[-1]
    value = yaml.safe_load(raw)
    if isinstance(node, list) and last.isdigit() and int(last) <= len(node):
        node[int(last):int(last) + 1] = [value]
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise ConfigError(f"override {override!r}: '{last}' does not name a key or list item")


# keys renamed since users first wrote them: old dotted key -> new. A config (or a saved run's
# config.yaml) that still writes the old key works, with a warning naming the new one.
RENAMED_KEYS = {"memory": "bank", "monitor.rules.memory_empty": "monitor.rules.bank_empty"}


def _renamed_override(override: str) -> str:
    """``override`` with a renamed key's old name replaced by the new one."""
    dotted, _, value = override.partition("=")
    dotted = dotted.strip()
    for old, new in RENAMED_KEYS.items():
        if dotted == old or dotted.startswith(old + "."):
            renamed = new + dotted[len(old) :]
            logger.warning("config key %s is now %s: read %s as %s", old, new, dotted, renamed)
            return f"{renamed}={value}"
    return override


def _rename_keys(data: dict) -> None:
    """Move each renamed key of ``data`` to its new name (both given: a ConfigError)."""
    for old, new in RENAMED_KEYS.items():
        *parents, key = old.split(".")
        node: Any = data
        for parent in parents:
            node = node.get(parent) if isinstance(node, dict) else None
        if not isinstance(node, dict) or key not in node:
            continue
        new_key = new.rsplit(".", 1)[-1]
        if new_key in node:
            raise ConfigError(f"config keys '{old}' and '{new}' are both given: '{old}' is the old name of '{new}'; keep '{new}'")
        logger.warning("config key %s is now %s: reading it as %s", old, new, new)
        node[new_key] = node.pop(key)


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        data = yaml.safe_load(path.read_text()) or {}
    _rename_keys(data)
    for override in overrides:
        apply_override(data, _renamed_override(override))
    config = _build(Config, data)
    check_config(config)
    return config


# past the sandbox's wall-clock limit: its interpreter's grace to kill and answer (5 s) and a
# slot's restart after a broken program (up to 30 s), with room to spare
TOOL_TIMEOUT_MARGIN_S = 45.0


def _env_problems(config: Config) -> list[str]:
    env = config.env
    if env.name is None:
        return []
    problems = []
    others = [key for key, on in (("markovian.enabled", config.markovian.enabled), ("bank.enabled", config.bank.enabled),
                                  ("reward.teacher", config.reward.teacher is not None), ("phases", bool(config.phases))) if on]  # fmt: skip
    if others:
        problems.append(f"env.name={env.name} (multi-turn episodes) does not combine with {', '.join(others)} yet")
    if config.reward.overlong_buffer > 0:
        problems.append("reward.overlong_buffer shapes single completions by their length; set it to 0 with env.name")
    if env.tool_hosts < 1 or env.max_parallel_steps < 1:
        problems.append("env.tool_hosts and env.max_parallel_steps must be at least 1")
    if config.algorithm.policy_loss == "sac":
        problems.append("algorithm.policy_loss=sac's soft values end at every turn's end: it does not train episodes (env.name) yet")
    wall = config.verifier.sandbox.limits.wall_s
    if env.tool_timeout_s < wall + TOOL_TIMEOUT_MARGIN_S:
        # a host cut off before the sandbox stops the program would mask an episode the program lost
        problems.append(f"env.tool_timeout_s ({env.tool_timeout_s:g}) must be at least verifier.sandbox.limits.wall_s ({wall:g}) + {TOOL_TIMEOUT_MARGIN_S:g}")
    return problems


def _serving_problems(config: Config) -> list[str]:
    """Continuous batching (generator.serving) and the partial rollouts built on it."""
    g, problems = config.generator, []
    if g.serving == "stream" and g.engine != "vllm":
        problems.append(f"generator.serving=stream batches requests as they come, which only vLLM does: set generator.engine=vllm (not {g.engine}) or generator.serving=batch")
    if config.rollout.partial and (g.serving == "batch" or g.engine != "vllm"):
        problems.append("rollout.partial interrupts the sequences being generated at a weight update: it needs generator.engine=vllm and generator.serving=stream (or auto)")
    if config.rollout.partial and g.sleep_mode:
        problems.append("rollout.partial resumes sequences across weight updates, but sleep mode drops their KV cache between steps: set one of them off")
    if g.pool is not None:
        problems += _pool_problems(config)
    return problems


def _pool_problems(config: Config) -> list[str]:
    """A run attached to a shared generator pool (generator.pool)."""
    g, problems = config.generator, []
    if not g.pool or not g.pool.replace("-", "").replace("_", "").isalnum():
        problems.append(f"generator.pool names a shared pool: letters, digits, - and _ (got {g.pool!r})")
    if config.model.train != "lora":
        problems.append(f"generator.pool serves each run as a LoRA adapter on one base model: model.train must be lora, not {config.model.train}")
    if g.sleep_mode or config.cluster.placement == "colocated":
        problems.append("generator.pool: a shared pool's generators serve other runs too, so they never sleep or share a run's device: set generator.sleep_mode=false and cluster.placement=disaggregated")
    if config.rollout.partial:
        problems.append("generator.pool does not combine with rollout.partial yet (an update of one run would interrupt the others' sequences)")
    if PhaseSchedule(config.phases).has_surgeon:
        problems.append("generator.pool: the SAC surgeon's attention scales change the base weights every run on the pool shares; run it with generators of its own")
    if g.share <= 0 or g.max_in_flight < 1:
        problems.append(f"generator.share must be > 0 and generator.max_in_flight >= 1 (got {g.share}, {g.max_in_flight})")
    return problems


def check_config(config: Config) -> None:
    """Combinations of keys that cannot run together, named in a ConfigError."""
    a = config.algorithm
    problems = []
    m = config.model
    if a.advantage == "gae" and m.train != "lora":
        problems.append("algorithm.advantage=gae needs a LoRA critic: set model.train=lora")
    if m.train != "lora" and config.generator.adapter_mode == "lora":
        problems.append(f"model.train={m.train} sends model weights, not an adapter: set generator.adapter_mode=merged")
    if (m.train == "modules") != bool(m.trainable_modules):
        problems.append("model.train=modules trains model.trainable_modules (e.g. [lm_head]): set both, or neither")
    if a.policy_loss == "sac" and m.train != "lora":
        problems.append("algorithm.policy_loss=sac trains a LoRA critic (the value head) beside the policy: set model.train=lora")
    if a.policy_loss == "sac" and a.sac_alpha <= 0:
        problems.append(f"algorithm.sac_alpha must be > 0 (the soft Q-function's temperature), got {a.sac_alpha}")
    if a.policy_loss == "sac" and (a.actor_reward_weight > 0 or a.objective != "ppo"):
        problems.append("algorithm.policy_loss=sac is the rollout objective on its own: it takes no actor_reward_weight and needs objective=ppo")
    if a.policy_loss == "pg" and a.ppo_epochs > 1:
        problems.append("algorithm.policy_loss=pg has no ratio, so it is on-policy only: set algorithm.ppo_epochs=1")
    if a.kl_target is not None and a.kl_coef <= 0:
        problems.append("algorithm.kl_target adapts algorithm.kl_coef, which must start above 0")
    if a.advantage not in ("gae", "reinforce++", "batch-std") and config.rollout.group_size < 2:
        problems.append(f"algorithm.advantage={a.advantage} needs rollout.group_size >= 2")
    bank = config.bank
    if a.objective == "sft" and not bank.enabled:
        problems.append("algorithm.objective=sft fine-tunes on the solution bank's verified solutions: set bank.enabled=true")
    if bank.feed_groups and (not bank.enabled or a.objective != "ppo"):
        problems.append("bank.feed_groups adds banked solutions to GRPO groups: it needs bank.enabled=true and algorithm.objective=ppo")
    problems += bank.problems()
    problems += _markovian_problems(config)
    problems += _env_problems(config)
    problems += _surgeon_problems(config)
    for key in ("ppo_epochs", "micro_batch_size", "sft_epochs"):
        if getattr(a, key) < 1:
            problems.append(f"algorithm.{key} must be at least 1")
    if config.learner.num_gpus < 0:
        problems.append("learner.num_gpus must be >= 0")
    if config.learner.num_learners < 1:
        problems.append("learner.num_learners must be at least 1")
    if config.learner.weight_bucket_mb < 0:
        problems.append("learner.weight_bucket_mb must be >= 0 (0: the weights in one piece)")
    problems += _sharding_problems(config)
    ro = config.rollout
    if ro.mode == "async" and ro.max_staleness < 1:
        problems.append("rollout.mode=async needs rollout.max_staleness >= 1 (the steps the generators may run ahead); 0 is rollout.mode=sync")
    if ro.max_staleness < 0:
        problems.append("rollout.max_staleness must be >= 0")
    problems += _serving_problems(config)
    if ro.max_sampling_rounds < 1 or ro.max_sampling_rounds * config.generator.num_generators > SEEDS_PER_STEP:
        problems.append(f"rollout.max_sampling_rounds must be at least 1 and at most {SEEDS_PER_STEP} / generator.num_generators")
    if not 0 <= config.reward.overlong_buffer < ro.max_tokens:
        problems.append(f"reward.overlong_buffer ({config.reward.overlong_buffer}) must be >= 0 and below rollout.max_tokens ({ro.max_tokens})")
    r = config.run
    if r.checkpoint_every < 0 or r.keep_checkpoints < 1:
        problems.append(f"run.checkpoint_every ({r.checkpoint_every}) must be >= 0 and run.keep_checkpoints ({r.keep_checkpoints}) >= 1")
    if not 0 < config.monitor.rollback_lr_factor <= 1:
        problems.append(f"monitor.rollback_lr_factor must be in (0, 1], got {config.monitor.rollback_lr_factor}")
    problems += _placement_problems(config)
    v = config.verifier
    if not 1 <= v.min_verifiers <= v.max_verifiers:
        problems.append(f"verifier pool size needs 1 <= verifier.min_verifiers ({v.min_verifiers}) <= verifier.max_verifiers ({v.max_verifiers})")
    problems += _reward_problems(config)
    problems += _task_problems(config)
    if config.run.wandb is not None and importlib.util.find_spec("wandb") is None:
        problems.append("run.wandb logs to Weights & Biases: install the wandb package (pip install 'raylight[wandb]'), or remove run.wandb")
    from cluster.observe.monitor import DEFAULT_RULES

    unknown_rules = sorted(set(config.monitor.rules) - set(DEFAULT_RULES))
    if unknown_rules:
        problems.append(f"monitor.rules: unknown rules {unknown_rules}; known: {sorted(DEFAULT_RULES)}")
    if problems:
        raise ConfigError("; ".join(problems))


def _sharding_problems(config: Config) -> list[str]:
    """learner.sharding=fsdp (docs/cluster.md#sharded-learners): what it cannot shard."""
    learner, a = config.learner, config.algorithm
    if learner.sharding != "fsdp":
        return ["learner.offload_optimizer offloads the sharded optimizer state: set learner.sharding=fsdp"] if learner.offload_optimizer else []
    if learner.num_learners == 1:
        logger.warning("learner.sharding=fsdp with learner.num_learners=1: nothing to shard over, the learner trains unsharded")
    clashes = {
        "a critic (algorithm.advantage=gae, algorithm.policy_loss=sac)": a.advantage == "gae" or a.policy_loss == "sac",
        "model.train=modules (its reference swaps the trained modules' storage)": config.model.train == "modules",
        # replayed rows are scored by the rank that holds them, alone: a sharded forward is a collective
        "bank.feed_groups (replayed solutions are scored by one rank alone)": config.bank.feed_groups,
    }
    return [f"learner.sharding=fsdp cannot shard {what}: set learner.sharding=none" for what, clash in clashes.items() if clash]


def _markovian_problems(config: Config) -> list[str]:
    """Markovian chain-of-thought training: what it needs, and what cannot run with it."""
    mk, a, problems = config.markovian, config.algorithm, []
    if a.actor_reward_weight < 0:
        problems.append(f"algorithm.actor_reward_weight must be >= 0, got {a.actor_reward_weight}")
    if a.actor_reward_weight > 0 and not mk.enabled:
        problems.append("algorithm.actor_reward_weight trains the answer's log-prob given a Markovian chain of thought: set markovian.enabled=true")
    if not mk.enabled:
        return problems
    if a.actor_reward_weight > 0 and a.policy_loss != "pg":
        logger.warning(
            "algorithm.actor_reward_weight with algorithm.policy_loss=%s: the Markovian experiments saw PPO with the actor reward "
            "collapse into repeated tokens on ARC; the recipes use policy_loss=pg with it (docs/algorithms.md#markovian-chain-of-thought-training)",
            a.policy_loss,
        )
    problems += mk.problems()
    if config.model.train != "lora":
        problems.append("markovian.enabled scores answers under the frozen model, the base with the adapter off: set model.train=lora")
    if mk.baseline and config.generator.adapter_mode == "merged":
        problems.append("markovian.baseline has the frozen model write its own chain of thought beside the policy: set generator.adapter_mode=lora")
    clashes = {
        "algorithm.objective=sft": a.objective != "ppo",
        "bank.enabled": config.bank.enabled,
        "rollout.dynamic_sampling": config.rollout.dynamic_sampling,
        "reward.overlong_buffer": config.reward.overlong_buffer > 0,
        "rollout.stop": bool(config.rollout.stop),
    }
    for key in (k for k, clash in clashes.items() if clash):
        problems.append(f"markovian.enabled rewards chains of thought of exactly markovian.cot_length tokens by the answer's log-prob: it cannot run with {key}")
    return problems


def _surgeon_problems(config: Config) -> list[str]:
    """A phase schedule with a surgeon: what it needs."""
    schedule = PhaseSchedule(config.phases)
    problems = schedule.problems()
    if not schedule.has_surgeon:
        return problems
    problems += config.surgeon.problems()
    clashes = {
        "model.train=lora (the scales act on the frozen base beside the adapter)": config.model.train != "lora",
        "rollout.mode=sync (a window's reward must come from rollouts of the scales it measures)": config.rollout.mode != "sync",
        "markovian.enabled off (its frozen model is the base without the scales)": config.markovian.enabled,
    }
    problems += [f"a surgery or joint phase needs {need}" for need, clash in clashes.items() if clash]
    return problems


def _placement_problems(config: Config) -> list[str]:
    """GPU generators, tensor parallelism, colocation and sleep mode that cannot work together."""
    g, learner, problems = config.generator, config.learner, []
    if g.num_gpus < 0 or g.tensor_parallel_size < 1:
        problems.append("generator.num_gpus must be >= 0 and generator.tensor_parallel_size >= 1")
    if g.tensor_parallel_size > 1 and g.num_gpus != g.tensor_parallel_size:
        problems.append(f"generator.tensor_parallel_size={g.tensor_parallel_size} shards each engine over that many GPUs: set generator.num_gpus={g.tensor_parallel_size}")
    if g.sleep_mode and g.engine == "vllm" and g.num_gpus == 0:
        problems.append("generator.sleep_mode releases GPU memory: it needs GPU generators (generator.num_gpus > 0)")
    if g.sleep_mode and config.rollout.mode == "async":
        problems.append("generator.sleep_mode puts the generators to sleep while the learner steps: it needs rollout.mode=sync")
    if g.sleep_level == 2 and config.model.train != "full":
        problems.append(f"generator.sleep_level=2 discards the base weights at every sleep, and a model.train={config.model.train} broadcast does not carry them all: use generator.sleep_level=1 (or model.train=full)")
    if config.cluster.placement == "colocated":
        if learner.num_learners != g.num_generators:
            problems.append(f"cluster.placement=colocated pairs learner i with generator i: learner.num_learners ({learner.num_learners}) must equal generator.num_generators ({g.num_generators})")
        if learner.num_gpus != g.num_gpus or learner.num_gpus not in (0, 1):
            problems.append(f"cluster.placement=colocated shares one GPU per pair: set learner.num_gpus and generator.num_gpus both to 1 (GPU) or 0 (CPU), got {learner.num_gpus} and {g.num_gpus}")
        if g.tensor_parallel_size > 1:
            problems.append("cluster.placement=colocated serves each generator from its pair's one GPU: generator.tensor_parallel_size must be 1")
        if g.num_gpus > 0 and not g.sleep_mode and g.gpu_memory_utilization > COLOCATED_MEMORY_SHARE:
            problems.append(
                f"cluster.placement=colocated on a GPU: the generator must leave the learner memory; set generator.sleep_mode=true, "
                f"or generator.gpu_memory_utilization <= {COLOCATED_MEMORY_SHARE} (now {g.gpu_memory_utilization})"
            )
    return problems


def _reward_problems(config: Config) -> list[str]:
    """Reward terms: unique names, finite weights, functions that import and can be called
    (from the folder the run starts in, as the verifier actors will), and servers whose
    retries fit the verifier pool's deadline."""
    from rewards.terms import FunctionTerm, import_function

    problems = []
    reward = config.reward
    names = [term.label for term in (*reward.terms(), *((reward.teacher,) if reward.teacher else ()))]
    if len(set(names)) != len(names):
        problems.append(f"reward terms need unique names (the components they report), got {names}: give each function a 'name'")
    for term in (*reward.terms(), *((reward.teacher,) if reward.teacher else ())):
        if not math.isfinite(term.weight):
            problems.append(f"reward term {term.label}: weight must be a finite number, got {term.weight}")
    if not math.isfinite(reward.correct_at):
        problems.append(f"reward.correct_at must be a finite number, got {reward.correct_at}")
    for i, function in enumerate(reward.functions):
        try:
            FunctionTerm(function, import_function(function.path, (*function.search, str(Path.cwd()))))
        except Exception as exc:  # noqa: BLE001 - whatever the user's module raises on import
            problems.append(f"reward.functions[{i}].path: {exc}")
    budget = config.verifier.timeout_s
    for key, served in (("http", reward.http), ("model", reward.model), ("judge", reward.judge)):
        if served is None:
            continue
        if served.timeout_s <= 0 or served.retries < 0:
            problems.append(f"reward.{key} needs timeout_s > 0 and retries >= 0")
        elif (served.retries + 1) * (served.timeout_s + 2) > budget:
            problems.append(
                f"reward.{key}: {served.retries + 1} tries of up to {served.timeout_s:g}s do not fit the verifier's deadline of "
                f"verifier.timeout_s={budget:g}s per sample; lower reward.{key}.timeout_s or retries, or raise verifier.timeout_s"
            )
    http = reward.http
    if http is not None:
        if not http.url.startswith(("http://", "https://")):
            problems.append(f"reward.http.url must be an http:// or https:// address, got {http.url!r}")
        if http.max_concurrency < 1 or http.batch_size < 1:
            problems.append("reward.http needs max_concurrency >= 1 and batch_size >= 1")
    model = reward.model
    if model is not None:
        if not model.path:
            problems.append("reward.model.path: the reward model's folder, Hub name or 'tiny-classifier'")
        if model.num_actors < 1 or model.batch_size < 1:
            problems.append("reward.model needs num_actors >= 1 and batch_size >= 1")
    judge = reward.judge
    if judge is not None:
        if not judge.model:
            problems.append("reward.judge.model: the judge's model folder, 'smollm2', or 'base' (the run's own model)")
        try:
            judge.prompt.format(question="", completion="", reference="")
        except (KeyError, IndexError, ValueError) as exc:
            problems.append(f"reward.judge.prompt may name only {{question}}, {{completion}} and {{reference}}: {exc!r}")
        if "{completion}" not in judge.prompt:
            problems.append("reward.judge.prompt must show the judge the {completion}")
        if judge.num_generators < 1 or judge.max_tokens < 1 or judge.scale <= 0 or len(set(judge.letters)) < 2:
            problems.append("reward.judge needs num_generators >= 1, max_tokens >= 1, scale > 0 and at least two letters")
        if judge.max_tokens >= config.generator.max_model_len // 2:
            problems.append(f"reward.judge.max_tokens ({judge.max_tokens}) must leave the judge's prompt most of generator.max_model_len ({config.generator.max_model_len})")
    teacher = reward.teacher
    if teacher is not None:
        if not teacher.model:
            problems.append("reward.teacher.model: the teacher's model folder, 'smollm2' or a Hub name (it must share the student's tokenizer)")
        if teacher.num_generators < 1 or teacher.timeout_s <= 0:
            problems.append("reward.teacher needs num_generators >= 1 and timeout_s > 0")
        if config.markovian.enabled:
            problems.append("reward.teacher distills the policy's own tokens; it cannot run with markovian.enabled (whose reward replaces them)")
        if teacher.mode == "token" and config.algorithm.policy_loss == "sac":
            problems.append("reward.teacher.mode=token adds to the policy-gradient advantages; algorithm.policy_loss=sac has none")
        if config.rollout.temperature != 1.0 or config.rollout.top_p != 1.0:
            problems.append("reward.teacher compares the student's and the teacher's log-probs at temperature 1: it needs rollout.temperature=1.0 and rollout.top_p=1.0")
        if teacher.mode == "token" and (config.algorithm.drop_zero_variance_groups or config.rollout.dynamic_sampling):
            problems.append("reward.teacher.mode=token teaches every token: groups whose verifier rewards tie must stay in the batch "
                            "(algorithm.drop_zero_variance_groups=false, rollout.dynamic_sampling=false)")  # fmt: skip
        if config.bank.enabled:
            problems.append("reward.teacher scores the policy's own samples; the solution bank replays stored ones: turn one off")
    return problems


def _task_problems(config: Config) -> list[str]:
    """Tasks: unique ids, positive weights, curricula only where there is a difficulty, and
    reward weights that name components the task's scorer reports."""
    from rewards.scoring import COMPONENTS, TERMS_ONLY
    from rollout.tasks import build_task

    problems, ids = [], [t.id or t.name for t in config.tasks]
    if not config.tasks:
        problems.append("tasks: at least one task is needed")
    if len(set(ids)) != len(ids):
        problems.append(f"tasks: ids must be unique, got {ids} (give each task an 'id')")
    for i, t in enumerate(config.tasks):
        key = f"tasks[{i}] ({ids[i]})"
        if t.weight <= 0:
            problems.append(f"{key}.weight must be above 0")
        try:
            task = build_task(t.name, **t.settings(config.run.seed, config.eval.n))
        except (ValueError, TypeError) as exc:
            problems.append(f"{key}: {exc}")
            continue
        if t.curriculum.enabled and not hasattr(task, "difficulty"):  # the test TaskMixture makes too
            problems.append(f"{key}.curriculum needs a task with a difficulty (arithmetic, infix, rpn, brackets)")
        terms = [term.label for term in config.reward.terms()]
        chosen = terms if t.rewards is None else t.rewards
        if set(chosen) - set(terms):
            problems.append(f"{key}.rewards names {sorted(set(chosen) - set(terms))}; the configured reward terms are {terms}")
        if task.reward.scorer == TERMS_ONLY and not chosen and config.reward.teacher is None:
            problems.append(f"{key} is scored by reward terms alone (scorer: reward), and none is configured: set reward.functions, http, model or judge, or a scorer")
            continue
        if task.reward.scorer not in COMPONENTS and task.reward.scorer != TERMS_ONLY:
            problems.append(f"{key}.scorer: {task.reward.scorer!r} is not one of {[*COMPONENTS, TERMS_ONLY]}")
            continue
        weights = t.weights if t.weights is not None else config.reward.weights
        known = set(COMPONENTS.get(task.reward.scorer, ())) | {"format_tags"}
        if set(chosen) & known:
            problems.append(f"{key}: reward terms {sorted(set(chosen) & known)} have the names of components its {task.reward.scorer} scorer reports; rename them")
        if weights is not None and set(weights) - known:
            source = f"{key}.weights" if t.weights is not None else "reward.weights"
            problems.append(f"{source} names {sorted(set(weights) - known)}, which the {task.reward.scorer} scorer of {ids[i]} does not report; it reports {sorted(known)}")
    return problems


def config_to_dict(config: Config) -> dict:
    """Plain YAML-ready data (tuples as lists)."""
    return _plain(dataclasses.asdict(config))


def dotted_items(config: Config) -> dict[str, Any]:
    """Every leaf of the config under its dotted key, as the overrides name them
    (``rollout.group_size``; a list of sections numbers its items: ``tasks.0.name``)."""
    return _flatten(config_to_dict(config), "")


def _flatten(tree: Any, prefix: str) -> dict[str, Any]:
    if isinstance(tree, dict) and tree:
        items = tree.items()
    elif isinstance(tree, list) and tree and all(isinstance(v, dict) for v in tree):
        items = ((str(i), v) for i, v in enumerate(tree))
    else:
        return {prefix.removesuffix("."): tree}
    flat: dict[str, Any] = {}
    for key, value in items:
        flat |= _flatten(value, f"{prefix}{key}.")
    return flat


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
