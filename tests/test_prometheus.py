"""The Prometheus side of metrics.jsonl (cluster.observe.metrics): each key's family and labels,
counters from running totals, base units, the run label, the Grafana dashboard's queries, and
Ray's real metric objects (they need no cluster: without one they record into nothing)."""

import json
import re
from pathlib import Path

import pytest

from cluster.keeping.rundir import RunDir
from cluster.observe.metrics import FAMILIES, FAMILY, ROUTES, MetricsExporter, PrometheusView, route, run_label

ROOT = Path(__file__).resolve().parent.parent

# keys of real runs' metrics.jsonl (a one-task run, a task mixture, markovian, distillation, a bank)
MAPPED = {
    "step": ("raylight_step", {}),
    "policy_version": ("raylight_policy_version", {}),
    "train/reward_mean": ("raylight_reward_mean", {"split": "train", "task": "all"}),
    "train/infix/reward_mean": ("raylight_reward_mean", {"split": "train", "task": "infix"}),
    "eval/accuracy": ("raylight_accuracy_ratio", {"split": "eval", "task": "all"}),
    "eval/brackets/accuracy": ("raylight_accuracy_ratio", {"split": "eval", "task": "brackets"}),
    "train/masked_share": ("raylight_masked_ratio", {"split": "train", "task": "all"}),
    "eval/infix/truncated_fraction": ("raylight_truncated_ratio", {"split": "eval", "task": "infix"}),
    "train/extraction_failed": ("raylight_extraction_failed_ratio", {"split": "train", "task": "all"}),
    "train/brackets/completion_length": ("raylight_completion_length_tokens", {"split": "train", "task": "brackets"}),
    "eval/logprob_mean": ("raylight_logprob_mean", {"split": "eval", "task": "all"}),
    "eval/n": ("raylight_samples", {"split": "eval", "task": "all"}),
    "train/infix/n": ("raylight_samples", {"split": "train", "task": "infix"}),
    "train/reward/correct": ("raylight_reward_component", {"split": "train", "task": "all", "component": "correct"}),
    "train/reward/capital/brief": ("raylight_reward_component", {"split": "train", "task": "all", "component": "capital/brief"}),
    "train/reward/teacher/reverse_kl": ("raylight_reward_component", {"split": "train", "task": "all", "component": "teacher/reverse_kl"}),
    "eval/infix/reward/correct_anchor": ("raylight_reward_component", {"split": "eval", "task": "infix", "component": "correct_anchor"}),
    "train/reward_errors/http": ("raylight_reward_errors_total", {"split": "train", "task": "all", "component": "http"}),
    "eval/reward_errors/http": ("raylight_reward_errors_total", {"split": "eval", "task": "all", "component": "http"}),
    "eval/markovian/swap/accuracy": ("raylight_markovian_accuracy_ratio", {"variant": "swap"}),
    "eval/markovian/intact/answer_logprob": ("raylight_markovian_answer_logprob", {"variant": "intact"}),
    "train/staleness/1": ("raylight_staleness_samples_total", {"lag": "1"}),
    "train/stale_dropped": ("raylight_stale_dropped_samples_total", {}),
    "train/skipped_steps": ("raylight_skipped_steps_total", {}),
    "train/skipped_updates": ("raylight_skipped_updates_total", {}),
    "perf/peak_rss_gib/learners": ("raylight_peak_rss_bytes", {"role": "learners"}),
    "perf/peak_rss_gib/all": ("raylight_peak_rss_bytes", {"role": "all"}),
    "perf/step_seconds": ("raylight_step_seconds", {}),
    "perf/weight_sync_seconds": ("raylight_span_seconds", {"span": "weight_sync"}),
    "perf/teacher_reward_seconds": ("raylight_span_seconds", {"span": "teacher_reward"}),
    "perf/generator_busy_fraction": ("raylight_busy_ratio", {"role": "generator"}),
    "perf/learner_busy_fraction": ("raylight_busy_ratio", {"role": "learner"}),
    "perf/learner_idle_fraction": ("raylight_learner_idle_ratio", {}),
    "perf/generated_tokens_per_second": ("raylight_tokens_per_second", {"role": "generator"}),
    "perf/learner_tokens_per_second": ("raylight_tokens_per_second", {"role": "learner"}),
    "faults/generator_restarts": ("raylight_faults_total", {"fault": "generator_restarts"}),
    "faults/learner_recoveries": ("raylight_faults_total", {"fault": "learner_recoveries"}),
    "faults/generator_seconds_lost": ("raylight_generator_lost_seconds_total", {}),
    "verifier/verdict/reward_error": ("raylight_verifier_verdicts", {"verdict": "reward_error"}),
    "verifier/restarts": ("raylight_verifier_restarts_total", {}),
    "verifier/retries": ("raylight_verifier_retries_total", {}),
    "verifier/infra_errors": ("raylight_verifier_infra_errors_total", {}),
    "verifier/size": ("raylight_verifier_actors", {}),
    "monitor/rollbacks": ("raylight_rollbacks_total", {}),
    "monitor/entropy_collapse": ("raylight_monitor_events_total", {"rule": "entropy_collapse"}),
    "bank/hits": ("raylight_bank_events_total", {"event": "hits"}),
    "sac/transitions": ("raylight_sac_transitions_total", {}),
    "teacher/restarts": ("raylight_teacher_restarts_total", {}),
    "task/infix/difficulty": ("raylight_task_difficulty", {"task": "infix"}),
}
# keys with no dimension and no unit to convert: a gauge named after the key, as before
PLAIN = ["train/kl", "train/entropy", "train/loss", "train/lr", "train/grad_norm", "train/ratio_max", "train/ratio_min",
         "train/clip_fraction", "train/logprob_mismatch", "train/staleness_mean", "train/staleness_max", "train/updates",
         "train/batch_size", "rollout/queue_depth", "phase/index", "sac/alpha", "surgery/scale_mean", "bank/size",
         "dynamic/shortfall", "teacher/seconds", "markovian/baselines_cached"]  # fmt: skip


