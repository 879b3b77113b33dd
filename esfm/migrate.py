"""Plan, then apply, the migration of a model into a new versioned index.

``plan_migration`` only reads from the cluster and returns the steps;
``apply_migration`` runs them under the migration lock: create the index,
bulk load, mark it complete, validate it against the model, and only then
move the alias with a compare-and-swap. A failure at any step leaves the
alias on the previous, complete index.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import re
from collections.abc import Callable
from typing import Any

from elasticsearch import Elasticsearch

from esfm import aliases, documents, history, indexing, lock
from esfm.artifacts import TrainedModel
from esfm.errors import MigrationError
from esfm.mappings import MappingVersion
from esfm.server import cluster_errors, wait_for_health

logger = logging.getLogger(__name__)

INDEX_NAME_INVALID = re.compile(r"[^a-z0-9_.-]")

# What an existing index with the planned name is, as seen by the planner.
EXISTING_NONE = "none"
EXISTING_LIVE = "live"
EXISTING_COMPLETE = "complete"
EXISTING_PARTIAL = "partial"


def index_name(alias: str, mapping_version: int, model_id: str) -> str:
    """Return ``<alias>-v<version>-<model id>``, lowercased for Elasticsearch."""
    return INDEX_NAME_INVALID.sub("-", f"{alias}-v{mapping_version}-{model_id}".lower())


@dataclasses.dataclass
class MigrationPlan:
    """Steps that ``apply_migration`` will take; nothing is sent while planning."""

    alias: str
    mapping: MappingVersion
    model_id: str
    model_path: str
    index: str
    doc_count: int
    current_index: str | None
    existing: str
    settings: dict[str, Any]
    steps: list[str]

    def to_dict(self) -> dict[str, Any]:
        return {
            "alias": self.alias,
            "mapping": self.mapping.name,
            "mapping_version": self.mapping.version,
            "mapping_checksum": self.mapping.checksum,
            "model_id": self.model_id,
            "model_path": self.model_path,
            "index": self.index,
            "documents": self.doc_count,
            "current_index": self.current_index,
            "existing": self.existing,
            "settings": self.settings,
            "steps": self.steps,
        }


@dataclasses.dataclass
class MigrationResult:
    """What ``apply_migration`` did."""

    alias: str
    index: str
    previous_index: str | None
    action: str
    indexed: int
    validation: Any = None


def _index_meta(plan: MigrationPlan, model: TrainedModel) -> dict[str, Any]:
    return {
        "mapping_name": plan.mapping.name,
        "mapping_version": plan.mapping.version,
        "mapping_checksum": plan.mapping.checksum,
        "model_id": plan.model_id,
        "k": model.k,
        "doc_count": plan.doc_count,
        "max_rank_vector_norm": documents.max_rank_vector_norm(model),
        "created": dt.datetime.now(dt.UTC).isoformat(),
    }


def plan_migration(
    client: Elasticsearch,
    model: TrainedModel,
    mapping: MappingVersion,
    *,
    alias: str = "recsys",
    model_path: str = "",
    replicas: int | None = None,
    shards: int | None = None,
) -> MigrationPlan:
    """Work out what migrating ``model`` behind ``alias`` needs; read-only."""
    mapping.render(model.k)  # reject a dims mismatch before any cluster call
    index = index_name(alias, mapping.version, model.model_id)
    settings = dict(mapping.settings)
    if replicas is not None:
        settings["number_of_replicas"] = replicas
    if shards is not None:
        settings["number_of_shards"] = shards

    current = aliases.alias_target(client, alias)
    with cluster_errors(client, f"checking index {index}"):
        exists = bool(client.indices.exists(index=index))
    existing = EXISTING_NONE
    if exists:
        meta = indexing.read_meta(client, index)
        if current == index:
            existing = EXISTING_LIVE
        elif meta.get("state") == indexing.STATE_COMPLETE:
            existing = EXISTING_COMPLETE
        else:
            existing = EXISTING_PARTIAL

    count = documents.count_documents(model)
    steps: list[str] = []
    if existing == EXISTING_LIVE:
        steps.append(f"nothing to do: alias {alias} already points at {index}")
    else:
        steps.append(f"take lock migrate:{alias}")
        if existing == EXISTING_PARTIAL:
            steps.append(f"delete the half-built index {index} left by an earlier run")
        if existing != EXISTING_COMPLETE:
            steps.append(
                f"create index {index} with mapping {mapping.name} v{mapping.version} "
                f"(shards {settings.get('number_of_shards', 1)}, "
                f"replicas {settings.get('number_of_replicas', 1)})"
            )
            steps.append(f"load {count} documents from model {model.model_id}")
            steps.append(f"mark {index} complete")
        else:
            steps.append(f"reuse the complete index {index} from an earlier run")
        steps.append(f"validate {index} against model {model.model_id}")
        steps.append(f"move alias {alias} from {current or '(none)'} to {index}")
        steps.append("record the move in esfm-history; delete nothing")
    return MigrationPlan(
        alias=alias,
        mapping=mapping,
        model_id=model.model_id,
        model_path=model_path,
        index=index,
        doc_count=count,
        current_index=current,
        existing=existing,
        settings=settings,
        steps=steps,
    )


def build_index(
    client: Elasticsearch,
    plan: MigrationPlan,
    model: TrainedModel,
    *,
    on_progress: indexing.ProgressCallback | None = None,
) -> int:
    """Create and load the planned index; return the number of documents indexed."""
    meta = _index_meta(plan, model)
    if plan.existing == EXISTING_PARTIAL:
        logger.warning("deleting half-built index %s before rebuilding it", plan.index)
        with cluster_errors(client, f"deleting {plan.index}"):
            client.indices.delete(index=plan.index)
    refresh_interval = str(plan.settings.get("refresh_interval", "1s"))
    indexing.create_index(
        client,
        plan.index,
        mappings=plan.mapping.render(model.k),
        settings=plan.settings,
        meta=meta,
    )
    wait_for_health(client, plan.index, status="yellow")
    result = indexing.bulk_load(
        client,
        plan.index,
        documents.iter_documents(model),
        total=plan.doc_count,
        on_progress=on_progress,
    )
    indexing.finish_index(client, plan.index, meta, refresh_interval)
    return result.indexed


def apply_migration(
    client: Elasticsearch,
    plan: MigrationPlan,
    model: TrainedModel,
    *,
    on_progress: indexing.ProgressCallback | None = None,
    lock_wait: float = 0,
    validate: Callable[[Elasticsearch, str, TrainedModel], Any] | None = None,
) -> MigrationResult:
    """Run the plan: build, validate, swap.

    Args:
        validate: called as ``validate(client, index, model)`` before the swap;
            it must raise to stop the swap. Defaults to
            ``esfm.validate.require_valid``.

    Raises:
        LockError: another migration of this alias is running.
        MigrationError: a step failed; the alias was not moved.
        ValidationFailed: the new index disagrees with the model.
    """
    if plan.existing == EXISTING_LIVE:
        return MigrationResult(plan.alias, plan.index, plan.index, "noop", 0)
    if validate is None:
        from esfm.validate import require_valid

        validate = require_valid

    with lock.held(client, f"migrate:{plan.alias}", wait=lock_wait):
        # The plan may be stale by the time the lock is ours.
        current = aliases.alias_target(client, plan.alias)
        if current != plan.current_index:
            raise MigrationError(
                f"alias {plan.alias!r} moved from {plan.current_index} to {current} "
                "after planning",
                hint="rerun esfm migrate to plan again",
            )
        indexed = 0
        action = "reuse"
        if plan.existing != EXISTING_COMPLETE:
            indexed = build_index(client, plan, model, on_progress=on_progress)
            action = "rebuild" if plan.existing == EXISTING_PARTIAL else "create"

        wait_for_health(client, plan.index, status="yellow")
        report = validate(client, plan.index, model)
        aliases.swap_alias(client, plan.alias, plan.index, expected=current)
        history.record(
            client,
            alias=plan.alias,
            index=plan.index,
            previous_index=current,
            action="migrate",
            meta=indexing.read_meta(client, plan.index),
        )
    logger.info("alias %s now points at %s (was %s)", plan.alias, plan.index, current)
    return MigrationResult(plan.alias, plan.index, current, action, indexed, report)
