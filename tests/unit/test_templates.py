from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from esfm.errors import TemplateError
from esfm.project import PACKAGED_PROJECT
from esfm.templates import load_templates, parse_template, render_mustache

TEMPLATES = load_templates(PACKAGED_PROJECT / "templates")
COLD_START = TEMPLATES["cold_start"]


def test_shipped_templates_parse():
    assert {"cold_start", "similar_items"} <= set(TEMPLATES)
    assert COLD_START.version == 2
    assert COLD_START.script_id == "esfm-cold_start-v2"
    assert COLD_START.params["query_vector"].required


def test_cold_start_renders_knn_body():
    body = COLD_START.render({"query_vector": [0.5, -1.0, 1.0], "k": 5})
    assert body["size"] == 5
    assert body["query"]["knn"]["field"] == "rank_vector"
    assert body["query"]["knn"]["query_vector"] == [0.5, -1.0, 1.0]
    assert body["query"]["knn"]["k"] == 5
    assert body["query"]["knn"]["filter"]["bool"]["filter"] == [
        {"term": {"feature_type": "movie"}}
    ]


def test_genre_filter_is_optional():
    body = COLD_START.render(
        {"query_vector": [1.0], "filter_genres": True, "genres": ["Horror"]}
    )
    filters = body["query"]["knn"]["filter"]["bool"]["filter"]
    assert {"terms": {"genres": ["Horror"]}} in filters


def test_missing_required_parameter():
    with pytest.raises(
        TemplateError, match="missing required parameter 'query_vector'"
    ):
        COLD_START.render({})


def test_unknown_parameter_rejected():
    with pytest.raises(TemplateError, match="no parameter"):
        COLD_START.render({"query_vector": [1.0], "size": 3})


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("k", "ten", "must be an integer"),
        ("k", 0, "at least 1"),
        ("k", 10_001, "at most 10000"),
        ("k", True, "must be an integer"),
        ("query_vector", ["a"], "list of numbers"),
        ("query_vector", [float("nan")], "finite"),
        ("exclude_movies", [1, 2], "list of strings"),
        ("filter_genres", "maybe", "true or false"),
    ],
)
def test_ill_typed_parameter(name, value, message):
    params = {"query_vector": [1.0], name: value}
    with pytest.raises(TemplateError, match=message):
        COLD_START.render(params)


@given(st.lists(st.text(), max_size=5))
def test_string_parameters_cannot_change_structure(values):
    body = COLD_START.render({"query_vector": [1.0, 2.0], "exclude_movies": values})
    assert body["query"]["knn"]["filter"]["bool"]["must_not"] == [
        {"terms": {"value": values}}
    ]
    assert set(body) == {"size", "_source", "track_total_hits", "query"}


@given(st.text())
def test_variable_escaping_is_json(value):
    rendered = render_mustache('{"q": "{{name}}"}', {"name": value})
    assert json.loads(rendered) == {"q": value}


def test_join_uses_commas():
    assert render_mustache("{{#join}}items{{/join}}", {"items": ["a", "b"]}) == "a,b"


def test_injection_through_tag_syntax():
    body = COLD_START.render(
        {"query_vector": [1.0], "exclude_movies": ['x"]}}, "size": 9999, "a": {{k}}']}
    )
    assert body["size"] == 10
    assert body["query"]["knn"]["filter"]["bool"]["must_not"][0]["terms"]["value"] == [
        'x"]}}, "size": 9999, "a": {{k}}'
    ]


def test_header_errors(tmp_path):
    path = tmp_path / "broken.mustache"
    path.write_text("{}")
    with pytest.raises(TemplateError, match="no .* header"):
        parse_template(path)
    path.write_text("{{!\nname: broken\nversion: x\n}}\n{}")
    with pytest.raises(TemplateError, match="version 'x' is not a positive integer"):
        parse_template(path)
    path.write_text("{{!\nname: other\nversion: 1\n}}\n{}")
    with pytest.raises(TemplateError, match="differs from the file name"):
        parse_template(path)
    path.write_text("{{!\nname: broken\nversion: 1\nparam k: integer\n}}\n{}")
    with pytest.raises(TemplateError, match="not a valid parameter"):
        parse_template(path)


def test_to_json_output_is_not_rendered_again():
    values = [
        "{{k}}",
        "a\x00b",
        "\x00deadbeef:0\x00",
        'quote " and {{#join}}x{{/join}}',
    ]
    rendered = render_mustache(
        '{"v": {{#toJson}}values{{/toJson}}, "k": {{k}}}', {"values": values, "k": 3}
    )
    assert json.loads(rendered) == {"v": values, "k": 3}


def test_to_json_twice_in_one_template():
    rendered = render_mustache(
        "[{{#toJson}}a{{/toJson}}, {{#toJson}}b{{/toJson}}]",
        {"a": [1.5], "b": {"x": 2}},
    )
    assert json.loads(rendered) == [[1.5], {"x": 2}]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ('{"size": {{k}', "rendered invalid JSON"),
        ('{"size": 1{{/k}}}', "invalid mustache syntax"),
        ('{"size": {{k}} "from": 1}', "rendered invalid JSON"),
        ('{"size": {{nope}}}', "unknown parameter"),
        ("{{#toJson}}nope{{/toJson}}", "unknown parameter 'nope'"),
    ],
)
def test_unrenderable_template_rejected_at_load(tmp_path, body, message):
    path = tmp_path / "broken.mustache"
    path.write_text(
        "{{!\nname: broken\nversion: 1\nparam k: int = 10\n}}\n" + body, "utf-8"
    )
    with pytest.raises(TemplateError, match="does not render with its default"):
        load_templates(tmp_path)
    with pytest.raises(TemplateError, match=message):
        load_templates(tmp_path)


def test_version_zero_rejected(tmp_path):
    (tmp_path / "zero.mustache").write_text("{{!\nname: zero\nversion: 0\n}}\n{}")
    with pytest.raises(TemplateError, match="version '0' is not a positive integer"):
        load_templates(tmp_path)
