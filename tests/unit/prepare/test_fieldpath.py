"""Field paths and templates of tenants.<t>.sources: parsed without data, resolved against rows."""

from __future__ import annotations

import pytest

from loraline.fieldpath import FieldPath, Missing, PathSyntaxError, Template, parse_path, parse_source

ROW = {"meta": {"answer": "42", "Question Title": "Why?"}, "instances": [{"output": "a"}, {"output": "b"}], "n": 3}


@pytest.mark.parametrize(
    "text, parts",
    [
        ("n", ("n",)),
        ("meta.answer", ("meta", "answer")),
        ("instances[1].output", ("instances", 1, "output")),
        ("instances[-1].output", ("instances", -1, "output")),
        ('meta["Question Title"]', ("meta", "Question Title")),
        ('["a.b"].c', ("a.b", "c")),
    ],
)
def test_paths_parse_to_keys_and_indices(text, parts):
    assert parse_path(text).parts == parts


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "non-empty"),
        ("a.", "expected a key name at character 2"),
        ("a..b", "expected a key name at character 2"),
        ("[0].a", "must start with a key"),
        ("a[x]", "bad index at character 1"),
        ("a b.c", None),  # spaces inside a key are allowed (CSV headers have them)
    ],
)
def test_bad_paths_say_where(text, message):
    if message is None:
        assert parse_path(text).parts == ("a b", "c")
        return
    with pytest.raises(PathSyntaxError, match=message):
        parse_path(text)


def test_resolve_and_missing_name_the_part_that_was_not_there():
    assert parse_path("instances[-1].output").resolve(ROW) == "b"
    assert parse_path('meta["Question Title"]').resolve(ROW) == "Why?"
    with pytest.raises(Missing) as err:
        parse_path("meta.question").resolve(ROW)
    assert (err.value.at, err.value.why) == ("meta.question", "no key 'question' in 'meta'")
    with pytest.raises(Missing, match="instances has 2 elements"):
        parse_path("instances[5].output").resolve(ROW)
    with pytest.raises(Missing, match="n is not an object"):
        parse_path("n.x").resolve(ROW)


def test_templates_hold_literals_and_placeholders():
    source = parse_source("{{note}} {meta.answer}\n\nQ: {n}")
    assert isinstance(source, Template)
    assert source.pieces == (
        "{note} ",
        FieldPath("meta.answer", ("meta", "answer")),
        "\n\nQ: ",
        FieldPath("n", ("n",)),
    )
    assert isinstance(parse_source("meta.answer"), FieldPath)
    for bad, message in [
        ("{a", "never closed"),
        ("a}", "closes nothing"),
        ("{{a}}", "no {placeholder}"),
        ("{a..b}", "placeholder"),
    ]:
        with pytest.raises(PathSyntaxError, match=message):
            parse_source(bad)