def row_of_a_real_run(step: int) -> dict:
    """A step's row of a real run (raylight bench step on the tiny config), trimmed."""
    return {"step": step, "policy_version": step, "phase/index": 0.0, "train/masked_share": 0.0, "train/reward_mean": 0.25,
            "train/reward/correct": 0.0, "train/kl": 0.0, "train/lr": 0.001, "train/updates": 1.0, "train/skipped_steps": 0.0,
            "train/staleness_mean": 0.0, "train/stale_dropped": 0.0, "train/staleness/0": 16.0, "perf/wait_seconds": 2.6,
            "perf/step_seconds": 7.57, "perf/generated_tokens_per_second": 98.7, "perf/learner_tokens_per_second": 213.1,
            "perf/peak_rss_gib/driver": 0.725, "perf/peak_rss_gib/all": 4.256, "perf/generator_busy_fraction": 0.34,
            "perf/learner_idle_fraction": 0.40, "rollout/queue_depth": 0.0, "verifier/restarts": 0.0, "verifier/queue_depth": 16.0,
            "verifier/size": 1.0, "verifier/verdict/wrong": 16.0, "faults/generator_restarts": 0.0, "faults/generator_seconds_lost": 0.0,
            "eval/n": 16, "eval/accuracy": 0.0, "monitor/no_signal": 1.0, "monitor/rollbacks": 0.0}  # fmt: skip


@pytest.mark.parametrize("key", sorted(MAPPED))
def test_a_key_maps_to_its_family_and_labels(key):
    family, labels = route(key)
    assert (family.name, dict(labels)) == MAPPED[key]


def test_keys_without_a_dimension_stay_gauges_named_after_the_key():
    for key in PLAIN:
        family, labels = route(key)
        assert (family.name, family.kind, labels) == ("raylight_" + key.replace("/", "_"), "gauge", ()), key
        assert family.name not in FAMILY, key  # a fallback never takes a family of the table


def test_the_table_is_consistent():
    """Each route yields exactly its family's labels; counters, and only they, end in _total."""
    for r in ROUTES:
        assert r.family in FAMILY, r.pattern
        assert set(re.compile(r.pattern).groupindex) | set(r.fixed) == set(FAMILY[r.family].labels), r.pattern
    for family in FAMILIES:
        assert family.name.endswith("_total") == (family.kind != "gauge"), family.name
        assert any(r.family == family.name for r in ROUTES), family.name
        assert family.help and "\n" not in family.help


def test_running_totals_export_their_rise_and_never_fall():
    """bank hits 0, 2, 2, then 1 (a rollback rewound the bank to a checkpoint's count), then 3:
    the counter rises by 0, 2, 0, 0, 2 and ends at 4 = 2 before the rewind + 2 after it."""
    view = PrometheusView()
    rises = [view.points({"bank/hits": v})[0].value for v in (0.0, 2.0, 2.0, 1.0, 3.0)]
    assert rises == [0.0, 2.0, 0.0, 0.0, 2.0]
    assert sum(rises) == 4.0
    # two series of one family keep their own last values
    a, b = view.points({"faults/weight_reloads": 1.0, "faults/requests_reissued": 4.0})
    assert (a.labels, a.value, b.labels, b.value) == ({"fault": "weight_reloads"}, 1.0, {"fault": "requests_reissued"}, 4.0)


