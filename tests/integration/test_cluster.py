"""The local cluster against real Elasticsearch processes."""

from __future__ import annotations

import json
import os
import signal
import stat
from pathlib import Path

import pytest

from esfm import cluster as local_cluster
from esfm.config import create_client, resolve_settings
from esfm.errors import LocalClusterError


@pytest.fixture(scope="module")
def single_home(esfm_test_home: Path) -> Path:
    """An ESFM_HOME of its own, so the cluster in it can be named "default"."""
    home = esfm_test_home / "single"
    home.mkdir()
    os.chmod(home, 0o755)
    return home


@pytest.fixture(scope="module")
def single(request, single_home: Path, es_cache_dir: Path):
    """The one-node cluster "default" in ``single_home``; a late test stops it."""
    state = local_cluster.start(
        http_port=local_cluster.find_free_http_port(),
        home=single_home,
        cache_dir=es_cache_dir,
    )

    def stop_if_running() -> None:
        if local_cluster.read_state(home=single_home) is not None:
            local_cluster.stop(home=single_home)

    request.addfinalizer(stop_if_running)
    return state


def _health(url: str, **params) -> dict:
    return local_cluster.cluster_health(url, request_timeout=90, **params)


def test_node_answers_client(es_client):
    health = es_client.cluster.health()
    local = es_client.nodes.info(node_id="_local")
    versions = [node["version"] for node in local["nodes"].values()]

    assert health["status"] in ("green", "yellow")
    assert versions == [local_cluster.DEFAULT_VERSION]


def test_state_file_contents(single, single_home):
    path = local_cluster.state_path(single.name, single_home)
    document = json.loads(path.read_text())
    node = document["nodes"][0]
    pid_file = Path(node["config_path"]).parent / "elasticsearch.pid"

    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert document["name"] == single.name
    assert document["version"] == local_cluster.DEFAULT_VERSION
    assert document["security"] is False
    assert len(document["nodes"]) == 1
    assert node["url"] == f"http://127.0.0.1:{node['http_port']}"
    assert node["transport_port"] == node["http_port"] + 100
    assert node["pid"] == int(pid_file.read_text())
    assert Path(node["data_path"]).is_dir()
    assert Path(node["log_path"]).is_dir()
    assert document["started_at"]


def test_node_config_loopback_only(single):
    node = single.nodes[0]
    config = (Path(node.config_path) / "elasticsearch.yml").read_text()
    heap = (Path(node.config_path) / "jvm.options.d" / "esfm-heap.options").read_text()

    assert "network.host: 127.0.0.1" in config
    assert "discovery.type: single-node" in config
    assert "xpack.security.enabled: false" in config
    assert heap.split() == ["-Xms1g", "-Xmx1g"]


def test_node_runs_unprivileged(single, single_home):
    state = local_cluster.read_state(home=single_home)
    owner = Path(f"/proc/{state.nodes[0].pid}").stat().st_uid

    if os.geteuid() == 0:
        assert state.user == local_cluster.SERVICE_USER
        assert owner != 0
    else:
        assert state.user is None
        assert owner == os.geteuid()


def test_read_state_running(single, single_home):
    state = local_cluster.read_state(single.name, home=single_home)

    assert state is not None
    assert state.is_running()
    assert state.url == single.url
    assert [node.name for node in state.running_nodes()] == [single.nodes[0].name]


def test_status_reports_health(single, single_home):
    report = local_cluster.status(single.name, home=single_home)

    assert report.running
    assert report.error is None
    assert report.health["status"] == "green"
    assert report.version == local_cluster.DEFAULT_VERSION
    assert report.url == single.url
    assert [node.running for node in report.nodes] == [True]


def test_config_prefers_env_over_state(single, single_home, monkeypatch):
    monkeypatch.setenv("ESFM_HOME", str(single_home))

    from_state = resolve_settings(environ={})
    from_env = resolve_settings(environ={"ESFM_URL": "http://127.0.0.1:1"})

    assert from_state.url == single.url
    assert from_env.url == "http://127.0.0.1:1"


def test_second_start_rejected(single, single_home, es_cache_dir):
    with pytest.raises(LocalClusterError) as caught:
        local_cluster.start(
            http_port=local_cluster.find_free_http_port(),
            home=single_home,
            cache_dir=es_cache_dir,
        )

    assert "already running" in caught.value.message
    assert "esfm cluster status" in caught.value.hint


def test_port_in_use_rejected(single, esfm_test_home, es_cache_dir):
    port = single.nodes[0].http_port
    name = f"pytest-{os.getpid()}-busy"

    with pytest.raises(LocalClusterError) as caught:
        local_cluster.start(
            name=name, http_port=port, home=esfm_test_home, cache_dir=es_cache_dir
        )

    assert str(port) in caught.value.message
    assert "--port" in caught.value.hint
    assert local_cluster.read_state(name, home=esfm_test_home) is None


