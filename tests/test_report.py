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
