"""The health monitor: symptoms seen in failed runs, turned into named events with evidence.

Each step's metrics row goes through every rule. A rule that fires yields an ``Event`` (the
rule, the step, a sentence a person can act on, and the metric values behind it) and its
action: ``warn`` (logged and recorded), ``stop`` (the run ends after this step) or ``rollback``
(the run keeper restores the last good checkpoint and lowers the learning rate). Rules fire on
the step a condition starts, not on every step it lasts, so ``events.jsonl`` reads as a story.

The rules and their defaults (``DEFAULT_RULES``; every threshold and window is configurable):

- ``ratio_explosion``: the importance ratio's maximum far past the clip range;
- ``logprob_crash``: the mean sampled-token log-prob falls far below its recent median;
- ``repetition_collapse``: most samples are repeated n-grams or one repeated character ("4444...");
- ``entropy_collapse``: the policy's entropy near zero;
- ``non_finite``: a NaN/Inf reward, or the learner skipping a step or an update for one;
- ``plateau``: the training reward stuck within a narrow band over a window;
- ``no_signal``: most groups with zero reward variance (no learning signal) over a window;
- ``extraction_failures``: a high share of answers the scorer could not extract;
- ``reward_hacking``: training reward rising while held-out accuracy falls;
- ``frozen_parameters``: no update applied (skipped, zero gradient or zero learning rate) over a window;
- ``grokking``: held-out accuracy jumping after a long plateau (recorded, not a failure);
- ``bank_empty``: the solution bank (``bank.enabled``) still holds no solution after
  ``window`` steps: its threshold never fired, so self-improvement has nothing to train on
  and GRPO nothing to fall back on;
- ``actor_faults``: the run absorbed actor faults since the last step (generators replaced,
  requests re-issued, weights reloaded, learner groups rebuilt): the run goes on, but a
  person should know (``stop`` makes any fault end the run);
- ``masked_share``: the share of a step's samples that were masked (their verdict an
  infrastructure error, left out of the advantages) is high, over all tasks or in one, or
  rising: a sandbox that stopped working, or samples that found a way to be left out rather
  than scored (reward hacking until shown otherwise).
"""

from __future__ import annotations

import collections
import logging
import math
import statistics
from dataclasses import asdict, dataclass, field
from typing import Callable, Literal

logger = logging.getLogger(__name__)

Action = Literal["warn", "stop", "rollback", "off"]


@dataclass(frozen=True)
class Rule:
    action: Action = "warn"
    threshold: float = 0.0
    window: int = 1


DEFAULT_RULES: dict[str, Rule] = {
    "ratio_explosion": Rule("warn", threshold=10.0),  # ratio_max above this
    "logprob_crash": Rule("warn", threshold=1.5, window=8),  # nats below the window's median
    "repetition_collapse": Rule("warn", threshold=0.5),  # share of repetitive samples
    "entropy_collapse": Rule("warn", threshold=0.05),  # mean token entropy (nats) below this
    "non_finite": Rule("stop"),
    "plateau": Rule("warn", threshold=0.02, window=20),  # reward range within the window below this
    "no_signal": Rule("warn", threshold=0.8, window=3),  # zero-variance share above this, every step of the window
    "extraction_failures": Rule("warn", threshold=0.5),  # share of answers not extracted
    "reward_hacking": Rule("warn", threshold=0.05),  # eval accuracy down and train reward up by this much
    "frozen_parameters": Rule("warn", window=3),  # no applied update for this many steps
    "grokking": Rule("warn", threshold=0.1, window=3),  # eval jump above this after `window` flat evals
    "actor_faults": Rule("warn"),  # any faults/* counter rose since the previous step
    "bank_empty": Rule("warn", window=10),  # bank/size still 0 after this many steps
    # a step's masked share (overall or of one task) at or above this; or its mean over the last
    # `window` steps above the mean of the `window` before by half of it
    "masked_share": Rule("warn", threshold=0.1, window=10),
}


