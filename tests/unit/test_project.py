"""Which project a command works on: found from the working directory upward; a gauntlet installed from
another clone of this repository refuses, naming both checkouts and the fix (gauntlet/project.py)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gauntlet.project import ProjectError, check_checkout, find_root
from tests.helpers import REPO

GAUNTLET = Path(sys.executable).with_name("gauntlet")    # the console script of the environment under test


def run_gauntlet(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "GAUNTLET_PROJECT_ROOT"}
    return subprocess.run([str(GAUNTLET), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def second_clone(tmp_path: Path) -> Path:
    """Another checkout of this repository: its own pyproject, dvc.yaml and configs (and its own code)."""
    clone = tmp_path / "second-clone"
    for rel in ("pyproject.toml", "dvc.yaml", "params.yaml", "configs", "evals", "gauntlet"):
        src, dst = REPO / rel, clone / rel
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src, dst)
    return clone


def test_from_a_second_clone_the_first_clones_gauntlet_stops_naming_both(tmp_path: Path) -> None:
    clone = second_clone(tmp_path)
    proc = run_gauntlet("validate", "configs/demo.yaml", cwd=clone)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert str(REPO) in proc.stderr and str(clone) in proc.stderr       # both checkouts, by path
    assert "pip install -e" in proc.stderr and ".venv/bin/gauntlet" in proc.stderr   # and the fix
    assert "valid" not in proc.stdout                                    # nothing read from either


def test_in_the_checkout_and_below_it_the_project_is_the_checkout() -> None:
    assert find_root(REPO / "gauntlet" / "eval") == REPO
    proc = run_gauntlet("validate", "../configs/demo.yaml", cwd=REPO / "docs")
    assert proc.returncode == 0 and "valid" in proc.stdout, proc.stderr


def test_a_users_own_project_is_read_from_where_they_stand(tmp_path: Path) -> None:
    """A project that is not a clone of this repository (its own dvc.yaml, configs and model folder):
    relative paths in its config resolve there, not in the checkout gauntlet was installed from."""
    project = tmp_path / "my-project"
    (project / "configs").mkdir(parents=True)
    shutil.copy(REPO / "dvc.yaml", project / "dvc.yaml")
    (project / "models" / "mine").mkdir(parents=True)
    config = (REPO / "configs" / "demo.yaml").read_text().replace("demo://tiny-llama", "models/mine")
    assert "models/mine" in config
    (project / "configs" / "mine.yaml").write_text(config)
    proc = run_gauntlet("validate", "configs/mine.yaml", cwd=project)
    # data and evals are not there: the problems name the user's project, never the checkout
    assert proc.returncode == 2
    assert str(project) in proc.stderr and str(REPO) not in proc.stderr
    assert "model.source" not in proc.stderr            # models/mine was found in the user's project


def test_outside_any_project_the_command_says_where_to_stand(tmp_path: Path) -> None:
    shutil.copy(REPO / "configs" / "demo.yaml", tmp_path / "x.yaml")   # its relative paths need a project
    proc = run_gauntlet("validate", "x.yaml", cwd=tmp_path)
    assert proc.returncode == 2 and "no Gauntlet project" in proc.stderr and "GAUNTLET_PROJECT_ROOT" in proc.stderr


def test_check_checkout_compares_checkouts_only(tmp_path: Path) -> None:
    clone = second_clone(tmp_path)
    with pytest.raises(ProjectError, match="installed from the checkout"):
        check_checkout(clone, installed=REPO)
    check_checkout(REPO, installed=REPO)                 # the same checkout
    check_checkout(clone, installed=None)                # a wheel: no checkout to compare with
    user = tmp_path / "user"
    (user / "configs").mkdir(parents=True)
    (user / "dvc.yaml").write_text("stages: {}\n")
    check_checkout(user, installed=REPO)                 # a user's project, not a clone
