"""Shared test set-up: a temporary $GAUNTLET_HOME, a real sqlite MLflow, one real Prefect test API.

Environment variables are set at import time, before Prefect or MLflow are imported anywhere,
because both read their settings on import.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

_SESSION_HOME = Path(tempfile.mkdtemp(prefix="gauntlet-tests-"))
os.environ["GAUNTLET_HOME"] = str(_SESSION_HOME)
os.environ.pop("MLFLOW_TRACKING_URI", None)
os.environ.pop("PREFECT_API_URL", None)

from tasks.state import configure_environment  # noqa: E402

configure_environment()


@pytest.fixture(scope="session")
def prefect_api():
    """One real Prefect API (temporary server on a sqlite database) for the whole session (~10 s)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def session_home() -> Path:
    return _SESSION_HOME
