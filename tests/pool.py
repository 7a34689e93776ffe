"""A team's pool on one machine, for the pool tests: the team stack (real servers) and hosts that share nothing
but the network.

Each :class:`Host` has its own state folder, its own copy of the project (data, DVC cache, configs), its own host
name (a UTS namespace) and, where network namespaces can be made (root, iproute2), its own address on a bridge: it
reaches the servers over the network at the bridge's address, as a GPU machine reaches the team's servers. A host
runs ``gauntlet worker`` held to one CPU core (as it would own one GPU). :meth:`Host.die` SIGKILLs every process of
the host at once, as a power cut would.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from tests.helpers import REPO

BRIDGE, BRIDGE_IP, SUBNET = "gtpool0", "10.231.0.1", 24
PROJECT_FILES = ("dvc.yaml", "dvc.lock", "params.yaml", ".dvcignore", ".dvc/config", ".dvc/.gitignore",
                 "gauntlet/demo/data.py")
PROJECT_DIRS = ("configs", "evals", "deployments")
POOL_DEPLOYMENTS = ("finetune/pool", "leaderboard-job/pool")


def _run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, check=check)


def network_namespaces_work() -> str | None:
    """None when this process can make network namespaces; otherwise why not."""
    if os.geteuid() != 0:
        return "not root"
    if shutil.which("ip") is None:
        return "iproute2 (ip) is not installed"
    probe = f"gtprobe{os.getpid() % 10000}"
    made = _run("ip", "netns", "add", probe, check=False)
    if made.returncode != 0:
        return made.stderr.strip()
    _run("ip", "netns", "del", probe, check=False)
    return None


def make_bridge() -> None:
    if _run("ip", "link", "show", BRIDGE, check=False).returncode == 0:
        return
    _run("ip", "link", "add", BRIDGE, "type", "bridge")
    _run("ip", "addr", "add", f"{BRIDGE_IP}/{SUBNET}", "dev", BRIDGE)
    _run("ip", "link", "set", BRIDGE, "up")


def remove_bridge() -> None:
    _run("ip", "link", "del", BRIDGE, check=False)


def host_project(folder: Path) -> Path:
    """A copy of the project's configs, evals, deployments and DVC stage (not a clone: no code), its default DVC
    remote the team's object store."""
    folder.mkdir(parents=True, exist_ok=True)
    for rel in PROJECT_FILES:
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / rel, folder / rel)
    for rel in PROJECT_DIRS:
        shutil.copytree(REPO / rel, folder / rel, dirs_exist_ok=True)
    _run("git", "init", "-q", str(folder))
    dvc = str(Path(sys.executable).with_name("dvc"))
    subprocess.run([dvc, "remote", "add", "--local", "-d", "team", "s3://gauntlet/dvc"], cwd=folder, check=True,
                   capture_output=True)
    return folder


