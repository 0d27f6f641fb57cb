"""Code rewards through the real sandbox: correct programs pass, wrong ones fail, and the
false-pass tricks (early exit, an always-equal object, patching unittest or json, reading the
own source) cannot turn a wrong program into a pass."""

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
