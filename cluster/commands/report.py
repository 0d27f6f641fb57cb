"""``raylight report RUN_DIR``: a write-up of a run, from its config, metrics and events.

It writes RUN_DIR/report.md and PNG plots in RUN_DIR/plots/: the configuration; the headline
numbers; curves of reward, accuracy (train and held-out), loss, KL, entropy, the importance
ratio, throughput and weight-sync latency, with the monitor's events marked; the run's periods
(split where the phase schedule moved on, a curriculum changed a task's difficulty or a rollback
restored a checkpoint); the events with their evidence; a forecast per target
metric (``report.targets``), as a table: a straight line fitted to the recent window (the step
at which it reaches the target, a 95% interval from the slope's standard error) beside a
saturating curve (its plateau, and when it reaches the target, with an interval drawn from the
fit's covariance), and an early warning when the last value falls below the prediction
interval of the line through the values before it; and suggestions drawn from the events and
the forecasts.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml

from cluster.keeping.rundir import RunDir

logger = logging.getLogger(__name__)

# what to try when a rule fired: the levers a verl / OpenRLHF user would reach for
SUGGESTIONS = {
    "ratio_explosion": "The importance ratio exploded: lower `algorithm.lr`, cap the ratio (`algorithm.tis_cap: 2.0`, `algorithm.dual_clip_c: 3.0`), use fewer `algorithm.ppo_epochs`, or a smaller `rollout.max_staleness`.",
    "logprob_crash": "Sampled log-probs crashed: the policy is drifting toward low-probability text; lower `algorithm.lr` or raise `algorithm.kl_coef`, and read the rollouts of the steps in the event.",
    "repetition_collapse": "Completions collapsed into repetition: raise `algorithm.kl_coef`, add `algorithm.entropy_coef: 0.001`, lower `algorithm.lr`; a `rollback` action on this rule restores the last good checkpoint automatically.",
    "entropy_collapse": "Entropy collapsed: the policy stopped exploring. Try `algorithm.clip_eps_high: 0.28` (clip-higher), `algorithm.entropy_coef`, or a higher `rollout.temperature`.",
    "non_finite": "Non-finite values appeared: check the reward function for NaN/Inf, lower `algorithm.lr`, keep `algorithm.max_grad_norm` at 1.0.",
    "plateau": "Training reward plateaued: the tasks may be too easy or too hard for the model; enable a curriculum (`tasks[].curriculum.enabled`), raise `rollout.group_size`, or revisit the learning rate.",
    "no_signal": "Most groups had one reward for every sample (no learning signal): raise `rollout.group_size`, choose problems of the model's level (curriculum), or set `algorithm.drop_zero_variance_groups: true` to save compute.",
    "extraction_failures": "Many answers could not be extracted: check the prompt template and system prompt, the stop strings (`rollout.stop`) and `rollout.max_tokens` (truncated answers), and `reward.extraction`.",
    "reward_hacking": "Training reward rose while held-out accuracy fell: read the rollouts for a shortcut the reward pays for, tighten the reward (`reward.required_format`, weights), raise `algorithm.kl_coef`, and keep the best checkpoint (`checkpoints/best`).",
    "frozen_parameters": "No update reached the weights: check `algorithm.lr` (and its schedule), skipped steps (non-finite values) and groups filtered for zero variance.",
    "grokking": "Held-out accuracy jumped after a plateau: a late improvement, keep training past the plateau in similar runs.",
    "bank_empty": "The solution bank stayed empty: no verdict reached `bank.threshold`. Read the rollouts' rewards, lower the threshold (a partial-credit scorer), or start from easier problems (a curriculum).",
}

CURVES = [
    # file, title, y label, [(metric, label)], second panel (title, y label, metrics) or None
    ("reward.png", "Reward", "mean reward per sample", [("train/reward_mean", "train (sampled)"), ("eval/reward_mean", "held-out (greedy)")], None),
    ("accuracy.png", "Accuracy", "accuracy (fraction correct)", [("train/accuracy", "train (sampled)"), ("eval/accuracy", "held-out (greedy)")], None),
    ("loss.png", "Loss", "loss", [("train/loss", "total loss"), ("train/pg_loss", "policy-gradient loss"), ("train/sft_loss", "supervised NLL")], None),
    ("kl_entropy.png", "KL to the reference", "KL (nats per token)", [("train/kl", "KL"), ("train/kl_old", "KL of the sampler")],
     ("Entropy", "entropy (nats per token)", [("train/entropy", "entropy")])),
    ("ratio.png", "Importance ratio", "ratio new / old policy", [("train/ratio_max", "max"), ("train/ratio_mean", "mean"), ("train/ratio_min", "min")], None),
    ("bank.png", "Solution bank", "verified solutions", [("bank/size", "banked"), ("bank/updates", "written (total)"), ("bank/hits", "fed into groups (total)")], None),
    ("markovian.png", "Answer log-prob given the CoT (training)", "log p(answer | CoT), summed over its tokens",
     [("train/reward/answer_logprob", "frozen model"), ("train/reward/actor_answer_logprob", "policy"), ("train/reward/baseline_logprob", "frozen model after its own CoT'")],
     ("Held-out: the CoT intact and perturbed", "log p(answer | CoT)",
      [("eval/markovian/intact/answer_logprob", "intact"), ("eval/markovian/delete/answer_logprob", "characters deleted"),
       ("eval/markovian/truncate/answer_logprob", "truncated"), ("eval/markovian/swap/answer_logprob", "another question's CoT")])),
    ("surgeon.png", "Surgeon (SAC) losses", "loss", [("sac/critic_loss", "critic (Q) loss"), ("sac/actor_loss", "actor loss")],
     ("Surgery", "per action", [("surgery/action_magnitude", "action magnitude (mean |change of a scale|)"), ("surgery/reward_improvement", "reward improvement")])),
    ("surgeon_q.png", "Surgeon (SAC) critic", "Q", [("sac/q_mean", "mean Q"), ("sac/q_max", "max Q"), ("sac/q_min", "min Q")],
     ("Surgeon (SAC) temperature and entropy", "value", [("sac/alpha", "alpha (temperature)"), ("sac/entropy", "policy entropy")])),
    ("episodes.png", "Turns per episode", "turns", [("train/turns_mean", "train (mean)"), ("train/turns_max", "train (max)"), ("eval/turns_mean", "held-out (mean)")],
     ("Tool calls", "per episode (truncated: share of episodes)", [("train/tool_calls", "tool calls"), ("train/tool_errors", "tool errors"),
      ("train/tool_timeouts", "tool time-outs"), ("train/episodes_truncated", "truncated (out of turns or tokens)")])),
    ("reward_by_turns.png", "Reward by number of turns (training)", "mean reward", [(f"train/reward_by_turns/{k}", f"{k} turn{'s' if k > 1 else ''}") for k in range(1, 9)],
     ("Tool time", "seconds per episode", [("train/tool_seconds", "tool seconds")])),
    ("throughput.png", "Throughput", "tokens per second", [("perf/generated_tokens_per_second", "generated tokens/s"), ("perf/learner_tokens_per_second", "learner tokens/s (prompt + completion)")],
     ("Weight-sync latency", "seconds per broadcast", [("perf/weight_sync_seconds", "weight sync")])),
    ("peak_memory.png", "Peak memory per process role", "GiB (sum of the role's processes' peak RSS)",
     [(f"perf/peak_rss_gib/{role}", role) for role in ("all", "learners", "generators", "verifiers", "driver", "ray")], None),
]  # fmt: skip


NOT_RECORDED = {
    "train/kl": "not computed: algorithm.kl_coef is 0 (no reference pass)",
    "train/ratio_max": "no ratio recorded (policy_loss pg has none)",
}


@dataclass
class Forecast:
    metric: str
    target: float
    current: float | None
    slope: float | None  # per step
    steps: float | None  # steps from the last one until the line reaches the target (0: reached)
    low: float | None  # 95% interval of ``steps``; None high = not reached at any plausible slope
    high: float | None
    points: int

    def sentence(self) -> str:
        if self.current is None:
            return f"`{self.metric}`: fewer than 3 values, no trend to fit."
        head = f"`{self.metric}` is {self.current:.3f} (trend {self.slope:+.4f}/step over the last {self.points} points), target {self.target:.3f}:"
        if self.steps == 0:
            return f"{head} reached."
        if self.steps is None:
            return f"{head} not reached at the current trend (flat or moving away)."
        interval = f"{self.low:.0f} to {self.high:.0f}" if self.high is not None else f"at least {self.low:.0f}, possibly never"
        return f"{head} reached in about {self.steps:.0f} more steps (95% interval: {interval})."


@dataclass(frozen=True)
class _Line:
    """A least-squares line through (x, y) points: y = intercept + slope * x; ``s`` is the
    residual standard deviation (n - 2 degrees of freedom)."""

    slope: float
    intercept: float
    s: float
    n: int
    mean_x: float
    sxx: float

    @classmethod
    def fit(cls, xs: list[float], ys: list[float]) -> _Line:
        n, mean_x, mean_y = len(xs), statistics.mean(xs), statistics.mean(ys)
        sxx = sum((x - mean_x) ** 2 for x in xs)
        slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / sxx
        intercept = mean_y - slope * mean_x
        s = math.sqrt(sum((y - intercept - slope * x) ** 2 for x, y in zip(xs, ys)) / max(1, n - 2))
        return cls(slope, intercept, s, n, mean_x, sxx)

    def at(self, x: float) -> float:
        return self.intercept + self.slope * x


def _t95(dof: int) -> float:
    """Student's t two-sided 95% quantile for a line fitted to dof + 2 points."""
    from scipy.stats import t

    return float(t.ppf(0.975, dof))


