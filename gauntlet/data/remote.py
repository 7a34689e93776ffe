"""Reaching a DVC remote: which failures pass (the remote does not answer, the network fails) and how many
tries a pull gets. DVC reports a remote it cannot reach as one that lacks the files, so :func:`unreachable` asks
the remote itself before anything is reproduced (``gauntlet.data.dvc``)."""

from __future__ import annotations

import urllib.error
import urllib.request
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dvc.repo import Repo

PULL_ATTEMPTS = 4              # tries of `dvc pull` when the remote does not answer or the repo is locked
PULL_BACKOFF_S = 2.0           # the delay before the second try; it doubles after each


class DataUnavailable(RuntimeError):
    """The data could not be pulled for a reason that passes (network, a busy DVC lock), after every try.
    Not a DataError: the stage's own retries apply too."""


def network_cause(exc: BaseException) -> str | None:
    """The network error (connection refused, reset, timed out, name unknown) behind ``exc``, if any."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, (ConnectionError, TimeoutError, urllib.error.URLError)) or \
                type(seen).__module__.startswith(("aiohttp", "requests", "urllib3", "botocore")):
            return f"{type(seen).__name__}: {seen}"
        seen = seen.__cause__ or seen.__context__
    return None


def unreachable(repo: Repo, name: str | None) -> str | None:
    """Why the remote cannot be reached, or None when it answers (a local folder is always reachable: DVC
    makes it on the first push). An HTTP remote answers with any status; others are asked for their root."""
    try:
        remote = repo.cloud.get_remote(name)
    except Exception as exc:  # no such remote: the pull's own error says so
        return network_cause(exc)
    scheme = remote.fs.protocol if isinstance(remote.fs.protocol, str) else remote.fs.protocol[0]
    if scheme in ("local", "file"):
        return None
    url = remote.path if "://" in remote.path else remote.fs.unstrip_protocol(remote.path)
    try:
        if scheme in ("http", "https"):
            urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=10).close()
        else:
            remote.fs.exists(remote.path)
    except urllib.error.HTTPError:
        return None
    except Exception as exc:  # every transport has its own errors: one that raises here is not answering
        return f"{type(exc).__name__}: {exc}"
    return None
