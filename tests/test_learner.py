"""The learner in-process (local mode): accumulation invariance for every loss family, the NaN
guard, PPO epochs and mini-batches, the LR schedule, KL, the critic, full-weight training."""

import dataclasses
import math
import random

import pytest
import torch

from helpers import learner_settings, make_learner
from learners.learner import Learner
from learners.policy import LoraSettings
from contracts import TrainBatch

LORA = LoraSettings(rank=4, alpha=8)


def random_batch(rows: int, seed: int = 0) -> TrainBatch:
    rng = random.Random(seed)
    prompts = tuple(tuple(rng.randrange(100, 5000) for _ in range(rng.randint(3, 6))) for _ in range(rows))
    completions = tuple(tuple(rng.randrange(100, 5000) for _ in range(rng.randint(1, 5))) for _ in range(rows))
    return TrainBatch(
        prompt_token_ids=prompts,
        completion_token_ids=completions,
        old_logprobs=tuple(tuple(-10.8 for _ in c) for c in completions),
        advantages=tuple(rng.gauss(0, 1) for _ in range(rows)),
        policy_versions=(0,) * rows,
        rewards=tuple(float(rng.random() < 0.5) for _ in range(rows)),
    )


def adapter_tensors(learner: Learner) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in learner.policy.weight_state().items()}


def nonzero_adapter(learner: Learner) -> None:
    """LoRA B starts at 0, which makes A's gradient 0; perturb B so every parameter moves."""
    with torch.no_grad():
        for name, p in learner.policy.model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.01)


VARIANTS = {
    "token-mean": {"loss_agg": "token-mean"},
    "seq-mean-token-mean": {"loss_agg": "seq-mean-token-mean"},
    "token-sum-norm": {"loss_agg": "token-sum-norm"},
    "pg": {"policy_loss": "pg"},
    "gspo": {"policy_loss": "gspo", "loss_agg": "seq-mean-token-mean"},
    "dual-clip+tis": {"dual_clip_c": 3.0, "tis_cap": 2.0},
    "kl-loss+entropy": {"kl_coef": 0.1, "kl_estimator": "k2", "entropy_coef": 0.01},
    "reinforce++-kl-reward": {"advantage": "reinforce++", "kl_coef": 0.1, "kl_mode": "reward", "kl_estimator": "k1"},
    "gae-critic": {"advantage": "gae", "lam": 0.9},
    "token-sac": {"policy_loss": "sac", "sac_alpha": 0.1},
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_batch_of_8_equals_8_micro_batches_of_1(tiny_model_path, variant):
    """The accumulated gradient is the same; so, up to float noise, is the Adam step."""
    batch = random_batch(8)
    results = []
    for micro in (8, 1):
        learner = make_learner(tiny_model_path, LORA, lr=1e-2, micro_batch_size=micro, max_grad_norm=1e9, **VARIANTS[variant])
        nonzero_adapter(learner)
        metrics = learner.step(batch)
        # step() leaves the accumulated (unclipped: max_grad_norm is huge) gradient in .grad
        grads = {n: p.grad.clone() for n, p in learner.policy.named_trainable()}
        results.append((grads, adapter_tensors(learner), metrics))
    (ga, a, ma), (gb, b, mb) = results
    assert any(g.norm() > 0 for g in ga.values())
    for name in ga:
        # float32 sums in another order: compare relative to the gradient's size
        assert (ga[name] - gb[name]).norm() <= 1e-4 * ga[name].norm() + 1e-9, name
    # Adam's first step is ~lr * g / (|g| + eps): gradients near eps amplify float noise, so
    # compare the parameters at a tolerance of a tenth of one step (lr = 1e-2)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-3)
    assert ma["train/grad_norm"] == pytest.approx(mb["train/grad_norm"], rel=1e-5)
    assert ma["train/loss"] == pytest.approx(mb["train/loss"], rel=1e-5)


def test_step_changes_lora_only_and_bumps_version(tiny_model_path):
    learner = make_learner(tiny_model_path, LORA, lr=1e-2)
    nonzero_adapter(learner)
    base_before = {k: v.clone() for k, v in learner.policy.model.named_parameters() if not v.requires_grad}
    lora_before = adapter_tensors(learner)
    metrics = learner.step(random_batch(6))
    assert learner.policy_version().version == 1
    assert all(math.isfinite(metrics[k]) for k in ("train/loss", "train/entropy", "train/grad_norm"))
    assert math.isnan(metrics["train/kl"])  # kl_coef 0: no reference pass, reported as null
    for name, p in learner.policy.model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, base_before[name]), f"base parameter {name} changed"
    after = adapter_tensors(learner)
    assert all(not torch.equal(lora_before[k], after[k]) for k in after)


