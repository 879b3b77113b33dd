"""One migration at a time: a lock document created with ``op_type=create``."""

from __future__ import annotations

import contextlib
import datetime as dt
import getpass
import logging
import os
import socket
import time
import uuid
from collections.abc import Iterator
from typing import Any

import elasticsearch
from elasticsearch import Elasticsearch

from esfm.errors import LockError
from esfm.server import cluster_errors, ensure_system_index

logger = logging.getLogger(__name__)

LOCK_INDEX = "esfm-locks"


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _owner() -> dict[str, Any]:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "user": getpass.getuser(),
        "token": uuid.uuid4().hex,
    }


def read_lock(client: Elasticsearch, name: str) -> dict[str, Any] | None:
    """Return the lock document for ``name``, with ``_seq_no``/``_primary_term``."""
    with cluster_errors(client, f"reading lock {name}"):
        try:
            response = client.get(index=LOCK_INDEX, id=name)
        except elasticsearch.NotFoundError:
            return None
    return {
        **response["_source"],
        "_seq_no": response["_seq_no"],
        "_primary_term": response["_primary_term"],
    }


def holder_is_gone(held: dict[str, Any]) -> bool:
    """Return whether the lock's owner was a process on this host that has exited.

    NOTE: a pid reused by an unrelated process after the owner died reads as
    alive, so such a lock still needs expiry or ``esfm lock release --force``.
    """
    if held.get("host") != socket.gethostname():
        return False
    try:
        pid = int(held["pid"])
    except (KeyError, TypeError, ValueError):
        return False
    return not process_is_running(pid)


def process_is_running(pid: int) -> bool:
    """Return whether a process with ``pid`` runs on this host, this one included."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_stale(held: dict[str, Any], now: dt.datetime | None = None) -> bool:
    """Return whether the lock expired or its owner process on this host exited."""
    expires = dt.datetime.fromisoformat(held["expires_at"])
    return expires < (now or _now()) or holder_is_gone(held)


def acquire(
    client: Elasticsearch, name: str, *, ttl_seconds: int = 3600, wait: float = 0
) -> dict[str, Any]:
    """Create the lock document; wait up to ``wait`` seconds for a holder.

    An expired lock, or one whose owner was a process on this host that no
    longer exists (killed before it could release), is taken over with a
    conditional write (``if_seq_no``), so two processes cannot both take over
    the same lock.

    Raises:
        LockError: the lock is held by someone else and did not expire in time.
    """
    deadline = time.monotonic() + wait
    owner = _owner()
    ensure_system_index(client, LOCK_INDEX)
    while True:
        now = _now()
        document = {
            **owner,
            "name": name,
            "acquired_at": now.isoformat(),
            "expires_at": (now + dt.timedelta(seconds=ttl_seconds)).isoformat(),
        }
        with cluster_errors(client, f"acquiring lock {name}"):
            try:
                client.index(
                    index=LOCK_INDEX,
                    id=name,
                    document=document,
                    op_type="create",
                    refresh="wait_for",
                )
                logger.info("lock %s acquired by pid %s", name, owner["pid"])
                return document
            except elasticsearch.ConflictError:
                held = read_lock(client, name)
            if held is not None and is_stale(held, now):
                try:
                    client.index(
                        index=LOCK_INDEX,
                        id=name,
                        document=document,
                        if_seq_no=held["_seq_no"],
                        if_primary_term=held["_primary_term"],
                        refresh="wait_for",
                    )
                    logger.warning(
                        "took over stale lock %s from %s pid %s (expired or exited)",
                        name,
                        held.get("host"),
                        held.get("pid"),
                    )
                    return document
                except elasticsearch.ConflictError:
                    pass
        if time.monotonic() >= deadline:
            holder = held or {}
            raise LockError(
                f"another migration holds lock {name!r}: {holder.get('user')}@"
                f"{holder.get('host')} pid {holder.get('pid')} since "
                f"{holder.get('acquired_at')}, expires {holder.get('expires_at')}",
                hint="wait for it (esfm migrate --lock-wait SECONDS), or if that "
                "process is gone: esfm lock release --alias "
                f"{name.removeprefix('migrate:')} --force",
            )
        time.sleep(min(2.0, max(0.1, deadline - time.monotonic())))


def release(client: Elasticsearch, name: str, token: str | None = None) -> bool:
    """Delete the lock; with ``token``, only if it is still ours. Returns whether
    a lock was deleted."""
    held = read_lock(client, name)
    if held is None:
        return False
    if token is not None and held.get("token") != token:
        logger.warning("lock %s is no longer ours; leaving it", name)
        return False
    with cluster_errors(client, f"releasing lock {name}"):
        try:
            client.delete(
                index=LOCK_INDEX,
                id=name,
                if_seq_no=held["_seq_no"],
                if_primary_term=held["_primary_term"],
                refresh="wait_for",
            )
        except (elasticsearch.NotFoundError, elasticsearch.ConflictError):
            return False
    logger.info("lock %s released", name)
    return True


@contextlib.contextmanager
def held(
    client: Elasticsearch, name: str, *, ttl_seconds: int = 3600, wait: float = 0
) -> Iterator[dict[str, Any]]:
    document = acquire(client, name, ttl_seconds=ttl_seconds, wait=wait)
    try:
        yield document
    finally:
        release(client, name, token=document["token"])
