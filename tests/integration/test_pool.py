"""Gauntlet on a team's pool, for real: the team stack (PostgreSQL, Redis, an S3 object store, the Prefect and
MLflow servers) started once per session, and two hosts that share nothing but the network: each its own state
folder, project copy, host name and (where it can be made) network namespace, each running `gauntlet worker` held
to one CPU core as it would own one GPU. Flow runs are submitted the way CI submits them, `prefect deployment run`.
"""

from __future__ import annotations

import contextlib
import copy
import time
from pathlib import Path

import pytest
import yaml

from tests.helpers import REPO
from tests.pool import (
    Host,
    deploy_pool_flows,
    flow_run_logs,
    run_deployment,
    unique,
    wait_flow_runs,
)

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning")]


@pytest.fixture(scope="module")
def pool(team_stack, tmp_path_factory):
    """Two hosts with a worker each, the pool's deployments applied."""
    root = tmp_path_factory.mktemp("pool")
    hosts = [Host(f"host-{c}", root / f"host-{c}", team_stack.env, index=i).setup(team_stack.netns)
             for i, c in enumerate("ab")]
    for h in hosts:
        h.root.chmod(0o755)
    try:
        for i, h in enumerate(hosts):
            h.start_worker(core=i)
        for h in hosts:
            h.wait_online()
        deploy_pool_flows(hosts[0].environment(), hosts[0].project)   # the workers made the pool
        yield hosts
    finally:
        for h in hosts:
            h.stop()


def small_demo(name: str, **train) -> dict:
    """configs/demo.yaml, small: no quantized variant, no perplexity, a short training checkpointed often."""
    raw = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    raw["name"] = name
    raw["quantize"] = {"variants": []}
    raw["gate"].pop("max_perplexity_increase", None)
    raw["gate"]["register_variants"] = []
    raw["eval"].pop("perplexity", None)
    raw["eval"]["speed_probe"] = {"enabled": False}
    raw["train"].update({"max_steps": 30, "checkpoint_steps": 10, **train})
    raw["registry"] = {"model_name": name}
    raw["tracking"] = {"experiment": name}
    return raw


def put_config(hosts: list[Host], raw: dict) -> str:
    rel = f"configs/{raw['name']}.yaml"
    for h in hosts:
        (h.project / rel).write_text(yaml.safe_dump(copy.deepcopy(raw)))
    return rel


def mlflow_client(env: dict[str, str]):
    from mlflow.tracking import MlflowClient

    return MlflowClient(env["MLFLOW_TRACKING_URI"])


def test_one_training_across_hosts(pool, team_stack) -> None:
    """The same config submitted twice at once lands on both hosts (once with `prefect deployment run`, once with
    `gauntlet run --pool`, which queues it by its plan): it trains once between them, the other host's
    train stage takes the result with its files fetched from the store, and one version is registered."""
    env = team_stack.env
    name = unique("pool-once")
    config = put_config(pool, small_demo(name))
    # once as CI submits it, once placed by its plan with `gauntlet run --pool` (the demo fits the smallest class)
    ids = [run_deployment(env, "finetune/pool", config=config)]
    queued = pool[1].run("run", config, "--pool", timeout=300)
    assert queued.returncode == 0 and "queued" in queued.stdout and "on gpu-24g" in queued.stdout, \
        queued.stdout + queued.stderr
    ids.append(queued.stdout.split("flow run ")[1].split()[0])
    runs = wait_flow_runs(env, ids, timeout=900)
    assert {r.work_queue_name for r in runs.values()} == {"gpu-24g"}
    logs = {i: flow_run_logs(env, i) for i in ids}
    assert all(r.state.is_completed() for r in runs.values()), {
        i: (r.state.name, r.state.message, logs[i][-3000:]) for i, r in runs.items()}
    c = mlflow_client(env)
    exp = c.get_experiment_by_name(name).experiment_id
    parents = c.search_runs([exp], "tags.`gauntlet.role` = 'parent'")
    assert {p.data.tags["gauntlet.host"] for p in parents} == {"host-a", "host-b"}, "both hosts ran the config"
    launches = sum(text.count("launching: ") for text in logs.values())
    assert launches == 1, {i: text[-2000:] for i, text in logs.items()}   # one `accelerate launch` between them
    other = next(i for i, text in logs.items() if "launching: " not in text)
    assert "fetching" in logs[other] and "of stage train from the store" in logs[other], logs[other][-3000:]
    versions = c.search_model_versions(f"name='{name}'")
    assert len(versions) == 1, [v.version for v in versions]


