"""``gauntlet serve``: the whole system on one machine, on 127.0.0.1.

Starts an MLflow tracking server and a Prefect server (state in ``$GAUNTLET_HOME``), creates the
``process`` work pool and the ``gpu`` tag concurrency limit, applies ``deployments/prefect.yaml`` with
``prefect deploy --all`` from the repository root, and starts a process worker. Ctrl-C or SIGTERM stops
the worker, then the servers. Each child runs in its own process group with its output in
``$GAUNTLET_HOME/serve/<name>.log``; if one exits on its own, serve stops the others and exits 1.

These are the commands docs/deployments.md lists for doing the same by hand.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from gauntlet.project import project_root
from gauntlet.state import configure_environment, default_tracking_uri

PREFECT_FILE = "deployments/prefect.yaml"
DEPLOYMENTS = ("leaderboard/nightly", "finetune/manual", "finetune/ci", "deploy/deploy", "finetune/pool",
               "leaderboard-job/pool", "submit/manual")


class ServeError(RuntimeError):
    """A service that did not start; the message names it and its log."""


@dataclass(frozen=True)
class ServeConfig:
    host: str = "127.0.0.1"
    prefect_port: int = 4200
    mlflow_port: int = 5000
    pool: str = "process"
    gpu_tag: str = "gpu"
    gpu_slots: int = 1
    timezone: str | None = None       # of the nightly schedule (default: UTC)
    deploy: bool = True
    worker: bool = True

    @property
    def prefect_api_url(self) -> str:
        return f"http://{self.host}:{self.prefect_port}/api"

    @property
    def mlflow_url(self) -> str:
        return f"http://{self.host}:{self.mlflow_port}"


@dataclass
class Service:
    name: str
    process: subprocess.Popen
    log_path: Path
    log_file: IO[bytes]
    stop_signal: signal.Signals = signal.SIGTERM   # PostgreSQL: SIGINT is its fast shutdown (SIGTERM waits for clients)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


class _Stop(Exception):
    """Raised by the SIGTERM handler so that Ctrl-C and SIGTERM take the same way out."""


def port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def service_env(cfg: ServeConfig) -> dict[str, str]:
    """The environment of every child: this process's (after configure_environment), pointed at the servers."""
    env = dict(os.environ)
    env.update({"PREFECT_API_URL": cfg.prefect_api_url, "MLFLOW_TRACKING_URI": cfg.mlflow_url,
                "PREFECT_CLI_PROMPT": "false", "PYTHONUNBUFFERED": "1",
                "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})   # MLflow's GenAI jobs: unused, 7 processes
    return env


def start_service(name: str, cmd: list[str], env: dict[str, str], log_dir: Path, stop_signal: str = "SIGTERM",
                  cwd: Path | None = None) -> Service:
    """Start ``cmd`` with its output in ``log_dir/NAME.log``, in the project folder unless ``cwd`` is given."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    log_file = open(log_path, "ab")  # noqa: SIM115 (the Service holds it; stop_service closes it)
    # Its own session: Ctrl-C reaches serve only, and stopping a service stops its children too.
    proc = subprocess.Popen(cmd, cwd=cwd or project_root(), env=env, stdout=log_file, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    print(f"  started {name} (pid {proc.pid}, log {log_path})", flush=True)
    return Service(name, proc, log_path, log_file, signal.Signals[stop_signal])


def wait_http(service: Service, url: str, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if service.process.poll() is not None:
            raise ServeError(f"{service.name} exited with code {service.process.returncode} while starting; "
                             f"last lines of {service.log_path}:\n{service.log_tail()}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    raise ServeError(f"{service.name} did not answer {url} within {timeout:.0f}s; see {service.log_path}")


def stop_service(service: Service, grace: float = 20.0) -> None:
    """The service's stop signal (SIGTERM) to its process group, SIGKILL after ``grace`` seconds."""
    proc = service.process
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, service.stop_signal)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(grace)
    # the leader is gone (or past its grace); what it left in its group goes too (MLflow's job consumers, orphaned
    # but still in the group, kept running and connecting to a database that was gone)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(10)
    service.log_file.close()
    print(f"  stopped {service.name}", flush=True)


def run_step(name: str, cmd: list[str], env: dict[str, str], log_dir: Path, timeout: float = 600) -> None:
    """A one-off command (e.g. ``prefect deploy``): its output goes to its log; a failure is a ServeError."""
    log_path = log_dir / f"{name}.log"
    with open(log_path, "wb") as log_file:
        result = subprocess.run(cmd, cwd=project_root(), env=env, stdout=log_file, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, timeout=timeout)
    if result.returncode != 0:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-30:])
        raise ServeError(f"{' '.join(cmd[2:])} failed (exit {result.returncode}); see {log_path}:\n{tail}")
    print(f"  {name}: ok (log {log_path})", flush=True)


