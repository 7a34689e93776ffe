"""Shared test set-up: a temporary $GAUNTLET_HOME, a real sqlite MLflow, one real Prefect test API.

Environment variables are set at import time, before Prefect or MLflow are imported anywhere,
because both read their settings on import.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

_SESSION_HOME = Path(tempfile.mkdtemp(prefix="gauntlet-tests-"))
os.environ["GAUNTLET_HOME"] = str(_SESSION_HOME)
os.environ.pop("MLFLOW_TRACKING_URI", None)
os.environ.pop("PREFECT_API_URL", None)

from tasks.state import configure_environment  # noqa: E402

configure_environment()


@pytest.fixture(scope="session")
def prefect_api():
    """One real Prefect API (temporary server on a sqlite database) for the whole session (~10 s)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def session_home() -> Path:
    return _SESSION_HOME


def make_demo_dvc_repo(repo: Path) -> Path:
    """A fresh git+DVC repo holding the demo's data stage, with an empty local remote."""
    import shutil
    import subprocess

    from tasks.state import PROJECT_ROOT

    for rel in ("dvc.yaml", "dvc.lock", "params.yaml", ".dvcignore", ".dvc/config", ".dvc/.gitignore",
                "tasks/demo_data.py"):
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(PROJECT_ROOT / rel, repo / rel)
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    return repo


@pytest.fixture(scope="module")
def dvc_repo(tmp_path_factory) -> Path:
    return make_demo_dvc_repo(tmp_path_factory.mktemp("dvc-repo"))


@pytest.fixture(scope="session")
def quantize_env() -> Path:
    """The quantize stage's own venv (llm-compressor), made once per session the way the pipeline makes it:
    under $GAUNTLET_HOME/envs/quantize, or reused from $GAUNTLET_QUANT_VENV (`make test` sets it, so
    repeated runs pay the pip install once). The demo pipeline in the same session finds it ready."""
    import time

    from tasks.envs import QUANTIZE_ENV

    started = time.time()
    python = QUANTIZE_ENV.ensure()
    print(f"\nquantize environment {QUANTIZE_ENV.path()} ready in {time.time() - started:.0f}s")
    return python


def register_as_champion(c, experiment: str, folder: Path, name: str, tags: dict[str, str]) -> str:
    """Register ``folder`` as a new version of ``name`` @champion, the way MLflow users do: the folder
    as a run's artifact, then a version from it (tests that need a champion without a training run)."""
    from tasks.tracking import experiment_id

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
    import yaml

    from tasks.state import PROJECT_ROOT

    raw = yaml.safe_load((PROJECT_ROOT / "configs" / "demo.yaml").read_text())
    mutate(raw)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return path