def trainable_copy(learner: Learner) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in learner.policy.named_trainable()}


@pytest.mark.parametrize("poison", ["advantage", "reward"])
def test_nan_guard_skips_step_on_nan_input(tiny_model_path, poison):
    learner = make_learner(tiny_model_path, LORA, lr=1e-2, advantage="grpo" if poison == "advantage" else "gae")
    nonzero_adapter(learner)
    before = trainable_copy(learner)
    batch = random_batch(4)
    column = "advantages" if poison == "advantage" else "rewards"
    poisoned = dataclasses.replace(batch, **{column: (float("nan"), *getattr(batch, column)[1:])})
    metrics = learner.step(poisoned)
    assert metrics["train/skipped_steps"] == 1.0 and learner.skipped_steps == 1
    assert math.isnan(metrics["train/loss"])
    assert learner.policy_version().version == 0
    for key, value in trainable_copy(learner).items():
        assert torch.equal(value, before[key]), key
    learner.step(batch)  # the next healthy batch trains again
    assert learner.policy_version().version == 1


def test_nan_guard_skips_update_on_nan_loss(tiny_model_path, monkeypatch):
    """A NaN appearing inside the model (injected into the log-probs of one micro-batch)."""
    learner = make_learner(tiny_model_path, LORA, lr=1e-2, micro_batch_size=2)
    nonzero_adapter(learner)
    before = trainable_copy(learner)
    forward, calls = learner.policy.forward, []

    def poisoned_forward(*args, **kwargs):
        calls.append(1)
        logprobs, entropy = forward(*args, **kwargs)
        return (logprobs * float("nan") if len(calls) == 2 else logprobs), entropy

    monkeypatch.setattr(learner.policy, "forward", poisoned_forward)
    metrics = learner.step(random_batch(4))
    assert metrics["train/skipped_updates"] == 1.0 and metrics["train/skipped_steps"] == 1.0
    assert learner.policy_version().version == 0
    for key, value in trainable_copy(learner).items():
        assert torch.equal(value, before[key]), key


def test_epochs_and_mini_batches(tiny_model_path):
    """2 epochs x 3 mini-batches = 6 optimizer updates for one policy version; cosine LR decays."""
    learner = make_learner(tiny_model_path, LORA, lr=1e-2, ppo_epochs=2, mini_batch_size=3, micro_batch_size=2, lr_schedule="cosine", total_steps=4)
    nonzero_adapter(learner)
    metrics = learner.step(random_batch(8))
    assert metrics["train/updates"] == 6.0 and learner.policy_version().version == 1
    # after the first update the policy moved: ratios leave 1 in later mini-batches
    assert metrics["train/ratio_max"] > metrics["train/ratio_min"]
    lrs = [metrics["train/lr"]] + [learner.step(random_batch(8, seed=i))["train/lr"] for i in range(1, 4)]
    assert lrs == pytest.approx([1e-2 * 0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(1, 5)])


def test_kl_is_zero_at_start_and_positive_after_training(tiny_model_path):
    learner = make_learner(tiny_model_path, LORA, lr=5e-2, kl_coef=0.1)
    batch = random_batch(6)
    assert learner.step(batch)["train/kl"] == pytest.approx(0.0, abs=1e-7)  # adapter B = 0: policy == reference
    learner.step(batch)
    assert learner.step(batch)["train/kl"] > 0


def test_gae_trains_the_critic_toward_the_returns(tiny_model_path):
    """lam = 1: the returns are the Monte-Carlo returns, a fixed target the value loss must fit."""
    learner = make_learner(tiny_model_path, LORA, lr=1e-2, critic_lr=3e-3, advantage="gae", lam=1.0, value_clip=None)
    batch = random_batch(8)
    losses = [learner.step(batch)["train/value_loss"] for _ in range(10)]
    assert losses[-1] < 0.25 * losses[0], losses
    # the policy adapter is what generators get; the critic never leaves the learner
    assert all("critic" not in key for key in learner.weight_update().tensors)


