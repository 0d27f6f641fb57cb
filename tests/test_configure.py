"""``raylight config``: every key documented in its settings class, the generated reference page
in sync, the printed config loadable again; a resume whose command line changes the saved
config is an error naming the keys unless ``--override``; the exit codes of the commands."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from cluster.commands.cli import main
from cluster.commands.configure import field_comments, key_docs, keys_text, reference_markdown, yaml_text
from cluster.config import Config, config_to_dict, dotted_items, load_config
from cluster.exits import ExitCode
from cluster.keeping.checkpoint import CheckpointStore
from cluster.keeping.keeper import config_changes
from cluster.keeping.rundir import RunDir

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class _Example:
    """A settings class the way the project writes them."""

    plain: int = 1  # a trailing comment
    # a comment above
    # on two lines
    above: str = "x"
    # -- a group header, not a meaning --
    bare: float = 0.0
    typed: int = 2  # type: ignore[assignment]


def test_field_comments_reads_trailing_and_preceding_comments():
    assert field_comments(_Example) == {"plain": "a trailing comment", "above": "a comment above on two lines"}


def test_every_config_key_has_a_meaning():
    docs = key_docs()
    assert len(docs) > 250
    assert [d.key for d in docs if not d.doc] == []
    by_key = {d.key: d for d in docs}
    # sections inside lists, mappings and optional sections are walked
    assert by_key["tasks[].curriculum.window"].default == 4
    assert by_key["reward.functions[].on_error"].default == "mask"
    assert by_key["monitor.rules.<name>.threshold"].doc.startswith("the rule's limit")
    assert by_key["verifier.sandbox.limits.wall_s"].default == 10.0
    # a field inherited from a base class keeps its base's meaning
    assert by_key["generator.kv_cache_gib"].doc == "vLLM's CPU KV cache"


def test_the_reference_page_is_generated_from_the_code():
    page = (ROOT / "docs" / "config-reference.md").read_text()
    assert page == reference_markdown() + "\n" or page == reference_markdown(), (
        "docs/config-reference.md is stale: run `raylight config --reference > docs/config-reference.md`"
    )
    assert "| `algorithm.clip_eps_high` | `float` | `0.2` |" in page


def test_printed_yaml_loads_back_to_the_same_config(tmp_path):
    config = load_config(ROOT / "configs" / "demo.yaml", ["rollout.group_size=4", "tasks.0.difficulty=3"])
    text = yaml_text(config)
    assert "  group_size: 4  # completions sampled per prompt (GRPO's group)" in text
    (tmp_path / "printed.yaml").write_text(text)
    assert config_to_dict(load_config(tmp_path / "printed.yaml")) == config_to_dict(config)


def test_keys_and_diff(capsys):
    assert main(["config", "--keys", "rollout.group_size=4"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "rollout.group_size = 4 (default 8)  # completions sampled per prompt (GRPO's group)" in lines
    assert "rollout.top_p = 1.0  # nucleus sampling's probability mass" in lines
    assert len(lines) == len(dotted_items(Config()))

    assert main(["config", "--diff", "rollout.group_size=4", "tasks.0.name=gsm8k"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "tasks.0.name = gsm8k (default arithmetic)  # the task: a built-in one (arithmetic, gsm8k, ...) or `dataset` (your own data, docs/your-problem.md)",
        "rollout.group_size = 4 (default 8)  # completions sampled per prompt (GRPO's group)",
    ]
    assert keys_text(Config(), only_changed=True) == ""
    assert main(["config", "--diff"]) == 0 and "the config is the defaults" in capsys.readouterr().out


def test_config_command_names_a_wrong_key(capsys):
    assert main(["config", "rollout.grup_size=4"]) == ExitCode.USAGE
    assert "unknown config key 'rollout.grup_size' (did you mean 'rollout.group_size'?)" in capsys.readouterr().err


def _saved_run(tmp_path: Path) -> RunDir:
    """A run directory with a saved config and one complete checkpoint (no training)."""
    run_dir = RunDir(tmp_path / "run")
    run_dir.write_config(load_config(ROOT / "configs" / "tiny.yaml", [f"run.run_dir={run_dir.path}"]))
    CheckpointStore(run_dir.checkpoints).save(1, {"trainer.json": b'{"step": 1}'})
    return run_dir


def test_resume_with_changed_keys_is_an_error_naming_them(tmp_path, capsys):
    run_dir = _saved_run(tmp_path)
    assert main(["resume", str(run_dir.path), "algorithm.lr=0.5", "rollout.group_size=2"]) == ExitCode.USAGE
    err = capsys.readouterr().err
    assert "differs from this command's in 2 key(s): algorithm.lr: 0.001 -> 0.5; rollout.group_size: 4 -> 2." in err
    assert "rollout.group_size" in err and "--override" in err

    config = load_config(ROOT / "configs" / "tiny.yaml", ["algorithm.lr=0.5", f"run.run_dir={run_dir.path}", "run.steps=7"])
    saved = load_config(run_dir.config_path)
    assert [c.split(":")[0] for c in config_changes(saved, config)] == ["algorithm.lr"]  # run.steps may change


def test_resume_with_override_keeps_the_new_values(tmp_path):
    from cluster.keeping.keeper import resume_point, saved_run

    run_dir = _saved_run(tmp_path)
    _, config, checkpoint = saved_run(run_dir.path, 5, ("algorithm.lr=0.5",), override=True)
    assert config.algorithm.lr == 0.5 and config.run.steps == 5 and checkpoint.step == 1
    _, same, _ = saved_run(run_dir.path)
    assert dataclasses.asdict(same) == dataclasses.asdict(load_config(run_dir.config_path))
    asked = load_config(ROOT / "configs" / "tiny.yaml", [f"run.run_dir={run_dir.path}", "algorithm.lr=0.5"])
    _, config, _ = resume_point(asked, override=True)
    assert config.algorithm.lr == 0.5


def test_exit_codes_are_distinct_and_documented():
    codes = [code.value for code in ExitCode]
    assert len(set(codes)) == len(codes) and ExitCode.OK == 0 and ExitCode.MONITOR_STOP != 0
    page = (ROOT / "docs" / "exit-codes.md").read_text()
    for code in ExitCode:
        assert f"| {code.value} | `{code.name}` |" in page, f"docs/exit-codes.md lacks {code.name}"


def test_monitor_stop_exits_non_zero(monkeypatch, capsys):
    """``_run`` maps a summary with ``stopped_by`` to MONITOR_STOP (the run itself: test_monitor)."""
    from cluster.commands import cli

    class Stopped:
        config = Config()

        def train(self, steps):
            return {"run_dir": "r", "eval_accuracy_start": None, "eval_accuracy_end": None,
                    "stopped_by": {"step": 3, "rule": "kl_spike", "message": "KL 9.0 above 1.0"}}  # fmt: skip

        def shutdown(self):
            pass

    assert cli._run(Stopped()) == ExitCode.MONITOR_STOP
    assert "stopped at step 3 by the health monitor (kl_spike)" in capsys.readouterr().out


def test_a_retried_command_resumes_with_its_own_resumable_keys(tmp_path):
    """``--resume-if-exists``: the command's run.steps and cluster.dashboard (``--no-dashboard``)
    hold; a key the command leaves at its default (a default changed by a newer raylight, or a
    config without the key) is not a change it asks for: the saved value holds."""
    from cluster.keeping.keeper import resume_point

    run_dir = _saved_run(tmp_path)
    asked = load_config(None, [f"run.run_dir={run_dir.path}", "cluster.dashboard=false", "run.steps=9", "model.path=tiny"])
    saved = load_config(run_dir.config_path)
    assert asked.algorithm.lr != saved.algorithm.lr  # the command leaves lr at its default
    _, config, checkpoint = resume_point(asked)
    assert checkpoint.step == 1 and config.cluster.dashboard is False and config.run.steps == 9
    assert config.algorithm.lr == saved.algorithm.lr


def test_a_run_ending_by_an_exception_exits_by_its_kind():
    from actors.generator import GeneratorsLost
    from actors.learner import LearnerFailure
    from cluster.exits import exit_code_of

    assert exit_code_of(GeneratorsLost("all gone")) == exit_code_of(LearnerFailure("rank 1")) == ExitCode.FAULTS
    assert exit_code_of(KeyboardInterrupt()) == ExitCode.INTERRUPTED
    assert exit_code_of(RuntimeError("a bug")) == ExitCode.ERROR