def series(rows: list[dict], metric: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[metric]) for r in rows if isinstance(r.get(metric), (int, float)) and math.isfinite(r[metric])]
    return [p[0] for p in points], [p[1] for p in points]


def forecast(rows: list[dict], metric: str, target: float, window: int) -> Forecast:
    """A least-squares line through the last ``window`` values of ``metric``; when it crosses
    ``target``, with an interval from the slope's 95% confidence bounds."""
    steps, values = series(rows, metric)
    steps, values = steps[-window:], values[-window:]
    if len(values) < 3:
        return Forecast(metric, target, None, None, None, None, None, len(values))
    line = _Line.fit(steps, values)
    n, slope, se, t95 = line.n, line.slope, line.s / math.sqrt(line.sxx), _t95(line.n - 2)
    # the gap is measured from the line at the last step (one noisy value does not decide it);
    # the current value reported is the last one recorded (a line through a saturated climb
    # passes above it)
    gap = target - line.at(steps[-1])
    if gap <= 0:
        return Forecast(metric, target, values[-1], slope, 0.0, 0.0, 0.0, n)

    def steps_at(rate: float) -> float | None:
        return gap / rate if rate > 0 else None

    best, worst = steps_at(slope + t95 * se), steps_at(slope - t95 * se)
    return Forecast(metric, target, values[-1], slope, steps_at(slope), best if best is not None else 0.0, worst, n)


