"""What every config section shares: strict pydantic models and paths resolved against the project."""

from __future__ import annotations

import os
import re
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, ValidationInfo

from gauntlet.project import project_root


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


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
    return p


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
    if (repo / f"{path}.dvc").exists():
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

