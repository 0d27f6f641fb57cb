"""The command line: argument order, help, and config errors that name the culprit."""

import json
import subprocess
import sys

import pytest

from cluster.commands.cli import main, parse_args


def test_overrides_before_and_after_options():
    args = parse_args(["train", "c.yaml", "a.b=1", "--run-dir", "runs/x", "--steps", "2", "c.d=[1, 2]", "--seed", "3", "--resume-if-exists"])
    assert args.config == "c.yaml" and args.run_dir == "runs/x" and args.steps == 2 and args.seed == 3 and args.resume_if_exists
    assert args.overrides == ["a.b=1", "c.d=[1, 2]"]


def test_stray_arguments_are_rejected():
    with pytest.raises(SystemExit):
        parse_args(["train", "c.yaml", "--bogus"])
    with pytest.raises(SystemExit):
        parse_args(["prepare-model", "tiny", "x=1"])


def test_help_lists_the_commands():
    out = subprocess.run([sys.executable, "-m", "cluster.commands.cli", "--help"], capture_output=True, text=True, check=True).stdout
    for command in ("train", "resume", "eval", "report", "bench", "prepare-model"):
        assert command in out


def test_config_error_names_the_key(capsys, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("rollout:\n  grup_size: 4\n")
    assert main(["train", str(config), "--run-dir", str(tmp_path / "run")]) == 2
    assert "rollout.grup_size" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_missing_model_path_is_a_clear_error(capsys, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(f"model:\n  path: {tmp_path / 'nowhere'}\n")
    assert main(["train", str(config), "--run-dir", str(tmp_path / "run")]) == 2
    assert "model.path=" in capsys.readouterr().err


def test_eval_names_an_adapter_folder_it_cannot_use(capsys, tmp_path):
    (tmp_path / "adapter").mkdir()
    assert main(["eval", "configs/tiny.yaml", "--adapter", str(tmp_path / "adapter")]) == 2
    assert f"--adapter {tmp_path / 'adapter'}: not a PEFT adapter folder" in capsys.readouterr().err


def test_bench_learner_times_variants_against_grpo(capsys):
    """The learner benchmark on the tiny model: one JSON line, GRPO as the 1.0 baseline."""
    assert main(["bench", "learner", "--model", "tiny", "--rows", "4", "--prompt-tokens", "8", "--completion-tokens", "4",
                 "--steps", "1", "--variants", "grpo", "ppo-gae-critic"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["benchmark"] == "learner" and result["ratio_to_grpo"]["grpo"] == 1.0 and result["baseline_drift"] > 0
    assert set(result["seconds_per_step"]) == {"grpo", "ppo-gae-critic"}
    assert all(v > 0 for v in result["seconds_per_step"].values())


@pytest.mark.slow
def test_bench_stream_loads_the_weights_bucket_by_bucket(capsys):
    """In a fresh engine: the tiny model's weights in one bucket per decoder layer (plus the
    embeddings and the final norm), with the load's time and the memory it added."""
    assert main(["bench", "stream", "--model", "tiny", "--bucket-mb", "0.125"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [(r["bucket_mb"], r["buckets"]) for r in result["rows"]] == [(0.125, 4)]
    assert result["rows"][0]["load_s"] > 0 and result["rows"][0]["added_gib"] >= 0 and result["weights_gib"] > 0


def test_bench_learner_rejects_unknown_variant(capsys):
    assert main(["bench", "learner", "--model", "tiny", "--variants", "trpo"]) == 2
    assert "trpo" in capsys.readouterr().err


@pytest.mark.slow
def test_bench_step_reports_spans_throughput_and_memory_per_role(capsys, ray_cluster, tiny_model_path):
    """`raylight bench step` on the tiny config: per-span medians that add up to at most the
    step, both tokens-per-second figures, every process role's peak memory, and the same
    engine timed in-process beside the generator."""
    assert main(["bench", "step", "configs/tiny.yaml", f"model.path={tiny_model_path}", "--steps", "3"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["benchmark"] == "step" and result["steps_timed"] == 2
    assert 0 < result["learn_seconds"] < result["step_seconds"] and 0 < result["generate_seconds"] < result["step_seconds"]
    assert result["generated_tokens_per_second"] > 0 and result["learner_tokens_per_second"] > 0
    roles = ("driver", "generators", "learners", "verifiers", "ray")
    assert all(result[f"peak_rss_gib_{role}"] > 0 for role in roles)
    assert result["peak_rss_gib_all"] == pytest.approx(sum(result[f"peak_rss_gib_{role}"] for role in roles), abs=0.05)
    assert 0 < result["peak_pss_gib_all"] <= result["peak_rss_gib_all"] + 0.5
    assert result["in_process_engine_tokens_per_second"] > 0 and result["actor_over_in_process_ratio"] > 0