@dataclass
class Event:
    step: int
    rule: str
    action: str
    message: str
    evidence: dict = field(default_factory=dict)


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


class Monitor:
    """Feed it each step's metrics row (``observe``); it returns the events of that step."""

    def __init__(self, rules: dict[str, Rule] | None = None):
        unknown = sorted(set(rules or {}) - set(DEFAULT_RULES))
        if unknown:
            raise ValueError(f"unknown monitor rules {unknown}; known: {sorted(DEFAULT_RULES)}")
        self.rules = {**DEFAULT_RULES, **(rules or {})}
        self.clear()

    @classmethod
    def off(cls) -> Monitor:
        """A monitor whose every rule is off (``monitor.enabled=false``): it watches nothing."""
        return cls({name: Rule("off") for name in DEFAULT_RULES})

    def clear(self) -> None:
        """Forget every row, evaluation and event (a run that starts again from step 0)."""
        self.rows: collections.deque[dict] = collections.deque(maxlen=200)
        self.evals: list[tuple[int, float, float]] = []  # (step, eval accuracy, mean train reward since the last eval)
        self.active: set[str] = set()  # conditions that held on the last step (fire on onset only)
        self.events: list[Event] = []

    # -- state (a checkpoint keeps it) ------------------------------------------------------

    def state(self) -> dict:
        return {"rows": list(self.rows), "evals": self.evals, "active": sorted(self.active), "events": [asdict(e) for e in self.events]}

    def load_state(self, state: dict) -> None:
        self.clear()
        self.rows.extend(state["rows"])
        self.evals = [tuple(e) for e in state["evals"]]
        self.active = set(state["active"])
        self.events = [Event(**e) for e in state["events"]]

    # -- observing --------------------------------------------------------------------------

    def observe(self, row: dict) -> list[Event]:
        previous = self.rows[-1] if self.rows else {}
        self.rows.append(row)
        if _finite(row.get("eval/accuracy")) and row.get("step", 0) > 0:
            since = [r["train/reward_mean"] for r in self.rows if r.get("step", 0) > (self.evals[-1][0] if self.evals else 0) and _finite(r.get("train/reward_mean"))]
            self.evals.append((row["step"], row["eval/accuracy"], statistics.mean(since) if since else float("nan")))
        fired = []
        for name, check in RULES.items():
            rule = self.rules[name]
            if rule.action == "off":
                continue
            found = check(self, rule, row, previous)
            if found is None:
                self.active.discard(name)
                continue
            message, evidence = found
            if name in self.active and name not in ONE_SHOT:
                continue  # still the same episode
            self.active.add(name)
            event = Event(int(row.get("step", 0)), name, rule.action, message, evidence)
            fired.append(event)
            (logger.error if rule.action == "stop" else logger.warning)("monitor: step %d %s: %s %s", event.step, name, message, evidence)
        self.events.extend(fired)
        return fired

    def window(self, key: str, n: int) -> list[float] | None:
        """The last ``n`` finite values of ``key``, or None if there are fewer."""
        values = [r[key] for r in self.rows if _finite(r.get(key))]
        return values[-n:] if len(values) >= n else None


Found = tuple[str, dict] | None


def _threshold(key: str, fires: Callable[[float, float], bool], message: Callable[[float], str]):
    """A rule on one metric of the step: ``fires(value, threshold)``."""

    def check(m: Monitor, rule: Rule, row: dict, previous: dict) -> Found:
        value = row.get(key)
        if _finite(value) and fires(value, rule.threshold):
            return message(value), {key: value}
        return None

    return check


