"""Local cluster logic that needs no Elasticsearch process."""

from __future__ import annotations

import hashlib
import io
import json
import os
import socket
import stat
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import pytest
from click.testing import CliRunner
from rich.console import Console

from esfm import cluster as local_cluster
from esfm.cli.cluster_cmds import LineRenderer
from esfm.cli.cluster_cmds import cluster as cluster_group
from esfm.errors import LocalClusterError

# --------------------------------------------------------------------------
# Java


def _fake_jdk(root: Path, name: str, version: str | None) -> Path:
    home = root / name
    (home / "bin").mkdir(parents=True)
    java = home / "bin" / "java"
    java.write_text("#!/bin/sh\n")
    java.chmod(0o755)
    if version is not None:
        (home / "release").write_text(f'IMPLEMENTOR="Test"\nJAVA_VERSION="{version}"\n')
    return home


def test_required_java_major():
    assert local_cluster.required_java_major("9.5.0") == 21
    assert local_cluster.required_java_major("10.0.0") == 21
    assert local_cluster.required_java_major("8.19.0") == 17


def test_find_java_picks_newest(tmp_path):
    _fake_jdk(tmp_path, "jdk-17", "17.0.15")
    _fake_jdk(tmp_path, "jdk-21", "21.0.4")
    newest = _fake_jdk(tmp_path, "jdk-25", "25.0.3")
    _fake_jdk(tmp_path, "no-release", None)

    runtime = local_cluster.find_java("9.5.0", environ={}, search_dirs=[tmp_path])

    assert runtime.home == newest.resolve()
    assert runtime.major == 25
    assert runtime.version == "25.0.3"


def test_find_java_lists_what_was_found(tmp_path):
    _fake_jdk(tmp_path, "jdk-17", "17.0.15")
    _fake_jdk(tmp_path, "jdk-8", "1.8.0_392")

    with pytest.raises(LocalClusterError) as caught:
        local_cluster.find_java("9.5.0", environ={}, search_dirs=[tmp_path])

    assert "no Java 21+ runtime" in caught.value.message
    assert "(Java 17.0.15)" in caught.value.message
    assert "(Java 1.8.0_392)" in caught.value.message
    assert "ES_JAVA_HOME" in caught.value.hint


def test_find_java_old_java_home_skipped(tmp_path):
    old = _fake_jdk(tmp_path / "env", "jdk-17", "17.0.15")
    new = _fake_jdk(tmp_path / "jvm", "jdk-21", "21.0.4")

    runtime = local_cluster.find_java(
        "9.5.0", environ={"JAVA_HOME": str(old)}, search_dirs=[tmp_path / "jvm"]
    )

    assert runtime.home == new.resolve()


def test_find_java_es_java_home_wins(tmp_path):
    chosen = _fake_jdk(tmp_path / "env", "jdk-21", "21.0.4")
    _fake_jdk(tmp_path / "jvm", "jdk-25", "25.0.3")

    runtime = local_cluster.find_java(
        "9.5.0",
        environ={"ES_JAVA_HOME": str(chosen)},
        search_dirs=[tmp_path / "jvm"],
    )

    assert runtime.home == chosen.resolve()
    assert runtime.source == "ES_JAVA_HOME"


def test_find_java_old_es_java_home_rejected(tmp_path):
    old = _fake_jdk(tmp_path / "env", "jdk-17", "17.0.15")
    _fake_jdk(tmp_path / "jvm", "jdk-25", "25.0.3")

    with pytest.raises(LocalClusterError) as caught:
        local_cluster.find_java(
            "9.5.0",
            environ={"ES_JAVA_HOME": str(old)},
            search_dirs=[tmp_path / "jvm"],
        )

    assert "ES_JAVA_HOME" in caught.value.message
    assert "17.0.15" in caught.value.message


def test_find_java_accepts_17_for_8x(tmp_path):
    _fake_jdk(tmp_path, "jdk-17", "17.0.15")

    runtime = local_cluster.find_java("8.19.0", environ={}, search_dirs=[tmp_path])

    assert runtime.major == 17


# --------------------------------------------------------------------------
# Distribution


