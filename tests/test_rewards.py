"""Answer extraction and the numeric reward."""

import re

import pytest

from rewards.numeric import answers_equal, extract_number, has_answer_label, numbers_equal, numeric_reward
from rewards.scoring import RewardSettings, ScorerSpec, build_scorer
from contracts import Problem


def problem(answer: str) -> Problem:
    return Problem(uid="p", question="q", answer=answer)


@pytest.mark.parametrize(
    ("text", "method", "expected"),
    [
        ("3 + 4 = 7. Answer: 7", "anchor", "7"),
        ("Answer: 12, so 5 and 6", "anchor", "12"),  # the label beats the last number
        ("so 5 and 6", "anchor", "6"),  # no label: last number
        ("#### 1,234", "anchor", "1234"),
        ("the result is \\boxed{-3}", "anchor", "-3"),
        ("first 5 then 6", "first", "5"),
        ("first 5 then 6", "last", "6"),
        ("no digits here", "anchor", None),
        ("Answer: 3.50", "anchor", "3.50"),
        # from a past run's analysis: the label wins over the arithmetic before it
        ("So the steps are 250 + 250 = 500, then 500 - 2 = 498. Answer: 623", "anchor", "623"),
        ("So the steps are 250 + 250 = 500, then 500 - 2 = 498. Answer: 623", "first", "250"),
        ("So the steps are 250 + 250 = 500, then 500 - 2 = 498. Answer: 623", "last", "623"),
        ("So the steps are 250 + 250 = 500, then 500 - 2 = 498.", "anchor", "498"),
        ("#### 5 and later #### 6", "anchor", "6"),
        ("the answer is 41 (not 42)", "anchor", "41"),
        ("so $\\boxed{\\frac{3}{4}}$ in the end, not 7", "anchor", "\\frac{3}{4}"),
        ("so $\\boxed{\\frac{3}{4}}$ in the end, not 7", "last", "7"),
        ("-12 degrees", "first", "-12"),
        ("So the steps are 250 + 250 = 500, then 500 - 2 = 498. Answer: 623", "simple", "498"),  # after the last '='
        ("no equals sign, 4 then 5", "simple", "4"),
        ("x = y, and 7 then 8", "simple", "7"),
        ("ends with = nothing, 3 before", "simple", "3"),  # nothing after '=': the first number
    ],
)
def test_extract_number(text, method, expected):
    assert extract_number(text, method) == expected


def test_numbers_equal_is_exact_rational():
    assert numbers_equal("12.0", "12")
    assert numbers_equal("-3", "-3")
    assert not numbers_equal("12.5", "12")
    assert not numbers_equal(None, "1")
    assert not numbers_equal("1.2.3", "1")


def test_unknown_extraction_method_is_named():
    with pytest.raises(ValueError, match="'middle'"):
        extract_number("1 2 3", "middle")


@pytest.mark.parametrize(
    ("predicted", "expected", "equal"),
    [
        ("12.0", "12", True),  # plain numbers: exact rationals, no math-verify
        ("\\frac{1}{2}", "0.5", True),
        ("\\frac{2}{4}", "\\frac{1}{2}", True),
        ("(x+1)^2", "x^2+2x+1", True),
        ("\\{2, 1\\}", "\\{1, 2\\}", True),
        ("\\sqrt{4}", "2", True),
        ("\\frac{1}{3}", "0.5", False),
        ("x^2", "x^3", False),
        (None, "1", False),
    ],
)
def test_answer_equivalence_through_math_verify(predicted, expected, equal):
    assert answers_equal(predicted, expected) is equal


def test_every_extraction_method_is_reported():
    text = "First 3, then 10 - 2 = 8. Answer: 9"
    v = numeric_reward(text, "9", {"correct": 1.0}, method="first")
    assert v.extracted == "3" and not v.correct and v.reward == 0.0
    assert {k: v.components[k] for k in ("correct_anchor", "correct_last", "correct_first", "correct_simple")} == {
        "correct_anchor": 1.0,
        "correct_last": 1.0,
        "correct_first": 0.0,
        "correct_simple": 0.0,  # the first number after the last '=': 8
    }
    v = numeric_reward(text, "8", {"correct": 1.0}, method="simple")
    assert v.extracted == "8" and v.correct
    v = numeric_reward("the half is $\\boxed{\\frac{1}{2}}$", "0.5")
    assert v.correct and v.components["correct_anchor"] == 1.0 and v.components["correct_last"] == 0.0


