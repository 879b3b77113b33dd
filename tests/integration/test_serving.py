"""Serving against a real node: the known_user template, filters and the registry."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from esfm import aliases
from esfm.artifacts import TrainedModel
from esfm.data import load_movielens, normalize_profile
from esfm.errors import QueryError, TemplateError
from esfm.mappings import latest_version
from esfm.migrate import apply_migration, plan_migration
from esfm.project import PACKAGED_PROJECT
from esfm.query import Recommender
from esfm.server import server_info
from esfm.templates import (
    diff_templates,
    load_templates,
    push_templates,
    render_on_cluster,
)
from esfm.train import TrainConfig, save_model, train
from esfm.validate import compare_ranking

MAPPINGS = PACKAGED_PROJECT / "mappings"
TEMPLATES = PACKAGED_PROJECT / "templates"
VALUE_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> TrainedModel:
    root = os.environ.get("ESFM_TEST_DATA")
    if not root:
        pytest.fail("ESFM_TEST_DATA is not set: point it at a folder with ml-100k/")
    dataset = load_movielens(Path(root) / "ml-100k")
    out = tmp_path_factory.mktemp("models") / "serving"
    config = TrainConfig(k=16, epochs=2, batch_size=2048, lr=5e-3, seed=3)
    save_model(train(dataset, config), out)
    return TrainedModel.load(out)


@pytest.fixture(scope="module")
def alias(es_client, model) -> Iterator[str]:
    """Migrate the model behind a fresh alias, and delete its index at the end."""
    name = f"serve-it-{uuid.uuid4().hex[:8]}"
    plan = plan_migration(
        es_client, model, latest_version(MAPPINGS, "recsys"), alias=name
    )
    apply_migration(es_client, plan, model)
    push_templates(es_client, load_templates(TEMPLATES))
    yield name
    es_client.indices.delete(index=aliases.resolve_index(es_client, name))


@pytest.fixture
def recommender(es_client, alias) -> Recommender:
    return Recommender(es_client, alias, templates_dir=TEMPLATES)


def model_ranking(
    model: TrainedModel,
    profile: dict[str, str],
    k: int,
    *,
    exclude: tuple[str, ...] = (),
    genres: tuple[str, ...] = (),
) -> list[tuple[str, float]]:
    """Return the model's top ``k`` among movies of ``genres``, less ``exclude``."""
    every = model.rank(profile, len(model.movies), exclude=set(exclude))
    if genres:
        every = [
            (movie, value)
            for movie, value in every
            if set(model.movies[movie].get("genres") or ()) & set(genres)
        ]
    return every[:k]


def assert_same_ranking(outcome, expected: list[tuple[str, float]]) -> None:
    got = [item.movie_id for item in outcome.recommendations]
    assert got == [movie for movie, _ in expected]
    for item, (_, value) in zip(outcome.recommendations, expected, strict=True):
        assert item.rank_value == pytest.approx(value, rel=VALUE_TOLERANCE)


def test_known_user_runs_its_template(recommender, model):
    users = sorted(model.users, key=int)
    user = users[7]
    twin = next(
        other
        for other in users
        if other != user and model.users[other] == model.users[user]
    )
    # Cold cache: the user document, then its metadata documents, then kNN.
    first = recommender.known_user(user, k=10)
    again = recommender.known_user(user, k=10)
    # Same age, gender and occupation: only the user document is new.
    same_metadata = recommender.known_user(twin, k=10)
    assert first.template == "esfm-known_user-v2"
    assert first.round_trips == 3
    assert again.round_trips == 1
    assert same_metadata.round_trips == 2
    profile = {"user": user, **model.users[user]}
    cluster = [(item.movie_id, item.rank_value) for item in first.recommendations]
    assert compare_ranking(model, profile, cluster, 10) is None


def test_known_user_filters(recommender, model):
    user = sorted(model.users, key=int)[11]
    profile = {"user": user, **model.users[user]}
    top = [movie for movie, _ in model.rank(profile, 3)]
    outcome = recommender.known_user(user, k=8, exclude=top, genres=["Comedy"])
    expected = model_ranking(model, profile, 8, exclude=tuple(top), genres=("Comedy",))
    assert_same_ranking(outcome, expected)
    for item in outcome.recommendations:
        assert "Comedy" in item.genres
        assert item.movie_id not in top


def test_cold_start_genre_and_exclude(recommender, model):
    profile = normalize_profile(gender="F", age="25", occupation="4")
    genres = ("Horror", "Documentary")
    outcome = recommender.cold_start_outcome(
        gender="F", age="25", occupation="4", k=6, exclude=["1"], genres=list(genres)
    )
    assert outcome.template == "esfm-cold_start-v2"
    assert_same_ranking(
        outcome, model_ranking(model, profile, 6, exclude=("1",), genres=genres)
    )


def test_num_candidates_equal_to_k_is_exact(recommender, model):
    outcome = recommender.cold_start_outcome(
        gender="M", age="45", k=5, num_candidates=5
    )
    profile = normalize_profile(gender="M", age="45")
    assert_same_ranking(outcome, model.rank(profile, 5))


