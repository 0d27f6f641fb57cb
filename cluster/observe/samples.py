"""Summaries of scored samples: what a training step, a held-out evaluation and a report
record about them (reward, accuracy, each reward component, length, the masked share)."""

from __future__ import annotations

from contracts import Sample, Verdict


def task_metrics(samples: list[Sample], verdicts: list[Verdict], prefix: str) -> dict[str, float]:
    """``sample_metrics`` of each task's samples, as ``<prefix>/<task>/...``, plus ``n``."""
    groups: dict[str, list[int]] = {}
    for i, sample in enumerate(samples):
        groups.setdefault(sample.prompt.problem.task or "task", []).append(i)
    metrics = {}
    for task, indices in groups.items():
        metrics |= sample_metrics([samples[i] for i in indices], [verdicts[i] for i in indices], f"{prefix}/{task}")
        metrics[f"{prefix}/{task}/n"] = float(len(indices))
    return metrics


def sample_metrics(samples: list[Sample], verdicts: list[Verdict], prefix: str) -> dict[str, float]:
    """Reward, accuracy, each reward component and completion length over valid verdicts, the
    share of samples masked (the verifier failed, or a reward term that masks), and how many
    samples each reward term failed on (``reward_errors/<term>``, masked or not)."""
    valid = [(s, v) for s, v in zip(samples, verdicts) if v.status == "ok"]
    n = max(1, len(valid))
    metrics = {
        f"{prefix}/masked_share": (len(samples) - len(valid)) / max(1, len(samples)),
        f"{prefix}/reward_mean": sum(v.reward for _, v in valid) / n,
        f"{prefix}/accuracy": sum(v.correct for _, v in valid) / n,
        f"{prefix}/completion_length": sum(len(s.completion.token_ids) for s, _ in valid) / n,
        f"{prefix}/truncated_fraction": sum(s.completion.finish_reason == "length" for s, _ in valid) / n,
        # mean log-prob of the sampled tokens (the monitor watches it crash); an episode's policy tokens
        f"{prefix}/logprob_mean": sum(policy_logprob_mean(s) for s, _ in valid) / n,
        # answers the scorer could not find (code verdicts name the program's fate instead)
        f"{prefix}/extraction_failed": sum(v.extracted is None and v.outcome in ("correct", "wrong") for _, v in valid) / n,
    }
    for name in sorted({k for _, v in valid for k in v.components}):
        metrics[f"{prefix}/reward/{name}"] = sum(v.components.get(name, 0.0) for _, v in valid) / n
    for name in sorted({f for v in verdicts for f in v.faults}):
        metrics[f"{prefix}/reward_errors/{name}"] = float(sum(name in v.faults for v in verdicts))
    if any(s.episode is not None for s in samples):
        metrics |= episode_metrics(samples, verdicts, prefix)
    return metrics


def policy_logprob_mean(sample: Sample) -> float:
    """The mean log-prob of the tokens the policy sampled (an episode's turns, not its observations)."""
    logprobs = sample.completion.logprobs
    if sample.episode is not None:
        logprobs = [lp for lp, keep in zip(logprobs, sample.episode.loss_mask) if keep]
    return sum(logprobs) / max(1, len(logprobs))


def episode_metrics(samples: list[Sample], verdicts: list[Verdict], prefix: str) -> dict[str, float]:
    """Multi-turn episodes: turns (mean, max), tool calls, tool errors and time-outs and the
    tools' seconds per episode, the share truncated (out of turns or tokens), and the mean
    reward of the valid episodes that took k turns (``reward_by_turns/<k>``)."""
    episodes = [s.episode for s in samples if s.episode is not None]
    n = max(1, len(episodes))
    metrics = {
        f"{prefix}/turns_mean": sum(e.turns for e in episodes) / n,
        f"{prefix}/turns_max": float(max((e.turns for e in episodes), default=0)),
        f"{prefix}/tool_calls": sum(e.tool_calls for e in episodes) / n,
        f"{prefix}/tool_errors": sum(e.tool_errors for e in episodes) / n,
        f"{prefix}/tool_timeouts": sum(e.tool_timeouts for e in episodes) / n,
        f"{prefix}/tool_seconds": sum(e.tool_seconds for e in episodes) / n,
        f"{prefix}/episodes_truncated": sum(e.truncated for e in episodes) / n,
    }
    by_turns: dict[int, list[float]] = {}
    for sample, verdict in zip(samples, verdicts):
        if sample.episode is not None and verdict.status == "ok":
            by_turns.setdefault(sample.episode.turns, []).append(verdict.reward)
    for turns, rewards in sorted(by_turns.items()):
        metrics[f"{prefix}/reward_by_turns/{turns}"] = sum(rewards) / len(rewards)
    return metrics
