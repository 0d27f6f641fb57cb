"""Episodes kept as token ids: token in, token out across turns.

A multi-turn episode is never re-tokenised. Its first prompt is rendered and tokenised once;
each assistant turn is appended as the ids the generator sampled (with their log-probs); each
observation is appended as the ids the chat template puts after the conversation so far
(``ChatDelta``), rendered after a short fixed conversation and cut from it, as verl's
agent loop and SkyRL do. Re-tokenising the history instead can merge or split tokens at turn
boundaries, so the learner would score other tokens than the generator sampled.

``EpisodeBuilder`` grows one episode turn by turn and hands it over as a ``Sample`` whose
completion is every token after the prompt, with the ``Episode`` record saying which are the
policy's (trained on) and which the environment's (masked).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from contracts import Completion, Episode, EnvStep, PolicyRef, Problem, Prompt, Sample

# the fixed conversation observations are rendered after (its content does not matter: it is cut)
_BASE = ({"role": "system", "content": "S"}, {"role": "user", "content": "U"}, {"role": "assistant", "content": "A"})


class ChatDelta:
    """The ids a chat template puts between an assistant turn and the next one.

    ``closing(turn)``: what ends the sampled turn as the template would have ended it (its
    end-of-turn token, where the turn ran out of tokens before it, and the separator the
    template writes after it), read from the template's own rendering of an assistant turn
    rather than from the tokenizer's ``eos`` (which for some checkpoints is another token);
    ``observation(messages)``: the messages and the next assistant header, rendered after the
    fixed conversation in the same call as the conversation alone (a template that prints
    today's date renders both alike). Without a chat template (a base model), an observation
    is its text between blank lines and a turn needs no closing.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.chat = bool(getattr(tokenizer, "chat_template", None))
        self.end: tuple[int, ...] = ()  # the template's end-of-turn token, and
        self.separator: tuple[int, ...] = ()  # what it writes after it
        if self.chat:
            header = self._ids(list(_BASE[:2]), generation=True)
            turn = self._ids(list(_BASE), generation=False)
            content = self.tokenizer(_BASE[2]["content"], add_special_tokens=False)["input_ids"]
            after = turn[len(header) :]
            if turn[: len(header)] == header and after[: len(content)] == content and len(after) > len(content):
                closing = tuple(after[len(content) :])
                self.end, self.separator = closing[:1], closing[1:]

    def _ids(self, messages: list[dict], generation: bool) -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def prompt(self, problem: Problem, messages: list[dict]) -> Prompt:
        """An episode's first prompt: ``messages`` rendered and tokenised once."""
        if self.chat:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        else:
            text = "\n\n".join(m["content"] for m in messages) + "\n"
        return Prompt(problem=problem, text=text, token_ids=tuple(self.tokenizer(text, add_special_tokens=False)["input_ids"]))

    def closing(self, turn: tuple[int, ...]) -> tuple[int, ...]:
        if not self.end:
            return ()
        return self.separator if turn[-1:] == self.end else self.end + self.separator

    def observation(self, messages: tuple[dict, ...] | list[dict]) -> tuple[int, ...]:
        if not self.chat:
            text = "\n\n" + "\n\n".join(m["content"] for m in messages) + "\n\n"
            return tuple(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        base = self._ids(list(_BASE), generation=False)
        full = self._ids([*_BASE, *messages], generation=True)
        if full[: len(base)] != base:
            raise ValueError(
                "this chat template renders a conversation's earlier turns differently once more turns follow (or refuses "
                f"the roles {sorted({m['role'] for m in messages})}), so an observation cannot be appended as tokens; use a "
                "model whose template appends turns (ChatML, Llama 3) or another env.observation_role"
            )
        return tuple(full[len(base) :])


@dataclass
class EpisodeBuilder:
    """One episode as it grows: the ids after its prompt, which are the policy's, their
    log-probs, each turn's policy and text, and the tool counts."""

    prompt: Prompt
    group_index: int
    ids: list[int] = field(default_factory=list)
    mask: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    policies: list[PolicyRef] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)  # the policy version of each id (observations: the turn's before them)
    turns: list[str] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)  # the turns and the observations' text, in order
    last_turn_ids: tuple[int, ...] = ()
    finish_reason: str = ""
    # the verdict and the tool counts so far (``sample`` adds the mask, the policies, the text)
    result: Episode = field(default_factory=Episode)
    done: bool = False

    def context(self) -> tuple[int, ...]:
        """The next turn's prompt ids: the first prompt and everything since, as sampled."""
        return self.prompt.token_ids + tuple(self.ids)

    def context_prompt(self) -> Prompt:
        return dataclasses.replace(self.prompt, token_ids=self.context())

    def add_turn(self, completion: Completion, policy: PolicyRef) -> None:
        """The policy's turn, exactly as the generator sampled it."""
        if len(completion.logprobs) != len(completion.token_ids):
            raise ValueError(f"a turn of {len(completion.token_ids)} tokens came with {len(completion.logprobs)} log-probs")
        self.ids += completion.token_ids
        self.mask += [1] * len(completion.token_ids)
        self.logprobs += completion.logprobs
        self.versions += completion.versions or [policy.version] * len(completion.token_ids)
        self.policies.append(policy)
        self.turns.append(completion.text)
        self.texts.append(completion.text)
        self.last_turn_ids, self.finish_reason = completion.token_ids, completion.finish_reason

    def add_observation(self, ids: tuple[int, ...], text: str) -> None:
        """The environment's tokens (``text`` decoded from them): never trained on, log-prob 0."""
        self.texts.append(text)
        self.ids += ids
        self.mask += [0] * len(ids)
        self.logprobs += [0.0] * len(ids)
        self.versions += [self.versions[-1] if self.versions else self.policies[-1].version if self.policies else 0] * len(ids)

    def count_tool(self, step: EnvStep) -> None:
        if step.tool is None:
            return
        r = self.result
        self.result = dataclasses.replace(
            r, tool_calls=r.tool_calls + 1, tool_seconds=r.tool_seconds + step.tool_seconds,
            tool_errors=r.tool_errors + (step.tool != "ok"), tool_timeouts=r.tool_timeouts + (step.tool == "timeout"),
        )  # fmt: skip

    def finish(self, step: EnvStep | None = None, truncated: bool = False, infra_error: str | None = None) -> None:
        self.done = True
        infra_error = infra_error or (step.infra_error if step is not None else None)
        self.result = dataclasses.replace(self.result, truncated=truncated, infra_error=infra_error)
        if step is not None:  # the environment's verdict on the last turn, where it judges
            self.result = dataclasses.replace(self.result, reward=step.reward, correct=step.correct)

    def sample(self) -> Sample:
        """The episode as one sample, its oldest turn's policy its own (staleness is bounded by it)."""
        oldest = min(self.policies, key=lambda p: p.version) if self.policies else PolicyRef()
        completion = Completion(
            token_ids=tuple(self.ids), text="".join(self.texts), logprobs=tuple(self.logprobs),
            finish_reason="truncated" if self.result.truncated else self.finish_reason,
            versions=tuple(self.versions) if any(v != oldest.version for v in self.versions) else (),
        )  # fmt: skip
        episode = dataclasses.replace(self.result, loss_mask=tuple(self.mask), policies=tuple(self.policies), final_text=self.turns[-1] if self.turns else "")
        return Sample(prompt=self.prompt, completion=completion, policy=oldest, group_index=self.group_index, episode=episode)
