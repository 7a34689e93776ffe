"""Deployments, work pools, the image, CI, and `gauntlet serve` for real.

No Docker engine or Kubernetes cluster here: their pool templates are validated by a real Prefect
server (which checks placeholders and defaults) and by the libraries that consume them (prefect-docker's
job configuration, docker-py's HostConfig); the Dockerfile is parsed. `gauntlet serve` is started for
real: MLflow and Prefect servers on free ports of 127.0.0.1, deployments applied from
deployments/prefect.yaml, the scheduler's runs of leaderboard/nightly checked, a run triggered with
`prefect deployment run … --watch` and executed by the process worker, then SIGTERM stops everything.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
import yaml

from tests.helpers import REPO, load_collector, prefect_yaml

PREFECT_YAML = REPO / "deployments" / "prefect.yaml"

POOLS = REPO / "deployments" / "work-pools"


def test_gpu_work_pool_templates_are_accepted_by_prefect_and_docker(prefect_api) -> None:
    import docker.types
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.utilities.asyncutils import run_coro_as_sync
    from prefect_docker.worker import DockerWorkerJobConfiguration

    docker_template = json.loads((POOLS / "docker-gpu.json").read_text())
    k8s_template = json.loads((POOLS / "kubernetes-gpu.json").read_text())
    with get_client(sync_client=True) as client:  # the server validates placeholders and defaults
        for name, kind, template in (("docker-gpu-check", "docker", docker_template),
                                     ("kubernetes-gpu-check", "kubernetes", k8s_template)):
            client.create_work_pool(WorkPoolCreate(name=name, type=kind, base_job_template=template),
                                    overwrite=True)
            assert client.read_work_pool(name).base_job_template == template

    config = run_coro_as_sync(DockerWorkerJobConfiguration.from_template_and_values(docker_template, {}))
    assert config.image == "gauntlet:latest" and config.env["GAUNTLET_HOME"] == "/data/gauntlet"
    host = docker.types.HostConfig(version="1.44", **config.container_create_kwargs)
    (gpus,) = host["DeviceRequests"]
    assert gpus["Driver"] == "nvidia" and gpus["Count"] == -1 and gpus["Capabilities"] == [["gpu"]]

    docker_anchor = prefect_yaml()["definitions"]["work_pools"]["docker_gpu"]
    assert set(docker_anchor["job_variables"]) <= set(docker_template["variables"]["properties"])
    assert docker_anchor["job_variables"]["image"] == docker_template["variables"]["properties"]["image"]["default"]

    container = k8s_template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpu_count }}"
    assert container["workingDir"] == "/opt/gauntlet"
    k8s_anchor = prefect_yaml()["definitions"]["work_pools"]["kubernetes_gpu"]
    assert set(k8s_anchor["job_variables"]) <= set(k8s_template["variables"]["properties"])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


class ServeProcess:
    """`python -m gauntlet.cli serve …` with its output collected by a thread."""

    def __init__(self, args: list[str], env: dict[str, str]):
        self.proc = subprocess.Popen([sys.executable, "-m", "gauntlet.cli", "serve", *args], cwd=REPO, env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_for(self, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.output:
            assert self.proc.poll() is None, f"serve exited ({self.proc.returncode}):\n{self.output}"
            assert time.monotonic() < deadline, f"no {text!r} after {timeout}s:\n{self.output}"
            time.sleep(0.5)


def deployment_run(name: str, config: Path, env: dict[str, str], timeout: float) -> str:
    """`prefect deployment run NAME --param config=… --watch`, as a user or CI types it; the flow run's id."""
    run = subprocess.run([sys.executable, "-m", "prefect", "deployment", "run", name, "--param", f"config={config}",
                          "--watch"], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert run.returncode == 0, f"{name}:\n{run.stdout[-3000:]}{run.stderr[-3000:]}"
    return re.search(r"UUID: ([0-9a-f-]{36})", run.stdout).group(1)


def stop_deployments(home: Path, env: dict[str, str]) -> None:
    """`gauntlet deploy stop` for every model a deploy flow served under ``home``: the routers and model servers
    a triggered deploy run starts live in sessions of their own and outlive `gauntlet serve`."""
    for folder in sorted((home / "deploy").glob("*/")):
        subprocess.run([sys.executable, "-m", "gauntlet.cli", "deploy", "stop", folder.name], cwd=REPO,
                       env={**env, "GAUNTLET_HOME": str(home)}, capture_output=True, timeout=120)


@pytest.mark.slow
def test_gauntlet_serve_schedules_and_runs_the_nightly_leaderboard(tmp_path: Path, quantize_env, monkeypatch,
                                                                   capsys) -> None:
    """The whole served set-up, as a team runs it: the demo fine-tuned through `finetune/manual`, then the
    repository's leaderboard config through `leaderboard/nightly`, both executed by the process worker."""
    from mlflow.tracking import MlflowClient
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterName,
        FlowRunFilter,
        FlowRunFilterId,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from gauntlet.envs import QUANTIZE_ENV
    from gauntlet.leaderboard.board import Leaderboard
    from tests.helpers import make_demo_dvc_repo, project_workdir, write_demo_config

    site = project_workdir("served-site")  # a config names only folders inside its project
    prefect_port, mlflow_port = free_port(), free_port()
    api, tracking = f"http://127.0.0.1:{prefect_port}/api", f"http://127.0.0.1:{mlflow_port}"
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env.update({"GAUNTLET_HOME": str(home), "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "2",
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                # the deploy deployment's event trigger has a test of its own (below); here the run's promotion
                # must not start model servers beside the leaderboard it waits for
                "PREFECT_SERVER_SERVICES_TRIGGERS_ENABLED": "false",
                "GAUNTLET_QUANT_VENV": str(QUANTIZE_ENV.path())})  # the session's quantize venv, made once
    serve = ServeProcess(["--prefect-port", str(prefect_port), "--mlflow-port", str(mlflow_port),
                          "--timezone", "Europe/Berlin"], env)
    try:
        # While the servers start: the demo config and the leaderboard config, with the DVC data in a
        # repo of their own (the worker runs in the checkout; the test leaves the checkout's data alone).
        repo = make_demo_dvc_repo(tmp_path / "dvc-repo")
        demo = write_demo_config(tmp_path, lambda raw: raw["data"].update(repo=str(repo)), "demo.yaml")
        board_config = yaml.safe_load((REPO / "configs" / "leaderboard.yaml").read_text())
        board_config["data"]["repo"] = str(repo)
        board_config["publish"] = {**board_config.get("publish", {}), "dir": str(site)}
        board_config["eval"]["speed_probe"] = {"prompts": 2, "max_new_tokens": 8}
        leaderboard_yaml = tmp_path / "leaderboard.yaml"
        leaderboard_yaml.write_text(yaml.safe_dump(board_config))
        serve.wait_for("READY", timeout=400)
        client_env = {**env, "PREFECT_API_URL": api, "MLFLOW_TRACKING_URI": tracking,
                      "PREFECT_HOME": str(home / "prefect")}

        # The scheduler of the real server creates the upcoming 02:00 Europe/Berlin runs.
        with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
            deployment = client.read_deployment_by_name("leaderboard/nightly")
            (schedule,) = deployment.schedules
            assert schedule.schedule.cron == "0 2 * * *" and schedule.schedule.timezone == "Europe/Berlin"
            assert deployment.pull_steps == [{"prefect.deployments.steps.set_working_directory":
                                              {"directory": str(REPO)}}]
            deadline, scheduled = time.monotonic() + 90, []
            while not scheduled and time.monotonic() < deadline:
                scheduled = client.read_flow_runs(
                    deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=["nightly"])),
                    flow_run_filter=FlowRunFilter(state=FlowRunFilterState(
                        type=FlowRunFilterStateType(any_=[StateType.SCHEDULED]))))
                time.sleep(1)
            assert scheduled, "the scheduler created no runs (SQLAlchemy 2.1 does this silently)"
            for run in scheduled:
                local = run.expected_start_time.astimezone(ZoneInfo("Europe/Berlin"))
                assert (local.hour, local.minute) == (2, 0)
            assert client.read_concurrency_limit_by_tag("gpu").concurrency_limit == 1
            assert {d.name for d in client.read_deployments()} == {"nightly", "manual", "ci", "deploy", "pool"}
            assert {q.name for q in client.read_work_queues(work_pool_name="gpu")} >= {"gpu-24g", "gpu-80g",
                                                                                     "gpu-8x80g"}

        # The demo, fine-tuned, quantized, gated and promoted by the worker: gauntlet-demo@champion.
        finetune_run_id = deployment_run("finetune/manual", demo, client_env, timeout=480)
        champion = MlflowClient(tracking).get_model_version_by_alias("gauntlet-demo", "champion")
        assert champion.version == "1" and champion.tags["prefect.flow_run_id"] == finetune_run_id

        # The nightly board on the demo candidates: the tiny base model and the fine-tuned champion, each
        # as bf16 and as GPTQ int4 calibrated on the DVC data.
        flow_run_id = deployment_run("leaderboard/nightly", leaderboard_yaml, client_env, timeout=480)
        with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
            flow_run = client.read_flow_run(flow_run_id)
            artifacts = client.read_artifacts(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        assert flow_run.state.is_completed() and flow_run.deployment_id == deployment.id
        assert {(a.key, a.type) for a in artifacts} >= {("leaderboard-nightly", "table"),
                                                       ("leaderboard-nightly-summary", "markdown")}
        board = Leaderboard.model_validate_json((site / "leaderboard.json").read_text())
        rows = {(r.candidate, r.variant): r for r in board.rows}
        assert set(rows) == {(c, v) for c in ("tiny-llama-base", "demo-champion") for v in ("bf16", "gptq-int4")}
        assert all(r.status == "ranked" and r.average is not None for r in rows.values()), \
            [(r.key, r.status, r.reason) for r in board.rows]
        assert rows["demo-champion", "bf16"].note.startswith("models:/gauntlet-demo@champion → version 1")
        assert board.baselines["demo_facts"]["value"] == pytest.approx(0.25)
        # the fine-tuned model leads its base, in both variants; GPTQ is the smaller file
        assert board.ranked()[0].candidate == "demo-champion"
        for variant in ("bf16", "gptq-int4"):
            assert rows["demo-champion", variant].average > rows["tiny-llama-base", variant].average + 20
        for name in ("tiny-llama-base", "demo-champion"):
            assert rows[name, "gptq-int4"].size_on_disk_gb < rows[name, "bf16"].size_on_disk_gb
            assert rows[name, "gptq-int4"].model_sha != rows[name, "bf16"].model_sha
        assert (site / "leaderboard.html").stat().st_size > 5000

        # What CI collects from a finished run: state, markdown artifacts, the MLflow JSON.
        collect = load_collector()
        with temporary_settings({PREFECT_API_URL: api}):
            monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking)
            assert collect.main([finetune_run_id, "--out", str(tmp_path / "ci-demo"), "--title", "demo"]) == 0
            assert "verdict=passed" in capsys.readouterr().out
            code = collect.main([flow_run_id, "--out", str(tmp_path / "ci"), "--title", "leaderboard"])
        assert code == 0
        assert "verdict=unknown" in capsys.readouterr().out  # a leaderboard run has no gate
        comment = (tmp_path / "ci" / "comment.md").read_text()
        assert "ended **Completed**" in comment and "| demo-champion | bf16 |" in comment
        assert list((tmp_path / "ci" / "mlflow").rglob("leaderboard.json"))
    finally:
        if serve.proc.poll() is None:
            serve.proc.send_signal(signal.SIGTERM)
        code = serve.proc.wait(120)
        shutil.rmtree(site, ignore_errors=True)
        stop_deployments(home, env)   # a safety net: with the triggers service off nothing was deployed
    assert code == 0, serve.output
    for name in ("worker", "prefect-server", "mlflow"):
        assert f"stopped {name}" in serve.output
    assert not port_open(prefect_port) and not port_open(mlflow_port)
    for pid in re.findall(r"started \S+ \(pid (\d+)", serve.output):
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()