def test_failed_start_reports_log(esfm_test_home, es_cache_dir):
    name = f"pytest-{os.getpid()}-badheap"
    port = local_cluster.find_free_http_port()

    with pytest.raises(LocalClusterError) as caught:
        local_cluster.start(
            name=name,
            http_port=port,
            heap="100000g",
            home=esfm_test_home,
            cache_dir=es_cache_dir,
        )

    assert "exited during startup" in caught.value.message
    assert "Last log lines" in caught.value.message
    assert "stdout.log" in caught.value.message
    assert local_cluster.read_state(name, home=esfm_test_home) is None
    assert not local_cluster.port_in_use(port)


def test_stop_removes_state(single, single_home):
    # Runs last among the tests that use ``single``, because it stops it.
    node = single.nodes[0]

    result = local_cluster.stop(single.name, home=single_home)

    assert result.stopped == [node.name]
    assert result.killed == []
    assert local_cluster.read_state(single.name, home=single_home) is None
    assert not node.is_running(single.es_home)
    assert not local_cluster.port_in_use(node.http_port)
    assert Path(node.data_path).is_dir()


def test_wipe_deletes_cluster_dir(single, single_home):
    directory = local_cluster.wipe(single.name, home=single_home)

    assert directory == local_cluster.cluster_dir(single.name, single_home)
    assert not directory.exists()


def test_fetch_unknown_version_fails(tmp_path, monkeypatch):
    monkeypatch.delenv("ESFM_ES_DIST", raising=False)

    with pytest.raises(LocalClusterError) as caught:
        local_cluster.ensure_distribution("9.99.0", cache_dir=tmp_path)

    assert "mvn failed to fetch Elasticsearch 9.99.0" in caught.value.message
    assert not (tmp_path / "elasticsearch-9.99.0").exists()


# --------------------------------------------------------------------------
# Three nodes


def _client(url: str):
    return create_client(resolve_settings(url=url, request_timeout=90))


def test_three_nodes_joined(es_cluster_3):
    health = _health(es_cluster_3.url)
    state = local_cluster.read_state(es_cluster_3.name, home=es_cluster_3.home)
    config = (Path(state.nodes[0].config_path) / "elasticsearch.yml").read_text()

    assert health["number_of_nodes"] == 3
    assert len({node.http_port for node in state.nodes}) == 3
    assert len(state.running_nodes()) == 3
    assert "cluster.initial_master_nodes" in config
    assert "discovery.type" not in config


def test_stop_node_red_then_green(es_cluster_3, unique_prefix):
    name, home = es_cluster_3.name, es_cluster_3.home
    state = local_cluster.read_state(name, home=home)
    node_1, node_2 = state.nodes[1].name, state.nodes[2].name
    client = _client(es_cluster_3.url)
    only_on_2 = unique_prefix + "only-on-2"
    replicated = unique_prefix + "replicated"

    # The first index has its only copy on node 2, so losing node 2 makes the
    # cluster red. The second keeps one copy each on nodes 1 and 2.
    client.indices.create(
        index=only_on_2,
        settings={
            "number_of_shards": 1,
            "number_of_replicas": 0,
            "index.routing.allocation.require._name": node_2,
        },
    )
    client.indices.create(
        index=replicated,
        settings={
            "number_of_shards": 1,
            "number_of_replicas": 1,
            "index.routing.allocation.include._name": f"{node_1},{node_2}",
        },
    )
    before = _health(es_cluster_3.url, wait_for_status="green", timeout="60s")

    killed = local_cluster.stop_node(name, 2, home=home)
    during = _health(es_cluster_3.url, wait_for_nodes="2", timeout="60s")
    replicated_during = client.cluster.health(index=replicated)
    report = local_cluster.status(name, home=home)

    local_cluster.start_node(name, 2, home=home)
    after = _health(
        es_cluster_3.url, wait_for_status="green", wait_for_nodes="3", timeout="120s"
    )
    client.indices.delete(index=f"{unique_prefix}*")
    client.close()

    assert before["status"] == "green"
    assert killed is False
    assert during["number_of_nodes"] == 2
    assert during["status"] == "red"
    assert replicated_during["status"] == "yellow"
    assert [node.running for node in report.nodes] == [True, True, False]
    assert report.nodes[2].pid is None
    assert after["timed_out"] is False
    assert after["status"] == "green"
    assert after["number_of_nodes"] == 3


def test_stop_node_kills_stuck_node(es_cluster_3):
    name, home = es_cluster_3.name, es_cluster_3.home
    stuck = local_cluster.read_state(name, home=home).nodes[1]

    # A stopped (SIGSTOP) JVM cannot act on SIGTERM, so only SIGKILL ends it.
    os.kill(stuck.pid, signal.SIGSTOP)
    killed = local_cluster.stop_node(name, 1, timeout=3, home=home)
    stuck_stopped = not stuck.is_running(
        local_cluster.read_state(name, home=home).es_home
    )

    local_cluster.start_node(name, 1, home=home)
    after = _health(es_cluster_3.url, wait_for_nodes="3", timeout="120s")

    assert killed is True
    assert stuck_stopped
    assert after["number_of_nodes"] == 3
    assert after["status"] in ("green", "yellow")


def test_stop_node_rejects_bad_index(es_cluster_3):
    with pytest.raises(LocalClusterError) as caught:
        local_cluster.stop_node(es_cluster_3.name, 3, home=es_cluster_3.home)

    assert "has no node 3" in caught.value.message