@dataclass
class Saturation:
    """A curve rising toward a plateau: y = plateau - (plateau - start) * exp(-rate * (x - x0)),
    fitted by least squares (scipy); ``steps`` until it reaches the target from the last step,
    with a 95% interval from the fit's parameter covariance (None high: some plausible
    plateaus lie below the target)."""

    plateau: float
    plateau_se: float
    steps: float | None  # None: the fitted plateau is below the target
    low: float | None
    high: float | None

    def cell(self) -> str:
        head = f"plateau {self.plateau:.3f} ± {1.96 * self.plateau_se:.3f}"
        if self.steps is None:
            return f"{head}: below the target"
        if self.steps == 0:
            return f"{head}: reached"
        interval = f"{self.low:.0f}-{self.high:.0f}" if self.high is not None else f"{self.low:.0f}-never"
        return f"{head}: in ~{self.steps:.0f} steps ({interval})"


def saturating_forecast(rows: list[dict], metric: str, target: float, window: int, draws: int = 2000) -> Saturation | None:
    """The saturating fit of the last ``window`` values of ``metric`` (at least 5), or None
    when it does not converge (a curve with no bend: the linear forecast says it all)."""
    import numpy as np
    from scipy.optimize import curve_fit

    steps, values = series(rows, metric)
    x, y = np.array(steps[-window:], dtype=float), np.array(values[-window:], dtype=float)
    if len(x) < 5 or np.ptp(y) == 0:
        return None
    x0 = x[0]

    def curve(x, plateau, start, rate):
        return plateau - (plateau - start) * np.exp(-rate * (x - x0))

    span = max(1.0, x[-1] - x0)
    try:
        params, cov = curve_fit(curve, x, y, p0=(y.max() + 0.1 * np.ptp(y), y[0], 1.0 / span), bounds=([-np.inf, -np.inf, 1e-6], [np.inf, np.inf, 10.0]), maxfev=5000)
    except (RuntimeError, ValueError):
        return None
    plateau, start, rate = params
    plateau_se = math.sqrt(cov[0, 0]) if np.all(np.isfinite(cov)) and cov[0, 0] >= 0 else math.inf
    # no bend the data pin down: the window shows under a fifth of the approach to the
    # plateau, or the plateau's error is larger than the distance left to it
    if 1 - math.exp(-rate * span) < 0.2 or plateau_se > abs(plateau - y[-1]):
        return None

    def steps_to(plateau, start, rate) -> float:
        """Steps after the last one until the curve reaches ``target``: inf if never."""
        if plateau <= target:
            return math.inf
        if curve(x[-1], plateau, start, rate) >= target:
            return 0.0
        return float(x0 - math.log((plateau - target) / (plateau - start)) / rate - x[-1])

    central = steps_to(plateau, start, rate)
    samples = np.random.default_rng(0).multivariate_normal(params, cov, size=draws, check_valid="ignore")
    crossings = np.sort([steps_to(*sample) if sample[2] > 0 else math.inf for sample in samples])
    low, high = crossings[int(0.025 * draws)], crossings[int(0.975 * draws) - 1]  # inf-safe percentiles
    return Saturation(
        float(plateau), plateau_se, None if math.isinf(central) else central,
        None if math.isinf(low) else float(low), None if math.isinf(high) else float(high),
    )


