"""Faults: the flow process killed during evaluation, then re-run, as a user would (two CLI processes
with their own ephemeral Prefect API and sqlite MLflow in a fresh $GAUNTLET_HOME)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import REPO

pytestmark = pytest.mark.slow


def cli_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    return {**env, "GAUNTLET_HOME": str(home)}


def test_killed_during_evaluation_then_rerun(dvc_repo: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    cmd = [sys.executable, "-m", "gauntlet.cli", "run", str(REPO / "configs" / "demo.yaml"),
           "--set", f"data.repo={dvc_repo}"]
    log = open(tmp_path / "first.log", "w")  # noqa: SIM115 (the child's output for the whole test)
    proc = subprocess.Popen(cmd, env=cli_env(home), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 600
    # the evaluate stage creates its durable folder when it starts
    while time.time() < deadline and proc.poll() is None and not list((home / "stages").glob("evaluate/*")):
        time.sleep(0.2)
    assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()

    rerun = subprocess.run(cmd, env=cli_env(home), capture_output=True, text=True, timeout=900)
    out = rerun.stdout + rerun.stderr
    assert rerun.returncode == 0, out[-3000:]
    for stage in ("pull_data", "fetch_model", "check_data", "train"):
        assert any(f"Task run '{stage}-" in line and "Cached" in line for line in out.splitlines()), stage

    from mlflow.tracking import MlflowClient

    c = MlflowClient(tracking_uri=f"sqlite:///{home / 'mlflow.db'}")
    assert len(c.search_model_versions("name='gauntlet-demo'")) == 1
    assert c.get_model_version_by_alias("gauntlet-demo", "champion").version
    # the killed run could not mark itself; the re-run found its process gone and marked it FAILED
    statuses = sorted(r.info.status for r in c.search_runs(
        [c.get_experiment_by_name("gauntlet-demo").experiment_id]) if "mlflow.parentRunId" not in r.data.tags)
    assert statuses == ["FAILED", "FINISHED"], statuses
    assert not c.search_runs([c.get_experiment_by_name("gauntlet-demo").experiment_id], "attributes.status = 'RUNNING'")


def test_a_training_past_its_time_limit_is_stopped_and_the_run_fails_naming_the_stage(dvc_repo: Path,
                                                                                      tmp_path: Path) -> None:
    """train.timeout_minutes: the trainer (its whole process group) is killed at the limit; the run exits
    failed naming the stage and the setting, its MLflow run FAILED, no trainer left running, nothing registered."""
    import sqlite3

    home = tmp_path / "home"
    proc = subprocess.run([sys.executable, "-m", "gauntlet.cli", "run", "configs/demo.yaml",
                           "--set", f"data.repo={dvc_repo}", "--set", "quantize.variants=[]",
                           "--set", "gate.register_variants=[]", "--set", "train.timeout_minutes=0.05"],
                          env=cli_env(home), cwd=REPO, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    assert "train stage: stopped after train.timeout_minutes=0.05" in out, out[-3000:]
    args_files = list((home / "stages" / "train").rglob("train_args.json"))
    assert args_files   # it was launched ...
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert not [line for line in ps.splitlines() if str(args_files[0].parent) in line]   # ... and nothing of it runs
    with sqlite3.connect(home / "mlflow.db") as db:
        statuses = {row[0] for row in db.execute("SELECT status FROM runs WHERE name LIKE 'train%'")}
        assert statuses == {"FAILED"}, statuses
        assert db.execute("SELECT COUNT(*) FROM model_versions").fetchone()[0] == 0


def test_an_evaluation_past_its_time_limit_is_stopped_naming_the_stage(tmp_path: Path, tiny_model: Path) -> None:
    """eval.timeout_minutes: the scoring stops at the first model batch past the limit; `gauntlet eval` exits
    failed naming the stage and the setting, the score stage's MLflow run is FAILED. The same evaluation
    with a limit it fits in passes (the limit changes nothing else: no part of the key)."""
    import json
    import sqlite3

    model = tiny_model
    home = tmp_path / "home"

    def evaluate(minutes: float) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "gauntlet.cli", "eval", str(model), "--task", "arc_challenge",
                               "--fixtures", "--set", "limit=8", "--set", "batch_size=1",
                               "--set", "speed_probe.enabled=false", "--set", f"timeout_minutes={minutes}",
                               "--output", str(tmp_path / "report.json")],
                              env=cli_env(home), cwd=REPO, capture_output=True, text=True, timeout=600)

    stopped = evaluate(0.0001)         # 6 ms: past it before the second of 32 model batches
    out = stopped.stdout + stopped.stderr
    assert stopped.returncode != 0, out[-3000:]
    assert "score stage (arc_challenge): stopped after eval.timeout_minutes=0.0001" in out, out[-3000:]
    assert not (tmp_path / "report.json").exists()
    with sqlite3.connect(home / "mlflow.db") as db:
        statuses = {row[0] for row in db.execute("SELECT status FROM runs WHERE name LIKE 'score%'")}
    assert statuses == {"FAILED"}, statuses

    fits = evaluate(10)
    assert fits.returncode == 0, (fits.stdout + fits.stderr)[-3000:]
    assert json.loads((tmp_path / "report.json").read_text())["task_results"][0]["task"] == "arc_challenge"
