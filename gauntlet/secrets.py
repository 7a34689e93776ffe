"""Secrets kept out of everything Gauntlet logs, saves or posts.

Credentials travel in the environment: ``MLFLOW_TRACKING_URI`` may carry ``user:password@`` or a token in its
query, a webhook URL carries its token, ``HF_TOKEN`` and its kin are read by the hub clients. Whatever a
log line, an MLflow param/tag/artifact, a notification, a run summary or a Prefect artifact says goes through
:func:`redact_uri` (one URI) or :func:`redact` (free text, e.g. an error message): credentials are removed,
never masked in place, so what is left is still a working link. No Prefect, no MLflow here.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

# Query parameters whose values are credentials (matched case-insensitively, anywhere in the name).
SENSITIVE_QUERY = re.compile(r"token|secret|passw|pwd|key|sig|auth|credential|session", re.IGNORECASE)
# Environment variables whose values are secrets: named outright, or by how they end.
SECRET_ENV = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "MODELSCOPE_API_TOKEN", "MLFLOW_TRACKING_TOKEN",
              "MLFLOW_TRACKING_PASSWORD", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "PREFECT_API_KEY")
SECRET_ENV_SUFFIX = ("_TOKEN", "_PASSWORD", "_SECRET", "_API_KEY", "_SECRET_ACCESS_KEY")
# Environment variables holding URIs that may carry credentials (their credential parts are secrets too).
URI_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "PREFECT_API_URL")
MIN_SECRET_LEN = 6            # shorter values ("1", "true") would redact ordinary words
REDACTED = "***"
_URI_IN_TEXT = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]*://[^\s'\"<>|)\]]+")


def redact_uri(uri: str) -> str:
    """``uri`` without credentials: the ``user:password@`` part and credential query parameters removed.

    >>> redact_uri("http://alice:s3cret@mlflow.internal:5000/?token=abc&page=2")
    'http://mlflow.internal:5000/?page=2'
    """
    try:
        parts = urlsplit(uri)
    except ValueError:
        return REDACTED
    if not parts.scheme or not parts.netloc and not parts.query:
        return uri
    netloc = parts.netloc.rpartition("@")[2]
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if not SENSITIVE_QUERY.search(k)]
    return urlunsplit((parts.scheme, netloc, parts.path, urlencode(query), parts.fragment))


def secret_values(environ: dict[str, str] | None = None) -> list[str]:
    """The secret values in the environment: tokens and passwords, and the credential parts of URIs."""
    env = os.environ if environ is None else environ
    values = [v for k, v in env.items() if k in SECRET_ENV or k.endswith(SECRET_ENV_SUFFIX)]
    for name in URI_ENV:
        uri = env.get(name, "")
        try:
            parts = urlsplit(uri)
        except ValueError:
            continue
        if parts.password:
            values.append(parts.password)
        values += [v for k, v in parse_qsl(parts.query) if SENSITIVE_QUERY.search(k)]
    return sorted({v for v in values if len(v) >= MIN_SECRET_LEN}, key=len, reverse=True)


def redact(text: str, environ: dict[str, str] | None = None) -> str:
    """``text`` with every URI's credentials removed and every secret value from the environment replaced."""
    text = _URI_IN_TEXT.sub(lambda m: redact_uri(m.group(0)), text)
    for value in secret_values(environ):
        text = text.replace(value, REDACTED)
    return text


def with_credentials(uri: str, environ: dict[str, str] | None = None) -> str:
    """The credentialed ``MLFLOW_TRACKING_URI`` when ``uri`` is its redacted form, else ``uri``.

    A program's arguments file (an MLflow artifact) names the tracking store by its redacted URI; the program,
    which inherits the environment, gets the credentials back from there."""
    env = os.environ if environ is None else environ
    configured = env.get("MLFLOW_TRACKING_URI", "")
    return configured if configured and redact_uri(configured) == uri else uri


def credentials_to_environment(environ: dict[str, str] | None = None) -> None:
    """Move ``user:password@`` out of ``MLFLOW_TRACKING_URI`` into ``MLFLOW_TRACKING_USERNAME``/``_PASSWORD``
    (MLflow's own basic-auth variables), so the URI itself holds no secret: MLflow prints it ("View run … at")
    and children inherit it. Variables the user set already win."""
    from urllib.parse import unquote

    env = os.environ if environ is None else environ
    uri = env.get("MLFLOW_TRACKING_URI", "")
    try:
        parts = urlsplit(uri)
    except ValueError:
        return
    if parts.scheme not in ("http", "https") or parts.username is None:
        return
    env.setdefault("MLFLOW_TRACKING_USERNAME", unquote(parts.username))
    env.setdefault("MLFLOW_TRACKING_PASSWORD", unquote(parts.password or ""))
    env["MLFLOW_TRACKING_URI"] = urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


def api_key(env: str | None, secret_block: str | None, where: str,
            read_secret: Callable[[str], str] | None = None) -> str | None:
    """An endpoint's API key from the environment variable or the Prefect Secret block a config names (both by name:
    the key is never in a config, a log or a cache key); None when it names neither. ``where``: the config path of
    the two fields (``eval.judge``), for the fix. ``read_secret`` reads a block (the stage's, where Prefect is).
    LookupError when the variable is not set or no reader was handed in for the block."""
    if env:
        key = os.environ.get(env)
        if not key:
            raise LookupError(f"{where}.api_key_env names {env!r}, which is not set. Fix: export it where the flow runs")
        return key
    if secret_block:
        if read_secret is None:
            raise LookupError(f"{where}.api_key_secret names Prefect Secret block {secret_block!r}, which only a "
                              "stage can read")
        return read_secret(secret_block)
    return None
