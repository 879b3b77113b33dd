"""Cluster states that must give a clear error and change nothing."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from esfm import indexing, retention
from esfm.cli.main import cli
from esfm.errors import ClusterError
from esfm.mappings import latest_version
from esfm.project import PACKAGED_PROJECT
from esfm.server import cluster_errors


def _url(es_client) -> str:
    return str(es_client.transport.node_pool.all()[0].base_url)


def test_read_only_index_write(es_client, unique_prefix):
    index = f"{unique_prefix}read-only"
    es_client.indices.create(index=index, settings={"number_of_replicas": 0})
    es_client.index(index=index, id="1", document={"a": 1}, refresh=True)
    es_client.indices.put_settings(
        index=index, settings={"index.blocks.read_only_allow_delete": True}
    )
    try:
        with pytest.raises(ClusterError) as caught:
            with cluster_errors(es_client, "writing a document"):
                es_client.index(index=index, id="2", document={"a": 2})
        assert "read-only" in caught.value.message
        assert index in caught.value.message
        assert "read_only_allow_delete" in caught.value.hint
        assert es_client.count(index=index)["count"] == 1
    finally:
        es_client.indices.put_settings(
            index=index, settings={"index.blocks.read_only_allow_delete": None}
        )
        es_client.indices.delete(index=index)


def test_query_on_missing_alias(es_client, unique_prefix):
    alias = f"{unique_prefix}no-such-alias"
    result = CliRunner().invoke(
        cli,
        [
            "query",
            "--gender",
            "F",
            "--age",
            "25",
            "--alias",
            alias,
            "--url",
            _url(es_client),
        ],
    )
    output = " ".join(result.output.split())
    assert result.exit_code != 0
    assert alias in output
    assert "Traceback" not in output
    assert not es_client.indices.exists(index=alias)


def test_status_on_missing_alias(es_client, unique_prefix):
    alias = f"{unique_prefix}absent"
    result = CliRunner().invoke(
        cli, ["status", "--alias", alias, "--url", _url(es_client), "--json"]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["index"] is None
    assert f"alias {alias} does not exist" in report["drift"]["problems"]


def test_half_built_index_reported_and_pruned(es_client, unique_prefix):
    alias = f"{unique_prefix}half"
    index = f"{alias}-v1-ml-100k-000000000000"
    mapping = latest_version(PACKAGED_PROJECT / "mappings", "recsys")
    indexing.create_index(
        es_client,
        index,
        mappings=mapping.render(4),
        settings={"number_of_replicas": 0},
        meta={"model_id": "ml-100k-000000000000", "mapping_version": 1},
    )
    runner = CliRunner()
    status = runner.invoke(
        cli, ["status", "--alias", alias, "--url", _url(es_client), "--json"]
    )
    assert status.exit_code == 0, status.output
    assert json.loads(status.output)["incomplete_indices"] == [index]

    plan = retention.plan_prune(es_client, alias, keep=3)
    assert plan.incomplete == [index]
    assert plan.delete == [index]
    assert retention.apply_prune(es_client, plan) == [index]
    assert not es_client.indices.exists(index=index)
