"""The typed config: unknown and ill-typed keys are errors naming the key."""

import re
from pathlib import Path

import pytest

from cluster.config import ConfigError, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("name", sorted(str(p.relative_to(CONFIGS)) for p in CONFIGS.rglob("*.yaml")))
def test_shipped_configs_load(name):
    config = load_config(CONFIGS / name)
    assert config.run.steps > 0


def test_defaults_and_overrides():
    config = load_config(None, ["rollout.group_size=4", "algorithm.lr=3e-4", "tasks.0.system_prompt=null", "lora.target_modules=[q_proj]"])
    assert config.rollout.group_size == 4
    assert config.algorithm.lr == 3e-4
    assert config.tasks[0].system_prompt is None and config.tasks[0].name == "arithmetic"
    assert config.lora.target_modules == ("q_proj",)
    assert config.rollout.temperature == 1.0


def test_int_is_accepted_for_float():
    assert load_config(None, ["algorithm.lr=1"]).algorithm.lr == 1.0


def test_unknown_key_names_it_and_suggests(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'rollout.grup_size' \(did you mean 'rollout.group_size'\?\)"):
        load_config(None, ["rollout.grup_size=4"])
    path = tmp_path / "c.yaml"
    path.write_text("rolout:\n  group_size: 4\n")
    with pytest.raises(ConfigError, match="'rolout'.*did you mean 'rollout'"):
        load_config(path)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("rollout.group_size=four", r"rollout.group_size: expected int, got str"),
        ("rollout.group_size=2.5", r"rollout.group_size: expected int, got float"),
        ("generator.engine=tensorrt", r"generator.engine: 'tensorrt' is not one of \['vllm', 'hf'\]"),
        ("reward.weights=3", r"reward.weights: expected a mapping"),
        ("run.save_rollouts=1", r"run.save_rollouts: expected bool"),
        ("rollout=5", r"rollout: expected a mapping"),
        ("nokey", r"not of the form"),
    ],
)
def test_ill_typed_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize(
    "overrides, culprit",
    [
        (["algorithm.advantage=gae", "model.train=full"], "algorithm.advantage=gae"),
        (["model.train=full", "generator.adapter_mode=lora"], "generator.adapter_mode=merged"),
        (["algorithm.policy_loss=sac", "model.train=full", "generator.adapter_mode=merged"], "policy_loss=sac trains a LoRA critic"),
        (["algorithm.policy_loss=sac", "algorithm.sac_alpha=0"], "algorithm.sac_alpha must be > 0"),
        (["algorithm.policy_loss=pg", "algorithm.ppo_epochs=2"], "algorithm.ppo_epochs=1"),
        (["algorithm.kl_target=0.01", "algorithm.kl_coef=0"], "algorithm.kl_target"),
        (["algorithm.advantage=rloo", "rollout.group_size=1"], "rollout.group_size"),
        (["learner.num_gpus=-1"], "learner.num_gpus must be >= 0"),
        (["learner.weight_bucket_mb=-1"], "learner.weight_bucket_mb must be >= 0"),
        (["algorithm.advantage=ppo"], "algorithm.advantage"),
        (["verifier.min_verifiers=3", "verifier.max_verifiers=2"], "verifier.min_verifiers (3)"),
        # a task setting the task does not take, and reward weights its scorer does not report
        (["tasks=[{name: gsm8k, difficulty: 3}]"], "tasks[0] (gsm8k): task gsm8k: unknown settings ['difficulty']"),
        (["tasks=[{name: humaneval}]", "reward.weights={correct: 1.0}"], "reward.weights names ['correct'], which the humaneval scorer"),
        (["tasks=[{name: infix, weights: {f1: 1.0}}]"], "tasks[0] (infix).weights names ['f1']"),
        (["tasks=[{name: infix}, {name: infix}]"], "ids must be unique"),
        (["tasks=[{name: gsm8k, curriculum: {enabled: true}}]"], "curriculum needs a task with a difficulty"),
        (["tasks=[{name: infix, difficulty: 12}]"], "difficulty must be 1..10"),
        (["monitor.rules={vibes: {action: warn}}"], "monitor.rules: unknown rules ['vibes']"),
    ],
)
def test_impossible_combinations_name_the_keys(overrides, culprit):
    with pytest.raises(ConfigError, match=re.escape(culprit)):
        load_config(None, overrides)


def test_task_list_overrides_by_index():
    config = load_config(None, ["tasks.0.name=infix", "tasks.0.difficulty=7", "tasks.1.name=brackets", "tasks.1.mode=code"])
    assert [(t.name, t.difficulty, t.mode) for t in config.tasks] == [("infix", 7, None), ("brackets", None, "code")]
    with pytest.raises(ConfigError, match="item 5 of a list of 0"):
        load_config(None, ["tasks.5.name=infix"])


def test_sections_are_the_components_own_settings():
    """One config tree: the algorithm and LoRA sections are the learner's own classes (one
    default per knob), and the driver hands them over as they are."""
    from cluster.loop.wiring import learner_settings
    from learners.settings import AlgorithmSettings
    from learners.policy import LoraSettings

    config = load_config(None, ["algorithm.lr=0.5", "algorithm.betas=[0.8, 0.9]", "lora.rank=4", "run.steps=7"])
    assert type(config.algorithm) is AlgorithmSettings and type(config.lora) is LoraSettings
    assert config.algorithm.betas == (0.8, 0.9) and config.lora.target_modules[0] == "q_proj"
    settings = learner_settings(config, "/model")
    assert settings.algorithm is config.algorithm and settings.lora is config.lora and settings.total_steps == 7
    assert learner_settings(load_config(None, ["model.train=full"]), "/model").lora is None
    with pytest.raises(ConfigError, match=r"algorithm.betas: expected 2 values, got 3"):
        load_config(None, ["algorithm.betas=[0.8, 0.9, 0.99]"])


def test_resolved_config_round_trips_through_yaml(tmp_path):
    import yaml

    from cluster.config import config_to_dict

    config = load_config(CONFIGS / "demo.yaml")
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config_to_dict(config)))
    assert load_config(path) == config
