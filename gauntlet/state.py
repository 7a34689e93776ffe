"""Where Gauntlet keeps its state, and the environment that points Prefect and MLflow there.

Everything lives under ``$GAUNTLET_HOME`` (default ``./.gauntlet``): MLflow's sqlite store and
artifacts, Prefect's home and persisted results, model caches and stage outputs. This module
imports neither Prefect nor MLflow: :func:`configure_environment` must run before they load,
because both read their settings at import time.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import unquote, urlparse


def gauntlet_home() -> Path:
    return Path(os.environ.get("GAUNTLET_HOME", Path.cwd() / ".gauntlet")).resolve()


def stage_dir(stage: str, key: str) -> Path:
    """Durable output folder of one stage execution, addressed by its cache key."""
    return gauntlet_home() / "stages" / stage / key[:16]


def models_cache() -> Path:
    return gauntlet_home() / "models"


def default_tracking_uri() -> str:
    return f"sqlite:///{gauntlet_home() / 'mlflow.db'}"


def sqlite_path(uri: str) -> Path | None:
    """The file of a ``sqlite:///rel.db`` or ``sqlite:////abs/path.db`` URI; None for any other store."""
    parsed = urlparse(uri)
    if parsed.scheme != "sqlite":
        return None
    return Path(unquote(parsed.path[1:])).resolve()


def shared_tracking(uri: str) -> bool:
    """True when the MLflow store is shared between hosts (a server or a database), False for a local file (a
    sqlite file, a file store): what decides a cache hit or a lock then lives there, not on this disk."""
    scheme = urlparse(uri).scheme
    return not (scheme in ("sqlite", "file", "") or len(scheme) == 1)   # len 1: a Windows drive letter


def prefect_server() -> str | None:
    """The Prefect server every host shares (``PREFECT_API_URL``); None: this process's ephemeral one."""
    return os.environ.get("PREFECT_API_URL") or None


class StateError(RuntimeError):
    """The state folder (or a store in it) is in a shape Gauntlet cannot use or repair: the message names the
    file and the fix. Commands exit 1 with it, before anything runs."""


def configure_environment() -> Path:
    """Point Prefect and MLflow at ``$GAUNTLET_HOME`` unless the user already pointed them elsewhere."""
    home = gauntlet_home()
    home.mkdir(parents=True, exist_ok=True)
    os.environ["GAUNTLET_HOME"] = str(home)
    defaults = {
        "PREFECT_HOME": str(home / "prefect"),
        "PREFECT_LOCAL_STORAGE_PATH": str(home / "prefect" / "results"),
        # Results must persist so the cache works across processes.
        "PREFECT_RESULTS_PERSIST_BY_DEFAULT": "true",
        # ...as JSON, never pickles: a state folder may be shared (a Docker volume, a restored CI cache), and
        # unpickling a planted file runs its code.
        "PREFECT_RESULTS_DEFAULT_SERIALIZER": "json",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        # The ephemeral API's 20 s start-up limit is too short on a busy 2-core machine.
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
        "PREFECT_LOGGING_LOG_PRINTS": "true",
        "MLFLOW_TRACKING_URI": default_tracking_uri(),
        # MLflow's sqlite registry is the default; nothing here needs the file store.
        "GIT_PYTHON_REFRESH": "quiet",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    for key, value in defaults.items():
        os.environ.setdefault(key, value)
    from gauntlet.secrets import credentials_to_environment

    credentials_to_environment()   # a tracking URI without its password: MLflow prints the URI it is given
    return home


class ServerUnreachable(RuntimeError):
    pass


def check_servers(timeout_s: float = 5.0) -> None:
    """Fail fast, naming the variable to fix, when a configured MLflow or Prefect server does not answer.

    Without this, MLflow's client retries for minutes and Prefect fails mid-start; nothing heavy has
    run yet when this raises.
    """
    import urllib.error
    import urllib.request

    from gauntlet.secrets import redact_uri

    targets = []
    mlflow_uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if mlflow_uri.startswith(("http://", "https://")):
        # without credentials: urllib takes "user:password@host" for a host name (and /health needs no login)
        targets.append(("MLFLOW_TRACKING_URI", redact_uri(mlflow_uri).rstrip("/") + "/health"))
    prefect_url = os.environ.get("PREFECT_API_URL", "")
    if prefect_url.startswith(("http://", "https://")):
        targets.append(("PREFECT_API_URL", redact_uri(prefect_url).rstrip("/") + "/health"))
    for var, url in targets:
        try:
            with urllib.request.urlopen(url, timeout=timeout_s):
                pass
        except urllib.error.HTTPError:
            continue  # it answered: reachable (auth or routing is the server's business)
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise ServerUnreachable(
                f"{var}={redact_uri(os.environ[var])} does not answer ({reason}). Start that server, fix {var}, or unset "
                f"it to use the local default (sqlite MLflow / ephemeral Prefect in $GAUNTLET_HOME)."
            ) from None
