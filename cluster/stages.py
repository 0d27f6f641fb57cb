"""The loop's seams: typed stages, chosen once at wiring (``cluster.loop.wiring.build_stages``)
— the driver's twin of the learner's ``OBJECTIVES``.

One step, in order (``cluster.loop.driver.Trainer.step``):
1. ``Prompts`` turn the problems the data stream draws into requests and say how a training
   step samples them;
2. the generators and the verifier pool produce scored samples (``cluster.loop.rollouts``);
3. each ``ModelReward`` replaces the verdicts' rewards by what needs the model, before the
   advantages (the Markovian answer log-prob, scored on the learner);
4. the ``BatchSource`` turns the step's samples into the learner's ``TrainBatch`` (rollouts;
   bank-fed GRPO groups; self-improvement rounds on the bank), feature columns filled while
   the batch is built;
5. the learner learns and the generators get the new weights.
Between steps the run keeper (``cluster.keeping.keeper``) runs the ``Evaluator`` on its
cadence, hands each ``Participant`` the finished step (the SAC surgery acts before a step and
judges its window after), and checkpoints every ``Stateful`` part beside the learners.

Named, typed seams and not an event bus: each has one place in the loop, and the order is
the loop's. A new run-level feature implements the seams it needs (``cluster/features/``) and
adds one line to ``build_stages``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Protocol

from cluster.observe.samples import sample_metrics, task_metrics
from cluster.phases import PhaseSchedule
from contracts import PolicyRef, Problem, Prompt, Sample, SamplingSettings, TrainBatch, Verdict
from learners.algorithms import AdvantageEstimator
from learners.batch import build_train_batch
from learners.settings import ObjectiveName
from rollout.prompts import render_prompts

if TYPE_CHECKING:
    from actors.generator import GeneratorPool
    from actors.learner import LearnerGroup
    from actors.reward_models import RewardServices
    from actors.tools import ToolPool
    from actors.verifier import VerifierPool
    from rollout.tasks import TaskMixture

# a checkpoint file's bytes, by name, or None where the checkpoint has no such file
ReadFile = Callable[[str], "bytes | None"]


@dataclass
class Crew:
    """The run's actor groups. A lost learner group is replaced in place (the run keeper's
    recovery), so stages hold the crew, not the group."""

    generators: GeneratorPool
    verifiers: VerifierPool
    learners: LearnerGroup | None = None  # None: an evaluation that needs no learner
    rewards: RewardServices | None = None  # a reward model's and a judge's actors, which the verifiers ask
    update_dtype: str | None = None  # model weights are sent in the generators' dtype, where it is known
    tools: ToolPool | None = None  # the sandbox hosts of an environment's tool calls

    def broadcast(self, policy: PolicyRef) -> None:
        """The learner's weights to every generator through the object store (model weights in
        buckets, loaded one at a time); waits for each to confirm them and fails fast
        (``WeightSyncError``)."""
        self.generators.broadcast(self.learners.weight_update_ref(dtype=self.update_dtype, streamed=True), policy)

    def push(self, policy: PolicyRef) -> None:
        """The learner's weights queued behind the work each generator holds (async mode;
        confirmed by the next push)."""
        self.generators.push(self.learners.weight_update_ref(dtype=self.update_dtype, streamed=True), policy)

    def roles(self) -> dict[str, list]:
        """The actors of each role (the memory probe asks them)."""
        roles = {"learners": self.learners.actors, "generators": self.generators.handles, "verifiers": self.verifiers.actors}
        roles |= {"reward_servers": self.rewards.handles} if self.rewards is not None else {}
        return roles | ({"tool_hosts": self.tools.hosts} if self.tools is not None else {})

    def kill(self) -> None:
        if self.learners is not None:
            self.learners.kill()
        self.generators.kill()
        self.verifiers.kill()
        if self.rewards is not None:
            self.rewards.kill()
        if self.tools is not None:
            self.tools.kill()


@dataclass(frozen=True)
class Built:
    """A step's batch: what the learner trains on and by which of its objectives, the samples
    and verdicts the rollout file records (replayed ones included), each recorded sample's
    advantage (None: not trained on) and the batch's metrics."""

    batch: TrainBatch
    samples: list[Sample]
    verdicts: list[Verdict]
    advantages: list[float | None]
    metrics: dict[str, float] = field(default_factory=dict)
    objective: ObjectiveName = "ppo"  # the key of learners.objectives.OBJECTIVES the learner applies


class Prompts(Protocol):
    """How problems become requests, and how a training step samples them (its seed is set
    per step by the rollout stream)."""

    @property
    def sampling(self) -> SamplingSettings: ...

    def render(self, problems: list[Problem]) -> list[Prompt]: ...


class ModelReward(Protocol):
    """A reward that needs the model: replaces the verdicts' rewards before the advantages
    (infrastructure errors stay as they are). ``span`` names its time, ``perf/<span>_seconds``."""

    span: str

    def score(self, samples: list[Sample], verdicts: list[Verdict]) -> tuple[list[Verdict], dict[str, float]]: ...


