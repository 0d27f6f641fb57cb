"""The health monitor on recorded metric sequences: every rule fires where the symptom starts,
with its evidence and action, and stays quiet on a healthy run."""

import math

import pytest

from cluster.observe.monitor import DEFAULT_RULES, Monitor, Rule


def healthy(step: int) -> dict:
    return {
        "step": step,
        "train/reward_mean": 0.2 + 0.5 * step / 100,
        "train/ratio_max": 1.25,
        "train/entropy": 0.9,
        "train/reward/repetition": 0.0,
        "train/logprob_mean": -0.6,
        "train/zero_variance_fraction": 0.2,
        "train/extraction_failed": 0.05,
        "train/updates": 1.0,
        "train/grad_norm": 0.4,
        "train/lr": 1e-5,
        "train/skipped_steps": 0.0,
        "train/skipped_updates": 0.0,
    }


def run(monitor: Monitor, rows: list[dict]) -> list:
    return [event for row in rows for event in monitor.observe(row)]


def test_a_healthy_run_raises_nothing():
    assert run(Monitor(), [healthy(s) for s in range(1, 101)]) == []


def test_ratio_explosion_then_4444_collapse():
    """The failure seen in a past run: at step ~1000 the importance ratio explodes, then the
    completions collapse into one repeated character and the entropy goes to zero."""
    rows = []
    for step in range(1, 1101):
        row = healthy(step) | {"train/reward_mean": 0.6}
        if step >= 995:
            row["train/ratio_max"] = 1.25 * 2 ** (step - 994)  # 2.5, 5, 10, 20, ...
        if step >= 1004:
            row["train/reward/repetition"] = min(1.0, 0.1 * (step - 1003))
            row["train/entropy"] = max(0.001, 0.9 - 0.1 * (step - 1003))
            row["train/logprob_mean"] = -0.6 - 0.5 * (step - 1003)
        rows.append(row)
    events = run(Monitor({"plateau": Rule("off")}), rows)
    first = {e.rule: e for e in reversed(events)}
    assert first["ratio_explosion"].step == 998 and first["ratio_explosion"].evidence == {"train/ratio_max": 20.0}
    assert first["repetition_collapse"].step == 1008 and "4444" in first["repetition_collapse"].message
    assert first["entropy_collapse"].step == 1012
    assert first["logprob_crash"].step == 1007  # -2.6 against a median of -0.6
    assert [e.rule for e in events].count("ratio_explosion") == 1  # one episode, one event


def test_plateau_fires_once_per_plateau():
    rows = [healthy(s) | {"train/reward_mean": 0.1 + 0.02 * s} for s in range(1, 21)]
    rows += [healthy(s) | {"train/reward_mean": 0.30 + 0.004 * (s % 2)} for s in range(21, 61)]
    events = run(Monitor(), rows)
    assert [(e.rule, e.step) for e in events] == [("plateau", 40)]
    assert events[0].evidence["window"] == 20


def test_non_finite_stops_the_run():
    rows = [healthy(1), healthy(2) | {"train/skipped_steps": 1.0}, healthy(3) | {"train/skipped_steps": 1.0, "train/reward_mean": math.nan}]
    events = run(Monitor(), rows)
    assert [(e.rule, e.step, e.action) for e in events] == [("non_finite", 2, "stop"), ("non_finite", 3, "stop")]
    assert events[0].evidence == {"train/skipped_steps": 1.0}


def test_no_signal_extraction_and_frozen_parameters():
    rows = [healthy(s) | {"train/zero_variance_fraction": 0.9} for s in range(1, 4)]
    assert [(e.rule, e.step) for e in run(Monitor(), rows)] == [("no_signal", 3)]
    assert [e.rule for e in run(Monitor(), [healthy(1) | {"train/extraction_failed": 0.7}])] == ["extraction_failures"]
    frozen = [healthy(1), healthy(2) | {"train/updates": 0.0}, healthy(3) | {"train/grad_norm": 0.0}, healthy(4) | {"train/lr": 0.0}]
    assert [(e.rule, e.step) for e in run(Monitor(), frozen)] == [("frozen_parameters", 4)]


def test_reward_hacking_and_grokking_read_the_evaluations():
    rows = []
    for step in range(1, 41):
        row = healthy(step) | {"train/reward_mean": 0.3 if step <= 10 else 0.6}
        if step % 10 == 0:
            row["eval/accuracy"] = {10: 0.50, 20: 0.40, 30: 0.41, 40: 0.40}[step]
        rows.append(row)
    events = run(Monitor({"plateau": Rule("off")}), rows)
    assert [(e.rule, e.step) for e in events] == [("reward_hacking", 20)]
    assert events[0].evidence == {"eval/accuracy": [0.5, 0.4], "train/reward_mean": [0.3, 0.6]}

    rows = [healthy(s) | ({"eval/accuracy": 0.20 + (0.01 if s % 20 else 0.0)} if s % 10 == 0 else {}) for s in range(1, 41)]
    rows.append(healthy(50) | {"eval/accuracy": 0.45})
    events = run(Monitor(), rows)
    assert [(e.rule, e.step) for e in events] == [("grokking", 50)]


def test_thresholds_actions_and_state_are_configurable():
    monitor = Monitor({"ratio_explosion": Rule("stop", threshold=2.0)})
    (event,) = monitor.observe(healthy(1) | {"train/ratio_max": 3.0})
    assert event.action == "stop"
    assert Monitor({"ratio_explosion": Rule("off")}).observe(healthy(1) | {"train/ratio_max": 99.0}) == []
    copy = Monitor()
    copy.load_state(monitor.state())
    assert copy.observe(healthy(2) | {"train/ratio_max": 3.0}) == []  # the same episode goes on
    assert len(copy.events) == 1
    with pytest.raises(ValueError, match="unknown monitor rules"):
        Monitor({"vibes": Rule()})
    assert set(DEFAULT_RULES) >= {"ratio_explosion", "plateau", "grokking"}


def test_masked_share_fires_when_high_overall_or_in_one_task_or_rising():
    """Masked samples (an infrastructure error in the verifier, left out of training) are a
    signal: a high share in a step, overall or in one task of a mixture, or a share creeping
    up over the run, whether the sandbox broke or samples learned to be left out."""
    quiet = [healthy(s) | {"train/masked_share": 0.01} for s in range(1, 31)]
    assert run(Monitor(), quiet) == []
    (event,) = Monitor().observe(healthy(1) | {"train/masked_share": 0.25})
    assert event.rule == "masked_share" and event.action == "warn" and event.evidence == {"train/masked_share": 0.25}
    (event,) = Monitor().observe(healthy(1) | {"train/masked_share": 0.04, "train/code/masked_share": 0.4, "train/infix/masked_share": 0.0})
    assert event.evidence == {"train/code/masked_share": 0.4} and "(train/code/masked_share)" in event.message
    creeping = [healthy(s) | {"train/masked_share": 0.0 if s <= 10 else 0.07} for s in range(1, 21)]
    events = run(Monitor(), creeping)
    assert [(e.rule, e.step) for e in events] == [("masked_share", 20)]
    assert events[0].evidence == {"train/masked_share": [0.0, 0.07]}
    stop = Monitor({"masked_share": Rule("stop", threshold=0.5)})
    assert stop.observe(healthy(1) | {"train/masked_share": 0.3}) == []
    assert [e.action for e in stop.observe(healthy(2) | {"train/masked_share": 0.6})] == ["stop"]
