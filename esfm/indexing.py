"""Creating a versioned index and bulk loading a model's documents into it."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from elasticsearch import Elasticsearch, helpers

from esfm.errors import MigrationError
from esfm.server import cluster_errors

logger = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int], None]
"""Called as ``on_progress(done, total)`` after each bulk chunk."""

DEFAULT_CHUNK_SIZE = 500
# Item and whole-request statuses that a bulk chunk is retried on: rejection
# (429) and the gateway or unavailable errors of a node that is restarting or
# gone. Other statuses, such as 400 for a bad document, are not transient.
RETRY_ON_STATUS = (429, 502, 503, 504)

STATE_BUILDING = "building"
STATE_COMPLETE = "complete"


@dataclasses.dataclass(frozen=True)
class BulkItemError:
    """One document the cluster did not index."""

    doc_id: str
    status: int
    reason: str


@dataclasses.dataclass
class BulkResult:
    """Counts from one bulk load."""

    indexed: int = 0
    errors: list[BulkItemError] = dataclasses.field(default_factory=list)


def create_index(
    client: Elasticsearch,
    index: str,
    *,
    mappings: dict[str, Any],
    settings: dict[str, Any],
    meta: dict[str, Any],
) -> None:
    """Create ``index`` with refresh off; ``_meta.esfm.state`` starts as building."""
    body_mappings = dict(mappings)
    body_mappings["_meta"] = {"esfm": {**meta, "state": STATE_BUILDING}}
    index_settings = dict(settings)
    # Refresh is off during the bulk load and switched back on afterwards.
    index_settings["refresh_interval"] = "-1"
    logger.info("creating index %s (mapping v%s)", index, meta.get("mapping_version"))
    with cluster_errors(client, f"creating index {index}"):
        client.indices.create(
            index=index, mappings=body_mappings, settings=index_settings
        )


def stream_bulk(
    client: Elasticsearch,
    index: str,
    documents: Iterable[dict[str, Any]],
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    max_retries: int = 5,
    initial_backoff: float = 1.0,
    timeout: str | None = None,
) -> Iterator[tuple[bool, dict[str, Any]]]:
    """Yield ``(ok, item)`` per document, retrying 429 and 5xx with backoff.

    Failed items with a status in ``RETRY_ON_STATUS`` are sent again after
    ``initial_backoff * 2**attempt`` seconds, up to ``max_retries`` times. A
    whole chunk rejected with such a status is retried the same way, because
    ``streaming_bulk`` with ``raise_on_exception=False`` turns it into one
    failed item per document. Connection errors are retried by the transport
    (``retry_on_timeout`` and ``max_retries`` of the client). Documents carry
    their ``_id``, so a retried chunk overwrites and never duplicates.

    Args:
        timeout: bulk ``timeout`` parameter: how long each item waits for an
            unavailable primary shard before it fails with 503.
    """
    actions = (
        {"_op_type": "index", "_index": index, **document} for document in documents
    )
    yield from helpers.streaming_bulk(
        client,
        actions,
        chunk_size=chunk_size,
        max_retries=max_retries,
        initial_backoff=initial_backoff,
        raise_on_error=False,
        raise_on_exception=False,
        retry_on_status=RETRY_ON_STATUS,
        **({"timeout": timeout} if timeout else {}),
    )


def bulk_load(
    client: Elasticsearch,
    index: str,
    documents: Iterable[dict[str, Any]],
    *,
    total: int,
    on_progress: ProgressCallback | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    max_retries: int = 5,
    initial_backoff: float = 1.0,
    timeout: str | None = None,
) -> BulkResult:
    """Index all documents and check every item's result.

    Loading stops after the first chunk with a failed item, because the index
    is rebuilt anyway and a lost shard would otherwise cost every later chunk
    its full retry time.

    Raises:
        MigrationError: any item failed (a bulk response of HTTP 200 with
            ``errors: true`` counts as failure); ``.failures`` lists them and
            ``.not_sent`` counts the documents never sent.
    """
    result = BulkResult()
    done = 0
    with cluster_errors(client, f"bulk loading {index}"):
        for ok, item in stream_bulk(
            client,
            index,
            documents,
            chunk_size=chunk_size,
            max_retries=max_retries,
            initial_backoff=initial_backoff,
            timeout=timeout,
        ):
            done += 1
            if ok:
                result.indexed += 1
            else:
                detail = next(iter(item.values()))
                result.errors.append(
                    BulkItemError(
                        doc_id=str(detail.get("_id")),
                        status=int(detail.get("status", 0)),
                        reason=str(detail.get("error", detail.get("exception"))),
                    )
                )
            chunk_done = done % chunk_size == 0 or done == total
            if on_progress and chunk_done:
                on_progress(done, total)
            if result.errors and chunk_done:
                break
    if on_progress and done != total and not result.errors:
        on_progress(done, total)

    if result.errors:
        first = result.errors[0]
        not_sent = max(0, total - done)
        stopped = f"; stopped early, {not_sent} not sent" if not_sent else ""
        error = MigrationError(
            f"{len(result.errors)} of {done} documents failed to index into {index}"
            f"{stopped}; first: {first.doc_id} ({first.status}) {first.reason[:300]}",
            hint="the alias was not moved; fix the cause and rerun esfm migrate",
        )
        error.failures = result.errors  # type: ignore[attr-defined]
        error.not_sent = not_sent  # type: ignore[attr-defined]
        logger.error(
            "bulk load into %s failed: %d failed items, %d not sent",
            index,
            len(result.errors),
            not_sent,
        )
        raise error
    logger.info("indexed %d documents into %s", result.indexed, index)
    return result


def finish_index(
    client: Elasticsearch, index: str, meta: dict[str, Any], refresh_interval: str
) -> None:
    """Restore refresh, refresh, and mark the index complete in ``_meta``."""
    with cluster_errors(client, f"finishing index {index}"):
        client.indices.put_settings(
            index=index, settings={"refresh_interval": refresh_interval}
        )
        client.indices.refresh(index=index)
        client.indices.put_mapping(
            index=index, meta={"esfm": {**meta, "state": STATE_COMPLETE}}
        )
    logger.info("index %s marked complete", index)


def read_meta(client: Elasticsearch, index: str) -> dict[str, Any]:
    """Return ``_meta.esfm`` of ``index``, or an empty dict for a foreign index."""
    with cluster_errors(client, f"reading the mapping of {index}"):
        response = client.indices.get_mapping(index=index)
    mapping = response[index]["mappings"]
    return dict(mapping.get("_meta", {}).get("esfm", {}))
