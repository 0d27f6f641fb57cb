"""Answer extraction and the numeric reward."""

import pytest

from rewards.numeric import extract_number, has_answer_label, numbers_equal, numeric_reward
from rewards.scoring import RewardSettings, build_scorer


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


def test_answer_label():
    assert has_answer_label("so Answer: 42")
    assert not has_answer_label("the answer is forty-two")


def test_numeric_reward_components_are_weighted_and_reported():
    v = numeric_reward("7 - 2 = 5\nAnswer: 5", "5", {"correct": 1.0, "format": 0.25})
    assert v.correct and v.reward == 1.25
    assert v.components == {"correct": 1.0, "format": 1.0}
    v = numeric_reward("7 - 2 = 4", "5", {"correct": 1.0, "format": 0.25})
    assert not v.correct and v.reward == 0.0 and v.extracted == "4"
    v = numeric_reward("Answer: 4", "5", {"correct": 1.0, "format": 0.25})
    assert v.reward == 0.25


def test_unknown_reward_component_is_named():
    with pytest.raises(ValueError, match="bogus"):
        numeric_reward("1", "1", {"bogus": 1.0})


def test_build_scorer_by_name():
    scorer = build_scorer(RewardSettings(weights={"correct": 1.0}, extraction="first"))
    assert scorer("3 then 4", "3").correct
    with pytest.raises(ValueError, match="unknown scorer"):
        build_scorer(RewardSettings(scorer="nope"))
