"""Answer metrics against hand-derived cases of the official evaluators, and edge cases."""

from __future__ import annotations

from itertools import combinations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ensemble.metrics import (
    METRICS,
    anls,
    exact_match,
    normalize_vqa_answer,
    relaxed_accuracy,
    score,
    vqa_accuracy,
)
from protocol.errors import InvalidArgument


@pytest.mark.parametrize(
    ("raw", "normalised"),
    [
        ("Two", "2"),
        ("none", "0"),
        ("The cat", "cat"),
        ("a dog and an apple", "dog and apple"),
        ("dont", "don't"),
        ("Yes.", "yes"),
        ("3.5", "3.5"),  # a period before a digit stays
        ("e.g.", "eg"),
        ("1,000", "1000"),  # a grouped number: every mark is deleted
        ("black/white", "black white"),  # a mark inside a word becomes a space
        ("yes, it is", "yes it is"),  # a mark touching a space is deleted
        ("(red)", "red"),
        ("3:30", "3:30"),  # colons are not in the official list
        ("what's", "what's"),
        ("\tTwo\n  dogs ", "2 dogs"),
        ("the", ""),
    ],
)
def test_vqa_normalisation(raw: str, normalised: str) -> None:
    assert normalize_vqa_answer(raw) == normalised


@pytest.mark.parametrize(
    ("matching", "expected"), [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)]
)
def test_vqa_accuracy_of_ten_humans(matching: int, expected: float) -> None:
    # By hand, 10 humans, m of them said the prediction: dropping one of the m leaves m - 1
    # matches among 9, dropping another leaves m. m = 1: (1 * 0 + 9 * 1/3) / 10 = 0.3;
    # m = 2: (2 * 1/3 + 8 * 2/3) / 10 = 0.6; m = 3: (3 * 2/3 + 7 * 1) / 10 = 0.9.
    answers = ["2"] * matching + ["3"] * (10 - matching)
    assert vqa_accuracy("2", answers) == expected


def test_vqa_accuracy_normalises_both_sides() -> None:
    # "Two" is "2", and so are the humans' "two" and "2."; three of ten said it.
    assert vqa_accuracy("Two", ["two", "2", "2.", "3", "3", "3", "3", "3", "3", "3"]) == 0.9
    # All humans agree: the official script would skip normalising the prediction here.
    assert vqa_accuracy("Two", ["2"] * 10) == 1.0
    assert vqa_accuracy("the yellow/blue", ["yellow blue"] * 10) == 1.0


def test_vqa_accuracy_with_one_answer_is_exact_match() -> None:
    assert vqa_accuracy("A Dog", ["dog"]) == 1.0
    assert vqa_accuracy("cat", ["dog"]) == 0.0


def _brute_force_vqa(predicted: str, humans: list[str]) -> float:
    subsets = list(combinations(range(len(humans)), len(humans) - 1))
    return sum(
        min(1.0, sum(humans[i] == predicted for i in subset) / 3) for subset in subsets
    ) / len(subsets)


@given(
    st.sampled_from(["yes", "no", "2", "red"]),
    st.lists(st.sampled_from(["yes", "no", "2", "red"]), min_size=2, max_size=10),
)
def test_vqa_accuracy_equals_the_leave_one_out_average(prediction: str, humans: list[str]) -> None:
    assert vqa_accuracy(prediction, humans) == pytest.approx(
        _brute_force_vqa(prediction, humans), abs=1e-12
    )


def test_exact_match() -> None:
    assert exact_match("The Cat.", ["cat"]) == 1.0
    assert exact_match("dog", ["cat", "Dog"]) == 1.0
    assert exact_match("cats", ["cat"]) == 0.0
    assert exact_match("", [""]) == 1.0


def test_anls() -> None:
    assert anls("Acme Corp", ["acme  corp"]) == 1.0
    # kitten -> sitting: 3 edits over 7 characters.
    assert anls("kitten", ["sitting"]) == pytest.approx(1 - 3 / 7)
    assert anls("abc", ["abd"]) == pytest.approx(2 / 3)
    # A normalised distance of exactly 0.5 is at the threshold: scored 0.
    assert anls("abcd", ["abxy"]) == 0.0
    assert anls("", ["abc"]) == 0.0
    assert anls("", [""]) == 1.0
    # The best reference counts.
    assert anls("invoice 12", ["total", "invoice 13"]) == pytest.approx(0.9)
    assert anls("abcd", ["abxy"], threshold=0.6) == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("prediction", "answer", "expected"),
    [
        ("10.4", "10", 1.0),
        ("10.6", "10", 0.0),
        ("105", "100", 1.0),  # exactly 5% is accepted
        ("95", "100", 1.0),
        ("94.9", "100", 0.0),
        ("-5", "-5.2", 1.0),
        ("40%", "0.4", 1.0),
        ("40%", "40", 0.0),  # the reference implementation reads "40%" as 0.4
        ("0.0", "0", 1.0),
        ("0.01", "0", 0.0),
        ("Yes", "yes", 1.0),
        (" Paris ", "paris", 1.0),
        ("abc", "10", 0.0),
        ("nan", "nan", 1.0),  # not a number a tolerance can judge: compared as text
        ("1e2", "100", 1.0),
    ],
)
def test_relaxed_accuracy(prediction: str, answer: str, expected: float) -> None:
    assert relaxed_accuracy(prediction, [answer]) == expected


def test_relaxed_accuracy_any_answer_counts() -> None:
    assert relaxed_accuracy("51", ["fifty", "50"]) == 1.0
    assert relaxed_accuracy("51", ["fifty", "60"]) == 0.0


def test_score_dispatches_on_the_cli_names() -> None:
    assert set(METRICS) == {"vqa", "exact", "anls", "relaxed"}
    assert score("vqa", "two", ["2"] * 10) == 1.0
    assert score("exact", "the cat", ["Cat"]) == 1.0
    assert score("anls", "kitten", ["sitting"]) == pytest.approx(1 - 3 / 7)
    assert score("relaxed", "10.4", ["10"]) == 1.0


def test_unknown_metric_names_the_known_ones() -> None:
    with pytest.raises(
        InvalidArgument, match=r"unknown metric 'bleu': expected one of anls, exact, relaxed, vqa"
    ):
        score("bleu", "a", ["a"])


@pytest.mark.parametrize("metric", sorted(METRICS))
def test_bad_answers_are_named(metric: str) -> None:
    with pytest.raises(InvalidArgument, match="at least one reference answer"):
        score(metric, "a", [])
    with pytest.raises(InvalidArgument, match="expected a list of reference strings, got str"):
        score(metric, "a", "a")
    with pytest.raises(InvalidArgument, match=r"answers\[1\]: expected a string, got int"):
        score(metric, "a", ["a", 3])  # type: ignore[list-item]
    with pytest.raises(InvalidArgument, match="prediction: expected a string, got NoneType"):
        score(metric, None, ["a"])  # type: ignore[arg-type]


def test_bad_parameters_are_named() -> None:
    with pytest.raises(InvalidArgument, match=r"threshold: expected a value in \(0, 1\], got 0"):
        anls("a", ["a"], threshold=0)
    with pytest.raises(InvalidArgument, match=r"tolerance: expected a value >= 0, got -0\.1"):
        relaxed_accuracy("1", ["1"], tolerance=-0.1)