@dataclass
class OffForecast:
    metric: str
    step: int
    value: float
    expected: float
    margin: float

    def sentence(self) -> str:
        return (f"`{self.metric}` at step {self.step} is {self.value:.3f}, below its forecast {self.expected:.3f} ± {self.margin:.3f} "
                "from the steps before: the run has left its trend.")  # fmt: skip


def off_forecast(rows: list[dict], metric: str, window: int) -> OffForecast | None:
    """An early warning: the last value of ``metric`` below the 95% prediction interval of the
    straight line through the ``window`` values before it (at least 4 of them)."""
    steps, values = series(rows, metric)
    if len(values) < 5:
        return None
    line = _Line.fit(steps[-window - 1 : -1], values[-window - 1 : -1])
    expected = line.at(steps[-1])
    margin = _t95(line.n - 2) * line.s * math.sqrt(1 + 1 / line.n + (steps[-1] - line.mean_x) ** 2 / line.sxx)
    if values[-1] < expected - margin:
        return OffForecast(metric, steps[-1], values[-1], expected, margin)
    return None


Status = Literal["no data", "off its forecast", "reached", "not heading there", "plateaus below the target", "on track"]


@dataclass
class Outlook:
    """Everything the report forecasts for one target metric, and the one status that the
    table, the forecast's sentences and the suggestions all read."""

    line: Forecast
    curve: Saturation | None
    warning: OffForecast | None

    @property
    def status(self) -> Status:
        """Reached first (a metric at its target is not called off course by one noisy dip);
        then the early warning; then the line (not heading there); a line on track whose
        saturating curve levels off below the target plateaus below it."""
        if self.line.current is None:
            return "no data"
        if self.line.steps == 0:
            return "reached"
        if self.warning is not None:
            return "off its forecast"
        if self.line.steps is None:
            return "not heading there"
        if self.curve is not None and self.curve.steps is None:
            return "plateaus below the target"
        return "on track"

    def sentence(self) -> str:
        """The line's sentence, and the curve's where it overrules the line."""
        if self.status != "plateaus below the target":
            return self.line.sentence()
        return f"{self.line.sentence()} But the saturating fit levels off at {self.curve.plateau:.3f}: it plateaus below the target."


def outlook(rows: list[dict], metric: str, target: float, window: int) -> Outlook:
    return Outlook(forecast(rows, metric, target, window), saturating_forecast(rows, metric, target, window), off_forecast(rows, metric, window))


