"""The run keeper: what happens between steps and is not the step.

- **Start or resume** (``resume_point``, ``saved_run``): the same command run again after a
  crash continues from the newest checkpoint that verifies, with the run's saved config;
- **after each step** (``after_step``): held-out evaluation on its cadence, the health monitor
  (warn, stop, or roll back), the participants (the surgery), recording, the checkpoint cadence;
- **save and restore**: a checkpoint is the learners' states, the run's counters (``RunState``,
  ``trainer.json``) and a loop over the ``Stateful`` parts (the monitor, the fault counters, the
  features' parts: the solution bank, the surgery), each writing its own files;
- **rollback** (a monitor rule's action): the newest good checkpoint before the event, with a
  lower learning rate, served as a new policy version (versions only ever rise);
- **learner recovery**: a lost learner rank rebuilds the group in the same bundles and continues
  from the newest checkpoint (or from the run's start), up to ``learner.max_recoveries`` times;
- **lost generators**: a checkpoint of the last finished step, then a stop that says how to go on;
- **the end**: the last checkpoint and the trained policy (``final_adapter``).

A run is reproducible step by step, so a resumed run continues exactly as the uninterrupted one
would have: the data stream restarts at the first prompts not yet trained on and each step's
sampling seed is a function of the run's seed and the step (``cluster.loop.rollouts``).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

from actors.generator import GeneratorsLost
from actors.learner import LearnerFailure, LearnerGroup
from cluster.config import Config, ConfigError, config_to_dict, dotted_items, load_config
from cluster.exits import ExitCode
from cluster.keeping.checkpoint import Checkpoint, CheckpointError, CheckpointStore
from cluster.keeping.learner_states import Gathered, LearnerStates
from cluster.keeping.rundir import RunDir
from cluster.observe.metrics import MetricsExporter
from cluster.observe.monitor import Event, Monitor, rules_from_config
from cluster.observe.wandb_logger import WandbLogger
from cluster.stages import Crew, ReadFile, Stages, Stateful
from contracts import DEFAULT_ADAPTER, PolicyRef
from rollout.engines import write_adapter
from rollout.models import write_model

logger = logging.getLogger(__name__)

RUN_FILE = "trainer.json"
VERIFIER_COUNTERS = ("verifier/restarts", "verifier/retries", "verifier/infra_errors")


@dataclass
class RunState:
    """The run's own counters; a checkpoint writes them as ``trainer.json`` (with the data
    position after its step)."""

    step: int = 0  # the last finished step (a resumed run starts after it)
    policy: PolicyRef = PolicyRef(DEFAULT_ADAPTER, 0)  # the learner's policy, served by every generator
    lr_scale: float = 1.0  # product of the rollbacks' learning-rate factors
    rollbacks: int = 0
    saved_step: int = 0  # the step of the last checkpoint written or restored (not saved)
    first_eval: dict = field(default_factory=dict)
    last_eval: dict = field(default_factory=dict)

    def to_json(self, data: dict) -> bytes:
        saved = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("policy", "saved_step")}
        return json.dumps({**saved, "policy_version": self.policy.version, "data": data}, default=str).encode()

    def load(self, saved: dict) -> None:
        """The counters of a checkpoint's ``trainer.json`` (the policy comes from the learners)."""
        self.step, self.lr_scale, self.rollbacks = saved["step"], saved["lr_scale"], saved["rollbacks"]
        self.saved_step = self.step
        self.first_eval, self.last_eval = saved["first_eval"], saved["last_eval"]


class DataStream(Protocol):
    """What the keeper needs of the rollout stream (``cluster.loop.rollouts.RolloutStream``)."""

    def stop(self) -> None: ...

    def position_after(self, step: int) -> dict: ...

    def seek(self, position: dict) -> None: ...


class MonitorPart:
    """The health monitor in a checkpoint (``monitor.json``)."""

    def __init__(self, monitor: Monitor):
        self.monitor = monitor

    def state(self) -> dict[str, bytes]:
        return {"monitor.json": json.dumps({"monitor": self.monitor.state()}, default=str).encode()}

    def load_state(self, read: ReadFile) -> None:
        saved = _json(read, "monitor.json", "monitor")
        if saved:
            self.monitor.load_state(saved)

    def rewind(self, learners: LearnerGroup, restart: bool) -> None:
        if restart:
            self.monitor.clear()


