"""Retention: delete old esfm indices of an alias, keeping the newest N.

An index counts as one of the alias's esfm indices when its name starts with
``<alias>-v`` and it has ``_meta.esfm``. The live index and the rollback
target (the index the alias served before its last move, from
``esfm-history``) are always kept, even beyond N. Pruning holds the alias's
migration lock, so it never deletes an index that a running migration is
building.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from elasticsearch import Elasticsearch

from esfm import aliases, history, indexing, lock
from esfm.errors import MigrationError
from esfm.server import cluster_errors

logger = logging.getLogger(__name__)

DEFAULT_KEEP = 3


@dataclasses.dataclass
class PrunePlan:
    """Indices that :func:`apply_prune` keeps and deletes, newest first."""

    alias: str
    keep: int
    live: str | None
    rollback_target: str | None
    kept: list[str]
    delete: list[str]
    incomplete: list[str] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def esfm_indices(
    client: Elasticsearch, alias: str, *, complete_only: bool = False
) -> list[tuple[str, str]]:
    """Return ``(index, created)`` for the alias's esfm indices, newest first.

    With ``complete_only``, indices whose ``_meta.esfm.state`` is not complete
    (left half-built by an interrupted migrate) are left out.
    """
    with cluster_errors(client, f"listing indices of alias {alias}"):
        response = client.indices.get_mapping(
            index=f"{alias}-v*", allow_no_indices=True, expand_wildcards="open,closed"
        )
    found: list[tuple[str, str]] = []
    for index, body in response.items():
        meta = body.get("mappings", {}).get("_meta", {}).get("esfm")
        # "<alias>-v*" also matches "<alias>-vip-v1-...": those belong to
        # another alias whose name starts with this one.
        if not meta or not _belongs_to(index, alias):
            continue
        if complete_only and meta.get("state") != indexing.STATE_COMPLETE:
            continue
        found.append((index, str(meta.get("created", ""))))
    found.sort(key=lambda item: (item[1], item[0]), reverse=True)
    return found


def incomplete_indices(client: Elasticsearch, alias: str) -> list[str]:
    """Return the alias's esfm indices that an interrupted migrate left half-built."""
    complete = {index for index, _ in esfm_indices(client, alias, complete_only=True)}
    return [index for index, _ in esfm_indices(client, alias) if index not in complete]


def _belongs_to(index: str, alias: str) -> bool:
    rest = index.removeprefix(f"{alias}-v")
    number, _, model = rest.partition("-")
    return number.isdigit() and bool(model)


def rollback_target(client: Elasticsearch, alias: str, live: str | None) -> str | None:
    """Return the index ``esfm rollback`` would move the alias back to."""
    if live is None:
        return None
    for entry in history.entries(client, alias):
        previous = entry.get("previous_index")
        if entry.get("index") == live and previous and previous != live:
            return previous
    return None


def plan_prune(
    client: Elasticsearch, alias: str, *, keep: int = DEFAULT_KEEP
) -> PrunePlan:
    """List what pruning ``alias`` down to ``keep`` indices would delete; read-only.

    Raises:
        MigrationError: ``keep`` is below 1.
    """
    if keep < 1:
        raise MigrationError(
            f"invalid keep {keep}: at least the live index is kept",
            hint="use --keep 1 or more",
        )
    live = aliases.alias_target(client, alias)
    target = rollback_target(client, alias, live)
    protected = {name for name in (live, target) if name}
    # Half-built indices never count towards ``keep``: nothing can serve them.
    incomplete = [i for i in incomplete_indices(client, alias) if i not in protected]
    candidates = [
        index for index, _ in esfm_indices(client, alias) if index not in incomplete
    ]
    kept = candidates[:keep]
    kept.extend(index for index in candidates[keep:] if index in protected)
    delete = [index for index in candidates if index not in kept] + incomplete
    return PrunePlan(alias, keep, live, target, kept, delete, incomplete)


def apply_prune(
    client: Elasticsearch,
    plan: PrunePlan,
    *,
    locked: bool = False,
    lock_wait: float = 0,
) -> list[str]:
    """Delete the planned indices and record each deletion in esfm-history.

    Args:
        locked: the caller already holds the alias's migration lock, as
            ``apply_migration`` does.

    Returns:
        The deleted index names.

    Raises:
        LockError: a migration of this alias is running.
        MigrationError: the alias moved since planning, so the plan is stale.
    """
    if not plan.delete:
        return []
    if locked:
        return _delete(client, plan)
    with lock.held(client, f"migrate:{plan.alias}", wait=lock_wait):
        return _delete(client, plan)


def _delete(client: Elasticsearch, plan: PrunePlan) -> list[str]:
    live = aliases.alias_target(client, plan.alias)
    if live != plan.live:
        raise MigrationError(
            f"alias {plan.alias!r} moved from {plan.live} to {live} after planning "
            "the prune; nothing was deleted",
            hint="rerun esfm prune to plan again",
        )
    deleted: list[str] = []
    for index in plan.delete:
        if index in (plan.live, plan.rollback_target):
            continue  # never reached with a plan from plan_prune
        meta = indexing.read_meta(client, index)
        if index in plan.incomplete and meta.get("state") == indexing.STATE_COMPLETE:
            # A migrate finished it between planning and taking the lock.
            logger.info("keeping %s: it was completed after planning", index)
            continue
        logger.info("deleting index %s of alias %s (retention)", index, plan.alias)
        with cluster_errors(client, f"deleting index {index}"):
            client.indices.delete(index=index)
        history.record(
            client,
            alias=plan.alias,
            index=index,
            previous_index=None,
            action="delete",
            meta=meta,
        )
        deleted.append(index)
    return deleted
