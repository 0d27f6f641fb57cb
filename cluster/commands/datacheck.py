"""``raylight data check CONFIG``: load every task of a config before spending a GPU-day on it.

For each task and split: the usable and skipped rows (skips by kind, the first skipped rows
of each kind named by file and row), three rendered prompts
with their expected answers, and the token-length distribution of the prompts. Only the
tokenizer is loaded, never the model. The exit status is non-zero when a task has no usable
row in a split training needs (train, validation).
"""

from __future__ import annotations

import itertools
import json
import logging
import statistics
import sys
from typing import TextIO

from cluster.config import Config
from cluster.exits import ExitCode
from rollout.prompts import render_prompts
from rollout.tasks import SPLITS, NoUsableRows, Task

logger = logging.getLogger(__name__)

SAMPLE_PROMPTS = 3
LENGTH_SAMPLE = 200  # prompts tokenised per split for the length distribution
NEEDED = ("train", "validation")


def _tokenizer(config: Config):
    from transformers import AutoTokenizer

    from rollout.models import resolve_model

    try:
        return AutoTokenizer.from_pretrained(str(resolve_model(config.model.path)))
    except (OSError, ValueError, FileNotFoundError) as exc:
        logger.warning("no tokenizer for %s (%s): prompts shown without the chat template, lengths in words", config.model.path, exc)
        return None


def _lengths(tokenizer, texts: list[str]) -> dict[str, float]:
    counts = sorted(len(tokenizer(t, add_special_tokens=False)["input_ids"]) if tokenizer else len(t.split()) for t in texts)
    if not counts:
        return {}
    return {
        "min": counts[0],
        "median": statistics.median(counts),
        "p90": counts[min(len(counts) - 1, int(0.9 * len(counts)))],
        "max": counts[-1],
    }


def check_task(task: Task, split: str, tokenizer, out: TextIO) -> dict:
    """One task's split: counts, examples and lengths, printed; returns the summary row."""
    try:
        problems = list(itertools.islice(task.problems(split), LENGTH_SAMPLE))
        error = None
    except NoUsableRows as exc:
        problems, error = [], str(exc)
    report = getattr(task, "reports", {}).get(split)
    if hasattr(task, "load"):  # a fixed set (a dataset, a package's problems)
        usable: int | str = len(task.load(split))
    else:  # generated: endless for training, a fixed held-out set otherwise
        usable = "endless (generated)" if split == "train" and problems else len(problems)
    skipped = dict(report.skipped) if report else {}
    prompts = render_prompts(tokenizer, problems, task.system_prompt) if tokenizer else []
    texts = [p.text for p in prompts] if prompts else [p.question for p in problems]
    lengths = _lengths(tokenizer, texts)
    print(f"\n== {task.id} / {split}: usable {usable}, skipped {sum(skipped.values())}" + (f" {skipped}" if skipped else ""), file=out)
    for kind, where in (report.bad_rows.items() if report else ()):
        more = skipped[kind] - len(where)
        print(f"   skipped {skipped[kind]} x {kind}: " + ", ".join(where) + (f" and {more} more" if more > 0 else ""), file=out)
    if error:
        print(f"   UNUSABLE: {error}", file=out)
    for problem, text in list(zip(problems, texts))[:SAMPLE_PROMPTS]:
        expected = problem.answer or json.dumps(problem.meta.get("tests", problem.meta.get("task_id", "")))[:200]
        print(f"   --- prompt ({problem.uid})\n{_indent(text)}\n   --- expected: {expected}", file=out)
    if lengths:
        unit = "tokens" if tokenizer else "words"
        print(f"   prompt length ({unit}, {len(texts)} prompts): " + ", ".join(f"{k} {v:g}" for k, v in lengths.items()), file=out)
    bad_rows = dict(report.bad_rows) if report else {}
    return {"task": task.id, "split": split, "usable": usable, "skipped": skipped, "bad_rows": bad_rows, "lengths": lengths, "unusable": bool(error)}


def _indent(text: str, width: int = 600) -> str:
    text = text if len(text) <= width else text[:width] + " ..."
    return "\n".join("   | " + line for line in text.splitlines())


def data_check(config: Config, out: TextIO | None = None) -> int:
    """Print the check of every task (to ``out``, default the current stdout); the exit code:
    ``ExitCode.USAGE`` if a task cannot be trained on, else ``OK``."""
    out = out or sys.stdout
    from cluster.loop.wiring import build_tasks

    mixture = build_tasks(config)
    tokenizer = _tokenizer(config)
    rows = [check_task(task, split, tokenizer, out) for task in mixture.tasks.values() for split in SPLITS]
    unusable = sorted({r["task"] for r in rows if r["unusable"] and r["split"] in NEEDED})
    summary = {"tasks": len(mixture.tasks), "unusable": unusable, "splits": [{k: r[k] for k in ("task", "split", "usable", "skipped", "bad_rows")} for r in rows]}
    print("\n" + json.dumps(summary, default=str), file=out)
    if unusable:
        print(f"raylight data check: no usable rows for training in {unusable}", file=sys.stderr)
        return ExitCode.USAGE
    return ExitCode.OK
