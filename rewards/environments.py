"""Built-in environments for multi-turn episodes (``env.name``), behind ``contracts.Environment``.

- ``guess_number``: the problem's question, and "higher" / "lower" after each wrong numeric
  answer until the answer is right (reward 1) or the turns run out (reward 0). Deterministic,
  light: it runs in the driver; the tests' environment.
- ``python_tool``: the model may write a fenced Python block; the sandbox runs it (the code
  rewards' sandbox and limits) and its stdout and stderr come back as a tool message, cut to
  ``env.tool_output_chars``; a turn without a code block is the final answer, which the task's
  scorer judges.
- ``code_repair``: a code task's tests run on each attempt; a failed attempt's result (the
  tests passed, the program's error) comes back and the model tries again; the reward is the
  last attempt's (the fraction of tests passed), ``env.turn_penalty`` per extra turn.
- ``custom``: the user's own (``env.factory``), built per episode with the same arguments.

Tool calls go through ``tools``, anything with the sandbox's ``run(source) -> Execution``
(``actors.tools.ToolPool`` in a run: sandbox hosts beside the verifiers, with deadlines).
The program's output is only ever shown to the model; every verdict comes from channels the
program does not hold (the sandbox's own account of how it ended, the harness outside it).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Callable, Literal, Protocol

from contracts import Environment, EnvStep, Problem
from rewards.code import FENCE, extract_code, run_tests
from rewards.sandbox import Execution
from rewards.terms import import_function

EnvironmentName = Literal["guess_number", "python_tool", "code_repair", "custom"]

PYTHON_TOOL_PROMPT = (
    "You can run Python: write one block ```python ... ``` and you will get its output. "
    "When you know the answer, reply without a code block."
)
CODE_REPAIR_PROMPT = "Write the function in one ```python ... ``` block. If tests fail you will see the result and may try again."


@dataclass(frozen=True)
class EnvironmentSettings:
    """Multi-turn episodes (docs/multi-turn.md): the config's ``env`` section. Without a name,
    each sample is one completion."""

    name: EnvironmentName | None = None  # the environment of every episode; None: single completions
    # with name custom: your environment class or function, "package.module:name" or "file.py:name",
    # called as factory(tools=..., settings=..., system_prompt=...) once per episode (docs/multi-turn.md)
    factory: str | None = None
    max_turns: int = 4  # assistant turns per episode; an episode still going then is truncated
    max_episode_tokens: int = 1024  # tokens after the first prompt (the turns and observations)
    turn_penalty: float = 0.0  # subtracted from the reward per turn past the first
    tool_output_chars: int = 1000  # a tool's stdout and stderr shown to the model, each cut to this (head and tail)
    observation_role: str = "tool"  # the chat role of a tool's output (guess_number's feedback is the user's)
    tool_hosts: int = 1  # sandbox actors that run tool calls
    tool_timeout_s: float = 60.0  # a tool host past this on one call is replaced and the call retried once; twice: the episode is masked
    max_parallel_steps: int = 16  # environment steps running at once in the driver (tool calls wait for a host)
    # generator.serving=batch only: a due turn waits up to this long for the environment steps
    # still running, while they outnumber the due turns, so turns reach the engine in batches
    batch_wait_s: float = 0.2

    def __post_init__(self):
        if self.max_turns < 1 or self.max_episode_tokens < 1:
            raise ValueError(f"env needs max_turns >= 1 and max_episode_tokens >= 1, not {self.max_turns} and {self.max_episode_tokens}")
        if (self.name == "custom") != (self.factory is not None):
            raise ValueError("env.name=custom names its environment in env.factory ('package.module:name' or 'file.py:name'), and only it takes one")

    @property
    def runs_code(self) -> bool:
        """Whether its episodes may run programs: tool hosts are started (a custom one may)."""
        return self.name in ("python_tool", "code_repair", "custom")


class Tools(Protocol):
    def run(self, source: str) -> Execution: ...


def clip(text: str, limit: int) -> str:
    """``text`` cut to about ``limit`` characters, its head and tail kept."""
    if len(text) <= limit:
        return text
    half = max(1, limit // 2)
    return f"{text[:half]}\n... [{len(text) - 2 * half} characters cut] ...\n{text[-half:]}"


def _first_number(text: str) -> float | None:
    match = re.search(r"-?\d+(?:\.\d+)?", text.replace(",", ""))
    return float(match.group()) if match else None


class GuessNumber:
    """Guess the problem's numeric answer, told "higher" or "lower" after each wrong guess."""

    def __init__(self, system_prompt: str | None = None):
        self.system_prompt = system_prompt
        self.target: float | None = None

    def reset(self, problem: Problem) -> list[dict]:
        try:
            self.target = float(problem.answer)
        except ValueError:
            raise ValueError(f"guess_number needs a numeric answer; problem {problem.uid!r} has {problem.answer!r}") from None
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return system + [{"role": "user", "content": f"{problem.question}\nAnswer with a number; I will tell you if it is higher or lower."}]

    def step(self, turn: str) -> EnvStep:
        guess = _first_number(turn)
        if guess is not None and abs(guess - self.target) < 1e-9:
            return EnvStep(done=True, reward=1.0, correct=True)
        feedback = "Answer with a number." if guess is None else ("Higher." if guess < self.target else "Lower.")
        return EnvStep(messages=({"role": "user", "content": feedback},), reward=0.0)