@dataclass
class Host:
    name: str
    root: Path                       # everything of this host: project, state folder, logs
    env: dict[str, str]              # the team's environment as this host sees it
    index: int = 0
    netns: str | None = None
    worker: subprocess.Popen | None = None
    log_file: Path | None = None
    _log: object = field(default=None, repr=False)

    @property
    def project(self) -> Path:
        return self.root / "project"

    @property
    def home(self) -> Path:
        return self.root / "home"

    @property
    def address(self) -> str:
        return f"10.231.0.{10 + self.index}" if self.netns else "127.0.0.1"

    def setup(self, with_netns: bool) -> Host:
        host_project(self.project)
        self.home.mkdir(parents=True, exist_ok=True)
        if with_netns:
            self.netns = f"gtpool-{self.name}"
            veth, peer = f"gtv{self.index}{os.getpid() % 1000}", f"gtp{self.index}{os.getpid() % 1000}"
            _run("ip", "netns", "del", self.netns, check=False)
            _run("ip", "netns", "add", self.netns)
            _run("ip", "link", "add", veth, "type", "veth", "peer", "name", peer)
            _run("ip", "link", "set", veth, "master", BRIDGE)
            _run("ip", "link", "set", veth, "up")
            _run("ip", "link", "set", peer, "netns", self.netns)
            inside = ("ip", "netns", "exec", self.netns)
            _run(*inside, "ip", "addr", "add", f"{self.address}/{SUBNET}", "dev", peer)
            _run(*inside, "ip", "link", "set", peer, "up")
            _run(*inside, "ip", "link", "set", "lo", "up")
            _run(*inside, "ip", "route", "add", "default", "via", BRIDGE_IP)
        return self

    def prefix(self) -> list[str]:
        """The command prefix that runs a program on this host: its network, its host name."""
        inner = ["unshare", "--uts", "sh", "-c", f'hostname {self.name} && exec "$@"', "sh"]
        return (["ip", "netns", "exec", self.netns] if self.netns else []) + inner

    def environment(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("PREFECT_", "MLFLOW_", "GAUNTLET_", "AWS_", "PYTEST_"))}
        env.update(self.env)
        env.update({"GAUNTLET_HOME": str(self.home), "GAUNTLET_PROJECT_ROOT": str(self.project),
                    "PYTHONUNBUFFERED": "1", **extra})
        return env

    def run(self, *args: str, timeout: float = 600, **extra: str) -> subprocess.CompletedProcess:
        """``gauntlet ARGS`` on this host, to its end."""
        cmd = self.prefix() + [str(Path(sys.executable).with_name("gauntlet")), *args]
        return subprocess.run(cmd, cwd=self.project, env=self.environment(**extra), capture_output=True, text=True,
                              timeout=timeout)

    def start_worker(self, core: int, *args: str, role: tuple[str, ...] = ("--queue", "gpu-24g")) -> Host:
        """``gauntlet worker`` on this host, held to ``core``; ``role``: a GPU-class queue, or ``("--serving",)``."""
        self.log_file = self.root / "worker.log"
        self._log = open(self.log_file, "ab")  # noqa: SIM115  (the worker writes it until stop() closes it)
        cmd = self.prefix() + [str(Path(sys.executable).with_name("gauntlet")), "worker", *role,
                               "--cpu-cores", str(core), "--name", self.name, *args]
        self.worker = subprocess.Popen(cmd, cwd=self.project, env=self.environment(), stdout=self._log,
                                       stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def wait_online(self, timeout: float = 120, pool: str = "gpu") -> None:
        """Until the Prefect server lists this worker as online in ``pool``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.worker is not None and self.worker.poll() is not None:
                raise AssertionError(f"worker {self.name} exited {self.worker.returncode}:\n{self.log_tail()}")
            if self.name in online_workers(self.env, pool):
                return
            time.sleep(1)
        raise AssertionError(f"worker {self.name} not online in {timeout:.0f}s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except (OSError, AttributeError):
            return "(no log)"

    def processes(self) -> list[int]:
        """Every process of this host: the worker and all it started, in any process group."""
        if self.worker is None:
            return []
        children: dict[int, list[int]] = {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                pid, rest = stat.read_text().split(" (", 1)
                ppid = int(rest.rsplit(") ", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(pid))
        found, todo = [], [self.worker.pid]
        while todo:
            pid = todo.pop()
            found.append(pid)
            todo += children.get(pid, [])
        return found

    def die(self) -> list[int]:
        """SIGKILL every process of the host at once (a power cut); the pids killed."""
        pids = self.processes()
        kill_all(pids)
        if self.worker is not None:
            self.worker.wait(30)
        return pids

    def stop(self) -> None:
        if self.worker is not None and self.worker.poll() is None:
            os.killpg(self.worker.pid, signal.SIGTERM)
            try:
                self.worker.wait(30)
            except subprocess.TimeoutExpired:
                self.die()
        kill_all(self.processes()[1:])   # what outlived the worker (a training's own process group)
        if self._log:
            self._log.close()
        if self.netns:
            _run("ip", "netns", "del", self.netns, check=False)


def free_ports(count: int) -> list[int]:
    """``count`` ports nothing listens on now (on every address)."""
    import socket

    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("0.0.0.0", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def kill_all(pids: list[int]) -> None:
    """SIGKILL each pid; one already gone is fine."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def prefect_client(env: dict[str, str]):
    """A synchronous Prefect client of the team's server (whatever this process's own Prefect settings)."""
    from prefect.client.orchestration import SyncPrefectClient

    return SyncPrefectClient(env["PREFECT_API_URL"])


def online_workers(env: dict[str, str], pool: str = "gpu") -> set[str]:
    with prefect_client(env) as c:
        try:
            return {w.name for w in c.read_workers_for_work_pool(pool) if w.status.value == "ONLINE"}
        except Exception:
            return set()


def deploy_pool_flows(env: dict[str, str], project: Path, names: tuple[str, ...] = POOL_DEPLOYMENTS) -> None:
    """The pool's deployments (deployments/prefect.yaml), applied to the team's Prefect from a host's project."""
    cmd = [sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--prefect-file",
           str(project / "deployments" / "prefect.yaml")]
    for name in names:
        cmd += ["--name", name]
    run_env = {**{k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}, **env,
               "GAUNTLET_PROJECT_ROOT": str(project)}
    # not from inside the copy: its gauntlet/demo/ (the DVC stage's code) would shadow the installed package
    done = subprocess.run(cmd, cwd=project.parent, env=run_env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def run_deployment(env: dict[str, str], name: str, **params) -> str:
    """``prefect deployment run NAME --param k=v``, as CI starts a run; the flow run's id."""
    cmd = [sys.executable, "-m", "prefect", "deployment", "run", name]
    for k, v in params.items():
        cmd += ["--param", f"{k}={v}"]
    run_env = {**{k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}, **env}
    done = subprocess.run(cmd, env=run_env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    for line in done.stdout.splitlines():
        if "UUID:" in line:
            return line.split("UUID:")[1].strip()
    raise AssertionError(f"no flow run id in:\n{done.stdout}")


def wait_flow_runs(env: dict[str, str], ids: list[str], timeout: float = 900) -> dict[str, object]:
    """The flow runs, once every one is in a final state."""
    from uuid import UUID

    deadline = time.monotonic() + timeout
    while True:
        with prefect_client(env) as c:
            runs = {i: c.read_flow_run(UUID(i)) for i in ids}
        if all(r.state and r.state.is_final() for r in runs.values()):
            return runs
        if time.monotonic() > deadline:
            raise AssertionError({i: (r.state.name if r.state else None) for i, r in runs.items()})
        time.sleep(2)


def flow_run_logs(env: dict[str, str], flow_run_id: str) -> str:
    from uuid import UUID

    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    logs: list = []
    with prefect_client(env) as c:
        while True:
            page = c.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[UUID(flow_run_id)])), limit=200,
                               offset=len(logs))
            logs += page
            if len(page) < 200:
                return "\n".join(entry.message for entry in logs)


def deployment_flow_runs(env: dict[str, str], deployment: str) -> list:
    """The flow runs of deployment ``FLOW/NAME``."""
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName, FlowFilter, FlowFilterName

    flow_name, name = deployment.split("/")
    with prefect_client(env) as c:
        return c.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name])),
                                deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[name])))


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def write_config(host: Host, name: str, raw: dict) -> str:
    import yaml

    rel = f"configs/{name}.yaml"
    (host.project / rel).write_text(yaml.safe_dump(raw))
    return rel


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())
