"""The SAC surgeon: attention controls on the policy, its environment, RLlib's SAC feeding on
it, the phase schedule, and the three-phase run on real actors.

The controls' math is checked by hand and against the weight transform the generators use; the
learner and every engine (vLLM with the adapter as a LoRA and merged, HF) must give the same
log-probs after a change. The surgeon is RLlib's SAC (new API stack) in-process; the run tests
use the session's Ray cluster, the vLLM engine and the verifier pool, as ``raylight train`` does.
"""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from cluster.config import ConfigError, load_config
from cluster.phases import PhaseConfig, PhaseSchedule
from contracts import ATTENTION_OUTPUT_SCALE, SamplingSettings, TrainBatch
from helpers import make_learner, spread_reward, tiny_trainer
from learners.policy import LoraSettings, pack
from learners.surgeon_env import SurgeonEnv
from learners.surgery import AttentionControls, apply_action, observation, window_mean
from rollout.engines import EngineSettings, HFEngine, build_engine, scale_attention_output
from rollout.lora_merge import fused_siblings

ROOT = Path(__file__).resolve().parents[1]
LORA = LoraSettings(rank=4, alpha=8, dropout=0.0)


# -- the controls' math ---------------------------------------------------------------------


def test_apply_action_moves_scales_by_max_delta_within_bounds():
    scales = np.ones((2, 3), np.float32)
    new, delta = apply_action(scales, np.array([1.0, -0.5]), 0.1, (0.5, 1.5), "layer")
    np.testing.assert_allclose(new, [[1.1] * 3, [0.95] * 3], rtol=1e-6)
    np.testing.assert_allclose(delta, [[0.1] * 3, [-0.05] * 3], rtol=1e-5)
    # out-of-range actions are clipped to [-1, 1], scales to the bounds
    new, delta = apply_action(np.full((1, 2), 1.45, np.float32), np.array([3.0, -1.0]), 0.1, (0.5, 1.5), "head")
    np.testing.assert_allclose(new, [[1.5, 1.35]], rtol=1e-6)
    np.testing.assert_allclose(delta, [[0.05, -0.1]], atol=1e-6)
    with pytest.raises(ValueError, match="layer-granular action has 2 values, got 6"):
        apply_action(scales, np.zeros(6), 0.1, (0.5, 1.5), "layer")


def test_observation_reads_window_means_and_control_deviations():
    window = [{"train/reward_mean": 0.2, "train/loss": float("nan")}, {"train/reward_mean": 0.4, "train/loss": 1.0}]
    obs = observation(window, np.array([[1.0, 1.2], [0.9, 0.9]], np.float32), "layer")
    assert obs[0] == pytest.approx(0.3)  # train/reward_mean
    assert obs[4] == pytest.approx(1.0)  # train/loss: the NaN is left out
    assert obs[3] == 0.0  # train/kl: missing reads 0
    np.testing.assert_allclose(obs[-2:], [0.1, -0.1], atol=1e-6)
    assert math.isnan(window_mean([{"train/kl": float("nan")}], "train/kl"))


def test_env_reward_is_the_metric_change_over_the_window():
    ran = []

    def run_window(scales):  # the run: two steps whose reward follows layer 0's scale
        ran.append(scales.copy())
        return [{"train/reward_mean": float(scales[0, 0])}, {"train/reward_mean": float(scales[0, 0]) + 0.1}]

    config = {"layers": 2, "heads": 2, "horizon": 2, "max_delta": 0.1, "granularity": "layer"}
    env = SurgeonEnv(config, run_window)
    assert env.action_space.shape == (2,) and env.observation_space.shape == (7 + 2,)
    obs, _ = env.reset(options={"window": [{"train/reward_mean": 0.9}, {"train/reward_mean": 1.1}]})
    assert obs[0] == pytest.approx(1.0)
    obs, reward, terminated, truncated, info = env.step(np.array([1.0, -1.0]))
    # after: mean(1.1, 1.2) = 1.15; before: 1.0
    assert reward == pytest.approx(0.15) and not terminated and not truncated
    np.testing.assert_allclose(ran[0], [[1.1, 1.1], [0.9, 0.9]], rtol=1e-6)
    assert info["surgery/action_magnitude"] == pytest.approx(0.1) and info["surgery/reward_improvement"] == reward
    _, reward, _, _, _ = env.step(np.array([0.0, 0.0]))
    assert reward == pytest.approx(0.0, abs=1e-6)  # same scales, same window mean
    env.run_window = lambda scales: [{"train/reward_mean": 2.0}]  # cut short by a phase's end
    assert env.step(np.zeros(2))[3] is True
    with pytest.raises(RuntimeError, match="describes spaces only"):
        SurgeonEnv(config).step(np.zeros(2))