def _make_zip(path: Path, version: str, extra: dict[str, str] | None = None) -> Path:
    prefix = f"elasticsearch-{version}/"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(zipfile.ZipInfo(prefix), "")
        script = zipfile.ZipInfo(prefix + "bin/elasticsearch")
        script.external_attr = (stat.S_IFREG | 0o755) << 16
        archive.writestr(script, "#!/bin/sh\n")
        archive.writestr(prefix + "config/elasticsearch.yml", "# empty\n")
        for name, text in (extra or {}).items():
            archive.writestr(name, text)
    return path


def _write_sha512(zip_path: Path) -> str:
    digest = hashlib.sha512(zip_path.read_bytes()).hexdigest()
    Path(f"{zip_path}.sha512").write_text(f"{digest}  {zip_path.name}\n")
    return digest


@pytest.fixture
def no_dist_env(monkeypatch):
    monkeypatch.delenv("ESFM_ES_DIST", raising=False)


def test_ensure_distribution_unpacks_local_zip(tmp_path, no_dist_env):
    zip_path = _make_zip(tmp_path / "elasticsearch-9.9.9.zip", "9.9.9")
    digest = _write_sha512(zip_path)
    cache = tmp_path / "cache"
    events = []

    home = local_cluster.ensure_distribution(
        dist_zip=zip_path, cache_dir=cache, on_progress=events.append
    )
    marker = json.loads((home / ".esfm-distribution.json").read_text())

    assert home == cache / "elasticsearch-9.9.9"
    assert os.access(home / "bin" / "elasticsearch", os.X_OK)
    assert (home / "config" / "elasticsearch.yml").read_text() == "# empty\n"
    assert marker["sha512"] == digest
    assert marker["check"].startswith("SHA512 matches")
    assert {event.stage for event in events} >= {"verify", "unpack"}
    assert [p.name for p in cache.iterdir() if p.name.startswith(".unpack")] == []


def test_ensure_distribution_reuses_cache(tmp_path, no_dist_env):
    zip_path = _make_zip(tmp_path / "elasticsearch-9.9.9.zip", "9.9.9")
    _write_sha512(zip_path)
    cache = tmp_path / "cache"
    first = local_cluster.ensure_distribution(dist_zip=zip_path, cache_dir=cache)
    (first / "kept").write_text("still here")

    again = local_cluster.ensure_distribution("9.9.9", cache_dir=cache)

    assert again == first
    assert (again / "kept").read_text() == "still here"


def test_ensure_distribution_reads_env_zip(tmp_path, monkeypatch):
    zip_path = _make_zip(tmp_path / "elasticsearch-9.9.7.zip", "9.9.7")
    _write_sha512(zip_path)
    monkeypatch.setenv("ESFM_ES_DIST", str(zip_path))

    home = local_cluster.ensure_distribution(cache_dir=tmp_path / "cache")

    assert home.name == "elasticsearch-9.9.7"


def test_sha1_file_accepted(tmp_path, no_dist_env):
    zip_path = _make_zip(tmp_path / "elasticsearch-9.9.9.zip", "9.9.9")
    digest = hashlib.sha1(zip_path.read_bytes()).hexdigest()
    Path(f"{zip_path}.sha1").write_text(digest)

    check = local_cluster.verify_zip(zip_path, "9.9.9", sibling_dirs=[tmp_path])

    assert check.startswith("SHA1 matches")


def test_checksum_mismatch_rejected(tmp_path, no_dist_env):
    zip_path = _make_zip(tmp_path / "elasticsearch-9.9.9.zip", "9.9.9")
    Path(f"{zip_path}.sha512").write_text("0" * 128)
    cache = tmp_path / "cache"

    with pytest.raises(LocalClusterError) as caught:
        local_cluster.ensure_distribution(dist_zip=zip_path, cache_dir=cache)

    assert "SHA512" in caught.value.message
    assert not (cache / "elasticsearch-9.9.9").exists()


def test_missing_checksum_rejected(tmp_path, no_dist_env):
    zip_path = _make_zip(tmp_path / "elasticsearch-9.9.9.zip", "9.9.9")

    with pytest.raises(LocalClusterError) as caught:
        local_cluster.ensure_distribution(
            dist_zip=zip_path, cache_dir=tmp_path / "cache"
        )

    assert "no checksum" in caught.value.message
    assert ".sha512" in caught.value.hint


