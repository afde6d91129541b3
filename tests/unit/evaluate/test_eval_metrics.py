"""Task metrics from generations: normalization, exact match, token F1, ROUGE-L, JSON metrics, aggregate."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from loraline.evaluate.metrics import (
    aggregate,
    canonical_json,
    exact_match,
    expects_json,
    json_field_accuracy,
    json_valid,
    normalize,
    rouge_l,
    token_f1,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Paris", "paris"),
        ("  The  Eiffel   Tower. ", "eiffel tower"),
        ("An apple, a day!", "apple day"),
        ("theme anagram", "theme anagram"),  # articles only as whole words
        ("Café", "café"),
        ("ＦＵＬＬ　ＷＩＤＴＨ", "full width"),  # NFKC folds full-width letters and the ideographic space
        ("«quoted» — dash", "quoted dash"),  # Unicode punctuation
        ("line\nbreak\ttab", "line break tab"),
        ("", ""),
        ("...", ""),
    ],
)
def test_normalize(text: str, expected: str) -> None:
    assert normalize(text) == expected


@pytest.mark.parametrize(
    ("pred", "ref", "expected"),
    [
        ("Paris", "Paris", True),
        ("paris.", "Paris", True),
        ("The Paris", "Paris", True),
        ("  Paris\n", "Paris", True),
        ("London", "Paris", False),
        ("Paris France", "Paris", False),
        ("", "", True),
        ("", "Paris", False),
        ("Paris", "", False),
        ("Café", "CAFÉ", True),
        ("cafe", "café", False),  # accents are kept
        ('{"b": 2, "a": 1}', '{"a":1,"b":2}', True),  # key order and spacing
        ('{"a": 1.0}', '{"a": 1}', True),
        ('{"a": true}', '{"a": 1}', False),
        ('{"a": "X"}', '{"a": "x"}', False),  # strings inside JSON compare exactly
        ('{"a": 1', '{"a": 1}', False),  # truncated JSON never matches
        ("a 1", '{"a": 1}', False),
        ('```json\n{"a": 1}\n```', '{"a": 1}', False),  # fences make it invalid
        ("[1, 2]", "[1,2]", True),
        ("[2, 1]", "[1,2]", False),
        ('{"a": {"y": 2, "x": 1}}', '{"a": {"x": 1, "y": 2}}', True),
        ("42", "42", True),
        ("42.0", "42", True),
        ('"Paris"', "Paris", True),
        ("Paris", '"Paris"', True),
    ],
)
def test_exact_match(pred: str, ref: str, expected: bool) -> None:
    assert exact_match(pred, ref) is expected


@pytest.mark.parametrize(
    ("pred", "ref", "expected"),
    [
        ("the cat sat", "the cat sat", 1.0),
        ("cat sat", "cat sat down", 0.8),  # P=1, R=2/3
        ("dog", "cat", 0.0),
        ("", "", 1.0),
        ("", "cat", 0.0),
        ("cat", "", 0.0),
        ("cat cat", "cat", 2 * 0.5 * 1 / 1.5),  # bag counts: one of two pred tokens matches
        ("sat cat", "cat sat", 1.0),  # order does not matter for F1
        ('{"b": 2, "a": 1}', '{"a": 1, "b": 2}', 1.0),
    ],
)
def test_token_f1(pred: str, ref: str, expected: float) -> None:
    assert token_f1(pred, ref) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("pred", "ref", "expected"),
    [
        ("the cat sat on mat", "the cat sat on mat", 1.0),
        ("sat cat", "cat sat", 0.5),  # LCS 1 of 2 and 2
        ("one two four", "one two three four", 2 * 1 * 0.75 / 1.75),  # LCS 3: P=1, R=3/4
        ("x y z", "p q", 0.0),
        ("", "", 1.0),
        ("", "x", 0.0),
        ("x", "", 0.0),
        ("Word, WORD!", "word word", 1.0),
    ],
)
def test_rouge_l(pred: str, ref: str, expected: float) -> None:
    assert rouge_l(pred, ref) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("pred", "object_only", "expected"),
    [
        ('{"a": 1}', False, True),
        ('  {"a": 1}\n', True, True),
        ("[1, 2]", False, True),
        ("[1, 2]", True, False),
        ("42", False, True),
        ("42", True, False),
        ("null", False, True),
        ("", False, False),
        ("Paris", False, False),
        ('{"a": 1,}', False, False),
        ('{"a": 1} trailing', False, False),
    ],
)
def test_json_valid(pred: str, object_only: bool, expected: bool) -> None:
    assert json_valid(pred, object_only=object_only) is expected


@pytest.mark.parametrize(
    ("pred", "ref", "expected"),
    [
        ('{"a": 1, "b": 2}', '{"b": 2, "a": 1}', 1.0),
        ('{"a": 1, "b": 3}', '{"a": 1, "b": 2}', 0.5),
        ('{"a": 1}', '{"a": 1, "b": 2}', 0.5),  # missing key
        ('{"a": 1, "b": 2, "c": 3}', '{"a": 1, "b": 2}', 1.0),  # extra keys are not penalized
        ('{"a": 1.0, "b": [1, {"y": 1, "x": 0}]}', '{"a": 1, "b": [1, {"x": 0, "y": 1}]}', 1.0),
        ('{"a": "1"}', '{"a": 1}', 0.0),
        ("[1]", '{"a": 1}', 0.0),
        ("not json", '{"a": 1}', 0.0),
        ("", '{"a": 1}', 0.0),
        ("{}", "{}", 1.0),
        ('{"z": 1}', "{}", 1.0),
    ],
)
def test_json_field_accuracy(pred: str, ref: str, expected: float) -> None:
    assert json_field_accuracy(pred, ref) == pytest.approx(expected)


@pytest.mark.parametrize("ref", ["Paris", "[1]", "42", ""])
def test_json_field_accuracy_needs_object_reference(ref: str) -> None:
    with pytest.raises(ValueError, match="JSON object reference"):
        json_field_accuracy('{"a": 1}', ref)


@pytest.mark.parametrize(
    ("refs", "expected"),
    [
        (['{"a": 1}', '{"b": 2}', "text"], True),
        (['{"a": 1}', "text"], False),  # exactly half is not most
        (["Paris", "London"], False),
        (["[1]", "[2]", "42"], False),  # arrays and scalars are not objects
        ([], False),
    ],
)
def test_expects_json(refs: list[str], expected: bool) -> None:
    assert expects_json(refs) is expected


def test_aggregate_text_task() -> None:
    out = aggregate(["Paris", "dog"], ["paris", "cat"], expects_json=False)
    assert list(out) == ["exact_match", "token_f1", "rouge_l"]
    assert out == {"exact_match": 0.5, "token_f1": 0.5, "rouge_l": 0.5}


def test_aggregate_json_task() -> None:
    preds = ['{"b": 2, "a": 1}', '{"a": 1, "b": 3}', "oops"]
    refs = ['{"a": 1, "b": 2}', '{"a": 1, "b": 2}', '{"a": 1, "b": 2}']
    out = aggregate(preds, refs, expects_json=True)
    assert list(out) == ["exact_match", "token_f1", "rouge_l", "json_valid", "json_field_accuracy"]
    assert out["exact_match"] == pytest.approx(1 / 3)
    assert out["json_valid"] == pytest.approx(2 / 3)
    assert out["json_field_accuracy"] == pytest.approx((1 + 0.5 + 0) / 3)


def test_aggregate_field_accuracy_only_over_object_references() -> None:
    out = aggregate(['{"a": 1}', "Paris"], ['{"a": 1}', "Paris"], expects_json=True)
    assert out["json_field_accuracy"] == 1.0
    assert out["json_valid"] == 0.5
    out = aggregate(["Paris"], ["Paris"], expects_json=True)
    assert math.isnan(out["json_field_accuracy"])


@pytest.mark.parametrize(("preds", "refs"), [([], []), (["a"], []), ([], ["a"]), (["a", "b"], ["a"])])
def test_aggregate_rejects_bad_lengths(preds: list[str], refs: list[str]) -> None:
    with pytest.raises(ValueError):
        aggregate(preds, refs, expects_json=False)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-1000, 1000) | st.text(max_size=5),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=3), children, max_size=3),
    max_leaves=8,
)


@given(st.text(max_size=40), st.text(max_size=40))
def test_scores_are_bounded_and_symmetric_where_expected(a: str, b: str) -> None:
    for score in (token_f1(a, b), rouge_l(a, b)):
        assert 0.0 <= score <= 1.0
    assert token_f1(a, b) == pytest.approx(token_f1(b, a))
    assert rouge_l(a, b) == pytest.approx(rouge_l(b, a))
    assert exact_match(a, a)
    assert token_f1(a, a) == 1.0 and rouge_l(a, a) == 1.0


@given(json_values)
def test_json_round_trip_matches_regardless_of_formatting(value: object) -> None:
    import json

    compact = json.dumps(value)
    pretty = json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False)
    assert exact_match(pretty, compact)
    assert canonical_json(json.loads(pretty)) == canonical_json(value)
    if isinstance(value, dict):
        assert json_field_accuracy(pretty, compact) == 1.0


def test_per_field_accuracy_counts_each_key_over_the_rows_that_have_it():
    from loraline.evaluate.metrics import per_field_accuracy

    refs = ['{"a": 1, "b": "x"}', '{"a": 2, "b": "y"}', '{"a": 3}', "plain text"]
    preds = ['{"a": 1, "b": "z"}', "not json", '{"a": 3, "b": "q"}', "plain text"]
    assert per_field_accuracy(preds, refs) == {"a": 2 / 3, "b": 0.0}
    assert per_field_accuracy(["x"], ["y"]) == {}
    with pytest.raises(ValueError):
        per_field_accuracy(["x"], [])
