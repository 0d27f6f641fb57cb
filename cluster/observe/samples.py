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
        # mean log-prob of the sampled tokens (the monitor watches it crash)
        f"{prefix}/logprob_mean": sum(sum(s.completion.logprobs) / max(1, len(s.completion.logprobs)) for s, _ in valid) / n,
        # answers the scorer could not find (code verdicts name the program's fate instead)
        f"{prefix}/extraction_failed": sum(v.extracted is None and v.outcome in ("correct", "wrong") for _, v in valid) / n,
    }
    for name in sorted({k for _, v in valid for k in v.components}):
        metrics[f"{prefix}/reward/{name}"] = sum(v.components.get(name, 0.0) for _, v in valid) / n
    for name in sorted({f for v in verdicts for f in v.faults}):
        metrics[f"{prefix}/reward_errors/{name}"] = float(sum(name in v.faults for v in verdicts))
    return metrics
