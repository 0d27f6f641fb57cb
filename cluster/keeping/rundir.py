"""The run directory: resolved config, per-step metrics, rollouts, and the final adapter.

runs/NAME/
  config.yaml         the fully resolved config
  metrics.jsonl       one JSON object per step
  events.jsonl        the health monitor's events
  rollouts/step_000001.parquet
  checkpoints/        see cluster.keeping.checkpoint
  final_adapter/      PEFT format (PeftModel.from_pretrained, vLLM LoRARequest)
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import yaml

from cluster.config import Config, config_to_dict
from contracts import Sample, Verdict


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser().resolve()
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / "rollouts").mkdir(exist_ok=True)

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def final_adapter(self) -> Path:
        return self.path / "final_adapter"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def config_path(self) -> Path:
        return self.path / "config.yaml"

    def set_aside_previous(self) -> Path | None:
        """A new run in a directory that holds an earlier one: move the earlier run's files
        into ``previous-<time>/`` (nothing is deleted, and a later resume cannot pick up the
        old checkpoints). Returns that folder, or None if there was nothing."""
        names = ("config.yaml", "metrics.jsonl", "events.jsonl", "rollouts", "checkpoints", "final_adapter", "report.md", "plots", "tensorboard")
        found = [self.path / n for n in names if (self.path / n).exists() and not (n == "rollouts" and not any((self.path / n).iterdir()))]
        if not found:
            return None
        folder = self.path / time.strftime("previous-%Y%m%d-%H%M%S")
        folder.mkdir()
        for path in found:
            path.rename(folder / path.name)
        (self.path / "rollouts").mkdir(exist_ok=True)
        return folder

    def forget_after(self, step: int) -> int:
        """Drop the metrics, events and rollouts of steps after ``step`` (a resumed run does
        them again); returns the number of metric rows dropped."""
        dropped = 0
        for path in (self.metrics_path, self.events_path):
            if path.exists():
                rows = [line for line in path.read_text().splitlines() if line.strip()]
                kept = [line for line in rows if json.loads(line).get("step", 0) <= step]
                dropped += len(rows) - len(kept) if path == self.metrics_path else 0
                path.write_text("".join(line + "\n" for line in kept))
        for rollout in (self.path / "rollouts").glob("step_*.parquet"):
            if int(rollout.stem.split("_")[1]) > step:
                rollout.unlink()
        return dropped

    def write_config(self, config: Config) -> None:
        self.config_path.write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))

    def append_metrics(self, metrics: dict) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}
        with self.metrics_path.open("a") as handle:
            handle.write(json.dumps(clean) + "\n")

    @property
    def events_path(self) -> Path:
        return self.path / "events.jsonl"

    def append_events(self, events: list) -> None:
        """The health monitor's events, one JSON object each (``cluster.observe.monitor.Event``)."""
        if not events:
            return
        with self.events_path.open("a") as handle:
            for event in events:
                handle.write(json.dumps(dataclasses.asdict(event), default=str) + "\n")

    def read_metrics(self) -> list[dict]:
        if not self.metrics_path.exists():
            return []
        return [json.loads(line) for line in self.metrics_path.read_text().splitlines() if line.strip()]

    def write_rollouts(self, step: int, samples: list[Sample], verdicts: list[Verdict], advantages: list[float | None]) -> Path:
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.table(
            {
                "step": [step] * len(samples),
                "prompt_uid": [s.prompt.problem.uid for s in samples],
                "prompt": [s.prompt.text for s in samples],
                "answer": [s.prompt.problem.answer for s in samples],
                "completion": [s.completion.text for s in samples],
                "prompt_token_ids": [list(s.prompt.token_ids) for s in samples],
                "completion_token_ids": [list(s.completion.token_ids) for s in samples],
                "generator_logprobs": [list(s.completion.logprobs) for s in samples],
                "finish_reason": [s.completion.finish_reason for s in samples],
                "policy_version": [s.policy.version for s in samples],
                "group_index": [s.group_index for s in samples],
                "replayed": [s.replayed for s in samples],  # a solution bank's solution, not sampled
                "reward": [v.reward for v in verdicts],
                "correct": [v.correct for v in verdicts],
                "verdict": [v.outcome for v in verdicts],  # passed/failed/timeout/... or correct/wrong
                "status": [v.status for v in verdicts],  # ok; infra_error or masked: left out of training
                "error": [v.error for v in verdicts],
                "extracted": [v.extracted for v in verdicts],
                "reward_components": [json.dumps(v.components) for v in verdicts],
                "reward_faults": [list(v.faults) for v in verdicts],  # reward terms that failed on the sample
                "advantage": advantages,
            }
        )
        path = self.path / "rollouts" / f"step_{step:06d}.parquet"
        pq.write_table(table, path)
        return path
