"""What every config section shares: strict pydantic models and paths resolved against the project."""

from __future__ import annotations

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


def resolve(path: str, info: ValidationInfo) -> Path:
    """``path`` from a config: relative to the validation context's root (default: the project root)."""
    root = Path((info.context or {}).get("root") or project_root())
    p = Path(path)
    return p if p.is_absolute() else root / p


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