def wait_for(what, check, timeout: float, every: float = 1.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def train_runs(c, exp: str) -> list:
    return c.search_runs([exp], "tags.`gauntlet.stage` = 'train'")


def test_a_training_whose_host_dies_resumes_on_the_other_host(pool, team_stack) -> None:
    """The training host dies (every process of it SIGKILLed) after a checkpoint reached the store: Prefect marks
    the flow run for retry when its heartbeats stop, the other host takes it, restores the newest uploaded
    checkpoint and trains on from there; the same MLflow runs carry on."""
    from gauntlet.checkpoints import NEWEST_TAG

    env = team_stack.env
    name = unique("pool-resume")
    config = put_config(pool, small_demo(name, max_steps=400, checkpoint_steps=10))
    flow_run_id = run_deployment(env, "finetune/pool", config=config)
    c = mlflow_client(env)
    exp = wait_for("the experiment", lambda: c.get_experiment_by_name(name), 300).experiment_id
    wait_for("a checkpoint in the store", lambda: any(r.data.tags.get(NEWEST_TAG) for r in train_runs(c, exp)), 600)
    parent = c.search_runs([exp], "tags.`gauntlet.role` = 'parent'")[0]
    dying = next(h for h in pool if h.name == parent.data.tags["gauntlet.host"])
    survivor = next(h for h in pool if h is not dying)
    dying.die()
    try:
        uploaded = max(int(r.data.tags[NEWEST_TAG].removeprefix("step-")) for r in train_runs(c, exp)
                       if r.data.tags.get(NEWEST_TAG))
        (run,) = wait_flow_runs(env, [flow_run_id], timeout=1200).values()
        logs = flow_run_logs(env, flow_run_id)
        assert run.state.is_completed(), (run.state.name, run.state.message, logs[-4000:])
        assert run.run_count == 2, run.run_count
        (train,) = train_runs(c, exp)                           # the first attempt's stage run, continued
        tags = train.data.tags
        assert tags["gauntlet.attempt"] == "2" and train.info.status == "FINISHED", tags
        assert int(tags["gauntlet.resumed_from_step"]) == uploaded, (tags, uploaded)   # no step before it again
        assert f"restored checkpoint step-{uploaded:08d} from the store" in logs, logs[-4000:]
        (parent,) = c.search_runs([exp], "tags.`gauntlet.role` = 'parent'")
        assert parent.data.tags["gauntlet.host"] == survivor.name and parent.info.status == "FINISHED"
        assert parent.data.tags["gauntlet.flow_attempt"] == "2"
    finally:
        dying.start_worker(core=pool.index(dying)).wait_online()   # the next tests have two hosts again


@pytest.fixture(scope="module")
def night_models(pool, tmp_path_factory) -> list[str]:
    """Four tiny models (different seeds), the same folder in every host's project (a candidate's local path is
    relative to the project)."""
    import shutil

    from gauntlet.demo.model import build_demo_model

    built = tmp_path_factory.mktemp("night-models")
    names = []
    for seed in range(4):
        folder = build_demo_model("tiny-llama", out=built / f"cand-{seed}", seed=seed)
        for h in pool:
            shutil.copytree(folder, h.project / "models" / f"cand-{seed}")
        names.append(f"models/cand-{seed}")
    return names


def night_config(pool: list[Host], models: list[str], name: str) -> str:
    raw = yaml.safe_load((REPO / "configs" / "leaderboard.yaml").read_text())
    raw.update({"name": name, "variants": ["bf16"], "tracking": {"experiment": name},
                "candidates": [{"source": m, "name": f"cand-{i}"} for i, m in enumerate(models)]
                + [{"source": "models/gone", "name": "gone"}]})
    raw["eval"]["speed_probe"] = {"enabled": False}
    raw["concurrency"] = {"pool": "gpu"}
    return put_config(pool, raw)


def read_board(host: Host, name: str):
    from gauntlet.leaderboard.board import Leaderboard

    return Leaderboard.model_validate_json((host.home / "leaderboard" / name / "leaderboard.json").read_text())


def restart_servers_during(team_stack, name: str, away: dict[str, object]) -> None:
    """Once the night's first job has its MLflow run: restart the MLflow server, then the Prefect server (the seconds
    each was away go into ``away``; an error too, for the test to name)."""
    c = mlflow_client(team_stack.env)
    try:
        exp = wait_for("the night's experiment", lambda: c.get_experiment_by_name(name), 300).experiment_id
        wait_for("a job's run", lambda: c.search_runs([exp], "tags.`gauntlet.leaderboard_job` != ''"), 300)
        away["mlflow"] = team_stack.restart("mlflow")
        time.sleep(10)
        away["prefect-server"] = team_stack.restart("prefect-server")
    except BaseException as e:  # noqa: BLE001  (reported by the test)
        away["error"] = repr(e)


def test_a_night_on_two_workers_through_server_restarts(pool, night_models, team_stack) -> None:
    """A board of five candidates spread over the pool, one flow run each, while the MLflow server and then the
    Prefect server are stopped and started again: the night completes with every row, both workers ran jobs, every
    row records its host, GPU, wall and GPU time, the night says how busy each worker was, and the candidate whose
    source is gone fails its own row only."""
    import threading

    name = unique("pool-night")
    config = night_config(pool, night_models, name)
    away: dict[str, object] = {}
    restarts = threading.Thread(target=restart_servers_during, args=(team_stack, name, away))
    restarts.start()
    done = pool[0].run("leaderboard", config, timeout=1500)
    restarts.join(600)
    assert set(away) == {"mlflow", "prefect-server"}, away       # both were away while the night ran
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    board = read_board(pool[0], name)
    rows = {r.candidate: r for r in board.rows}
    assert set(rows) == {"cand-0", "cand-1", "cand-2", "cand-3", "gone"}
    assert rows["gone"].status == "failed" and "gone" in rows["gone"].reason, rows["gone"]
    ranked = [rows[f"cand-{i}"] for i in range(4)]
    assert all(r.status == "ranked" and r.average is not None for r in ranked), [(r.status, r.reason) for r in ranked]
    assert {r.worker for r in ranked} == {"host-a", "host-b"}, [(r.candidate, r.worker) for r in ranked]
    assert all(r.host == r.worker and r.gpu.startswith("cpu cores") and r.wall_s >= r.gpu_s > 0 for r in ranked), \
        [(r.host, r.gpu, r.wall_s, r.gpu_s) for r in ranked]
    assert {w.worker for w in board.workers} == {"host-a", "host-b"}
    assert all(0 < w.busy <= 1 and w.jobs >= 1 for w in board.workers), board.workers
    assert "## GPU workers" in (pool[0].home / "leaderboard" / name / "leaderboard.md").read_text()
    # Nothing lost: every job's MLflow run ends FINISHED. A Prefect outage longer than the heartbeat window makes the
    # retry automation start a second attempt of a job that was alive (docs/scale.md): it continues the same MLflow
    # run and may still be running when the board is out, so its end is awaited.
    c = mlflow_client(team_stack.env)
    exp = c.get_experiment_by_name(name).experiment_id

    def job_runs() -> list:
        return [r for r in c.search_runs([exp], "tags.`gauntlet.leaderboard_job` != ''")
                if not r.data.tags["gauntlet.leaderboard_job"].startswith("gone:")]

    with contextlib.suppress(AssertionError):   # the assertion below names the runs that did not end
        wait_for("every job's run to end", lambda: all(r.info.status != "RUNNING" for r in job_runs()), 600, 5)
    jobs = job_runs()
    assert len(jobs) == 4 and {r.info.status for r in jobs} == {"FINISHED"}, (away, [
        (r.info.run_name, r.info.status, r.data.tags.get("gauntlet.flow_attempt")) for r in jobs])
    planned = pool[1].run("leaderboard", config, "--plan", timeout=300)   # K from the pool, on any host
    assert "workers: 2 (online in pool gpu: host-a, host-b)" in planned.stdout, planned.stdout + planned.stderr


def test_one_audit_from_every_host(pool, team_stack, tmp_path) -> None:
    """A promotion by hand on one host and a rollback on the other: `gauntlet audit` on either host lists both."""
    import json

    from gauntlet.demo.model import build_demo_model

    env = team_stack.env
    c = mlflow_client(env)
    name = unique("pool-audit")
    folder = build_demo_model("tiny-llama", out=tmp_path / "m", seed=3)
    exp = c.create_experiment(name)
    versions = []
    c.create_registered_model(name)
    for _ in range(2):
        run = c.create_run(exp)
        c.log_artifacts(run.info.run_id, str(folder), "model")
        versions.append(c.create_model_version(name, source=f"{run.info.artifact_uri}/model",
                                               run_id=run.info.run_id).version)
    a, b = pool
    assert a.run("promote", name, str(versions[0]), "--reason", "first").returncode == 0
    done = b.run("promote", name, str(versions[1]), "--reason", "second")
    assert done.returncode == 0, done.stderr
    done = a.run("rollback", name, "--reason", "back")
    assert done.returncode == 0, done.stderr
    seen = {}
    for h in pool:
        out = h.run("audit", "--model", name, "--json")
        assert out.returncode == 0, out.stderr
        seen[h.name] = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert seen["host-a"] == seen["host-b"], seen
    entries = seen["host-a"]
    assert [(e["action"], e["host"]) for e in entries] == [
        ("manual-promote", "host-a"), ("manual-promote", "host-b"), ("rollback", "host-a")], entries


def test_a_worker_with_host_local_state_refuses_to_start_naming_the_fix(team_stack, tmp_path) -> None:
    """A host set up against a sqlite MLflow, or with a DVC remote only it can see, is refused before it joins the
    pool (exit 2), with the fix printed; set up right, the same host passes that check."""
    import subprocess

    host = Host("host-c", tmp_path / "host-c", team_stack.env, index=2).setup(False)
    worker = ("worker", "--queue", "gpu-24g", "--cpu-cores", "0", "--name", "host-c")
    sqlite = host.run(*worker, timeout=120, MLFLOW_TRACKING_URI=f"sqlite:///{host.home}/mlflow.db")
    assert sqlite.returncode == 2, sqlite.stdout + sqlite.stderr
    assert "MLFLOW_TRACKING_URI is sqlite:///" in sqlite.stderr and "export MLFLOW_TRACKING_URI=http://" in \
        sqlite.stderr, sqlite.stderr
    assert "DVC remote" not in sqlite.stderr, sqlite.stderr    # only what is wrong is named

    dvc = str(Path(__import__("sys").executable).with_name("dvc"))
    subprocess.run([dvc, "remote", "add", "--local", "-f", "-d", "team", str(tmp_path / "only-here")],
                   cwd=host.project, check=True, capture_output=True)
    local = host.run(*worker, timeout=120)
    assert local.returncode == 2, local.stdout + local.stderr
    assert f"the default DVC remote 'team' is {tmp_path / 'only-here'}, a folder only this host sees" in \
        local.stderr and "dvc remote add --local -d team s3://" in local.stderr, local.stderr
    assert "MLFLOW_TRACKING_URI" not in local.stderr, local.stderr


def test_a_promotion_on_one_host_deploys_on_the_serving_host(pool, team_stack, tmp_path) -> None:
    """A serving host joins the serving pool (`gauntlet worker --serving`). A promotion by hand on host-a moves
    @champion; its event starts the deploy flow, which runs on the serving host and serves there. `gauntlet deploy
    status` on host-a (which serves nothing) shows what serves on the serving host, read from the shared store."""
    import subprocess
    import sys

    from gauntlet.demo.model import build_demo_model
    from tests.pool import deployment_flow_runs

    name = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())["registry"]["model_name"]  # what deploy/deploy
    serving = Host("serving", tmp_path / "serving", team_stack.env, index=3).setup(team_stack.netns)   # serves
    serving.root.chmod(0o755)
    try:
        serving.start_worker(1, role=("--serving",)).wait_online(pool="serving")
        deploy_pool_flows(pool[0].environment(), pool[0].project, names=("deploy/deploy",))
        c = mlflow_client(team_stack.env)
        run = c.create_run(c.create_experiment(unique("pool-serve")))
        c.log_artifacts(run.info.run_id, str(build_demo_model("tiny-llama", out=tmp_path / "m", seed=5)), "model")
        c.create_registered_model(name)
        version = c.create_model_version(name, source=f"{run.info.artifact_uri}/model", run_id=run.info.run_id).version
        a = pool[0]
        promoted = a.run("promote", name, str(version), "--reason", "serve it")
        assert promoted.returncode == 0, promoted.stdout + promoted.stderr

        def deploy_ended():
            runs = deployment_flow_runs(team_stack.env, "deploy/deploy")
            return runs if runs and all(r.state.is_final() for r in runs) else None

        (deployed,) = wait_for("the triggered deploy flow run to end", deploy_ended, 420, 2)
        logs = flow_run_logs(team_stack.env, str(deployed.id))
        assert deployed.state.is_completed() and deployed.work_pool_name == "serving", (deployed.state, logs[-3000:])
        assert f"starting transformers server for {name} v{version} (stable)" in logs and "router on http://" in \
            logs, logs[-3000:]
        status = a.run("deploy", "status", name)
        assert status.returncode == 0, status.stderr
        assert "on host serving" in status.stdout and f"stable: v{version} on port" in status.stdout, status.stdout
        router = status.stdout.split("router ", 1)[1].split()[0]          # http://127.0.0.1:PORT
        ask = subprocess.run(serving.prefix() + [sys.executable, "-c", "import urllib.request as u; print(u.urlopen("
                                                 f"'{router}/v1/models', timeout=30).status)"],
                             capture_output=True, text=True, timeout=60, env=serving.environment())
        assert ask.stdout.strip() == "200", ask.stdout + ask.stderr     # the router answers on the serving host
    finally:
        serving.run("deploy", "stop", name, timeout=120)
        serving.stop()
