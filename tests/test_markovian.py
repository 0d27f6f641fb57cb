"""Markovian chain-of-thought training: the answer contexts, the reward on the learner, the
actor-reward term, the perturbations, the config checks, and the recipe on real actors.

The learner tests drive the plain ``Learner`` in-process on the tiny model (SmolLM2's
tokenizer and chat template); the run tests use the session's Ray cluster, the vLLM engine
and the verifier pool, as ``raylight train`` does.
"""

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from cluster.config import ConfigError, load_config
from contracts import Problem, TrainBatch
from helpers import make_learner
from learners.policy import LoraSettings
from rollout.markovian import MarkovianPrompts, MarkovianSettings, perturb

ROOT = Path(__file__).resolve().parents[1]
LORA = LoraSettings(rank=8, alpha=16, dropout=0.0)
SYSTEM = "You are a helpful assistant."


def problem(uid: str, question: str, answer: str) -> Problem:
    return Problem(uid=uid, question=question, answer=answer, task="gsm8k")


@pytest.fixture(scope="module")
def prompts(tiny_model_path):
    return MarkovianPrompts(AutoTokenizer.from_pretrained(tiny_model_path), MarkovianSettings(enabled=True, cot_length=12))


def hand_answer_logprob(model, context: tuple[int, ...], answer: tuple[int, ...]) -> float:
    """sum_t log p(answer_t | context, answer_<t), straight from the HF model's logits."""
    ids = torch.tensor([list(context) + list(answer)])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids).logits[0].double(), dim=-1)
    return sum(logprobs[len(context) - 1 + t, token].item() for t, token in enumerate(answer))


def test_answer_context_holds_the_cot_and_no_question(prompts):
    apples = problem("a", "Ann has 4217 apples and buys 3 more. How many?", "4220")
    prompt = prompts.question_prompt(apples, SYSTEM)
    assert "Ann has 4217 apples" in prompt.text and prompt.text.endswith("Reasoning:")
    assert "12 tokens" in prompt.text  # the instruction names the CoT budget
    cot = prompts.cot_ids(" She ends with 4220.")
    context = prompts.answer_context(cot, apples, SYSTEM)
    text = prompts.tokenizer.decode(context)
    assert "4217" not in text and "apples" not in text and "<Redacted>" in text
    assert text.endswith("Reasoning: She ends with 4220. Answer:")
    assert context[len(context) - len(cot) - len(prompts.answer_header_ids) : -len(prompts.answer_header_ids)] == cot
    assert prompts.tokenizer.decode(prompts.answer_ids(apples)) == " 4220"
    # the same CoT after another question: the very same context
    other = problem("b", "Bob has 9 pears. How many?", "9")
    assert prompts.answer_context(cot, other, SYSTEM) == context
    # the Non-Markovian comparison scores the answer with the question in view
    visible = MarkovianPrompts(prompts.tokenizer, MarkovianSettings(cot_length=12, redact_question=False))
    with_question = visible.answer_context(cot, apples, SYSTEM)
    assert with_question == visible.question_prompt(apples, SYSTEM).token_ids + cot + prompts.answer_header_ids
    assert "Ann has 4217 apples" in prompts.tokenizer.decode(with_question)


def test_reward_is_the_frozen_answer_logprob_hand_computed(tiny_model_path, prompts):
    """The learner's frozen-model score of an answer after a CoT is the sum of the answer
    tokens' log-probs (nothing of the context counted), with the adapter off whatever the
    policy has learnt; the reward is that score minus the baseline CoT's."""
    learner = make_learner(tiny_model_path, LORA, lr=1e-2)
    with torch.no_grad():  # a trained adapter: the policy differs from the frozen model
        for name, p in learner.policy.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path).eval()
    apples = problem("a", "Ann has 12 apples and buys 3 more. How many?", "15")
    cot, baseline_cot = prompts.cot_ids(" 12 and 3 make 15."), prompts.cot_ids(" I am not sure.")
    contexts = [prompts.answer_context(c, apples, SYSTEM) for c in (cot, baseline_cot)]
    answer = prompts.answer_ids(apples)
    frozen = learner.sequence_logprob(contexts, [answer, answer], reference=True)
    expected = [hand_answer_logprob(model, c, answer) for c in contexts]
    assert frozen == pytest.approx(expected, abs=1e-4)
    assert frozen[0] - frozen[1] == pytest.approx(expected[0] - expected[1], abs=1e-4)
    policy = learner.sequence_logprob(contexts, [answer, answer])
    assert all(p != pytest.approx(f, abs=1e-3) for p, f in zip(policy, frozen))