ratio_explosion = _threshold(
    "train/ratio_max", lambda v, t: v > t,
    lambda v: f"importance ratio max {v:.3g} is far past the clip range: the policy moved too far from the sampler (lower the LR, check staleness)",
)
repetition_collapse = _threshold("train/reward/repetition", lambda v, t: v >= t, lambda v: f"{v:.0%} of samples repeat themselves (the '4444...' collapse)")
entropy_collapse = _threshold("train/entropy", lambda v, t: v < t, lambda v: f"entropy {v:.3g} nats: the policy has stopped exploring")
extraction_failures = _threshold(
    "train/extraction_failed", lambda v, t: v >= t,
    lambda v: f"no answer could be extracted from {v:.0%} of samples (check the prompt's answer format and the stop strings)",
)  # fmt: skip


def logprob_crash(m: Monitor, rule: Rule, row: dict, previous: dict) -> Found:
    history = m.window("train/logprob_mean", rule.window + 1)
    if history is None:
        return None
    median = statistics.median(history[:-1])
    if history[-1] < median - rule.threshold:
        return f"mean sampled log-prob fell to {history[-1]:.2f} from a median of {median:.2f}", {"train/logprob_mean": history[-1], "median": median}
    return None


def non_finite(m: Monitor, rule: Rule, row: dict, previous: dict) -> Found:
    evidence = {k: row.get(k) for k in ("train/reward_mean", "train/loss", "train/grad_norm") if isinstance(row.get(k), float) and math.isinf(row[k])}
    if "train/reward_mean" in row and not _finite(row["train/reward_mean"]):
        evidence["train/reward_mean"] = row["train/reward_mean"]
    for counter in ("train/skipped_steps", "train/skipped_updates"):
        if _finite(row.get(counter)) and row[counter] > previous.get(counter, 0.0):
            evidence[counter] = row[counter]
    if evidence:
        return "non-finite values: the learner skipped work to keep the weights finite", evidence
    return None


def plateau(m: Monitor, rule: Rule, row: dict, previous: dict) -> Found:
    history = m.window("train/reward_mean", rule.window)
    if history is not None and max(history) - min(history) < rule.threshold:
        return f"training reward flat within {max(history) - min(history):.3g} over {rule.window} steps", {"train/reward_mean": history[-1], "window": rule.window}
    return None


def no_signal(m: Monitor, rule: Rule, row: dict, previous: dict) -> Found:
    history = m.window("train/zero_variance_fraction", rule.window)
    if history is not None and min(history) > rule.threshold:
        return f"{history[-1]:.0%} of groups have one reward for all samples: no learning signal (harder or easier problems, more samples per prompt)", {"train/zero_variance_fraction": history[-1]}
    return None


def reward_hacking(m: Monitor, rule: Rule, row: dict, previous: dict) -> Found:
    if len(m.evals) < 2 or m.evals[-1][0] != row.get("step"):
        return None
    (_, acc_before, reward_before), (_, acc_now, reward_now) = m.evals[-2], m.evals[-1]
    if acc_now < acc_before - rule.threshold and reward_now > reward_before + rule.threshold:
        return (
            f"training reward rose {reward_before:.3f} -> {reward_now:.3f} while held-out accuracy fell {acc_before:.3f} -> {acc_now:.3f}: reward hacking or over-fitting",
            {"eval/accuracy": [acc_before, acc_now], "train/reward_mean": [reward_before, reward_now]},
        )
    return None


def frozen_parameters(m: Monitor, rule: Rule, row: dict, previous: dict) -> Found:
    recent = list(m.rows)[-rule.window :]
    if len(recent) < rule.window:
        return None
    frozen = [r.get("train/updates") == 0 or r.get("train/grad_norm") == 0 or r.get("train/lr") == 0 for r in recent]
    if all(frozen):
        return f"no update reached the weights in {rule.window} steps (skipped updates, zero gradients or a zero learning rate)", {k: row.get(k) for k in ("train/updates", "train/grad_norm", "train/lr")}
    return None