def test_answer_label():
    assert has_answer_label("so Answer: 42")
    assert not has_answer_label("the answer is forty-two")


def test_numeric_reward_components_are_weighted_and_reported():
    v = numeric_reward("7 - 2 = 5\nAnswer: 5", "5", {"correct": 1.0, "format": 0.25})
    assert v.correct and v.reward == 1.25
    assert v.components == {
        "correct": 1.0, "correct_anchor": 1.0, "correct_last": 1.0, "correct_first": 0.0, "correct_simple": 1.0, "format": 1.0,
        "repetition": 0.0,
    }  # fmt: skip
    v = numeric_reward("7 - 2 = 4", "5", {"correct": 1.0, "format": 0.25})
    assert not v.correct and v.reward == 0.0 and v.extracted == "4"
    v = numeric_reward("Answer: 4", "5", {"correct": 1.0, "format": 0.25})
    assert v.reward == 0.25


def test_unknown_reward_component_is_named():
    with pytest.raises(ValueError, match="bogus"):
        numeric_reward("1", "1", {"bogus": 1.0})


def test_build_scorer_by_name():
    scorer = build_scorer(ScorerSpec(reward=RewardSettings(weights={"correct": 1.0}, extraction="first")))
    assert scorer("3 then 4", problem("3")).correct
    with pytest.raises(ValueError, match="unknown scorer"):
        build_scorer(ScorerSpec(scorer="nope"))


# -- multiple choice -------------------------------------------------------------------------

from rewards.choice import choice_reward, extract_choice  # noqa: E402
from rewards.grid import grid_reward, parse_grid  # noqa: E402
from rewards.text import format_score, longest_char_run, repeated_ngram_fraction, repetition_stats  # noqa: E402


@pytest.mark.parametrize(
    ("text", "legacy", "word_boundary"),
    [
        ("C", "C", "C"),
        ("Because the gas expands, the answer is (D).", "B", "D"),  # legacy reads "Because"
        ("An apple falls. Answer: C", "A", "C"),
        ("(B) is right", "B", "B"),
        ("I pick E. Actually, the answer is A", "E", "A"),  # the last label wins
        ("the answer is a matter of taste", None, None),  # a lowercase "a" is English, not choice A
        ("Definitely B.", "D", "B"),
        ("no letter here", None, None),
    ],
)
def test_choice_extraction_methods(text, legacy, word_boundary):
    assert extract_choice(text, "legacy") == legacy
    assert extract_choice(text, "word-boundary") == word_boundary


def test_choice_reward_reports_both_methods():
    v = choice_reward("Because of friction, B is wrong; the answer is C.", "C")
    assert v.correct and v.extracted == "C"
    assert v.components == {"correct": 1.0, "correct_legacy": 0.0, "correct_word_boundary": 1.0, "repetition": 0.0}
    assert choice_reward("Because of friction", "B", method="legacy").reward == 1.0
    with pytest.raises(ValueError, match="unknown reward components"):
        choice_reward("A", "A", weights={"bogus": 1.0})


# -- repetition and format ---------------------------------------------------------------------


def test_repetition_detector_flags_the_4444_collapse():
    collapsed = "The answer is 4444444444444444444444444444"
    assert longest_char_run(collapsed) == 28
    assert repetition_stats(collapsed)["repetitive"]
    looping = "so we add them so we add them so we add them so we add them so we add them"
    # 20 words, 17 word 4-grams, 4 distinct (the loop has period 4)
    assert repeated_ngram_fraction(looping, n=4) == pytest.approx(1 - 4 / 17)
    assert repetition_stats(looping)["repetitive"]
    varied = "First add 3 and 4 to get 7, then multiply by 2 to get 14. Answer: 14"
    assert not repetition_stats(varied)["repetitive"]
    assert longest_char_run("") == 0 and repeated_ngram_fraction("too short") == 0.0
    assert longest_char_run("a    b") == 1  # spaces do not count as a run


def test_numeric_reward_reports_repetition():
    from rewards.numeric import numeric_reward

    v = numeric_reward("4" * 40, "44")
    assert v.components["repetition"] == 1.0 and v.reward == 0.0  # reported, weight 0 by default