def markovian_batch(prompts, n: int = 4, weight: float = 0.0) -> TrainBatch:
    """A Markovian batch: question prompts, sampled-looking CoTs, their answer contexts, and
    the actor reward's ``weight`` on every row."""
    rows = [problem(f"p{i}", f"Ann has {i} apples and buys 3 more. How many?", str(i + 3)) for i in range(n)]
    question_ids = [prompts.question_prompt(p, SYSTEM).token_ids for p in rows]
    cots = [prompts.cot_ids(f" {i} plus 3 is {i + 3}.") for i in range(n)]
    return TrainBatch(
        prompt_token_ids=tuple(question_ids), completion_token_ids=tuple(cots),
        old_logprobs=tuple((-1.0,) * len(c) for c in cots), advantages=(0.0,) * n, policy_versions=(0,) * n,
        answer_prompt_token_ids=tuple(prompts.answer_context(c, p, SYSTEM) for c, p in zip(cots, rows)),
        answer_token_ids=tuple(prompts.answer_ids(p) for p in rows), answer_weights=(weight,) * n,
    )  # fmt: skip


def test_actor_reward_raises_the_policy_answer_logprob_and_the_frozen_model_stays_frozen(tiny_model_path, prompts):
    """Zero advantages and no KL: the only gradient is the actor reward's. Its loss is
    -w * mean_i log pi(answer_i | CoT_i); steps raise the policy's answer log-prob while the
    frozen model's scores (and every frozen parameter) stay exactly as they were."""
    learner = make_learner(tiny_model_path, LORA, lr=5e-3, policy_loss="pg")
    batch = markovian_batch(prompts, weight=0.5)
    contexts, answers = list(batch.answer_prompt_token_ids), list(batch.answer_token_ids)
    frozen_before = learner.sequence_logprob(contexts, answers, reference=True)
    digest = learner.parameter_digest()
    start = learner.sequence_logprob(contexts, answers)
    metrics = learner.step(batch)
    assert metrics["train/actor_reward_loss"] == pytest.approx(-0.5 * sum(start) / len(start), rel=1e-4)
    for _ in range(3):
        learner.step(batch)
    after = learner.sequence_logprob(contexts, answers)
    assert sum(after) > sum(start) + 0.5
    assert learner.sequence_logprob(contexts, answers, reference=True) == frozen_before
    assert learner.parameter_digest()["frozen"] == digest["frozen"] and learner.parameter_digest()["trainable"] != digest["trainable"]


def test_answer_rows_without_a_weight_are_ignored(tiny_model_path, prompts):
    learner = make_learner(tiny_model_path, LORA, lr=5e-3, policy_loss="pg")
    metrics = learner.step(markovian_batch(prompts))
    assert "train/actor_reward_loss" not in metrics and metrics["train/updates"] == 1.0


def test_perturbations():
    cots = ["abcdefghij", "0123456789", "xyz"]
    assert perturb(cots, "swap", 0.5, 0) == ["0123456789", "xyz", "abcdefghij"]
    assert perturb(cots, "truncate", 0.5, 0) == ["abcde", "01234", "x"]
    deleted = perturb(cots, "delete", 0.5, seed=3)
    assert [len(d) for d in deleted] == [5, 5, 2]
    assert all(set(d) <= set(c) and "".join(sorted(d)) == d for d, c in zip(deleted, cots))  # order kept
    assert deleted == perturb(cots, "delete", 0.5, seed=3) != perturb(cots, "delete", 0.5, seed=4)
    with pytest.raises(ValueError, match="unknown perturbation 'shuffle'"):
        perturb(cots, "shuffle", 0.5, 0)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["algorithm.actor_reward_weight=0.5"], "set markovian.enabled=true"),
        (["markovian.enabled=true", "model.train=full", "generator.adapter_mode=merged"], "set model.train=lora"),
        (["markovian.enabled=true", "generator.adapter_mode=merged"], "set generator.adapter_mode=lora"),
        (["markovian.enabled=true", "generator.adapter_mode=lora", "rollout.dynamic_sampling=true"], "cannot run with rollout.dynamic_sampling"),
        (["markovian.enabled=true", "generator.adapter_mode=lora", "bank.enabled=true"], "cannot run with bank.enabled"),
        (["markovian.enabled=true", "generator.adapter_mode=lora", "markovian.instruction=Think."], "must hold {question}"),
        (["markovian.enabled=true", "generator.adapter_mode=lora", "markovian.perturbations=[shuffle]"], "markovian.perturbations"),
    ],
)
def test_config_checks_name_the_keys(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("{", r"\{").replace("}", r"\}")):
        load_config(ROOT / "configs/tiny.yaml", overrides)


