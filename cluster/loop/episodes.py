"""Multi-turn episodes over the generator pool: each turn a request, interleaved across episodes.

``EpisodeRunner`` keeps every episode of the batches it was given moving on its own:
1. an episode whose next turn is due joins the next generate call (each turn is the
   episode's ids so far, never re-tokenised). On a streaming pool (``generator.serving``) due
   turns go out at once and join the engine's running batch; on a batch pool a batch's due
   turns go out together whenever fewer calls are outstanding than the pool has generators,
   so the engine batches them;
2. a finished turn goes to the episode's environment (``contracts.Environment.step``) in a
   thread of its own, so a slow tool call holds up only its own episode while the other
   episodes' turns are generated;
3. the observation's ids (``rollout.episodes.ChatDelta``) are appended, masked, and the
   episode is due again, until the environment says done, ``env.max_turns`` turns were
   taken, or the next turn would not fit ``env.max_episode_tokens`` (or the engine's
   context): then it is truncated.
A batch is handed back when all its episodes are over, scored: by the environment where it
judges, else by the task's scorer in the verifier pool on the last turn; ``env.turn_penalty``
per turn past the first; an episode the infrastructure failed (a lost tool host, a sandbox
that could not run) is masked. A generator lost mid-episode costs only that turn: the pool
re-issues it.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

from actors.generator import GeneratorPool, Request
from actors.verifier import VerifierPool
from contracts import Environment, EnvStep, Problem, Prompt, Sample, SamplingSettings, Verdict
from rewards.environments import EnvironmentSettings
from rollout.episodes import ChatDelta, EpisodeBuilder

logger = logging.getLogger(__name__)

_TURN_SEED_STRIDE = 7919  # a batch's k-th generate call samples with seed + k * stride


def turn_tokens(room: int, cap: int) -> int:
    """A turn's token budget: ``cap``, or where the episode has less ``room`` left, the largest
    power of two within it, so that episodes near their end still share a few generate calls
    instead of one each."""
    if room >= cap:
        return cap
    return 1 << (room.bit_length() - 1) if room > 0 else 0


@dataclass(eq=False)
class EpisodeBatch:
    """Episodes started together (a step's chunk): ``sampling.n`` per prompt, in order."""

    episodes: list[EpisodeBuilder]
    envs: list[Environment]
    sampling: SamplingSettings
    calls: int = 0  # generate calls made for it (each gets its own seed)
    samples: list[Sample] | None = None
    verdicts: list[Verdict] | None = None
    verify_seconds: float = 0.0  # the task scorer's time on its last turns

    def over(self) -> bool:
        return all(e.done for e in self.episodes)


class EpisodeRunner:
    """Runs batches of episodes; see the module docstring. Not thread-safe: one thread (the
    rollout producer, an evaluation) drives it with ``advance``."""

    def __init__(
        self,
        generators: GeneratorPool,
        verifiers: VerifierPool,
        make_env: Callable[[Problem], Environment],
        delta: ChatDelta,
        settings: EnvironmentSettings,
        context_limit: int,
    ):
        """``context_limit``: the engine's longest sequence (``generator.max_model_len``)."""
        self.generators, self.verifiers, self.make_env, self.delta, self.settings = generators, verifiers, make_env, delta, settings
        self.context_limit = context_limit
        self._threads = ThreadPoolExecutor(settings.max_parallel_steps, thread_name_prefix="env-step")
        self._batches: list[EpisodeBatch] = []
        self._ready: list[tuple[EpisodeBatch, int]] = []
        self._ready_since = 0.0  # when the oldest due turn became due
        self._generating: dict[Request, list[tuple[EpisodeBatch, int]]] = {}
        self._stepping: dict[Future, tuple[EpisodeBatch, int]] = {}

    # -- what a driver calls ------------------------------------------------------------------

    def fresh(self) -> EpisodeRunner:
        """A runner like this one with no episode in flight (a restarted rollout producer's)."""
        return EpisodeRunner(self.generators, self.verifiers, self.make_env, self.delta, self.settings, self.context_limit)

    def prompts(self, problems: list[Problem]) -> list[Prompt]:
        """Each problem's first prompt, as its environment opens the episode (the question
        alone where the environment cannot open it: its episodes are masked, ``start``)."""
        return [self.delta.prompt(problem, self._opening(problem)) for problem in problems]

    def _opening(self, problem: Problem) -> list[dict]:
        try:
            return self.make_env(problem).reset(problem)
        except Exception:  # noqa: BLE001 - named when its episodes start
            return [{"role": "user", "content": problem.question}]

    def start(self, prompts: list[Prompt], sampling: SamplingSettings) -> EpisodeBatch:
        """``sampling.n`` episodes per prompt, from its first turn."""
        episodes, envs = [], []
        for prompt in prompts:
            for g in range(sampling.n):
                episode, env = EpisodeBuilder(prompt, g), None
                try:
                    env = self.make_env(prompt.problem)
                    env.reset(prompt.problem)
                except Exception as exc:  # noqa: BLE001 - a problem the environment cannot take: masked, named
                    logger.warning("the environment cannot open problem %s: %s: %s", prompt.problem.uid, type(exc).__name__, exc)
                    episode.finish(infra_error=f"the environment cannot open this problem: {type(exc).__name__}: {exc}"[:500])
                episodes.append(episode)
                envs.append(env)
        batch = EpisodeBatch(episodes, envs, sampling)
        self._batches.append(batch)
        self._due([(batch, i) for i, episode in enumerate(episodes) if not episode.done])
        return batch

    def advance(self, timeout: float) -> list[EpisodeBatch]:
        """Move every episode on (waiting up to ``timeout`` for a turn); the batches that are
        over, scored, in the order they were started."""
        self._generate()
        self._collect_turns(timeout if not self._stepping else min(timeout, 0.05))
        self._collect_steps()
        over = [b for b in self._batches if b.over()]
        for batch in over:
            self._batches.remove(batch)
            self._score(batch)
        return over

    def run(self, prompts: list[Prompt], sampling: SamplingSettings) -> tuple[list[Sample], list[Verdict]]:
        """Start one batch and wait for it: its samples and verdicts, in order."""
        batch = self.start(prompts, sampling)
        while batch.samples is None:
            self.advance(0.2)
        return batch.samples, batch.verdicts

    def close(self) -> None:
        self._threads.shutdown(wait=False, cancel_futures=True)

    # -- the turns ----------------------------------------------------------------------------

    def _due(self, turns: list[tuple[EpisodeBatch, int]]) -> None:
        """Episodes whose next turn is due (the oldest's time is what ``_gathering`` waits from)."""
        if turns and not self._ready:
            self._ready_since = time.monotonic()
        self._ready += turns

    def _room(self, episode: EpisodeBuilder) -> int:
        """Tokens the episode's next turn may take."""
        return min(self.settings.max_episode_tokens - len(episode.ids), self.context_limit - len(episode.context()))

    def _generate(self) -> None:
        """The ready turns, in one call per batch and turn length: at once on a streaming pool,
        else once no generate call is outstanding for more than the pool can run at once."""
        if not self._ready:
            return
        if not self.generators.streaming and (len(self._generating) >= len(self.generators) or self._gathering()):
            return
        calls: dict[tuple[int, int], list[tuple[EpisodeBatch, int]]] = {}
        for batch, i in self._ready:
            max_tokens = turn_tokens(self._room(batch.episodes[i]), batch.sampling.max_tokens)
            calls.setdefault((id(batch), max_tokens), []).append((batch, i))
        self._ready = []
        for (_, max_tokens), members in calls.items():
            batch = members[0][0]
            if max_tokens < 1:  # a prompt as long as the context: nothing to train on
                for _, i in members:
                    batch.episodes[i].finish(infra_error=f"no room for a turn: {len(batch.episodes[i].context())} tokens of context, limit {self.context_limit}")
                continue
            seed = None if batch.sampling.seed is None else batch.sampling.seed + batch.calls * _TURN_SEED_STRIDE
            batch.calls += 1
            sampling = dataclasses.replace(batch.sampling, n=1, max_tokens=max_tokens, min_tokens=min(batch.sampling.min_tokens, max_tokens), seed=seed)
            prompts = [b.episodes[i].context_prompt() for b, i in members]
            start = 0
            for request in self.generators.submit(prompts, sampling):  # contiguous chunks, in order
                self._generating[request] = members[start : start + len(request.prompts)]
                start += len(request.prompts)

    def _gathering(self) -> bool:
        """Whether to let the due turns wait for the environment steps still running: while
        fewer turns are due than steps run, for at most ``env.batch_wait_s`` (a call of a few
        turns costs the engine nearly what a full one does)."""
        if len(self._ready) >= len(self._stepping):
            return False
        return time.monotonic() - self._ready_since < self.settings.batch_wait_s

    def _collect_turns(self, timeout: float) -> None:
        for request in self.generators.wait(list(self._generating), timeout):
            for (batch, i), sample in zip(self._generating.pop(request), request.samples, strict=True):
                episode = batch.episodes[i]
                episode.add_turn(sample.completion, sample.policy)
                self._stepping[self._threads.submit(batch.envs[i].step, sample.completion.text)] = (batch, i)

    def _collect_steps(self) -> None:
        for future in [f for f in self._stepping if f.done()]:
            batch, i = self._stepping.pop(future)
            episode = batch.episodes[i]
            try:
                step = future.result()
            except Exception as exc:  # noqa: BLE001 - an environment's bug masks its episode, named
                logger.warning("environment step failed on %s: %s: %s", episode.prompt.problem.uid, type(exc).__name__, exc)
                episode.finish(infra_error=f"the environment raised {type(exc).__name__}: {exc}"[:500])
                continue
            self._after_step(batch, i, step)

    def _after_step(self, batch: EpisodeBatch, i: int, step: EnvStep) -> None:
        episode = batch.episodes[i]
        episode.count_tool(step)
        if step.done or step.infra_error:
            episode.finish(step)
            return
        try:
            observation = self.delta.closing(episode.last_turn_ids) + self.delta.observation(step.messages)
        except Exception as exc:  # noqa: BLE001 - an observation the template cannot render masks its episode, named
            episode.finish(step, infra_error=f"the chat template cannot render the observation: {type(exc).__name__}: {exc}"[:500])
            return
        if len(episode.turns) >= self.settings.max_turns or self._room(episode) - len(observation) < 1:
            episode.finish(step, truncated=True)
            return
        episode.add_observation(observation, self.delta.tokenizer.decode(observation))
        self._due([(batch, i)])

    # -- the verdicts -------------------------------------------------------------------------

    def _score(self, batch: EpisodeBatch) -> None:
        samples = [e.sample() for e in batch.episodes]
        verdicts: list[Verdict | None] = [None] * len(samples)
        for k, sample in enumerate(samples):
            ep = sample.episode
            if ep.infra_error:
                verdicts[k] = Verdict.infra_error(ep.infra_error, "env_error")
            elif ep.reward is not None:
                verdicts[k] = Verdict(reward=ep.reward, correct=ep.correct, components={"env": ep.reward}, extracted=ep.final_text.strip()[:200])
        judged = [k for k, v in enumerate(verdicts) if v is None]
        start = time.perf_counter()
        for k, verdict in zip(judged, self.verifiers.score([samples[k] for k in judged]) if judged else []):
            verdicts[k] = verdict
        batch.verify_seconds = time.perf_counter() - start
        penalty = self.settings.turn_penalty
        batch.verdicts = [
            dataclasses.replace(v, reward=v.reward - penalty * (s.episode.turns - 1)) if penalty and v.status == "ok" else v
            for s, v in zip(samples, verdicts)
        ]
        batch.samples = samples


@dataclass(frozen=True)
class EpisodePrompts:
    """The ``Prompts`` stage of a run with an environment: each problem's first prompt is what
    its environment opens the episode with; the rollout stream runs the episodes with
    ``runner``."""

    runner: EpisodeRunner
    sampling: SamplingSettings

    def render(self, problems: list[Problem]) -> list[Prompt]:
        return self.runner.prompts(problems)
