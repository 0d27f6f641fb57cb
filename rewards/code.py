"""Code rewards: run a model-written function against test cases in the sandbox, judge outside.

The sandbox runs the program followed by a harness that calls the entry point on each test
input and prints each return value in ``rewards.wire``'s typed JSON (an exception as its type
name). The expected values never enter the sandbox: the parent decodes plain Python values and
compares them. So a program that exits early (``sys.exit(0)``, ``os._exit(0)``) reports no
results and fails; an object whose ``__eq__`` always returns True, or a subclass of ``int``,
arrives as an opaque value that equals nothing; patching ``unittest`` or ``json``, reading its
own source, or forging result lines gains nothing, because the judge and the answers are not
there.
"""

from __future__ import annotations

import ast
import json
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

from rewards import wire
from rewards.sandbox import Execution, Sandbox
from rewards.text import repetition_stats
from rewards.weights import weigh
from contracts import Verdict

CodeStatus = Literal["passed", "failed", "error", "timeout", "memory", "output_limit", "sandbox_error"]


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


FENCE = "```"


def extract_code(completion: str) -> str:
    """The last fenced code block, else the whole completion. A block opens at a fence (the
    rest of its line, ``python`` say, is the info string) and closes at the next fence.

    A scan in linear time: the regular expression it replaces, ``FENCE[^\\n]*\\n(.*?)FENCE``,
    backtracked quadratically on a completion of backticks."""
    last = None
    start = 0
    while (opening := completion.find(FENCE, start)) >= 0:
        line_end = completion.find("\n", opening + len(FENCE))
        closing = completion.find(FENCE, line_end + 1) if line_end >= 0 else -1
        if closing < 0:
            break  # no later fence has both a line end and a closing fence after it either
        last = completion[line_end + 1 : closing]
        start = closing + len(FENCE)
    return completion if last is None else last


# what parsing or compiling a program raises when the program is the problem: a syntax error,
# a null byte, and, for deep nesting or huge literals, running out of recursion or memory
_UNPARSABLE = (SyntaxError, ValueError, RecursionError, MemoryError, OverflowError)


def static_checks(program: str) -> tuple[bool, bool]:
    """(syntax valid per ``ast.parse``, compiles per ``compile``), judged in the parent. A
    program too deeply nested or too large for the parser is neither: the program's failure,
    not the verifier's."""
    try:
        ast.parse(program)
    except _UNPARSABLE:
        return False, False
    try:
        compile(program, "<sample>", "exec")
    except _UNPARSABLE:
        return True, False
    return True, True


@dataclass(frozen=True)
class Call:
    """One call of the program's entry point: its outcome is ``("ok", value)`` or
    ``("raised", exception type name)``."""

    args: tuple = ()
    kwargs: dict = field(default_factory=dict, hash=False)


_WIRE_SOURCE = Path(wire.__file__).read_text()


def harness(program: str, entry_point: str, calls: Sequence[Call], marker: str) -> str:
    """The program, then each call of ``entry_point``; each outcome is printed as soon as it is
    known, as one marked line ``<marker><index> <encoded outcome>``, so a run cut short by a
    time or memory limit still reports the calls it finished."""
    payload = json.dumps([[wire.encode(c.args), wire.encode(c.kwargs)] for c in calls])
    return f"""{program}

def __raylight_run():
    import json as _json, sys as _sys
    _wire = {{}}
    exec({_WIRE_SOURCE!r}, _wire)
    _write = _sys.stdout.write
    for _i, (_args, _kwargs) in enumerate(_json.loads({payload!r})):
        try:
            _value = {entry_point}(*_wire["decode"](_args), **_wire["decode"](_kwargs))
            _out = ["ok", _wire["encode"](_value)]
        except BaseException as _exc:
            _out = ["raised", type(_exc).__name__]
        _write("\\n" + {marker!r} + str(_i) + " " + _json.dumps(_out) + "\\n")
        _sys.stdout.flush()

__raylight_run()
"""


Outcome = tuple[str, Any]


def new_marker() -> str:
    """A fresh random prefix for result lines. A program can read it from its own source as it
    runs and print lines of its own: they can only claim results it could have returned, and
    the expected values are not in the sandbox."""
    return f"@@raylight-results-{secrets.token_hex(8)}@@"


def _outcomes(stdout: str, marker: str, total: int) -> list[Outcome | None]:
    """Decoded outcomes by call index; None where a call reported nothing (or garbage)."""
    found: list[Outcome | None] = [None] * total
    for line in stdout.splitlines():
        if not line.startswith(marker):
            continue
        index, _, data = line[len(marker) :].partition(" ")
        try:
            kind, value = json.loads(data)
            i = int(index)
            found[i] = ("ok", wire.decode(value)) if kind == "ok" else ("raised", str(value))
        except (ValueError, TypeError, IndexError, RecursionError):
            continue
    return found