def target_table(outlooks: list[Outlook]) -> list[str]:
    """Per target metric: where it is, the target, its trend, when the straight line and the
    saturating curve reach the target (95% intervals), and its status."""
    lines = ["| metric | current | target | trend / step | linear: steps to target (95%) | saturating fit | status |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for o in outlooks:
        line, curve, metric, target = o.line, o.curve, o.line.metric, o.line.target
        if line.current is None:
            lines.append(f"| `{metric}` | - | {target:g} | - | fewer than 3 values | - | {o.status} |")
            continue
        lines.append(f"| `{metric}` | {line.current:.3f} | {target:g} | {line.slope:+.4f} | {_linear_cell(line)} | {curve.cell() if curve else 'no bend to fit'} | {o.status} |")
    return lines


def _linear_cell(line: Forecast) -> str:
    if line.steps == 0:
        return "reached"
    if line.steps is None:
        return "never at this trend"
    return f"{line.steps:.0f} ({line.low:.0f}-{line.high:.0f})" if line.high is not None else f"{line.steps:.0f} ({line.low:.0f}-never)"


def schedule_starts(rows: list[dict], names: list[str]) -> dict[int, str]:
    """First step -> name of each phase of the run's schedule (``phases``), from the steps'
    ``phase/index``."""
    starts, previous = {}, None
    for row in rows:
        index = row.get("phase/index")
        if index is not None and index != previous:
            name = names[int(index)] if int(index) < len(names) else f"phase {int(index)}"
            starts[row["step"]] = name
            previous = index
    return starts


def periods(rows: list[dict], events: list[dict], names: list[str] = ()) -> list[tuple[int, int, str]]:
    """(first step, last step, what began it): a new period where the phase schedule (``names``:
    the config's ``phases``) moved on, a curriculum moved a task's difficulty or a rollback
    restored a checkpoint."""
    steps = [r["step"] for r in rows if r["step"] > 0]
    if not steps:
        return []
    starts = {steps[0]: "start"}
    starts |= {step: f"phase {name}" for step, name in schedule_starts(rows, list(names)).items()}
    previous: dict[str, float] = {}
    for row in rows:
        for key, value in row.items():
            if key.startswith("task/") and key.endswith("/difficulty"):
                if key in previous and value != previous[key]:
                    starts.setdefault(row["step"] + 1, f"{key.split('/')[1]} difficulty {previous[key]:g} -> {value:g}")
                previous[key] = value
    for event in events:
        if "rolled_back_to_step" in event.get("evidence", {}):
            starts.setdefault(event["step"] + 1, f"rollback to step {event['evidence']['rolled_back_to_step']} ({event['rule']})")
    bounds = sorted(s for s in starts if s <= steps[-1])
    return [(start, (bounds[i + 1] - 1) if i + 1 < len(bounds) else steps[-1], starts[start]) for i, start in enumerate(bounds)]


def _mean(values: list[float]) -> str:
    return f"{statistics.mean(values):.3f}" if values else "-"


def plot(rows: list[dict], events: list[dict], folder: Path, targets: dict[str, float], names: list[str] = ()) -> list[Path]:
    """The PNGs of ``CURVES`` (those with data), events as dotted vertical lines, the phases
    of a schedule (``names``) as shaded spans."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(exist_ok=True)
    last_step = max((r.get("step", 0) for r in rows), default=1)
    written = []
    for name, title, ylabel, metrics, second in CURVES:
        panels = [(title, ylabel, metrics)] + ([second] if second else [])
        if not any(series(rows, m)[0] for _, _, ms in panels for m, _ in ms):
            continue
        fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4), squeeze=False)
        for ax, (panel_title, panel_ylabel, panel_metrics) in zip(axes[0], panels):
            plotted = False
            for metric, label in panel_metrics:
                x, y = series(rows, metric)
                if x:
                    style = "o-" if metric.startswith("eval/") else "-"
                    ax.plot(x, y, style, label=label, markersize=4)
                    plotted = True
                if metric in targets:
                    ax.axhline(targets[metric], color="grey", linestyle="--", linewidth=1, label=f"target {targets[metric]:g}")
            if not plotted:
                ax.text(0.5, 0.5, NOT_RECORDED.get(panel_metrics[0][0], "no values recorded"), ha="center", va="center", transform=ax.transAxes)
            for event in events:
                ax.axvline(event["step"], color="red", linestyle=":", linewidth=1)
            if events:
                ax.plot([], [], color="red", linestyle=":", label="monitor event")
            _shade_phases(ax, schedule_starts(rows, list(names)), last_step)
            ax.set_title(panel_title)
            ax.set_xlim(0, max(1, last_step))
            ax.ticklabel_format(axis="y", useOffset=False)  # a ratio near 1 reads as 1.00005, not "+1"
            ax.set_xlabel("training step")
            ax.set_ylabel(panel_ylabel)
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:  # a panel of "not computed" text has nothing to name
                ax.legend(fontsize=8)
        fig.tight_layout()
        path = folder / name
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


PHASE_COLOURS = {"grpo": "tab:blue", "surgery": "tab:orange", "joint": "tab:green"}


def _shade_phases(ax, starts: dict[int, str], last_step: int) -> None:
    """Each phase of the schedule as a light span, each name labelled once."""
    if len(starts) < 2:
        return
    firsts, labelled = sorted(starts), set()
    for i, first in enumerate(firsts):
        end = firsts[i + 1] - 0.5 if i + 1 < len(firsts) else last_step + 0.5
        name = starts[first]
        ax.axvspan(first - 0.5, end, color=PHASE_COLOURS.get(name, "grey"), alpha=0.08, label=None if name in labelled else f"phase {name}")
        labelled.add(name)


def write_report(path: str | Path) -> Path:
    """Write RUN_DIR/report.md and RUN_DIR/plots/*.png; returns the report's path."""
    run_dir = RunDir(path)
    if not run_dir.metrics_path.is_file():
        raise FileNotFoundError(f"{run_dir.path} has no metrics.jsonl: is it a run directory?")
    rows = sorted(run_dir.read_metrics(), key=lambda r: r.get("step", 0))
    events = [json.loads(line) for line in run_dir.events_path.read_text().splitlines() if line.strip()] if run_dir.events_path.exists() else []
    config = yaml.safe_load(run_dir.config_path.read_text()) if run_dir.config_path.exists() else {}
    report = config.get("report") or {}
    targets, window = report.get("targets") or {}, report.get("forecast_window", 20)
    names = [p.get("name", "grpo") for p in config.get("phases") or []]
    plots = plot(rows, events, run_dir.path / "plots", targets, names)
    lines = [f"# Run report: {run_dir.path.name}", ""]
    lines += _headline(rows, run_dir)
    lines += ["", "## Configuration", "", *_config_summary(config)]
    lines += ["", "## Curves", ""] + [f"![{p.stem}](plots/{p.name})" for p in plots]
    lines += ["", "## Reward components", "", *_component_table(rows)]
    lines += ["", "## Periods", "", *_period_table(rows, events, names)]
    if len(names) > 1:
        lines += ["", "### Per phase of the schedule", "", *_schedule_table(rows, names)]
    lines += ["", "## Events", "", *_event_table(events)]
    outlooks = [outlook(rows, metric, target, window) for metric, target in targets.items()]
    lines += ["", "## Forecast", ""]
    if outlooks:
        lines += [*target_table(outlooks), ""]
    lines += [f"- **Early warning**: {o.warning.sentence()}" for o in outlooks if o.warning is not None]
    lines += [f"- {o.sentence()}" for o in outlooks] or ["No targets set (`report.targets` in the config, e.g. `{eval/accuracy: 0.6}`)."]
    lines += ["", "## Suggestions", "", *_suggestions(events, outlooks)]
    out = run_dir.path / "report.md"
    out.write_text("\n".join(lines) + "\n")
    logger.info("report written to %s with %d plots", out, len(plots))
    return out


def _headline(rows: list[dict], run_dir: RunDir) -> list[str]:
    steps = [r for r in rows if r.get("step", 0) > 0]
    eval_steps, evals = series(rows, "eval/accuracy")
    lines = [f"- steps run: {steps[-1]['step'] if steps else 0}; final policy version {rows[-1].get('policy_version', '-') if rows else '-'}"]
    if evals:
        lines.append(f"- held-out accuracy: {evals[0]:.3f} at step {eval_steps[0]} -> {evals[-1]:.3f} at step {eval_steps[-1]} ({100 * (evals[-1] - evals[0]):+.1f} points); best {max(evals):.3f}")
    _, reward = series(rows, "train/reward_mean")
    if reward:
        k = max(1, len(reward) // 4)
        lines.append(f"- training reward: {_mean(reward[:k])} over the first {k} steps -> {_mean(reward[-k:])} over the last {k}")
    _, seconds = series(rows, "perf/step_seconds")
    _, tokens = series(rows, "perf/generated_tokens_per_second")
    if seconds:
        lines.append(f"- {statistics.mean(seconds):.1f} s per step" + (f"; {statistics.mean(tokens):.0f} generated tokens/s" if tokens else ""))
    best = run_dir.checkpoints / "best"
    if best.exists():
        lines.append(f"- best checkpoint: `checkpoints/{best.resolve().name}`")
    return lines


def _config_summary(config: dict) -> list[str]:
    if not config:
        return ["(no config.yaml in the run directory)"]
    model, algo, rollout, run = (config.get(k, {}) for k in ("model", "algorithm", "rollout", "run"))
    tasks = ", ".join(f"{t.get('id') or t['name']}" + (f" (difficulty {t['difficulty']})" if t.get("difficulty") else "") + f" x{t.get('weight', 1)}" for t in config.get("tasks", []))
    return [
        "| setting | value |", "|---|---|",
        f"| model | {model.get('path')} ({model.get('train')}, lora rank {config.get('lora', {}).get('rank')}) |",
        f"| tasks | {tasks} |",
        f"| algorithm | {_algorithm_summary(algo, config.get('bank') or config.get('memory', {}), config.get('markovian', {}))} |",
        f"| rollout | {rollout.get('prompts_per_step')} prompts x {rollout.get('group_size')} samples, temperature {rollout.get('temperature')}, max_tokens {rollout.get('max_tokens')} |",
        f"| run | {run.get('steps')} steps, seed {run.get('seed')}, checkpoint every {run.get('checkpoint_every')} |",
    ]  # fmt: skip


def _algorithm_summary(algo: dict, bank: dict, markovian: dict | None = None) -> str:
    if algo.get("objective") == "sft":
        text = f"self-improvement: supervised NLL on the solution bank ({bank.get('sft_on')}, at most {bank.get('sft_max_samples')} per round), {algo.get('sft_epochs')} epochs, lr {algo.get('lr')}"
    else:
        text = f"{algo.get('advantage')} advantages, {algo.get('policy_loss')} loss, lr {algo.get('lr')}, kl_coef {algo.get('kl_coef')}, clip {algo.get('clip_eps_low')}/{algo.get('clip_eps_high')}"
    if (markovian or {}).get("enabled"):
        scorer = "the policy" if algo.get("actor_reward_weight") else "the frozen model"
        baseline = " minus the frozen model's after its own CoT'" if markovian.get("baseline") else ""
        text += (f"; Markovian: CoTs of {markovian.get('cot_length')} tokens rewarded by {scorer}'s answer log-prob{baseline}"
                 + (f", actor reward weight {algo.get('actor_reward_weight')}" if algo.get("actor_reward_weight") else ""))
    if bank.get("enabled"):
        text += f"; solution bank: threshold {bank.get('threshold')}, {bank.get('per_problem')} per problem, {bank.get('max_size')} in all" + (", fed into failed groups" if bank.get("feed_groups") else "")
    return text


# the per-phase figures of a schedule: (metric, column, how: mean over the phase or its last value)
SCHEDULE_COLUMNS = [
    ("train/reward_mean", "train reward", "mean"), ("train/accuracy", "train accuracy", "mean"), ("train/entropy", "entropy", "mean"),
    ("eval/accuracy", "held-out accuracy (last)", "last"), ("surgery/action_magnitude", "action magnitude", "mean"),
    ("surgery/reward_improvement", "reward improvement", "mean"), ("sac/critic_loss", "critic loss", "mean"),
    ("sac/actor_loss", "actor loss", "mean"), ("sac/alpha", "alpha (last)", "last"),
]


def _schedule_table(rows: list[dict], names: list[str]) -> list[str]:
    """One row per phase of the schedule: the language model's and the surgeon's figures."""
    starts = schedule_starts(rows, names)
    last = max((r["step"] for r in rows), default=0)
    firsts = sorted(starts)
    lines = ["| phase | steps | " + " | ".join(c for _, c, _ in SCHEDULE_COLUMNS) + " |", "|---|---|" + "---|" * len(SCHEDULE_COLUMNS)]
    for i, first in enumerate(firsts):
        end = firsts[i + 1] - 1 if i + 1 < len(firsts) else last
        inside = [r for r in rows if first <= r["step"] <= end]
        cells = []
        for metric, _, how in SCHEDULE_COLUMNS:
            _, values = series(inside, metric)  # finite values only
            cells.append("-" if not values else f"{values[-1]:.4g}" if how == "last" else f"{statistics.mean(values):.4g}")
        lines.append(f"| {starts[first]} | {first}-{end} | " + " | ".join(cells) + " |")
    return lines


def _component_table(rows: list[dict]) -> list[str]:
    """Each reward component of training (``train/reward/<name>``, a scorer's or a reward
    term's), first quarter against last quarter, with the samples each term failed on."""
    names = sorted({k.removeprefix("train/reward/") for r in rows for k in r if k.startswith("train/reward/") and k.count("/") >= 2})
    errors = sorted({k.removeprefix("train/reward_errors/") for r in rows for k in r if k.startswith("train/reward_errors/")})
    if not names and not errors:
        return ["No reward components were recorded."]
    lines = ["| component | first quarter | last quarter | samples it failed on |", "|---|---|---|---|"]
    for name in sorted(set(names) | set(errors)):
        _, values = series(rows, f"train/reward/{name}")
        k = max(1, len(values) // 4)
        failed = sum(r.get(f"train/reward_errors/{name}", 0) for r in rows)
        cells = (_mean(values[:k]), _mean(values[-k:])) if values else ("-", "-")
        lines.append(f"| `{name}` | {cells[0]} | {cells[1]} | {failed:.0f} |")
    _, masked = series(rows, "train/masked_share")
    if masked:
        lines += ["", f"Masked share of training samples: mean {statistics.mean(masked):.1%}, last step {masked[-1]:.1%}."]
    return lines


def _period_table(rows: list[dict], events: list[dict], names: list[str] = ()) -> list[str]:
    found = periods(rows, events, names)
    if len(found) <= 1:
        return ["One period: no curriculum change and no rollback."] if found else ["No training steps."]
    lines = ["| steps | began with | mean train reward | mean train accuracy | last held-out accuracy |", "|---|---|---|---|---|"]
    for start, end, why in found:
        inside = [r for r in rows if start <= r["step"] <= end]
        _, reward = series(inside, "train/reward_mean")
        _, accuracy = series(inside, "train/accuracy")
        _, evals = series(inside, "eval/accuracy")
        lines.append(f"| {start}-{end} | {why} | {_mean(reward)} | {_mean(accuracy)} | {f'{evals[-1]:.3f}' if evals else '-'} |")
    return lines


def _event_table(events: list[dict]) -> list[str]:
    if not events:
        return ["The health monitor raised no event."]
    lines = ["| step | rule | action | what it saw | evidence |", "|---|---|---|---|---|"]
    for e in events:
        evidence = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in e.get("evidence", {}).items())
        lines.append(f"| {e['step']} | {e['rule']} | {e['action']} | {e['message'].replace('|', '/')} | {evidence} |")
    return lines


# what to try per target status (``Outlook.status``); "reached" and "on track" need nothing
STATUS_SUGGESTIONS: dict[Status, str] = {
    "no data": "has fewer than 3 values, so no forecast: check the name against metrics.jsonl, run longer, or evaluate more often (`eval.every`) for an `eval/` metric.",
    "off its forecast": "fell below the forecast of its own recent trend: read the rollouts and the events of the last steps before training on; a `rollback` action restores the last good checkpoint.",
    "not heading there": "more steps alone will not get there; see the suggestions above, or revisit the learning rate and the task's difficulty.",
    "plateaus below the target": "its saturating fit levels off below it, so more steps at this setting will not get there even though the straight line still climbs: revisit `algorithm.lr`, the task's difficulty (a curriculum, `tasks[].curriculum.enabled`) or `rollout.group_size`.",
}


def _suggestions(events: list[dict], outlooks: list[Outlook]) -> list[str]:
    found = []
    for rule in dict.fromkeys(e["rule"] for e in events):
        steps = [e["step"] for e in events if e["rule"] == rule]
        found.append(f"- **{rule}** (step{'s' if len(steps) > 1 else ''} {', '.join(map(str, steps))}): {SUGGESTIONS.get(rule, 'see the event message.')}")
    for o in outlooks:
        if o.status in STATUS_SUGGESTIONS:
            found.append(f"- **{o.line.metric}** ({o.status}, target {o.line.target:g}): {STATUS_SUGGESTIONS[o.status]}")
    return found or ["- Nothing to fix: no monitor event, and every target is reached or on its way."]


# what the side-by-side comparison of several runs (``raylight report A B ...``) overlays and tabulates
COMPARED_CURVES = [
    ("train/reward_mean", "training reward (mean per sample)"),
    ("eval/accuracy", "held-out accuracy (greedy)"),
    ("train/loss", "loss"),
    ("train/entropy", "entropy (nats per token)"),
]


def _differences(configs: list[dict]) -> list[dict[str, object]]:
    """Each run's config keys (dotted) whose values differ between the runs (the run folder aside)."""

    def flat(tree: dict, prefix: str = "") -> dict[str, object]:
        out = {}
        for key, value in tree.items():
            if isinstance(value, dict):
                out |= flat(value, f"{prefix}{key}.")
            else:
                out[f"{prefix}{key}"] = value
        return out

    flats = [flat(c) for c in configs]
    keys = sorted({k for f in flats for k in f if k != "run.run_dir" and len({json.dumps(g.get(k), sort_keys=True, default=str) for g in flats}) > 1})
    return [{k: f.get(k) for k in keys} for f in flats]


def write_comparison(paths: list[str | Path], out: str | Path) -> Path:
    """Several runs side by side: ``out``/comparison.md (one table: what differs in their
    configs, steps, training reward at the start and end, held-out accuracy, steps per second,
    the generators' busy fraction) and ``out``/plots/*.png (each curve of ``COMPARED_CURVES``
    overlaid, one line per run)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [RunDir(p) for p in paths]
    for run in runs:
        if not run.metrics_path.is_file():
            raise FileNotFoundError(f"{run.path} has no metrics.jsonl: is it a run directory?")
    rows = [sorted(run.read_metrics(), key=lambda r: r.get("step", 0)) for run in runs]
    configs = [yaml.safe_load(run.config_path.read_text()) if run.config_path.exists() else {} for run in runs]
    differ = _differences(configs)
    out = Path(out)
    (out / "plots").mkdir(parents=True, exist_ok=True)
    names = [run.path.name for run in runs]
    plots = []
    for metric, label in COMPARED_CURVES:
        if not any(series(r, metric)[0] for r in rows):
            continue
        fig, ax = plt.subplots(figsize=(7, 4))
        for name, r in zip(names, rows):
            x, y = series(r, metric)
            if x:
                ax.plot(x, y, "o-" if metric.startswith("eval/") else "-", label=name, markersize=3)
        ax.set_title(label)
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out / "plots" / (metric.replace("/", "_") + ".png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        plots.append(path)
    keys = sorted({k for d in differ for k in d})
    head = ["run", *keys, "steps", "train reward (first / last quarter)", "held-out accuracy (start -> end)", "steps/s", "generator busy"]
    lines = [f"# {len(runs)} runs side by side", "", "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for name, r, d in zip(names, rows, differ):
        steps = [row for row in r if row.get("step", 0) > 0]
        _, reward = series(r, "train/reward_mean")
        k = max(1, len(reward) // 4)
        _, acc = series(r, "eval/accuracy")
        seconds = [row["perf/step_seconds"] for row in steps if "perf/step_seconds" in row]
        busy = [row["perf/generator_busy_fraction"] for row in steps if "perf/generator_busy_fraction" in row]
        cells = [name, *(str(d.get(key, "")) for key in keys), str(steps[-1]["step"] if steps else 0),
                 f"{_mean(reward[:k])} / {_mean(reward[-k:])}" if reward else "-",
                 f"{acc[0]:.3f} -> {acc[-1]:.3f}" if acc else "-",
                 f"{len(seconds) / sum(seconds):.3f}" if seconds and sum(seconds) else "-", _mean(busy) if busy else "-"]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## Curves", "", *[f"![{p.stem}](plots/{p.name})" for p in plots]]
    report = out / "comparison.md"
    report.write_text("\n".join(lines) + "\n")
    logger.info("comparison of %d runs written to %s with %d plots", len(runs), report, len(plots))
    return report
