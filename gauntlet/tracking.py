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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

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
    flow_attempt: int = 1             # the Prefect flow run's attempt (its run count) this run belongs to


# A flow run's state type and run count by its id, from the Prefect server (tasks/_flow.py provides it): how a
# host tells that a run another host started is dead (its flow run ended, or went on in a later attempt).
FlowRunStates = Callable[[list[str]], dict[str, tuple[str, int]]]
ATTEMPT_TAG = "gauntlet.flow_attempt"
ROLE_TAG = "gauntlet.role"


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
    from mlflow.exceptions import MlflowException

    try:
        return c.create_experiment(name, artifact_location=location)
    except MlflowException:
        # two runs starting at once on a new store: the other created it between our read and our create
        exp = c.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


@contextmanager
def parent_run(uri: str, experiment: str, run_name: str, tags: dict[str, str], params: dict[str, str],
               flow_attempt: int = 1, flow_run_states: FlowRunStates | None = None) -> Iterator[RunContext]:
    """The flow run's MLflow run: FINISHED on success, FAILED (with the error) if anything raises. A later
    attempt of the same Prefect flow run (a retry, on this host or another) continues the earlier attempt's run,
    so its stages find their earlier attempts (a resumed training) under it."""
    c = client(uri)
    exp_id = experiment_id(c, experiment)
    mark_dead_runs_failed(c, exp_id, flow_run_states)
    flow_run_id = tags.get("prefect.flow_run_id")
    own = {"gauntlet.commit": git_commit(), "gauntlet.host": socket.gethostname(), "gauntlet.pid": str(os.getpid()),
           ATTEMPT_TAG: str(flow_attempt), ROLE_TAG: "parent"}
    run_id = _earlier_parent(c, exp_id, flow_run_id) if flow_run_id else None
    if run_id:
        _continue_run(c, run_id, own, flow_attempt)
    else:
        run_id = c.create_run(exp_id, run_name=run_name, tags={**tags, **own}).info.run_id
        for k, v in params.items():
            c.log_param(run_id, k, redact(str(v)))
    ctx = RunContext(tracking_uri=uri, experiment_id=exp_id, parent_run_id=run_id, flow_run_id=flow_run_id,
                     flow_attempt=flow_attempt)
    log.info("MLflow run %s in experiment %r (%s)%s", run_id, experiment, redact_uri(uri),
             f", attempt {flow_attempt} of the flow run" if flow_attempt > 1 else "")
    try:
        yield ctx
    except BaseException as e:
        _record_failure(c, run_id, e)
        raise
    c.set_terminated(run_id, "FINISHED")


def _earlier_parent(c, exp_id: str, flow_run_id: str) -> str | None:
    runs = c.search_runs([exp_id], f"tags.`prefect.flow_run_id` = '{flow_run_id}' and tags.`{ROLE_TAG}` = 'parent'",
                         order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0].info.run_id if runs else None


def _continue_run(c, run_id: str, tags: dict[str, str], attempt: int) -> None:
    """An earlier attempt's run, RUNNING again; its error kept under the attempt's name."""
    earlier = c.get_run(run_id).data.tags
    if earlier.get("gauntlet.error"):
        c.set_tag(run_id, f"gauntlet.attempt_{earlier.get(ATTEMPT_TAG, attempt - 1)}.error", earlier["gauntlet.error"])
        c.delete_tag(run_id, "gauntlet.error")
    c.update_run(run_id, status="RUNNING")
    for k, v in tags.items():
        c.set_tag(run_id, k, v)


FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "CRASHED"}


def mark_dead_runs_failed(c, exp_id: str, flow_run_states: FlowRunStates | None = None) -> int:
    """Runs still RUNNING whose attempt is gone are marked FAILED, by whichever host notices: one whose process
    on this host is gone (SIGKILL, OOM, power), and (with ``flow_run_states``, from the Prefect server) one
    whose Prefect flow run has ended or moved on to a later attempt, wherever it ran. Returns how many."""
    host = socket.gethostname()
    running = c.search_runs([exp_id], "attributes.status = 'RUNNING'", max_results=5000)
    flows = {r.data.tags["prefect.flow_run_id"] for r in running if r.data.tags.get("prefect.flow_run_id")}
    states = flow_run_states(sorted(flows)) if flow_run_states and flows else {}
    dead = 0
    for r in running:
        why = _why_dead(r.data.tags, host, states)
        if why is None:
            continue
        c.set_tag(r.info.run_id, "gauntlet.error", why)
        c.set_terminated(r.info.run_id, "FAILED")
        dead += 1
        log.warning("marked MLflow run %s FAILED: %s", r.info.run_id, why)
        if "gauntlet.pid" in r.data.tags:   # its nested runs (stages, and their own nested runs) died with it
            dead += _fail_children(c, exp_id, r.info.run_id)
    return dead


def _why_dead(tags: dict[str, str], host: str, states: dict[str, tuple[str, int]]) -> str | None:
    if tags.get("gauntlet.host") == host and "gauntlet.pid" in tags and not _pid_alive(int(tags["gauntlet.pid"])):
        return f"process {tags['gauntlet.pid']} died while the run was RUNNING"
    flow = states.get(tags.get("prefect.flow_run_id", ""))
    if flow is None:
        return None
    state, run_count = flow
    attempt = int(tags.get(ATTEMPT_TAG, "1"))
    if state in FINAL_STATES:
        return f"its Prefect flow run ended {state} while the run was RUNNING (its host died or lost it)"
    if state != "RUNNING" or run_count > attempt:
        return f"attempt {attempt} of its Prefect flow run is gone (the flow run is {state}, attempt {run_count})"
    return None


def _fail_children(c, exp_id: str, parent_id: str) -> int:
    failed, todo = 0, [parent_id]
    while todo:
        for child in c.search_runs([exp_id], f"tags.mlflow.parentRunId = '{todo.pop()}' "
                                             "and attributes.status = 'RUNNING'"):
            c.set_terminated(child.info.run_id, "FAILED")
            todo.append(child.info.run_id)
            failed += 1
    return failed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def stage_run(ctx: RunContext, stage: str, params: dict | None = None, resume_run_id: str | None = None,
              tags: dict[str, str] | None = None) -> Iterator[tuple[object, str]]:
    """A nested MLflow run for one stage; yields (client, run_id).

    ``resume_run_id`` continues an earlier run of this stage (a retry in the same flow run) instead of
    starting one, so that its metric history carries on where the failed attempt left it.
    """
    c = client(ctx.tracking_uri)
    if resume_run_id:
        c.update_run(resume_run_id, status="RUNNING")
        c.set_tag(resume_run_id, ATTEMPT_TAG, str(ctx.flow_attempt))
        run_id = resume_run_id
    else:
        tags = {**(tags or {}), "mlflow.parentRunId": ctx.parent_run_id, "gauntlet.stage": stage,
                ATTEMPT_TAG: str(ctx.flow_attempt)}
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
