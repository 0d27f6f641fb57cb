"""Rewards that need a model of their own, served by Ray actors and asked by the verifiers.

- ``RewardModelServer``: a Hugging Face sequence-classification model (``reward.model``). An
  async actor: the requests of every verifier queue up and are scored together, up to
  ``batch_size`` per forward pass (a partial batch waits for more while they keep coming, at
  most ``max_wait_ms``).
- ``JudgeServer``: an LLM judge (``reward.judge``) on its own vLLM engine, serving the base
  model greedily; the reply is parsed in the verifier (``rewards.terms.parse_judgement``).
- ``TeacherServer`` / ``TeacherPool``: on-policy distillation's teacher (``reward.teacher``)
  on its own vLLM engine, scoring the student's tokens; asked by the driver's
  ``cluster.features.distill`` stage, not by the verifiers (it needs the token ids).

Their clients are reward terms (``rewards.terms``): picklable, sent to every verifier actor,
where each request has a deadline (``timeout_s``) and ``retries`` on the next actor; a sample
whose request keeps failing meets the term's ``on_error`` (masked by default) and is counted,
like every term's failure. The servers are restarted by Ray when they die (``max_restarts``);
``RewardServices`` starts them for a run and kills them with it.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from contracts import Problem, SamplingSettings
from contracts.footprint import peak_rss_gib
from rewards.terms import Item, JudgeSettings, OnError, RewardModelSettings, TeacherSettings, TermFailure, judge_prompt, parse_judgement

logger = logging.getLogger(__name__)

SERVER_RESTARTS = 2  # Ray restarts a dead server this many times (its requests fail meanwhile)
TEACHER_CHUNK = 32  # sequences per call to a distillation teacher
LULL_S = 0.003  # a reward model's partial batch stops waiting when no request came for this long


def _conversation(tokenizer, question: str, completion: str) -> str:
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": question}, {"role": "assistant", "content": completion}]
        return tokenizer.apply_chat_template(messages, tokenize=False)
    return f"{question}\n{completion}"


class RewardModelServer:
    """One reward-model replica; ``ray.remote(RewardModelServer)`` is its (async) actor."""

    def __init__(self, path: str, settings: RewardModelSettings):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.settings = settings
        torch.set_num_threads(max(1, int(settings.num_cpus)))
        self.device = "cuda" if settings.num_gpus > 0 and torch.cuda.is_available() else "cpu"
        dtype = (torch.bfloat16 if self.device == "cuda" else torch.float32) if settings.dtype == "auto" else getattr(torch, settings.dtype)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.tokenizer.truncation_side = "left"  # an overlong sample keeps its end, where the answer is
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForSequenceClassification.from_pretrained(path, torch_dtype=dtype).to(self.device).eval()
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.pending: list[tuple[str, asyncio.Future]] = []
        self.wakeup: asyncio.Event | None = None
        self.batcher: asyncio.Task | None = None
        self.stats = {"batches": 0, "samples": 0, "forward_seconds": 0.0}

    def ready(self) -> bool:
        return True

    def peak_rss_gib(self) -> float:
        return peak_rss_gib()

    def counters(self) -> dict[str, float]:
        return dict(self.stats)

    async def score(self, pairs: list[tuple[str, str]]) -> list[float]:
        """Rewards of (question, completion) pairs, scored with other callers' pairs."""
        if not pairs:
            return []
        loop = asyncio.get_running_loop()
        if self.batcher is None:
            self.wakeup = asyncio.Event()
            self.batcher = loop.create_task(self._batches())
        futures = [loop.create_future() for _ in pairs]
        self.pending.extend((_conversation(self.tokenizer, q, c), f) for (q, c), f in zip(pairs, futures))
        self.wakeup.set()
        return list(await asyncio.gather(*futures))

    async def _batches(self) -> None:
        loop = asyncio.get_running_loop()
        size = max(1, self.settings.batch_size)
        while True:
            await self.wakeup.wait()
            await self._gather(size)
            batch, self.pending = self.pending[:size], self.pending[size:]
            if not self.pending:
                self.wakeup.clear()
            try:
                scores = await loop.run_in_executor(None, self.forward, [text for text, _ in batch])
            except Exception as exc:  # noqa: BLE001 - this batch's callers get the error
                logger.exception("reward model failed on a batch of %d", len(batch))
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for (_, future), score in zip(batch, scores):
                if not future.done():
                    future.set_result(score)

    async def _gather(self, size: int) -> None:
        """Let more requests join a partial batch: up to ``max_wait_ms``, and only while they
        keep arriving (a lull of ``LULL_S`` ends the wait)."""
        deadline = time.monotonic() + self.settings.max_wait_ms / 1000
        while len(self.pending) < size and time.monotonic() < deadline:
            before = len(self.pending)
            await asyncio.sleep(LULL_S)
            if len(self.pending) == before:
                return

    def forward(self, texts: list[str]) -> list[float]:
        """One forward pass over ``texts`` (chats already rendered): their rewards."""
        import torch

        started = time.perf_counter()
        encoded = self.tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=self.settings.max_length, add_special_tokens=False)
        with torch.inference_mode():
            logits = self.model(**encoded.to(self.device)).logits.float()
        scores = logits[:, 0] if logits.shape[-1] == 1 else logits.softmax(-1)[:, -1]
        self.stats["batches"] += 1
        self.stats["samples"] += len(texts)
        self.stats["forward_seconds"] += time.perf_counter() - started
        return scores.cpu().tolist()


