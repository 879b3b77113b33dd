"""What the connected cluster is: its version, its script languages, its health.

Also the one translation from client exceptions to ``ClusterError``, so every
command reports an unreachable or rejecting cluster the same way.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Iterator

import elasticsearch
from elasticsearch import Elasticsearch

from esfm.errors import ClusterError

logger = logging.getLogger(__name__)

SUPPORTED_MAJOR = 9


@dataclasses.dataclass(frozen=True)
class ServerInfo:
    """Version and optional modules of the connected cluster."""

    version: tuple[int, int, int]
    script_languages: frozenset[str]

    @property
    def has_mustache(self) -> bool:
        return "mustache" in self.script_languages

    @property
    def has_painless(self) -> bool:
        return "painless" in self.script_languages

    @property
    def excludes_source_vectors(self) -> bool:
        """Whether new indices leave vectors out of ``_source`` (9.2 and later)."""
        return self.version >= (9, 2, 0)

    @property
    def version_string(self) -> str:
        return ".".join(str(part) for part in self.version)


def _url_of(client: Elasticsearch) -> str:
    nodes = client.transport.node_pool.all()
    return str(nodes[0].base_url) if nodes else "the cluster"


@contextlib.contextmanager
def cluster_errors(client: Elasticsearch, action: str) -> Iterator[None]:
    """Re-raise client exceptions from ``action`` as ``ClusterError``."""
    try:
        yield
    except elasticsearch.AuthenticationException as exc:
        raise ClusterError(
            f"{action}: authentication failed at {_url_of(client)}",
            hint="check ESFM_USERNAME/ESFM_PASSWORD or ESFM_API_KEY",
        ) from exc
    except elasticsearch.AuthorizationException as exc:
        raise ClusterError(
            f"{action}: the user lacks a privilege: {exc.message}",
            hint="grant the privileges listed in docs/security.md",
        ) from exc
    except elasticsearch.ConnectionTimeout as exc:
        raise ClusterError(
            f"{action}: timed out talking to {_url_of(client)}",
            hint="check the cluster's load, or raise ESFM_REQUEST_TIMEOUT",
        ) from exc
    except elasticsearch.ConnectionError as exc:
        raise ClusterError(
            f"{action}: cannot reach Elasticsearch at {_url_of(client)}",
            hint="start a local node with `esfm cluster start`, or set ESFM_URL",
        ) from exc
    except elasticsearch.ApiError as exc:
        raise ClusterError(
            f"{action}: Elasticsearch returned {exc.meta.status}: {exc.message}"
        ) from exc


_info_cache: dict[int, ServerInfo] = {}


def server_info(client: Elasticsearch) -> ServerInfo:
    """Return the cluster's version and script languages, cached per client.

    Uses the nodes info API: the root ``GET /`` endpoint is missing from some
    distributions (the integration-test one among them).
    """
    cached = _info_cache.get(id(client))
    if cached is not None:
        return cached
    with cluster_errors(client, "reading the cluster version"):
        nodes = client.nodes.info(node_id="_local", metric="_none")["nodes"]
        languages = client.get_script_languages()
    raw_version = next(iter(nodes.values()))["version"]
    parts = tuple(int(p) for p in raw_version.split("-")[0].split(".")[:3])
    if parts[0] != SUPPORTED_MAJOR:
        raise ClusterError(
            f"Elasticsearch {raw_version} is not supported: esfm needs "
            f"{SUPPORTED_MAJOR}.x",
            hint=f"point ESFM_URL at an Elasticsearch {SUPPORTED_MAJOR} cluster",
        )
    info = ServerInfo(
        version=parts,  # type: ignore[arg-type]
        script_languages=frozenset(
            item["language"] for item in languages.get("language_contexts", [])
        ),
    )
    logger.debug(
        "cluster %s, script languages %s", raw_version, sorted(info.script_languages)
    )
    _info_cache[id(client)] = info
    return info


def wait_for_health(
    client: Elasticsearch, index: str, *, status: str = "yellow", timeout: str = "60s"
) -> None:
    """Wait until ``index`` reaches ``status`` with all primaries active."""
    with cluster_errors(client, f"waiting for index {index} to be {status}"):
        health = client.cluster.health(
            index=index,
            wait_for_status=status,
            wait_for_active_shards="all" if status == "green" else "1",
            timeout=timeout,
        )
    if health.get("timed_out") or health.get("unassigned_primary_shards", 0):
        raise ClusterError(
            f"index {index} did not reach {status} within {timeout} "
            f"(status {health.get('status')}, "
            f"{health.get('unassigned_shards', 0)} unassigned shards)",
            hint="check `esfm cluster status` and the node logs",
        )
