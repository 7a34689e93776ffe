"""MLflow as the record: one parent run per flow run, one nested run per stage.

Uses ``MlflowClient`` with explicit run ids rather than MLflow's thread-local "active run", because
Prefect may run tasks in worker threads. A stage that raises leaves its run FAILED, with the error
as an artifact and whatever it logged before.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import threading
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from pydantic import BaseModel, ConfigDict

from gauntlet.project import ProjectError, project_root
from gauntlet.secrets import redact, redact_uri
from gauntlet.state import StateError, default_tracking_uri, gauntlet_home, sqlite_path

log = logging.getLogger(__name__)


class RunContext(BaseModel):
    """Where a stage logs: handed from the flow to each task (never part of a cache key)."""

    model_config = ConfigDict(frozen=True)
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    flow_run_id: str | None = None


def tracking_uri(configured: str | None = None) -> str:
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()


def client(uri: str):
    from mlflow.tracking import MlflowClient

    prepare_store(uri)
    return MlflowClient(tracking_uri=uri)


_prepared: set[str] = set()
_prepared_lock = threading.Lock()
STORE_SETUP_TIMEOUT_S = 600.0


def prepare_store(uri: str) -> None:
    """Create, migrate or repair a sqlite MLflow store once, under an inter-process lock next to it.

    MLflow migrates a sqlite store on first use without a lock: two processes that open a fresh store at once
    both run the migrations and both fail half-way ("table _alembic_tmp_tags already exists"), leaving a store
    every later command refuses. Here one process sets the store up while the others wait; they then find it
    current and go on. Other stores (servers, remote databases) are the server's business."""
    path = sqlite_path(uri)
    if path is None or uri in _prepared:
        return
    from filelock import FileLock, Timeout

    path.parent.mkdir(parents=True, exist_ok=True)
    with _prepared_lock:
        if uri in _prepared:
            return
        try:
            with FileLock(str(path) + ".setup.lock", timeout=STORE_SETUP_TIMEOUT_S):
                _set_up_sqlite_store(uri, path)
        except Timeout:
            raise StateError(f"waited {STORE_SETUP_TIMEOUT_S:.0f}s for another process to set up the MLflow "
                             f"store {path}; if none is running, delete {path}.setup.lock") from None
        _prepared.add(uri)


def _set_up_sqlite_store(uri: str, path: Path) -> None:
    """Holding the set-up lock: a new store is created; a half-migrated one (an interrupted migration's
    ``_alembic_tmp_*`` tables, a schema version short of MLflow's) is finished; one that cannot be finished is
    set aside if it holds nothing yet, and otherwise named with the fix."""
    import sqlalchemy
    from mlflow.store.db import utils as db

    engine = sqlalchemy.create_engine(uri)
    try:
        if db._is_empty_database(engine):
            return _migrate(engine, uri, path)
        tables = set(sqlalchemy.inspect(engine).get_table_names())
        leftovers = sorted(t for t in tables if t.startswith("_alembic_tmp_"))
        current, head = db._get_schema_version(engine), db._get_latest_schema_revision()
        if not leftovers and current == head and db._all_tables_exist(engine):
            return None
        log.warning("MLflow store %s is half-migrated (schema %s, MLflow wants %s; leftover tables: %s): "
                    "finishing the migration", path, current, head, ", ".join(leftovers) or "none")
        if path.parent != gauntlet_home() and current != head and not leftovers:
            raise StateError(f"the MLflow store {path} has schema {current}, this MLflow wants {head}. "
                             f"Fix: back it up, then run `mlflow db upgrade {uri}`")
        with engine.begin() as conn:
            for tmp in leftovers:
                if tmp.removeprefix("_alembic_tmp_") not in tables:
                    raise StateError(f"the MLflow store {path} lost table {tmp.removeprefix('_alembic_tmp_')!r} "
                                     f"in an interrupted migration (its copy is in {tmp!r}). Fix: restore "
                                     f"{path.name} from a backup, or move it aside to start an empty store")
                conn.execute(sqlalchemy.text(f'DROP TABLE "{tmp}"'))  # an unfinished copy; the original stands
        return _migrate(engine, uri, path)
    finally:
        engine.dispose()


def _migrate(engine, uri: str, path: Path) -> None:
    import sqlalchemy
    from mlflow.store.db import utils as db

    try:
        if db._is_empty_database(engine):
            db._initialize_tables(engine)
        else:
            db._upgrade_db(engine)
        return
    except Exception as e:  # sqlalchemy/alembic errors of every kind: the store is not usable as it is
        error = f"{type(e).__name__}: {str(e).splitlines()[0]}"
    with engine.connect() as conn:
        names = set(sqlalchemy.inspect(engine).get_table_names())
        held = sum(conn.execute(sqlalchemy.text(f"SELECT COUNT(*) FROM {t}")).scalar() or 0
                   for t in ("runs", "registered_models") if t in names)
    if held:
        raise StateError(f"the MLflow store {path} is half-migrated and the migration cannot finish ({error}). "
                         f"It holds {held} runs/registered models. Fix: restore {path.name} from a backup, or "
                         f"back it up and run `mlflow db upgrade {uri}`; moving it aside starts an empty store")
    engine.dispose()
    aside = path.with_name(f"{path.name}.half-migrated-{time.strftime('%Y%m%d-%H%M%S')}")
    path.rename(aside)
    log.warning("MLflow store %s was half-migrated and empty (%s): set aside as %s, starting a new one",
                path, error, aside.name)
    fresh = sqlalchemy.create_engine(uri)
    try:
        db._initialize_tables(fresh)
    finally:
        fresh.dispose()


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=project_root(), capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError, ProjectError):
        return "unknown"