def test_format_score():
    assert format_score("<think>x</think> Answer: 3", [r"<think>.*</think>", r"Answer:"]) == 1.0
    assert format_score("Answer: 3", [r"<think>", r"Answer:"]) == 0.5
    assert format_score("anything", []) == 1.0


# -- ARC grids ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Output:\n[[1, 2], [3, 4]]", [[1, 2], [3, 4]]),
        ("The grid is\n0 1 2\n3 4 5\nDone.", [[0, 1, 2], [3, 4, 5]]),
        ("012\n345", [[0, 1, 2], [3, 4, 5]]),
        ("first [[1]] then\n7,8\n9,0", [[7, 8], [9, 0]]),  # the last grid wins
        ("[[1, 2], [3]]", None),  # ragged
        ("no grid at all", None),
        ("12\n345", None),  # ragged block
    ],
)
def test_parse_grid(text, expected):
    assert parse_grid(text) == expected


def test_grid_reward_exact_match():
    v = grid_reward("Here it is:\n1 0\n0 1", "[[1, 0], [0, 1]]")
    assert v.correct and v.components["parsed"] == 1.0 and v.reward == 1.0
    v = grid_reward("Here it is:\n1 0\n0 0", "[[1, 0], [0, 1]]")
    assert not v.correct and v.components["parsed"] == 1.0 and v.reward == 0.0
    assert grid_reward("nothing", "[[1]]").components["parsed"] == 0.0


def test_scorers_by_name():
    assert build_scorer(ScorerSpec(scorer="choice"))("Answer: B", problem("B")).reward == 1.0
    assert build_scorer(ScorerSpec(scorer="grid"))("[[3]]", problem("[[3]]")).reward == 1.0
    assert build_scorer(ScorerSpec())("Answer: 5", problem("5")).reward == 1.1  # numeric defaults


def test_required_format_is_a_weighted_component_of_any_scorer():
    settings = RewardSettings(weights={"correct": 1.0, "format_tags": 0.5}, required_format=(r"<think>.*</think>", r"Answer:"))
    scorer = build_scorer(ScorerSpec(reward=settings))
    v = scorer("<think>7</think> Answer: 7", problem("7"))
    assert v.components["format_tags"] == 1.0 and v.reward == 1.5
    v = scorer("Answer: 7", problem("7"))
    assert v.components["format_tags"] == 0.5 and v.reward == 1.25
    reported_only = build_scorer(ScorerSpec(reward=RewardSettings(required_format=("<think>",))))("Answer: 7", problem("7"))
    assert reported_only.components["format_tags"] == 0.0 and reported_only.reward == 1.1
    with pytest.raises(re.error):
        build_scorer(ScorerSpec(reward=RewardSettings(required_format=("(",))))


def test_code_scorers_by_name():
    """The code scorers open a real sandbox; a code problem without tests is a named error."""
    add = Problem("add-1", "q", "", meta={"entry_point": "add", "tests": [[[1, 2], 3], [[2, 2], 4]]})
    code_scorer = build_scorer(ScorerSpec(scorer="code"))
    assert code_scorer("```python\ndef add(a, b):\n    return a + b\n```", add).correct
    assert code_scorer("def add(a, b):\n    return 3\n", add).components["passed_fraction"] == 0.5
    with pytest.raises(ValueError, match="'broken'.*entry_point"):
        code_scorer("def f(): pass", Problem("broken", "q", ""))
    humaneval = build_scorer(ScorerSpec(scorer="humaneval"))
    verdict = humaneval("    return False\n", Problem("HumanEval/0", "q", ""))
    assert verdict.outcome == "failed" and 0 < verdict.components["passed_fraction"] < 1


# -- hostile completions: linear parsing, failures scored as failures ---------------------------

import random  # noqa: E402
import time  # noqa: E402

from rewards.choice import _patterns as choice_patterns  # noqa: E402
from rewards.grid import _ROW, _json_grids  # noqa: E402
from rewards.label import _patterns as label_patterns  # noqa: E402
from rewards.label import extract_label  # noqa: E402
from rewards.numeric import _ANCHORS, too_costly  # noqa: E402