class JudgeServer:
    """One LLM-judge replica: its model on a vLLM engine, base weights, greedy replies."""

    def __init__(self, path: str, engine_settings, seed: int = 0):
        from transformers import AutoTokenizer

        from rollout.engines import build_engine

        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.engine = build_engine(path, engine_settings, seed=seed, max_lora_rank=8)
        self.engine.serve_base()
        self.max_model_len = engine_settings.max_model_len

    def ready(self) -> bool:
        return True

    def peak_rss_gib(self) -> float:
        return peak_rss_gib()

    def judge(self, prompts: list[str], max_tokens: int) -> list[str]:
        """The judge's greedy reply to each prompt (one user turn); a prompt too long for the
        engine loses its middle (the completion's), keeping the rubric and the instruction."""
        from rollout.prompts import render_prompts

        room = max(2, self.max_model_len - max_tokens - 1)
        ids = []
        for rendered in render_prompts(self.tokenizer, [Problem(uid="judge", question=p, answer="") for p in prompts], system_prompt=None):
            tokens = list(rendered.token_ids)
            if len(tokens) > room:  # the rubric at the head and the instruction at the end both stay
                tokens = tokens[: room // 2] + tokens[-(room - room // 2) :]
            ids.append(tokens)
        sampling = SamplingSettings(n=1, temperature=0.0, top_p=1.0, max_tokens=max_tokens)
        return [completions[0].text for completions in self.engine.generate(ids, sampling, base=True)]


class TeacherServer:
    """One distillation teacher: its model on a vLLM engine, base weights, scoring tokens."""

    def __init__(self, path: str, engine_settings, seed: int = 0):
        from rollout.engines import build_engine

        self.engine = build_engine(path, engine_settings, seed=seed, max_lora_rank=8)
        self.engine.serve_base()

    def ready(self) -> bool:
        return True

    def peak_rss_gib(self) -> float:
        return peak_rss_gib()

    def score_tokens(self, sequences: list[list[int]], starts: list[int]) -> list[list[float]]:
        return self.engine.score_tokens(sequences, starts)


class TeacherFailure(RuntimeError):
    """The teacher could not score a step's tokens (the samples are masked, not scored 0)."""


class TeacherPool:
    """The teacher's actors. A call's sequences go out in chunks of ``TEACHER_CHUNK``, spread
    over the actors, each chunk within ``timeout_s``. A teacher that dies or runs past its
    deadline is restarted (by Ray) and the call repeated once; an error the teacher raises
    (its input, not its health) is not retried. Either way a failure is a ``TeacherFailure``."""

    def __init__(self, path: str, settings: TeacherSettings, engine_settings, env: dict[str, str] | None = None, seed: int = 0, startup_s: float = 600.0):
        self.settings, self.startup_s = settings, startup_s
        self.max_model_len = engine_settings.max_model_len
        server = ray.remote(num_cpus=settings.num_cpus, num_gpus=settings.num_gpus, max_restarts=-1)(TeacherServer)
        options = {"runtime_env": {"env_vars": env}} if env else {}
        self.actors = [server.options(**options).remote(path, engine_settings, seed) for _ in range(settings.num_generators)]
        self.restarts = 0
        try:
            ray.get([actor.ready.remote() for actor in self.actors], timeout=startup_s)
        except (GetTimeoutError, RayActorError) as exc:
            self.kill()
            raise RuntimeError(f"the distillation teacher's actors did not start: {str(exc).strip().splitlines()[-1]}") from exc

    def score_tokens(self, sequences: list[list[int]], starts: list[int]) -> list[list[float]]:
        """Each sequence's log-probs from its start on."""
        chunks = [(sequences[i : i + TEACHER_CHUNK], starts[i : i + TEACHER_CHUNK]) for i in range(0, len(sequences), TEACHER_CHUNK)]
        error = ""
        for attempt in range(2):
            refs = [self.actors[k % len(self.actors)].score_tokens.remote(seqs, sts) for k, (seqs, sts) in enumerate(chunks)]
            rounds = -(-len(chunks) // len(self.actors))
            try:
                return [row for part in ray.get(refs, timeout=self.settings.timeout_s * rounds) for row in part]
            except RayTaskError as exc:  # the teacher refused the input: no restart would help
                raise TeacherFailure(f"the distillation teacher failed on this step's tokens: {str(exc).strip().splitlines()[-1][:300]}") from exc
            except (GetTimeoutError, RayActorError) as exc:
                error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1][:200]}"
                for ref in refs:
                    ray.cancel(ref, force=True)
                if attempt == 0:
                    logger.warning("distillation teacher failed (%s): restarting it and trying again", error)
                    self._restart()
        raise TeacherFailure(f"the distillation teacher failed twice: {error}")

    def _restart(self) -> None:
        self.restarts += 1
        for actor in self.actors:
            ray.kill(actor, no_restart=False)  # Ray starts it anew (max_restarts=-1)
        deadline = time.monotonic() + self.startup_s
        while time.monotonic() < deadline:
            try:
                ray.get([actor.ready.remote() for actor in self.actors], timeout=max(1.0, deadline - time.monotonic()))
                return
            except (GetTimeoutError, RayActorError):  # a call that reached the dying worker
                time.sleep(1.0)

    def kill(self) -> None:
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self.actors = []


