"""Helpers the tests share (fixtures are in conftest.py): the repository, demo DVC repos, registered champions."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent


def make_demo_dvc_repo(repo: Path) -> Path:
    """A fresh git+DVC repo holding the demo's data stage, with an empty local remote. The stage's code is
    copied too (dvc.lock records its md5); DVC's `python -m gauntlet.demo.data` runs that same file."""
    for rel in ("dvc.yaml", "dvc.lock", "params.yaml", ".dvcignore", ".dvc/config", ".dvc/.gitignore",
                "gauntlet/demo/data.py"):
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / rel, repo / rel)
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    return repo


def register_as_champion(c, experiment: str, folder: Path, name: str, tags: dict[str, str]) -> str:
    """Register ``folder`` as a new version of ``name`` @champion, the way MLflow users do: the folder
    as a run's artifact, then a version from it (tests that need a champion without a training run)."""
    from gauntlet.tracking import experiment_id

    run = c.create_run(experiment_id(c, experiment), run_name="register")
    c.log_artifacts(run.info.run_id, str(folder), "model")
    if not c.search_registered_models(f"name='{name}'"):
        c.create_registered_model(name)
    version = str(c.create_model_version(name, source=f"{run.info.artifact_uri}/model", run_id=run.info.run_id,
                                         tags=tags).version)
    c.set_terminated(run.info.run_id, "FINISHED")
    c.set_registered_model_alias(name, "champion", version)
    return version


def write_demo_config(tmp_path: Path, mutate, name: str = "config.yaml") -> Path:
    """configs/demo.yaml changed by ``mutate(raw_dict)``, written to ``tmp_path/name``."""
    raw = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    mutate(raw)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return path
