"""Weights & Biases logging (``run.wandb``) in offline mode: the config, every step's metrics
against ``step``, the exit code, one W&B run across a resume. The W&B run file is read back
(``helpers.wandb_records``); nothing is sent anywhere. The whole loop's logging: test_resume's
rollback run, which logs offline too."""

from __future__ import annotations

import json
import math

import pytest

from cluster.config import ConfigError, load_config
from cluster.observe.wandb_logger import WandbLogger, WandbSettings, loggable
from helpers import wandb_history, wandb_records

pytest.importorskip("wandb", reason="the wandb extra (pip install 'raylight[wandb]') is part of the test dependencies")


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))  # no user settings, no login
    monkeypatch.delenv("WANDB_API_KEY", raising=False)


def test_loggable_keeps_finite_numbers_only():
    assert loggable({"step": 3, "a": 0.5, "b": None, "c": math.nan, "d": True, "e": "x", "f": math.inf}) == {"step": 3, "a": 0.5}


def test_offline_run_holds_the_config_and_each_steps_metrics(tmp_path):
    run_path = tmp_path / "run"
    settings = WandbSettings(project="raylight-test", name="first", tags=["t1"], mode="offline")
    sink = WandbLogger(settings, run_path, {"rollout": {"group_size": 4}})
    for step in (1, 2, 3):
        sink.export({"step": step, "train/reward_mean": step / 10, "eval/accuracy": None})
    sink.close(exit_code=4)

    records = wandb_records(run_path)
    run = next(r for kind, r in records if kind == "run").run
    assert (run.project, run.display_name, list(run.tags)) == ("raylight-test", "first", ["t1"])
    config = {u.key: json.loads(u.value_json) for u in run.config.update}
    assert config["rollout"] == {"group_size": 4}
    metric = [r.metric for kind, r in records if kind == "metric" and r.metric.glob_name == "*"]
    assert metric and metric[0].step_metric == "step"  # charted against the run's step, not W&B's counter
    assert wandb_history(run_path) == [{"step": s, "train/reward_mean": s / 10} for s in (1, 2, 3)]
    assert next(r for kind, r in records if kind == "exit").exit.exit_code == 4


def test_a_resumed_run_continues_the_same_wandb_run(tmp_path):
    run_path = tmp_path / "run"
    settings = WandbSettings(mode="offline")
    first = WandbLogger(settings, run_path, {})
    first.export({"step": 1, "x": 1.0})
    first.close()
    again = WandbLogger(settings, run_path, {})
    again.export({"step": 2, "x": 2.0})
    again.close()
    runs = [r.run for kind, r in wandb_records(run_path) if kind == "run"]
    assert {r.run_id for r in runs} == {(run_path / "wandb" / "run_id").read_text()}
    assert {r.display_name for r in runs} == {"run"}  # no name given: the run directory's
    assert [row["step"] for row in wandb_history(run_path)] == [1, 2]


def test_config_section_and_wrong_mode(tmp_path):
    config = load_config(None, ["run.wandb={project: p, mode: offline, tags: [a]}"])
    assert config.run.wandb == WandbSettings(project="p", mode="offline", tags=["a"])
    with pytest.raises(ConfigError, match=r"run.wandb.mode: 'cloud' is not one of \['online', 'offline', 'disabled'\]"):
        load_config(None, ["run.wandb={mode: cloud}"])
