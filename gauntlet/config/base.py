"""What every config section shares: strict pydantic models and paths resolved against the project."""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path
from urllib.parse import unquote, urlparse

import yaml
from pydantic import BaseModel, ConfigDict, ValidationInfo

from gauntlet.project import project_root


class Strict(BaseModel):
    # allow_inf_nan: nan or inf (`.nan`, `.inf`, `--set x=inf`) means nothing in any setting, and a field without a
    # bound took them (gate.min_average: .nan; timeout_minutes: .inf passes gt=0): refused, naming the field
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def require_unique(names: list[str], what: str, fix: str) -> None:
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"{what} name(s) {twice} used more than once; {fix}")


def resolve(path: str, info: ValidationInfo, inside: bool = True) -> Path:
    """``path`` from a config: relative to the validation context's root (default: the project root).

    A config read from a file is untrusted input (CI runs configs from pull requests): with ``inside`` (the
    default) the path, symlinks followed, must stay inside that root, or ValueError names it and the fix. Specs
    built in code (no validation context: the library's own callers, tests) are trusted as they are."""
    from_file = bool(info.context and info.context.get("root"))
    root = Path((info.context or {}).get("root") or project_root())
    p = Path(path)
    p = p if p.is_absolute() else root / p
    if inside and from_file:
        check_inside(p, root)
    return usable(p)


MAX_PATH_CHARS = 1024   # room under the OS's 4096 for the files a check looks up below a configured folder


def usable(path: Path) -> Path:
    """``path``, or ValueError when the file system refuses to look it up (a name over its length limit, a NUL
    byte, a folder that may not be read, a symlink loop): a config's path is untrusted text, and an ``OSError``
    from ``Path.exists()`` would escape validation. A path that simply does not exist is fine here."""
    text = str(path)
    if len(text) > MAX_PATH_CHARS or any(len(part.encode()) > 255 for part in path.parts):
        raise ValueError(f"path {text[:80]!r}… is too long. Fix: use a path of at most {MAX_PATH_CHARS} characters "
                         "and names of at most 255 bytes")
    try:
        os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        pass
    except ValueError:
        raise ValueError(f"path {text!r} contains a NUL byte. Fix: remove it") from None
    except OSError as e:
        raise ValueError(f"path {text!r} cannot be looked up ({e.strerror or (errno.errorcode.get(e.errno) if e.errno is not None else None)}). "
                         "Fix: point at a file or folder this user may read") from None
    return path


def check_inside(path: Path, root: Path) -> None:
    """ValueError unless ``path`` (``..`` and symlinks resolved) lies inside ``root``."""
    real, real_root = Path(path).resolve(), Path(root).resolve()
    if real != real_root and real_root not in real.parents:
        via = f" (via a symlink to {str(real)!r})" if Path(os.path.normpath(path)) != real else ""
        raise ValueError(f"{str(path)!r} is outside the project {str(real_root)!r}{via}; a config may only name "
                         f"files inside its project. Fix: move or `dvc import` the file into the project and "
                         f"give its path relative to the project root")


# One name pattern for registered models, experiments and registry URIs: a subset of what MLflow accepts that is
# also safe in a file name, a URL path, a SQL filter string and HTML (no quotes, slashes, spaces or markup).
MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


def check_model_name(name: str) -> str:
    if not MODEL_NAME.match(name) or ".." in name:
        raise ValueError(f"{name!r} is not a valid model name. Fix: use 1-100 letters, digits, '.', '_' or '-', "
                         f"starting with a letter or digit (e.g. support-bot)")
    return name


def dvc_produces(repo: Path, path: str) -> bool:
    """True when ``path`` is an output of a stage in ``repo/dvc.yaml`` or has a ``.dvc`` file."""
    if os.path.exists(repo / f"{path}.dvc"):   # os.path: a name too long for the OS is simply not there
        return True
    dvc_yaml = repo / "dvc.yaml"
    if not dvc_yaml.exists():
        return False
    stages = (yaml.safe_load(dvc_yaml.read_text()) or {}).get("stages", {})
    for stage in stages.values():
        for out in stage.get("outs", []):
            out_path = next(iter(out)) if isinstance(out, dict) else out
            if path == out_path or path.startswith(out_path.rstrip("/") + "/"):
                return True
    return False


# MLflow stores a config may name (tracking.tracking_uri): a server, or a database MLflow speaks SQL to.
SERVER_SCHEMES = ("http", "https")
DATABASE_SCHEMES = ("postgresql", "mysql", "mssql")   # with an optional driver: postgresql+psycopg2://
STORE_FIX = ("Fix: use an MLflow server (http://host:5000), a database URL (postgresql://host/db), or a store "
             "inside the project (sqlite:///.gauntlet/mlflow.db, a relative folder such as mlruns)")


def check_store_location(uri: str, info: ValidationInfo) -> str:
    """``uri`` when it names an MLflow server, a database server, or a sqlite file / file store inside the project;
    ValueError with the fix otherwise. A config is untrusted: ``sqlite:////tmp/x.db`` or ``file:///etc/…`` would
    have a pull request's run write (and read) a store anywhere on the machine."""
    parsed = urlparse(uri)
    scheme = parsed.scheme.lower()
    if scheme in SERVER_SCHEMES:
        if not parsed.hostname:
            raise ValueError(f"{uri!r} names no host. {STORE_FIX}")
        return uri
    if scheme.split("+", 1)[0] in DATABASE_SCHEMES:   # a host, or the local server's socket (postgresql:///db)
        return uri
    if scheme == "sqlite":
        if not parsed.path.startswith("/") or parsed.netloc or parsed.path in ("/", "/:memory:"):
            raise ValueError(f"{uri!r} is not a sqlite file URL (sqlite:///relative.db, sqlite:////absolute.db). "
                             f"{STORE_FIX}")
        where = unquote(parsed.path[1:])   # what gauntlet.state.sqlite_path opens
    elif scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise ValueError(f"{uri!r} names another machine ({parsed.netloc}). {STORE_FIX}")
        where = unquote(parsed.path)
    elif scheme:
        raise ValueError(f"{uri!r} is not a store Gauntlet accepts (scheme {scheme!r}). {STORE_FIX}")
    else:
        where = uri
    try:
        resolve(where, info)
    except ValueError as e:
        reason = str(e).partition(" Fix: ")[0].partition("; ")[0].rstrip(".")
        raise ValueError(f"{uri!r}: {reason}. {STORE_FIX}") from None
    return uri
