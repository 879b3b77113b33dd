"""Alias lookups and the atomic, compare-and-swap alias move."""

from __future__ import annotations

import logging

import elasticsearch
from elasticsearch import Elasticsearch

from esfm.errors import ClusterError, MigrationError
from esfm.server import cluster_errors

logger = logging.getLogger(__name__)


def alias_target(client: Elasticsearch, alias: str) -> str | None:
    """Return the index behind ``alias``, or None when the alias does not exist.

    Raises:
        MigrationError: the alias points at several indices, or ``alias`` is
            the name of a concrete index.
    """
    with cluster_errors(client, f"looking up alias {alias}"):
        try:
            response = client.indices.get_alias(name=alias)
        except elasticsearch.NotFoundError:
            if client.indices.exists(index=alias):
                raise MigrationError(
                    f"{alias!r} is a concrete index, not an alias",
                    hint="pick another --alias, or reindex that index elsewhere",
                ) from None
            return None
    indices = sorted(response)
    if len(indices) > 1:
        raise MigrationError(
            f"alias {alias!r} points at {len(indices)} indices: {', '.join(indices)}",
            hint="esfm manages single-index aliases; remove the extra ones with "
            "the _aliases API",
        )
    return indices[0]


def swap_alias(
    client: Elasticsearch, alias: str, new_index: str, *, expected: str | None
) -> None:
    """Point ``alias`` at ``new_index`` in one ``_aliases`` request.

    The remove action has ``must_exist``, so the request fails unless the alias
    still points at ``expected``: a concurrent swap between the check and this
    call makes one of the two fail instead of both winning.

    Raises:
        MigrationError: the alias moved meanwhile, or the request was rejected.
    """
    actions: list[dict] = []
    if expected is not None:
        actions.append(
            {"remove": {"index": expected, "alias": alias, "must_exist": True}}
        )
    else:
        # With no current target, a concurrent creator of the alias would go
        # unnoticed, so check right before the request.
        current = alias_target(client, alias)
        if current is not None:
            raise MigrationError(
                f"alias {alias!r} appeared on {current} while preparing the swap",
                hint="rerun the command; it will see the new state",
            )
    actions.append(
        {"add": {"index": new_index, "alias": alias, "is_write_index": True}}
    )

    logger.info("moving alias %s: %s -> %s", alias, expected or "(none)", new_index)
    try:
        client.indices.update_aliases(actions=actions)
    except elasticsearch.NotFoundError as exc:
        raise MigrationError(
            f"alias {alias!r} no longer points at {expected}: another operation "
            "moved it; nothing was changed",
            hint=f"check `esfm status --alias {alias}` and rerun",
        ) from exc
    except elasticsearch.ApiError as exc:
        raise ClusterError(
            f"moving alias {alias!r} to {new_index} failed: {exc.message}"
        ) from exc


def check_single_name(name: str) -> None:
    """Raise MigrationError if ``name`` could match more than one index.

    Elasticsearch expands ``*`` and ``?``, comma lists, ``_all`` and a
    leading ``-``, so such a name could mix the documents of several models.
    """
    if not name or any(char in name for char in "*?,") or name == "_all":
        raise MigrationError(
            f"{name!r} is a pattern or a list, not one alias or index",
            hint="give the name of one alias or index, without * ? , or _all",
        )
    if name.startswith("-"):
        raise MigrationError(
            f"{name!r} starts with '-', which Elasticsearch reads as an exclusion",
            hint="give the name of one alias or index",
        )


def resolve_index(client: Elasticsearch, name: str) -> str:
    """Return the concrete index for ``name``, an alias or an index name.

    Raises:
        MigrationError: neither an alias nor an index has that name, or the
            name is a pattern or a list that could match several indices.
    """
    check_single_name(name)
    with cluster_errors(client, f"resolving {name}"):
        try:
            response = client.indices.get_alias(name=name)
            indices = sorted(response)
        except elasticsearch.NotFoundError:
            indices = []
        if not indices and client.indices.exists(index=name):
            return name
    if not indices:
        raise MigrationError(
            f"no alias or index named {name!r}",
            hint="check --alias, or create it with esfm migrate",
        )
    if len(indices) > 1:
        raise MigrationError(
            f"alias {name!r} points at {len(indices)} indices: {', '.join(indices)}"
        )
    return indices[0]
