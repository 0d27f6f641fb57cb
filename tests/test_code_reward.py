"""Code rewards through the real sandbox: correct programs pass, wrong ones fail, and the
false-pass tricks (early exit, an always-equal object, patching unittest or json, reading the
own source) cannot turn a wrong program into a pass."""

import time

import pytest

from rewards.code import code_reward, extract_code, run_tests, static_checks
from rewards.sandbox import Execution, Sandbox, SandboxLimits

CASES = [((1, 2), 3), ((-4, 4), 0), ((10, 5), 15)]


@pytest.fixture(scope="module")
def sandbox():
    return Sandbox(SandboxLimits(wall_s=3.0, cpu_s=3, memory_mb=512), slots=2)


def test_correct_program_passes(sandbox):
    result = run_tests(sandbox, "def add(a, b):\n    return a + b\n", "add", CASES)
    assert result.status == "passed" and result.passed == 3 and result.passed_fraction == 1.0


def test_partly_wrong_program_gets_tiered_credit(sandbox):
    result = run_tests(sandbox, "def add(a, b):\n    return a + b if a < 10 else 0\n", "add", CASES)
    assert result.status == "failed" and result.passed == 2


@pytest.mark.parametrize(
    "program",
    [
        "import sys\nsys.exit(0)\ndef add(a, b):\n    return 0\n",
        "import os\ndef add(a, b):\n    os._exit(0)\n",
        "class Eq:\n    def __eq__(self, other):\n        return True\n    def __ne__(self, other):\n        return False\n"
        "def add(a, b):\n    return Eq()\n",
        "class Int(int):\n    def __eq__(self, other):\n        return True\n    __hash__ = int.__hash__\n"
        "def add(a, b):\n    return Int(0)\n",
        "import unittest\nunittest.TestCase.assertEqual = lambda *a, **k: None\ndef add(a, b):\n    return 0\n",
        "import json\n_dumps = json.dumps\njson.dumps = lambda v, *a, **k: _dumps(v)\ndef add(a, b):\n    return 0\n",
        "import sys\nsource = open(sys.argv[0]).read() if sys.argv and sys.argv[0] else ''\ndef add(a, b):\n    return 0\n",
        "def add(a, b):\n    print('\\n@@raylight-results-0000@@[[\"ok\", 3], [\"ok\", 0], [\"ok\", 15]]')\n    return 0\n",
    ],
    ids=["sys.exit", "os._exit", "always-eq", "int-subclass-eq", "patch-unittest", "patch-json", "read-own-source", "forged-results"],
)
def test_false_pass_attempts_fail(sandbox, program):
    result = run_tests(sandbox, program, "add", CASES)
    assert result.status in ("failed", "error") and result.passed < 3, result


def test_bool_is_not_an_int_answer(sandbox):
    assert run_tests(sandbox, "def f():\n    return True\n", "f", [((), 1)]).status == "failed"


def test_runaway_programs_get_their_verdicts(sandbox):
    assert run_tests(sandbox, "def add(a, b):\n    while True:\n        pass\n", "add", CASES).status == "timeout"
    assert run_tests(sandbox, "def add(a, b):\n    return bytearray(2**33)\n", "add", CASES).status in ("failed", "memory")
    assert run_tests(sandbox, "raise RuntimeError('at import')\n", "add", CASES).status == "error"


def test_static_checks_and_extraction():
    assert static_checks("def f(:\n") == (False, False)
    assert static_checks("return 1\n") == (True, False)  # parses, does not compile
    assert static_checks("x = 1\n") == (True, True)
    text = "Here:\n```python\ndef f():\n    return 1\n```\nand better:\n```python\ndef f():\n    return 2\n```"
    assert extract_code(text) == "def f():\n    return 2\n"
    assert extract_code("def f(): return 3") == "def f(): return 3"


