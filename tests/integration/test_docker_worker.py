"""The docker pool for real: a flow run through a Prefect Docker worker (prefect-docker) on this machine's Docker
engine, and the engine's verdict on the docker-gpu template's GPU request.

No image registry is reachable here, so the container's image is a minbase Debian (debootstrap, `docker import`,
built once and cached as gauntlet-base:bookworm) that holds only the libraries the host's Python, its venv and
torch link against; the venv, the Python and the checkout are mounted read-only at their host paths instead of
installed into an image. The container runs on the default bridge: its own network namespace and host name (so
the flow's host name proves where it ran) and the servers reached over the network at the bridge's gateway,
where this module's Prefect and MLflow servers listen (conftest's in-process Prefect API listens on 127.0.0.1,
which a bridged container cannot reach; `network_mode: host` would reach it but share the host's name).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
from prefect import flow, get_run_logger

REPO = Path(__file__).resolve().parents[2]  # not tests.helpers: the container imports this file on its own
POOLS = REPO / "deployments" / "work-pools"
BASE_IMAGE = "gauntlet-base:bookworm"
# What the host's Python (its lib-dynload modules), the venv's wheels and torch (libgomp) link against beyond
# minbase; the container has nothing else.
BASE_PACKAGES = ("libgomp1", "libssl3", "libsqlite3-0", "libffi8", "libexpat1", "libbz2-1.0", "liblzma5", "zlib1g",
                 "libuuid1", "libtirpc3", "libnsl2", "libreadline8", "libncursesw6")
DEBIAN_MIRROR = "http://deb.debian.org/debian"
PYTHON_HOME = Path(sys.base_prefix)   # the pyenv Python the venv's interpreter links to
VENV = Path(sys.prefix)
NO_GPU = "could not select device driver"  # the engine's refusal to start a GPU request where no GPU runtime is


@flow(name="container-probe")
def container_probe(experiment: str) -> str:
    """Imports gauntlet, logs where it runs and records that host name as an MLflow run's parameter."""
    import mlflow

    import gauntlet

    host = socket.gethostname()
    get_run_logger().info("container-probe on host %s, gauntlet from %s", host, Path(gauntlet.__file__).parent)
    mlflow.set_experiment(experiment)
    with mlflow.start_run(run_name=host):
        mlflow.log_param("hostname", host)
    return host


def _engine():
    import docker

    try:
        client = docker.from_env(timeout=30)
        client.ping()
        return client
    except docker.errors.DockerException:
        return None


@pytest.fixture(scope="module")
def docker_client(tmp_path_factory):
    """The Docker engine's client; dockerd is started (and stopped after the module) when it is not running and
    this is root with the binary. Skipped, saying why, otherwise."""
    client = _engine()
    daemon = None
    if client is None:
        if os.geteuid() != 0 or shutil.which("dockerd") is None:
            pytest.skip("no Docker engine: dockerd is not running, and starting it needs root and the dockerd binary "
                        "(apt-get install -y docker.io)")
        log = tmp_path_factory.mktemp("dockerd") / "dockerd.log"
        with open(log, "ab") as out:
            daemon = subprocess.Popen(["dockerd"], stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                      start_new_session=True)
        deadline = time.monotonic() + 60
        while client is None and daemon.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
            client = _engine()
        if client is None:
            daemon.terminate()
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
            pytest.skip(f"dockerd did not start (log {log}):\n{tail}")
    yield client
    client.close()
    if daemon is not None:
        daemon.terminate()
        daemon.wait(timeout=60)


@pytest.fixture(scope="module")
def base_image(docker_client) -> str:
    """gauntlet-base:bookworm, built by debootstrap once (minutes) and reused while the engine keeps it."""
    import docker

    with contextlib.suppress(docker.errors.ImageNotFound):
        docker_client.images.get(BASE_IMAGE)
        return BASE_IMAGE
    if shutil.which("debootstrap") is None or os.geteuid() != 0:
        pytest.skip(f"no {BASE_IMAGE} image, and building it needs root and debootstrap (apt-get install debootstrap)")
    root = Path(tempfile.mkdtemp(prefix="gauntlet-base-"))
    try:
        built = subprocess.run(["debootstrap", "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}",
                                "bookworm", str(root), DEBIAN_MIRROR], capture_output=True, text=True, timeout=1200)
        if built.returncode != 0:
            pytest.skip(f"could not build {BASE_IMAGE}: debootstrap from {DEBIAN_MIRROR} failed (no network?):\n"
                        f"{(built.stdout + built.stderr)[-1500:]}")
        tar = subprocess.Popen(["tar", "-C", str(root), "-c", "."], stdout=subprocess.PIPE)
        subprocess.run(["docker", "import", "-", BASE_IMAGE], stdin=tar.stdout, check=True, capture_output=True)
        assert tar.wait() == 0
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return BASE_IMAGE


