"""Score transforms and request parameters of the query API, with no cluster."""

from __future__ import annotations

import math

import pytest
from elasticsearch import Elasticsearch
from hypothesis import given
from hypothesis import strategies as st

from esfm.errors import MigrationError, QueryError
from esfm.project import PACKAGED_PROJECT
from esfm.query import (
    MAX_K,
    Recommender,
    check_k,
    cosine_from_score,
    rank_value_from_score,
    score_from_rank_value,
)
from esfm.templates import load_templates

DOT_PRODUCTS = st.floats(min_value=-1e4, max_value=1e4, allow_nan=False)


@pytest.fixture
def recommender() -> Recommender:
    # The client sends nothing until a query runs, and these tests run none.
    client = Elasticsearch("http://127.0.0.1:9")
    return Recommender(client, "recsys", templates_dir=PACKAGED_PROJECT / "templates")


@pytest.mark.parametrize(
    ("dot", "score"),
    [(0.0, 1.0), (2.0, 3.0), (0.25, 1.25), (-1.0, 0.5), (-3.0, 0.25), (-9.0, 0.1)],
)
def test_score_transform_known_values(dot, score):
    assert score_from_rank_value(dot) == pytest.approx(score)
    assert rank_value_from_score(score) == pytest.approx(dot)


@given(DOT_PRODUCTS)
def test_score_transform_round_trip(dot):
    score = score_from_rank_value(dot)
    assert score > 0.0
    assert rank_value_from_score(score) == pytest.approx(dot, rel=1e-9, abs=1e-9)


@given(DOT_PRODUCTS, DOT_PRODUCTS)
def test_score_transform_keeps_order(a, b):
    # Non-strict: differences below float64 resolution near 1.0 round away.
    low, high = sorted((a, b))
    assert score_from_rank_value(low) <= score_from_rank_value(high)


def test_score_transform_continuous_at_zero():
    assert score_from_rank_value(-1e-12) == pytest.approx(1.0)
    assert rank_value_from_score(1.0 - 1e-12) == pytest.approx(0.0, abs=1e-11)


def test_score_of_float32_precision():
    # A score rounded to 7 significant digits, about float32 precision, still
    # gives the rank value to 1e-6.
    dot = 0.123456789
    score32 = float(f"{score_from_rank_value(dot):.7g}")
    assert math.isclose(rank_value_from_score(score32), dot, abs_tol=1e-6)


@pytest.mark.parametrize("score", [0.0, -0.5, float("nan")])
def test_invalid_score_rejected(score):
    with pytest.raises(QueryError, match="invalid max_inner_product score"):
        rank_value_from_score(score)


@pytest.mark.parametrize(("score", "cosine"), [(1.0, 1.0), (0.5, 0.0), (0.0, -1.0)])
def test_cosine_from_score(score, cosine):
    assert cosine_from_score(score) == pytest.approx(cosine)


@pytest.mark.parametrize("k", [0, -1, MAX_K + 1, 2.5, "10", True, None])
def test_invalid_k_rejected(k):
    with pytest.raises(QueryError, match="invalid k"):
        check_k(k)


def test_valid_k_returned():
    assert check_k(1) == 1
    assert check_k(MAX_K) == MAX_K


def test_unknown_method_rejected():
    client = Elasticsearch("http://127.0.0.1:9")
    with pytest.raises(QueryError, match="unknown ranking method 'cosine'"):
        Recommender(client, method="cosine")


def test_params_defaults(recommender):
    params = recommender._params(10, None, None)
    assert params == {
        "k": 10,
        "num_candidates": 100,
        "exclude_movies": [],
        "filter_genres": False,
        "genres": [],
    }


def test_params_num_candidates_grows_with_k(recommender):
    assert recommender._params(80, None, None)["num_candidates"] == 160
    assert recommender._params(MAX_K, None, None)["num_candidates"] == MAX_K


def test_params_filters(recommender):
    params = recommender._params(5, [1, "2"], ["Horror"], 50)
    assert params["exclude_movies"] == ["1", "2"]
    assert params["filter_genres"] is True
    assert params["genres"] == ["Horror"]
    assert params["num_candidates"] == 50


@pytest.mark.parametrize("num_candidates", [9, MAX_K + 1, 20.0, True])
def test_params_invalid_num_candidates(recommender, num_candidates):
    with pytest.raises(QueryError, match="invalid num_candidates"):
        recommender._params(10, None, None, num_candidates)


@pytest.mark.parametrize(
    ("template", "params"),
    [
        ("cold_start", {"k": 3, "num_candidates": 30}),
        ("known_user", {"k": 3, "exclude_movies": ["1"], "genres": ["Drama"]}),
        ("similar_items", {"filter_genres": True, "genres": ["Drama"]}),
    ],
)
def test_params_fit_every_template(recommender, template, params):
    query_params = recommender._params(
        params.get("k", 10),
        params.get("exclude_movies"),
        params.get("genres"),
        params.get("num_candidates"),
    )
    loaded = load_templates(PACKAGED_PROJECT / "templates")[template]
    rendered = loaded.render({**query_params, "query_vector": [0.5, 1.0]})
    assert rendered["query"]["knn"]["k"] == query_params["k"]
    assert rendered["query"]["knn"]["num_candidates"] == query_params["num_candidates"]
    must_not = rendered["query"]["knn"]["filter"]["bool"]["must_not"]
    assert must_not == [{"terms": {"value": query_params["exclude_movies"]}}]
    filters = rendered["query"]["knn"]["filter"]["bool"]["filter"]
    if query_params["filter_genres"]:
        assert {"terms": {"genres": query_params["genres"]}} in filters
    else:
        assert filters == [{"term": {"feature_type": "movie"}}]


def test_recommendation_from_knn_hit():
    hit = {
        "_score": 1.5,
        "_source": {"value": "7", "title": "A (1999)", "genres": ["Drama"]},
    }
    item = Recommender._recommendation(hit, None, "cold_start")
    assert item.movie_id == "7"
    assert item.title == "A (1999)"
    assert item.genres == ("Drama",)
    assert item.score == 1.5
    assert item.rank_value == pytest.approx(0.5)


def test_recommendation_from_negative_dot():
    hit = {"_score": 0.25, "_source": {"value": "8"}}
    item = Recommender._recommendation(hit, None, "known_user")
    assert item.rank_value == pytest.approx(-3.0)
    assert item.title is None
    assert item.genres == ()


def test_recommendation_from_script_score_offset():
    hit = {"_score": 4.0, "_source": {"value": "9"}}
    item = Recommender._recommendation(hit, 5.5, "cold_start")
    assert item.rank_value == pytest.approx(-1.5)


def test_recommendation_from_cosine_hit():
    hit = {"_score": 0.75, "_source": {"value": "10"}}
    item = Recommender._recommendation(hit, None, "similar_items")
    assert item.rank_value == pytest.approx(0.5)


def test_recommendation_to_dict():
    hit = {"_score": 2.0, "_source": {"value": "1", "title": "T", "genres": ["A"]}}
    payload = Recommender._recommendation(hit, None, "cold_start").to_dict()
    assert payload == {
        "movie_id": "1",
        "title": "T",
        "genres": ["A"],
        "score": 2.0,
        "rank_value": pytest.approx(1.0),
    }


@pytest.mark.parametrize("alias", ["recsys-*", "a,b", "_all", "rec?ys", "-recsys", ""])
def test_recommender_rejects_patterns(alias):
    with pytest.raises(MigrationError, match="alias or index"):
        Recommender(Elasticsearch("http://127.0.0.1:9"), alias)