def ensure_tag_concurrency_limit(tag: str, slots: int, overwrite: bool = False) -> int:
    """Create Prefect's tag concurrency limit ``tag`` with ``slots`` unless one exists (or ``overwrite``).
    Returns the limit in force. The leaderboard flow calls it too, for a night run without ``serve``."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as c:
        if not overwrite:
            try:
                return c.read_concurrency_limit_by_tag(tag).concurrency_limit
            except ObjectNotFound:
                pass
        c.create_concurrency_limit(tag=tag, concurrency_limit=slots)
    return slots


def ensure_process_pool(name: str, env: dict[str, str], log_dir: Path) -> None:
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as c:
        try:
            c.read_work_pool(name)
            print(f"  work pool {name!r}: exists", flush=True)
            return
        except ObjectNotFound:
            pass
    run_step("work-pool", [sys.executable, "-m", "prefect", "work-pool", "create", name, "--type", "process"],
             env, log_dir)


def serve(cfg: ServeConfig) -> int:
    home = configure_environment()
    log_dir = home / "serve"
    for port in (cfg.prefect_port, cfg.mlflow_port):
        if not port_free(cfg.host, port):
            print(f"port {cfg.host}:{port} is in use; choose another with --prefect-port/--mlflow-port",
                  file=sys.stderr)
            return 2
    env = service_env(cfg)
    if cfg.timezone:
        env["GAUNTLET_TIMEZONE"] = cfg.timezone
    # This process talks to the servers too (work pool, concurrency limit): before prefect is imported.
    os.environ.update({"PREFECT_API_URL": cfg.prefect_api_url, "MLFLOW_TRACKING_URI": cfg.mlflow_url})

    services: list[Service] = []
    previous = signal.signal(signal.SIGTERM, _raise_stop)
    try:
        print("Gauntlet serve: starting", flush=True)
        mlflow = start_service("mlflow", [
            sys.executable, "-m", "mlflow", "server", "--host", cfg.host, "--port", str(cfg.mlflow_port),
            "--backend-store-uri", default_tracking_uri(), "--artifacts-destination", str(home / "mlartifacts"),
            "--workers", "1"], env, log_dir)
        services.append(mlflow)
        prefect_server = start_service("prefect-server", [
            sys.executable, "-m", "prefect", "server", "start", "--host", cfg.host, "--port",
            str(cfg.prefect_port)], env, log_dir)
        services.append(prefect_server)
        wait_http(mlflow, f"{cfg.mlflow_url}/health")
        wait_http(prefect_server, f"{cfg.prefect_api_url}/health")

        services += pools_and_workers(cfg, env, log_dir)
        print(ready_banner(cfg), flush=True)
        return watch_services(services)
    except (KeyboardInterrupt, _Stop):
        print("\nGauntlet serve: stopping", flush=True)
        return 0
    except ServeError as e:
        print(f"Gauntlet serve: {e}", file=sys.stderr, flush=True)
        return 1
    finally:
        signal.signal(signal.SIGTERM, _ignore)  # a second SIGTERM must not interrupt the clean-up
        for s in reversed(services):
            stop_service(s)
        signal.signal(signal.SIGTERM, previous)


def pools_and_workers(cfg: ServeConfig, env: dict[str, str], log_dir: Path) -> list[Service]:
    """The work pools, the gpu tag's concurrency limit and the deployments on the Prefect server; the workers
    started (the process pool's, and the serving pool's, where the deploy flow runs)."""
    workers: list[Service] = []
    ensure_process_pool(cfg.pool, env, log_dir)
    ensure_tag_concurrency_limit(cfg.gpu_tag, cfg.gpu_slots, overwrite=True)
    print(f"  concurrency limit: tasks tagged {cfg.gpu_tag!r} run {cfg.gpu_slots} at a time", flush=True)
    from gauntlet.worker import SERVING_POOL, SERVING_QUEUE

    ensure_pool(SERVING_POOL, [SERVING_QUEUE])   # the deploy flow's: this machine serves the models
    if cfg.deploy:
        # the pool deployments name the team's GPU pool: it exists (empty until a `gauntlet worker` joins)
        from gauntlet.plan.placement import CLASSES
        from gauntlet.worker import POOL

        ensure_pool(POOL, [c.name for c in CLASSES])
        run_step("deploy", [sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all",
                            "--prefect-file", PREFECT_FILE], env, log_dir)
    if cfg.worker:
        workers.append(start_service("worker", [
            sys.executable, "-m", "prefect", "worker", "start", "--pool", cfg.pool, "--type", "process"],
            env, log_dir))
        # the deploy flow's runs start in this checkout (its deployment has no pull step, as on a team)
        workers.append(start_service("serving-worker", [
            sys.executable, "-m", "prefect", "worker", "start", "--pool", SERVING_POOL, "--type", "process"],
            {**env, "GAUNTLET_PROJECT_ROOT": str(project_root())}, log_dir))
    return workers


def ready_banner(cfg: ServeConfig) -> str:
    return f"""