def test_ppo_with_the_actor_reward_is_warned_about(caplog):
    load_config(ROOT / "configs/tiny.yaml", ["markovian.enabled=true", "generator.adapter_mode=lora", "algorithm.actor_reward_weight=0.5"])
    assert "collapse into repeated tokens" in caplog.text
    caplog.clear()
    load_config(ROOT / "configs/tiny.yaml", ["markovian.enabled=true", "generator.adapter_mode=lora", "algorithm.actor_reward_weight=0.5", "algorithm.policy_loss=pg"])
    assert "collapse" not in caplog.text


def write_apples(folder: Path, n: int = 24) -> Path:
    """GSM8K-style fixture rows (the Hub's format): Ann has i apples and buys 3 more."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, offset in (("train", 0), ("test", 100)):  # validation is carved from train
        rows = [{"question": f"Ann has {i} apples and buys 3 more. How many apples does Ann have?", "answer": f"{i} + 3 = {i + 3}\n#### {i + 3}"} for i in range(offset, offset + n)]
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def write_arc(folder: Path, n: int = 24) -> Path:
    """ARC-Challenge-format fixture rows: four labelled choices and an answer key."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, offset in (("train", 0), ("validation", 100), ("test", 200)):
        rows = [{"question": f"Which number is largest in set {i}?", "choices": {"text": [str(i), str(i + 1), str(i + 9), str(i + 2)], "label": list("ABCD")},
                 "answerKey": "C"} for i in range(offset, offset + n)]  # fmt: skip
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


RECIPES = {  # config -> (fixture writer, the extraction methods its scorer reports)
    "gsm8k": (write_apples, ("anchor", "last", "first", "simple")),
    "arc_challenge": (write_arc, ("legacy", "word_boundary")),
}


@pytest.mark.slow
@pytest.mark.parametrize("recipe", list(RECIPES))
def test_markovian_recipe_runs_end_to_end_on_the_tiny_model(ray_cluster, tiny_model_path, tmp_path, recipe):
    """configs/markovian/<recipe>.yaml through ``raylight train`` on fixture rows in the
    dataset's format, sizes shrunk: CoTs of exactly cot_length tokens; each rollout's reward is
    the policy's answer log-prob minus its problem's baseline (the frozen model's greedy CoT',
    generated once per problem); the evaluation reports the intact and perturbed CoTs and every
    extraction method of the task's scorer, and ``raylight eval`` of the saved adapter
    reproduces it."""
    from cluster.commands.cli import main

    write, methods = RECIPES[recipe]
    data = write(tmp_path / recipe)
    run_dir = tmp_path / "run"
    args = ["train", f"configs/markovian/{recipe}.yaml", "--run-dir", str(run_dir), "--steps", "2", f"model.path={tiny_model_path}",
            f"tasks.0.source={data}", "rollout.prompts_per_step=2", "rollout.group_size=4", "markovian.cot_length=8", "eval.n=4",
            "eval.every=0", "generator.max_model_len=256", "generator.kv_cache_gib=1", "run.checkpoint_every=0"]  # fmt: skip
    assert main(args) == 0
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2]
    train = rows[1:]
    assert [r["markovian/baselines_generated"] for r in train] == [2.0, 2.0]  # two new problems a step
    assert all(math.isfinite(r["train/actor_reward_loss"]) and r["train/updates"] == 1.0 for r in train)
    assert all(r["train/completion_length"] == 8.0 for r in train)
    import pyarrow.parquet as pq

    table = pq.read_table(run_dir / "rollouts" / "step_000001.parquet").to_pylist()
    assert len(table) == 8 and all(len(r["completion_token_ids"]) == 8 for r in table)
    baselines = {}
    for r in table:
        parts = r["reward_components"]
        assert r["reward"] == pytest.approx(parts["actor_answer_logprob"] - parts["baseline_logprob"], abs=1e-9)
        assert parts["answer_logprob"] < 0 and r["prompt"].endswith("Reasoning:")
        baselines.setdefault(r["prompt_uid"], set()).add(parts["baseline_logprob"])
    assert len(baselines) == 2 and all(len(b) == 1 for b in baselines.values())
    last = rows[-1]
    for variant in ("intact", "delete", "truncate", "swap"):
        assert 0.0 <= last[f"eval/markovian/{variant}/accuracy"] <= 1.0 and last[f"eval/markovian/{variant}/answer_logprob"] < 0
    assert {f"eval/reward/correct_{m}" for m in methods} <= set(last)
    assert last["eval/n"] == rows[0]["eval/n"] > 0 and last["eval/accuracy"] == last["eval/markovian/intact/accuracy"]
    if recipe == "gsm8k":  # raylight eval of the saved adapter reproduces the run's last evaluation
        out = tmp_path / "eval.json"
        assert main(["eval", str(run_dir / "config.yaml"), "--adapter", str(run_dir / "final_adapter"), "--output", str(out)]) == 0
        again = json.loads(out.read_text())
        keys = [k for k in last if k.startswith("eval/markovian/")]
        assert len(keys) == 8 and again["eval/n"] == last["eval/n"]
        assert {k: again[k] for k in keys} == pytest.approx({k: last[k] for k in keys}, abs=1e-4)