def test_pinned_version_mismatch_rejected(tmp_path, no_dist_env):
    # A zip that claims to be the pinned version, with a valid sibling
    # checksum, still fails because the pinned SHA-512 takes precedence.
    zip_path = _make_zip(tmp_path / "elasticsearch-9.5.0.zip", "9.5.0")
    _write_sha512(zip_path)

    with pytest.raises(LocalClusterError) as caught:
        local_cluster.ensure_distribution(
            dist_zip=zip_path, cache_dir=tmp_path / "cache"
        )

    assert "pinned SHA-512" in caught.value.message


def test_zip_slip_rejected(tmp_path, no_dist_env):
    zip_path = _make_zip(
        tmp_path / "elasticsearch-9.9.9.zip",
        "9.9.9",
        extra={"elasticsearch-9.9.9/../evil": "x"},
    )
    _write_sha512(zip_path)
    cache = tmp_path / "cache"

    with pytest.raises(LocalClusterError) as caught:
        local_cluster.ensure_distribution(dist_zip=zip_path, cache_dir=cache)

    assert "unexpected entry" in caught.value.message
    assert not (cache / "elasticsearch-9.9.9").exists()
    assert not (cache / "evil").exists()


def test_zip_version_mismatch_rejected(tmp_path, no_dist_env):
    zip_path = _make_zip(tmp_path / "elasticsearch-9.9.9.zip", "9.9.9")

    with pytest.raises(LocalClusterError) as caught:
        local_cluster.ensure_distribution(
            "9.5.0", dist_zip=zip_path, cache_dir=tmp_path / "cache"
        )

    assert "contains Elasticsearch 9.9.9" in caught.value.message


def test_not_a_zip_rejected(tmp_path, no_dist_env):
    bogus = tmp_path / "elasticsearch.zip"
    bogus.write_text("not a zip")

    with pytest.raises(LocalClusterError) as caught:
        local_cluster.ensure_distribution(dist_zip=bogus, cache_dir=tmp_path / "c")

    assert "not a readable zip" in caught.value.message


def test_missing_mvn_names_package(tmp_path, monkeypatch, no_dist_env):
    empty = tmp_path / "empty-path"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))

    with pytest.raises(LocalClusterError) as caught:
        local_cluster.ensure_distribution("9.9.8", cache_dir=tmp_path / "cache")

    assert "mvn is not installed" in caught.value.message
    assert "apt-get install maven" in caught.value.hint


def test_maven_checksum_policy_follows_pin(tmp_path):
    pinned = local_cluster.maven_command("mvn", local_cluster.DEFAULT_VERSION, tmp_path)
    other = local_cluster.maven_command("mvn", "9.9.8", tmp_path)
    # The pinned SHA-512 is checked after the download, so a registry without
    # checksum files must not stop the pinned version.
    assert "--lax-checksums" in pinned
    assert "--strict-checksums" not in pinned
    assert "--strict-checksums" in other
    assert f"-DoutputDirectory={tmp_path}" in other


# --------------------------------------------------------------------------
# State


def _state(
    tmp_path: Path, pid: int | None, ticks: int | None
) -> local_cluster.ClusterState:
    node_dir = tmp_path / "node-0"
    node = local_cluster.NodeState(
        index=0,
        name="t-node-0",
        http_port=19200,
        transport_port=19300,
        url="http://127.0.0.1:19200",
        config_path=str(node_dir / "config"),
        data_path=str(node_dir / "data"),
        log_path=str(node_dir / "logs"),
        pid=pid,
        pid_start_ticks=ticks,
    )
    return local_cluster.ClusterState(
        name="t",
        version="9.5.0",
        es_home="/nonexistent/elasticsearch-9.5.0",
        java_home="/usr/lib/jvm/x",
        user=None,
        security=False,
        started_at="2025-01-01T00:00:00+00:00",
        nodes=[node],
    )


def test_state_round_trip(tmp_path):
    state = _state(tmp_path, pid=12345, ticks=99)
    path = local_cluster.state_path("t", tmp_path)

    local_cluster.write_state(state, path)
    loaded = local_cluster.read_state("t", home=tmp_path)

    assert loaded.to_dict() == state.to_dict()
    assert loaded.path == path
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in path.parent.iterdir()] == ["state.json"]


def test_read_state_missing_returns_none(tmp_path):
    assert local_cluster.read_state("nothing", home=tmp_path) is None


