"""Code rewards: run a model-written function against test cases in the sandbox, judge outside.

The sandbox runs the program followed by a harness that calls the entry point on each test
input and prints the return values as JSON (exceptions as their type name). The expected
values never enter the sandbox: the parent parses the JSON and compares plain Python values.
So a program that exits early (``sys.exit(0)``, ``os._exit(0)``) prints no results and fails;
an object whose ``__eq__`` always returns True is serialised by its real content (JSON uses
``int.__repr__`` and friends, not the subclass's methods) or by ``repr`` and compares unequal;
patching ``unittest`` or reading its own source gains nothing, because the judge is not there.
"""

from __future__ import annotations

import ast
import json
import re
import secrets
from dataclasses import dataclass
from typing import Any, Literal, Mapping, Sequence

from rewards.sandbox import Execution, Sandbox
from rewards.text import repetition_stats
from rewards.weights import weigh
from rollout.contracts import Verdict

CodeStatus = Literal["passed", "failed", "error", "timeout", "memory", "output_limit", "sandbox_error"]

_FENCE = re.compile(r"```(?:python|py)?[^\n]*\n(.*?)```", re.DOTALL)


@dataclass(frozen=True)
class CodeResult:
    status: CodeStatus
    passed: int
    total: int
    syntax_valid: bool
    compiles: bool
    execution: Execution | None = None

    @property
    def passed_fraction(self) -> float:
        return self.passed / self.total if self.total else 0.0


def extract_code(completion: str) -> str:
    """The last fenced code block, else the whole completion."""
    blocks = _FENCE.findall(completion)
    return blocks[-1] if blocks else completion


def static_checks(program: str) -> tuple[bool, bool]:
    """(syntax valid per ``ast.parse``, compiles per ``compile``), judged in the parent."""
    try:
        ast.parse(program)
    except (SyntaxError, ValueError):
        return False, False
    try:
        compile(program, "<sample>", "exec")
    except (SyntaxError, ValueError):
        return True, False
    return True, True


def harness(program: str, entry_point: str, inputs: Sequence[Sequence[Any]], marker: str) -> str:
    """The program, then calls of ``entry_point`` on each input; results as one marked JSON line."""
    return f"""{program}

def __raylight_run():
    import json as _json, sys as _sys
    _out = []
    for _args in _json.loads({json.dumps(json.dumps([list(a) for a in inputs]))}):
        try:
            _value = {entry_point}(*_args)
            try:
                _out.append(["ok", _json.loads(_json.dumps(_value))])
            except (TypeError, ValueError):
                _out.append(["ok", ["__repr__", repr(_value)]])
        except BaseException as _exc:
            _out.append(["raised", type(_exc).__name__])
    _sys.stdout.write("\\n" + {marker!r} + _json.dumps(_out) + "\\n")
    _sys.stdout.flush()

__raylight_run()
"""


def _results(stdout: str, marker: str) -> list | None:
    lines = [line for line in stdout.splitlines() if line.startswith(marker)]
    if not lines:
        return None
    try:
        results = json.loads(lines[-1][len(marker) :])
    except json.JSONDecodeError:
        return None
    return results if isinstance(results, list) else None


def _same(actual: Any, expected: Any) -> bool:
    """Plain-value equality that does not let 1 == True or 1 == 1.0 blur types of containers."""
    if isinstance(expected, float) or isinstance(actual, float):
        return isinstance(actual, (int, float)) and not isinstance(actual, bool) and abs(actual - expected) <= 1e-9 * max(1.0, abs(expected))
    if type(actual) is not type(expected):
        return False
    if isinstance(expected, list):
        return len(actual) == len(expected) and all(_same(a, e) for a, e in zip(actual, expected))
    if isinstance(expected, dict):
        return actual.keys() == expected.keys() and all(_same(actual[k], expected[k]) for k in expected)
    return actual == expected


def run_tests(
    sandbox: Sandbox, program: str, entry_point: str, cases: Sequence[tuple[Sequence[Any], Any]]
) -> CodeResult:
    """Run ``program`` against ``cases`` of (arguments, expected return value) in one sandbox run."""
    syntax_valid, compiles = static_checks(program)
    total = len(cases)
    if not compiles:
        return CodeResult("error", 0, total, syntax_valid, compiles)
    marker = f"@@raylight-results-{secrets.token_hex(8)}@@"
    execution = sandbox.run(harness(program, entry_point, [args for args, _ in cases], marker))
    if execution.status in ("timeout", "memory", "output_limit", "sandbox_error"):
        return CodeResult(execution.status, 0, total, syntax_valid, compiles, execution)
    results = _results(execution.stdout, marker)
    if results is None or len(results) != total:
        return CodeResult("error", 0, total, syntax_valid, compiles, execution)
    expected = [json.loads(json.dumps(value)) for _, value in cases]  # the same JSON round trip
    passed = sum(kind == "ok" and _same(value, want) for (kind, value), want in zip(results, expected))
    return CodeResult("passed" if passed == total else "failed", passed, total, syntax_valid, compiles, execution)


DEFAULT_WEIGHTS = {"all_passed": 1.0}


def code_reward(
    sandbox: Sandbox,
    completion: str,
    entry_point: str,
    cases: Sequence[tuple[Sequence[Any], Any]],
    weights: Mapping[str, float] = DEFAULT_WEIGHTS,
) -> Verdict:
    """Components: ``passed_fraction`` (tiered), ``all_passed``, ``syntax_valid``, ``compiles``,
    ``repetition``. A sandbox failure is an infrastructure error (masked, never scored 0)."""
    result = run_tests(sandbox, extract_code(completion), entry_point, cases)
    if result.status == "sandbox_error":
        detail = result.execution.detail if result.execution else "sandbox error"
        return Verdict.infra_error(f"sandbox_error: {detail}")
    components = {
        "passed_fraction": result.passed_fraction,
        "all_passed": float(result.status == "passed"),
        "syntax_valid": float(result.syntax_valid),
        "compiles": float(result.compiles),
        "repetition": float(repetition_stats(completion)["repetitive"]),
    }
    reward = weigh(components, weights)
    return Verdict(reward=reward, correct=result.status == "passed", components=components, extracted=result.status)
