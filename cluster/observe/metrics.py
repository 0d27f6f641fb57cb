"""Every metric of ``metrics.jsonl`` as a Prometheus metric through Ray (and, if asked, in TensorBoard).

Ray's metrics API (``ray.util.metrics``) sends each value to the node's metrics agent, which
serves it in Prometheus format on the Ray metrics export port with a ``ray_`` prefix; the Ray
dashboard's metrics view (Grafana) and any Prometheus that scrapes the cluster see it (point
one at the port with deploy/prometheus.yml). docs/prometheus.md lists the families.

The Prometheus side follows Prometheus' naming conventions; metrics.jsonl keeps its keys.
``ROUTES`` maps a key to a family and labels, first match wins: the dimensions that keys spell
in their names become labels (``perf/peak_rss_gib/learners`` ->
``raylight_peak_rss_bytes{role="learners"}``), values are converted to base units (bytes,
seconds), and running totals become counters named ``..._total``. A key no route matches is a
gauge named after it (``train/kl`` -> ``raylight_train_kl``), so no metric is lost. Every
series carries ``run``: the run directory's name and an id kept in the directory
(``run_label``), unique per run and the same after a resume.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import re
import secrets
from pathlib import Path
from typing import Literal

logger = logging.getLogger(__name__)

PREFIX = "raylight_"
RUN_ID_FILE = "run_id"  # RUN_DIR/run_id: the id in the run label (run_label)

# gauge: the value as it is; total: a running total, sent to a counter by its rise since the
# last row; events: one row's count of events, added to a counter
Kind = Literal["gauge", "total", "events"]


@dataclasses.dataclass(frozen=True)
class Family:
    """A Prometheus metric family (Prometheus shows it as ``ray_<name>``)."""

    name: str
    kind: Kind
    labels: tuple[str, ...]
    help: str
    scale: float = 1.0  # metrics.jsonl's unit -> the base unit (GiB -> bytes: 2**30)
    breakdown: bool = False  # a row that has some of its series sets the ones it lacks to 0


def _sample_families() -> tuple[Family, ...]:
    """The summaries of scored samples (cluster.observe.samples): ``split`` is train (the
    step's samples) or eval (a held-out evaluation's); ``task`` is a task of a mixture, or
    ``all`` for the samples of every task."""
    by = ("split", "task")
    return (
        Family("raylight_reward_mean", "gauge", by, "mean reward of the valid samples"),
        Family("raylight_accuracy_ratio", "gauge", by, "share of the valid samples judged correct"),
        Family("raylight_masked_ratio", "gauge", by, "share of the samples masked (the verifier or a masking reward term failed on them)"),
        Family("raylight_truncated_ratio", "gauge", by, "share of the valid samples cut off at the completion length limit"),
        Family("raylight_extraction_failed_ratio", "gauge", by, "share of the valid samples whose answer the scorer could not find"),
        Family("raylight_completion_length_tokens", "gauge", by, "mean completion length of the valid samples"),
        Family("raylight_logprob_mean", "gauge", by, "mean log-prob (nats per token) of the valid samples' sampled tokens"),
        Family("raylight_samples", "gauge", by, "samples the row's summaries cover (eval/n, <split>/<task>/n)"),
        Family("raylight_reward_component", "gauge", (*by, "component"), "mean of one reward component over the valid samples"),
        Family("raylight_reward_errors_total", "events", (*by, "component"), "samples a reward term failed on (masked or not)"),
    )


FAMILIES: tuple[Family, ...] = (
    Family("raylight_step", "gauge", (), "the training step of the latest row (0: the evaluation before the first step)"),
    Family("raylight_policy_version", "gauge", (), "the learner's policy version after the step"),
    *_sample_families(),
    Family("raylight_markovian_accuracy_ratio", "gauge", ("variant",), "held-out accuracy with the chain of thought intact, truncated, deleted or swapped"),
    Family("raylight_markovian_answer_logprob", "gauge", ("variant",), "mean log-prob of the answer after the chain of thought, by variant"),
    Family("raylight_staleness_samples_total", "events", ("lag",), "the steps' samples by lag (policy versions behind the learner), dropped ones included"),
    Family("raylight_stale_dropped_samples_total", "events", (), "samples dropped for lagging more than rollout.max_staleness versions"),
    Family("raylight_skipped_steps_total", "total", (), "learner steps that applied no update"),
    Family("raylight_skipped_updates_total", "total", (), "optimizer updates skipped for a non-finite loss or gradient"),
    Family("raylight_step_seconds", "gauge", (), "wall-clock seconds of the step"),
    Family("raylight_span_seconds", "gauge", ("span",), "wall-clock seconds of one span of the step (wait, generate, verify, advantages, learn, weight_sync, ...)"),
    Family("raylight_busy_ratio", "gauge", ("role",), "share of the time since the previous step the generators spent generating, or the learner learning"),
    Family("raylight_learner_idle_ratio", "gauge", (), "share of the time since the previous step the learner did not learn"),
    Family("raylight_tokens_per_second", "gauge", ("role",), "generator: completion tokens per second of generation; learner: prompt and completion tokens per second of learning"),
    Family("raylight_peak_rss_bytes", "gauge", ("role",), "peak resident memory of one role's processes (role all: their sum)", scale=2**30),
    Family("raylight_faults_total", "total", ("fault",), "faults the run absorbed: generator restarts, reissued requests, weight reloads, learner recoveries"),
    Family("raylight_generator_lost_seconds_total", "total", (), "generation seconds lost to generator faults (the reissued requests' time)"),
    Family("raylight_verifier_verdicts", "gauge", ("verdict",), "verdicts of the verifier pool's last batch, by outcome", breakdown=True),
    Family("raylight_verifier_restarts_total", "total", (), "verifier actors restarted"),
    Family("raylight_verifier_retries_total", "total", (), "verifications retried after an infrastructure error"),
    Family("raylight_verifier_infra_errors_total", "total", (), "verifications still failing after their retries (the samples are masked)"),
    Family("raylight_verifier_queue_depth", "gauge", (), "items in the verifier pool's last batch"),
    Family("raylight_pool_queue_depth", "gauge", ("adapter",), "a shared generator pool: the run's requests waiting in the pool"),
    Family("raylight_pool_in_flight", "gauge", ("adapter",), "a shared generator pool: the run's requests on the generators"),
    Family("raylight_pool_busy_share_ratio", "gauge", ("adapter",), "a shared generator pool: the run's share of the generators' engine time since the last step"),
    Family("raylight_pool_wait_seconds", "gauge", ("adapter",), "a shared generator pool: mean seconds the run's recent requests waited before they were sent"),
    Family("raylight_pool_runs", "gauge", (), "a shared generator pool: runs attached"),
    Family("raylight_verifier_actors", "gauge", (), "verifier actors in the pool"),
    Family("raylight_verifier_executions_per_second", "gauge", (), "items the verifier pool's last batch verified per second"),
    Family("raylight_monitor_events_total", "events", ("rule",), "health-monitor rules that fired, by rule"),
    Family("raylight_rollbacks_total", "total", (), "rollbacks to an earlier checkpoint"),
    Family("raylight_bank_events_total", "total", ("event",), "the solution bank's solutions added (updates), replayed (hits), refused as duplicates, evicted"),
    Family("raylight_sac_transitions_total", "total", (), "transitions the surgeon's SAC has seen"),
    Family("raylight_sac_updates_total", "total", (), "the surgeon's SAC gradient updates"),
    Family("raylight_teacher_restarts_total", "total", (), "teacher actors restarted (distillation)"),
    Family("raylight_task_difficulty", "gauge", ("task",), "a curriculum task's difficulty level"),
)
FAMILY = {f.name: f for f in FAMILIES}


@dataclasses.dataclass(frozen=True)
class Route:
    """Keys that ``re.fullmatch`` ``pattern`` belong to ``family``; the named groups are label
    values (an optional group that did not match: ``all``), ``fixed`` the labels the key does
    not spell."""

    pattern: str
    family: str
    fixed: dict[str, str] = dataclasses.field(default_factory=dict)


SPLIT_TASK = r"(?P<split>train|eval)/(?:(?P<task>[^/]+)/)?"  # train/..., eval/infix/...
ROUTES: tuple[Route, ...] = (
    Route("step", "raylight_step"),
    Route("policy_version", "raylight_policy_version"),
    Route(SPLIT_TASK + "reward_errors/(?P<component>.+)", "raylight_reward_errors_total"),
    Route(SPLIT_TASK + "reward/(?P<component>.+)", "raylight_reward_component"),  # train/reward/capital/brief: component capital/brief
    Route("eval/markovian/(?P<variant>[^/]+)/accuracy", "raylight_markovian_accuracy_ratio"),
    Route("eval/markovian/(?P<variant>[^/]+)/answer_logprob", "raylight_markovian_answer_logprob"),
    Route(SPLIT_TASK + "reward_mean", "raylight_reward_mean"),
    Route(SPLIT_TASK + "accuracy", "raylight_accuracy_ratio"),
    Route(SPLIT_TASK + "masked_share", "raylight_masked_ratio"),
    Route(SPLIT_TASK + "truncated_fraction", "raylight_truncated_ratio"),
    Route(SPLIT_TASK + "extraction_failed", "raylight_extraction_failed_ratio"),
    Route(SPLIT_TASK + "completion_length", "raylight_completion_length_tokens"),
    Route(SPLIT_TASK + "logprob_mean", "raylight_logprob_mean"),
    Route(SPLIT_TASK + "n", "raylight_samples"),
    Route(r"train/staleness/(?P<lag>\d+)", "raylight_staleness_samples_total"),
    Route("train/stale_dropped", "raylight_stale_dropped_samples_total"),
    Route("train/skipped_steps", "raylight_skipped_steps_total"),
    Route("train/skipped_updates", "raylight_skipped_updates_total"),
    Route("perf/peak_rss_gib/(?P<role>.+)", "raylight_peak_rss_bytes"),
    Route("perf/step_seconds", "raylight_step_seconds"),
    Route("perf/(?P<span>.+)_seconds", "raylight_span_seconds"),
    Route("perf/(?P<role>generator|learner)_busy_fraction", "raylight_busy_ratio"),
    Route("perf/learner_idle_fraction", "raylight_learner_idle_ratio"),
    Route("perf/generated_tokens_per_second", "raylight_tokens_per_second", {"role": "generator"}),
    Route("perf/learner_tokens_per_second", "raylight_tokens_per_second", {"role": "learner"}),
    Route("faults/generator_seconds_lost", "raylight_generator_lost_seconds_total"),
    Route("faults/(?P<fault>.+)", "raylight_faults_total"),
    Route("verifier/verdict/(?P<verdict>.+)", "raylight_verifier_verdicts"),
    Route("verifier/restarts", "raylight_verifier_restarts_total"),
    Route("verifier/retries", "raylight_verifier_retries_total"),
    Route("verifier/infra_errors", "raylight_verifier_infra_errors_total"),
    Route("verifier/queue_depth", "raylight_verifier_queue_depth"),
    Route("pool/(?P<adapter>[^/]+)/queue_depth", "raylight_pool_queue_depth"),
    Route("pool/(?P<adapter>[^/]+)/in_flight", "raylight_pool_in_flight"),
    Route("pool/(?P<adapter>[^/]+)/busy_share", "raylight_pool_busy_share_ratio"),
    Route("pool/(?P<adapter>[^/]+)/wait_seconds", "raylight_pool_wait_seconds"),
    Route("pool/runs", "raylight_pool_runs"),
    Route("verifier/size", "raylight_verifier_actors"),
    Route("verifier/executions_per_second", "raylight_verifier_executions_per_second"),
    Route("monitor/rollbacks", "raylight_rollbacks_total"),
    Route("monitor/(?P<rule>.+)", "raylight_monitor_events_total"),
    Route("bank/(?P<event>updates|hits|duplicates|evictions)", "raylight_bank_events_total"),
    Route("sac/transitions", "raylight_sac_transitions_total"),
    Route("sac/updates", "raylight_sac_updates_total"),
    Route("teacher/restarts", "raylight_teacher_restarts_total"),
    Route("task/(?P<task>[^/]+)/difficulty", "raylight_task_difficulty"),
)


def gauge_name(key: str) -> str:
    """The family of a key no route matches: ``train/grad_norm`` -> ``raylight_train_grad_norm``."""
    return PREFIX + re.sub(r"[^a-zA-Z0-9_]", "_", key)


@functools.cache
def route(key: str) -> tuple[Family, tuple[tuple[str, str], ...]]:
    """The family of a metrics.jsonl key and its labels (in the family's order): the first
    route that matches, else a gauge named after the key."""
    for r in ROUTES:
        match = re.fullmatch(r.pattern, key)
        if match:
            family = FAMILY[r.family]
            labels = {name: value or "all" for name, value in match.groupdict().items()} | r.fixed
            return family, tuple((name, labels[name]) for name in family.labels)
    return Family(gauge_name(key), "gauge", (), f"raylight metric {key} (metrics.jsonl)"), ()


def run_label(path: Path) -> str:
    """``<run directory name>-<id>``: the id is made once and kept in ``RUN_DIR/run_id``, so a
    resumed run keeps its label while another run (elsewhere, or again here) gets its own.
    An id with no metrics.jsonl beside it belongs to a run set aside (a new run moves the
    earlier one's files, not this one) or to one that never recorded a row: a new id replaces it."""
    file = path / RUN_ID_FILE
    if not file.exists() or not (path / "metrics.jsonl").exists():
        file.write_text(secrets.token_hex(4) + "\n")
    return f"{path.name}-{file.read_text().strip()}"


@dataclasses.dataclass(frozen=True)
class Point:
    """One value for one series: a gauge's new value, or a counter's increment (never negative)."""

    family: Family
    labels: dict[str, str]
    value: float


def finite_number(value) -> bool:
    """A metric value a chart can draw: a finite int or float, not a bool."""
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


class PrometheusView:
    """metrics.jsonl rows as Prometheus points (no Ray here): each key's family and labels
    (``route``), its value in the base unit, and each running total's rise since the last row
    it was in. A total that fell was rewound (a rollback or a restart restores an earlier count;
    a rebuilt learner counts from 0): its counter holds, and counts the rises from there, so it
    never counts an event twice."""

    def __init__(self, totals: dict[str, float] | None = None):
        # key -> its last value (kind total); a resumed run starts from its recorded totals,
        # which its checkpoint restored, so only what happens after the resume is counted
        self.totals: dict[str, float] = dict(totals or {})
        self.seen: dict[str, set[tuple[tuple[str, str], ...]]] = {}  # breakdown family -> its series so far

    def points(self, metrics: dict) -> list[Point]:
        points = []
        for key, value in metrics.items():
            if finite_number(value):
                family, labels = route(key)
                points.append(Point(family, dict(labels), self._value(key, family, float(value) * family.scale)))
        return points + self._zeros(points)

    def _value(self, key: str, family: Family, value: float) -> float:
        if family.kind == "gauge":
            return value
        if family.kind == "events":
            return max(0.0, value)
        last, self.totals[key] = self.totals.get(key, 0.0), value
        return max(0.0, value - last)

    def _zeros(self, points: list[Point]) -> list[Point]:
        """0 for the series of a breakdown family seen before and missing from this row
        (a verdict of an earlier batch that the last batch had none of)."""
        now: dict[str, set] = {}
        for p in points:
            if p.family.breakdown:
                now.setdefault(p.family.name, set()).add(tuple(p.labels.items()))
        zeros = []
        for name, series in now.items():
            self.seen.setdefault(name, set()).update(series)
            zeros += [Point(FAMILY[name], dict(labels), 0.0) for labels in sorted(self.seen[name] - series)]
        return zeros


def recorded_totals(rows: list[dict]) -> dict[str, float]:
    """The last value of each running total (kind total) in a run's metrics rows: where a
    resumed run's totals start."""
    totals: dict[str, float] = {}
    for row in rows:
        totals |= {k: float(v) * route(k)[0].scale for k, v in row.items() if finite_number(v) and route(k)[0].kind == "total"}
    return totals


class MetricsExporter:
    """Sends each row to Ray's metrics (a Gauge or Counter per family, created on first sight,
    every series tagged with the run label) and writes TensorBoard scalars under the
    metrics.jsonl keys."""

    def __init__(self, run_dir, ray_metrics: bool = True, tensorboard: bool = False):
        path = Path(run_dir.path)
        self.ray_metrics = ray_metrics
        self.run = run_label(path) if ray_metrics else path.name
        self.view = PrometheusView(recorded_totals(run_dir.read_metrics()))
        self.metrics: dict[str, object] = {}  # family name -> ray.util.metrics Gauge or Counter
        self.writer = None
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter
            except ImportError as exc:
                raise RuntimeError("run.tensorboard needs the tensorboardX package (pip install tensorboardX)") from exc
            self.writer = SummaryWriter(str(path / "tensorboard"))

    def export(self, metrics: dict) -> None:
        if self.ray_metrics:
            for point in self.view.points(metrics):
                self._send(point)
        if self.writer is not None:
            step = int(metrics.get("step", 0))
            for key, value in metrics.items():
                if key != "step" and finite_number(value):
                    self.writer.add_scalar(key, value, step)

    def _send(self, point: Point) -> None:
        metric, tags = self._metric(point.family), {"run": self.run, **point.labels}
        if point.family.kind == "gauge":
            metric.set(point.value, tags=tags)
        elif point.value > 0:
            metric.inc(point.value, tags=tags)
        else:
            # Counter.inc refuses 0; recording 0 makes the series exist from its first row
            # (Prometheus: initialise counters), so increase() reads 0, not "no data". _record
            # is Ray's private method behind inc (ray 2.60, pinned): test_prometheus checks it.
            metric._record(0.0, tags=tags)

    def _metric(self, family: Family):
        if family.name not in self.metrics:
            from ray.util.metrics import Counter, Gauge

            kind = Gauge if family.kind == "gauge" else Counter
            self.metrics[family.name] = kind(family.name, description=family.help, tag_keys=("run", *family.labels))
        return self.metrics[family.name]

    def close(self, exit_code: int = 0) -> None:
        """Close the TensorBoard writer (``exit_code``: what the run ends with; the W&B sink
        records it, Prometheus has no place for it)."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None