class BatchSource(Protocol):
    """How a step's scored samples become the learner's batch."""

    def build(self, step: int, samples: list[Sample], verdicts: list[Verdict], policy: PolicyRef) -> Built: ...


class Columns(Protocol):
    """Further ``TrainBatch`` fields a feature fills while the batch is built, one value per
    trained sample (those with an advantage), in order."""

    def __call__(self, samples: list[Sample], verdicts: list[Verdict], advantages: list[float | None]) -> dict[str, tuple]: ...


class Evaluator(Protocol):
    """Held-out evaluation: the same for training (its start, cadence and end) and for
    ``raylight eval``. ``needs_learners``: it scores with the learner (an evaluation without
    training starts one)."""

    needs_learners: bool

    def evaluate(self) -> dict[str, float]: ...


class Stateful(Protocol):
    """A part of the run a checkpoint holds, besides the learners and the run's counters."""

    def state(self) -> dict[str, bytes]:
        """The files this part adds to a checkpoint."""
        ...

    def load_state(self, read: ReadFile) -> None:
        """Continue from a checkpoint's files (a file the checkpoint lacks reads None)."""
        ...

    def rewind(self, learners: LearnerGroup, restart: bool) -> None:
        """The learners went back to older weights: a rollback's checkpoint (``restart``
        False), or the run's start (a lost learner group before the first checkpoint)."""
        ...


class Participant(Protocol):
    """A part that acts between steps: before a step starts, and after it finished (with its
    metrics row; ``stopping``: the run stops after it). Returns metrics for the step's row."""

    def before_step(self, step: int, last_step: int) -> None: ...

    def after_step(self, step: int, row: dict, stopping: bool) -> dict[str, float]: ...

    def kill(self) -> None:
        """Release what it holds (its actors): the run is over."""
        ...


@dataclass(frozen=True)
class Stages:
    """Everything a run plugs into the loop, chosen once by ``build_stages``."""

    prompts: Prompts
    batches: BatchSource
    evaluator: Evaluator
    schedule: PhaseSchedule
    model_rewards: tuple[ModelReward, ...] = ()
    participants: tuple[Participant, ...] = ()
    parts: tuple[Stateful, ...] = ()


# -- the plain run's stages ---------------------------------------------------------------


class TaskPrompts:
    """Each problem in its task's chat template with the task's system prompt."""

    def __init__(self, tokenizer, tasks: TaskMixture, sampling: SamplingSettings):
        self.tokenizer, self.tasks = tokenizer, tasks
        self._sampling = sampling

    @property
    def sampling(self) -> SamplingSettings:
        return self._sampling

    def render(self, problems: list[Problem]) -> list[Prompt]:
        """The problems' prompts, in their order (each rendered with its own task's system prompt)."""
        prompts: list[Prompt | None] = [None] * len(problems)
        by_task: dict[str, list[int]] = {}
        for i, problem in enumerate(problems):
            by_task.setdefault(problem.task, []).append(i)
        for task_id, indices in by_task.items():
            system = self.tasks.tasks[task_id].system_prompt if task_id in self.tasks.tasks else None
            for i, prompt in zip(indices, render_prompts(self.tokenizer, [problems[i] for i in indices], system)):
                prompts[i] = prompt
        return prompts  # type: ignore[return-value]


@dataclass(frozen=True)
class RolloutBatches:
    """The rollouts themselves: advantages by ``estimator`` (groups with nothing to teach left
    out when ``drop_zero_variance``), a feature's ``columns`` filled as the batch is built."""

    estimator: AdvantageEstimator
    drop_zero_variance: bool
    columns: Columns | None = None

    def build(self, step: int, samples: list[Sample], verdicts: list[Verdict], policy: PolicyRef) -> Built:
        batch, advantages, metrics = build_train_batch(samples, verdicts, self.estimator, self.drop_zero_variance, self.columns)
        return Built(batch, samples, verdicts, advantages, metrics)


@dataclass
class GreedyEvaluator:
    """Greedy held-out metrics on each task's evaluation problems (fixed at the start: a
    curriculum's later difficulty does not change them): accuracy, reward and each reward
    component, completion length (and an episode's turns and tool calls); over all tasks and
    per task when several."""

    crew: Crew
    prompts_by_task: dict[str, list[Prompt]]
    sampling: SamplingSettings
    needs_learners: bool = False
    # runs the prompts as multi-turn episodes (an environment's ``EpisodeRunner.run``), scored;
    # None: single completions
    episodes: Callable[[list[Prompt], SamplingSettings], tuple[list[Sample], list[Verdict]]] | None = None

    def evaluate(self) -> dict[str, float]:
        prompts = [prompt for task_prompts in self.prompts_by_task.values() for prompt in task_prompts]
        if self.episodes is not None:
            samples, verdicts = self.episodes(prompts, self.sampling)
        else:
            samples = self.crew.generators.generate(prompts, self.sampling)
            verdicts = self.crew.verifiers.score(samples)
        per_task = task_metrics(samples, verdicts, "eval") if len(self.prompts_by_task) > 1 else {}
        return {"eval/n": len(samples), **sample_metrics(samples, verdicts, prefix="eval"), **per_task}
