"""The driver: the training loop over generator, verifier and learner actors.

The run is wired by ``cluster.wiring`` and evaluated by ``cluster.evaluate``; this module is
the loop. ``step`` reads top to bottom: prompts -> generate -> verify -> advantages -> learn
-> broadcast. ``train`` reads the same way: the start (evaluation at step 0), the steps, each
followed by one ``after_step`` (held-out evaluation on its cadence, the health monitor and its
rollbacks, recording, the checkpoint cadence), and the end (last checkpoint, final weights).

With ``markovian.enabled`` the policy writes chains of thought of a fixed length, and the step
replaces the verifier's reward by the frozen model's log-prob of the answer given the CoT alone
(``cluster.markovian``, computed on the learner) before the advantages.

With a ``phases`` schedule that has a surgeon (``cluster.surgery``), an RLlib SAC agent changes
the policy's attention scales every ``surgeon.horizon`` steps of its phases and learns from the
reward after each change; GRPO's updates pause in ``surgery`` phases.

With ``memory.enabled`` the step banks its verified solutions (``rollout.memory``) before
building the batch: ``memory.feed_groups`` adds banked solutions to GRPO groups that have no
correct sample, and ``algorithm.objective=sft`` makes every step a self-improvement round that
fine-tunes on the bank instead of the rollouts (expert iteration / STaR).

Every sample carries its policy version and ``filter_stale`` checks it against the
learner's, so an asynchronous mode (generators ahead by a bounded number of versions) changes
the scheduling, not the contracts.

A run is reproducible step by step: each step's sampling seed is a function of the run's seed
and the step, so a run resumed from a checkpoint (``Trainer.resume``) continues exactly as the
uninterrupted run would have.

Faults cost steps, not the run: the generator pool replaces a failed generator and re-issues
its work itself; a lost learner rank (``LearnerFailure``) makes the driver build a new learner
group and continue from the newest checkpoint in the same process (``recover_learners``, up to
``learner.max_recoveries`` times); a pool that has lost its generators for good
(``GeneratorsLost``) stops the run with a checkpoint of the last finished step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from actors.generator import GeneratorsLost, WeightUpdateLost
from actors.learner import LearnerFailure
from actors.verifier import Scorer
from cluster.checkpoint import Checkpoint, CheckpointError, CheckpointStore
from cluster.config import SEEDS_PER_STEP, Config, dotted_items, load_config
from cluster.markovian import MarkovianReward
from cluster.evaluate import eval_sampling, evaluate, sample_metrics, task_metrics
from cluster.metrics import MetricsExporter
from cluster.footprint import MemoryProbe
from cluster.monitor import Event, Monitor, rules_from_config
from cluster.placement import check_model_on_nodes, place
from cluster.rundir import RunDir
from cluster.rollouts import DynamicSampling, RolloutProducer
from cluster.surgery import PhaseSchedule, Surgery
from cluster.wiring import build_tasks, init_ray, render, start_generators, start_learners, start_verifiers
from contracts import DEFAULT_ADAPTER, PolicyRef, Problem, Prompt, Sample, SamplingSettings, TrainBatch, Verdict
from learners.batch import build_train_batch, group_indices, standardisation_scales
from learners.learner import REQUIRED_METRICS
from rollout.engines import write_adapter
from rollout.memory import MemoryBank, Solution
from rollout.models import resolve_model, write_model
from rollout.queue import RolloutQueue
from rollout.staleness import filter_stale
from rewards.shaping import shape_overlong

logger = logging.getLogger(__name__)


# a step whose batch is empty (every group filtered) still reports the learner's keys
EMPTY_LEARN_METRICS = dict.fromkeys(REQUIRED_METRICS, float("nan"))


@dataclass
class PhaseTimer:
    seconds: dict[str, float] = field(default_factory=dict)

    @contextlib.contextmanager
    def __call__(self, phase: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[f"perf/{phase}_seconds"] = time.perf_counter() - start


class Trainer:
    """Owns the actors of one run and drives its steps."""

    def __init__(self, config: Config, run_dir: RunDir, scorer: Scorer | None = None):
        """``scorer`` replaces the configured reward (text, problem) -> Verdict, e.g. in tests."""
        self.config = config
        self.run_dir = run_dir
        c = config
        # the data first: a task without usable rows stops the run before any model is loaded
        self.tasks = build_tasks(c)
        self.tasks.check()
        self.model_path = str(resolve_model(c.model.path))
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        # chains of thought rewarded by the frozen model's answer log-prob (README: "Markovian")
        self.markovian = MarkovianReward(c, self.tokenizer, self.tasks) if c.markovian.enabled else None
        self.eval_prompts = {
            task_id: self.render(problems) for task_id, problems in self.tasks.eval_sets("validation").items()
        }
        init_ray(c)
        self.placement = place(c)
        try:
            check_model_on_nodes(self.model_path, self.placement.bundle_nodes())
            self.learners = start_learners(c, self.model_path, self.placement)
            self.generators = start_generators(c, self.model_path, self.placement)
            self.verifiers = start_verifiers(c, self.tasks, (lambda: scorer) if scorer else None)
            self.phases = PhaseSchedule(c.phases)
            # the SAC surgeon on the attention scales (README: "The SAC surgeon")
            self.surgery = Surgery(c.surgeon, self.learners.attention_scales(), c.run.seed) if self.phases.has_surgeon else None
        except BaseException:
            self.placement.remove()  # its actors go with it
            raise
        self.monitor = self.new_monitor()
        self.memory_probe = MemoryProbe()  # perf/peak_rss_gib/<role>
        self.memory = MemoryBank(c.memory) if c.memory.enabled else None  # verified solutions, per problem
        self.checkpoints = CheckpointStore(run_dir.checkpoints, c.run.keep_checkpoints)
        self.exporter: MetricsExporter | None = None  # opened by train(), once the run directory is settled
        self.policy = PolicyRef(DEFAULT_ADAPTER, 0)  # the learner's policy, served by every generator
        self.step_done = 0  # the last finished step (a resumed run starts after it)
        self.saved_step = 0  # the step of the last checkpoint written or restored
        self.lr_scale = 1.0  # product of the rollbacks' learning-rate factors
        self.rollbacks = 0
        self.learner_recoveries = 0
        self.start_data = self.tasks.state()  # where a run without a checkpoint starts again
        self.first_eval: dict = {}
        self.last_eval: dict = {}
        # rollouts: produced by a thread that runs up to `run_ahead` steps ahead (0 in sync mode)
        self.run_ahead = c.rollout.max_staleness if c.rollout.mode == "async" else 0
        self.last_step = c.run.steps
        self.rollouts: RolloutQueue | None = None
        self._next_learn_step = 0
        self.producer: RolloutProducer | None = None
        self.positions: dict[int, dict] = {}  # step -> data position before its prompts were drawn
        self._data_lock = threading.Lock()
        self.timeline: list[tuple[str, int, float, float]] = []  # (phase, step, start, end), wall clock
        self._last_step_end = time.time()
        self.broadcast()

    @classmethod
    def resume_or_start(cls, config: Config, scorer: Scorer | None = None) -> Trainer:
        """Continue the run in ``config.run.run_dir`` from its newest checkpoint that verifies
        (with the run's saved config, to ``run.steps``), or start it when there is none: the
        same command run again after a crash picks up where the run was (``raylight train
        --resume-if-exists``, what makes a job safe to retry)."""
        run_dir = RunDir(config.run.run_dir)
        checkpoint = CheckpointStore(run_dir.checkpoints).latest() if run_dir.config_path.is_file() else None
        if checkpoint is None:
            return cls(config, run_dir, scorer)
        saved = load_config(run_dir.config_path, [f"run.run_dir={run_dir.path}", f"run.steps={config.run.steps}"])
        given, kept = dotted_items(config), dotted_items(saved)
        changed = sorted(key for key, value in given.items() if key != "run.run_dir" and kept.get(key) != value)
        if changed:
            logger.warning("resuming %s with its saved config; this command's config differs in %s (ignored)", run_dir.path, changed)
        logger.info("%s holds a run with a checkpoint: resuming it", run_dir.path)
        return cls._continue(run_dir, saved, checkpoint, scorer)

    @classmethod
    def resume(cls, path: str | os.PathLike, steps: int | None = None, scorer: Scorer | None = None) -> Trainer:
        """A Trainer continuing the run in ``path`` from its newest checkpoint that verifies
        (to ``steps``, else to the configured number)."""
        run_dir = RunDir(path)
        if not run_dir.config_path.is_file():
            raise FileNotFoundError(f"{run_dir.path} is not a run directory: it has no config.yaml")
        checkpoint = CheckpointStore(run_dir.checkpoints).latest()
        if checkpoint is None:
            raise CheckpointError(f"no usable checkpoint in {run_dir.checkpoints}: start the run again with raylight train")
        overrides = [f"run.run_dir={run_dir.path}"] + ([f"run.steps={steps}"] if steps is not None else [])
        return cls._continue(run_dir, load_config(run_dir.config_path, overrides), checkpoint, scorer)

    @classmethod
    def _continue(cls, run_dir: RunDir, config: Config, checkpoint: Checkpoint, scorer: Scorer | None) -> Trainer:
        """A Trainer for the run in ``run_dir``, restored from ``checkpoint`` (already verified)."""
        trainer = cls(config, run_dir, scorer)
        trainer.restore(checkpoint)
        return trainer

    def new_monitor(self) -> Monitor | None:
        return Monitor(rules_from_config(self.config.monitor.rules)) if self.config.monitor.enabled else None

    @property
    def sampling(self) -> SamplingSettings:
        """A training step's sampling (a Markovian chain of thought: exactly cot_length tokens)."""
        if self.markovian is not None:
            return self.markovian.cot_sampling
        r = self.config.rollout
        return SamplingSettings(n=r.group_size, temperature=r.temperature, top_p=r.top_p, max_tokens=r.max_tokens, stop=tuple(r.stop))

    # -- phases ---------------------------------------------------------------------------

    def render(self, problems: list[Problem]) -> list[Prompt]:
        if self.markovian is not None:
            return self.markovian.render(problems)
        return render(self.tokenizer, self.tasks, problems)

    def draw(self, step: int, round: int = 0) -> list[Prompt]:
        """Step ``step``'s prompts (of its ``round``-th round with dynamic sampling), recording
        the data position before its first round (the rollout producer calls this, in step
        order; a checkpoint reads it)."""
        with self._data_lock:
            if round == 0:
                self.positions[step] = self.tasks.state()
            return self.render(self.tasks.sample(self.config.rollout.prompts_per_step))

    def sampling_seed(self, step: int) -> int:
        """The sampler's seed for ``step``: the same in every run of this seed, resumed or not."""
        return (self.config.run.seed * 1_000_003 + step) % 2**31 * SEEDS_PER_STEP

    def step_sampling(self, step: int, round: int = 0) -> SamplingSettings:
        """A round's sampling: its chunks' seeds (one per generator) follow the last round's."""
        seed = self.sampling_seed(step) + round * self.config.generator.num_generators
        return dataclasses.replace(self.sampling, seed=seed)

    def shape(self, samples: list[Sample], verdicts: list[Verdict]) -> list[Verdict]:
        r = self.config.reward
        return shape_overlong(samples, verdicts, self.config.rollout.max_tokens, r.overlong_buffer, r.overlong_penalty)

    @property
    def dynamic_sampling(self) -> DynamicSampling | None:
        ro = self.config.rollout
        return DynamicSampling(ro.prompts_per_step, ro.max_sampling_rounds) if ro.dynamic_sampling else None

    def generate(self, prompts: list[Prompt], sampling: SamplingSettings) -> list[Sample]:
        return self.generators.generate(prompts, sampling)

    def broadcast(self) -> None:
        """Send the learner's weights through the object store to every generator and wait
        for each to confirm them; fail fast (``WeightSyncError``)."""
        self.generators.broadcast(self.learners.weight_update_ref(), self.policy)

    def publish(self) -> None:
        """The new weights to the generators: in sync mode a broadcast that waits; in async
        mode a push behind the work each generator holds (confirmed by the next push)."""
        if self.run_ahead:
            self.generators.push(self.learners.weight_update_ref(), self.policy)
        else:
            self.broadcast()

    def start_rollouts(self, first_step: int) -> None:
        """The rollout queue and its producer thread, from ``first_step`` to ``last_step``."""
        self.stop_rollouts()
        self.rollouts = RolloutQueue(self.run_ahead, next_step=first_step)
        self.producer = RolloutProducer(
            self.rollouts, self.generators, self.verifiers, self.draw, self.step_sampling, first_step, self.last_step,
            shape=self.shape if self.config.reward.overlong_buffer > 0 else None, dynamic=self.dynamic_sampling,
        )
        self.producer.start()

    def stop_rollouts(self) -> None:
        if self.producer is not None:
            self.rollouts.close()
            self.producer.stop()
            self.producer = None
        self.positions.clear()

    def next_rollout(self, step: int):
        """Step ``step``'s verified samples. Everything before ``step`` is done (its
        evaluation, monitor and checkpoint too), so the producer may run ``run_ahead`` steps
        past it; a step out of the producer's order (a first step, a resumed run) restarts it."""
        if self.producer is None or step != self._next_learn_step or self.producer.last_step < self.last_step:
            self.last_step = max(self.last_step, step)
            self.start_rollouts(step)
        self._next_learn_step = step + 1
        self.rollouts.release(step - 1)
        return self.rollouts.get(step)

    # -- the step -------------------------------------------------------------------------

    def step(self, step: int) -> dict:
        timer = PhaseTimer()
        self.memory_probe.ask({"learners": self.learners.actors, "generators": self.generators.handles, "verifiers": self.verifiers.actors})
        with timer("step"):
            with timer("wait"):
                rollout = self.next_rollout(step)
            samples, verdicts, stale_metrics = filter_stale(rollout.samples, rollout.verdicts, self.policy, self.config.rollout.max_staleness)
            markovian_metrics = {}
            if self.markovian is not None:
                with timer("markovian_reward"):  # the frozen model's answer log-prob, on the learner
                    verdicts, markovian_metrics = self.markovian.score(samples, verdicts, self.learners, self.generators)
            banked = self.memory.write(samples, verdicts, step) if self.memory is not None else []
            with timer("advantages"):
                batch, trained, advantages, batch_metrics = self.train_batch(step, samples, verdicts, banked)
            if self.config.generator.sleep_mode:
                with timer("generator_sleep"):  # colocated: the learner takes the memory
                    self.generators.sleep()
            learns = self.phases.language_model_learns(step)  # a surgery phase pauses GRPO
            learn_start = time.time()
            with timer("learn"):
                learn_metrics = self.learners.step(batch, self.config.algorithm.objective) if learns and len(batch) else EMPTY_LEARN_METRICS
            self.timeline.append(("learn", step, learn_start, time.time()))
            if self.config.generator.sleep_mode:
                with timer("generator_wake"):
                    self.generators.wake()
            self.policy = self.learners.policy_version()
            with timer("weight_sync"):
                if learns:
                    self.publish()
            if self.config.run.save_rollouts:
                self.run_dir.write_rollouts(step, *trained, advantages)
        self.positions.pop(step, None)
        tokens = sum(len(s.completion.token_ids) for s in samples)
        self.memory_probe.collect(timeout=0.5)
        trained_tokens = sum(map(len, batch.prompt_token_ids)) + sum(map(len, batch.completion_token_ids)) if learns else 0
        timer.seconds |= {"perf/generate_seconds": rollout.generate_seconds, "perf/verify_seconds": rollout.verify_seconds}
        by_task = task_metrics(samples, verdicts, "train")
        accuracy = {task: by_task[f"train/{task}/accuracy"] for task in self.tasks.tasks if f"train/{task}/accuracy" in by_task}
        with self._data_lock:
            difficulties = self.tasks.update_curricula(accuracy)
        return {
            "step": step,
            "policy_version": self.policy.version,
            "phase/index": float(self.phases.index(step)),
            **sample_metrics(samples, verdicts, prefix="train"),
            **(by_task if len(self.tasks.tasks) > 1 else {}),
            **difficulties,
            **learn_metrics,
            **batch_metrics,
            **rollout.metrics,
            **stale_metrics,
            **markovian_metrics,
            **(self.memory.metrics() if self.memory is not None else {}),
            **timer.seconds,
            "perf/generated_tokens_per_second": tokens / max(1e-9, timer.seconds["perf/generate_seconds"]),
            # prompt and completion tokens through the learner's forward and backward passes
            "perf/learner_tokens_per_second": trained_tokens / max(1e-9, timer.seconds["perf/learn_seconds"]),
            **self.memory_probe.metrics(),
            **self.overlap_metrics(timer.seconds["perf/learn_seconds"]),
            **{k: float(v) for k, v in self.verifiers.stats.items()},
            **self.fault_counts(),
        }

    def train_batch(
        self, step: int, samples: list[Sample], verdicts: list[Verdict], banked: list[Solution]
    ) -> tuple[TrainBatch, tuple[list[Sample], list[Verdict]], list[float | None], dict[str, float]]:
        """The learner's batch for ``step``, the samples and verdicts the rollout file records
        (with the memory bank's replayed ones), their advantages (None: not trained on) and
        the batch's metrics. ``algorithm.objective=sft`` trains on the bank's solutions (or
        the ones ``banked`` this step), not on the rollouts."""
        if self.config.algorithm.objective == "sft":
            batch = self.memory.sft_batch(banked, self.sampling_seed(step))
            return batch, (samples, verdicts), [None] * len(samples), {"train/batch_size": float(len(batch))}
        if self.memory is not None and self.config.memory.feed_groups:
            samples, verdicts = self.memory.feed(samples, verdicts, self.policy, group_indices(samples))
        drop = self.config.algorithm.drop_zero_variance_groups or self.config.rollout.dynamic_sampling
        batch, advantages, metrics = build_train_batch(samples, verdicts, self.config.algorithm.advantage, drop)
        a = self.config.algorithm
        if a.actor_reward_weight > 0:  # each row's answer, its CoT context, and the chain rule's weight
            contexts, answers = self.markovian.answer_rows([s for s, adv in zip(samples, advantages) if adv is not None])
            weights = [a.actor_reward_weight * scale for scale in standardisation_scales(samples, verdicts, advantages, a.advantage)]
            batch = dataclasses.replace(batch, answer_prompt_token_ids=tuple(contexts), answer_token_ids=tuple(answers), answer_weights=tuple(weights))
        return batch, (samples, verdicts), advantages, metrics

    def fault_counts(self) -> dict[str, float]:
        """The run's running totals of absorbed actor faults (the monitor's actor_faults rule
        watches them)."""
        return {**self.generators.stats, "faults/learner_recoveries": float(self.learner_recoveries)}

    def overlap_metrics(self, learn_seconds: float) -> dict[str, float]:
        """Since the previous step ended: the share of the generators' time spent generating,
        the share of the learner's time spent learning, and the rollout steps waiting."""
        now, since = time.time(), self._last_step_end
        self._last_step_end = now
        elapsed = max(1e-9, now - since)
        busy = self.generators.busy_seconds(since, now) / (elapsed * len(self.generators))
        return {
            "perf/generator_busy_fraction": busy,
            "perf/learner_busy_fraction": learn_seconds / elapsed,
            "perf/learner_idle_fraction": 1.0 - learn_seconds / elapsed,
            "rollout/queue_depth": float(self.rollouts.depth()),
        }

    def evaluate(self) -> dict:
        """Greedy held-out metrics on each task's validation problems (never trained on; fixed
        at the start of the run, a curriculum's later difficulty does not change them); a
        Markovian run's own evaluation (intact and perturbed chains of thought)."""
        if self.markovian is not None:
            return self.markovian.evaluate(self.eval_prompts, self.learners, self.generators, self.verifiers)
        return evaluate(self.generators, self.verifiers, self.eval_prompts, eval_sampling(self.config))

    def train(self, steps: int) -> dict:
        """Run to step ``steps`` (from step 1, or after a restored checkpoint's step), with
        held-out evaluation at the start, every ``eval.every`` and at the end, a checkpoint
        every ``run.checkpoint_every`` steps and at the end."""
        self.last_step = steps
        self.open_run()
        stopped_by = self.stopped_by = None
        try:
            if self.step_done == 0:
                self.evaluate_at_start()
            with tqdm(desc="train", unit="step", dynamic_ncols=True, initial=self.step_done, total=steps) as bar:
                while self.step_done < steps and not self.stopped_by:
                    step = self.step_done + 1
                    if self.surgery is not None and self.phases.surgeon_acts(step):
                        last = min(step + self.config.surgeon.horizon - 1, self.phases.last_step(step, steps))
                        self.surgery.window(step, last, self.set_attention_scales, lambda s: self.run_step(s, steps, bar))
                    else:
                        self.run_step(step, steps, bar)
            stopped_by = self.stopped_by
        except GeneratorsLost as lost:
            self.stop_for_lost_generators(lost)
        self.close_run()
        return self.summary(stopped_by)

    def run_step(self, step: int, last_step: int, bar: tqdm) -> dict | None:
        """Step ``step`` and everything after it (``after_step``); its metrics, or None when it
        did not finish (the learners were rebuilt and the run went back) or stopped the run."""
        metrics = None
        try:
            metrics = self.step(step)
            self.stopped_by = self.after_step(step, last_step, metrics)
            bar.set_postfix(progress(metrics), refresh=False)
        except (LearnerFailure, WeightUpdateLost) as failure:
            self.recover_learners(failure, step)
            metrics = None
        bar.update(self.step_done - bar.n)
        return None if self.stopped_by else metrics

    def set_attention_scales(self, scales) -> None:
        """The surgeon's new attention scales: a new policy version on the learners, sent to
        the generators like an adapter update."""
        self.policy = self.learners.set_attention_scales(torch.as_tensor(scales, dtype=torch.float32))
        self.publish()

    def open_run(self) -> None:
        """Settle the run directory (a new run sets an earlier one aside) and open the exporter."""
        c = self.config
        if self.step_done == 0:
            previous = self.run_dir.set_aside_previous()
            if previous:
                logger.warning("%s held an earlier run: its files are now in %s (use raylight resume to continue a run)", self.run_dir.path, previous)
        self.run_dir.write_config(c)  # a resume may have changed run.steps
        (self.run_dir.path / "placement.json").write_text(json.dumps(self.placement.describe(), indent=2))
        self.exporter = MetricsExporter(self.run_dir, c.run.metrics_export, c.run.tensorboard)

    def evaluate_at_start(self) -> None:
        self.first_eval = self.evaluate() if self.config.eval.at_start else {}
        if self.first_eval:
            logger.info("step 0 held-out accuracy %.3f (n=%d)", self.first_eval["eval/accuracy"], self.first_eval["eval/n"])
            self.record({"step": 0, "policy_version": self.policy.version, **self.first_eval}, [])
        self.last_eval = self.first_eval

    def after_step(self, step: int, last_step: int, metrics: dict) -> Event | None:
        """Everything between two steps: held-out evaluation on its cadence, the health
        monitor (warn, stop, or roll back), recording, the checkpoint cadence. Returns the
        event that stops the run, if one does."""
        c = self.config
        evaluated = step == last_step or bool(c.eval.every and step % c.eval.every == 0)
        if evaluated:
            self.last_eval = self.evaluate()
            metrics |= self.last_eval
        events = self.monitor.observe(metrics) if self.monitor else []
        metrics |= {f"monitor/{e.rule}": 1.0 for e in events}
        stops = [e for e in events if e.action == "stop"]
        rollbacks = [e for e in events if e.action == "rollback"]
        if rollbacks and not stops and not self.rollback(rollbacks[0]):
            stops = rollbacks[:1]
        metrics["monitor/rollbacks"] = float(self.rollbacks)
        if self.surgery is not None:
            metrics |= self.surgery.take_pending()
            self.surgery.note_step(metrics)
        self.record(metrics, events)
        self.step_done = step
        if stops:
            logger.error("stopping at step %d: monitor rule %s: %s", step, stops[0].rule, stops[0].message)
            if not evaluated:
                self.last_eval = self.evaluate()
            return stops[0]
        every = c.run.checkpoint_every
        if every and step % every == 0 and step != last_step:
            self.save_checkpoint(step, evaluated)
        return None

    def close_run(self) -> None:
        """The last checkpoint (every last step is evaluated) and the trained policy."""
        self.stop_rollouts()
        if self.step_done > self.saved_step:
            self.save_checkpoint(self.step_done, True)
        self.save_final()
        self.exporter.close()

    def summary(self, stopped_by: Event | None) -> dict:
        return {
            "run_dir": str(self.run_dir.path),
            "policy_version": self.policy.version,
            "eval_accuracy_start": self.first_eval.get("eval/accuracy"),
            "eval_accuracy_end": self.last_eval.get("eval/accuracy"),
            "eval_n": self.last_eval.get("eval/n"),
            "stopped_by": None if stopped_by is None else {"step": stopped_by.step, "rule": stopped_by.rule, "message": stopped_by.message},
        }

    def record(self, metrics: dict, events: list[Event]) -> None:
        """A step's metrics and events: to the run directory, the Ray metrics, TensorBoard."""
        self.run_dir.append_metrics(metrics)
        self.run_dir.append_events(events)
        self.exporter.export(metrics)

    # -- checkpoints ----------------------------------------------------------------------

    def data_position(self, step: int) -> dict:
        """Where the data stream continues after ``step``: before the first prompts not yet
        trained on (those the producer drew ahead are drawn again after a resume)."""
        with self._data_lock:
            return self.positions.get(step + 1) or self.tasks.state()

    def save_checkpoint(self, step: int, evaluated: bool) -> Checkpoint:
        """Everything needed to continue after ``step`` exactly (see cluster.checkpoint)."""
        states = self.learners.state_dicts()
        files: dict = {"learner.pt": functools.partial(torch.save, states[0])}
        files |= {f"learner_rank{rank}.pt": functools.partial(torch.save, state) for rank, state in enumerate(states[1:], 1)}
        if self.config.model.train == "lora":
            update = self.learners.weight_update()
            files["adapter"] = functools.partial(write_adapter, update)
        trainer_state = {
            "step": step,
            "policy_version": self.policy.version,
            "lr_scale": self.lr_scale,
            "rollbacks": self.rollbacks,
            "data": self.data_position(step),
            "monitor": self.monitor.state() if self.monitor else None,
            "verifier": {k: v for k, v in self.verifiers.stats.items() if k in ("verifier/restarts", "verifier/retries", "verifier/infra_errors")},
            "faults": self.fault_counts(),
            "first_eval": self.first_eval,
            "last_eval": self.last_eval,
        }
        files["trainer.json"] = json.dumps(trainer_state, default=str).encode()
        if self.memory is not None:
            files["memory.json"] = json.dumps(self.memory.state()).encode()
        if self.surgery is not None:  # the agent (RLlib's checkpoint and replay buffer) and its environment
            surgery = self.surgery.state()
            files["surgeon.pkl"] = surgery["agent"]
            files["surgery.json"] = json.dumps({"phase": self.phases.index(step), **surgery["env"]}, default=str).encode()
        metric = self.last_eval.get(self.config.eval.best_metric) if evaluated else None
        checkpoint = self.checkpoints.save(step, files, metric)
        self.saved_step = step
        return checkpoint

    @staticmethod
    def _learner_states(checkpoint: Checkpoint) -> list[dict]:
        """Rank 0's state, then the further ranks' (our own checksummed files: tensors only)."""
        ranks = sorted(checkpoint.path.glob("learner_rank*.pt"), key=lambda p: int(p.stem.removeprefix("learner_rank")))
        return [torch.load(p, weights_only=True) for p in [checkpoint.file("learner.pt"), *ranks]]

    def restore(self, checkpoint: Checkpoint, fault_counts: bool = True) -> None:
        """Continue from ``checkpoint``: learners, data position, monitor, counters (the
        fault counters too, unless this process has been counting them: an in-process
        recovery); the metrics of later steps (a killed run's) are dropped, those steps run
        again."""
        state = json.loads(checkpoint.file("trainer.json").read_text())
        self.policy = self.learners.load_state_dicts(self._learner_states(checkpoint))
        self.tasks.load_state(state["data"])
        if self.memory is not None:
            self.memory = MemoryBank(self.config.memory)
            if checkpoint.file("memory.json").is_file():
                self.memory.load_state(json.loads(checkpoint.file("memory.json").read_text()))
        if self.monitor and state["monitor"]:
            self.monitor.load_state(state["monitor"])
        if self.surgery is not None and checkpoint.file("surgery.json").is_file():
            self.surgery.load_state(json.loads(checkpoint.file("surgery.json").read_text()), checkpoint.file("surgeon.pkl").read_bytes())
        self.verifiers.stats.update(state["verifier"])
        if fault_counts:
            self.generators.stats.update({k: v for k, v in state.get("faults", {}).items() if k in self.generators.stats})
            self.learner_recoveries = int(state.get("faults", {}).get("faults/learner_recoveries", 0))
        self.step_done, self.lr_scale, self.rollbacks = state["step"], state["lr_scale"], state["rollbacks"]
        self.saved_step = self.step_done
        self.first_eval, self.last_eval = state["first_eval"], state["last_eval"]
        dropped = self.run_dir.forget_after(self.step_done)
        self.broadcast()
        logger.info(
            "resumed from %s: step %d, policy %s%s", checkpoint.path, self.step_done, self.policy,
            f" ({dropped} metric rows of later steps dropped; those steps run again)" if dropped else "",
        )  # fmt: skip

    def restart(self) -> None:
        """Start the run again from step 0 with the learners as built (a lost learner group
        before the first checkpoint): the data from its start, a new monitor, the first
        evaluation kept."""
        self.policy = self.learners.policy_version()
        self.tasks.load_state(self.start_data)
        self.monitor = self.new_monitor()
        self.memory = MemoryBank(self.config.memory) if self.memory is not None else None
        self.step_done = self.saved_step = self.rollbacks = 0
        self.lr_scale = 1.0
        self.last_eval = self.first_eval
        self.run_dir.forget_after(0)
        if self.surgery is not None:  # a new learner group starts at identity scales
            self.surgery.rewind(self.learners.attention_scales())
        self.broadcast()

    # -- faults ---------------------------------------------------------------------------

    def recover_learners(self, failure: Exception, step: int) -> None:
        """A learner rank is lost: kill the group (its other ranks would wait on the lost one),
        build a new one in the same bundles, continue from the newest checkpoint (the steps
        since run again). After ``learner.max_recoveries`` recoveries, raise instead."""
        limit = self.config.learner.max_recoveries
        if self.learner_recoveries >= limit:
            raise LearnerFailure(f"{failure}; learner.max_recoveries={limit} recoveries are used up: stopping (raylight resume continues from the newest checkpoint)") from failure
        started = time.monotonic()
        logger.error("step %d: %s: rebuilding the learner group from the newest checkpoint", step, failure)
        self.stop_rollouts()
        self.learners.kill()
        self.learners = start_learners(self.config, self.model_path, self.placement)
        self.learner_recoveries += 1  # running totals survive the rewind (faults met during it included)
        checkpoint = self.checkpoints.latest()
        if checkpoint is None:
            self.restart()
        else:
            self.restore(checkpoint, fault_counts=False)
        event = Event(
            step, "learner_recovery", "warn", f"{failure}: learner group rebuilt from step {self.step_done} in {time.monotonic() - started:.0f}s; steps {self.step_done + 1}-{step} run again",
            {"faults/learner_recoveries": self.learner_recoveries, "resumed_at_step": self.step_done},
        )  # fmt: skip
        self.run_dir.append_events([event])

    def stop_for_lost_generators(self, lost: GeneratorsLost) -> None:
        """No generator to go on with: checkpoint the last finished step and raise, saying
        how to continue."""
        if self.step_done > self.saved_step:
            self.save_checkpoint(self.step_done, False)
        self.stop_rollouts()
        self.run_dir.append_events([Event(self.step_done + 1, "generators_lost", "stop", str(lost))])
        self.exporter.close()
        raise GeneratorsLost(
            f"{lost}. The run stopped after step {self.step_done}, checkpointed; continue it with `raylight resume {self.run_dir.path}` once generators can run"
        ) from lost

    def rollback(self, event: Event) -> bool:
        """Restore the newest good checkpoint before ``event`` with a lower learning rate;
        False (the run should stop) when there is none or the rollbacks are used up."""
        m = self.config.monitor
        checkpoint = self.checkpoints.latest(before_step=event.step)
        if checkpoint is None or self.rollbacks >= m.max_rollbacks:
            why = "no checkpoint before this step" if checkpoint is None else f"monitor.max_rollbacks={m.max_rollbacks} used up"
            event.message += f"; cannot roll back ({why}): stopping"
            return False
        state = json.loads(checkpoint.file("trainer.json").read_text())
        # old weights, served as a new version: versions only ever rise
        self.policy = self.learners.load_state_dicts(self._learner_states(checkpoint), policy_version=self.policy.version + 1)
        self.lr_scale *= m.rollback_lr_factor
        lr = self.learners.scale_lr(self.lr_scale / state["lr_scale"])
        self.rollbacks += 1
        if self.surgery is not None:  # the scales went back with the learner's state
            self.surgery.rewind(self.learners.attention_scales())
        self.broadcast()
        if self.monitor:
            self.monitor.active.discard(event.rule)  # a recurrence is a new event
        event.evidence |= {"rolled_back_to_step": checkpoint.step, "lr": lr}
        logger.error("monitor rule %s at step %d: rolled back to the checkpoint of step %d, learning rate now %.3g", event.rule, event.step, checkpoint.step, lr)
        return True

    def save_final(self) -> None:
        """The trained policy: a PEFT adapter folder, or a HF model folder (full weights),
        written here from tensors that came through the object store (a learner on another
        node has no path this driver could read)."""
        update = self.learners.weight_update(complete=True)
        if update.kind == "lora":
            write_adapter(update, self.run_dir.final_adapter)
        else:
            write_model(update, self.model_path, self.run_dir.final_adapter)

    def shutdown(self) -> None:
        self.stop_rollouts()
        if self.surgery is not None:
            self.surgery.kill()
        self.learners.kill()
        self.generators.kill()
        self.verifiers.kill()
        self.placement.remove()


def progress(metrics: dict) -> dict:
    """The progress bar's fields for one step."""
    return {
        "v": metrics["policy_version"],
        "reward": f"{metrics['train/reward_mean']:.3f}",
        "acc": f"{metrics['train/accuracy']:.3f}",
        "s_step": f"{metrics['perf/step_seconds']:.1f}",
    }