class FaultCounts:
    """The run's running totals of absorbed actor faults (the monitor's ``actor_faults`` rule
    watches them) and the verifier pool's counters, in a checkpoint (``faults.json``)."""

    def __init__(self, crew: Crew):
        self.crew = crew
        self.learner_recoveries = 0

    def totals(self) -> dict[str, float]:
        return {**self.crew.generators.stats, "faults/learner_recoveries": float(self.learner_recoveries)}

    def state(self) -> dict[str, bytes]:
        verifier = {k: v for k, v in self.crew.verifiers.stats.items() if k in VERIFIER_COUNTERS}
        return {"faults.json": json.dumps({"faults": self.totals(), "verifier": verifier}).encode()}

    def load_state(self, read: ReadFile) -> None:
        faults, verifier = _json(read, "faults.json", "faults") or {}, _json(read, "faults.json", "verifier") or {}
        self.crew.verifiers.stats.update(verifier)
        self.crew.generators.stats.update({k: v for k, v in faults.items() if k in self.crew.generators.stats})
        self.learner_recoveries = int(faults.get("faults/learner_recoveries", 0))

    def rewind(self, learners: LearnerGroup, restart: bool) -> None:
        """Running totals survive a rewind."""


def _json(read: ReadFile, name: str, key: str):
    """``key`` of the checkpoint's ``name``; a checkpoint written before the parts had files of
    their own keeps it in ``trainer.json``."""
    for file in (name, RUN_FILE):
        raw = read(file)
        if raw is not None and key in (saved := json.loads(raw)):
            return saved[key]
    return None


