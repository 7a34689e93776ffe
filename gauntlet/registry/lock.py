"""Compare-and-set for the registry's aliases: MLflow has none, so every read-then-move happens under a lock.

``file`` mode (a local sqlite or file store): an OS file lock next to the store, released by the OS if its
holder dies. ``registry`` mode (an MLflow server or remote database): a lock row in the registry itself
(a registered model named ``gauntlet-lock--<name>``), so machines sharing the server exclude each other;
a lock older than its lease is broken, and a holder whose lease ran out changes nothing.
"""

from __future__ import annotations

import getpass
import hashlib
import logging
import os
import random
import socket
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal
from urllib.parse import unquote, urlparse

from gauntlet.state import shared_tracking, sqlite_path

log = logging.getLogger(__name__)

LOCK_MODEL_PREFIX = "gauntlet-lock--"      # registered models used as locks on a shared MLflow server
LOCK_ENV = "GAUNTLET_REGISTRY_LOCK"        # "file" | "registry": override the choice made from the URI
LEASE_S = 120.0                            # a registry lock older than this is stale (its holder died)


class RegistryError(Exception):
    """A registry operation that cannot be done as asked (exit 1): nothing to roll back, lock timeout…"""



def actor() -> str:
    """Who is acting, for the record: user@host."""
    try:
        user = getpass.getuser()
    except Exception:  # no login name in some containers
        user = str(os.getuid()) if hasattr(os, "getuid") else "unknown"
    return f"{user}@{socket.gethostname()}"


def lock_mode(tracking_uri: str) -> Literal["file", "registry"]:
    """``file`` where the store is a local file (sqlite, file store): an OS lock next to it, released by the
    OS if the holder dies. ``registry`` otherwise (MLflow server, remote database): a lock row in the
    registry itself, so that machines sharing the server exclude each other."""
    forced = os.environ.get(LOCK_ENV, "").strip()
    if forced in ("file", "registry"):
        return forced  # type: ignore[return-value]
    return "registry" if shared_tracking(tracking_uri) else "file"


def lock_file_for(tracking_uri: str, model_name: str) -> Path:
    """The lock file of one registered model: next to the store, so every process using it finds it."""
    parsed = urlparse(tracking_uri)
    store = sqlite_path(tracking_uri)
    if store is not None:
        folder = store.with_name(store.name + ".locks")
    else:
        store = Path(unquote(parsed.path) if parsed.scheme == "file" else tracking_uri)
        folder = store / ".gauntlet-locks"
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in model_name)[:60]
    digest = hashlib.sha256(model_name.encode()).hexdigest()[:12]
    return folder / f"registry-{safe}-{digest}.lock"


class Lease:
    """A held registry lock. :meth:`verify` right before moving an alias: a holder whose registry lease
    expired (and so may have been broken by another process) must not act on what it read."""

    def __init__(self, c, lock_name: str | None, token: str, expires_at: float):
        self.c, self.lock_name, self.token, self.expires_at = c, lock_name, token, expires_at

    def verify(self) -> None:
        if self.lock_name is None:   # an OS file lock cannot be taken away from a live holder
            return
        from mlflow.exceptions import MlflowException

        try:
            tags = self.c.get_registered_model(self.lock_name).tags
        except MlflowException:
            tags = {}
        if tags.get("token") != self.token or time.time() >= self.expires_at:
            raise RegistryError(f"lost the registry lock {self.lock_name!r} (its lease ran out); nothing was "
                                "changed, run the promotion again")


@contextmanager
def registry_lock(c, model_name: str, timeout_s: float = 300.0) -> Iterator[Lease]:
    """Mutual exclusion for everything that reads and then moves ``model_name``'s aliases or history."""
    mode = lock_mode(c.tracking_uri)
    if mode == "file":
        from filelock import FileLock, Timeout

        path = lock_file_for(c.tracking_uri, model_name)
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(path))
        try:
            lock.acquire(timeout=timeout_s)
        except Timeout:
            raise RegistryError(f"timed out after {timeout_s:.0f}s waiting for the registry lock {path}") from None
        try:
            yield Lease(c, None, "", float("inf"))
        finally:
            lock.release()
        return
    lease = _acquire_registry_lock(c, model_name, timeout_s)
    try:
        yield lease
    finally:
        _release_registry_lock(lease)


def _acquire_registry_lock(c, model_name: str, timeout_s: float) -> Lease:
    """Create the registered model ``gauntlet-lock--<name>``: the store's unique-name constraint makes
    creation an atomic test-and-set, on a sqlite file, a database or an MLflow server alike."""
    from mlflow.exceptions import MlflowException

    lock_name = LOCK_MODEL_PREFIX + model_name
    token = uuid.uuid4().hex
    deadline = time.monotonic() + timeout_s
    while True:
        expires_at = time.time() + LEASE_S
        try:
            c.create_registered_model(lock_name, tags={"token": token, "owner": actor(), "expires_at": str(expires_at)},
                                      description=f"lock on {model_name!r} held by {actor()} (Gauntlet); "
                                                  f"stale after {LEASE_S:.0f}s")
            return Lease(c, lock_name, token, expires_at)
        except MlflowException as e:
            # "does not exist": the store saw the name taken, then it was released before it could say by whom
            if getattr(e, "error_code", "") not in ("RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST"):
                raise
        _break_if_stale(c, lock_name)
        if time.monotonic() > deadline:
            raise RegistryError(f"timed out after {timeout_s:.0f}s waiting for the registry lock {lock_name!r}")
        time.sleep(random.uniform(0.02, 0.15))


def _break_if_stale(c, lock_name: str) -> None:
    """Remove a lock whose holder died. Renaming is atomic (one breaker wins); a live holder whose lock was
    taken this way finds out in :meth:`Lease.verify` and changes nothing."""
    from mlflow.exceptions import MlflowException

    try:
        tags = c.get_registered_model(lock_name).tags
    except MlflowException:
        return
    if float(tags.get("expires_at", "inf")) > time.time():
        return
    broken = f"{lock_name}--stale-{uuid.uuid4().hex[:8]}"
    try:
        c.rename_registered_model(lock_name, broken)
        c.delete_registered_model(broken)
        log.warning("broke the stale registry lock %s (held by %s)", lock_name, tags.get("owner"))
    except MlflowException:
        pass  # another waiter broke it first


def _release_registry_lock(lease: Lease) -> None:
    from mlflow.exceptions import MlflowException

    try:
        if lease.c.get_registered_model(lease.lock_name).tags.get("token") == lease.token:
            lease.c.delete_registered_model(lease.lock_name)
    except MlflowException:
        pass  # already broken as stale: nothing of ours to release
