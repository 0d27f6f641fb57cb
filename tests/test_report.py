"""``raylight report`` on a run directory written by the test: a run whose held-out accuracy
rises on a known line, whose curriculum moves once, and whose ratio explodes at the end."""

from __future__ import annotations

import json

import pytest
import yaml

from cluster.commands.cli import main
from cluster.commands.report import forecast, periods


def write_run(folder, steps: int = 30) -> None:
    folder.mkdir()
    config = {
        "model": {"path": "smollm2", "train": "lora"}, "lora": {"rank": 16},
        "tasks": [{"name": "infix", "difficulty": 2, "weight": 1.0}],
        "algorithm": {"advantage": "grpo", "policy_loss": "ppo", "lr": 5e-5, "kl_coef": 0.0, "clip_eps_low": 0.2, "clip_eps_high": 0.28},
        "rollout": {"prompts_per_step": 8, "group_size": 8, "temperature": 0.7, "max_tokens": 48},
        "report": {"targets": {"eval/accuracy": 0.6, "train/reward_mean": 0.9}, "forecast_window": 10},
        "run": {"steps": steps, "seed": 0, "checkpoint_every": 10},
    }  # fmt: skip
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    rows = [{"step": 0, "policy_version": 0, "eval/accuracy": 0.1, "eval/reward_mean": 0.1}]
    for step in range(1, steps + 1):
        row = {
            "step": step, "policy_version": step, "train/reward_mean": 0.4 + 0.001 * (step % 2), "train/accuracy": 0.4,
            "train/loss": 0.1, "train/pg_loss": 0.1, "train/kl": None, "train/entropy": 0.8, "train/ratio_max": 1.3,
            "train/ratio_mean": 1.0, "train/ratio_min": 0.8, "perf/step_seconds": 30.0, "perf/generated_tokens_per_second": 400.0,
            "perf/weight_sync_seconds": 0.9, "task/infix/difficulty": 2.0 if step < 12 else 3.0,
        }  # fmt: skip
        if step % 5 == 0:
            row |= {"eval/accuracy": 0.1 + 0.01 * step, "eval/reward_mean": 0.1 + 0.01 * step}
        if step == 29:
            row["train/ratio_max"] = 40.0
        rows.append(row)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    event = {"step": 29, "rule": "ratio_explosion", "action": "warn", "message": "importance ratio max 40 is far past the clip range", "evidence": {"train/ratio_max": 40.0}}
    (folder / "events.jsonl").write_text(json.dumps(event) + "\n")


