"""Versioned index and component templates for the indices esfm creates.

A component template contains the index settings (shards, replicas, refresh
interval) and a composable index template applies it to the ``recsys-*``
pattern, so an index created under that pattern without explicit settings
still gets them. Explicit settings in the create request win over templates
(Elasticsearch template precedence), which is why ``esfm migrate`` can still
switch refresh off during the bulk load and override shards or replicas.

Each definition has a version and a SHA-256 checksum of its canonical JSON.
Pushing stores both on the cluster, in the template's own ``version`` field
and in ``_meta.esfm.checksum``, so :func:`template_drift` can report a
definition that is newer than the cluster's, edited without a version bump,
or changed by hand on the cluster.

A project may replace the built-in definitions with an ``index_templates/``
folder of JSON files, each ``{"kind": "component" | "index", "name": ...,
"version": N, "body": {...}}``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import elasticsearch
from elasticsearch import Elasticsearch

from esfm.errors import MappingError
from esfm.server import cluster_errors

logger = logging.getLogger(__name__)

KIND_COMPONENT = "component"
KIND_INDEX = "index"
DEFAULT_PATTERN = "recsys-*"
DEFAULT_NAME = "esfm-recsys"


@dataclasses.dataclass(frozen=True)
class TemplateDefinition:
    """One component or index template as esfm wants it on the cluster.

    ``body`` is the request body without ``version`` and ``_meta``: for a
    component template ``{"template": {...}}``, for an index template
    ``{"index_patterns": [...], "composed_of": [...], "priority": N}``.
    """

    kind: str
    name: str
    version: int
    body: dict[str, Any]

    @property
    def checksum(self) -> str:
        canonical = json.dumps(
            {
                "kind": self.kind,
                "name": self.name,
                "version": self.version,
                **self.body,
            },
            sort_keys=True,
            separators=(",", ":"),
        )
        return hashlib.sha256(canonical.encode()).hexdigest()


@dataclasses.dataclass(frozen=True)
class PushOutcome:
    """Result of pushing one definition: ``created``, ``updated`` or ``unchanged``."""

    kind: str
    name: str
    version: int
    status: str


def default_definitions(
    pattern: str = DEFAULT_PATTERN, name: str = DEFAULT_NAME
) -> list[TemplateDefinition]:
    """Return the built-in component and index template for ``pattern``."""
    component = TemplateDefinition(
        kind=KIND_COMPONENT,
        name=f"{name}-settings",
        version=1,
        body={
            "template": {
                "settings": {
                    "number_of_shards": 1,
                    "number_of_replicas": 1,
                    # The value after the bulk load: esfm creates its indices
                    # with refresh_interval -1 and restores the mapping file's
                    # value (default 1s) when the load is complete.
                    "refresh_interval": "1s",
                }
            }
        },
    )
    index = TemplateDefinition(
        kind=KIND_INDEX,
        name=name,
        version=1,
        body={
            "index_patterns": [pattern],
            "composed_of": [component.name],
            "priority": 200,
        },
    )
    return [component, index]


def load_definitions(project_root: Path | None = None) -> list[TemplateDefinition]:
    """Load ``<project>/index_templates/*.json``, or the built-in definitions.

    Raises:
        MappingError: a file is not valid JSON or lacks a key.
    """
    folder = project_root / "index_templates" if project_root else None
    if folder is None or not folder.is_dir():
        return default_definitions()
    definitions = []
    for path in sorted(folder.glob("*.json")):
        try:
            document = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise MappingError(f"invalid JSON in {str(path)!r}: {exc}") from exc
        missing = [
            key for key in ("kind", "name", "version", "body") if key not in document
        ]
        if missing:
            raise MappingError(f"{path}: missing key(s) {', '.join(missing)}")
        if document["kind"] not in (KIND_COMPONENT, KIND_INDEX):
            raise MappingError(
                f"{path}: kind is {document['kind']!r}",
                hint=f"use {KIND_COMPONENT!r} or {KIND_INDEX!r}",
            )
        version = document["version"]
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise MappingError(f"{path}: version {version!r} is not a positive integer")
        definitions.append(
            TemplateDefinition(
                document["kind"], document["name"], version, document["body"]
            )
        )
    # Component templates first: an index template may only name existing ones.
    definitions.sort(key=lambda item: item.kind != KIND_COMPONENT)
    return definitions


def read_live(client: Elasticsearch, definition: TemplateDefinition) -> dict | None:
    """Return the cluster's copy of the template, or None when it is missing."""
    with cluster_errors(
        client, f"reading {definition.kind} template {definition.name}"
    ):
        try:
            if definition.kind == KIND_COMPONENT:
                response = client.cluster.get_component_template(name=definition.name)
                return dict(response["component_templates"][0]["component_template"])
            response = client.indices.get_index_template(name=definition.name)
            return dict(response["index_templates"][0]["index_template"])
        except elasticsearch.NotFoundError:
            return None


def _flat_settings(settings: dict[str, Any], prefix: str = "") -> dict[str, str]:
    flat: dict[str, str] = {}
    for key, value in settings.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flat_settings(value, f"{name}."))
        else:
            flat[name.removeprefix("index.")] = str(value).lower()
    return flat


def body_differences(definition: TemplateDefinition, live: dict[str, Any]) -> list[str]:
    """Return the keys where the cluster's template differs from ``definition``."""
    differences: list[str] = []
    wanted_template = definition.body.get("template", {})
    live_template = live.get("template", {})
    wanted = _flat_settings(wanted_template.get("settings", {}))
    have = _flat_settings(live_template.get("settings", {}))
    for key in sorted(set(wanted) | set(have)):
        if wanted.get(key) != have.get(key):
            differences.append(f"template.settings.{key}")
    for key in ("mappings", "aliases"):
        if wanted_template.get(key, {}) != live_template.get(key, {}):
            differences.append(f"template.{key}")
    for key in ("index_patterns", "composed_of", "priority"):
        if definition.body.get(key) != live.get(key):
            differences.append(key)
    return differences


def template_drift(
    client: Elasticsearch, definitions: list[TemplateDefinition]
) -> list[str]:
    """Return one sentence per definition that the cluster does not match."""
    findings: list[str] = []
    for definition in definitions:
        label = f"{definition.kind} template {definition.name}"
        live = read_live(client, definition)
        if live is None:
            findings.append(f"{label} v{definition.version} is not pushed")
            continue
        live_version = live.get("version")
        checksum = live.get("_meta", {}).get("esfm", {}).get("checksum")
        if live_version != definition.version:
            findings.append(
                f"{label}: cluster has v{live_version}, the definition is "
                f"v{definition.version}; run esfm index-templates push"
            )
        elif checksum != definition.checksum:
            findings.append(
                f"{label} v{definition.version} was edited after it was pushed "
                "(checksum differs); give it a new version and push"
            )
        differences = body_differences(definition, live)
        if differences and live_version == definition.version:
            findings.append(
                f"{label} was changed on the cluster: {', '.join(differences)}"
            )
    return findings


def push_definitions(
    client: Elasticsearch, definitions: list[TemplateDefinition]
) -> list[PushOutcome]:
    """Put every definition whose version or checksum differs from the cluster's.

    Raises:
        MappingError: the cluster has a newer version than the definition, so
            pushing would downgrade it.
    """
    outcomes: list[PushOutcome] = []
    for definition in definitions:
        live = read_live(client, definition)
        status = "created"
        if live is not None:
            live_version = live.get("version") or 0
            checksum = live.get("_meta", {}).get("esfm", {}).get("checksum")
            unchanged = body_differences(definition, live) == []
            if live_version > definition.version:
                raise MappingError(
                    f"{definition.kind} template {definition.name} is v{live_version} "
                    f"on the cluster, newer than the definition v{definition.version}",
                    hint="update the definition files, or delete the template by hand",
                )
            if (
                live_version == definition.version
                and checksum == definition.checksum
                and unchanged
            ):
                outcomes.append(
                    PushOutcome(
                        definition.kind,
                        definition.name,
                        definition.version,
                        "unchanged",
                    )
                )
                continue
            status = "updated"
        _put(client, definition)
        logger.info(
            "%s %s template %s v%s",
            status,
            definition.kind,
            definition.name,
            definition.version,
        )
        outcomes.append(
            PushOutcome(definition.kind, definition.name, definition.version, status)
        )
    return outcomes


def _put(client: Elasticsearch, definition: TemplateDefinition) -> None:
    meta = {"esfm": {"checksum": definition.checksum, "managed_by": "esfm"}}
    with cluster_errors(
        client, f"putting {definition.kind} template {definition.name}"
    ):
        if definition.kind == KIND_COMPONENT:
            client.cluster.put_component_template(
                name=definition.name,
                template=definition.body.get("template", {}),
                version=definition.version,
                meta=meta,
            )
        else:
            client.indices.put_index_template(
                name=definition.name,
                version=definition.version,
                meta=meta,
                **definition.body,
            )