class RunKeeper:
    """Starts, checkpoints, restores, rolls back, recovers and closes one run (see the module
    docstring). ``start_learners()`` builds a new learner group in the run's bundles."""

    def __init__(
        self, config: Config, run_dir: RunDir, run: RunState, crew: Crew, stream: DataStream, stages: Stages, model_path: str, start_learners: Callable[[], LearnerGroup],
        learner_states: LearnerStates = Gathered(),
    ):  # fmt: skip
        """``learner_states``: how the learners' state is checkpointed (``cluster.keeping.learner_states``)."""
        self.config, self.run_dir, self.run, self.crew, self.stream, self.stages = config, run_dir, run, crew, stream, stages
        self.model_path, self.start_learners, self.learner_states = model_path, start_learners, learner_states
        self.monitor = Monitor(rules_from_config(config.monitor.rules)) if config.monitor.enabled else Monitor.off()
        self.faults = FaultCounts(crew)
        self.parts: tuple[Stateful, ...] = (MonitorPart(self.monitor), self.faults, *stages.parts)
        self.checkpoints = CheckpointStore(run_dir.checkpoints, config.run.keep_checkpoints)
        # where each step's metrics go besides metrics.jsonl: Ray metrics and TensorBoard, W&B;
        # opened by open(), once the run directory is settled
        self.sinks: list[MetricsExporter | WandbLogger] = []
        self.start_data = stream.position_after(0)  # where a run without a checkpoint starts again

    # -- the start and the end ----------------------------------------------------------------

    def open(self, placement: dict) -> None:
        """Settle the run directory (a new run sets an earlier one aside) and open the exporter."""
        if self.run.step == 0:
            previous = self.run_dir.set_aside_previous()
            if previous:
                logger.warning("%s held an earlier run: its files are now in %s (use raylight resume to continue a run)", self.run_dir.path, previous)
        self.run_dir.write_config(self.config)  # a resume may have changed run.steps
        (self.run_dir.path / "placement.json").write_text(json.dumps(placement, indent=2))
        self.sinks = [MetricsExporter(self.run_dir, self.config.run.metrics_export, self.config.run.tensorboard)]
        if self.config.run.wandb is not None:
            self.sinks.append(WandbLogger(self.config.run.wandb, self.run_dir.path, config_to_dict(self.config)))

    def evaluate_at_start(self) -> None:
        """A new run's held-out evaluation at step 0 (``eval.at_start``)."""
        if self.run.step == 0:
            self.run.first_eval = self.run.last_eval = self.stages.evaluator.evaluate() if self.config.eval.at_start else {}
        if self.run.step == 0 and self.run.first_eval:
            logger.info("step 0 held-out accuracy %.3f (n=%d)", self.run.first_eval["eval/accuracy"], self.run.first_eval["eval/n"])
            self.record({"step": 0, "policy_version": self.run.policy.version, **self.run.first_eval}, [])

    def close(self, exit_code: int = 0) -> None:
        """The last checkpoint (every last step is evaluated) and the trained policy;
        ``exit_code`` is what the command will exit with (a W&B run records it)."""
        self.stream.stop()
        if self.run.step > self.run.saved_step:
            self.save(self.run.step, True)
        self.save_final()
        self.close_sinks(exit_code)

    def close_sinks(self, exit_code: int) -> None:
        for sink in self.sinks:
            sink.close(exit_code)
        self.sinks = []

    def summary(self, stopped_by: Event | None) -> dict:
        """What the run did and why it stopped (``stopped_by`` None: it ran all its steps)."""
        return {
            "run_dir": str(self.run_dir.path),
            "policy_version": self.run.policy.version,
            "eval_accuracy_start": self.run.first_eval.get("eval/accuracy"),
            "eval_accuracy_end": self.run.last_eval.get("eval/accuracy"),
            "eval_n": self.run.last_eval.get("eval/n"),
            "stopped_by": None if stopped_by is None else {"step": stopped_by.step, "rule": stopped_by.rule, "message": stopped_by.message},
        }

    def save_final(self) -> None:
        """The trained policy: a PEFT adapter folder, or a HF model folder (full weights),
        written here from tensors that came through the object store (a learner on another
        node has no path this driver could read)."""
        update = self.crew.learners.weight_update(complete=True)
        if update.kind == "lora":
            write_adapter(update, self.run_dir.final_adapter)
        else:
            write_model(update, self.model_path, self.run_dir.final_adapter)

    # -- between two steps ------------------------------------------------------------------

    def after_step(self, step: int, last_step: int, metrics: dict) -> Event | None:
        """Everything between two steps: held-out evaluation on its cadence, the health
        monitor (warn, stop, or roll back), the participants, recording, the checkpoint
        cadence. Returns the event that stops the run, if one does."""
        every_eval = self.config.eval.every
        evaluated = step == last_step or bool(every_eval and step % every_eval == 0)
        if evaluated:
            self.run.last_eval = self.stages.evaluator.evaluate()
            metrics |= self.run.last_eval
        events = self.monitor.observe(metrics)
        metrics |= {f"monitor/{e.rule}": 1.0 for e in events}
        stops = [e for e in events if e.action == "stop"]
        rollbacks = [e for e in events if e.action == "rollback"]
        if rollbacks and not stops and not self.rollback(rollbacks[0]):
            stops = rollbacks[:1]
        metrics["monitor/rollbacks"] = float(self.run.rollbacks)
        for participant in self.stages.participants:
            metrics |= participant.after_step(step, metrics, stopping=bool(stops))
        self.record(metrics, events)
        self.run.step = step
        if stops:
            logger.error("stopping at step %d: monitor rule %s: %s", step, stops[0].rule, stops[0].message)
            if not evaluated:
                self.run.last_eval = self.stages.evaluator.evaluate()
            return stops[0]
        every = self.config.run.checkpoint_every
        if every and step % every == 0 and step != last_step:
            self.save(step, evaluated)
        return None

    def record(self, metrics: dict, events: list[Event]) -> None:
        """A step's metrics and events: to the run directory, the Ray metrics, TensorBoard."""
        self.run_dir.append_metrics(metrics)
        self.run_dir.append_events(events)
        for sink in self.sinks:
            sink.export(metrics)

    # -- checkpoints ----------------------------------------------------------------------

    def save(self, step: int, evaluated: bool) -> Checkpoint:
        """Everything needed to continue after ``step`` exactly (see cluster.keeping.checkpoint)."""
        files: dict = self.learner_states.files(self.crew.learners)
        if self.config.model.train == "lora":
            files["adapter"] = functools.partial(write_adapter, self.crew.learners.weight_update())
        files[RUN_FILE] = self.run.to_json(self.stream.position_after(step))
        for part in self.parts:
            files |= part.state()
        metric = self.run.last_eval.get(self.config.eval.best_metric) if evaluated else None
        checkpoint = self.checkpoints.save(step, files, metric)
        self.run.saved_step = step
        return checkpoint

    def restore(self, checkpoint: Checkpoint, parts: tuple[Stateful, ...] | None = None) -> None:
        """Continue from ``checkpoint``: learners, data position, run counters and ``parts``
        (default: all); the metrics of later steps (a killed run's) are dropped, those steps
        run again."""
        saved = json.loads(checkpoint.file(RUN_FILE).read_text())
        self.run.policy = self.learner_states.load(self.crew.learners, checkpoint)
        self.stream.seek(saved["data"])
        for part in self.parts if parts is None else parts:
            part.load_state(checkpoint.read)
        self.run.load(saved)
        dropped = self.run_dir.forget_after(self.run.step)
        self.crew.broadcast(self.run.policy)
        logger.info(
            "resumed from %s: step %d, policy %s%s", checkpoint.path, self.run.step, self.run.policy,
            f" ({dropped} metric rows of later steps dropped; those steps run again)" if dropped else "",
        )  # fmt: skip

    def restart(self) -> None:
        """Start the run again from step 0 with the learners as built (a lost learner group
        before the first checkpoint): the data from its start, the parts rewound to the start,
        the first evaluation kept."""
        self.run.policy = self.crew.learners.policy_version()
        self.stream.seek(self.start_data)
        for part in self.parts:
            part.rewind(self.crew.learners, restart=True)
        self.run.step = self.run.saved_step = self.run.rollbacks = 0
        self.run.lr_scale = 1.0
        self.run.last_eval = self.run.first_eval
        self.run_dir.forget_after(0)
        self.crew.broadcast(self.run.policy)

    def rollback(self, event: Event) -> bool:
        """Restore the newest good checkpoint before ``event`` with a lower learning rate;
        False (the run should stop) when there is none or the rollbacks are used up."""
        m = self.config.monitor
        checkpoint = self.checkpoints.latest(before_step=event.step)
        if checkpoint is None or self.run.rollbacks >= m.max_rollbacks:
            why = "no checkpoint before this step" if checkpoint is None else f"monitor.max_rollbacks={m.max_rollbacks} used up"
            event.message += f"; cannot roll back ({why}): stopping"
            return False
        saved = json.loads(checkpoint.file(RUN_FILE).read_text())
        # old weights, served as a new version: versions only ever rise
        self.run.policy = self.learner_states.load(self.crew.learners, checkpoint, policy_version=self.run.policy.version + 1)
        self.run.lr_scale *= m.rollback_lr_factor
        lr = self.crew.learners.scale_lr(self.run.lr_scale / saved["lr_scale"])
        self.run.rollbacks += 1
        for part in self.parts:
            part.rewind(self.crew.learners, restart=False)
        self.crew.broadcast(self.run.policy)
        self.monitor.active.discard(event.rule)  # a recurrence is a new event
        event.evidence |= {"rolled_back_to_step": checkpoint.step, "lr": lr}
        logger.error("monitor rule %s at step %d: rolled back to the checkpoint of step %d, learning rate now %.3g", event.rule, event.step, checkpoint.step, lr)
        return True

    # -- faults ---------------------------------------------------------------------------

    def recover_learners(self, failure: Exception, step: int) -> None:
        """A learner rank is lost: kill the group (its other ranks would wait on the lost one),
        build a new one in the same bundles, continue from the newest checkpoint (the steps
        since run again). After ``learner.max_recoveries`` recoveries, raise instead."""
        limit = self.config.learner.max_recoveries
        if self.faults.learner_recoveries >= limit:
            raise LearnerFailure(f"{failure}; learner.max_recoveries={limit} recoveries are used up: stopping (raylight resume continues from the newest checkpoint)") from failure
        started = time.monotonic()
        logger.error("step %d: %s: rebuilding the learner group from the newest checkpoint", step, failure)
        self.stream.stop()
        self.crew.learners.kill()
        self.crew.learners = self.start_learners()
        self.faults.learner_recoveries += 1  # running totals survive the rewind (faults met during it included)
        checkpoint = self.checkpoints.latest()
        if checkpoint is None:
            self.restart()
        else:
            self.restore(checkpoint, parts=tuple(p for p in self.parts if p is not self.faults))
        event = Event(
            step, "learner_recovery", "warn", f"{failure}: learner group rebuilt from step {self.run.step} in {time.monotonic() - started:.0f}s; steps {self.run.step + 1}-{step} run again",
            {"faults/learner_recoveries": self.faults.learner_recoveries, "resumed_at_step": self.run.step},
        )  # fmt: skip
        self.run_dir.append_events([event])

    def stop_for_lost_generators(self, lost: GeneratorsLost) -> None:
        """No generator to go on with: checkpoint the last finished step and raise, saying
        how to continue."""
        if self.run.step > self.run.saved_step:
            self.save(self.run.step, False)
        self.stream.stop()
        self.run_dir.append_events([Event(self.run.step + 1, "generators_lost", "stop", str(lost))])
        self.close_sinks(ExitCode.FAULTS)
        raise GeneratorsLost(
            f"{lost}. The run stopped after step {self.run.step}, checkpointed; continue it with `raylight resume {self.run_dir.path}` once generators can run"
        ) from lost


