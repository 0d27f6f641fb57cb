"""Multi-turn episodes without Ray: token-in token-out with a real chat template (SmolLM2's),
the loss masks through the real learner, and the built-in environments with the real sandbox."""

import pytest
import torch
from transformers import AutoTokenizer

from contracts import Completion, EnvStep, PolicyRef, Problem, TrainBatch, Verdict
from helpers import make_learner
from learners.algorithms import discounted_returns, outcome_token_rewards
from learners.batch import build_train_batch
from learners.policy import LoraSettings
from rewards.environments import CodeRepair, EnvironmentSettings, GuessNumber, PythonTool, clip, environment_factory
from rewards.sandbox import Sandbox, SandboxLimits
from rollout.episodes import ChatDelta, EpisodeBuilder

PROBLEM = Problem(uid="p0", question="What is 3 + 4?", answer="7")


@pytest.fixture(scope="module")
def tokenizer(tiny_model_path):
    return AutoTokenizer.from_pretrained(tiny_model_path)


def turn(tokenizer, text: str, end: bool = True, logprob: float = -0.5) -> Completion:
    ids = tuple(tokenizer(text, add_special_tokens=False)["input_ids"]) + ((tokenizer.eos_token_id,) if end else ())
    return Completion(ids, text, (logprob,) * len(ids), "stop" if end else "length")


def test_an_episode_built_token_by_token_is_the_chat_template_of_its_conversation(tokenizer):
    """Appending the sampled turns and each observation's template delta gives exactly the ids
    of the whole conversation rendered at once: nothing earlier is re-tokenised, nothing lost."""
    delta = ChatDelta(tokenizer)
    messages = GuessNumber("Be brief.").reset(PROBLEM)
    prompt = delta.prompt(PROBLEM, messages)
    episode = EpisodeBuilder(prompt, 0)
    conversation = list(messages)
    for guess, feedback in (("5", "Higher."), ("9", "Lower.")):
        sampled = turn(tokenizer, guess)
        episode.add_turn(sampled, PolicyRef("policy", 3))
        observation = delta.closing(sampled.token_ids) + delta.observation([{"role": "user", "content": feedback}])
        episode.add_observation(observation, tokenizer.decode(observation))
        conversation += [{"role": "assistant", "content": guess}, {"role": "user", "content": feedback}]
    episode.add_turn(turn(tokenizer, "7"), PolicyRef("policy", 4))
    conversation.append({"role": "assistant", "content": "7"})
    whole = tokenizer(tokenizer.apply_chat_template(conversation, tokenize=False), add_special_tokens=False)["input_ids"]
    assert list(episode.context()) == whole[: len(episode.context())]
    assert whole[len(episode.context()) :] == list(delta.separator)  # the template's newline after the last turn

    sample = episode.sample()
    mask, ids = sample.episode.loss_mask, sample.completion.token_ids
    policy_ids = [t for t, keep in zip(ids, mask) if keep]
    assert policy_ids == [t for guess in ("5", "9", "7") for t in turn(tokenizer, guess).token_ids]
    assert [lp for lp, keep in zip(sample.completion.logprobs, mask) if not keep] == [0.0] * (len(mask) - sum(mask))
    assert sample.policy == PolicyRef("policy", 3) and sample.episode.turns == 3  # the oldest turn's policy
    assert sample.answer_text == "7" and "Higher." in sample.completion.text


def test_a_turn_cut_short_is_closed_with_the_templates_end_token(tokenizer):
    delta = ChatDelta(tokenizer)
    cut = turn(tokenizer, "I think", end=False)
    assert delta.closing(cut.token_ids) == (tokenizer.eos_token_id, *delta.separator)
    assert delta.closing(turn(tokenizer, "5").token_ids) == delta.separator


def test_a_base_model_without_a_chat_template_gets_plain_text_observations(tokenizer):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    tokenizer.chat_template = None
    delta = ChatDelta(tokenizer)
    assert delta.closing((1, 2)) == ()
    assert tokenizer.decode(delta.observation([{"role": "user", "content": "Lower."}])) == "\n\nLower.\n\n"


def test_the_loss_mask_travels_into_the_train_batch_and_is_checked():
    episode = EpisodeBuilder(delta_free_prompt(), 0)
    episode.add_turn(Completion((5, 6), "a", (-1.0, -2.0), "stop"), PolicyRef())
    episode.add_observation((7, 8, 9), "obs")
    episode.add_turn(Completion((10,), "b", (-3.0,), "stop"), PolicyRef())
    episode.finish(EnvStep(done=True, reward=1.0, correct=True))
    other = EpisodeBuilder(delta_free_prompt(), 1)
    other.add_turn(Completion((5,), "c", (-1.0,), "stop"), PolicyRef())
    other.finish(EnvStep(done=True, reward=0.0))
    batch, _, _ = build_train_batch([episode.sample(), other.sample()], [Verdict(1.0, True), Verdict(0.0, False)])
    assert batch.loss_masks[0] == (1, 1, 0, 0, 0, 1) and batch.trained_tokens(0) == 3
    assert batch.old_logprobs[0] == (-1.0, -2.0, 0.0, 0.0, 0.0, -3.0)
    with pytest.raises(ValueError, match="loss mask of 2 tokens"):
        TrainBatch(((1,),), ((2, 3, 4),), ((0.0,) * 3,), (1.0,), (0,), loss_masks=((1, 0),))