def execution_report(execution: Execution, limit: int) -> str:
    """What the model reads of a run: its stdout and stderr (each clipped), and how it ended."""
    parts = [f"[exit: {execution.status}]"]
    if execution.stdout:
        parts.append(f"stdout:\n{clip(execution.stdout, limit)}")
    if execution.stderr:
        parts.append(f"stderr:\n{clip(execution.stderr, limit)}")
    return "\n".join(parts)


class PythonTool:
    """A fenced Python block runs in the sandbox and its output comes back; a turn without one
    is the final answer (the task's scorer judges it)."""

    def __init__(self, tools: Tools, settings: EnvironmentSettings, system_prompt: str | None = None):
        self.tools, self.settings = tools, settings
        self.system_prompt = f"{system_prompt}\n{PYTHON_TOOL_PROMPT}" if system_prompt else PYTHON_TOOL_PROMPT

    def reset(self, problem: Problem) -> list[dict]:
        return [{"role": "system", "content": self.system_prompt}, {"role": "user", "content": problem.question}]

    def step(self, turn: str) -> EnvStep:
        if FENCE not in turn:
            return EnvStep(done=True)
        execution = self.tools.run(extract_code(turn))
        if execution.status == "sandbox_error":
            return EnvStep(tool="sandbox_error", tool_seconds=execution.wall_s, infra_error=f"the sandbox failed: {execution.detail}")
        report = execution_report(execution, self.settings.tool_output_chars)
        return EnvStep(messages=({"role": self.settings.observation_role, "content": report},), tool=execution.status, tool_seconds=execution.wall_s)


class CodeRepair:
    """A code task's tests on each attempt; a failed one's result comes back for another try."""

    def __init__(self, tools: Tools, settings: EnvironmentSettings, system_prompt: str | None = None):
        self.tools, self.settings = tools, settings
        self.system_prompt = f"{system_prompt}\n{CODE_REPAIR_PROMPT}" if system_prompt else CODE_REPAIR_PROMPT
        self.entry_point, self.cases = "", []

    def reset(self, problem: Problem) -> list[dict]:
        try:
            self.entry_point = problem.meta["entry_point"]
            self.cases = [(tuple(args), expected) for args, expected in problem.meta["tests"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"code_repair needs a code problem (meta entry_point and tests); {problem.uid!r}: {exc!r}") from None
        return [{"role": "system", "content": self.system_prompt}, {"role": "user", "content": problem.question}]

    def step(self, turn: str) -> EnvStep:
        result = run_tests(self.tools, extract_code(turn), self.entry_point, self.cases)
        seconds = result.execution.wall_s if result.execution is not None else 0.0
        if result.status == "sandbox_error":
            return EnvStep(tool="sandbox_error", tool_seconds=seconds, infra_error="the sandbox failed on the tests")
        reward, passed = result.passed_fraction, result.status == "passed"
        tool = "ok" if result.status in ("passed", "failed") else result.status
        if passed:
            return EnvStep(done=True, reward=reward, correct=True, tool=tool, tool_seconds=seconds)
        report = f"{result.passed} of {result.total} tests passed ({result.status})."
        if result.execution is not None and result.execution.stderr:
            report += f"\nstderr:\n{clip(result.execution.stderr, self.settings.tool_output_chars)}"
        return EnvStep(messages=({"role": self.settings.observation_role, "content": report},), reward=reward, tool=tool, tool_seconds=seconds)


def environment_factory(settings: EnvironmentSettings, tools: Tools | None, system_prompt: Callable[[Problem], str | None]) -> Callable[[Problem], Environment]:
    """A new environment per episode, for ``settings.name``; ``system_prompt(problem)``: its
    task's system prompt, which the environment's own instructions follow."""
    if settings.name in ("python_tool", "code_repair") and tools is None:
        raise ValueError(f"env.name={settings.name!r} runs code and needs the sandbox's tool hosts")
    builders: dict[str, Callable[[Problem], Environment]] = {
        "guess_number": lambda problem: GuessNumber(system_prompt(problem)),
        "python_tool": lambda problem: PythonTool(tools, settings, system_prompt(problem)),
        "code_repair": lambda problem: CodeRepair(tools, settings, system_prompt(problem)),
    }
    if settings.name == "custom":
        make = import_function(settings.factory, search=(os.getcwd(),), what="environment factory")
        builders["custom"] = lambda problem: make(tools=tools, settings=settings, system_prompt=system_prompt(problem))
    if settings.name not in builders:
        raise ValueError(f"unknown env.name {settings.name!r}; choose one of {sorted(builders)}")
    return builders[settings.name]