def test_full_weight_training_updates_every_weight_and_serves_through_hf(tiny_model_path):
    from contracts import SamplingSettings
    from rollout.engines import EngineSettings, HFEngine

    learner = make_learner(tiny_model_path, None, lr=1e-3, kl_coef=0.1)
    before = {n: p.detach().clone() for n, p in learner.policy.model.named_parameters()}
    metrics = learner.step(random_batch(6))
    assert metrics["train/kl"] == pytest.approx(0.0, abs=1e-6)  # the frozen reference copy equals the start
    changed = [n for n, p in learner.policy.model.named_parameters() if not torch.equal(p, before[n])]
    assert "model.layers.0.self_attn.q_proj.weight" in changed and len(changed) > len(before) // 2
    update = learner.weight_update()
    assert update.kind == "full" and update.policy.version == 1
    assert learner.step(random_batch(6, seed=1))["train/kl"] > 0
    engine = HFEngine(tiny_model_path, EngineSettings(engine="hf", dtype="float32"), seed=0)
    engine.load_weights(learner.weight_update())
    batch = random_batch(1)
    completion = engine.generate(batch.prompt_token_ids, SamplingSettings(n=1, temperature=1.0, top_p=1.0, max_tokens=6))[0][0]
    replay = TrainBatch(batch.prompt_token_ids, (completion.token_ids,), (completion.logprobs,), (0.0,), (0,))
    torch.testing.assert_close(torch.tensor(learner.logprobs(replay)[0]), torch.tensor(completion.logprobs), atol=1e-4, rtol=0)


def test_chosen_modules_train_alone_and_the_reference_keeps_their_start(tiny_model_path):
    """model.train: modules (a frozen backbone): only parameters under the named prefixes
    move; the KL reference is the model with those modules' starting values; the generators
    get only the trained tensors, the final model folder every one."""
    chosen = ("model.layers.1", "model.norm")
    learner = make_learner(tiny_model_path, None, lr=1e-2, kl_coef=0.1, trainable_modules=chosen)
    before = {n: p.detach().clone() for n, p in learner.policy.model.named_parameters()}
    batch = random_batch(6)
    start = torch.tensor(learner.logprobs(batch)[0])
    assert learner.step(batch)["train/kl"] == pytest.approx(0.0, abs=1e-7)
    learner.step(random_batch(6, seed=1))
    changed = {n for n, p in learner.policy.model.named_parameters() if not torch.equal(p, before[n])}
    trained = {n for n in before if n == "model.norm.weight" or n.startswith("model.layers.1.")}
    assert changed == trained
    assert learner.step(batch)["train/kl"] > 0
    packed = next(learner.packed_micro_batches(batch.select([0])))[2]
    torch.testing.assert_close(learner.policy.reference_forward(packed)[0], start[: len(batch.completion_token_ids[0])])
    assert set(learner.weight_update().tensors) == trained
    assert set(learner.weight_update(complete=True).tensors) == set(before)
    with pytest.raises(ValueError, match=r"\['model.layers.9'\] name no parameter"):
        make_learner(tiny_model_path, None, trainable_modules=("model.layers.9",))


def test_supervised_objective_is_the_mean_nll_and_lowers_it(tiny_model_path):
    """``step(batch, "sft")``: the loss is -(sum of the completion tokens' log-probs) / tokens,
    advantages and rewards play no part, and repeated steps fit the completions."""
    learner = make_learner(tiny_model_path, LORA, lr=2e-2, micro_batch_size=3)
    nonzero_adapter(learner)
    batch = dataclasses.replace(random_batch(8), advantages=(0.0,) * 8, rewards=(0.0,) * 8)
    tokens = sum(len(c) for c in batch.completion_token_ids)
    nll = -sum(sum(row) for row in learner.logprobs(batch)) / tokens
    first = learner.step(batch, "sft")
    assert first["train/sft_loss"] == pytest.approx(nll, rel=1e-5)
    assert first["train/loss"] == pytest.approx(nll, rel=1e-5) and learner.policy_version().version == 1
    losses = [learner.step(batch, "sft")["train/sft_loss"] for _ in range(5)]
    assert losses[-1] < nll - 1.0 and losses[0] < nll, (nll, losses)  # nats per token
    with pytest.raises(ValueError, match=r"unknown objective 'dpo'; known: \['ppo', 'sft'\]"):
        learner.step(batch, "dpo")