def delta_free_prompt():
    from contracts import Prompt

    return Prompt(PROBLEM, "q", (1, 2, 3))


def test_the_outcome_reward_sits_on_the_last_policy_token_and_returns_pass_over_observations():
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0, 1.0, 0.0], [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]])
    rewards = outcome_token_rewards(torch.tensor([2.0, 3.0]), mask)
    assert rewards.tolist() == [[0, 0, 0, 0, 2.0, 0], [0, 0, 3.0, 0, 0, 0]]
    returns = discounted_returns(rewards, mask, gamma=0.5)
    # an observation is no step in time: the first turn's tokens see the reward discounted by policy tokens only
    assert returns[0].tolist() == [0.5, 1.0, 0.0, 0.0, 2.0, 0.0]


def test_observation_tokens_carry_no_gradient(tiny_model_path):
    """The same batch with anything in the observations' log-probs trains identically; with
    the observations left in the loss it does not."""
    lora = LoraSettings(rank=4, alpha=8)
    prompt, completion = (1, 2, 3, 4), (5, 6, 7, 8, 9, 10)
    mask = (1, 1, 0, 0, 1, 1)

    def batch(observation_logprob: float, masks) -> TrainBatch:
        old = tuple(-1.0 if keep else observation_logprob for keep in mask)
        return TrainBatch((prompt, prompt), (completion, completion[:3]), (old, old[:3]), (1.0, -1.0), (0, 0), loss_masks=masks)

    def trained(b: TrainBatch) -> tuple[float, float]:
        metrics = make_learner(tiny_model_path, lora, lr=1e-2, tis_cap=None).step(b)
        return metrics["train/grad_norm"], metrics["train/pg_loss"]

    masked = trained(batch(0.0, (mask, ())))
    assert trained(batch(-7.0, (mask, ()))) == pytest.approx(masked, rel=1e-6)
    assert trained(batch(0.0, ((), ())))[0] != pytest.approx(masked[0], rel=1e-3)


# -- the environments ----------------------------------------------------------------------


def test_guess_number_answers_higher_lower_and_judges_the_guess():
    env = GuessNumber()
    assert "3 + 4" in env.reset(PROBLEM)[-1]["content"]
    assert env.step("I guess 5").messages[0]["content"] == "Higher."
    assert env.step("12?").messages[0]["content"] == "Lower."
    assert env.step("no idea").messages[0]["content"] == "Answer with a number."
    final = env.step("It is 7.")
    assert final.done and final.reward == 1.0 and final.correct
    with pytest.raises(ValueError, match="numeric answer"):
        GuessNumber().reset(Problem("p1", "?", "seven"))


@pytest.fixture(scope="module")
def sandbox():
    return Sandbox(SandboxLimits(wall_s=2.0, cpu_s=2, memory_mb=256), slots=1)


def test_python_tool_runs_the_block_in_the_sandbox_and_contains_hostile_code(sandbox):
    settings = EnvironmentSettings(name="python_tool", tool_output_chars=40)
    env = PythonTool(sandbox, settings, "Answer with a number.")
    messages = env.reset(PROBLEM)
    assert messages[0]["role"] == "system" and "run Python" in messages[0]["content"]
    step = env.step("Let me compute.\n```python\nprint(1234 * 5678)\n```")
    assert not step.done and step.tool == "ok" and "7006652" in step.messages[0]["content"] and step.messages[0]["role"] == "tool"
    loud = env.step("```python\nprint('x' * 10000)\n```").messages[0]["content"]
    assert "characters cut" in loud and len(loud) < 200
    for hostile, outcome in (("while True: pass", "timeout"), ("import os\nwhile True: os.fork()", None), ("raise SystemExit(3)", "error")):
        step = env.step(f"```python\n{hostile}\n```")
        assert step.infra_error is None and not step.done and step.tool != "ok"
        assert outcome is None or step.tool == outcome
    assert sandbox.stray_processes() == []
    final = env.step("The answer is 7.")
    assert final.done and final.reward is None  # the task's scorer judges the final answer


def test_code_repair_reports_the_failed_tests_and_judges_the_last_attempt(sandbox):
    problem = Problem("c0", "Write add(a, b).", "", meta={"entry_point": "add", "tests": [[[1, 2], 3], [[2, 2], 4]]})
    env = CodeRepair(sandbox, EnvironmentSettings(name="code_repair"))
    env.reset(problem)
    wrong = env.step("```python\ndef add(a, b):\n    return a * b\n```")
    assert not wrong.done and wrong.reward == 0.5 and "1 of 2 tests passed" in wrong.messages[0]["content"]
    right = env.step("```python\ndef add(a, b):\n    return a + b\n```")
    assert right.done and right.reward == 1.0 and right.correct