def test_a_resumed_run_counts_from_its_recorded_totals(tmp_path):
    """The checkpoint restores the totals (5 generator restarts); the new driver's counter must
    count only what happens after the resume, not the restored 5 again."""
    from cluster.observe.metrics import recorded_totals

    run_dir = RunDir(tmp_path)
    run_dir.append_metrics({"step": 1, "faults/generator_restarts": 2, "perf/peak_rss_gib/learner": 1.0})
    run_dir.append_metrics({"step": 2, "faults/generator_restarts": 5})
    totals = recorded_totals(run_dir.read_metrics())
    assert totals == {"faults/generator_restarts": 5.0}  # gauges are not totals
    view = PrometheusView(totals)
    assert [view.points({"faults/generator_restarts": v})[0].value for v in (5.0, 6.0)] == [0.0, 1.0]


def test_event_counts_are_added_as_they_come():
    """monitor/<rule> is 1.0 on the steps its rule fires and absent otherwise; train/staleness/<lag>
    counts the step's samples at that lag: each row adds its count."""
    view = PrometheusView()
    rows = [{"monitor/no_signal": 1.0, "train/staleness/0": 16.0}, {"train/staleness/0": 8.0, "train/staleness/1": 8.0}, {"monitor/no_signal": 1.0}]
    added = [[(p.family.name, p.labels, p.value) for p in view.points(row)] for row in rows]
    assert added == [
        [("raylight_monitor_events_total", {"rule": "no_signal"}, 1.0), ("raylight_staleness_samples_total", {"lag": "0"}, 16.0)],
        [("raylight_staleness_samples_total", {"lag": "0"}, 8.0), ("raylight_staleness_samples_total", {"lag": "1"}, 8.0)],
        [("raylight_monitor_events_total", {"rule": "no_signal"}, 1.0)],
    ]


def test_memory_is_exported_in_bytes():
    (point,) = PrometheusView().points({"perf/peak_rss_gib/learners": 1.5})
    assert (point.family.name, point.labels, point.value) == ("raylight_peak_rss_bytes", {"role": "learners"}, 1610612736.0)


def test_verdicts_missing_from_the_last_batch_read_zero():
    """The pool's last batch had wrong verdicts, the next one only correct ones: wrong is 0 now."""
    view = PrometheusView()
    view.points({"verifier/verdict/wrong": 16.0})
    points = view.points({"verifier/verdict/correct": 12.0, "verifier/verdict/timeout": 4.0, "train/kl": 0.1})
    verdicts = {p.labels["verdict"]: p.value for p in points if p.family.name == "raylight_verifier_verdicts"}
    assert verdicts == {"correct": 12.0, "timeout": 4.0, "wrong": 0.0}
    assert {p.family.name for p in view.points({"train/kl": 0.2})} == {"raylight_train_kl"}  # no verdicts: no zeros


def test_non_numbers_are_left_out():
    assert PrometheusView().points({"resumed_at_step": True, "note": "x", "train/kl": float("nan"), "eval/n": None}) == []


def test_the_run_label_is_unique_per_run_and_stable_across_a_resume(tmp_path):
    """Two run directories of one name, and a new run in a used directory, get labels of their
    own; a resume of a run (its metrics.jsonl is there) keeps the label."""
    first, elsewhere = RunDir(tmp_path / "a" / "default"), RunDir(tmp_path / "b" / "default")
    label = run_label(first.path)
    assert re.fullmatch(r"default-[0-9a-f]{8}", label) and label != run_label(elsewhere.path)
    first.append_metrics({"step": 1, "train/kl": 0.0})
    assert run_label(first.path) == label  # resumed
    assert MetricsExporter(first, ray_metrics=True).run == label
    first.set_aside_previous()  # a new run in the same directory
    relabel = run_label(first.path)
    assert relabel != label and relabel.startswith("default-")
    assert MetricsExporter(RunDir(tmp_path / "c"), ray_metrics=False).run == "c"  # no Ray metrics: no id file
    assert not (tmp_path / "c" / "run_id").exists()


class FakeMetric:
    """Records what the exporter asks of a ray.util.metrics Gauge or Counter."""

    made: list = []

    def __init__(self, name, description="", tag_keys=()):
        self.name, self.description, self.tag_keys, self.calls = name, description, tag_keys, []
        FakeMetric.made.append(self)

    def set(self, value, tags):
        self.calls.append(("set", value, tags))

    def inc(self, value, tags):
        assert value > 0  # what Ray's Counter.inc demands
        self.calls.append(("inc", value, tags))

    def _record(self, value, tags):
        self.calls.append(("record", value, tags))