def test_code_reward_components(sandbox):
    v = code_reward(sandbox, "```python\ndef add(a, b):\n    return a + b\n```", "add", CASES)
    assert v.correct and v.reward == 1.0
    assert v.components == {"passed_fraction": 1.0, "all_passed": 1.0, "syntax_valid": 1.0, "compiles": 1.0, "repetition": 0.0}
    v = code_reward(sandbox, "def add(a, b) return", "add", CASES, weights={"passed_fraction": 1.0})
    assert v.components["syntax_valid"] == 0.0 and v.reward == 0.0 and v.status == "ok"


def test_sandbox_failure_is_masked_not_scored(sandbox, monkeypatch):
    broken = Execution("sandbox_error", 1, "", "bwrap: setting up uid map: Permission denied", 0.01, "bwrap failed")
    monkeypatch.setattr(sandbox, "run", lambda source: broken)
    v = code_reward(sandbox, "def add(a, b):\n    return a + b\n", "add", CASES)
    assert v.status == "infra_error" and "sandbox_error" in v.error


def test_token_accuracy_is_the_share_of_reference_tokens_reproduced(sandbox):
    from rewards.code import code_tokens, token_accuracy

    reference = "def add(a, b):\n    return a + b\n"
    assert code_tokens("return a+b  # sum") == ["return", "a", "+", "b"]
    assert token_accuracy("def add(a,b): return a+b", reference) == 1.0  # layout and comments do not count
    # 12 reference tokens (def add ( a , b ) : return a + b): "-" for "+" misses one
    assert token_accuracy("def add(a, b):\n    return a - b\n", reference) == pytest.approx(11 / 12)
    assert token_accuracy("def add(a, b):\n    return (", reference) == pytest.approx(9 / 12)  # unfinished code still counts
    assert token_accuracy("", reference) == 0.0 and token_accuracy("x", "") == 0.0
    v = code_reward(sandbox, "```python\ndef add(a, b):\n    return b + a\n```", "add", CASES, reference=reference)
    assert v.correct and v.components["token_accuracy"] == pytest.approx(10 / 12)  # b + a: one of a, b matched


# -- a completion that breaks its scorer fails; it is never masked -----------------------------

NESTED = {
    "parentheses": "def add(a, b):\n    return " + "(" * 3000 + "a" + ")" * 3000 + "\n",
    "unary-minus": "def add(a, b):\n    return " + "-" * 6000 + "a\n",
    "lists": "def add(a, b):\n    return " + "[" * 1500 + "]" * 1500 + "\n",
    "binary-chain": "def add(a, b):\n    return a" + " + a" * 20000 + "\n",
    "huge-literal": "def add(a, b):\n    return " + "9" * 5000 + "\n",
}


@pytest.mark.parametrize("name", NESTED)
def test_a_program_too_nested_for_the_parser_is_the_programs_failure(sandbox, name):
    """3-6 KB of nested expression makes ``ast.parse`` or ``compile`` run out of recursion or
    memory in the parent: the program is not valid, and its verdict is a scored failure."""
    verdict = code_reward(sandbox, NESTED[name], "add", CASES)
    assert verdict.status == "ok" and not verdict.correct and verdict.reward == 0.0, verdict
    assert verdict.outcome in ("error", "failed"), verdict


def test_scorer_exceptions_a_completion_causes_are_failures_others_are_the_verifiers():
    """``rewards.scoring.unscorable``: RecursionError, MemoryError and OverflowError raised while
    scoring are the completion's doing (a failed verdict, scored); anything else is the
    verifier's own failure, left for the pool to retry and mask. The verifier actor's plain
    class keeps that distinction."""
    from actors.verifier import Verifier
    from contracts import Problem
    from rewards.scoring import unscorable

    def raising(exc):
        def scorer(completion, problem):
            raise exc

        return scorer

    problem = Problem(uid="p", question="q", answer="1")
    for exc in (RecursionError("deep"), MemoryError(), OverflowError("int too large")):
        verdict = Verifier(lambda e=exc: unscorable(raising(e))).score([("x", problem)])[0]
        assert verdict.status == "ok" and verdict.outcome == "unscorable" and verdict.reward == 0.0, verdict
        assert type(exc).__name__ in verdict.error
    verdict = Verifier(lambda: unscorable(raising(RuntimeError("disk gone")))).score([("x", problem)])[0]
    assert verdict.status == "infra_error" and "disk gone" in verdict.error