def test_sequence_logprob_sums_the_target_tokens_under_policy_or_reference(tiny_model_path):
    learner = make_learner(tiny_model_path, LORA, lr=1e-2, temperature=0.7)
    batch = random_batch(5)
    contexts, targets = [list(p) for p in batch.prompt_token_ids], [list(c) for c in batch.completion_token_ids]
    # adapter B = 0: the policy is the reference
    assert learner.sequence_logprob(contexts, targets) == pytest.approx(learner.sequence_logprob(contexts, targets, reference=True), abs=1e-5)
    nonzero_adapter(learner)
    policy = learner.sequence_logprob(contexts, targets)
    reference = learner.sequence_logprob(contexts, targets, reference=True)
    assert all(p != pytest.approx(r, abs=1e-4) for p, r in zip(policy, reference))
    # temperature 1, whatever the sampling temperature: the token log-probs of a T=1 learner
    at_one = make_learner(tiny_model_path, LORA, lr=1e-2)
    nonzero_adapter(at_one)
    assert policy == pytest.approx([sum(row) for row in at_one.logprobs(batch)], abs=1e-4)
    assert all(x < 0 for x in policy)
    with pytest.raises(ValueError, match="2 contexts but 1 targets"):
        learner.sequence_logprob(contexts[:2], targets[:1])


def test_truncated_is_with_one_update_reuses_the_loss_pass(tiny_model_path, monkeypatch):
    """One update per step: the learner's pre-update log-probs are the loss pass's own
    (detached), so truncated IS costs no extra forward and trains exactly as with the extra
    pass (forced here by a mini-batch of the whole batch, still one update)."""
    batch = random_batch(8)
    results = []
    for mini in (0, 8):
        learner = make_learner(tiny_model_path, LORA, lr=1e-2, tis_cap=2.0, micro_batch_size=4, mini_batch_size=mini)
        nonzero_adapter(learner)
        calls = []
        forward = learner.policy.forward
        monkeypatch.setattr(learner.policy, "forward", lambda *a, **k: calls.append(1) or forward(*a, **k))
        metrics = learner.step(batch)
        results.append((len(calls), metrics, adapter_tensors(learner)))
    (calls_one, one, a), (calls_two, two, b) = results
    assert (calls_one, calls_two) == (2, 4)  # 2 micro-batches: loss passes only, vs a pre-pass too
    for key in ("train/loss", "train/tis_weight_mean", "train/logprob_mismatch", "train/grad_norm"):
        assert one[key] == pytest.approx(two[key], rel=1e-5, abs=1e-7), key
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)


def test_gradient_checkpointing_trains_the_same_weights(tiny_model_path):
    """Recomputing activations in the backward pass changes memory, not the step."""
    plain = make_learner(tiny_model_path, LORA, lr=1e-2, micro_batch_size=4)
    checkpointed = make_learner(tiny_model_path, LORA, lr=1e-2, micro_batch_size=4, gradient_checkpointing=True)
    assert checkpointed.policy.causal_lm.is_gradient_checkpointing and not plain.policy.causal_lm.is_gradient_checkpointing
    for learner in (plain, checkpointed):
        nonzero_adapter(learner)
    for seed in (0, 1):
        a, b = plain.step(random_batch(8, seed=seed)), checkpointed.step(random_batch(8, seed=seed))
        assert b["train/loss"] == pytest.approx(a["train/loss"], rel=1e-5, abs=1e-7)
        assert b["train/grad_norm"] == pytest.approx(a["train/grad_norm"], rel=1e-4)
    for key, tensor in adapter_tensors(plain).items():
        torch.testing.assert_close(adapter_tensors(checkpointed)[key], tensor, rtol=0, atol=1e-5)


def test_the_learner_trains_where_it_is_told_and_checkpoints_to_the_cpu(tiny_model_path):
    """The device is the caller's choice (the actor passes the one Ray assigned); a
    checkpoint's tensors are CPU copies whatever the device, so a GPU-less driver can hold them.
    Here only the CPU path can run; deploy/gpu_smoke.py drives the same class on a GPU."""
    from learners.policy import autocast_of, native_bf16

    learner = Learner(learner_settings(tiny_model_path, LORA), device="cpu")
    assert learner.device == torch.device("cpu")
    assert {p.device.type for p in learner.policy.model.parameters()} == {"cpu"}
    learner.step(random_batch(4))
    state = learner.state_dict()
    tensors = [*state["trainable"].values(), *(t for s in state["optimizer"]["state"].values() for t in s.values())]
    assert tensors and all(t.device.type == "cpu" for t in tensors)
    # unset autocast: bf16 on a GPU and on a CPU with bf16 units, else none; "float32" turns it off anywhere
    assert autocast_of(None, torch.device("cuda", 0)) is torch.bfloat16
    assert autocast_of(None, torch.device("cpu")) is (torch.bfloat16 if native_bf16(torch.device("cpu")) else None)
    assert autocast_of("float32", torch.device("cuda", 0)) is None
    assert autocast_of("bfloat16", torch.device("cpu")) is torch.bfloat16