# -- where a run starts -----------------------------------------------------------------------


# keys a resumed run may take from the command line without --override: where it is, how far
# it goes, and whether a local cluster shows its dashboard
RESUMABLE_KEYS = ("run.run_dir", "run.steps", "cluster.dashboard")


def config_changes(saved: Config, given: Config) -> list[str]:
    """``key: saved -> given`` for each key ``given`` asks for otherwise than ``saved`` (beyond
    ``RESUMABLE_KEYS``). A key ``given`` leaves at its default is not asked for: a default that
    changed since the run was saved (a newer raylight) does not stop a retried job."""
    kept, asked, defaults = dotted_items(saved), dotted_items(given), dotted_items(Config())
    keys = sorted((set(kept) | set(asked)) - set(RESUMABLE_KEYS))
    changed = [key for key in keys if kept.get(key) != asked.get(key) and (key not in defaults or asked.get(key) != defaults[key])]
    return [f"{key}: {kept.get(key)!r} -> {asked.get(key)!r}" for key in changed]


def _resumable(config: Config) -> list[str]:
    """``RESUMABLE_KEYS`` of ``config`` as overrides: what a resuming command may set."""
    values = dotted_items(config)
    return [f"{key}={json.dumps(values[key])}" for key in RESUMABLE_KEYS]