def trained_learner(tiny_model_path):
    """A learner whose adapter is far from zero: its policy and the base model differ."""
    learner = make_learner(tiny_model_path, LORA, lr=1e-2)
    with torch.no_grad():
        for name, p in learner.policy.model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.3)
    return learner


def engine_matches_learner(samples, learner, reference: bool) -> float:
    """The largest gap between the engine's sampled-token log-probs and the learner's
    (under the policy, or the base model with ``reference``)."""
    contexts = [list(s.prompt.token_ids) for s in samples]
    gaps = []
    for sample, context in zip(samples, contexts):
        for t, token in enumerate(sample.completion.token_ids):
            expected = learner.sequence_logprob([context + list(sample.completion.token_ids[:t])], [[token]], reference=reference)[0]
            gaps.append(abs(expected - sample.completion.logprobs[t]))
    return max(gaps)


def test_hf_engine_serves_the_base_model_beside_the_adapter(tiny_model_path, prompts):
    from contracts import SamplingSettings
    from rollout.engines import EngineSettings, HFEngine
    from rollout.generator import BASE_POLICY, Generator

    learner = trained_learner(tiny_model_path)
    generator = Generator(tiny_model_path, EngineSettings(engine="hf", dtype="float32"), seed=0, max_lora_rank=8)  # no vLLM
    assert isinstance(generator.engine, HFEngine)
    generator.load_weights(learner.weight_update())
    question = [prompts.question_prompt(problem("a", "Ann has 3 apples.", "3"), SYSTEM)]
    exact = SamplingSettings(n=2, temperature=1.0, top_p=1.0, max_tokens=6, min_tokens=6, seed=0)
    base = generator.generate(question, exact, BASE_POLICY.adapter)
    policy = generator.generate(question, exact)
    assert [s.policy for s in base] == [BASE_POLICY] * 2 and all(s.policy.version == 0 and s.policy != BASE_POLICY for s in policy)
    assert all(len(s.completion.token_ids) == 6 for s in base + policy)
    assert engine_matches_learner(base, learner, reference=True) < 1e-4
    assert engine_matches_learner(policy, learner, reference=False) < 1e-4


