"""One holder per stage key at a time, across every host that shares the Prefect server.

With a Prefect server (``PREFECT_API_URL``) the lock is one of Prefect's global concurrency limits, one slot per
key (made on first use, named ``gauntlet-stage-<key>``), held on a lease the holder renews: a holder whose host dies
loses it within :data:`LEASE_S`, and every host of the pool waits on the same slot. With Prefect's ephemeral server
(one machine, no server) it is a file lock in the stage's output folder, released by the OS if its holder dies.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from filelock import FileLock
from prefect import get_run_logger
from prefect.exceptions import MissingContextError

from gauntlet.state import prefect_server

STAGE_LOCK = ".stage.lock"
LEASE_S = 60.0          # a key's lock on the Prefect server outlives a dead holder by at most this (Prefect's minimum)


def _logger():
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger(__name__)


@contextmanager
def key_lock(key: str, out: Path, name: str) -> Iterator[None]:
    """One holder per stage key: on the Prefect server every host shares (a global concurrency limit of one
    slot, created on first use, held on a renewed lease), else a file lock in the output folder."""
    if prefect_server():
        from prefect.concurrency.sync import concurrency

        limit, held = _key_limit(key), ExitStack()
        slot = dict(occupy=1, lease_duration=LEASE_S, strict=True, raise_on_lease_renewal_failure=False)
        try:
            held.enter_context(concurrency(limit, timeout_seconds=2, **slot))
        except TimeoutError:
            _logger().info(f"{name}: another run (on some host of the pool) is computing the same key; waiting for it")
            held.enter_context(concurrency(limit, **slot))
        with held:
            yield
        return
    lock = FileLock(str(out / STAGE_LOCK))
    try:
        lock.acquire(timeout=1)
    except TimeoutError:   # filelock's Timeout is a TimeoutError
        _logger().info(f"{name}: another run is computing the same key in {out}; waiting for it")
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def _key_limit(key: str) -> str:
    """The name of the key's one-slot global concurrency limit on the Prefect server (made if missing)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists

    name = f"gauntlet-stage-{key[:32]}"
    with get_client(sync_client=True) as c, contextlib.suppress(ObjectAlreadyExists):
        c.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
    return name