def experiment_id(c, name: str) -> str:
    exp = c.get_experiment_by_name(name)
    if exp:
        return exp.experiment_id
    # A local sqlite store would put artifacts in ./mlruns of whatever the cwd is: keep them in the home.
    local = c.tracking_uri.startswith("sqlite:")
    location = (gauntlet_home() / "mlartifacts").as_uri() if local else None
    return c.create_experiment(name, artifact_location=location)


@contextmanager
def parent_run(uri: str, experiment: str, run_name: str, tags: dict[str, str],
               params: dict[str, str]) -> Iterator[RunContext]:
    """The flow run's MLflow run: FINISHED on success, FAILED (with the error) if anything raises."""
    c = client(uri)
    exp_id = experiment_id(c, experiment)
    mark_dead_runs_failed(c, exp_id)
    run = c.create_run(exp_id, run_name=run_name, tags={**tags, "gauntlet.commit": git_commit(),
                                                         "gauntlet.host": socket.gethostname(),
                                                         "gauntlet.pid": str(os.getpid())})
    ctx = RunContext(tracking_uri=uri, experiment_id=exp_id, parent_run_id=run.info.run_id,
                     flow_run_id=tags.get("prefect.flow_run_id"))
    for k, v in params.items():
        c.log_param(run.info.run_id, k, redact(str(v)))
    log.info("MLflow run %s in experiment %r (%s)", run.info.run_id, experiment, redact_uri(uri))
    try:
        yield ctx
    except BaseException as e:
        _record_failure(c, run.info.run_id, e)
        raise
    c.set_terminated(run.info.run_id, "FINISHED")


def mark_dead_runs_failed(c, exp_id: str) -> None:
    """A flow process killed outright (SIGKILL, OOM, power) cannot mark its run FAILED; the next run on
    the same host does, for runs still RUNNING whose process is gone."""
    host = socket.gethostname()
    for r in c.search_runs([exp_id], "attributes.status = 'RUNNING'"):
        tags = r.data.tags
        if tags.get("gauntlet.host") != host or "gauntlet.pid" not in tags:
            continue
        if _pid_alive(int(tags["gauntlet.pid"])):
            continue
        # its nested runs (stages, and their own nested runs) died with it
        dead = [r.info.run_id]
        while dead:
            parent_id = dead.pop()
            for child in c.search_runs([exp_id], f"tags.mlflow.parentRunId = '{parent_id}' "
                                                 "and attributes.status = 'RUNNING'"):
                c.set_terminated(child.info.run_id, "FAILED")
                dead.append(child.info.run_id)
        c.set_tag(r.info.run_id, "gauntlet.error", f"process {tags['gauntlet.pid']} died while the run was RUNNING")
        c.set_terminated(r.info.run_id, "FAILED")
        log.warning("marked MLflow run %s FAILED: its process is gone", r.info.run_id)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def stage_run(ctx: RunContext, stage: str, params: dict | None = None,
              resume_run_id: str | None = None) -> Iterator[tuple[object, str]]:
    """A nested MLflow run for one stage; yields (client, run_id).

    ``resume_run_id`` continues an earlier run of this stage (a retry in the same flow run) instead of
    starting one, so that its metric history carries on where the failed attempt left it.
    """
    c = client(ctx.tracking_uri)
    if resume_run_id:
        c.update_run(resume_run_id, status="RUNNING")
        run_id = resume_run_id
    else:
        tags = {"mlflow.parentRunId": ctx.parent_run_id, "gauntlet.stage": stage}
        if ctx.flow_run_id:
            tags["prefect.flow_run_id"] = ctx.flow_run_id
        run_id = c.create_run(ctx.experiment_id, run_name=stage, tags=tags).info.run_id
        for k, v in (params or {}).items():
            c.log_param(run_id, k, redact(str(v))[:6000])
    try:
        yield c, run_id
    except BaseException as e:
        _record_failure(c, run_id, e)
        raise
    c.set_terminated(run_id, "FINISHED")


def _record_failure(c, run_id: str, error: BaseException) -> None:
    try:
        c.set_tag(run_id, "gauntlet.error", redact(f"{type(error).__name__}: {error}")[:5000])
        c.log_text(run_id, redact("".join(traceback.format_exception(error))), "error.txt")
    finally:
        c.set_terminated(run_id, "FAILED")


def log_dir_files(c, run_id: str, paths: list[Path], artifact_path: str | None = None) -> None:
    for p in paths:
        if Path(p).exists():
            c.log_artifact(run_id, str(p), artifact_path)


def flatten_params(prefix: str, obj: dict) -> dict[str, str]:
    """{'lora': {'r': 8}} → {'train.lora.r': '8'} for MLflow params."""
    out: dict[str, str] = {}
    for k, v in obj.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict):
            out.update(flatten_params(key, v))
        else:
            out[key] = str(v)
    return out