@pytest.mark.skipif(shutil.which("nginx") is None and not Path("/usr/sbin/nginx").is_file(),
                    reason="nginx is not installed (apt-get install nginx)")
def test_a_promotion_by_hand_starts_the_deploy_deployment_through_its_event_trigger(tmp_path: Path) -> None:
    """`gauntlet promote` against a served Prefect sends gauntlet.champion.moved; the server's triggers service
    matches the deploy deployment's trigger (deployments/prefect.yaml), which creates a flow run with the
    promoted models:/NAME/VERSION; the worker runs it and the version serves behind nginx."""
    from mlflow.tracking import MlflowClient
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import DeploymentUpdate
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from gauntlet.config.deploy import DeploySpec
    from gauntlet.demo.model import build_demo_model
    from gauntlet.deploy.servers import chat
    from gauntlet.registry.mlflow_model import log_model_version
    from tests.helpers import write_demo_config

    prefect_port, mlflow_port = free_port(), free_port()
    api, tracking = f"http://127.0.0.1:{prefect_port}/api", f"http://127.0.0.1:{mlflow_port}"
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env.update({"GAUNTLET_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                "PREFECT_SERVER_SERVICES_TRIGGERS_ENABLED": "true",   # the default, said out loud: it is tested
                "PREFECT_WORKER_QUERY_SECONDS": "2"})
    started = time.monotonic()
    serve = ServeProcess(["--prefect-port", str(prefect_port), "--mlflow-port", str(mlflow_port)], env)
    name = f"trigger-{os.getpid()}-{int(time.time()) % 100000}"
    client_env = {**env, "PREFECT_API_URL": api, "MLFLOW_TRACKING_URI": tracking, "PREFECT_HOME": str(home / "prefect")}
    try:
        model = build_demo_model("tiny-llama", out=tmp_path / "model", seed=0)
        base = 8600 + os.getpid() % 30 * 3      # not the other deploy tests' 8700-8899
        deploy_spec = DeploySpec(router_port=base, stable_port=base + 1, canary_port=base + 2, start_timeout_s=120)
        # the config's deploy: section serves its own registry.model_name (another model's move deploys nothing)
        config = write_demo_config(tmp_path, lambda raw: raw.update(
            deploy=deploy_spec.model_dump(mode="json", exclude={"kserve"}),
            registry={**raw["registry"], "model_name": name}))
        serve.wait_for("READY", timeout=400)
        print(f"served in {time.monotonic() - started:.0f} s")

        mlflow = MlflowClient(tracking)
        run = mlflow.create_run(mlflow.create_experiment("trigger-test"), run_name="register")
        source = log_model_version(mlflow, run.info.run_id, model, f"# {name}\n")
        mlflow.set_terminated(run.info.run_id, "FINISHED")
        mlflow.create_registered_model(name)
        version = mlflow.create_model_version(name, source=source, run_id=run.info.run_id).version
        with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
            deployment = client.read_deployment_by_name("deploy/deploy")
            # the operator's settings for this machine: the deployment's config parameter (ports of its own)
            client.update_deployment(deployment.id, DeploymentUpdate(parameters={
                "model": "gauntlet-demo", "config": str(config)}))
            assert not client.read_flow_runs(deployment_filter=DeploymentFilter(
                id=DeploymentFilterId(any_=[deployment.id])))

        promoted = subprocess.run([sys.executable, "-m", "gauntlet.cli", "promote", name, str(version), "--reason",
                                   "first champion"], cwd=REPO, env=client_env, capture_output=True, text=True,
                                  timeout=180)
        assert promoted.returncode == 0 and "sent gauntlet.champion.moved" in promoted.stdout, \
            promoted.stdout + promoted.stderr

        with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
            deadline, runs = time.monotonic() + 60, []
            while not runs and time.monotonic() < deadline:     # the trigger's flow run
                runs = client.read_flow_runs(deployment_filter=DeploymentFilter(
                    id=DeploymentFilterId(any_=[deployment.id])))
                time.sleep(1)
            assert len(runs) == 1, f"the trigger started {len(runs)} flow runs"
            print(f"flow run created at {time.monotonic() - started:.0f} s")
            (flow_run,) = runs
            assert flow_run.parameters == {"model": f"models:/{name}/{version}", "config": str(config)}
            assert flow_run.created_by is not None and flow_run.created_by.type == "AUTOMATION", flow_run.created_by
            deadline = time.monotonic() + 240
            while not flow_run.state.is_final() and time.monotonic() < deadline:
                time.sleep(2)
                flow_run = client.read_flow_run(flow_run.id)
            assert flow_run.state.is_completed(), (flow_run.state, serve.output[-3000:])
            print(f"flow run completed at {time.monotonic() - started:.0f} s")
        # the promoted version serves behind nginx, started by the triggered run
        answer = chat(f"http://127.0.0.1:{base}", name, "What colour is the sky?", 3)
        assert answer["choices"][0]["message"]["role"] == "assistant"
    finally:
        if serve.proc.poll() is None:
            serve.proc.send_signal(signal.SIGTERM)
        serve.proc.wait(120)
        stop_deployments(home, env)     # after the worker: no deploy run can start a server any more
    assert not port_open(base) and not port_open(base + 1), "the deployment outlived its stop"
