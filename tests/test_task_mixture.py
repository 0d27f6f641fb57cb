"""Training on a mixture of two tasks, one answered in text and one in code, on the tiny model
through ``raylight train`` (real Ray, vLLM and sandbox); and ``raylight data check`` on a config
with a deliberately broken fixture."""

import json

import pytest

from cluster.commands.cli import main
from cluster.exits import ExitCode

pytestmark = pytest.mark.slow

MIXTURE = (
    "tasks=[{name: infix, difficulty: 2, weight: 1.0, curriculum: {enabled: true, window: 1, lower_at: 0.5, min_difficulty: 1}},"
    " {name: brackets, mode: code, difficulty: 2, weight: 1.0}]"
)


def test_train_on_a_text_and_a_code_task(ray_cluster, tiny_model_path, tmp_path, capsys):
    run_dir = tmp_path / "run"
    argv = ["train", "configs/tiny.yaml", "--run-dir", str(run_dir), "--steps", "2", f"model.path={tiny_model_path}",
            MIXTURE, "eval.n=4", "rollout.prompts_per_step=4", "verifier.sandbox.limits.wall_s=3"]  # fmt: skip
    assert main(argv) == 0
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    first, last = rows[0], rows[-1]
    # both tasks were evaluated on their own validation problems, and reported apart
    assert first["eval/infix/n"] == 4 and first["eval/brackets/n"] == 4 and first["eval/n"] == 8
    # the random tiny model never answers: the curriculum lowers infix from 2 to 1
    assert [r["task/infix/difficulty"] for r in rows[1:]] == [1.0, 1.0]
    # code samples went through the sandbox (random text does not compile: an 'error' verdict)
    step_rows = [r for r in rows if r["step"] > 0]
    assert all(r.get("verifier/verdict/error", 0) > 0 for r in step_rows)
    assert any(k.startswith("train/brackets/reward/passed_fraction") for k in last)
    assert any(k.startswith("train/infix/reward/correct_anchor") for k in last)


def test_data_check_counts_broken_rows_and_fails_only_without_rows(tmp_path, capsys):
    good = [{"question": f"Sam has {i} pens and gets 3 more. How many pens?", "answer": f"{i} + 3 = {i + 3}\n#### {i + 3}"} for i in range(80)]
    lines = [json.dumps(r) for r in good]
    lines[3] = "{not json"
    lines[7] = json.dumps({"question": "no answer here"})
    data = tmp_path / "gsm8k.jsonl"
    data.write_bytes(("\n".join(lines) + "\n").encode() + b'{"question": "caf\xe9", "answer": "#### 1"}\n')
    config = tmp_path / "config.yaml"
    config.write_text(f"model: {{path: tiny}}\ntasks:\n  - name: gsm8k\n    source: {data}\n  - name: rpn\n    difficulty: 3\n")
    assert main(["data", "check", str(config)]) == 0
    out = capsys.readouterr().out
    summary = json.loads(out.strip().splitlines()[-1])
    train = next(s for s in summary["splits"] if s["task"] == "gsm8k" and s["split"] == "train")
    assert train["skipped"] == {"bad JSON": 1, "missing field 'answer'": 1, "not UTF-8": 1}
    assert train["usable"] > 50 and summary["unusable"] == []
    assert "--- expected:" in out and "prompt length (tokens" in out

    broken = tmp_path / "broken.jsonl"
    broken.write_text("{nope\n" + json.dumps({"question": "q"}) + "\n")
    config.write_text(f"model: {{path: tiny}}\ntasks:\n  - name: gsm8k\n    source: {broken}\n  - name: rpn\n")
    assert main(["data", "check", str(config)]) == ExitCode.USAGE
    captured = capsys.readouterr()
    assert "no usable rows for training in ['gsm8k']" in captured.err
    assert '"usable": 0' in captured.out


def test_a_stop_rule_ends_the_run_with_its_event(ray_cluster, tiny_model_path, tmp_path, capsys):
    """The monitor inside a real run: a rule set to stop (entropy below an impossible bar)
    fires on step 1; the run ends there, saves its adapter, records the event and exits with
    the monitor's code (a job the monitor stopped did not succeed)."""
    run_dir = tmp_path / "run"
    argv = ["train", "configs/tiny.yaml", "--run-dir", str(run_dir), "--steps", "3", f"model.path={tiny_model_path}",
            "monitor.rules={entropy_collapse: {action: stop, threshold: 1000.0}}", "eval.n=4"]  # fmt: skip
    assert main(argv) == ExitCode.MONITOR_STOP
    out = capsys.readouterr().out
    assert "stopped at step 1 by the health monitor (entropy_collapse)" in out
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    assert [(e["step"], e["rule"], e["action"]) for e in events if e["rule"] == "entropy_collapse"] == [(1, "entropy_collapse", "stop")]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 1 and rows[-1]["monitor/entropy_collapse"] == 1.0
    assert "train/logprob_mean" in rows[-1] and "train/extraction_failed" in rows[-1]
    assert (run_dir / "final_adapter").is_dir()
