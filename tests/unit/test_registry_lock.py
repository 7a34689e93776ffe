"""The registry lock's mode: a file lock beside a sqlite store, the registry's own lock on a server.
Locks held and broken by real processes run in tests/integration/test_registry.py."""

from __future__ import annotations

from pathlib import Path

import pytest


def test_lock_mode_follows_the_store(monkeypatch: pytest.MonkeyPatch) -> None:
    from gauntlet.registry.lock import lock_file_for, lock_mode

    monkeypatch.delenv("GAUNTLET_REGISTRY_LOCK", raising=False)
    assert lock_mode("sqlite:////tmp/x/mlflow.db") == "file"
    assert lock_mode("http://mlflow.internal:5000") == "registry"
    assert lock_mode("postgresql://mlflow@db/mlflow") == "registry"
    assert lock_file_for("sqlite:////tmp/x/mlflow.db", "m").parent == Path("/tmp/x/mlflow.db.locks")
