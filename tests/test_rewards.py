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