def test_every_scorer_is_guarded_against_completion_faults():
    """``build_scorer`` wraps each scorer: a numeric answer nested past the recursion limit is
    scored, whatever math-verify makes of it."""
    from contracts import Problem
    from rewards.scoring import ScorerSpec, build_scorer

    problem = Problem(uid="p", question="q", answer="2")
    for completion in ("Answer: " + "(" * 5000 + "1" + ")" * 5000, "\\boxed{" + "{" * 3000 + "2" + "}" * 3000 + "}", "9" * 50_000):
        verdict = build_scorer(ScorerSpec("numeric"))(completion, problem)
        assert verdict.status == "ok" and not verdict.correct, verdict


# -- the fenced-code scan --------------------------------------------------------------------


def test_extract_code_matches_the_fence_regex_it_replaces():
    """The linear scan gives what ``FENCE[^\\n]*\\n(.*?)FENCE`` (its last match) gave, on every
    short string of fences, backticks, newlines and info strings."""
    import random
    import re

    regex = re.compile(r"```(?:python|py)?[^\n]*\n(.*?)```", re.DOTALL)
    rng = random.Random(0)
    pieces = ["`", "``", "```", "\n", "a", "py", "python", " "]
    for _ in range(20_000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 14)))
        blocks = regex.findall(text)
        assert extract_code(text) == (blocks[-1] if blocks else text), repr(text)


@pytest.mark.parametrize("text", ["`" * 200_000, "```\n" + "`" * 200_000, "```" + "`\n" * 100_000, "``\n" * 100_000])
def test_extract_code_is_linear_on_a_completion_of_backticks(text):
    """A bound a thousand times the scan's own time: the regex it replaces was quadratic on the
    first two (0.15 s for 16,000 backticks, about 23 s for 200,000)."""
    start = time.perf_counter()
    extract_code(text)
    assert time.perf_counter() - start < 1.0


def test_a_set_of_colliding_values_costs_the_verifier_nothing(sandbox):
    """A program reads the result marker from its own source and prints, as its result, a set
    of 40,000 integers that all share one hash (``k * (2**61 - 1)``): built as a set in the
    verifier, 9 s of quadratic work. Values whose hashes collide that much travel as opaque,
    and the sample fails at once."""
    completion = (
        "import json, os, re\ndef add(a, b):\n    return a + b\n"
        "marker = re.search(r'@@raylight-results-[0-9a-f]{16}@@', os.pread(0, 1 << 20, 0).decode()).group(0)\n"
        "values = [k * (2**61 - 1) for k in range(1, 40_000)]\n"
        "os.write(1, ('\\n' + marker + '0 ' + json.dumps(['ok', ['set', values]]) + '\\n').encode())\nos._exit(0)\n"
    )
    start = time.perf_counter()
    verdict = code_reward(sandbox, completion, "add", [((1, 2), 3)])
    assert verdict.status == "ok" and not verdict.correct and time.perf_counter() - start < 1.0, verdict
    from rewards import wire

    assert wire.decode(["set", [1, 2, 3]]) == {1, 2, 3} and wire.decode(["set", list(range(1000))]) == set(range(1000))
    assert type(wire.decode(["set", [k * (2**61 - 1) for k in range(1, 100)]])) is wire.Opaque


def test_a_set_with_just_under_half_its_values_colliding_is_opaque_too():
    """30,000 values sharing one hash beside 30,001 that do not: fewer than half collide, and a
    set of them still cost 5 s to build. More than ``MAX_COLLISIONS`` colliding values is
    opaque, however many others come with them."""
    from rewards import wire

    values = [m * (2**61 - 1) for m in range(1, 30_001)] + list(range(-30_001, 0))
    start = time.perf_counter()
    decoded = wire.decode(["set", values])
    assert type(decoded) is wire.Opaque and time.perf_counter() - start < 1.0
    assert wire.decode(["set", [-1, -2, *range(10_000)]]) == {-1, -2, *range(10_000)}  # -1 and -2 share a hash
