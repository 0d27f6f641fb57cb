"""Markovian chain-of-thought training (Viteri et al., arXiv 2404.18988): the prompts, the
answer contexts and the perturbations, as pure functions of a tokenizer and the settings.

The policy writes a chain of thought (CoT) of exactly ``cot_length`` tokens after the question.
A CoT is worth what it tells a frozen copy of the model (the base model, adapter off) about the
answer when the question itself is redacted:

    score(CoT) = log p_frozen(answer | instruction with the question redacted, CoT, answer header)
    reward     = score(CoT) - score(CoT')

summed over the answer's tokens, where CoT' is the frozen model's own greedy chain of thought
for the same question (the paper's ``normalize_loss``; ``baseline: false`` keeps the bare
score). ``cluster.features.markovian`` computes the scores on the learner and merges them into the
verdicts before the advantages, which standardise the rewards within each group (``grpo``,
the paper's parallel sampling) or over the batch (``batch-std``).

The informativeness evaluation asks the frozen model for the answer after a CoT that is intact
or perturbed: characters deleted, the end cut off, or the CoT of another question swapped in.
A CoT that carries the answer loses accuracy when perturbed; one that does not, does not.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal, Sequence

from contracts import Problem, Prompt

Perturbation = Literal["delete", "truncate", "swap"]
PERTURBATIONS: tuple[Perturbation, ...] = ("delete", "truncate", "swap")


@dataclass(frozen=True)
class MarkovianSettings:
    """The config's ``markovian`` section (docs/algorithms.md#markovian-chain-of-thought-training)."""

    enabled: bool = False  # train chains of thought rewarded by the frozen model's answer log-prob
    cot_length: int = 100  # tokens of every chain of thought: sampled with min_tokens = max_tokens
    baseline: bool = True  # subtract the frozen model's score of its own greedy CoT' (normalised reward)
    # false: the paper's Non-Markovian comparison, the answer scored with the question in view
    redact_question: bool = True
    # the user turn; {cot_length} and {question} are filled in ({question} with `redacted` for the answer)
    instruction: str = "You will be given a reasoning problem, which you have {cot_length} tokens to work through step-by-step. Question: {question}"
    cot_header: str = "Reasoning:"  # starts the assistant turn; the CoT follows it
    answer_header: str = " Answer:"  # follows the CoT; the answer is predicted after it
    redacted: str = "<Redacted>"  # stands in for the question when the answer is scored
    answer_tokens: int = 10  # evaluation: tokens the frozen model may write as its answer
    perturbations: tuple[Perturbation, ...] = PERTURBATIONS  # evaluation: besides the intact CoT
    delete_fraction: float = 0.5  # share of the CoT's characters deleted
    truncate_fraction: float = 0.5  # share of the CoT's characters cut from its end

    def problems(self) -> list[str]:
        """What is wrong with these settings, one line each, naming the key."""
        problems = []
        if self.cot_length < 1 or self.answer_tokens < 1:
            problems.append(f"markovian.cot_length ({self.cot_length}) and markovian.answer_tokens ({self.answer_tokens}) must be at least 1")
        if "{question}" not in self.instruction:
            problems.append("markovian.instruction must hold {question} (where the question goes, or the redaction)")
        for key in ("delete_fraction", "truncate_fraction"):
            if not 0.0 < getattr(self, key) <= 1.0:
                problems.append(f"markovian.{key} must be in (0, 1], got {getattr(self, key)}")
        return problems


class MarkovianPrompts:
    """The token ids of a Markovian step: the question prompt the policy continues, and the
    answer context (redacted instruction + CoT + answer header) the answer is scored after.
    Tokenised here, once per text, so the generator and the learner see the same ids."""

    def __init__(self, tokenizer, settings: MarkovianSettings):
        self.tokenizer = tokenizer
        self.settings = settings
        self._prefixes: dict[str | None, tuple[int, ...]] = {}
        self.answer_header_ids = self._ids(settings.answer_header)

    def _ids(self, text: str) -> tuple[int, ...]:
        return tuple(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _text(self, question: str, system_prompt: str | None) -> str:
        """The chat-templated turn up to and including the CoT header."""
        s = self.settings
        content = s.instruction.format(cot_length=s.cot_length, question=question)
        messages = [{"role": "user", "content": content}]
        if system_prompt:
            messages.insert(0, {"role": "system", "content": system_prompt})
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) + s.cot_header
        return f"{content}\n{s.cot_header}"

    def question_prompt(self, problem: Problem, system_prompt: str | None) -> Prompt:
        """What the policy continues with its chain of thought."""
        text = self._text(problem.question, system_prompt)
        return Prompt(problem=problem, text=text, token_ids=self._ids(text))

    def answer_context(self, cot_token_ids: Sequence[int], problem: Problem, system_prompt: str | None) -> tuple[int, ...]:
        """Redacted instruction + the CoT's own tokens + the answer header: the question's
        tokens are nowhere in it (with ``redact_question: false``, the question prompt itself
        comes first: the Non-Markovian comparison)."""
        if not self.settings.redact_question:
            return self.question_prompt(problem, system_prompt).token_ids + tuple(cot_token_ids) + self.answer_header_ids
        if system_prompt not in self._prefixes:
            self._prefixes[system_prompt] = self._ids(self._text(self.settings.redacted, system_prompt))
        return self._prefixes[system_prompt] + tuple(cot_token_ids) + self.answer_header_ids

    def answer_ids(self, problem: Problem) -> tuple[int, ...]:
        """The true answer's tokens, as they follow the answer header (after one space)."""
        return self._ids(" " + problem.answer.strip())

    def cot_ids(self, text: str) -> tuple[int, ...]:
        """A (perturbed) CoT's text as tokens."""
        return self._ids(text)


def perturb(cots: list[str], kind: Perturbation, fraction: float, seed: int) -> list[str]:
    """The CoTs of an evaluation, perturbed: ``delete`` drops ``fraction`` of each one's
    characters at random, ``truncate`` keeps the first ``1 - fraction`` of them, ``swap`` gives
    each question the CoT of the next question (the last takes the first's)."""
    if kind == "swap":
        return cots[1:] + cots[:1]
    if kind == "truncate":
        return [cot[: int(len(cot) * (1.0 - fraction))] for cot in cots]
    if kind == "delete":
        rng = random.Random(seed)
        out = []
        for cot in cots:
            dropped = set(rng.sample(range(len(cot)), int(len(cot) * fraction)))
            out.append("".join(c for i, c in enumerate(cot) if i not in dropped))
        return out
    raise ValueError(f"unknown perturbation {kind!r}; known: {list(PERTURBATIONS)}")