# -- the clients: reward terms opened in the verifier actors ---------------------------------


@dataclass(frozen=True)
class ServedTerm:
    """A term whose model runs in ``handles`` (actors of one kind); it is its own opened form."""

    name: str
    weight: float
    on_error: OnError
    timeout_s: float
    retries: int
    handles: tuple = field(default=(), hash=False, compare=False)
    judge: JudgeSettings | None = None  # an LLM judge's settings; None: a reward model

    @property
    def label(self) -> str:
        return self.name

    def open(self) -> ServedTerm:
        return self

    def __call__(self, items: list[Item]) -> list[Any]:
        if self.judge is not None:
            prompts = [judge_prompt(self.judge, completion, problem) for completion, problem in items]
            replies = self._ask("judge", prompts, self.judge.max_tokens)
            if isinstance(replies, TermFailure):
                return [replies] * len(items)
            return [_parsed(reply, self.judge) for reply in replies]
        values = self._ask("score", [(problem.question, completion) for completion, problem in items])
        return [values] * len(items) if isinstance(values, TermFailure) else values

    def _ask(self, method: str, *args) -> list | TermFailure:
        """``method`` on one actor after another (``retries`` more), each within ``timeout_s``."""
        error, start = "", random.randrange(len(self.handles))  # spread the verifiers over the replicas
        for attempt in range(self.retries + 1):
            handle = self.handles[(start + attempt) % len(self.handles)]
            ref = getattr(handle, method).remote(*args)
            try:
                return ray.get(ref, timeout=self.timeout_s)
            except GetTimeoutError:
                ray.cancel(ref)  # the server drops it when it can
                error = f"no answer within {self.timeout_s:.0f}s"
            except (RayActorError, RayTaskError) as exc:
                error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1][:200]}"
                time.sleep(min(2.0, 0.5 * (attempt + 1)))  # a restarting server
        return TermFailure(f"{self.name} server: {error} (after {self.retries} retries)")


def _parsed(reply: str, settings: JudgeSettings) -> float | TermFailure:
    try:
        return parse_judgement(reply, settings)
    except TermFailure as failure:
        return failure


# -- the servers of a run ---------------------------------------------------------------------


class RewardServices:
    """The reward model's, the judge's and the distillation teacher's actors of one run,
    started before the verifiers (which ask the first two; the driver asks the teacher)."""

    def __init__(self, model: RewardModelSettings | None = None, judge: JudgeSettings | None = None, judge_path: str = "",
                 engine_settings=None, env: dict[str, str] | None = None, seed: int = 0, teacher: TeacherSettings | None = None,
                 teacher_path: str = "", teacher_engine=None, teacher_env: dict[str, str] | None = None, startup_s: float = 600.0):  # fmt: skip
        self.terms: list[ServedTerm] = []
        self.actors: list = []
        self.teacher: TeacherPool | None = None
        if model is not None:
            from rollout.models import resolve_reward_model

            path = resolve_reward_model(model.path)
            server = ray.remote(num_cpus=model.num_cpus, num_gpus=model.num_gpus, max_restarts=SERVER_RESTARTS)(RewardModelServer)
            handles = tuple(server.remote(path, model) for _ in range(model.num_actors))
            self.actors += handles
            self.terms.append(ServedTerm(model.name, model.weight, model.on_error, model.timeout_s, model.retries, handles))
        if judge is not None:
            server = ray.remote(num_cpus=judge.num_cpus, num_gpus=judge.num_gpus, max_restarts=SERVER_RESTARTS)(JudgeServer)
            options = {"runtime_env": {"env_vars": env}} if env else {}
            handles = tuple(server.options(**options).remote(judge_path, engine_settings, seed) for _ in range(judge.num_generators))
            self.actors += handles
            self.terms.append(ServedTerm(judge.name, judge.weight, judge.on_error, judge.timeout_s, judge.retries, handles, judge))
        try:
            ray.get([actor.ready.remote() for actor in self.actors], timeout=startup_s)
            if teacher is not None:
                self.teacher = TeacherPool(teacher_path, teacher, teacher_engine or engine_settings, teacher_env or env, seed, startup_s)
        except (GetTimeoutError, RayActorError, RuntimeError) as exc:
            self.kill()
            raise RuntimeError(f"the reward model / judge / teacher actors did not start: {str(exc).strip().splitlines()[-1]}") from exc

    @property
    def handles(self) -> list:
        """Every actor (the memory probe asks them)."""
        return self.actors + (self.teacher.actors if self.teacher is not None else [])

    def kill(self) -> None:
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self.actors = []
        if self.teacher is not None:
            self.teacher.kill()
