"""Several processes on one state folder: MLflow's store set up once under a lock, a half-migrated store
finished or named with the fix (real `gauntlet` subprocesses on a fresh $GAUNTLET_HOME each); two runs of
one stage key computing it once."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

from prefect import flow
from pydantic import BaseModel

from gauntlet.tasks._stage import StageRun, stage
from tests.helpers import REPO


def child_env(home: Path) -> dict[str, str]:
    """A child with its own state folder: none of the test session's MLflow or Prefect settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env["GAUNTLET_HOME"] = str(home)
    return env


def gauntlet(*args: str, home: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "gauntlet.cli", *args], env=child_env(home), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def history_answers(home: Path, n: int) -> list[tuple[int, str]]:
    procs = [gauntlet("history", "no-such-model", home=home) for _ in range(n)]
    return [(p.wait(timeout=300), p.stdout.read()) for p in procs]


def assert_answered(answers: list[tuple[int, str]]) -> None:
    """Each command answered the question (exit 2: no such model), none crashed on the store."""
    for rc, out in answers:
        assert rc == 2 and "no registered model named 'no-such-model'" in out and "Traceback" not in out, out


def test_four_commands_at_once_on_a_fresh_state_folder(tmp_path: Path) -> None:
    """Without the set-up lock, three of four crash in MLflow's migration and the store is left half-migrated."""
    home = tmp_path / "home"
    assert_answered(history_answers(home, 4))
    assert_answered(history_answers(home, 1))   # and the store they left is whole


def schema_version(db: Path) -> str:
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT version_num FROM alembic_version").fetchone()[0]


def mlflow_revisions() -> list[str]:
    """MLflow's schema revisions, newest first."""
    from alembic.script import ScriptDirectory
    from mlflow.store.db.utils import _get_alembic_config

    return [r.revision for r in ScriptDirectory.from_config(_get_alembic_config("")).walk_revisions()]


def test_an_interrupted_migration_is_finished(tmp_path: Path) -> None:
    """A store left mid-migration (an older schema and an unfinished `_alembic_tmp_tags` copy, as a killed
    process leaves it) is finished by the next command."""
    import sqlalchemy
    from alembic import command
    from mlflow.store.db.utils import InitialBase, _get_alembic_config

    home = tmp_path / "home"
    home.mkdir()
    db = home / "mlflow.db"
    uri = f"sqlite:///{db}"
    revisions = mlflow_revisions()
    engine = sqlalchemy.create_engine(uri)
    InitialBase.metadata.create_all(engine)
    config = _get_alembic_config(uri)
    with engine.begin() as conn:
        config.attributes["connection"] = conn
        command.upgrade(config, revisions[10])
        conn.execute(sqlalchemy.text("CREATE TABLE _alembic_tmp_tags AS SELECT * FROM tags"))
    engine.dispose()
    assert schema_version(db) == revisions[10]
    assert_answered(history_answers(home, 2))
    assert schema_version(db) == revisions[0]
    with sqlite3.connect(db) as conn:
        assert not conn.execute("SELECT name FROM sqlite_master WHERE name LIKE '_alembic_tmp_%'").fetchall()


def test_a_store_that_cannot_be_finished(tmp_path: Path) -> None:
    """A migration that cannot finish: an empty store is set aside and started afresh; one holding a
    registered model is left alone and named with the fix (exit 1)."""
    from mlflow.tracking import MlflowClient

    revisions = mlflow_revisions()
    for holds_a_model in (False, True):
        home = tmp_path / f"home-{holds_a_model}"
        assert_answered(history_answers(home, 1))
        db = home / "mlflow.db"
        if holds_a_model:
            MlflowClient(tracking_uri=f"sqlite:///{db}").create_registered_model("kept")
        with sqlite3.connect(db) as conn:   # the schema says "old", the tables are new: the migration fails
            conn.execute("UPDATE alembic_version SET version_num = ?", (revisions[30],))
        p = gauntlet("history", "no-such-model", home=home)
        rc, out = p.wait(timeout=300), p.stdout.read()
        if holds_a_model:
            assert rc == 1 and "half-migrated" in out and "mlflow db upgrade" in out and "Traceback" not in out, out
            assert schema_version(db) == revisions[30]   # left as it was, for the user to back up
        else:
            assert_answered([(rc, out)])
            assert list(home.glob("mlflow.db.half-migrated-*")) and schema_version(db) == revisions[0]


class Counted(BaseModel):
    value: int
    computed_by: str


