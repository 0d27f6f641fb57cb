"""Markovian chain-of-thought training on the run's actors (the pure parts:
``rollout.markovian``), plugged into the loop's stages: ``MarkovianReward`` is the run's
``Prompts`` (CoTs of exactly ``cot_length`` tokens) and its ``ModelReward``;
``ActorRewardColumns`` fills the batch's answer rows (``algorithm.actor_reward_weight``);
``MarkovianEvaluator`` is its ``Evaluator``.

``MarkovianReward.score`` replaces each verdict's reward by the frozen model's log-probability
of the true answer given the sample's chain of thought alone (the learner's
``sequence_logprob`` with the adapter off), minus the same score of the frozen model's own
greedy chain of thought for that question (generated once per problem by the generators with
the adapter off, then cached: the frozen model never changes). With
``algorithm.actor_reward_weight > 0`` the first term is the trained policy's log-prob of the
answer instead, as in the paper's chain-rule training (its gradient is the actor-reward loss
term; the baseline stays the frozen model's). The verifier's verdict stays
for what it measures (``correct``: the CoT itself states the answer), its reward kept as the
``verifier_reward`` component beside ``answer_logprob``, ``baseline_logprob`` and
``actor_answer_logprob`` (the same answer under the trained policy).

``MarkovianEvaluator.evaluate`` is the held-out evaluation of a Markovian run: the policy writes a
CoT for each question (sampled at the training temperature, as the paper's evaluation does,
with a fixed seed); the frozen model answers greedily after that CoT with the question
redacted (the policy answers instead when ``algorithm.actor_reward_weight > 0``, which trains
it to); the task's scorer judges the answer with every extraction method it has. The same is
done with the CoT perturbed, and the accuracy and answer log-prob of each variant reported.
"""

from __future__ import annotations

import collections
import dataclasses

from dataclasses import dataclass

from cluster.config import Config
from cluster.observe.samples import sample_metrics, task_metrics
from cluster.stages import Crew
from contracts import Problem, Prompt, Sample, SamplingSettings, Verdict
from learners.algorithms import AdvantageEstimator
from learners.batch import standardisation_scales
from rollout.generator import BASE_POLICY
from rollout.markovian import MarkovianPrompts, perturb
from rollout.tasks import TaskMixture

BASELINE_CACHE_SIZE = 100_000  # problems whose baseline score is kept (the oldest go first)


class MarkovianReward:
    """The Markovian prompts and reward of one run (``markovian.enabled``): a ``Prompts`` and a
    ``ModelReward`` stage."""

    span = "markovian_reward"  # perf/markovian_reward_seconds

    def __init__(self, config: Config, tokenizer, tasks: TaskMixture, crew: Crew):
        self.crew = crew
        self.settings = s = config.markovian
        self.prompts = MarkovianPrompts(tokenizer, s)
        self.system_prompts = {task_id: task.system_prompt for task_id, task in tasks.tasks.items()}
        self.seed = config.run.seed
        # a policy trained on its own answer log-prob (the actor reward) answers for itself
        self.policy_answers = config.algorithm.actor_reward_weight > 0
        self.baselines: collections.OrderedDict[str, float] = collections.OrderedDict()  # problem uid -> score(CoT')
        r = config.rollout
        self.cot_sampling = SamplingSettings(n=r.group_size, temperature=r.temperature, top_p=r.top_p, max_tokens=s.cot_length, min_tokens=s.cot_length)

    @property
    def sampling(self) -> SamplingSettings:
        """A training step's sampling: chains of thought of exactly ``cot_length`` tokens."""
        return self.cot_sampling

    # -- prompts ----------------------------------------------------------------------------

    def system_prompt(self, problem: Problem) -> str | None:
        return self.system_prompts.get(problem.task)

    def render(self, problems: list[Problem]) -> list[Prompt]:
        """The questions as the policy sees them: the instruction, the question, the CoT header."""
        return [self.prompts.question_prompt(p, self.system_prompt(p)) for p in problems]

    def answer_rows(self, samples: list[Sample]) -> tuple[list[tuple[int, ...]], list[tuple[int, ...]]]:
        """(answer contexts, answers) of each sample: its CoT with the question redacted."""
        contexts = [self.prompts.answer_context(s.completion.token_ids, s.prompt.problem, self.system_prompt(s.prompt.problem)) for s in samples]
        return contexts, [self.prompts.answer_ids(s.prompt.problem) for s in samples]

    # -- the reward -------------------------------------------------------------------------

    def score(self, samples: list[Sample], verdicts: list[Verdict]) -> tuple[list[Verdict], dict[str, float]]:
        """The verdicts with the Markovian reward (infrastructure errors left as they are),
        and the step's metrics."""
        learners = self.crew.learners
        valid = [i for i, v in enumerate(verdicts) if v.status == "ok"]
        if not valid:
            return verdicts, {}
        contexts, targets = self.answer_rows([samples[i] for i in valid])
        frozen = learners.sequence_logprob(contexts, targets, reference=True)
        actor = learners.sequence_logprob(contexts, targets, reference=False)
        generated = 0
        baseline = [0.0] * len(valid)
        if self.settings.baseline:
            generated = self._add_baselines([samples[i].prompt for i in valid])
            baseline = [self.baselines[samples[i].prompt.problem.uid] for i in valid]
        out = list(verdicts)
        for k, i in enumerate(valid):
            v = verdicts[i]
            components = {**v.components, "verifier_reward": v.reward, "answer_logprob": frozen[k], "baseline_logprob": baseline[k], "actor_answer_logprob": actor[k]}
            score = actor[k] if self.policy_answers else frozen[k]
            out[i] = dataclasses.replace(v, reward=score - baseline[k], components=components)
        return out, {"markovian/baselines_generated": float(generated), "markovian/baselines_cached": float(len(self.baselines))}

    def _add_baselines(self, prompts: list[Prompt]) -> int:
        """Score the frozen model's greedy CoT' of each problem not yet cached; returns how
        many were generated."""
        missing = list({p.problem.uid: p for p in prompts if p.problem.uid not in self.baselines}.values())
        if not missing:
            return 0
        greedy = dataclasses.replace(self.cot_sampling, n=1, temperature=0.0, top_p=1.0)
        cots = self.crew.generators.generate(missing, greedy, BASE_POLICY)
        contexts, targets = self.answer_rows(cots)
        for cot, score in zip(cots, self.crew.learners.sequence_logprob(contexts, targets, reference=True)):
            uid = cot.prompt.problem.uid
            self.baselines[uid] = score
            if len(self.baselines) > BASELINE_CACHE_SIZE:
                self.baselines.popitem(last=False)
        return len(missing)