@dataclass(frozen=True)
class CallsRun:
    """What a sandbox run of a program's calls produced."""

    status: CodeStatus | None  # None: the run finished; judge the outcomes
    outcomes: list[Outcome | None]
    syntax_valid: bool
    compiles: bool
    execution: Execution | None = None


def run_calls(sandbox: Sandbox, program: str, entry_point: str, calls: Sequence[Call]) -> CallsRun:
    """All ``calls`` of ``program``'s ``entry_point`` in one sandbox run; nothing is judged here."""
    syntax_valid, compiles = static_checks(program)
    if not compiles or not entry_point.isidentifier():
        return CallsRun("error", [None] * len(calls), syntax_valid, compiles)
    marker = new_marker()
    execution = sandbox.run(harness(program, entry_point, calls, marker))
    outcomes = _outcomes(execution.stdout, marker, len(calls))
    limited = execution.status if execution.status in ("timeout", "memory", "output_limit", "sandbox_error") else None
    if limited is None and any(o is None for o in outcomes):
        limited = "error"  # exited early or raised at import: calls without outcome are failures
    return CallsRun(limited, outcomes, syntax_valid, compiles, execution)


def run_tests(sandbox: Sandbox, program: str, entry_point: str, cases: Sequence[tuple[Sequence[Any], Any]]) -> CodeResult:
    """Run ``program`` against ``cases`` of (arguments, expected return value) in one sandbox
    run; the expected values stay here."""
    run = run_calls(sandbox, program, entry_point, [Call(tuple(args)) for args, _ in cases])
    passed = sum(o is not None and o[0] == "ok" and wire.same(o[1], want) for o, (_, want) in zip(run.outcomes, cases))
    status = run.status or ("passed" if passed == len(cases) else "failed")
    return CodeResult(status, passed, len(cases), run.syntax_valid, run.compiles, run.execution)


DEFAULT_WEIGHTS = {"all_passed": 1.0}


def code_reward(
    sandbox: Sandbox,
    completion: str,
    entry_point: str,
    cases: Sequence[tuple[Sequence[Any], Any]],
    weights: Mapping[str, float] = DEFAULT_WEIGHTS,
    reference: str | None = None,
) -> Verdict:
    """Components: ``passed_fraction`` (tiered), ``all_passed``, ``syntax_valid``, ``compiles``,
    ``repetition``, and ``token_accuracy`` where a ``reference`` solution exists. A sandbox
    failure is an infrastructure error (masked, never scored 0)."""
    result = run_tests(sandbox, extract_code(completion), entry_point, cases)
    return code_verdict(result, completion, weights, reference)


def code_tokens(source: str) -> list[str]:
    """Python's own tokens of ``source`` (names, operators, numbers, strings; no comments or
    layout), or, where it does not tokenize (unfinished model code), a regular-expression split."""
    import io
    import tokenize

    kept = (tokenize.NAME, tokenize.OP, tokenize.NUMBER, tokenize.STRING)
    try:
        return [t.string for t in tokenize.generate_tokens(io.StringIO(source).readline) if t.type in kept]
    except (tokenize.TokenError, IndentationError, SyntaxError):
        return re.findall(r"[A-Za-z_]\w*|\d+(?:\.\d+)?|\S", re.sub(r"#[^\n]*", "", source))


def token_accuracy(code: str, reference: str) -> float:
    """The share of the reference solution's tokens the code reproduces, in order (the longest
    matching blocks, difflib): 1.0 for the reference itself, whatever the layout. Only the
    code's first ``4 x`` as many tokens as the reference has (and 64 more) are compared:
    difflib is quadratic, and a completion of the reference's tokens in a long shuffle would
    otherwise cost the verifier seconds."""
    from difflib import SequenceMatcher

    wanted = code_tokens(reference)
    written = code_tokens(code)[: 4 * len(wanted) + 64]
    if not wanted:
        return 0.0
    matched = sum(block.size for block in SequenceMatcher(None, wanted, written, autojunk=False).get_matching_blocks())
    return matched / len(wanted)


def code_verdict(result: CodeResult, completion: str, weights: Mapping[str, float] = DEFAULT_WEIGHTS, reference: str | None = None) -> Verdict:
    """The reward of a judged program; a sandbox failure is an infrastructure error."""
    if result.status == "sandbox_error":
        detail = result.execution.detail if result.execution else "sandbox error"
        return Verdict.infra_error(f"sandbox_error: {detail}", outcome="sandbox_error")
    components = {
        "passed_fraction": result.passed_fraction,
        "all_passed": float(result.status == "passed"),
        "syntax_valid": float(result.syntax_valid),
        "compiles": float(result.compiles),
        "repetition": float(repetition_stats(completion)["repetitive"]),
    }
    if reference:
        components["token_accuracy"] = token_accuracy(extract_code(completion), reference)
    reward = weigh(components, weights)
    return Verdict(reward=reward, correct=result.status == "passed", components=components, outcome=result.status)