def test_read_state_invalid_json(tmp_path):
    path = local_cluster.state_path("t", tmp_path)
    path.parent.mkdir(parents=True)
    path.write_text("{not json")

    with pytest.raises(LocalClusterError) as caught:
        local_cluster.read_state("t", home=tmp_path)

    assert "invalid JSON" in caught.value.message


def test_read_state_unknown_format(tmp_path):
    path = local_cluster.state_path("t", tmp_path)
    path.parent.mkdir(parents=True)
    document = _state(tmp_path, None, None).to_dict()
    document["format"] = 99
    path.write_text(json.dumps(document))

    with pytest.raises(LocalClusterError) as caught:
        local_cluster.read_state("t", home=tmp_path)

    assert "unsupported format 99" in caught.value.message


def test_dead_pid_not_running(tmp_path):
    finished = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    state = _state(tmp_path, pid=int(finished.stdout), ticks=None)

    assert not state.is_running()
    assert state.url == "http://127.0.0.1:19200"


def test_reused_pid_not_running(tmp_path):
    # This test process is alive but is no Elasticsearch JVM.
    state = _state(tmp_path, pid=os.getpid(), ticks=None)

    assert not state.is_running()
    assert state.running_nodes() == []


# --------------------------------------------------------------------------
# Options, ports and configuration


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"name": "../escape"}, "invalid cluster name"),
        ({"name": ""}, "invalid cluster name"),
        ({"nodes": 0}, "invalid node count 0"),
        ({"heap": "1x"}, "invalid heap size '1x'"),
        ({"heap": "0g"}, "invalid heap size '0g'"),
        ({"http_port": 80}, "port 80 is outside 1024-65535"),
        ({"http_port": 65500, "nodes": 1}, "port 65600 is outside 1024-65535"),
        ({"version": "latest"}, "invalid Elasticsearch version 'latest'"),
    ],
)
def test_start_rejects_invalid_options(tmp_path, options, expected):
    home = tmp_path / "home"

    with pytest.raises(LocalClusterError) as caught:
        local_cluster.start(home=home, cache_dir=tmp_path / "cache", **options)

    assert expected in caught.value.message
    assert not home.exists()


def test_port_in_use_detected():
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]

        assert local_cluster.port_in_use(port)


def test_start_rejects_busy_port(tmp_path):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]

        with pytest.raises(LocalClusterError) as caught:
            local_cluster.start(
                http_port=port, home=tmp_path / "home", cache_dir=tmp_path / "cache"
            )

    assert f"HTTP port {port} on 127.0.0.1 is already in use" in caught.value.message
    assert "--port" in caught.value.hint
    assert not (tmp_path / "cache").exists()
    assert list((tmp_path / "home" / "clusters").glob("*.lock")) == []


def test_node_ports_consecutive():
    assert local_cluster.node_ports(9200, 3) == ([9200, 9201, 9202], [9300, 9301, 9302])
    assert local_cluster.node_ports(9200, 2, 9400) == ([9200, 9201], [9400, 9401])


def test_find_free_http_port_block():
    port = local_cluster.find_free_http_port(3)
    http_ports, transport_ports = local_cluster.node_ports(port, 3)

    assert not any(local_cluster.port_in_use(p) for p in http_ports + transport_ports)


def _nodes(count: int) -> list[local_cluster.NodeState]:
    return [
        local_cluster.NodeState(
            index=i,
            name=f"c-node-{i}",
            http_port=9200 + i,
            transport_port=9300 + i,
            url=f"http://127.0.0.1:{9200 + i}",
            config_path=f"/x/node-{i}/config",
            data_path=f"/x/node-{i}/data",
            log_path=f"/x/node-{i}/logs",
        )
        for i in range(count)
    ]


def test_single_node_config():
    nodes = _nodes(1)

    text = local_cluster.render_node_config(
        cluster_name="c", node=nodes[0], all_nodes=nodes, security=False
    )
    lines = text.splitlines()

    assert "cluster.name: esfm-c" in lines
    assert "network.host: 127.0.0.1" in lines
    assert "http.port: 9200" in lines
    assert "transport.port: 9300" in lines
    assert 'path.data: "/x/node-0/data"' in lines
    assert "discovery.type: single-node" in lines
    assert "xpack.security.enabled: false" in lines
    assert not any(line.startswith("discovery.seed_hosts") for line in lines)


