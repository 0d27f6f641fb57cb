"""The driver: the training loop over generator, verifier and learner actors.

``Trainer.step`` reads top to bottom: rollouts -> model rewards -> batch (advantages) -> learn
-> publish. ``Trainer.train`` is a plain loop over steps: each step, then what comes between
steps (the run keeper: evaluation, the monitor, checkpoints).

What a run-level feature changes comes through the stages chosen once at wiring
(``cluster.stages``; ``cluster.loop.wiring.build_stages``): how problems become prompts (a
Markovian chain of thought of fixed length), rewards that need the model, how samples become
a batch (rollouts, bank-fed groups, self-improvement rounds), the held-out evaluation, and the
participants that act between steps (the SAC surgery). Everything that keeps the run — start,
resume, checkpoints, rollbacks, learner recovery, the end — is ``cluster.keeping.keeper``'s;
the rollouts come from ``cluster.loop.rollouts.RolloutStream``.

Every sample carries its policy version and ``filter_stale`` checks it against the learner's,
so an asynchronous mode (generators ahead by a bounded number of versions) changes the
scheduling, not the contracts.

Faults cost steps, not the run: the generator pool replaces a failed generator and re-issues
its work itself; a lost learner rank (``LearnerFailure``) makes the keeper build a new learner
group and continue from the newest checkpoint in the same process; a pool that has lost its
generators for good (``GeneratorsLost``) stops the run with a checkpoint of the last finished
step.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import time
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from actors.generator import GeneratorsLost, WeightUpdateLost
from actors.learner import LearnerFailure
from actors.verifier import Scorer
from cluster.capacity.check import PROMPT_TOKENS, check_before_start, check_joined_cluster
from cluster.config import Config
from cluster.exits import ExitCode, exit_code_of
from cluster.keeping.checkpoint import Checkpoint
from cluster.keeping.keeper import RunKeeper, RunState, resume_point, saved_run
from cluster.keeping.learner_states import LearnerStates, learner_states
from cluster.keeping.rundir import RunDir
from cluster.loop.placement import Placement, check_model_on_nodes, check_shared_folder, place
from cluster.loop.rollouts import RolloutStream
from cluster.loop.wiring import build_stages, build_tasks, init_ray, start_crew, start_learners, training_sampling
from cluster.observe.footprint import MemoryProbe
from cluster.observe.monitor import Event
from cluster.observe.samples import sample_metrics, task_metrics
from cluster.stages import Built, TaskPrompts
from contracts import Sample, Verdict
from learners.learner import REQUIRED_METRICS
from rollout.models import resolve_model
from rollout.queue import Rollout
from rollout.staleness import filter_stale

logger = logging.getLogger(__name__)


# a step whose batch is empty (every group filtered) still reports the learner's keys
EMPTY_LEARN_METRICS = dict.fromkeys(REQUIRED_METRICS, float("nan"))


@dataclass
class StepTimer:
    """Wall-clock seconds of a step's spans, as ``perf/<span>_seconds``."""

    seconds: dict[str, float] = field(default_factory=dict)

    @contextlib.contextmanager
    def __call__(self, span: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[f"perf/{span}_seconds"] = time.perf_counter() - start


def checkpointed_learners(config: Config, run_dir: RunDir, placement: Placement) -> LearnerStates:
    """Sharded learners write their own checkpoint shards where every learner's node shares the
    run directory with the driver; else the driver writes the gathered state (one warning)."""
    sharded = config.learner.sharding == "fsdp" and config.learner.num_learners > 1
    unshared = check_shared_folder(str(run_dir.path), placement.learner_nodes()) if sharded else None
    return learner_states(sharded, unshared)


# held-out problems per task whose prompts are measured for the capacity check, and the room
# left above the longest of them (a curriculum lengthens its prompts as the run goes)
PROMPT_SAMPLE, PROMPT_MARGIN = 64, 1.25


def longest_prompt(tokenizer, tasks, config: Config) -> int:
    """The tokens of the longest prompt among up to ``PROMPT_SAMPLE`` held-out problems of each
    task, rendered as the run renders them, plus ``PROMPT_MARGIN``: what the capacity check
    sizes the learner's rows with (the planner's 256 without it was twice the demo's)."""
    problems = [p for task_problems in tasks.eval_sets("validation").values() for p in task_problems[:PROMPT_SAMPLE]]
    rendered = TaskPrompts(tokenizer, tasks, training_sampling(config)).render(problems)
    return math.ceil(PROMPT_MARGIN * max((len(p.token_ids) for p in rendered), default=0)) or PROMPT_TOKENS


class Trainer:
    """Owns the actors of one run and drives its steps."""

    def __init__(self, config: Config, run_dir: RunDir, scorer: Scorer | None = None):
        """``scorer`` replaces the configured reward (text, problem) -> Verdict, e.g. in tests."""
        self.config, self.run_dir = config, run_dir
        # the data first: a task without usable rows stops the run before any model is loaded
        self.tasks = build_tasks(config)
        self.tasks.check()
        self.model_path = str(resolve_model(config.model.path))
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        prompt_tokens = longest_prompt(self.tokenizer, self.tasks, config)
        local = check_before_start(config, self.model_path, prompt_tokens)  # a config that cannot fit stops here (docs/capacity.md)
        init_ray(config)
        if not local:  # a running cluster: checked against what Ray says it has
            check_joined_cluster(config, self.model_path, prompt_tokens)
        self.placement = place(config)
        try:
            check_model_on_nodes(self.model_path, self.placement.bundle_nodes())
            self.crew = start_crew(config, self.model_path, self.placement, self.tasks, (lambda: scorer) if scorer else None)
            self.stages = build_stages(config, self.tokenizer, self.tasks, self.crew, set_scales=self.set_attention_scales)
        except BaseException:
            if getattr(self, "crew", None) is not None:
                self.crew.kill()  # the reward servers stand outside the placement group
            self.placement.remove()  # its actors go with it
            raise
        self.run = RunState()
        self.stream = RolloutStream(config, self.tasks, self.stages.prompts, self.crew)
        relearn = functools.partial(start_learners, config, self.model_path, self.placement)
        states = checkpointed_learners(config, run_dir, self.placement)
        self.keeper = RunKeeper(config, run_dir, self.run, self.crew, self.stream, self.stages, self.model_path, relearn, states)
        self.memory_probe = MemoryProbe()  # perf/peak_rss_gib/<role>
        self.timeline: list[tuple[str, int, float, float]] = []  # (span, step, start, end), wall clock
        self._last_step_end = time.time()
        self.crew.broadcast(self.run.policy)

    @classmethod
    def resume_or_start(cls, config: Config, scorer: Scorer | None = None, override: bool = False) -> Trainer:
        """Continue the run in ``config.run.run_dir`` from its newest checkpoint that verifies,
        or start it when there is none (``raylight train --resume-if-exists``); a config that
        differs from the saved one is an error unless ``override``."""
        run_dir, config, checkpoint = resume_point(config, override)
        return cls(config, run_dir, scorer) if checkpoint is None else cls._continue(run_dir, config, checkpoint, scorer)

    @classmethod
    def resume(cls, path: str | os.PathLike, steps: int | None = None, scorer: Scorer | None = None,
               overrides: tuple[str, ...] = (), override: bool = False) -> Trainer:  # fmt: skip
        """A Trainer continuing the run in ``path`` from its newest checkpoint that verifies
        (to ``steps``, else to the configured number); ``overrides`` that change its saved
        config are an error unless ``override``."""
        return cls._continue(*saved_run(path, steps, overrides, override), scorer)

    @classmethod
    def _continue(cls, run_dir: RunDir, config: Config, checkpoint: Checkpoint, scorer: Scorer | None) -> Trainer:
        trainer = cls(config, run_dir, scorer)
        trainer.keeper.restore(checkpoint)
        return trainer

    # -- the loop -------------------------------------------------------------------------

    def train(self, steps: int) -> dict:
        """Run to step ``steps`` (from step 1, or after a restored checkpoint's step); the
        summary says why the run stopped (``stopped_by``: None when it ran every step)."""
        self.stream.run_to(steps)
        self.keeper.open(self.placement.describe())
        stopped_by = None
        try:
            self.keeper.evaluate_at_start()
            with tqdm(desc="train", unit="step", dynamic_ncols=True, initial=self.run.step, total=steps) as bar:
                while stopped_by is None and self.run.step < steps:
                    stopped_by = self.run_step(self.run.step + 1, steps, bar)
        except GeneratorsLost as lost:
            self.keeper.stop_for_lost_generators(lost)
        except BaseException as exc:  # the run ends here: the sinks close, W&B records how
            self.keeper.close_sinks(exit_code_of(exc))
            raise
        self.keeper.close(ExitCode.OK if stopped_by is None else ExitCode.MONITOR_STOP)
        return self.keeper.summary(stopped_by)

    def run_step(self, step: int, last_step: int, bar: tqdm) -> Event | None:
        """Step ``step`` with the participants before it and the keeper after it; the event
        that stops the run, if one does. A lost learner costs the steps since the newest
        checkpoint: the keeper rebuilds the group and the loop goes on from there."""
        stopped_by = None
        try:
            for participant in self.stages.participants:
                participant.before_step(step, last_step)
            metrics = self.step(step)
            stopped_by = self.keeper.after_step(step, last_step, metrics)
            bar.set_postfix(progress(metrics), refresh=False)
        except (LearnerFailure, WeightUpdateLost) as failure:
            self.keeper.recover_learners(failure, step)
        bar.update(self.run.step - bar.n)
        return stopped_by

    def step(self, step: int) -> dict:
        timer = StepTimer()
        self.memory_probe.ask(self.crew.roles())
        with timer("step"):
            with timer("wait"):
                rollout = self.stream.rollout(step)
            samples, verdicts, stale_metrics = filter_stale(rollout.samples, rollout.verdicts, self.run.policy, self.config.rollout.max_staleness)
            reward_metrics = {}
            for reward in self.stages.model_rewards:
                with timer(reward.span):
                    verdicts, more = reward.score(samples, verdicts)
                reward_metrics |= more
            with timer("advantages"):
                built = self.stages.batches.build(step, samples, verdicts, self.run.policy)
            learns = self.stages.schedule.language_model_learns(step)  # a surgery phase pauses GRPO
            learn_metrics = self.learn(step, built if learns else None, timer)
            if self.config.run.save_rollouts:
                self.run_dir.write_rollouts(step, built.samples, built.verdicts, built.advantages)
        trained_tokens = sum(map(len, built.batch.prompt_token_ids)) + sum(map(len, built.batch.completion_token_ids)) if learns else 0
        timer.seconds |= {"perf/generate_seconds": rollout.generate_seconds, "perf/verify_seconds": rollout.verify_seconds}
        return {
            "step": step,
            "policy_version": self.run.policy.version,
            "phase/index": float(self.stages.schedule.index(step)),
            **self.sample_metrics(samples, verdicts),
            **learn_metrics,
            **built.metrics,
            **rollout.metrics,
            **stale_metrics,
            **reward_metrics,
            **self.perf_metrics(timer, rollout, samples, trained_tokens),
            **{k: float(v) for k, v in self.crew.verifiers.stats.items()},
            **self.keeper.faults.totals(),
        }

    def learn(self, step: int, built: Built | None, timer: StepTimer) -> dict[str, float]:
        """The learner's update on the built batch, by its objective (None: the language model
        does not learn this step), then the new weights to the generators. In sleep mode the
        colocated generators hand the memory to the learner meanwhile, and the broadcast wakes
        them: the weights, the load, then the KV cache."""
        if self.config.generator.sleep_mode:
            with timer("generator_sleep"):
                self.crew.generators.sleep()
        learn_start = time.time()
        with timer("learn"):
            metrics = self.crew.learners.step(built.batch, built.objective) if built is not None and len(built.batch) else EMPTY_LEARN_METRICS
        self.timeline.append(("learn", step, learn_start, time.time()))
        self.run.policy = self.crew.learners.policy_version()
        with timer("weight_sync"):
            if built is not None:
                self.publish()
        if self.crew.generators.asleep:  # nothing was learned, nothing sent: woken whole
            with timer("generator_wake"):
                self.crew.generators.wake()
        return metrics

    def publish(self) -> None:
        """The new weights to the generators: in sync mode a broadcast that waits; in async
        mode a push behind the work each generator holds (confirmed by the next push)."""
        if self.stream.run_ahead:
            self.crew.push(self.run.policy)
        else:
            self.crew.broadcast(self.run.policy)

    def set_attention_scales(self, scales) -> None:
        """New attention scales (the surgeon's): a new policy version on the learners, sent to
        the generators like an adapter update."""
        self.run.policy = self.crew.learners.set_attention_scales(torch.as_tensor(scales, dtype=torch.float32))
        self.publish()

    # -- a step's metrics -----------------------------------------------------------------

    def sample_metrics(self, samples: list[Sample], verdicts: list[Verdict]) -> dict[str, float]:
        """The step's samples over all tasks and per task (several tasks), and the curricula
        moved by each task's accuracy."""
        by_task = task_metrics(samples, verdicts, "train")
        accuracy = {task: by_task[f"train/{task}/accuracy"] for task in self.tasks.tasks if f"train/{task}/accuracy" in by_task}
        difficulties = self.stream.update_curricula(accuracy)
        return {**sample_metrics(samples, verdicts, prefix="train"), **(by_task if len(self.tasks.tasks) > 1 else {}), **difficulties}

    def perf_metrics(self, timer: StepTimer, rollout: Rollout, samples: list[Sample], trained_tokens: int) -> dict[str, float]:
        """Spans, throughput, memory, and since the previous step ended: the share of the
        generators' time spent generating, the share of the learner's time spent learning, and
        the rollout steps waiting."""
        self.memory_probe.collect(timeout=0.5)
        tokens = sum(len(s.completion.token_ids) for s in samples)
        learn_seconds = timer.seconds["perf/learn_seconds"]
        now, since = time.time(), self._last_step_end
        self._last_step_end = now
        elapsed = max(1e-9, now - since)
        busy = self.crew.generators.busy_seconds(since, now) / (elapsed * len(self.crew.generators))
        return {
            **timer.seconds,
            "perf/generated_tokens_per_second": tokens / max(1e-9, timer.seconds["perf/generate_seconds"]),
            # prompt and completion tokens through the learner's forward and backward passes
            "perf/learner_tokens_per_second": trained_tokens / max(1e-9, learn_seconds),
            **self.memory_probe.metrics(),
            "perf/generator_busy_fraction": busy,
            "perf/learner_busy_fraction": learn_seconds / elapsed,
            "perf/learner_idle_fraction": 1.0 - learn_seconds / elapsed,
            "rollout/queue_depth": float(self.stream.depth()),
            **self.crew.generators.metrics(since, now),  # on a shared pool: this run's queue, share and waits there
        }

    # -- the end --------------------------------------------------------------------------

    def shutdown(self) -> None:
        self.stream.stop()
        for participant in self.stages.participants:
            participant.kill()
        self.crew.kill()
        self.placement.remove()


def progress(metrics: dict) -> dict:
    """The progress bar's fields for one step."""
    return {
        "v": metrics["policy_version"],
        "reward": f"{metrics['train/reward_mean']:.3f}",
        "acc": f"{metrics['train/accuracy']:.3f}",
        "s_step": f"{metrics['perf/step_seconds']:.1f}",
    }
