"""Facts about the connected cluster: its version, script languages and health.

Also the one translation from client exceptions to ``ClusterError``, so every
command reports an unreachable or rejecting cluster the same way.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import re
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


def _error_type(exc: elasticsearch.ApiError) -> str:
    # The type of the first root cause, such as "cluster_block_exception";
    # an empty string when the body has no error object.
    body = exc.body if isinstance(exc.body, dict) else {}
    error = body.get("error")
    if not isinstance(error, dict):
        return ""
    causes = error.get("root_cause") or [error]
    first = causes[0] if isinstance(causes[0], dict) else error
    return str(first.get("type") or error.get("type") or "")


def _error_text(exc: elasticsearch.ApiError) -> str:
    return str(exc.body if exc.body is not None else exc.message)


def translate_error(exc: Exception, action: str, url: str) -> ClusterError:
    """Return a ``ClusterError`` that names what failed and what to do next.

    Handles authentication (wrong credentials, expired API key), TLS
    (certificate or fingerprint mismatch), authorization (missing privilege),
    connection failures and timeouts, read-only indices and missing aliases.
    The message carries the server's reason but never the request headers,
    so no credential reaches it.
    """
    if isinstance(exc, elasticsearch.AuthenticationException):
        return _authentication_error(exc, action, url)
    if isinstance(exc, elasticsearch.UnsupportedProductError):
        return ClusterError(
            f"{action}: the server at {url} is not Elasticsearch (the "
            "X-Elastic-Product header is missing)",
            hint=f"point ESFM_URL at an Elasticsearch {SUPPORTED_MAJOR}.x cluster",
        )
    if isinstance(exc, elasticsearch.ApiError):
        if _error_type(exc) == "cluster_block_exception":
            return _block_error(exc, action)
        if isinstance(exc, elasticsearch.AuthorizationException):
            return _authorization_error(exc, action)
        if isinstance(exc, elasticsearch.NotFoundError):
            return _not_found_error(exc, action)
        return ClusterError(
            f"{action}: Elasticsearch returned {exc.meta.status}: {exc.message}",
            hint="read the reason above; -vv logs each request",
        )
    if isinstance(exc, elasticsearch.SSLError):
        return _tls_error(exc, action, url)
    if isinstance(exc, elasticsearch.ConnectionTimeout):
        return ClusterError(
            f"{action}: timed out waiting for Elasticsearch at {url}",
            hint="check that the URL is an Elasticsearch HTTP port and the "
            "cluster is not overloaded, or raise ESFM_REQUEST_TIMEOUT (seconds)",
        )
    if isinstance(exc, elasticsearch.ConnectionError):
        return ClusterError(
            f"{action}: cannot reach Elasticsearch at {url}",
            hint="check ESFM_URL or --url, or start a local node with "
            "`esfm cluster start`",
        )
    return ClusterError(
        f"{action}: unexpected {type(exc).__name__} from Elasticsearch at {url}",
        hint="rerun with -vv to log each request",
    )


def _authentication_error(
    exc: elasticsearch.AuthenticationException, action: str, url: str
) -> ClusterError:
    text = _error_text(exc)
    if "expired" in text.lower() and "api key" in text.lower():
        return ClusterError(
            f"{action}: the API key was rejected by {url} because it has expired",
            hint="create a new API key and set it in ESFM_API_KEY",
        )
    if "token" in text.lower() and "expired" in text.lower():
        return ClusterError(
            f"{action}: the bearer token was rejected by {url} because it has expired",
            hint="obtain a new token and set it in ESFM_BEARER_TOKEN",
        )
    return ClusterError(
        f"{action}: authentication failed at {url} (wrong or missing credentials)",
        hint="check ESFM_USERNAME and ESFM_PASSWORD, ESFM_API_KEY or "
        "ESFM_BEARER_TOKEN (or the [connection] table of the config file)",
    )


def _authorization_error(
    exc: elasticsearch.AuthorizationException, action: str
) -> ClusterError:
    return ClusterError(
        f"{action}: the user lacks a privilege: {exc.message}",
        hint="grant the cluster and index privileges listed in docs/security.md "
        "for this command",
    )


def _block_error(exc: elasticsearch.ApiError, action: str) -> ClusterError:
    reason = exc.message
    body = exc.body if isinstance(exc.body, dict) else {}
    error = body.get("error")
    if isinstance(error, dict) and error.get("reason"):
        reason = str(error["reason"])
    match = re.search(r"index \[([^\]]+)\]", reason)
    index = match.group(1) if match else "the index"
    if "read-only-allow-delete" in reason or "read_only_allow_delete" in reason:
        hint = (
            "free disk space on the data nodes (the flood-stage disk watermark "
            "sets this block), then remove it with PUT "
            f'{index}/_settings {{"index.blocks.read_only_allow_delete": null}}'
        )
    else:
        hint = f"remove the block from {index} (GET {index}/_settings shows it)"
    return ClusterError(f"{action}: {index} is read-only: {reason}", hint=hint)


def _not_found_error(exc: elasticsearch.NotFoundError, action: str) -> ClusterError:
    text = _error_text(exc)
    match = re.search(r"alias \[([^\]]+)\] missing", text)
    if match:
        return ClusterError(
            f"{action}: alias {match.group(1)!r} does not exist",
            hint="check --alias, or create it with `esfm migrate --model DIR "
            f"--alias {match.group(1)}`",
        )
    return ClusterError(
        f"{action}: not found: {exc.message}",
        hint="check the alias or index name; `esfm status` shows the alias",
    )


def _tls_error(exc: elasticsearch.SSLError, action: str, url: str) -> ClusterError:
    text = str(exc)
    if "Fingerprints did not match" in text:
        return ClusterError(
            f"{action}: the certificate of {url} does not match the pinned "
            "SHA-256 fingerprint",
            hint="check --ssl-fingerprint or ESFM_SSL_FINGERPRINT against the "
            "server certificate (openssl x509 -noout -fingerprint -sha256)",
        )
    if "CERTIFICATE_VERIFY_FAILED" in text or "verify failed" in text:
        return ClusterError(
            f"{action}: the certificate of {url} is not signed by a trusted CA "
            "or does not name this host",
            hint="pass the cluster's CA file with --ca-certs or ESFM_CA_CERTS, "
            "or pin its fingerprint with --ssl-fingerprint",
        )
    return ClusterError(
        f"{action}: the TLS handshake with {url} failed",
        hint="check that the URL uses https:// for a TLS port and http:// otherwise",
    )


@contextlib.contextmanager
def cluster_errors(client: Elasticsearch, action: str) -> Iterator[None]:
    """Re-raise client exceptions from ``action`` as ``ClusterError``."""
    try:
        yield
    except (elasticsearch.ApiError, elasticsearch.TransportError) as exc:
        raise translate_error(exc, action, _url_of(client)) from exc


_info_cache: dict[int, ServerInfo] = {}


def _parse_version(raw_version: str) -> tuple[int, int, int] | None:
    match = re.match(r"^([0-9]+)\.([0-9]+)\.([0-9]+)", raw_version)
    if match is None:
        return None
    return int(match.group(1)), int(match.group(2)), int(match.group(3))


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
    raw_version = str(next(iter(nodes.values()), {}).get("version", ""))
    parts = _parse_version(raw_version)
    if parts is None or parts[0] != SUPPORTED_MAJOR:
        raise ClusterError(
            f"Elasticsearch {raw_version or '(no version)'} at {_url_of(client)} "
            f"is not supported: esfm needs {SUPPORTED_MAJOR}.x",
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


def ensure_system_index(
    client: Elasticsearch, index: str, mappings: dict | None = None
) -> None:
    """Create one of esfm's own small indices if it is missing.

    ``auto_expand_replicas: 0-1`` keeps a single-node cluster green while a
    multi-node cluster still gets a replica.
    """
    with cluster_errors(client, f"creating {index}"):
        if client.indices.exists(index=index):
            return
        try:
            client.indices.create(
                index=index,
                mappings=mappings,
                settings={"number_of_shards": 1, "auto_expand_replicas": "0-1"},
            )
        except elasticsearch.BadRequestError as exc:
            if exc.error != "resource_already_exists_exception":
                raise