def test_three_node_config():
    nodes = _nodes(3)

    text = local_cluster.render_node_config(
        cluster_name="c", node=nodes[1], all_nodes=nodes, security=False
    )
    lines = text.splitlines()

    assert "node.name: c-node-1" in lines
    assert "http.port: 9201" in lines
    assert (
        'discovery.seed_hosts: ["127.0.0.1:9300", "127.0.0.1:9301", "127.0.0.1:9302"]'
        in lines
    )
    assert 'cluster.initial_master_nodes: ["c-node-0", "c-node-1", "c-node-2"]' in lines
    assert "discovery.type: single-node" not in lines


def test_default_home_from_env(tmp_path):
    environ = {"ESFM_HOME": str(tmp_path / "h")}

    assert local_cluster.default_home(environ) == tmp_path / "h"
    assert local_cluster.default_cache_dir(environ) == tmp_path / "h" / "dist"
    environ["ESFM_CACHE_DIR"] = str(tmp_path / "c")
    assert local_cluster.default_cache_dir(environ) == tmp_path / "c"


def test_default_home_without_env():
    home = local_cluster.default_home({})

    if os.geteuid() == 0:
        assert home == Path("/var/lib/esfm")
    else:
        assert home == Path("~/.cache/esfm").expanduser()


def test_stop_unknown_cluster_does_nothing(tmp_path):
    result = local_cluster.stop("nothing", home=tmp_path)

    assert result.name == "nothing"
    assert result.stopped == []
    assert result.killed == []
    assert list((tmp_path / "clusters").iterdir()) == []


def test_stop_invalid_name_rejected(tmp_path):
    with pytest.raises(LocalClusterError) as caught:
        local_cluster.stop("../escape", home=tmp_path)

    assert "invalid cluster name" in caught.value.message
    assert not (tmp_path / "clusters").exists()


def test_stop_stale_state_removes_it(tmp_path):
    state = _state(tmp_path, pid=None, ticks=None)
    path = local_cluster.state_path("t", tmp_path)
    local_cluster.write_state(state, path)

    result = local_cluster.stop("t", home=tmp_path, timeout=1)

    assert result.stopped == []
    assert not path.exists()
    assert list((tmp_path / "clusters").glob("*.lock")) == []


def test_wipe_stopped_cluster(tmp_path):
    state = _state(tmp_path, pid=None, ticks=None)
    local_cluster.write_state(state, local_cluster.state_path("t", tmp_path))

    removed = local_cluster.wipe("t", home=tmp_path)

    assert removed == tmp_path / "clusters" / "t"
    assert not removed.exists()
    assert list((tmp_path / "clusters").iterdir()) == []


def _blocked_flock_inodes() -> set[int]:
    # Lines of /proc/locks for a process waiting on a lock contain "->",
    # followed by the type and "MAJOR:MINOR:INODE" of the locked file.
    inodes = set()
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        if "->" in fields and "FLOCK" in fields:
            inodes.add(int(fields[fields.index("->") + 5].rsplit(":", 1)[1]))
    return inodes


def test_lock_waiter_relocks_recreated_file(tmp_path):
    # A process that waits while the holder deletes the lock file must not
    # go on holding a lock on the deleted file, because a third process
    # could then lock a new file of the same name at the same time.
    lock_path = tmp_path / "clusters" / "t.lock"
    holder_inside = threading.Event()
    release_holder = threading.Event()
    waiter_saw: list[bool] = []

    def hold() -> None:
        with local_cluster._cluster_lock("t", tmp_path):
            holder_inside.set()
            release_holder.wait()

    def wait_for_lock() -> None:
        with local_cluster._cluster_lock("t", tmp_path):
            waiter_saw.append(lock_path.exists())

    holder = threading.Thread(target=hold)
    holder.start()
    holder_inside.wait()
    held_inode = lock_path.stat().st_ino
    waiter = threading.Thread(target=wait_for_lock)
    waiter.start()
    deadline = time.monotonic() + 30
    while held_inode not in _blocked_flock_inodes():
        if time.monotonic() > deadline:
            release_holder.set()
            pytest.fail("the second thread never blocked on the lock")
        time.sleep(0.01)
    release_holder.set()
    holder.join()
    waiter.join()

    assert waiter_saw == [True]
    assert not lock_path.exists()