@dataclass(frozen=True)
class ActorRewardColumns:
    """The batch's answer rows for the actor reward (``algorithm.actor_reward_weight``): each
    trained sample's answer, its CoT context, and the chain rule's weight (the weight times
    d A_i / d r_i of the advantage estimator)."""

    markovian: MarkovianReward
    weight: float
    estimator: AdvantageEstimator

    def __call__(self, samples: list[Sample], verdicts: list[Verdict], advantages: list[float | None]) -> dict[str, tuple]:
        contexts, answers = self.markovian.answer_rows([s for s, adv in zip(samples, advantages) if adv is not None])
        weights = [self.weight * scale for scale in standardisation_scales(samples, verdicts, advantages, self.estimator)]
        return {"answer_prompt_token_ids": tuple(contexts), "answer_token_ids": tuple(answers), "answer_weights": tuple(weights)}


@dataclass
class MarkovianEvaluator:
    """A Markovian run's held-out evaluation (an ``Evaluator``; see the module docstring)."""

    markovian: MarkovianReward
    crew: Crew
    prompts_by_task: dict[str, list[Prompt]]
    needs_learners: bool = True  # the answers' log-probs

    def evaluate(self) -> dict:
        """Held-out metrics: the answer's accuracy (every extraction method of the task's
        scorer) and log-prob after the policy's CoT, intact and perturbed."""
        m, prompts_by_task = self.markovian, self.prompts_by_task
        generators, verifiers, learners = self.crew.generators, self.crew.verifiers, self.crew.learners
        s = m.settings
        prompts = [p for task_prompts in prompts_by_task.values() for p in task_prompts]
        if not prompts:
            return {"eval/n": 0}
        cots = generators.generate(prompts, dataclasses.replace(m.cot_sampling, n=1, seed=m.seed))
        texts = [c.completion.text for c in cots]
        variants = {"intact": [c.completion.token_ids for c in cots]}
        for kind in s.perturbations:
            fraction = s.delete_fraction if kind == "delete" else s.truncate_fraction
            variants[kind] = [m.prompts.cot_ids(t) for t in perturb(texts, kind, fraction, m.seed)]
        contexts = [m.prompts.answer_context(ids, p.problem, m.system_prompt(p.problem)) for ids_list in variants.values() for p, ids in zip(prompts, ids_list)]
        problems = [p.problem for _ in variants for p in prompts]
        answer_prompts = [Prompt(problem, m.prompts.tokenizer.decode(ids), ids) for problem, ids in zip(problems, contexts)]
        greedy = SamplingSettings(n=1, temperature=0.0, top_p=1.0, max_tokens=s.answer_tokens)
        answers = generators.generate(answer_prompts, greedy, None if m.policy_answers else BASE_POLICY)
        verdicts = verifiers.score(answers)
        logprobs = learners.sequence_logprob(contexts, [m.prompts.answer_ids(p) for p in problems], reference=not m.policy_answers)
        verdicts = [dataclasses.replace(v, components={**v.components, "answer_logprob": lp}) for v, lp in zip(verdicts, logprobs)]
        n = len(prompts)
        intact = slice(0, n)
        metrics = {"eval/n": n, **sample_metrics(answers[intact], verdicts[intact], prefix="eval")}
        if len(prompts_by_task) > 1:
            metrics |= task_metrics(answers[intact], verdicts[intact], "eval")
        for k, name in enumerate(variants):
            part = slice(k * n, (k + 1) * n)
            metrics[f"eval/markovian/{name}/accuracy"] = sum(v.correct for v in verdicts[part]) / n
            metrics[f"eval/markovian/{name}/answer_logprob"] = sum(logprobs[part]) / n
        return metrics