def grokking(m: Monitor, rule: Rule, row: dict, previous: dict) -> Found:
    if len(m.evals) < rule.window + 1 or m.evals[-1][0] != row.get("step"):
        return None
    flat = [acc for _, acc, _ in m.evals[-rule.window - 1 : -1]]
    if max(flat) - min(flat) <= rule.threshold / 2 and m.evals[-1][1] > max(flat) + rule.threshold:
        return f"held-out accuracy jumped to {m.evals[-1][1]:.3f} after {rule.window} flat evaluations", {"eval/accuracy": [*flat, m.evals[-1][1]]}
    return None


def actor_faults(m: Monitor, rule: Rule, row: dict, previous: dict) -> Found:
    rose = {k: v for k, v in row.items() if k.startswith("faults/") and _finite(v) and v > previous.get(k, 0.0)}
    if rose:
        what = ", ".join(f"{k.removeprefix('faults/').replace('_', ' ')} {previous.get(k, 0.0):g} -> {v:g}" for k, v in sorted(rose.items()))
        return f"actor faults absorbed since the previous step: {what}", rose
    return None


def bank_empty(m: Monitor, rule: Rule, row: dict, previous: dict) -> Found:
    sizes = [r["bank/size"] for r in m.rows if _finite(r.get("bank/size"))]
    if len(sizes) >= rule.window and max(sizes) == 0 and _finite(row.get("bank/size")):
        return (
            f"the solution bank is still empty after {len(sizes)} steps: no verdict reached bank.threshold "
            "(lower it, check the verifier's rewards in the rollouts, or start from easier problems)",
            {"bank/size": 0.0, "bank/updates": row.get("bank/updates"), "train/reward_mean": row.get("train/reward_mean")},
        )
    return None


def masked_share(m: Monitor, rule: Rule, row: dict, previous: dict) -> Found:
    shares = {k: v for k, v in row.items() if k.startswith(("train/", "eval/")) and k.endswith("/masked_share") and _finite(v)}
    high = {k: v for k, v in sorted(shares.items()) if v >= rule.threshold}
    if high:
        worst = max(high, key=high.get)
        return (
            f"{high[worst]:.0%} of the samples were masked ({worst}): their verdicts failed in the verifier, not in the "
            "program, and they are left out of training. Check the verifier's log for sandbox errors; if the sandbox "
            "is fine, samples are getting themselves masked (reward hacking)",
            high,
        )
    history = m.window("train/masked_share", 2 * rule.window)
    if history is None:
        return None
    before, recent = statistics.mean(history[: rule.window]), statistics.mean(history[rule.window :])
    if recent - before >= rule.threshold / 2:
        return (
            f"the masked share rose from {before:.1%} to {recent:.1%} (means of {rule.window} steps): more and more "
            "verdicts fail in the verifier; check its log for sandbox errors, then suspect samples that get themselves masked",
            {"train/masked_share": [round(before, 4), round(recent, 4)]},
        )
    return None


RULES: dict[str, Callable[[Monitor, Rule, dict, dict], Found]] = {
    "ratio_explosion": ratio_explosion,
    "logprob_crash": logprob_crash,
    "repetition_collapse": repetition_collapse,
    "entropy_collapse": entropy_collapse,
    "non_finite": non_finite,
    "plateau": plateau,
    "no_signal": no_signal,
    "extraction_failures": extraction_failures,
    "reward_hacking": reward_hacking,
    "frozen_parameters": frozen_parameters,
    "grokking": grokking,
    "actor_faults": actor_faults,
    "bank_empty": bank_empty,
    "masked_share": masked_share,
}
ONE_SHOT = {"non_finite", "reward_hacking", "grokking", "actor_faults"}  # every occurrence is news


def rules_from_config(overrides: dict) -> dict[str, Rule]:
    """``monitor.rules`` of the config (action / threshold / window, null = default) as rules."""
    rules = {}
    for name, o in overrides.items():
        default = DEFAULT_RULES.get(name, Rule())
        rules[name] = Rule(
            o.action if o.action is not None else default.action,
            o.threshold if o.threshold is not None else default.threshold,
            o.window if o.window is not None else default.window,
        )
    return rules