# --------------------------------------------------------------------------
# CLI


def test_cli_status_without_cluster(tmp_path, monkeypatch):
    monkeypatch.setenv("ESFM_HOME", str(tmp_path))

    result = CliRunner().invoke(cluster_group, ["status", "--name", "nothing"])

    assert result.exit_code == 1
    assert "no local cluster named 'nothing'" in result.output
    assert "esfm cluster start" in result.output


def test_cli_start_invalid_nodes(tmp_path, monkeypatch):
    monkeypatch.setenv("ESFM_HOME", str(tmp_path / "home"))

    result = CliRunner().invoke(cluster_group, ["start", "--nodes", "0"])

    assert result.exit_code == 1
    assert "invalid node count 0" in result.output


def test_cli_status_json_of_stopped_cluster(tmp_path, monkeypatch):
    monkeypatch.setenv("ESFM_HOME", str(tmp_path))
    state = _state(tmp_path, pid=None, ticks=None)
    state.name = "default"
    local_cluster.write_state(state, local_cluster.state_path("default", tmp_path))

    result = CliRunner().invoke(cluster_group, ["status", "--json"])
    report = json.loads(result.output)

    assert result.exit_code == 0
    assert report["running"] is False
    assert report["error"] == "no node process is running"
    assert report["nodes"][0]["running"] is False


def test_cli_stop_not_running_succeeds(tmp_path, monkeypatch):
    monkeypatch.setenv("ESFM_HOME", str(tmp_path))

    first = CliRunner().invoke(cluster_group, ["stop", "--name", "gone"])
    second = CliRunner().invoke(cluster_group, ["stop", "--name", "gone", "--wipe"])

    assert first.exit_code == 0
    assert "Local cluster gone is not running" in first.output
    assert "start one" not in first.output
    assert second.exit_code == 0
    assert "is not running" in second.output
    assert list((tmp_path / "clusters").iterdir()) == []


def test_cli_stop_invalid_name_fails(tmp_path, monkeypatch):
    monkeypatch.setenv("ESFM_HOME", str(tmp_path))

    result = CliRunner().invoke(cluster_group, ["stop", "--name", "bad/name"])

    assert result.exit_code == 1
    assert "invalid cluster name 'bad/name'" in result.output


def test_line_renderer_prints_each_message_once():
    output = io.StringIO()
    renderer = LineRenderer(Console(file=output))
    fetch = "fetching Elasticsearch 9.5.0 with mvn"
    events = [("download", fetch, size) for size in range(0, 14_000_000, 1_000_000)]
    events += [("unpack", "unpacking Elasticsearch 9.5.0", n) for n in range(14)]
    events += [("wait", "waiting for 1 node(s) to respond", 0)] * 21
    events += [("wait", "waiting for 1 node(s): health red, 1 node(s) joined", 1)]
    events += [("wait", "cluster is healthy", 1)]

    for stage, message, completed in events:
        renderer(local_cluster.ProgressEvent(stage, message, completed=completed))
    renderer.finish()

    assert output.getvalue().splitlines() == [
        fetch,
        "unpacking Elasticsearch 9.5.0",
        "waiting for 1 node(s) to respond",
        "waiting for 1 node(s): health red, 1 node(s) joined",
        "cluster is healthy",
    ]


def test_wait_progress_hides_connection_errors(tmp_path):
    # Nothing listens on the node's port, so every poll fails with
    # "Connection refused". The launcher pid is this process, so the node
    # never counts as exited and the wait ends at its timeout.
    state = _state(tmp_path, pid=None, ticks=None)
    node = state.nodes[0]
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        node.url = f"http://127.0.0.1:{probe.getsockname()[1]}"
    node.launcher_pid = os.getpid()
    node.launcher_start_ticks = local_cluster._proc_stat(os.getpid())[1]
    events: list[local_cluster.ProgressEvent] = []

    with pytest.raises(local_cluster._StartFailed) as caught:
        local_cluster._wait_until_healthy(state, [node], 1, 1.5, events.append)

    assert events
    assert {event.message for event in events} == {"waiting for 1 node(s) to respond"}
    assert "not healthy after 1.5s" in caught.value.reason
    assert "Connection refused" in caught.value.reason
