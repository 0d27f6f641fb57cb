"""The run directory: resolved config, per-step metrics, rollouts, and the final adapter.

runs/NAME/
  config.yaml         the fully resolved config
  metrics.jsonl       one JSON object per step
  events.jsonl        the health monitor's events
  rollouts/step_000001.parquet   one row per sample (RunDir.write_rollouts)
  checkpoints/        see cluster.keeping.checkpoint
  final_adapter/      PEFT format (PeftModel.from_pretrained, vLLM LoRARequest)
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from cluster.config import Config, config_to_dict
from contracts import Sample, Verdict

if TYPE_CHECKING:
    import pyarrow as pa


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser().resolve()
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / "rollouts").mkdir(exist_ok=True)
        # the reward component names written so far: each step's struct holds them all, so the
        # steps' files differ only by the fields a later step added
        self.component_names: list[str] = []

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
        names = ("config.yaml", "metrics.jsonl", "events.jsonl", "rollouts", "checkpoints", "final_adapter", "report.md", "plots", "tensorboard", "wandb", "run_id")
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

    def rollouts_path(self, step: int) -> Path:
        return self.path / "rollouts" / f"step_{step:06d}.parquet"

    def write_rollouts(self, step: int, samples: list[Sample], verdicts: list[Verdict], advantages: list[float | None]) -> Path:
        """One step's samples, a row each, under ``rollout_schema``: step, prompt_uid, task,
        difficulty (null where the task has none: datasets), prompt, answer, completion,
        prompt_token_ids and completion_token_ids (int32), generator_logprobs (float32; empty
        for a replayed sample), finish_reason, policy_version, group_index, replayed, reward,
        correct, verdict, status, error, extracted, reward_components, reward_faults, advantage.

        ``reward_components`` is a struct of float64 fields, one per component name this run has
        written so far (a field is null where a sample lacks it): a step's file has the fields of
        the steps before it plus any new one, so a later file's struct extends an earlier one's.
        Until a step has a component the column is null (Parquet cannot hold a struct without
        fields). ``rollouts_table`` joins every step. One step reads as
        ``pd.read_parquet(path, dtype_backend="pyarrow")``: ``df[df.task == "gsm8k"]``,
        ``df.reward_components.struct.field("correct")``; DuckDB reads the folder with
        ``read_parquet('RUN_DIR/rollouts/*.parquet', union_by_name = true)``.
        """
        import pyarrow as pa
        import pyarrow.parquet as pq

        problems = [s.prompt.problem for s in samples]
        components = components_array([v.components for v in verdicts], self.component_names)
        self.component_names = [f.name for f in components.type] if pa.types.is_struct(components.type) else []
        columns = {
            "step": [step] * len(samples),
            "prompt_uid": [p.uid for p in problems],
            "task": [p.task for p in problems],
            "difficulty": [p.difficulty for p in problems],
            "prompt": [s.prompt.text for s in samples],
            "answer": [p.answer for p in problems],
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
            "reward_components": components,
            "reward_faults": [list(v.faults) for v in verdicts],  # reward terms that failed on the sample
            "advantage": advantages,
        }
        path = self.rollouts_path(step)
        pq.write_table(pa.table(columns, schema=rollout_schema(components.type)), path)
        return path

    def read_rollouts(self, step: int) -> pa.Table:
        """One step's rollouts under ``rollout_schema``, also from a file written before it
        (reward components as a JSON string, float64 log-probs, int64 token ids, no task or
        difficulty: those read as null)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pq.read_table(self.rollouts_path(step))
        components = table["reward_components"]
        if pa.types.is_string(components.type):  # earlier runs: a JSON object per sample
            components = components_array([json.loads(c) for c in components.to_pylist()])
        schema = rollout_schema(components.type)
        columns = {f.name: table[f.name] if f.name in table.column_names else pa.nulls(len(table)) for f in schema}
        columns["reward_components"] = components
        return pa.table(columns).cast(schema)

    def rollouts_table(self) -> pa.Table:
        """Every step's rollouts in one table (the reward components' struct holds every field
        any step has; null where a step lacks it): ``.to_pandas()`` for pandas."""
        import pyarrow as pa

        steps = sorted(int(p.stem.removeprefix("step_")) for p in (self.path / "rollouts").glob("step_*.parquet"))
        if not steps:
            raise FileNotFoundError(f"{self.path / 'rollouts'} holds no rollout files (run.save_rollouts)")
        return pa.concat_tables([self.read_rollouts(step) for step in steps], promote_options="permissive")


def components_array(components: list[dict[str, float]], known: list[str] = ()) -> pa.Array:
    """Each sample's reward components as a struct with a float64 field per name in ``known``
    and per name found (null where a sample lacks it); a null array where there is none."""
    import pyarrow as pa

    names = list(dict.fromkeys([*known, *(name for c in components for name in c)]))
    if not names:
        return pa.nulls(len(components))
    return pa.array(components, pa.struct([(name, pa.float64()) for name in names]))


def rollout_schema(components: pa.DataType) -> pa.Schema:
    """The rollout files' columns (``RunDir.write_rollouts``); ``components`` is the type of
    this file's ``reward_components`` (``components_array``)."""
    import pyarrow as pa

    token_ids = pa.list_(pa.int32())
    return pa.schema(
        [
            ("step", pa.int64()),
            ("prompt_uid", pa.string()),
            ("task", pa.string()),
            ("difficulty", pa.int32()),
            ("prompt", pa.string()),
            ("answer", pa.string()),
            ("completion", pa.string()),
            ("prompt_token_ids", token_ids),
            ("completion_token_ids", token_ids),
            ("generator_logprobs", pa.list_(pa.float32())),
            ("finish_reason", pa.string()),
            ("policy_version", pa.int64()),
            ("group_index", pa.int64()),
            ("replayed", pa.bool_()),
            ("reward", pa.float64()),
            ("correct", pa.bool_()),
            ("verdict", pa.string()),
            ("status", pa.string()),
            ("error", pa.string()),
            ("extracted", pa.string()),
            ("reward_components", components),
            ("reward_faults", pa.list_(pa.string())),
            ("advantage", pa.float64()),
        ]
    )