def test_controls_equal_the_generators_weight_transform(tiny_model_path):
    """The learner's hook and the generators' W_o diag(s) are one function; identity and
    bypass leave the model as it was."""
    hooked = AutoModelForCausalLM.from_pretrained(tiny_model_path).eval()
    transformed = AutoModelForCausalLM.from_pretrained(tiny_model_path).eval()
    controls = AttentionControls(hooked)
    ids = torch.tensor([[1, 5, 9, 13, 17, 21]])
    with torch.no_grad():
        before = hooked(ids).logits
        controls.set(torch.ones(controls.num_layers, controls.num_heads))
        assert torch.equal(hooked(ids).logits, before)
        scales = 1 + 0.5 * (torch.rand(controls.num_layers, controls.num_heads, generator=torch.Generator().manual_seed(0)) - 0.5)
        controls.set(scales)
        originals = {n: p.detach().clone() for n, p in transformed.named_parameters() if n.endswith("o_proj.weight")}
        for name, weight in scale_attention_output(originals, scales).items():
            transformed.get_parameter(name).copy_(weight)
        after = hooked(ids).logits
        torch.testing.assert_close(after, transformed(ids).logits, rtol=1e-5, atol=1e-5)
        assert (after - before).abs().max() > 1e-3
        with controls.bypass():
            assert torch.equal(hooked(ids).logits, before)
    with pytest.raises(ValueError, match="finite and positive"):
        controls.set(torch.zeros(controls.num_layers, controls.num_heads))
    with pytest.raises(ValueError, match=r"this model has \(2, 4\)"):
        controls.set(torch.ones(3, 3))


def test_learner_versions_checkpoints_and_ships_the_scales(tiny_model_path):
    learner = make_learner(tiny_model_path, LORA, attention_controls=True, kl_coef=0.1)
    layers, heads = learner.attention_scales().shape
    batch = pack([[1, 2, 3]], [[4, 5, 6]], learner.policy.pad_id)
    reference = learner.policy.reference_forward(batch)
    policy = learner.policy.forward(batch)[0]
    scales = torch.full((layers, heads), 1.3)
    assert learner.set_attention_scales(scales).version == 1
    update = learner.weight_update()
    assert torch.equal(update.controls[ATTENTION_OUTPUT_SCALE], scales) and update.policy.version == 1
    assert not torch.allclose(learner.policy.forward(batch)[0], policy)  # the policy moved...
    assert torch.equal(learner.policy.reference_forward(batch), reference)  # ...its reference did not
    state = learner.state_dict()
    other = make_learner(tiny_model_path, LORA, attention_controls=True, kl_coef=0.1)
    other.load_state_dict(state)
    assert torch.equal(other.attention_scales(), scales) and other.policy_version().version == 1
    plain = make_learner(tiny_model_path, LORA)
    assert plain.attention_scales() is None and plain.weight_update().controls == {}
    with pytest.raises(ValueError, match="no attention controls"):
        plain.set_attention_scales(scales)


def test_fused_siblings_name_the_rest_of_vllms_fused_matrices():
    names = {"model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.up_proj.weight", "model.layers.1.self_attn.o_proj.weight"}
    assert fused_siblings(names) == {
        "model.layers.0.self_attn.k_proj.weight", "model.layers.0.self_attn.v_proj.weight", "model.layers.0.mlp.gate_proj.weight",
    }  # fmt: skip


# -- the schedule and the config ------------------------------------------------------------


