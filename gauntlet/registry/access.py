"""Who may read a registered model: the MLflow server's own authentication (its ``basic-auth`` app) and its
per-registered-model permissions.

A team's MLflow server runs with ``--app-name basic-auth`` and the config :func:`auth_config` writes:
``default_permission = NO_PERMISSIONS``, so every registered model is on an access list: its creator (MANAGE)
and whoever is granted READ (:func:`grant`). The workers run as a service account (a user granted what the pool's
jobs read and write), people as themselves: each process names its user in ``MLFLOW_TRACKING_USERNAME`` /
``MLFLOW_TRACKING_PASSWORD``, which MLflow's client sends. What the server refuses comes back as HTTP 403
(``PERMISSION_DENIED``); :func:`denied` turns it into a sentence naming the user, the model and the fix, which the
model stages raise (``gauntlet.models.registry_version``), so a user without READ can neither fetch a sensitive
model nor submit it to a board. No Prefect here.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from gauntlet.files import write_text

AUTH_APP = "basic-auth"
ADMIN = "admin"
REGISTERED_MODEL = "registered_model"     # MLflow's resource types of permissions
EXPERIMENT = "experiment"


def auth_config(folder: Path, database_uri: str, default_permission: str = "NO_PERMISSIONS",
                credential_cache_s: int = 60) -> Path:
    """The auth app's config (MLFLOW_AUTH_CONFIG_PATH): its user store, the permission of a user on a model nobody
    granted them anything on, and how long a checked password is trusted (each check is a PBKDF2 hash, about a
    second of CPU on a small server; uploading a model is a request per file; a changed password or a deleted
    user may still pass on another worker for that long). The admin's password is read from
    MLFLOW_AUTH_ADMIN_PASSWORD at first start."""
    path = folder / "mlflow-auth.ini"
    write_text(path, "\n".join([
        "[mlflow]", f"default_permission = {default_permission}", f"database_uri = {database_uri}",
        f"admin_username = {ADMIN}", "authorization_function = mlflow.server.auth:authenticate_request_basic_auth",
        f"auth_cache_ttl_seconds = {credential_cache_s}", ""]))
    return path


def server_options(config: Path, admin_password: str, secret_key: str) -> tuple[list[str], dict[str, str]]:
    """The arguments and environment that make ``mlflow server`` check every request against the auth app."""
    return (["--app-name", AUTH_APP], {"MLFLOW_AUTH_CONFIG_PATH": str(config),
                                       "MLFLOW_AUTH_ADMIN_PASSWORD": admin_password,
                                       "MLFLOW_FLASK_SERVER_SECRET_KEY": secret_key})


def _auth_client(tracking_uri: str) -> Any:
    from mlflow.server.auth.client import AuthServiceClient

    return AuthServiceClient(tracking_uri)


def create_user(tracking_uri: str, username: str, password: str) -> None:
    """A user of the server (as the admin: this process's MLFLOW_TRACKING_USERNAME); an existing one is kept."""
    from mlflow.exceptions import MlflowException

    try:
        _auth_client(tracking_uri).create_user(username, password)
    except MlflowException as e:
        if "already exists" not in str(e).lower():
            raise


def version_experiments(tracking_uri: str, model_name: str) -> set[str]:
    """The experiments holding the runs ``model_name``'s versions were registered from: their artifacts (the
    model files) are read with the experiment's permission, not the registered model's."""
    from mlflow.tracking import MlflowClient

    c = MlflowClient(tracking_uri)
    return {c.get_run(v.run_id).info.experiment_id for v in c.search_model_versions(f"name='{model_name}'")
            if v.run_id}


def grant(tracking_uri: str, model_name: str, username: str, permission: str = "READ") -> None:
    """Put ``username`` on ``model_name``'s access list with ``permission`` (READ, EDIT, MANAGE), and READ on the
    experiments its versions' files are in, so the grant lets them download it (as the admin or its manager)."""
    auth = _auth_client(tracking_uri)
    auth.grant_user_permission(username, REGISTERED_MODEL, model_name, permission)
    for experiment in sorted(version_experiments(tracking_uri, model_name)):
        auth.grant_user_permission(username, EXPERIMENT, experiment, "READ")


def revoke(tracking_uri: str, model_name: str, username: str) -> None:
    """``username`` off ``model_name``'s access list (the experiments' READ stays: other models may need it)."""
    _auth_client(tracking_uri).revoke_user_permission(username, REGISTERED_MODEL, model_name)


def is_denied(e: Exception) -> bool:
    """True for the server's refusal of this user (HTTP 403, PERMISSION_DENIED), not for a missing model."""
    return getattr(e, "error_code", None) == "PERMISSION_DENIED" or " 403 " in str(e)


def denied(uri: str, model_name: str, server: str) -> str:
    """Why a registry source cannot be read by this process's user, and what to do."""
    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    who = f"user {user!r}" if user else "an anonymous client (no MLFLOW_TRACKING_USERNAME)"
    return (f"{uri}: the MLflow server at {server} refuses {who} READ on registered model {model_name!r} (it is "
            "on an access list). Fix: ask the model's owner for READ (gauntlet.registry.access.grant), or run as an "
            "account that has it (MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD)")
