"""The migration history index: one document per alias move esfm made."""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any

from elasticsearch import Elasticsearch

from esfm.server import cluster_errors, ensure_system_index

logger = logging.getLogger(__name__)

HISTORY_INDEX = "esfm-history"
HISTORY_MAPPINGS = {
    "dynamic": "strict",
    "properties": {
        "alias": {"type": "keyword"},
        "index": {"type": "keyword"},
        "previous_index": {"type": "keyword"},
        "action": {"type": "keyword"},
        "model_id": {"type": "keyword"},
        "mapping_name": {"type": "keyword"},
        "mapping_version": {"type": "integer"},
        "mapping_checksum": {"type": "keyword"},
        "at": {"type": "date"},
    },
}


def ensure_history_index(client: Elasticsearch) -> None:
    ensure_system_index(client, HISTORY_INDEX, HISTORY_MAPPINGS)


def record(
    client: Elasticsearch,
    *,
    alias: str,
    index: str,
    previous_index: str | None,
    action: str,
    meta: dict[str, Any],
) -> None:
    """Append one alias move to the history."""
    ensure_history_index(client)
    document = {
        "alias": alias,
        "index": index,
        "previous_index": previous_index,
        "action": action,
        "model_id": meta.get("model_id"),
        "mapping_name": meta.get("mapping_name"),
        "mapping_version": meta.get("mapping_version"),
        "mapping_checksum": meta.get("mapping_checksum"),
        "at": dt.datetime.now(dt.UTC).isoformat(),
    }
    with cluster_errors(client, f"recording history for alias {alias}"):
        client.index(index=HISTORY_INDEX, document=document, refresh="wait_for")


def entries(client: Elasticsearch, alias: str, size: int = 100) -> list[dict]:
    """Return the alias's history, newest first."""
    with cluster_errors(client, f"reading history for alias {alias}"):
        if not client.indices.exists(index=HISTORY_INDEX):
            return []
        response = client.search(
            index=HISTORY_INDEX,
            query={"term": {"alias": alias}},
            sort=[{"at": "desc"}],
            size=size,
        )
    return [hit["_source"] for hit in response["hits"]["hits"]]
