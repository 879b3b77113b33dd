"""Fixtures that give integration tests a real Elasticsearch node.

``es_url`` takes the first node it can get:

1. the cluster at ``$ESFM_TEST_URL``;
2. a Docker container of the official image, when a Docker daemon responds;
3. a local cluster started with :func:`esfm.cluster.start`, stopped at the
   end of the session.

If none works, the fixture fails with the reason for each. Integration tests
are skipped only when ``ESFM_SKIP_INTEGRATION=1`` is set.

Local clusters keep their state in a temporary ``ESFM_HOME`` but take the
distribution from the user's cache (:func:`esfm.cluster.default_cache_dir`),
so it is fetched once across sessions.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from esfm import cluster as local_cluster
from esfm.config import create_client, resolve_settings
from esfm.errors import EsfmError

INTEGRATION_DIR = Path(__file__).resolve().parent
DOCKER_IMAGE = "docker.elastic.co/elasticsearch/elasticsearch:9.5.0"
HEALTH_TIMEOUT_S = 180
MULTI_NODE_HEAP = "512m"


def pytest_collection_modifyitems(
    config: pytest.Config, items: list[pytest.Item]
) -> None:
    """Mark every test under tests/integration as ``integration``.

    This hook receives the items of the whole session, so it filters by path.
    """
    skip = os.environ.get("ESFM_SKIP_INTEGRATION") == "1"
    for item in items:
        if INTEGRATION_DIR not in Path(item.path).resolve().parents:
            continue
        item.add_marker(pytest.mark.integration)
        if skip:
            item.add_marker(pytest.mark.skip(reason="ESFM_SKIP_INTEGRATION=1 is set"))


@dataclasses.dataclass(frozen=True)
class LocalCluster:
    """A local cluster started by a fixture, with the home that contains its state."""

    name: str
    home: Path
    url: str
    nodes: int


@pytest.fixture(scope="session")
def esfm_test_home() -> Iterator[Path]:
    """Temporary ``ESFM_HOME`` for the cluster state of this session."""
    home = Path(tempfile.mkdtemp(prefix="esfm-pytest-"))
    # When the tests run as root, the nodes run as an unprivileged account,
    # which must be able to enter this directory.
    os.chmod(home, 0o755)
    yield home
    shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="session")
def es_cache_dir() -> Path:
    """The user's distribution cache, shared across test sessions."""
    return local_cluster.default_cache_dir()


def _wait_for_health(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last_error = "no answer"
    while time.monotonic() < deadline:
        try:
            health = local_cluster.cluster_health(
                url, wait_for_status="yellow", timeout="1s"
            )
        except (OSError, ValueError) as exc:
            last_error = str(exc)
        else:
            if not health.get("timed_out"):
                return
            last_error = f"health is {health.get('status')}"
        time.sleep(1)
    raise TimeoutError(f"{url} not healthy after {timeout}s: {last_error}")


def _docker_unavailable_reason() -> str | None:
    try:
        import docker
    except ImportError:
        return "the docker package is not installed"
    try:
        docker.from_env().ping()
    except Exception as exc:  # docker raises several unrelated types here
        return f"no Docker daemon responds ({type(exc).__name__})"
    return None


def _start_container(request: pytest.FixtureRequest) -> str:
    # testcontainers' ElasticSearchContainer rejects 9.x image tags, so this
    # configures a plain container.
    from testcontainers.core.container import DockerContainer

    container = (
        DockerContainer(DOCKER_IMAGE)
        .with_env("discovery.type", "single-node")
        .with_env("xpack.security.enabled", "false")
        .with_env("ES_JAVA_OPTS", "-Xms1g -Xmx1g")
        .with_exposed_ports(9200)
    )
    container.start()
    request.addfinalizer(container.stop)
    host = container.get_container_host_ip()
    url = f"http://{host}:{container.get_exposed_port(9200)}"
    _wait_for_health(url, HEALTH_TIMEOUT_S)
    return url


def _start_local(
    request: pytest.FixtureRequest,
    name: str,
    nodes: int,
    home: Path,
    cache_dir: Path,
    heap: str | None = None,
) -> LocalCluster:
    state = local_cluster.start(
        name=name,
        nodes=nodes,
        heap=heap,
        http_port=local_cluster.find_free_http_port(nodes),
        home=home,
        cache_dir=cache_dir,
        wait_timeout=HEALTH_TIMEOUT_S,
    )
    request.addfinalizer(lambda: local_cluster.stop(name, home=home))
    return LocalCluster(name=name, home=home, url=state.url, nodes=nodes)


@pytest.fixture(scope="session")
def es_url(
    request: pytest.FixtureRequest, esfm_test_home: Path, es_cache_dir: Path
) -> str:
    """URL of a real, healthy Elasticsearch node for the whole session."""
    test_url = os.environ.get("ESFM_TEST_URL")
    if test_url:
        try:
            _wait_for_health(test_url, 30)
        except TimeoutError as exc:
            pytest.fail(f"ESFM_TEST_URL={test_url} is not usable: {exc}")
        return test_url

    docker_reason = _docker_unavailable_reason()
    if docker_reason is None:
        try:
            return _start_container(request)
        except Exception as exc:  # fall back to a local node, keeping the reason
            docker_reason = f"the Docker container failed: {exc}"

    try:
        started = _start_local(
            request, f"pytest-{os.getpid()}", 1, esfm_test_home, es_cache_dir
        )
    except EsfmError as exc:
        pytest.fail(
            "no Elasticsearch node for integration tests: ESFM_TEST_URL is unset; "
            f"Docker: {docker_reason}; local cluster: {exc}\n"
            "Set ESFM_SKIP_INTEGRATION=1 to skip these tests.",
            pytrace=False,
        )
    return started.url


@pytest.fixture(scope="session")
def es_client(es_url: str):
    """An ``Elasticsearch`` client for :func:`es_url`, built by esfm.config."""
    client = create_client(resolve_settings(url=es_url))
    yield client
    client.close()


@pytest.fixture(scope="session")
def es_cluster_3(
    request: pytest.FixtureRequest, esfm_test_home: Path, es_cache_dir: Path
) -> LocalCluster:
    """A local three-node cluster, started on first use and stopped at session end.

    Always local, even when ``ESFM_TEST_URL`` is set, because fault tests stop
    and start its nodes.
    """
    try:
        return _start_local(
            request,
            f"pytest-{os.getpid()}-3n",
            3,
            esfm_test_home,
            es_cache_dir,
            heap=MULTI_NODE_HEAP,
        )
    except EsfmError as exc:
        pytest.fail(f"cannot start the three-node local cluster: {exc}", pytrace=False)


@pytest.fixture
def unique_prefix() -> str:
    """A lowercase index and alias prefix that no other test uses."""
    return f"esfm-test-{uuid.uuid4().hex[:12]}-"