def _bridge_gateway(docker_client) -> str:
    """The host's address on the default bridge; the default bridge's IPAM often omits it (then the subnet's first
    address, which the engine gives its bridge)."""
    import ipaddress

    (config,) = docker_client.networks.get("bridge").attrs["IPAM"]["Config"]
    return config.get("Gateway") or str(next(ipaddress.ip_network(config["Subnet"]).hosts()))


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def servers(docker_client, base_image, tmp_path_factory):
    """A Prefect and an MLflow server on the bridge's gateway address (where containers reach the host), and a
    Docker worker for a pool made from deployments/work-pools/docker-gpu.json."""
    from gauntlet.serve import start_service, stop_service, wait_http

    gateway = _bridge_gateway(docker_client)
    root = tmp_path_factory.mktemp("docker-pool")
    prefect_port, mlflow_port = _free_port(gateway), _free_port(gateway)
    api = f"http://{gateway}:{prefect_port}/api"
    mlflow_uri = f"http://{gateway}:{mlflow_port}"
    env = {**os.environ, "PREFECT_HOME": str(root / "prefect"), "PREFECT_API_URL": api,
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_WORKER_QUERY_SECONDS": "1",
           "PREFECT_WORKER_PREFETCH_SECONDS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    bin_dir = Path(sys.executable).parent
    pool = f"docker-{uuid.uuid4().hex[:8]}"
    services = []
    try:
        services.append(start_service("prefect", [str(bin_dir / "prefect"), "server", "start", "--host", gateway,
                                                  "--port", str(prefect_port)], env, root / "logs"))
        services.append(start_service("mlflow", [str(bin_dir / "mlflow"), "server", "--host", gateway, "--port",
                                                 str(mlflow_port), "--workers", "1",
                                                 "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
                                                 "--artifacts-destination", str(root / "mlartifacts")],
                                      env, root / "logs"))
        wait_http(services[0], f"{api}/health")
        wait_http(services[1], f"{mlflow_uri}/health")
        subprocess.run([str(bin_dir / "prefect"), "work-pool", "create", pool, "--type", "docker",
                        "--base-job-template", str(POOLS / "docker-gpu.json")], env=env, check=True,
                       capture_output=True)
        services.append(start_service("worker", [str(bin_dir / "prefect"), "worker", "start", "--pool", pool,
                                                 "--type", "docker"], env, root / "logs"))
        yield {"api": api, "mlflow": mlflow_uri, "pool": pool, "services": services}
    finally:
        for service in reversed(services):
            stop_service(service)
        for container in docker_client.containers.list(all=True, filters={"label": f"io.prefect.work-pool-name={pool}"}):
            container.remove(force=True)   # the pool's containers, whatever a failed test left


def _run_probe(servers, base_image: str) -> tuple[str, object]:
    """Deploys container_probe to the docker pool and runs it once: the flow run's id and its final state."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.utilities.asyncutils import run_coro_as_sync

    mounts = {REPO, PYTHON_HOME, VENV}
    job_variables = {
        "image": base_image,
        "image_pull_policy": "Never",      # no registry: the engine has the image
        "auto_remove": False,              # kept for the container list below; the test removes it
        "volumes": [f"{p}:{p}:ro" for p in sorted(mounts)],
        "env": {"PATH": f"{VENV}/bin:/usr/bin:/bin", "HOME": "/tmp", "MLFLOW_TRACKING_URI": servers["mlflow"],
                "GAUNTLET_HOME": "/tmp/gauntlet"},
        "container_create_kwargs": {"shm_size": "64m"},   # the template's GPU request dropped: no GPU here
    }

    async def go():
        async with get_client() as client:
            flow_id = await client.create_flow(container_probe)
            deployment_id = await client.create_deployment(
                flow_id, "docker", entrypoint="tests/integration/test_docker_worker.py:container_probe",
                work_pool_name=servers["pool"], job_variables=job_variables,
                pull_steps=[{"prefect.deployments.steps.set_working_directory": {"directory": str(REPO)}}])
            run = await client.create_flow_run_from_deployment(deployment_id,
                                                               parameters={"experiment": "docker-pool-probe"})
            deadline = time.monotonic() + 240
            while time.monotonic() < deadline:
                run = await client.read_flow_run(run.id)
                if run.state is not None and run.state.is_final():
                    break
                await asyncio.sleep(1)
            logs = []
            for _ in range(20):  # the container's last log batch may land just after its final state
                logs = await client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id])))
                if any("container-probe on host" in entry.message for entry in logs):
                    break
                await asyncio.sleep(0.5)
            return run, [entry.message for entry in logs]

    with temporary_settings({PREFECT_API_URL: servers["api"]}):
        return run_coro_as_sync(go())


def test_flow_run_goes_through_the_docker_worker_into_a_container(docker_client, base_image, servers) -> None:
    from mlflow import MlflowClient

    run, messages = _run_probe(servers, base_image)
    # prefect-docker labels its containers with the flow run (Docker label keys: io.prefect.*)
    containers = docker_client.containers.list(all=True, filters={"label": f"io.prefect.flow-run-id={run.id}"})
    try:
        worker_log = servers["services"][2].log_tail(40)
        assert run.state.is_completed(), f"{run.state}\nworker log:\n{worker_log}"
        (container,) = containers
        container.wait(timeout=60)   # the run is final before its process has exited
        container.reload()
        # Its own host name (Docker's default: the container id's first 12 characters), its image, its mounts
        # read-only, the bridge: it ran in the container and saw only its volumes.
        probe = next(m for m in messages if "container-probe on host" in m)
        host = probe.split("container-probe on host ")[1].split(",")[0]
        assert host == container.id[:12] != socket.gethostname()
        assert f"gauntlet from {REPO / 'gauntlet'}" in probe
        assert base_image in container.image.tags and container.attrs["State"]["ExitCode"] == 0
        assert {m["Destination"] for m in container.attrs["Mounts"]} == {str(p) for p in {REPO, PYTHON_HOME, VENV}}
        assert not any(m["RW"] for m in container.attrs["Mounts"])
        assert container.attrs["HostConfig"]["NetworkMode"] in ("default", "bridge")
        # It reached MLflow over the network: the run it logged is on the server, under its host name.
        client = MlflowClient(servers["mlflow"])
        experiment = client.get_experiment_by_name("docker-pool-probe")
        recorded = client.search_runs([experiment.experiment_id], filter_string=f"params.hostname = '{host}'")
        assert len(recorded) == 1 and recorded[0].info.status == "FINISHED"
    finally:
        for container in containers:
            container.remove(force=True)


def _rendered_container_settings(docker_client, api: str, template: dict, values: dict) -> dict:
    """The keyword arguments prefect-docker's worker passes to containers.create for this template and values
    (rendering resolves block and variable references on the Prefect API)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.utilities.asyncutils import run_coro_as_sync
    from prefect_docker.worker import DockerWorker, DockerWorkerJobConfiguration

    with temporary_settings({PREFECT_API_URL: api}):
        config = run_coro_as_sync(DockerWorkerJobConfiguration.from_template_and_values(template, values))
        return DockerWorker(work_pool_name="docker-gpu")._build_container_settings(docker_client, config)


def test_docker_accepts_the_gpu_pool_request_and_refuses_a_malformed_one(docker_client, base_image, servers) -> None:
    import docker

    template = json.loads((POOLS / "docker-gpu.json").read_text())
    # Host-specific values only: this machine's image, a command, no named volume, kept until removed here.
    settings = _rendered_container_settings(docker_client, servers["api"], template, {
        "image": base_image, "command": "true", "volumes": [], "auto_remove": False})
    requested = template["variables"]["properties"]["container_create_kwargs"]["default"]["device_requests"]
    assert settings["device_requests"] == requested
    created = []
    try:
        container = docker_client.containers.create(**settings)
        created.append(container)
        (accepted,) = container.attrs["HostConfig"]["DeviceRequests"]
        assert (accepted["Driver"], accepted["Count"], accepted["Capabilities"]) == ("nvidia", -1, [["gpu"]])
        try:
            container.start()   # a GPU host with the NVIDIA toolkit runs it
            assert container.wait(timeout=60)["StatusCode"] == 0
        except docker.errors.APIError as e:
            assert NO_GPU in str(e), e   # anything else than "no GPU runtime here" is a real failure
        # The check can fail: capabilities are a list of alternatives, each a list of capabilities ([["gpu"]]);
        # a flat ["gpu"] passes the SDK's type check and the engine refuses the create.
        malformed = {**settings, "device_requests": [{"driver": "nvidia", "count": -1, "capabilities": ["gpu"]}]}
        with pytest.raises(docker.errors.APIError) as refused:
            created.append(docker_client.containers.create(**malformed))
        assert "DeviceRequests.Capabilities" in str(refused.value.explanation), refused.value  # 500 or 400 by version
    finally:
        for container in created:
            container.remove(force=True)
