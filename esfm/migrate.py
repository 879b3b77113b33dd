"""Plan, then apply, the migration of a model into a versioned index.

``plan_migration`` only reads from the cluster and returns the steps. It
decides between two modes:

* ``in-place``: the alias already serves this model and the new mapping
  version only adds fields, so ``put_mapping`` adds them to the live index;
* ``new-index``: anything else (another model, changed dims, similarity,
  index_options or field type). ``apply_migration`` then, under the migration
  lock, creates the index, bulk loads, marks it complete, checks readiness
  (health, active shards, document count), validates it against the model,
  and only then moves the alias with a compare-and-swap.

A failure at any step leaves the alias on the previous, complete index.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import re
from collections.abc import Callable
from typing import Any

from elasticsearch import Elasticsearch

from esfm import aliases, documents, drift, history, indexing, lock
from esfm.artifacts import TrainedModel
from esfm.errors import MigrationError
from esfm.mappings import MappingVersion
from esfm.server import cluster_errors, wait_for_health

logger = logging.getLogger(__name__)

INDEX_NAME_INVALID = re.compile(r"[^a-z0-9_.-]")

# States of an existing index with the planned name, as found by the planner.
EXISTING_NONE = "none"
EXISTING_LIVE = "live"
EXISTING_COMPLETE = "complete"
EXISTING_PARTIAL = "partial"

MODE_NOOP = "noop"
MODE_IN_PLACE = "in-place"
MODE_NEW_INDEX = "new-index"


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
    mode: str = MODE_NEW_INDEX
    added_fields: dict[str, Any] = dataclasses.field(default_factory=dict)
    reasons: list[str] = dataclasses.field(default_factory=list)
    bulk_chunk_size: int = indexing.DEFAULT_CHUNK_SIZE
    bulk_timeout: str | None = None
    bulk_max_retries: int = 5
    wait_for_active_shards: str = "1"
    keep: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "added_fields": sorted(self.added_fields),
            "reasons": self.reasons,
            "keep": self.keep,
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
    """The outcome of ``apply_migration``."""

    alias: str
    index: str
    previous_index: str | None
    action: str
    indexed: int
    validation: Any = None
    pruned: list[str] = dataclasses.field(default_factory=list)


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
    bulk_chunk_size: int = indexing.DEFAULT_CHUNK_SIZE,
    bulk_timeout: str | None = None,
    bulk_max_retries: int = 5,
    wait_for_active_shards: str = "1",
    keep: int | None = None,
) -> MigrationPlan:
    """Work out what migrating ``model`` behind ``alias`` needs; read-only.

    Args:
        bulk_chunk_size: documents per bulk request.
        bulk_timeout: bulk ``timeout`` parameter, such as ``"30s"``; the
            server default (1m) when None.
        bulk_max_retries: retries of a chunk's 429 and 5xx items, with
            backoff doubling from 1 s.
        wait_for_active_shards: shard copies that must be active before the
            swap: a number or ``"all"``.
        keep: after the swap, delete all but the newest ``keep`` esfm indices
            of the alias (see :mod:`esfm.retention`); None deletes nothing.
    """
    rendered = mapping.render(model.k)  # reject a dims mismatch before any call
    if bulk_chunk_size < 1:
        raise MigrationError(f"invalid bulk chunk size {bulk_chunk_size}: must be >= 1")
    if bulk_max_retries < 0:
        raise MigrationError(f"invalid bulk retries {bulk_max_retries}: must be >= 0")
    if keep is not None and keep < 1:
        raise MigrationError(f"invalid --keep {keep}: keep at least the live index")
    index = index_name(alias, mapping.version, model.model_id)
    settings = dict(mapping.settings)
    if replicas is not None:
        settings["number_of_replicas"] = replicas
    if shards is not None:
        settings["number_of_shards"] = shards

    current = aliases.alias_target(client, alias)
    mode, change = _choose_mode(client, current, model, mapping, rendered, settings)
    if mode != MODE_NEW_INDEX:
        index = current  # type: ignore[assignment]
    existing = _existing_state(client, index, current)
    if mode == MODE_NEW_INDEX and existing == EXISTING_LIVE:
        mode = MODE_NOOP

    plan = MigrationPlan(
        alias=alias,
        mapping=mapping,
        model_id=model.model_id,
        model_path=model_path,
        index=index,
        doc_count=documents.count_documents(model),
        current_index=current,
        existing=EXISTING_LIVE if mode == MODE_NOOP else existing,
        settings=settings,
        steps=[],
        mode=mode,
        added_fields=change.added if change else {},
        reasons=change.reasons if change else [],
        bulk_chunk_size=bulk_chunk_size,
        bulk_timeout=bulk_timeout,
        bulk_max_retries=bulk_max_retries,
        wait_for_active_shards=wait_for_active_shards,
        keep=keep,
    )
    plan.steps = _plan_steps(plan)
    return plan


def _choose_mode(
    client: Elasticsearch,
    current: str | None,
    model: TrainedModel,
    mapping: MappingVersion,
    rendered: dict[str, Any],
    settings: dict[str, Any],
) -> tuple[str, drift.MappingChange | None]:
    """Return the mode and, for an index serving this model, the mapping change."""
    if current is None:
        return MODE_NEW_INDEX, None
    meta = indexing.read_meta(client, current)
    if meta.get("model_id") != model.model_id or meta.get("k") != model.k:
        return MODE_NEW_INDEX, None
    if meta.get("mapping_name") != mapping.name:
        return MODE_NEW_INDEX, drift.MappingChange(
            drift.CHANGE_BREAKING, {}, [f"mapping name {meta.get('mapping_name')}"]
        )

    change = drift.classify_change(drift.live_mappings(client, current), rendered)
    reasons = list(change.reasons)
    with cluster_errors(client, f"reading the settings of {current}"):
        live_settings = client.indices.get_settings(index=current)[current]
    live_shards = live_settings["settings"]["index"].get("number_of_shards")
    wanted_shards = settings.get("number_of_shards", 1)
    if str(live_shards) != str(wanted_shards):
        reasons.append(f"number_of_shards {live_shards} -> {wanted_shards}")
    if reasons:
        return MODE_NEW_INDEX, drift.MappingChange(
            drift.CHANGE_BREAKING, change.added, reasons
        )
    same_version = (
        meta.get("mapping_version") == mapping.version
        and meta.get("mapping_checksum") == mapping.checksum
    )
    if same_version and change.kind == drift.CHANGE_NONE:
        return MODE_NOOP, change
    live_version = int(meta.get("mapping_version") or 0)
    if live_version > mapping.version:
        # An older file than the live one never goes in place: that would
        # record a downgrade in _meta without removing the newer fields.
        reason = f"mapping v{mapping.version} is older than live v{live_version}"
        return MODE_NEW_INDEX, drift.MappingChange(drift.CHANGE_BREAKING, {}, [reason])
    return MODE_IN_PLACE, change


def _existing_state(client: Elasticsearch, index: str, current: str | None) -> str:
    with cluster_errors(client, f"checking index {index}"):
        exists = bool(client.indices.exists(index=index))
    if not exists:
        return EXISTING_NONE
    if current == index:
        return EXISTING_LIVE
    if indexing.read_meta(client, index).get("state") == indexing.STATE_COMPLETE:
        return EXISTING_COMPLETE
    return EXISTING_PARTIAL


def _plan_steps(plan: MigrationPlan) -> list[str]:
    alias, index, current = plan.alias, plan.index, plan.current_index
    if plan.mode == MODE_NOOP:
        return [f"nothing to do: alias {alias} already points at {index}"]
    steps = [f"take lock migrate:{alias}"]
    version = f"{plan.mapping.name} v{plan.mapping.version}"
    if plan.mode == MODE_IN_PLACE:
        fields = ", ".join(sorted(plan.added_fields)) or "no fields"
        steps.append(
            f"put_mapping on the live index {index}: add {fields} "
            f"({version} only adds fields, so no new index is needed)"
        )
        steps.append(
            f"set _meta.esfm.mapping_version {plan.mapping.version} and the "
            f"checksum on {index}"
        )
        steps.append(f"record the change in esfm-history; the alias stays on {index}")
        return steps

    if plan.reasons:
        steps.append(f"a new index is needed: {'; '.join(plan.reasons)}")
    if plan.existing == EXISTING_PARTIAL:
        steps.append(f"delete the half-built index {index} left by an earlier run")
    if plan.existing != EXISTING_COMPLETE:
        steps.append(
            f"create index {index} with mapping {version} "
            f"(shards {plan.settings.get('number_of_shards', 1)}, "
            f"replicas {plan.settings.get('number_of_replicas', 1)})"
        )
        steps.append(
            f"load {plan.doc_count} documents from model {plan.model_id} "
            f"in chunks of {plan.bulk_chunk_size}"
        )
        steps.append(f"mark {index} complete")
    else:
        steps.append(f"reuse the complete index {index} from an earlier run")
    steps.append(
        f"check {index}: health yellow or green, all primaries active, "
        f"wait_for_active_shards={plan.wait_for_active_shards}, "
        f"{plan.doc_count} documents"
    )
    steps.append(f"validate {index} against model {plan.model_id}")
    steps.append(f"move alias {alias} from {current or '(none)'} to {index}")
    if plan.keep is None:
        steps.append("record the move in esfm-history; delete nothing")
    else:
        steps.append(
            f"record the move in esfm-history; delete esfm indices of {alias} "
            f"beyond the newest {plan.keep}, never the live one or the rollback "
            "target"
        )
    return steps


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
        chunk_size=plan.bulk_chunk_size,
        max_retries=plan.bulk_max_retries,
        timeout=plan.bulk_timeout,
    )
    indexing.finish_index(client, plan.index, meta, refresh_interval)
    return result.indexed


def ensure_ready(
    client: Elasticsearch,
    index: str,
    *,
    expected_docs: int,
    wait_for_active_shards: str = "1",
    timeout: str = "60s",
) -> None:
    """Check that ``index`` can serve queries before an alias moves to it.

    Waits for health yellow or green and ``wait_for_active_shards`` active
    copies, then requires every primary active and ``expected_docs`` documents.

    Raises:
        MigrationError: a check failed; ``.index`` names the index and
            ``.checks`` lists the failed checks.
    """
    with cluster_errors(client, f"waiting for index {index} to be ready"):
        # The health API returns status 408 when it times out. The body
        # still contains the counts, so read it instead of raising.
        health = client.options(ignore_status=408).cluster.health(
            index=index,
            wait_for_status="yellow",
            wait_for_active_shards=wait_for_active_shards,
            timeout=timeout,
        )
        settings = client.indices.get_settings(index=index)[index]["settings"]
    primaries = int(settings["index"]["number_of_shards"])
    failed: list[str] = []
    if health.get("timed_out"):
        failed.append(
            f"health did not reach yellow with wait_for_active_shards="
            f"{wait_for_active_shards} within {timeout} (status {health.get('status')})"
        )
    if health.get("active_primary_shards") != primaries:
        failed.append(
            f"{health.get('active_primary_shards')} of {primaries} primaries active"
        )
    else:
        # Counting needs every primary, so it runs only when they are active.
        with cluster_errors(client, f"counting the documents of {index}"):
            count = int(client.count(index=index)["count"])
        if count != expected_docs:
            failed.append(f"{count} documents, expected {expected_docs}")
    if failed:
        error = MigrationError(
            f"index {index} is not ready: {'; '.join(failed)}",
            hint="the alias was not moved; check `esfm cluster status` and rerun "
            "esfm migrate",
        )
        error.index = index  # type: ignore[attr-defined]
        error.checks = failed  # type: ignore[attr-defined]
        raise error


def _apply_in_place(client: Elasticsearch, plan: MigrationPlan) -> MigrationResult:
    meta = indexing.read_meta(client, plan.index)
    meta.update(
        mapping_version=plan.mapping.version,
        mapping_checksum=plan.mapping.checksum,
        mapping_name=plan.mapping.name,
    )
    logger.info(
        "adding fields %s to %s in place (mapping %s v%s)",
        sorted(plan.added_fields),
        plan.index,
        plan.mapping.name,
        plan.mapping.version,
    )
    with cluster_errors(client, f"updating the mapping of {plan.index}"):
        client.indices.put_mapping(
            index=plan.index, properties=plan.added_fields, meta={"esfm": meta}
        )
    history.record(
        client,
        alias=plan.alias,
        index=plan.index,
        previous_index=plan.index,
        action="put-mapping",
        meta=meta,
    )
    return MigrationResult(plan.alias, plan.index, plan.index, MODE_IN_PLACE, 0)


def apply_migration(
    client: Elasticsearch,
    plan: MigrationPlan,
    model: TrainedModel,
    *,
    on_progress: indexing.ProgressCallback | None = None,
    lock_wait: float = 0,
    validate: Callable[[Elasticsearch, str, TrainedModel], Any] | None = None,
) -> MigrationResult:
    """Run the plan: put_mapping in place, or build, check, validate and swap.

    Args:
        validate: called as ``validate(client, index, model)`` before the swap;
            it must raise to stop the swap. Defaults to
            ``esfm.validate.require_valid``.

    Returns:
        The result; its action is ``noop`` also when, while this call waited
        for the lock, another run moved the alias to the planned index.

    Raises:
        LockError: another migration of this alias is running.
        MigrationError: a step failed; the alias was not moved.
        ValidationFailed: the new index disagrees with the model.
    """
    if plan.mode == MODE_NOOP or (
        plan.mode == MODE_NEW_INDEX and plan.existing == EXISTING_LIVE
    ):
        return MigrationResult(plan.alias, plan.index, plan.index, "noop", 0)
    if validate is None:
        from esfm.validate import require_valid

        validate = require_valid

    with lock.held(client, f"migrate:{plan.alias}", wait=lock_wait):
        # The plan may be stale by the time the lock is ours.
        current = aliases.alias_target(client, plan.alias)
        if current != plan.current_index:
            if current == plan.index and plan.mode == MODE_NEW_INDEX:
                logger.info(
                    "alias %s already moved to %s by another run", plan.alias, current
                )
                return MigrationResult(plan.alias, plan.index, current, "noop", 0)
            raise MigrationError(
                f"alias {plan.alias!r} moved from {plan.current_index} to {current} "
                "after planning",
                hint="rerun esfm migrate to plan again",
            )
        if plan.mode == MODE_IN_PLACE:
            return _apply_in_place(client, plan)

        indexed = 0
        action = "reuse"
        if plan.existing != EXISTING_COMPLETE:
            indexed = build_index(client, plan, model, on_progress=on_progress)
            action = "rebuild" if plan.existing == EXISTING_PARTIAL else "create"

        ensure_ready(
            client,
            plan.index,
            expected_docs=plan.doc_count,
            wait_for_active_shards=plan.wait_for_active_shards,
        )
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
        logger.info(
            "alias %s now points at %s (was %s)", plan.alias, plan.index, current
        )
        pruned: list[str] = []
        if plan.keep is not None:
            from esfm import retention

            prune_plan = retention.plan_prune(client, plan.alias, keep=plan.keep)
            pruned = retention.apply_prune(client, prune_plan, locked=True)
    return MigrationResult(
        plan.alias, plan.index, current, action, indexed, report, pruned
    )
