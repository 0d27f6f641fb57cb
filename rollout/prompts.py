"""Render problems through the model's chat template and tokenise them once."""

from __future__ import annotations

from typing import Sequence

from contracts import Problem, Prompt

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant. Answer briefly."


def render_prompts(tokenizer, problems: Sequence[Problem], system_prompt: str | None = DEFAULT_SYSTEM_PROMPT) -> list[Prompt]:
    """Chat-template each problem and tokenise it: its question as one user turn, or its chat
    (``meta["messages"]``, a dataset's chat-format row), after ``system_prompt`` as a system
    turn where the chat has none. Without a chat template the turns' texts are joined.

    Tokenising here, not in the engine, guarantees the generator and the learner see the same ids.
    """
    prompts = []
    for problem in problems:
        messages = list(problem.meta.get("messages") or [{"role": "user", "content": problem.question}])
        if system_prompt and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": system_prompt})
        if getattr(tokenizer, "chat_template", None):
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        elif problem.meta.get("messages"):
            text = "\n\n".join(m["content"] for m in messages if m["role"] != "system") + "\n"
        else:
            text = problem.question + "\n"
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        prompts.append(Prompt(problem=problem, text=text, token_ids=tuple(ids)))
    return prompts