def test_phase_schedule_switches_the_learning_agents():
    schedule = PhaseSchedule([PhaseConfig("grpo", 3), PhaseConfig("surgery", 5), PhaseConfig("joint")])
    assert [schedule.at(s).name for s in range(1, 8)] == ["grpo"] * 3 + ["surgery"] * 2 + ["joint"] * 2
    assert [schedule.language_model_learns(s) for s in (3, 4, 6)] == [True, False, True]
    assert [schedule.surgeon_acts(s) for s in (3, 4, 6)] == [False, True, True]
    assert schedule.last_step(1, 10) == 3 and schedule.last_step(4, 10) == 5 and schedule.last_step(6, 10) == 10
    assert schedule.starts() == [(1, "grpo"), (4, "surgery"), (6, "joint")]
    assert schedule.has_surgeon and not PhaseSchedule([]).has_surgeon and PhaseSchedule([]).language_model_learns(99)
    assert PhaseSchedule([PhaseConfig("grpo", 3), PhaseConfig("surgery", 5)]).at(9).name == "surgery"  # past the end: the last goes on


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["phases=[{name: surgery}, {name: joint}]"], r"phases\[0\] \(surgery\) has no 'until'"),
        (["phases=[{name: grpo, until: 5}, {name: joint, until: 5}]"], r"phases\[1\].until \(5\) must be above the previous phase's \(5\)"),
        (["phases=[{name: sac}]"], r"phases\[0\].name: 'sac' is not one of"),
        (["model.train=full", "generator.adapter_mode=merged"], "needs model.train=lora"),
        (["rollout.mode=async", "rollout.max_staleness=1"], "needs rollout.mode=sync"),
        (["surgeon.scale_max=0.9"], "must hold 1"),
        (["surgeon.granularity=neuron"], r"surgeon.granularity: 'neuron' is not one of \['layer', 'head'\]"),
    ],
)
def test_config_names_what_a_surgeon_cannot_run_with(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(ROOT / "configs" / "surgeon.yaml", overrides)


# -- the engines ----------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["vllm-lora", "vllm-merged", "hf"])
def test_generators_agree_with_the_learner_after_a_scale_change(tiny_model_path, engine):
    """The update carries the scales beside the adapter; every engine's sampled log-probs then
    equal the learner's, and differ from the unscaled model's. The adapter on q and v only
    also checks that merged serving reloads the k shard fused with them (it was garbage)."""
    learner = make_learner(tiny_model_path, LoraSettings(rank=4, alpha=8, target_modules=("q_proj", "v_proj", "o_proj")), attention_controls=True)
    with torch.no_grad():
        for name, p in learner.policy.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    if engine == "hf":
        served = HFEngine(tiny_model_path, EngineSettings(engine="hf", dtype="float32"), seed=0)
    else:
        served = build_engine(tiny_model_path, EngineSettings(engine="vllm", adapter_mode=engine.removeprefix("vllm-"), dtype="float32", kv_cache_gib=1, max_model_len=256), seed=0, max_lora_rank=8)
    prompts = [[1, 5, 9, 13, 17], [2, 4, 6, 8]]
    sampling = SamplingSettings(n=2, temperature=1.0, top_p=1.0, max_tokens=8, seed=3)
    layers, heads = learner.attention_scales().shape
    scales = 1 + 0.4 * (torch.rand(layers, heads, generator=torch.Generator().manual_seed(0)) - 0.5)
    gaps = []
    for step in (torch.ones(layers, heads), scales, scales * 0.8):
        learner.set_attention_scales(step)
        served.load_weights(learner.weight_update())
        completions = [c for group in served.generate(prompts, sampling) for c in group]
        batch = TrainBatch(
            prompt_token_ids=tuple(tuple(p) for p in prompts for _ in range(2)),
            completion_token_ids=tuple(c.token_ids for c in completions),
            old_logprobs=tuple(c.logprobs for c in completions),
            advantages=(0.0,) * 4,
            policy_versions=(0,) * 4,
        )
        ours = learner.logprobs(batch)
        gaps.append(max(abs(a - b) for c, row in zip(completions, ours) for a, b in zip(c.logprobs, row)))
        with learner.policy.controls.bypass():
            unscaled = learner.logprobs(batch)
        moved = max(abs(a - b) for x, y in zip(ours, unscaled) for a, b in zip(x, y))
        assert moved == 0.0 if bool(step.eq(1).all()) else moved > 1e-3
    assert max(gaps) < 1e-4, gaps


# -- the surgeon: RLlib's SAC --------------------------------------------------------------


@pytest.mark.slow
def test_surgeon_learns_a_bandit_and_survives_a_checkpoint(ray_cluster):
    """RLlib's SAC fed one transition at a time: on a bandit whose reward peaks at action 0.5
    its deterministic action moves there, the critic's loss falls, and a surgeon restored from
    the state acts the same (modules, optimizers, replay buffer and counters saved)."""
    from actors.surgeon import Surgeon, SurgeonSettings

    settings = SurgeonSettings(batch_size=16, learning_starts=8, updates_per_transition=4, hidden=[32, 32], initial_alpha=0.01, actor_lr=3e-3, critic_lr=3e-3)
    surgeon = Surgeon(settings, layers=2, heads=2, seed=0)
    obs = np.zeros(surgeon.env.observation_space.shape, np.float32)
    start = np.abs(surgeon.act(obs, explore=False) - 0.5).mean()
    losses = []
    for _ in range(200):
        action = surgeon.act(obs)
        metrics = surgeon.observe(obs, action, -float(np.mean((action - 0.5) ** 2)), obs)
        assert np.all(np.abs(action) <= 1.0)
        if "sac/critic_loss" in metrics:
            losses.append(metrics["sac/critic_loss"])
    assert {"sac/actor_loss", "sac/alpha", "sac/entropy", "sac/q_mean", "sac/td_error_mean"} <= set(metrics)
    end = np.abs(surgeon.act(obs, explore=False) - 0.5).mean()
    assert end < start / 3 and end < 0.1, (start, end)  # seeds 0-3: 0.30-0.62 -> 0.02-0.04
    assert np.mean(losses[-10:]) < np.mean(losses[:10])
    clone = Surgeon(settings, layers=2, heads=2, seed=7)
    clone.load_state(surgeon.state())
    np.testing.assert_allclose(clone.act(obs, explore=False), surgeon.act(obs, explore=False), rtol=1e-6)
    assert clone.transitions == 200 and clone.buffer.get_num_timesteps() == 200
    # the replay buffer's draws continue as they would have (its generator is seeded and saved)
    assert clone.buffer.rng.random() == surgeon.buffer.rng.random()


@pytest.mark.slow
def test_surgery_opens_windows_before_steps_and_judges_them_after(ray_cluster):
    """The surgery as the loop's participant, with a real surgeon actor and the steps' rows
    given by hand: a window opens before its first step (one action, new scales served) and is
    judged after its last, its metrics riding on the next step's row; a phase's end cuts it; a
    stop or a rollback inside a window leaves it without a transition. ``Scales`` stands in
    for the learner group (only its attention scales are read)."""
    from actors.surgeon import SurgeonSettings
    from cluster.features.surgery import Surgery

    class Scales:
        def attention_scales(self):
            return torch.ones(2, 2)

    schedule = PhaseSchedule([PhaseConfig("grpo", 1), PhaseConfig("surgery", 4), PhaseConfig("joint")])
    served = []
    settings = SurgeonSettings(horizon=2, learning_starts=1, batch_size=2, hidden=[8, 8], max_delta=0.05)
    surgery = Surgery(settings, schedule, torch.ones(2, 2), 0, served.append)

    def step(s: int, stopping: bool = False) -> dict:
        surgery.before_step(s, 10)
        return surgery.after_step(s, {"step": s, "train/reward_mean": 0.1 * s}, stopping)

    try:
        assert step(1) == {} and not served  # GRPO's phase: the surgeon waits
        assert step(2) == {} and len(served) == 1 and surgery.window.last_step == 3
        assert step(3) == {} and len(served) == 1 and surgery.window is None  # one action per window; judged
        added = step(4)  # a window of one step: the surgery phase ends at 4
        assert len(served) == 2 and added["surgery/window_steps"] == 2.0 and added["sac/transitions"] == 1.0
        assert step(5)["surgery/window_steps"] == 1.0 and surgery.window.last_step == 6
        assert step(6, stopping=True) == {} and surgery.window is None and surgery.observation is None
        step(7)
        surgery.rewind(Scales(), restart=False)  # a rollback inside the window [7, 8]
        assert surgery.window is None and len(served) == 4
        assert step(8) == {} and len(served) == 5 and surgery.window.last_step == 9
        assert step(9) == {} and step(10)["sac/transitions"] == 3.0  # windows 2-3, 4, 8-9: none from the stop or the rollback
        saved = json.loads(surgery.state()["surgery.json"])
        assert saved["phase"] == 2 and saved["recent"][-1]["step"] == 10
    finally:
        surgery.kill()


# -- the three phases on real actors ----------------------------------------------------------



@pytest.mark.slow
def test_three_phases_run_end_to_end_and_resume(ray_cluster, tiny_model_path, tmp_path):
    """GRPO (steps 1-2), surgery (3-6), joint (7-8) on the tiny model with the real generator
    and RLlib's SAC: GRPO's updates pause in surgery while the scales move and reach the
    generators as new policy versions; the surgeon's metrics are recorded; the checkpoint holds
    the surgeon and its environment, and a resumed run continues them; the report marks the
    phases."""
    from cluster.loop.driver import Trainer
    from cluster.commands.report import write_report
    from cluster.keeping.rundir import RunDir

    run_dir = RunDir(tmp_path / "run")
    trainer = tiny_trainer(
        tiny_model_path, run_dir.path, "run.steps=8", "run.checkpoint_every=4", "eval.n=4",
        "phases=[{name: grpo, until: 2}, {name: surgery, until: 6}, {name: joint}]", "surgeon.horizon=2",
        "surgeon.learning_starts=1", "surgeon.batch_size=2", "surgeon.max_delta=0.05", "algorithm.lr=0.05",
    )  # fmt: skip
    try:
        trainer.train(8)
        scales = trainer.crew.learners.attention_scales()
    finally:
        trainer.shutdown()
    rows = {r["step"]: r for r in run_dir.read_metrics()}
    assert [rows[s]["phase/index"] for s in range(1, 9)] == [0, 0, 1, 1, 1, 1, 2, 2]
    assert all(rows[s]["train/updates"] == 1.0 for s in (1, 2, 7, 8))
    assert all("train/updates" not in rows[s] for s in (3, 4, 5, 6))  # GRPO paused
    # versions: one per GRPO update, one per surgeon action (steps 3, 5, 7)
    assert [rows[s]["policy_version"] for s in range(1, 9)] == [1, 2, 3, 3, 4, 4, 6, 7]
    assert not torch.allclose(scales, torch.ones_like(scales)) and (scales >= 0.5).all() and (scales <= 1.5).all()
    # each window's transition is recorded on the step after it
    for step, transitions in ((5, 1.0), (7, 2.0)):
        assert rows[step]["sac/transitions"] == transitions and math.isfinite(rows[step]["sac/critic_loss"])
        assert 0 < rows[step]["surgery/action_magnitude"] <= 0.05 and math.isfinite(rows[step]["surgery/reward_improvement"])
    saved = run_dir.checkpoints / "step_000004"
    assert (saved / "surgeon.pkl").stat().st_size > 0
    env = json.loads((saved / "surgery.json").read_text())
    assert env["phase"] == 1 and len(env["scales"]) == scales.shape[0]
    report = write_report(run_dir.path).read_text()
    assert "| surgery | 3-6 |" in report and "| joint | 7-8 |" in report and "surgeon.png" in report

    resumed = Trainer.resume(run_dir.path, steps=10, scorer=spread_reward)
    try:
        assert torch.equal(resumed.crew.learners.attention_scales(), scales)  # the final checkpoint's
        resumed.train(10)
    finally:
        resumed.shutdown()
    rows = {r["step"]: r for r in run_dir.read_metrics()}
    # the third transition (steps 7-8) was learned before the final save; its metrics waited in it
    assert rows[9]["sac/transitions"] == 3.0 and rows[9]["phase/index"] == 2