def test_similar_with_exclude(recommender):
    first = recommender.similar("Toy Story (1995)", k=3)
    dropped = first.recommendations[0].movie_id
    second = recommender.similar("Toy Story (1995)", k=3, exclude=[dropped])
    assert first.round_trips == 3
    ids = [item.movie_id for item in second.recommendations]
    assert dropped not in ids
    assert "1" not in ids
    assert ids[:2] == [item.movie_id for item in first.recommendations[1:]]


def test_script_score_known_user(es_client, alias, model):
    recommender = Recommender(
        es_client, alias, templates_dir=TEMPLATES, method="script_score"
    )
    user = sorted(model.users, key=int)[2]
    if not server_info(es_client).has_painless:
        with pytest.raises(QueryError, match="no lang-painless"):
            recommender.known_user(user, k=5)
        return
    outcome = recommender.known_user(user, k=5)
    assert outcome.path == "script_score"
    profile = {"user": user, **model.users[user]}
    cluster = [(item.movie_id, item.rank_value) for item in outcome.recommendations]
    assert compare_ranking(model, profile, cluster, 5) is None


def test_unpushed_known_user_rejected(es_client, alias, model, tmp_path):
    folder = tmp_path / "templates"
    shutil.copytree(TEMPLATES, folder)
    path = folder / "known_user.mustache"
    path.write_text(path.read_text().replace("version: 2", "version: 9999", 1))
    recommender = Recommender(es_client, alias, templates_dir=folder)
    user = sorted(model.users, key=int)[0]
    with pytest.raises(QueryError, match="esfm-known_user-v9999 is not pushed"):
        recommender.known_user(user)


def test_diff_shipped_templates_same(es_client, alias):
    shipped = load_templates(TEMPLATES)
    diffs = {diff.script_id: diff for diff in diff_templates(es_client, shipped)}
    for template in shipped.values():
        diff = diffs[template.script_id]
        assert diff.state == "same"
        assert diff.file_checksum == diff.cluster_checksum
        assert diff.pushed_at is not None
        if server_info(es_client).has_mustache:
            assert diff.stored_script is True
        else:
            assert diff.stored_script is None


def test_diff_states(es_client, alias, tmp_path):
    folder = tmp_path / "templates"
    folder.mkdir()
    # Same version as pushed, other source: "differs".
    cold = (TEMPLATES / "cold_start.mustache").read_text()
    (folder / "cold_start.mustache").write_text(cold.replace('"size"', ' "size"', 1))
    # A name never pushed: "only in files".
    fresh = f"serve_diff_{uuid.uuid4().hex[:8]}"
    (folder / f"{fresh}.mustache").write_text(
        f"{{{{!\nname: {fresh}\nversion: 1\n}}}}\n{{}}\n"
    )
    diffs = {
        diff.script_id: diff
        for diff in diff_templates(es_client, load_templates(folder))
    }
    assert diffs["esfm-cold_start-v2"].state == "differs"
    assert (
        diffs["esfm-cold_start-v2"].file_checksum
        != diffs["esfm-cold_start-v2"].cluster_checksum
    )
    assert diffs[f"esfm-{fresh}-v1"].state == "only in files"
    assert diffs[f"esfm-{fresh}-v1"].cluster_checksum is None
    # Pushed, but no file in this folder: "only on cluster".
    for name in ("known_user", "similar_items"):
        diff = diffs[f"esfm-{name}-v2"]
        assert diff.state == "only on cluster"
        assert diff.file_checksum is None
        assert diff.stored_script is None


AGREEMENT_PARAMS = [
    {"query_vector": [0.5, -1.25, 1.0]},
    {"query_vector": [1e-8, 3.0], "k": 3, "num_candidates": 7},
    {"query_vector": [0.0], "exclude_movies": ["1", "2", 'x"y\\z']},
    {
        "query_vector": [2.0],
        "filter_genres": True,
        "genres": ["Children's", "Film-Noir"],
    },
    {"query_vector": [1.0], "exclude_movies": ["{{k}}"], "genres": ["é ü"]},
]


@pytest.mark.parametrize("params", AGREEMENT_PARAMS)
@pytest.mark.parametrize("name", sorted(load_templates(TEMPLATES)))
def test_local_render_matches_cluster(es_client, name, params):
    if not server_info(es_client).has_mustache:
        pytest.skip("the cluster has no lang-mustache, so _render/template is missing")
    template = load_templates(TEMPLATES)[name]
    assert template.render(params) == render_on_cluster(es_client, template, params)


def test_render_on_cluster_needs_mustache(es_client):
    template = load_templates(TEMPLATES)["known_user"]
    if server_info(es_client).has_mustache:
        body = render_on_cluster(es_client, template, {"query_vector": [1.0]})
        assert body["query"]["knn"]["field"] == "rank_vector"
        return
    with pytest.raises(TemplateError, match="no lang-mustache"):
        render_on_cluster(es_client, template, {"query_vector": [1.0]})