def _count_once(value: int, stage: StageRun) -> Counted:
    """Slow enough for a second caller to arrive while it runs; leaves a line per computation."""
    time.sleep(3)
    with open(stage.out / "computations.txt", "a") as fh:
        fh.write(f"{threading.current_thread().name}\n")
    return Counted(value=value * 2, computed_by=threading.current_thread().name)


_count_once.__module__ = "gauntlet.tasks._stage"   # code versions are taken of Gauntlet modules only
count_once = stage("count-once", key=lambda value: [value])(_count_once)


@flow
def call_count_once(value: int, tag: str) -> Counted:
    from gauntlet.tracking import parent_run, tracking_uri

    with parent_run(tracking_uri(), "concurrency-tests", tag, {}, {}) as run:
        return count_once(value=value, run=run)


def test_two_runs_with_one_key_compute_it_once(prefect_api) -> None:
    """Two flow runs reach the same stage key together: one computes, the other waits for the key's lock and
    takes the recorded result (without the lock both compute, into the same folder)."""
    value = int(time.time())   # a key no earlier session has used
    results: dict[str, Counted] = {}

    def go(tag: str) -> None:
        results[tag] = call_count_once(value=value, tag=tag)

    threads = [threading.Thread(target=go, args=(tag,), name=tag) for tag in ("first", "second")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    out = count_once.output_dir(value=value)
    assert (out / "computations.txt").read_text().count("\n") == 1
    assert results["first"] == results["second"] and results["first"].value == value * 2
    assert json.loads((out / "receipt.json").read_text())["result"]["value"] == value * 2


def test_an_unreadable_receipt_is_a_logged_cache_miss(prefect_api, caplog) -> None:
    value = int(time.time()) + 10**9
    call_count_once(value=value, tag="first")
    out = count_once.output_dir(value=value)
    receipt = out / "receipt.json"
    receipt.write_text(receipt.read_text()[:20])   # truncated, as a crash mid-write used to leave it
    with caplog.at_level("WARNING"):
        again = call_count_once(value=value, tag="second")
    assert again.value == value * 2
    assert (out / "computations.txt").read_text().count("\n") == 2
    assert json.loads(receipt.read_text())["result"]["value"] == value * 2
    assert "is unreadable" in caplog.text and "a cache miss, computing it again" in caplog.text


def test_eight_evaluations_at_once_on_one_state_folder(tmp_path: Path, tiny_model: Path) -> None:
    """Eight `gauntlet eval` processes of one model on a fresh state folder: every one succeeds (MLflow's and
    Prefect's stores set up once, the one stage key computed once and reused) and all report the same score."""
    model = tiny_model
    home = tmp_path / "home"
    outputs = [tmp_path / f"report-{i}.json" for i in range(8)]
    procs = [gauntlet("eval", str(model), "--task", "arc_challenge", "--fixtures", "--set", "limit=4",
                      "--set", "speed_probe.enabled=false", "--output", str(out), home=home) for out in outputs]
    answers = [(p.wait(timeout=900), p.stdout.read()) for p in procs]
    failed = [out[-2000:] for rc, out in answers if rc != 0]
    assert not failed, failed
    scores = {json.loads(out.read_text())["task_results"][0]["value"] for out in outputs}
    assert len(scores) == 1, scores


def test_two_runs_of_one_config_at_once_train_once(tmp_path: Path, dvc_repo: Path) -> None:
    """Two `gauntlet run` of the demo config started together on a fresh state folder (and one DVC repo): both
    succeed, the second waits on the training stage's lock and takes its result, one version is registered."""
    home = tmp_path / "home"
    args = ("run", "configs/demo.yaml", "--set", f"data.repo={dvc_repo}", "--set", "quantize.variants=[]",
            "--set", "gate.register_variants=[]",
            "--set", "train.max_steps=20", "--set", "eval.speed_probe.enabled=false")
    procs = [gauntlet(*args, home=home) for _ in range(2)]
    answers = [(p.wait(timeout=900), p.stdout.read()) for p in procs]
    assert all(rc == 0 for rc, _ in answers), [out[-3000:] for _, out in answers]
    launches = sum(out.count("launching: ") for _, out in answers)
    assert launches == 1, launches   # one `accelerate launch` of the trainer between them
    assert len(list((home / "stages" / "train").iterdir())) == 1
    from mlflow.tracking import MlflowClient

    versions = MlflowClient(f"sqlite:///{home / 'mlflow.db'}").search_model_versions("name='gauntlet-demo'")
    assert len(versions) == 1
