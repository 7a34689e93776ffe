"""Access rules against a real MLflow server with its authentication on (the basic-auth app, the config
gauntlet.registry.access writes): a sensitive registered model is on an access list. The workers' service account,
granted READ, fetches it through the model stages' resolver; a user without READ is refused, by name, with the fix,
whether fetching it or submitting it to a board; the server's refusal is never reported as a missing model."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from tests.pool import free_ports

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

ADMIN_PASSWORD = "admin-" + "x" * 20
USERS = {"svc-worker": "svc-" + "y" * 20, "analyst": "analyst-" + "z" * 20}
MODEL = "secret-bot"


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory, tiny_model):
    """An MLflow server with basic auth on a loopback port, a registered model with one version (the demo's tiny
    model), the service account granted READ on it and another user granted nothing."""
    from mlflow.tracking import MlflowClient

    from gauntlet.registry.access import auth_config, create_user, grant, server_options
    from gauntlet.serve import start_service, stop_service, wait_http

    root = tmp_path_factory.mktemp("mlflow-auth")
    (port,) = free_ports(1)
    args, env = server_options(auth_config(root, f"sqlite:///{root / 'auth.db'}"), ADMIN_PASSWORD, "k" * 32)
    service = start_service("mlflow-auth", [
        sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
        "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "art"),
        *args], {**os.environ, **env}, root / "logs", cwd=root)
    uri = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")}
    try:
        started = time.monotonic()
        wait_http(service, f"{uri}/health")
        print(f"MLflow with basic auth up in {time.monotonic() - started:.1f}s")
        as_user("admin", ADMIN_PASSWORD)
        for user, password in USERS.items():
            create_user(uri, user, password)
        c = MlflowClient(uri)
        run = c.create_run(c.create_experiment("access"))
        c.log_artifacts(run.info.run_id, str(tiny_model), "model")
        c.create_registered_model(MODEL)
        c.create_model_version(MODEL, f"{run.info.artifact_uri}/model", run_id=run.info.run_id)
        grant(uri, MODEL, "svc-worker", "READ")
        print(f"users, the model and its grant in {time.monotonic() - started:.1f}s")
        yield uri
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
        stop_service(service)


def as_user(user: str, password: str | None = None) -> None:
    os.environ["MLFLOW_TRACKING_USERNAME"] = user
    os.environ["MLFLOW_TRACKING_PASSWORD"] = password or USERS[user]


def test_the_service_account_fetches_the_model_and_a_user_without_read_is_refused(auth_server, tmp_path) -> None:
    from gauntlet.config.model import ModelSpec
    from gauntlet.models import ModelFetchError, resolve_model

    as_user("svc-worker")
    resolved = resolve_model(ModelSpec(source=f"models:/{MODEL}/1"), auth_server)
    assert (Path(resolved.model.source) / "config.json").is_file() and resolved.name == f"{MODEL}-v1"
    as_user("analyst")
    with pytest.raises(ModelFetchError) as err:
        resolve_model(ModelSpec(source=f"models:/{MODEL}/2"), auth_server)
    message = str(err.value)
    assert "refuses user 'analyst' READ on registered model 'secret-bot'" in message, message
    assert "ask the model's owner for READ" in message and "has no version" not in message
    # a wrong password is not a permission: the server's 401 says so in its own words
    os.environ["MLFLOW_TRACKING_PASSWORD"] = "wrong"
    with pytest.raises(Exception, match="401"):
        resolve_model(ModelSpec(source=f"models:/{MODEL}/1"), auth_server)


def test_a_user_without_read_cannot_submit_it_to_a_board(auth_server, tmp_path) -> None:
    from gauntlet.registry.access import grant, revoke

    as_user("analyst")
    reasons = submission_refusals(auth_server, tmp_path)
    assert any("refuses user 'analyst' READ" in r for r in reasons), reasons
    as_user("admin", ADMIN_PASSWORD)
    grant(auth_server, MODEL, "analyst", "READ")
    try:
        as_user("analyst")
        assert not [r for r in submission_refusals(auth_server, tmp_path) if "READ" in r]
    finally:
        as_user("admin", ADMIN_PASSWORD)
        revoke(auth_server, MODEL, "analyst")


def submission_refusals(tracking_uri: str, folder: Path) -> list[str]:
    """What the board's submission check of whether it loads says about models:/secret-bot/1 for this user."""
    from gauntlet.leaderboard.submission_checks import load_problem

    _, problem = load_problem(f"models:/{MODEL}/1", tracking_uri)
    return [] if problem is None else [problem.message]