def test_report_writes_markdown_and_readable_plots(tmp_path, capsys):
    run = tmp_path / "run"
    write_run(run)
    assert main(["report", str(run)]) == 0
    report = (run / "report.md").read_text()
    for section in ("## Configuration", "## Curves", "## Periods", "## Events", "## Forecast", "## Suggestions"):
        assert section in report
    assert "held-out accuracy: 0.100 at step 0 -> 0.400 at step 30 (+30.0 points)" in report
    # eval accuracy rises 0.05 per evaluation (every 5 steps): 0.2 to go is 20 steps
    assert "`eval/accuracy` is 0.400 (trend +0.0100/step over the last 7 points), target 0.600: reached in about 20 more steps (95% interval: 20 to 20)" in report
    assert "`train/reward_mean` is 0.400" in report and "not reached at the current trend" in report
    assert "| 1-12 | start |" in report and "| 13-30 | infix difficulty 2 -> 3 |" in report  # the change applies from the next step
    assert "| 29 | ratio_explosion | warn |" in report and "tis_cap" in report
    pngs = sorted(p.name for p in (run / "plots").glob("*.png"))
    assert pngs == ["accuracy.png", "kl_entropy.png", "loss.png", "ratio.png", "reward.png", "throughput.png"]
    for png in pngs:
        data = (run / "plots" / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
        assert f"![{png[:-4]}](plots/{png})" in report


def test_forecast_interval_widens_with_noise_and_periods_split_at_rollbacks():
    rows = [{"step": s, "m": 0.1 + 0.01 * s + (0.03 if s % 2 else -0.03)} for s in range(1, 21)]
    f = forecast(rows, "m", 0.5, window=20)
    # the steps go from the fitted line at step 20 (0.1 + 0.01 * 20, up to the zigzag's pull on
    # the fit); the current value is the last one recorded
    fitted_now = 0.5 - f.steps * f.slope
    assert fitted_now == pytest.approx(0.3, abs=0.01) and f.current == rows[-1]["m"]
    assert f.low < f.steps < f.high
    assert forecast(rows[:2], "m", 0.5, window=20).sentence() == "`m`: fewer than 3 values, no trend to fit."
    events = [{"step": 7, "rule": "plateau", "evidence": {"rolled_back_to_step": 5}}]
    assert periods(rows, events) == [(1, 7, "start"), (8, 20, "rollback to step 5 (plateau)")]


def test_report_on_a_folder_without_metrics_names_it(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert f"{tmp_path} has no metrics.jsonl" in capsys.readouterr().err


def saturating_rows(last_step: int, plateau: float = 0.8) -> list[dict]:
    """A curve rising toward ``plateau`` (0.6 below it at step 1, the gap shrinking 10% a
    step), with a small alternating wobble."""
    import math

    return [{"step": s, "m": plateau - 0.6 * math.exp(-0.1 * (s - 1)) + (0.002 if s % 2 else -0.002)} for s in range(1, last_step + 1)]


def test_saturating_forecast_finds_the_plateau_and_when_the_target_is_reached():
    from cluster.commands.report import saturating_forecast

    # 0.8 - 0.6 exp(-0.1 (x - 1)) = 0.7 at x = 1 + 10 ln 6 = 18.9: 6.9 steps after step 12
    fit = saturating_forecast(saturating_rows(12), "m", 0.7, window=20)
    assert fit.plateau == pytest.approx(0.8, abs=0.03)
    assert fit.steps == pytest.approx(6.9, abs=1.0) and fit.low < fit.steps < fit.high
    above = saturating_forecast(saturating_rows(12), "m", 0.9, window=20)  # above the plateau: never
    assert above.steps is None and above.cell().endswith("below the target")
    assert saturating_forecast([{"step": s, "m": 0.1 + 0.01 * s} for s in range(1, 13)], "m", 0.7, window=20) is None  # no bend


def test_target_table_and_the_early_warning_when_a_metric_leaves_its_trend():
    from cluster.commands.report import off_forecast, outlook, target_table

    line = [{"step": s, "m": 0.1 + 0.01 * s + (0.003 if s % 2 else -0.003)} for s in range(1, 11)]
    assert off_forecast(line + [{"step": 11, "m": 0.21}], "m", window=10) is None
    dropped = line + [{"step": 11, "m": 0.12}]
    warning = off_forecast(dropped, "m", window=10)
    assert warning.step == 11 and warning.expected == pytest.approx(0.21, abs=0.005) and warning.value < warning.expected - warning.margin
    table = target_table([outlook(dropped, "m", 0.5, window=10)])
    assert table[0].startswith("| metric | current | target |") and table[2].endswith("| off its forecast |")
    plateau = target_table([outlook(saturating_rows(20, plateau=0.6), "m", 0.7, window=20)])[2]
    assert "plateau 0.60" in plateau and plateau.endswith("| plateaus below the target |")
    assert target_table([outlook(line, "m", 0.05, window=10)])[2].endswith("| reached |")


def write_history(folder, accuracy, target: float = 0.6, steps: int = 40) -> None:
    """A run directory with no events and one target, ``eval/accuracy`` (``accuracy(step)``,
    evaluated every 2 steps, with a small alternating wobble); ``train/kl`` is not recorded
    (kl_coef 0), so the KL panel has nothing to plot, as in the demo run."""
    folder.mkdir()
    (folder / "config.yaml").write_text(yaml.safe_dump({"report": {"targets": {"eval/accuracy": target}, "forecast_window": 20}}))
    rows = []
    for step in range(steps + 1):
        row = {"step": step, "policy_version": step, "train/reward_mean": 0.4, "train/entropy": 0.8, "train/kl": None}
        if step % 2 == 0:
            row["eval/accuracy"] = accuracy(step) + (0.004 if step % 4 else -0.004)
        rows.append(row)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def levelling_off(step: int) -> float:
    """Rises toward 0.54 (0.3 below it at step 0, the gap shrinking 8% a step): at step 40 the
    straight line through the window still climbs past 0.6, the curve never gets there."""
    import math

    return 0.54 - 0.3 * math.exp(-0.08 * step)


def sections(report: str) -> tuple[str, str]:
    """The report's forecast section and its suggestions section."""
    forecast_part, suggestions = report.split("## Forecast")[1].split("## Suggestions")
    return forecast_part, suggestions


def test_a_target_that_plateaus_below_is_said_in_the_table_the_forecast_and_the_suggestions(tmp_path):
    run = tmp_path / "run"
    write_history(run, levelling_off)
    assert main(["report", str(run)]) == 0
    forecast_part, suggestions = sections((run / "report.md").read_text())
    row = next(line for line in forecast_part.splitlines() if line.startswith("| `eval/accuracy`"))
    assert "plateau 0.54" in row and row.endswith("| plateaus below the target |")
    assert "reached in about" in forecast_part and "it plateaus below the target." in forecast_part  # the line climbs, the curve overrules it
    assert "**eval/accuracy** (plateaus below the target, target 0.6)" in suggestions
    assert "every target is reached or on its way" not in suggestions


def test_a_target_reached_is_said_reached_in_the_table_and_the_suggestions(tmp_path):
    run = tmp_path / "run"
    write_history(run, lambda step: 0.3 + 0.01 * step)  # 0.7 at step 40
    assert main(["report", str(run)]) == 0
    forecast_part, suggestions = sections((run / "report.md").read_text())
    row = next(line for line in forecast_part.splitlines() if line.startswith("| `eval/accuracy`"))
    assert row.endswith("| reached |") and "target 0.600: reached." in forecast_part
    assert suggestions.strip() == "- Nothing to fix: no monitor event, and every target is reached or on its way."


def test_the_suggestions_follow_every_status_of_the_table():
    from cluster.commands.report import STATUS_SUGGESTIONS, _suggestions, outlook, target_table

    cases = {
        "no data": [{"step": 1, "m": 0.1}],
        "reached": [{"step": s, "m": 0.1 + 0.01 * s} for s in range(1, 11)],
        "on track": [{"step": s, "m": 0.01 * s + (0.003 if s % 2 else -0.003)} for s in range(1, 11)],
        "not heading there": [{"step": s, "m": 0.3 - 0.01 * s + (0.003 if s % 2 else -0.003)} for s in range(1, 11)],
        "plateaus below the target": saturating_rows(20, plateau=0.6),
        "off its forecast": [{"step": s, "m": 0.1 + 0.01 * s + (0.003 if s % 2 else -0.003)} for s in range(1, 11)] + [{"step": 11, "m": 0.12}],
    }
    targets = {"reached": 0.15, "plateaus below the target": 0.7}
    for status, rows in cases.items():
        o = outlook(rows, "m", targets.get(status, 0.5), window=20)
        assert o.status == status and target_table([o])[2].endswith(f"| {status} |")
        said = _suggestions([], [o])
        if status in STATUS_SUGGESTIONS:
            assert said == [f"- **m** ({status}, target {o.line.target:g}): {STATUS_SUGGESTIONS[status]}"]
        else:
            assert said == ["- Nothing to fix: no monitor event, and every target is reached or on its way."]


@pytest.mark.parametrize("accuracy", [levelling_off, lambda step: 0.3 + 0.01 * step], ids=["plateau", "reached"])
def test_the_report_and_its_plots_emit_no_warning(tmp_path, accuracy, caplog, capfd):
    """matplotlib's "No artists with labels found to put in legend" is a UserWarning
    (``_api.warn_external``); older matplotlib logs it instead: both are watched, and stderr."""
    import logging
    import warnings

    run = tmp_path / "run"
    write_history(run, accuracy)
    caplog.set_level(logging.WARNING)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["report", str(run)]) == 0
    assert [str(w.message) for w in caught] == []
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert "legend" not in capfd.readouterr().err
    assert (run / "plots" / "kl_entropy.png").exists()  # the panel with nothing to plot was drawn


def test_several_runs_are_compared_side_by_side(tmp_path):
    """``raylight report A B``: one table naming what differs between the configs, each run's
    figures, and each curve overlaid with a line per run."""
    write_run(tmp_path / "low", steps=12)
    write_run(tmp_path / "high", steps=10)
    config = yaml.safe_load((tmp_path / "high" / "config.yaml").read_text())
    config["algorithm"]["lr"] = 3e-4
    (tmp_path / "high" / "config.yaml").write_text(yaml.safe_dump(config))
    assert main(["report", str(tmp_path / "low"), str(tmp_path / "high"), "--out", str(tmp_path / "both")]) == 0
    table = [line for line in (tmp_path / "both" / "comparison.md").read_text().splitlines() if line.startswith("|")]
    # differing keys only: algorithm.lr and run.steps, not the model or the rollout
    assert table[0].startswith("| run | algorithm.lr | run.steps | steps |") and "rollout" not in table[0]
    assert table[2].startswith("| low | 5e-05 | 12 | 12 |") and table[3].startswith("| high | 0.0003 | 10 | 10 |")
    assert "0.100 -> 0.200" in table[3] and "| 0.033 |" in table[2]  # held-out accuracy; 1 / 30 s steps per second
    plots = sorted(p.name for p in (tmp_path / "both" / "plots").iterdir())
    assert plots == ["eval_accuracy.png", "train_entropy.png", "train_loss.png", "train_reward_mean.png"]
    assert main(["report", str(tmp_path / "low"), str(tmp_path / "nothing")]) == 2  # not a run directory: named


def test_a_sweep_grid_expands_to_named_runs_and_refuses_a_malformed_item():
    from cluster.commands.sweep import expand, parse_grid

    grid = parse_grid(["algorithm.lr=1e-3,3e-3", "run.seed=1,2"])
    runs = expand(grid)
    assert [r.name for r in runs] == ["lr=1e-3,seed=1", "lr=1e-3,seed=2", "lr=3e-3,seed=1", "lr=3e-3,seed=2"]
    assert runs[1].overrides == ("algorithm.lr=1e-3", "run.seed=2")
    for bad in (["algorithm.lr"], ["algorithm.lr=1e-3,"], ["=1,2"]):
        with pytest.raises(ValueError, match="key=value1,value2"):
            parse_grid(bad)
    with pytest.raises(ValueError, match="twice"):
        parse_grid(["run.seed=1", "run.seed=2"])
