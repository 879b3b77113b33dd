"""Train on MovieLens 100K, migrate into a real node, and check exact agreement."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from esfm import aliases, documents, history, indexing, lock
from esfm.artifacts import TrainedModel
from esfm.cli.main import cli
from esfm.data import load_movielens, normalize_profile
from esfm.errors import LockError, MigrationError, QueryError, ValidationFailed
from esfm.mappings import latest_version
from esfm.migrate import apply_migration, plan_migration
from esfm.project import PACKAGED_PROJECT
from esfm.query import Recommender
from esfm.templates import load_templates, push_templates
from esfm.train import TrainConfig, save_model, train
from esfm.validate import compare_ranking, validate_index

MAPPINGS = PACKAGED_PROJECT / "mappings"
TEMPLATES = PACKAGED_PROJECT / "templates"


def _data_dir() -> Path:
    root = os.environ.get("ESFM_TEST_DATA")
    if not root:
        pytest.fail("ESFM_TEST_DATA is not set: point it at a folder with ml-100k/")
    return Path(root) / "ml-100k"


@pytest.fixture(scope="module")
def dataset():
    return load_movielens(_data_dir())


def _train(dataset, seed: int, out: Path) -> TrainedModel:
    config = TrainConfig(k=16, epochs=2, batch_size=2048, lr=5e-3, seed=seed)
    save_model(train(dataset, config), out)
    return TrainedModel.load(out)


@pytest.fixture(scope="module")
def model_a_dir(dataset, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("models") / "a"
    _train(dataset, 1, path)
    return path


@pytest.fixture(scope="module")
def model_a(model_a_dir) -> TrainedModel:
    return TrainedModel.load(model_a_dir)


@pytest.fixture(scope="module")
def model_b(dataset, tmp_path_factory) -> TrainedModel:
    return _train(dataset, 2, tmp_path_factory.mktemp("models") / "b")


@pytest.fixture(scope="module")
def alias() -> str:
    return f"it-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def migrated(es_client, model_a, alias):
    mapping = latest_version(MAPPINGS, "recsys")
    plan = plan_migration(es_client, model_a, mapping, alias=alias)
    result = apply_migration(es_client, plan, model_a)
    push_templates(es_client, load_templates(TEMPLATES))
    return result


def test_migrate_creates_and_swaps(es_client, migrated, model_a, alias):
    assert migrated.action == "create"
    assert migrated.previous_index is None
    assert migrated.indexed == len(model_a.features)
    assert aliases.alias_target(es_client, alias) == migrated.index
    meta = indexing.read_meta(es_client, migrated.index)
    assert meta["state"] == indexing.STATE_COMPLETE
    assert meta["model_id"] == model_a.model_id
    assert meta["mapping_version"] == 1
    assert migrated.validation.ok


def test_second_migrate_is_noop(es_client, migrated, model_a, alias):
    mapping = latest_version(MAPPINGS, "recsys")
    plan = plan_migration(es_client, model_a, mapping, alias=alias)
    assert plan.existing == "live"
    assert apply_migration(es_client, plan, model_a).action == "noop"


def test_cold_start_matches_model(es_client, migrated, model_a, alias):
    recommender = Recommender(es_client, alias, templates_dir=TEMPLATES)
    for gender, age in (("M", "18-24"), ("F", "50-55")):
        outcome = recommender.cold_start_outcome(gender=gender, age=age, k=10)
        profile = normalize_profile(gender=gender, age=age)
        cluster = [(r.movie_id, r.rank_value) for r in outcome.recommendations]
        assert len(cluster) == 10
        assert compare_ranking(model_a, profile, cluster, 10) is None
        expected = [movie for movie, _ in model_a.rank(profile, 10)]
        assert [movie for movie, _ in cluster] == expected


def test_cached_query_is_one_round_trip(es_client, migrated, alias):
    recommender = Recommender(es_client, alias, templates_dir=TEMPLATES)
    first = recommender.cold_start_outcome(gender="F", age="25", occupation="4")
    second = recommender.cold_start_outcome(gender="F", age="25", occupation="4")
    assert first.round_trips == 2
    assert second.round_trips == 1
    assert second.path == "local" or second.path == "stored"


def test_known_user_matches_model(es_client, migrated, model_a, alias):
    recommender = Recommender(es_client, alias, templates_dir=TEMPLATES)
    user = sorted(model_a.users)[5]
    outcome = recommender.known_user(user, k=10)
    profile = {"user": user, **model_a.users[user]}
    cluster = [(r.movie_id, r.rank_value) for r in outcome.recommendations]
    assert compare_ranking(model_a, profile, cluster, 10) is None


def test_rank_value_equals_model_formula(es_client, migrated, model_a, alias):
    recommender = Recommender(es_client, alias, templates_dir=TEMPLATES)
    outcome = recommender.cold_start_outcome(gender="M", age="35", k=5)
    profile = normalize_profile(gender="M", age="35")
    expected = dict(model_a.rank(profile, 5))
    for item in outcome.recommendations:
        assert item.rank_value == pytest.approx(expected[item.movie_id], rel=1e-4)


def test_unknown_metadata_value(es_client, migrated, alias):
    recommender = Recommender(es_client, alias, templates_dir=TEMPLATES)
    with pytest.raises(QueryError, match="unknown user '999999'"):
        recommender.known_user("999999")


def test_similar_items(es_client, migrated, alias):
    recommender = Recommender(es_client, alias, templates_dir=TEMPLATES)
    outcome = recommender.similar("Toy Story (1995)", k=5)
    titles = [item.title for item in outcome.recommendations]
    assert len(titles) == 5
    assert "Toy Story (1995)" not in titles


def test_stored_vectors_round_trip(es_client, migrated, model_a):
    docs = {doc["_id"]: doc for doc in documents.iter_documents(model_a)}
    response = es_client.search(
        index=migrated.index,
        query={"ids": {"values": ["movie:1", "age:18"]}},
        source={"exclude_vectors": False},
    )
    for hit in response["hits"]["hits"]:
        stored = np.asarray(hit["_source"]["rank_vector"], dtype=np.float32)
        expected = np.asarray(docs[hit["_id"]]["rank_vector"], dtype=np.float32)
        assert np.array_equal(stored, expected)


def test_other_model_fails_validation(es_client, migrated, model_b):
    report = validate_index(es_client, migrated.index, model_b)
    assert not report.ok
    assert report.mismatches


def test_swap_then_rollback(es_client, migrated, model_b, alias):
    mapping = latest_version(MAPPINGS, "recsys")
    plan = plan_migration(es_client, model_b, mapping, alias=alias)
    assert plan.current_index == migrated.index
    result = apply_migration(es_client, plan, model_b)
    assert aliases.alias_target(es_client, alias) == result.index
    assert history.entries(es_client, alias)[0]["previous_index"] == migrated.index

    runner = CliRunner()
    url = es_client.transport.node_pool.all()[0].base_url
    out = runner.invoke(cli, ["rollback", "--alias", alias, "--url", url, "--json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.output)["index"] == migrated.index
    assert aliases.alias_target(es_client, alias) == migrated.index


def test_cache_follows_alias_swap(es_client, migrated, model_b, alias):
    recommender = Recommender(es_client, alias, templates_dir=TEMPLATES)
    before = recommender.cold_start_outcome(gender="M", age="18")
    other = [
        index
        for index in es_client.indices.get(index=f"{alias}-*")
        if index != before.index
    ][0]
    aliases.swap_alias(es_client, alias, other, expected=before.index)
    try:
        after = recommender.cold_start_outcome(gender="M", age="18")
        assert after.index == other
        profile = normalize_profile(gender="M", age="18")
        cluster = [(r.movie_id, r.rank_value) for r in after.recommendations]
        assert compare_ranking(model_b, profile, cluster, 10) is None
    finally:
        aliases.swap_alias(es_client, alias, before.index, expected=other)


def test_compare_and_swap_rejects_stale(es_client, migrated, alias):
    with pytest.raises(MigrationError, match="no longer points at"):
        aliases.swap_alias(es_client, alias, migrated.index, expected="not-the-target")
    assert aliases.alias_target(es_client, alias) == migrated.index


def test_lock_is_exclusive(es_client, alias):
    name = f"migrate:{alias}-lock"
    with lock.held(es_client, name):
        with pytest.raises(LockError, match="another migration holds lock"):
            lock.acquire(es_client, name)
    assert lock.read_lock(es_client, name) is None


def test_partial_index_is_rebuilt(es_client, model_a, alias):
    mapping = latest_version(MAPPINGS, "recsys")
    fresh_alias = f"{alias}-partial"
    plan = plan_migration(es_client, model_a, mapping, alias=fresh_alias)
    indexing.create_index(
        es_client,
        plan.index,
        mappings=mapping.render(model_a.k),
        settings=plan.settings,
        meta={"model_id": model_a.model_id},
    )
    plan = plan_migration(es_client, model_a, mapping, alias=fresh_alias)
    assert plan.existing == "partial"
    result = apply_migration(es_client, plan, model_a)
    assert result.action == "rebuild"
    assert aliases.alias_target(es_client, fresh_alias) == plan.index


def test_bulk_item_errors_are_failures(es_client, model_a, alias):
    mapping = latest_version(MAPPINGS, "recsys")
    index = f"{alias}-bulkfail"
    indexing.create_index(
        es_client, index, mappings=mapping.render(model_a.k), settings={}, meta={}
    )
    docs = list(documents.iter_documents(model_a))[:3]
    docs[1]["embedding"] = docs[1]["embedding"][:-1]  # wrong dims
    with pytest.raises(MigrationError, match="1 of 3 documents failed") as info:
        indexing.bulk_load(es_client, index, docs, total=3)
    assert info.value.failures[0].doc_id == docs[1]["_id"]


def test_validation_failure_keeps_alias(es_client, migrated, model_b, alias):
    mapping = latest_version(MAPPINGS, "recsys")
    fresh_alias = f"{alias}-guard"
    es_client.indices.update_aliases(
        actions=[{"add": {"index": migrated.index, "alias": fresh_alias}}]
    )
    plan = plan_migration(es_client, model_b, mapping, alias=fresh_alias)

    def reject(client, index, model):
        raise ValidationFailed(f"rejected {index} on purpose")

    with pytest.raises(ValidationFailed):
        apply_migration(es_client, plan, model_b, validate=reject)
    assert aliases.alias_target(es_client, fresh_alias) == migrated.index


def test_cli_query_and_validate(es_client, migrated, model_a_dir, alias):
    runner = CliRunner()
    url = es_client.transport.node_pool.all()[0].base_url
    args = ["--url", url, "--alias", alias]
    query = runner.invoke(
        cli,
        [
            "query",
            "--template",
            "cold_start",
            "--gender",
            "M",
            "--age",
            "18-24",
            "-k",
            "10",
            "--json",
            "--project",
            str(PACKAGED_PROJECT),
            *args,
        ],
    )
    assert query.exit_code == 0, query.output
    payload = json.loads(query.output)
    assert len(payload["recommendations"]) == 10
    assert payload["path"] in ("stored", "local")

    bad = runner.invoke(cli, ["query", "--gender", "X", *args])
    assert bad.exit_code != 0
    assert "gender" in bad.output

    validate = runner.invoke(
        cli, ["validate", "--model", str(model_a_dir), "--json", *args]
    )
    assert validate.exit_code == 0, validate.output
    assert json.loads(validate.output)["ok"] is True