def _check_changes(run_dir: RunDir, saved: Config, given: Config, override: bool) -> None:
    """A resume whose command line asks for another config than the saved one: an error naming
    the keys, or (``override``) a warning, the command line's values being used."""
    changes = config_changes(saved, given)
    if not changes:
        return
    if not override:
        raise ConfigError(
            f"{run_dir.path} holds a run whose saved config differs from this command's in {len(changes)} key(s): "
            f"{'; '.join(changes)}. Resume without them, or pass --override to continue the run with the new values"
        )
    logger.warning("resuming %s with this command's config, which changes %s (--override)", run_dir.path, "; ".join(changes))


def resume_point(config: Config, override: bool = False) -> tuple[RunDir, Config, Checkpoint | None]:
    """The run in ``config.run.run_dir`` and its newest checkpoint that verifies, with the
    run's saved config (to this command's ``run.steps``); no checkpoint: this config, from
    step 0. What makes ``raylight train --resume-if-exists`` safe to retry. A config that
    differs from the saved one is a ConfigError naming the keys, unless ``override``."""
    run_dir = RunDir(config.run.run_dir)
    checkpoint = CheckpointStore(run_dir.checkpoints).latest() if run_dir.config_path.is_file() else None
    if checkpoint is None:
        return run_dir, config, None
    saved = load_config(run_dir.config_path, _resumable(config))
    _check_changes(run_dir, saved, config, override)
    logger.info("%s holds a run with a checkpoint: resuming it", run_dir.path)
    return run_dir, (config if override else saved), checkpoint


def saved_run(path: str | os.PathLike, steps: int | None = None, overrides: tuple[str, ...] = (), override: bool = False) -> tuple[RunDir, Config, Checkpoint]:
    """The run in ``path``, its saved config (to ``steps``, else the configured number) and its
    newest checkpoint that verifies. ``overrides`` that change the saved config are a
    ConfigError naming them, unless ``override``: then the run continues with them."""
    run_dir = RunDir(path)
    if not run_dir.config_path.is_file():
        raise FileNotFoundError(f"{run_dir.path} is not a run directory: it has no config.yaml")
    checkpoint = CheckpointStore(run_dir.checkpoints).latest()
    if checkpoint is None:
        raise CheckpointError(f"no usable checkpoint in {run_dir.checkpoints}: start the run again with raylight train")
    fixed = [f"run.run_dir={run_dir.path}"] + ([f"run.steps={steps}"] if steps is not None else [])
    saved = load_config(run_dir.config_path, fixed)
    given = load_config(run_dir.config_path, [*overrides, *fixed]) if overrides else saved
    _check_changes(run_dir, saved, given, override)
    return run_dir, given, checkpoint