@pytest.mark.slow
def test_vllm_lora_engine_serves_the_base_model_beside_the_adapter(ray_cluster, tiny_model_path, prompts):
    """A vLLM generator actor serving a trained LoRA answers a BASE_POLICY request from the
    base model (its log-probs are the frozen model's, not the policy's) and the policy's
    requests from the adapter; min_tokens = max_tokens gives CoTs of exactly that length.
    A merged adapter has no base left to serve: the request fails naming the key."""
    from actors.generator import GeneratorPool
    from cluster.loop.wiring import start_generator
    from contracts import SamplingSettings
    from rollout.generator import BASE_POLICY

    learner = trained_learner(tiny_model_path)
    config = load_config(ROOT / "configs/tiny.yaml", [f"model.path={tiny_model_path}", "generator.adapter_mode=lora"])
    actor = start_generator(config, tiny_model_path)
    try:
        pool = GeneratorPool([actor])
        pool.broadcast(ray_cluster.put(learner.weight_update()), learner.policy_version())
        questions = [prompts.question_prompt(problem(f"q{i}", f"Ann has {i} apples.", str(i)), SYSTEM) for i in range(3)]
        exact = SamplingSettings(n=2, temperature=1.0, top_p=1.0, max_tokens=10, min_tokens=10, seed=0)
        base = pool.generate(questions, exact, BASE_POLICY)
        policy = pool.generate(questions, exact)
        assert {s.policy for s in base} == {BASE_POLICY} and {s.policy for s in policy} == {learner.policy_version()}
        assert all(len(s.completion.token_ids) == 10 for s in base + policy)
        assert engine_matches_learner(base, learner, reference=True) < 2e-3
        assert engine_matches_learner(policy, learner, reference=False) < 2e-3
        assert engine_matches_learner(base, learner, reference=False) > 0.05  # the adapter is far from zero
    finally:
        ray_cluster.kill(actor)
    merged = start_generator(load_config(ROOT / "configs/tiny.yaml", [f"model.path={tiny_model_path}"]), tiny_model_path)
    try:
        ray_cluster.get(merged.load_weights.remote(learner.weight_update()))
        with pytest.raises(Exception, match="set generator.adapter_mode=lora"):
            ray_cluster.get(merged.generate.remote(questions, exact, BASE_POLICY.adapter))
    finally:
        ray_cluster.kill(merged)


@pytest.mark.slow
def test_smollm2_markovian_run_raises_the_answer_logprob_given_the_cot(ray_cluster, tmp_path):
    """SmolLM2-135M-Instruct on GSM8K-format rows with configs/markovian/gsm8k.yaml (policy
    gradient + actor reward, KL 0.1), shortened to 3 steps of 2 questions x 6 CoTs of 24 tokens
    at a higher learning rate: the held-out answer's log-prob given the policy's CoT (question
    redacted, the same questions and CoT seed at both ends) rises by more than a nat."""
    from cluster.commands.cli import main

    data = write_apples(tmp_path / "gsm8k", n=80)
    run_dir = tmp_path / "run"
    args = ["train", "configs/markovian/gsm8k.yaml", "--run-dir", str(run_dir), "--steps", "3", f"tasks.0.source={data}",
            "rollout.prompts_per_step=2", "rollout.group_size=6", "markovian.cot_length=24", "algorithm.lr=1e-3", "eval.n=8",
            "eval.every=0", "run.checkpoint_every=0", "run.save_rollouts=false"]  # fmt: skip
    assert main(args) == 0
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    start, end = rows[0], rows[-1]
    assert start["step"] == 0 and end["step"] == 3 and end["eval/n"] == start["eval/n"] == 8
    rise = end["eval/markovian/intact/answer_logprob"] - start["eval/markovian/intact/answer_logprob"]
    assert rise > 1.0, (start["eval/markovian/intact/answer_logprob"], end["eval/markovian/intact/answer_logprob"])
    assert all(r["train/updates"] == 1.0 and r["train/kl"] < 1.0 for r in rows[1:])


def test_a_saved_adapter_loads_into_the_learner_and_a_misfit_is_named(tiny_model_path, tmp_path):
    """What ``raylight eval`` of a Markovian adapter does: the saved adapter's tensors become
    the learner's policy (log-probs equal the trained learner's); an adapter of another rank
    is refused naming the keys."""
    from rollout.engines import read_adapter, write_adapter

    trained = trained_learner(tiny_model_path)
    folder = write_adapter(trained.weight_update(), tmp_path / "adapter")
    fresh = make_learner(tiny_model_path, LORA)
    fresh.load_adapter(read_adapter(folder))
    batch = markovian_batch(MarkovianPrompts(AutoTokenizer.from_pretrained(tiny_model_path), MarkovianSettings(cot_length=12)))
    contexts, answers = list(batch.answer_prompt_token_ids), list(batch.answer_token_ids)
    assert fresh.sequence_logprob(contexts, answers) == pytest.approx(trained.sequence_logprob(contexts, answers), abs=1e-5)
    other_rank = make_learner(tiny_model_path, LoraSettings(rank=4, alpha=8))
    with pytest.raises(ValueError, match="does not fit this policy"):
        other_rank.load_adapter(read_adapter(folder))