Gauntlet is serving (Ctrl-C stops everything):
  Prefect UI    http://{cfg.host}:{cfg.prefect_port}
  MLflow UI     {cfg.mlflow_url}
  work pools    {cfg.pool} and serving (deploys){' (workers running)' if cfg.worker else ' (no worker started)'}
  deployments   {', '.join(DEPLOYMENTS) if cfg.deploy else '(not deployed)'}; nightly at 02:00 {cfg.timezone or 'UTC'}
  run one now   PREFECT_API_URL={cfg.prefect_api_url} prefect deployment run 'leaderboard/nightly'
READY"""


def watch_services(services: list[Service]) -> int:
    """Until one service exits (1, after saying which, with its log's last lines); Ctrl-C or SIGTERM ends it."""
    while True:
        for s in services:
            if s.process.poll() is not None:
                print(f"{s.name} exited with code {s.process.returncode}; stopping the others. "
                      f"Last lines of {s.log_path}:\n{s.log_tail()}", file=sys.stderr, flush=True)
                return 1
        time.sleep(1)


def _raise_stop(_signum, _frame) -> None:
    raise _Stop()


def _ignore(_signum, _frame) -> None:
    pass


# -- a team's pool (gauntlet worker, gauntlet stack) ----------------------------------------------------------

RESULTS_BLOCK = "gauntlet-results"                 # remote-file-system block every host persists results to
RETRY_AUTOMATION = "gauntlet-retry-lost-flow-runs"
LOST_AFTER_S = 75                                  # no heartbeat for this long: the flow run's host is gone


def ensure_results_block(store: str) -> str:
    """The Prefect block every host of the pool writes its results to (``$GAUNTLET_STORE/prefect-results``):
    a result persisted on one host is read on another (a stage's cache hit, a night's rows). Its credentials
    come from each host's environment, never from the block. Returns the block's slug."""
    from prefect.filesystems import RemoteFileSystem

    basepath = store.rstrip("/") + "/prefect-results"
    try:
        if RemoteFileSystem.load(RESULTS_BLOCK).basepath == basepath:
            return f"remote-file-system/{RESULTS_BLOCK}"
    except ValueError:   # not there yet
        pass
    RemoteFileSystem(basepath=basepath).save(RESULTS_BLOCK, overwrite=True)
    return f"remote-file-system/{RESULTS_BLOCK}"


def ensure_retry_automation() -> None:
    """Prefect's own answer to a host that dies mid-run: a flow run whose heartbeats stop (and that did not end)
    is put back to AwaitingRetry, so any worker of its queue takes it up again as its next attempt."""
    from datetime import timedelta

    from prefect.automations import Automation
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture

    try:
        Automation.read(name=RETRY_AUTOMATION)
        return
    except ValueError:
        pass
    ends = {f"prefect.flow-run.{s}" for s in ("Completed", "Failed", "Cancelled", "Crashed", "Cancelling")}
    Automation(
        name=RETRY_AUTOMATION,
        description="Gauntlet: a flow run whose host stopped sending heartbeats is retried on another worker",
        trigger=EventTrigger(match={"prefect.resource.id": "prefect.flow-run.*"},
                             after={"prefect.flow-run.heartbeat"}, expect={"prefect.flow-run.heartbeat", *ends},
                             for_each={"prefect.resource.id"}, posture=Posture.Proactive, threshold=1,
                             within=timedelta(seconds=LOST_AFTER_S)),
        actions=[ChangeFlowRunState(state=StateType.SCHEDULED, name="AwaitingRetry", force=True,
                                    message=f"no heartbeat for {LOST_AFTER_S} s: its host is gone; retried on any "
                                            "worker of its queue")],
    ).create()


def ensure_pool(pool: str, queues: list[str]) -> None:
    """The process work pool and its queues (one per GPU class) on the Prefect server."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as c:
        try:
            c.read_work_pool(pool)
        except ObjectNotFound:
            try:
                from prefect.workers.process import ProcessWorker

                c.create_work_pool(WorkPoolCreate(name=pool, type="process",
                                                  base_job_template=ProcessWorker.get_default_base_job_template()))
            except ObjectAlreadyExists:
                pass
        for queue in queues:
            with contextlib.suppress(ObjectAlreadyExists):
                c.create_work_queue(name=queue, work_pool_name=pool)


def online_workers(pool: str) -> list[str]:
    """The names of the pool's workers the Prefect server counts as online (their heartbeats are recent)."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as c:
        return sorted(w.name for w in c.read_workers_for_work_pool(pool) if w.status.value == "ONLINE")


def prepare_pool(pool: str, queues: list[str], store: str) -> str:
    """Everything a pool needs on the Prefect server, made if missing (each worker calls it: no set-up step of
    its own); returns the results block's slug."""
    ensure_pool(pool, queues)
    ensure_retry_automation()
    return ensure_results_block(store)