# the patterns before they were made linear, kept to check the new ones match the same
OLD_NUMERIC_ANCHOR = re.compile(r"answer\s*(?:is)?\s*[:=]?\s*\**\s*\$?(-?\d[\d,]*(?:\.\d+)?)", re.IGNORECASE)
OLD_CHOICE_LABEL = re.compile(r"answer\s*(?:is)?\s*[:=]?\s*\**\s*\(?([ABCDE])\)?(?![A-Za-z])", re.IGNORECASE)
OLD_LABEL_LABEL = re.compile(r"answer\s*(?:is)?\s*[:=]?\s*\**\s*(False|True|island|is)\b", re.IGNORECASE)
OLD_JSON_GRID = re.compile(r"\[\s*\[[\d\s,\[\]]*\]\s*\]")
OLD_ROW = re.compile(r"^\s*\[?\s*(\d(?:[\s,]*\d)*)\s*\]?\s*,?\s*$")


def random_texts(tokens: list[str], count: int = 3000, longest: int = 14, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(tokens) for _ in range(rng.randint(0, longest))) for _ in range(count)]


def seconds(f, *args) -> float:
    start = time.perf_counter()
    f(*args)
    return time.perf_counter() - start


LABEL_TOKENS = ["answer", "Answer", "ANSWER", " ", "  ", "\n", "is", "IS", ":", "=", "*", "**", "$", "(", ")",
                "A", "B", "E", "a", "b", "True", "false", "island", "1", "2", "1,5", ".5", "-", "x", "."]  # fmt: skip


@pytest.mark.parametrize("space", [" ", "\n"])
def test_answer_labels_are_linear_in_the_whitespace_after_them(space):
    """A label word and whitespace with nothing after: before the runs were possessive this
    cost n^4 (measured, 2-core CPU: 200 spaces 2.5 s numeric, 1.9 s choice, 1.7 s label; 400
    spaces 35 s numeric). A plain wrong verdict now, at 100 times the length, under a second."""
    text = "answer" + space * 20_000
    assert seconds(numeric_reward, text, "5") < 1.0
    assert not numeric_reward(text, "5").correct and extract_number(text) is None
    assert seconds(extract_choice, text) < 1.0 and extract_choice(text) is None
    assert seconds(extract_label, text, ["True", "False"]) < 1.0 and extract_label(text, ["True", "False"]) is None
    for pattern in (_ANCHORS[0], choice_patterns("ABCDE")[0], label_patterns(("True", "False"))[0]):
        assert seconds(pattern.findall, "answer is: **" + space * 20_000 + "x") < 1.0


def test_answer_labels_match_as_before():
    """The possessive runs change no match (start, end and answer) on short texts of label
    pieces, labels that begin like the label's own words ("is", "island") included; the one
    change ``rewards.label`` names, labels that begin with whitespace, is left out."""
    pairs = [
        (OLD_NUMERIC_ANCHOR, _ANCHORS[0]),
        (OLD_CHOICE_LABEL, choice_patterns("ABCDE")[0]),
        (OLD_LABEL_LABEL, label_patterns(("True", "False", "island", "is"))[0]),
    ]
    texts = random_texts(LABEL_TOKENS, count=6000)
    matched = 0
    for old, new in pairs:
        for text in texts:
            before = [(m.span(), m.group(1)) for m in old.finditer(text)]
            assert [(m.span(), m.group(1)) for m in new.finditer(text)] == before, (old.pattern, text)
            matched += bool(before)
    assert matched > 1000  # the texts really exercise the labels


def test_grid_parsing_is_linear_on_hostile_lines():
    """Before: a line "1", n spaces, "x" cost n^3 (2000 spaces 9.4 s), n spaces and "x" n^2
    (20,000: 2.7 s), "[" repeated n^2 (20,000: 0.4 s); now each is linear and no grid."""
    for text in ("1" + " " * 20_000 + "x", " " * 200_000 + "x", "[" * 200_000, "[[" + "1 " * 100_000 + "x"):
        assert seconds(parse_grid, text) < 1.0
        assert parse_grid(text) is None


