"""Faults during a migration lose nothing: a killed CLI process, a data node
stopped during the bulk load, and shards that return 503 for a while."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from esfm import aliases, indexing, lock
from esfm import cluster as local_cluster
from esfm.artifacts import TrainedModel
from esfm.config import create_client, resolve_settings
from esfm.data import MovieLensDataset, load_movielens
from esfm.documents import iter_documents
from esfm.errors import ClusterError, MigrationError
from esfm.mappings import latest_version
from esfm.migrate import apply_migration, ensure_ready, index_name, plan_migration
from esfm.project import PACKAGED_PROJECT
from esfm.train import TrainConfig, save_model, train

ESFM_CLI = Path(sys.executable).with_name("esfm")
MAPPINGS = PACKAGED_PROJECT / "mappings"
# Documents indexed before the CLI process is killed; far below the ~9.9K
# documents of a MovieLens 1M model.
KILL_AFTER_DOCS = 1000


def _data_dir(name: str) -> Path:
    root = os.environ.get("ESFM_TEST_DATA")
    if not root:
        pytest.fail(f"ESFM_TEST_DATA is not set: point it at a folder with {name}/")
    return Path(root) / name


def _train(dataset, seed: int, out: Path, epochs: int = 2) -> TrainedModel:
    config = TrainConfig(
        k=16,
        epochs=epochs,
        batch_size=2048 if epochs > 1 else 8192,
        lr=5e-3,
        seed=seed,
        patience=None,
        early_stopping_fraction=0,
    )
    save_model(train(dataset, config), out)
    return TrainedModel.load(out)


@pytest.fixture(scope="module")
def ml100k():
    return load_movielens(_data_dir("ml-100k"))


@pytest.fixture(scope="module")
def model_a(ml100k, tmp_path_factory) -> TrainedModel:
    return _train(ml100k, 21, tmp_path_factory.mktemp("models") / "a")


@pytest.fixture(scope="module")
def model_b(ml100k, tmp_path_factory) -> TrainedModel:
    return _train(ml100k, 22, tmp_path_factory.mktemp("models") / "b")


@pytest.fixture(scope="module")
def large_model_dir(tmp_path_factory) -> Path:
    """A MovieLens 1M model: the full ~9.9K-feature vocabulary, trained briefly.

    One epoch on a tenth of the ratings keeps training to seconds; the test
    needs the vocabulary size, not the accuracy.
    """
    full = load_movielens(_data_dir("ml-1m"))
    sample = full.ratings.sample(frac=0.1, random_state=0).reset_index(drop=True)
    dataset = MovieLensDataset(full.name, sample, full.users, full.movies)
    out = tmp_path_factory.mktemp("models") / "large"
    _train(dataset, 23, out, epochs=1)
    return out


@pytest.fixture
def alias() -> str:
    return f"fault-{uuid.uuid4().hex[:10]}"


def _url(client) -> str:
    return str(client.transport.node_pool.all()[0].base_url)


def _indexed(client, index: str) -> int:
    """Return how many index operations ``index`` has seen, refreshed or not."""
    if not client.indices.exists(index=index):
        return 0
    stats = client.indices.stats(index=index, metric="indexing")["indices"]
    if index not in stats:  # created, but no shard has started yet
        return 0
    return int(stats[index]["primaries"]["indexing"]["index_total"])


def _migrate_cli(client, model_dir: Path, alias: str, *extra: str) -> list[str]:
    return [
        str(ESFM_CLI),
        "migrate",
        "--model",
        str(model_dir),
        "--alias",
        alias,
        "--url",
        _url(client),
        *extra,
    ]


def test_killed_cli_leaves_alias_then_rebuilds(
    es_client, model_a, large_model_dir, alias
):
    mapping = latest_version(MAPPINGS, "recsys")
    old = apply_migration(
        es_client, plan_migration(es_client, model_a, mapping, alias=alias), model_a
    )
    large = TrainedModel.load(large_model_dir)
    new_index = index_name(alias, mapping.version, large.model_id)

    process = subprocess.Popen(
        _migrate_cli(es_client, large_model_dir, alias, "--bulk-chunk-size", "25"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        while _indexed(es_client, new_index) < KILL_AFTER_DOCS:
            assert process.poll() is None, "migrate ended before it could be killed"
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
    assert process.returncode == -signal.SIGKILL

    assert aliases.alias_target(es_client, alias) == old.index
    assert indexing.read_meta(es_client, new_index)["state"] == indexing.STATE_BUILDING
    held = lock.read_lock(es_client, f"migrate:{alias}")
    assert held is not None
    assert held["pid"] == process.pid

    rerun = subprocess.run(
        _migrate_cli(es_client, large_model_dir, alias),
        capture_output=True,
        text=True,
        timeout=600,
    )
    output = " ".join(rerun.stdout.split())
    assert rerun.returncode == 0, rerun.stderr
    assert f"delete the half-built index {new_index}" in output
    assert "rebuild" in output
    assert aliases.alias_target(es_client, alias) == new_index
    meta = indexing.read_meta(es_client, new_index)
    assert meta["state"] == indexing.STATE_COMPLETE
    assert es_client.count(index=new_index)["count"] == len(large.features)
    assert lock.read_lock(es_client, f"migrate:{alias}") is None


# -- three-node cluster ---------------------------------------------------------


@pytest.fixture(scope="module")
def cluster_client(es_cluster_3):
    client = create_client(resolve_settings(url=es_cluster_3.url))
    yield client
    client.close()


@pytest.mark.multinode
def test_node_stop_during_bulk_keeps_alias(
    es_cluster_3, cluster_client, model_a, model_b, alias
):
    client = cluster_client
    mapping = latest_version(MAPPINGS, "recsys")
    old_plan = plan_migration(
        client, model_a, mapping, alias=alias, shards=3, replicas=1
    )
    old = apply_migration(client, old_plan, model_a)

    plan = plan_migration(
        client,
        model_b,
        mapping,
        alias=alias,
        shards=3,
        replicas=0,
        bulk_chunk_size=50,
        bulk_timeout="2s",
        bulk_max_retries=2,
    )
    # One shard per node, so the stopped node has a primary of the new index.
    plan.settings["index.routing.allocation.total_shards_per_node"] = 1
    stopped = threading.Event()

    def stop_node_midway(done: int, total: int) -> None:
        if not stopped.is_set() and done >= total // 3:
            local_cluster.stop_node(es_cluster_3.name, 2, home=es_cluster_3.home)
            stopped.set()

    try:
        with pytest.raises((MigrationError, ClusterError)):
            apply_migration(client, plan, model_b, on_progress=stop_node_midway)
        assert stopped.is_set()
        assert aliases.alias_target(client, alias) == old.index
        assert (
            indexing.read_meta(client, plan.index)["state"] == indexing.STATE_BUILDING
        )
        with pytest.raises(MigrationError, match="2 of 3 primaries active"):
            ensure_ready(client, plan.index, expected_docs=plan.doc_count, timeout="2s")
    finally:
        if stopped.is_set():
            local_cluster.start_node(es_cluster_3.name, 2, home=es_cluster_3.home)

    client.cluster.health(index=alias, wait_for_status="green", timeout="120s")
    rerun = plan_migration(client, model_b, mapping, alias=alias, shards=3, replicas=1)
    assert rerun.existing == "partial"
    result = apply_migration(client, rerun, model_b)
    assert result.action == "rebuild"
    assert result.validation.ok
    assert aliases.alias_target(client, alias) == rerun.index


def _create_unassigned(client, index: str, mappings: dict) -> None:
    """Create ``index`` with its primary unassigned, so bulk items fail with 503."""
    client.indices.create(
        index=index,
        mappings=mappings,
        settings={
            "number_of_shards": 1,
            "number_of_replicas": 0,
            "index.routing.allocation.require._name": "no-such-node",
        },
        # The default waits for the primary, which never starts.
        wait_for_active_shards="0",
    )


@pytest.mark.multinode
def test_bulk_retries_503_until_shard_returns(cluster_client, model_a, alias):
    client = cluster_client
    mapping = latest_version(MAPPINGS, "recsys")
    index = f"{alias}-retry"
    _create_unassigned(client, index, mapping.render(model_a.k))
    docs = list(iter_documents(model_a))[:200]
    released = threading.Event()

    def allow_allocation() -> None:
        # Give the first attempt time to fail with 503, then let the shard start.
        time.sleep(3)
        client.indices.put_settings(
            index=index, settings={"index.routing.allocation.require._name": None}
        )
        released.set()

    thread = threading.Thread(target=allow_allocation)
    thread.start()
    try:
        result = indexing.bulk_load(
            client,
            index,
            docs,
            total=len(docs),
            timeout="1s",
            max_retries=6,
            initial_backoff=1.0,
        )
    finally:
        thread.join()
    assert released.is_set()
    assert result.indexed == len(docs)
    assert result.errors == []

    client.indices.refresh(index=index)
    assert client.count(index=index)["count"] == len(docs)
    client.indices.delete(index=index)


@pytest.mark.multinode
def test_bulk_reports_503_per_item(cluster_client, model_a, alias):
    client = cluster_client
    mapping = latest_version(MAPPINGS, "recsys")
    index = f"{alias}-unavailable"
    _create_unassigned(client, index, mapping.render(model_a.k))
    docs = list(iter_documents(model_a))[:120]
    try:
        with pytest.raises(MigrationError, match="stopped early") as info:
            indexing.bulk_load(
                client,
                index,
                docs,
                total=len(docs),
                chunk_size=50,
                timeout="1s",
                max_retries=1,
                initial_backoff=0.1,
            )
        failures = info.value.failures
        assert [failure.doc_id for failure in failures] == [d["_id"] for d in docs[:50]]
        assert {failure.status for failure in failures} == {503}
        assert info.value.not_sent == 70
        with pytest.raises(MigrationError, match="0 of 1 primaries active"):
            ensure_ready(client, index, expected_docs=len(docs), timeout="1s")
    finally:
        client.indices.delete(index=index)