def test_the_exporter_sends_gauges_and_counter_rises_tagged_with_the_run(tmp_path, monkeypatch):
    import ray.util.metrics

    gauges, counters = type("Gauge", (FakeMetric,), {}), type("Counter", (FakeMetric,), {})
    monkeypatch.setattr(ray.util.metrics, "Gauge", gauges)
    monkeypatch.setattr(ray.util.metrics, "Counter", counters)
    FakeMetric.made = []
    exporter = MetricsExporter(RunDir(tmp_path / "default"), ray_metrics=True)
    for step in (1, 2):
        exporter.export({"step": step, "perf/peak_rss_gib/driver": 0.5, "verifier/restarts": float(step - 1)})
    made = {m.name: m for m in FakeMetric.made}
    assert {n: type(m).__name__ for n, m in made.items()} == {"raylight_step": "Gauge", "raylight_peak_rss_bytes": "Gauge", "raylight_verifier_restarts_total": "Counter"}
    assert made["raylight_peak_rss_bytes"].tag_keys == ("run", "role")
    assert made["raylight_peak_rss_bytes"].description == FAMILY["raylight_peak_rss_bytes"].help
    run = exporter.run
    assert made["raylight_step"].calls == [("set", 1.0, {"run": run}), ("set", 2.0, {"run": run})]
    assert made["raylight_peak_rss_bytes"].calls[0] == ("set", 0.5 * 2**30, {"run": run, "role": "driver"})
    # 0 is recorded (the series exists from the first row), then the rise 1
    assert made["raylight_verifier_restarts_total"].calls == [("record", 0.0, {"run": run}), ("inc", 1.0, {"run": run})]
    exporter.close()


def test_rays_real_metrics_take_every_row(tmp_path):
    """Ray's own Gauge and Counter (no cluster needed) accept every family's tags and values."""
    exporter = MetricsExporter(RunDir(tmp_path / "default"), ray_metrics=True)
    rows = [row_of_a_real_run(1), {k: 1.0 for k in [*MAPPED, *PLAIN]}, row_of_a_real_run(2)]
    for row in rows:
        exporter.export(row)
    assert {"raylight_step", "raylight_faults_total", "raylight_train_kl"} <= set(exporter.metrics)
    exporter.close()
    from ray.util.metrics import Counter

    assert callable(getattr(Counter, "_record", None)), "the exporter records a counter's first 0 through Counter._record"


def produced_families() -> set[str]:
    """The Prometheus names the exporter produces for the keys of real runs (``ray_`` prefixed)."""
    return {"ray_" + route(key)[0].name for key in [*MAPPED, *PLAIN]} | {"ray_" + f.name for f in FAMILIES}


def test_the_dashboard_queries_only_families_the_exporter_produces_by_their_labels():
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "raylight-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    exprs += [v["query"]["query"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    produced = produced_families()
    selectors = [(name, body) for e in exprs for name, body in re.findall(r"\b(ray_raylight_\w+)\{([^}]*)\}", e)]
    selectors += [(name, "") for e in exprs for name in re.findall(r"\b(ray_raylight_\w+),", e)]  # label_values(name, run)
    assert len({name for name, _ in selectors}) >= 20
    for name, body in selectors:
        assert name in produced, f"the dashboard queries {name}, which the exporter does not produce"
        family = route_of(name)
        assert set(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", body)) <= {"run", *family.labels}, (name, body)
    for expr in exprs:
        for by in re.findall(r"by \(([^)]*)\)", expr):
            name = re.search(r"\b(ray_raylight_\w+)", expr).group(1)
            assert {w.strip() for w in by.split(",")} <= {"run", *route_of(name).labels}, expr
        for name in re.findall(r"\b(ray_raylight_\w+_total)\b", expr):
            assert re.search(rf"(increase|rate)\({name}\{{", expr), f"{expr}: a counter is read by its increase"
            # a resumed driver's counter is a second series of the run (Ray keeps the first): summed by run
            assert re.match(r"sum by \(run\b", expr), f"{expr}: a counter's series are summed by run"
        for pattern in re.findall(r'__name__=~"([^"]+)"', expr):
            assert any(re.fullmatch(pattern, name) for name in produced), pattern


def route_of(prometheus_name: str):
    name = prometheus_name.removeprefix("ray_")
    return FAMILY.get(name) or next(route(k)[0] for k in PLAIN if route(k)[0].name == name)


def test_the_user_page_lists_every_family():
    page = (ROOT / "docs" / "prometheus.md").read_text()
    missing = [f.name for f in FAMILIES if f"`{f.name}`" not in page]
    assert not missing, f"docs/prometheus.md does not list {missing}"


def test_tensorboard_keeps_the_metrics_jsonl_keys(tmp_path):
    exporter = MetricsExporter(RunDir(tmp_path / "default"), ray_metrics=False)
    scalars = []
    exporter.writer = type("Writer", (), {"add_scalar": lambda self, *a: scalars.append(a), "close": lambda self: None})()
    exporter.export({"step": 3, "perf/peak_rss_gib/driver": 0.5, "train/kl": 0.1, "note": "x"})
    assert scalars == [("perf/peak_rss_gib/driver", 0.5, 3), ("train/kl", 0.1, 3)]
    exporter.close()