def test_environments_are_chosen_by_name_and_code_ones_need_the_sandbox():
    make = environment_factory(EnvironmentSettings(name="guess_number"), None, lambda problem: None)
    assert isinstance(make(PROBLEM), GuessNumber)
    with pytest.raises(ValueError, match="needs the sandbox"):
        environment_factory(EnvironmentSettings(name="python_tool"), None, lambda problem: None)
    assert clip("abcdefghij", 4) == "ab\n... [6 characters cut] ...\nij"


def test_the_turns_end_comes_from_the_template_not_the_tokenizers_eos(tokenizer):
    """A checkpoint whose eos is another token than its template's end of turn (Qwen2.5 base:
    <|endoftext|>; Llama 3: <|end_of_text|> against <|eot_id|>) still closes turns as the
    template does."""
    other = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    other.eos_token = "<|endoftext|>"
    delta = ChatDelta(other)
    assert delta.end == (other.convert_tokens_to_ids("<|im_end|>"),) and other.decode(delta.separator) == "\n"


def test_turn_budgets_near_an_episodes_end_fall_to_powers_of_two():
    from cluster.loop.episodes import turn_tokens

    assert [turn_tokens(room, 96) for room in (500, 96, 95, 64, 63, 33, 1, 0)] == [96, 96, 64, 64, 32, 32, 1, 0]


def test_a_problem_the_environment_cannot_open_is_masked_and_named(tokenizer):
    from cluster.loop.episodes import EpisodeRunner
    from contracts import SamplingSettings

    settings = EnvironmentSettings(name="guess_number")
    runner = EpisodeRunner(None, None, lambda problem: GuessNumber(), ChatDelta(tokenizer), settings, 1024)
    words = Problem("w", "Name a colour.", "blue")
    prompts = runner.prompts([words, PROBLEM])
    assert "Name a colour." in prompts[0].text  # rendered from the question alone
    batch = runner.start(prompts, SamplingSettings(n=2, temperature=1.0, top_p=1.0, max_tokens=8))
    masked = [e.sample().episode.infra_error for e in batch.episodes[:2]]
    assert all("cannot open this problem" in m and "numeric answer" in m for m in masked)
    assert not any(e.done for e in batch.episodes[2:])
    runner.close()


def test_env_settings_that_could_mask_a_programs_loss_or_mistrain_are_refused(tiny_model_path):
    from cluster.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="tool_timeout_s"):
        load_config(None, [f"model.path={tiny_model_path}", "env.name=python_tool", "env.tool_timeout_s=20"])
    with pytest.raises(ConfigError, match="policy_loss=sac"):
        load_config(None, [f"model.path={tiny_model_path}", "env.name=guess_number", "algorithm.policy_loss=sac"])


def test_a_huge_int_against_a_float_test_fails_the_attempt_not_the_judge(sandbox):
    """10**400 has no float: comparing it must not raise (the judge's failure would mask the
    episode, a mask the program chose) but fail the test."""
    from rewards import wire

    assert wire.same(10**400, 1.5) is False
    problem = Problem("c1", "Write half(x).", "", meta={"entry_point": "half", "tests": [[[3], 1.5]]})
    env = CodeRepair(sandbox, EnvironmentSettings(name="code_repair"))
    env.reset(problem)
    step = env.step("```python\ndef half(x):\n    return 10**400\n```")
    assert step.infra_error is None and not step.done and step.reward == 0.0


def test_a_custom_environment_comes_from_the_users_file(tmp_path, monkeypatch):
    (tmp_path / "my_env.py").write_text(
        "from contracts import EnvStep\n"
        "class Countdown:\n"
        "    def __init__(self, tools, settings, system_prompt):\n"
        "        self.left = settings.max_turns\n"
        "    def reset(self, problem):\n"
        "        return [{'role': 'user', 'content': problem.question}]\n"
        "    def step(self, turn):\n"
        "        self.left -= 1\n"
        "        return EnvStep(messages=({'role': 'user', 'content': f'{self.left} left'},), done=self.left == 0, reward=float(self.left == 0))\n"
    )
    monkeypatch.chdir(tmp_path)
    settings = EnvironmentSettings(name="custom", factory="my_env.py:Countdown", max_turns=2)
    env = environment_factory(settings, None, lambda problem: None)(PROBLEM)
    assert env.reset(PROBLEM)[0]["content"] == PROBLEM.question
    assert env.step("a").messages[0]["content"] == "1 left" and env.step("b").done
    with pytest.raises(ValueError, match="environment factory 'my_env.py:Nothing'"):
        environment_factory(EnvironmentSettings(name="custom", factory="my_env.py:Nothing"), None, lambda problem: None)
    with pytest.raises(ValueError, match="env.factory"):
        EnvironmentSettings(name="custom")