def test_grid_patterns_match_as_before():
    """The linear JSON-grid search finds exactly what ``finditer`` of the old pattern found,
    and the possessive row pattern matches every line the old one did, with the same row."""
    tokens = ["[", "]", "[[", "]]", "[1", "2]", "1", "23", ",", ", ", " ", "\n", "x", "["]
    texts = random_texts(tokens, count=6000, longest=16, seed=1)
    grids = rows = 0
    for text in texts:
        before = [m.span() for m in OLD_JSON_GRID.finditer(text)]
        assert [m.span() for m in _json_grids(text)] == before, text
        grids += bool(before)
        for line in text.splitlines(keepends=True):
            old_row = OLD_ROW.match(line)
            new_row = _ROW.match(line)
            assert (new_row and new_row.group(1)) == (old_row and old_row.group(1)), line
            rows += bool(old_row)
    assert grids > 500 and rows > 500  # the texts really exercise both


@pytest.mark.parametrize(
    "text",
    [
        "[" * 1000 + "]" * 1000,  # json.loads: RecursionError
        "[[" + "9" * 8000 + "]]",  # json.loads: ValueError, past int's digit limit
        "1 " + "9" * 8000,  # a row cell past int's digit limit
    ],
    ids=["deep-json", "huge-json-int", "huge-row-int"],
)
def test_grids_that_break_the_parsers_are_no_grid(text):
    assert parse_grid(text) is None
    verdict = build_scorer(ScorerSpec(scorer="grid"))(text, problem("[[1]]"))
    assert verdict.outcome == "wrong" and verdict.components["parsed"] == 0.0
    assert parse_grid("1 2\n3 4\n" + text) == [[1, 2], [3, 4]]  # the bad line ends the block


@pytest.mark.parametrize(
    "predicted",
    [
        "9^{9^{9^{9}}}",  # a tower: never finishes in a thread (no math-verify timeout there)
        "10^{10^{10}}",
        "99999999!",  # unfinished after 60 s in a thread
        "999999!",  # 4.8 s
        "(9!)!",
        "999999^{999999}",  # 2.8 s
        "(10^{100})^{999999}",  # unfinished after 40 s
        "\\frac{10^{99}}{1}^{999999}",
        "9^{99}^{99}^{99}^{99}",  # (((9^99)^99)^99)^99 to math-verify
        "\\binom{99999999}{4999999}",
        "9^{\\lfloor \\exp(99) \\rfloor}",
        "\\prod_{k=1}^{99999999} k",
        "(" * 2000 + "1" + ")" * 2000,
        "(" * 11 + "1" + ")" * 11,
        "1+" * 100 + "1",
    ],
)
def test_costly_predictions_are_judged_without_math_verify(predicted):
    assert too_costly(predicted)
    assert seconds(answers_equal, predicted, "1") < 0.5 and not answers_equal(predicted, "1")
    assert answers_equal(predicted, predicted.replace("^", " ^ ")), "the gold's own text is still equal"
    verdict = numeric_reward(f"so \\boxed{{{predicted}}}", "1")
    assert not verdict.correct and verdict.outcome == "wrong"


@pytest.mark.parametrize(
    "predicted",
    ["\\frac{1}{2}", "(x+1)^2", "x^2+2x+1", "\\{1, 2\\}", "3\\sqrt{2}", "\\sqrt{4}", "6.022\\times 10^{23}", "1.5 \\times 10^{-6}",
     "\\left(\\frac{1}{2}\\right)^{10}", "e^{i\\pi}", "x^{\\frac{3}{2}}", "2^{10}\\cdot 3^{5}", "5!", "\\binom{10}{3}", "9^{999999}",
     "((9^{99})^{99})^{9}", "(" * 10 + "x" + ")" * 10, "\\dfrac{\\sqrt{3}}{2}", "x^{-1}", "[0, 1)", "x_{1}^{2}", "9^9^9"],
)  # fmt: skip
def test_ordinary_predictions_still_reach_math_verify(predicted):
    assert not too_costly(predicted)


def test_math_verify_still_judges_ordinary_answers():
    assert answers_equal("3\\sqrt{2}", "\\sqrt{18}")
    assert answers_equal("5!", "120")
    assert answers_equal("\\binom{5}{2}", "10")
    assert answers_equal("e^{-x^{2}}", "e^{-x^{2}}")  # a tower refused, its gold's own text still equal
    assert not answers_equal("e^{-x^{2}}", "e^{-x^2}")  # the cost of the guard: only as written
