"""The leak test: three secrets planted the way a user's CI would hold them — credentials in
MLFLOW_TRACKING_URI (a real `mlflow server` on 127.0.0.1), a webhook URL carrying a token (a local HTTP
server that records what it is sent) and HF_TOKEN — then `gauntlet run` on the demo (its GPTQ variant left
out: the secrets' paths are the same), then every place a secret could land is read back: MLflow params,
tags, artifacts and registered versions, Prefect's logs, the notification, the command's output, and every
file in the state folder and the server's folder."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.helpers import REPO

pytestmark = pytest.mark.slow
MLFLOW_PASSWORD = "mlflowPassw0rdLeakCheck"
WEBHOOK_TOKEN = "webhookTokenLeakCheck0123"
HF_TOKEN = "hf_GauntletLeakCheckRound2abcdef"
SECRETS = (MLFLOW_PASSWORD, WEBHOOK_TOKEN, HF_TOKEN)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path: Path):
    """A real MLflow tracking server serving its own artifacts, in a folder of its own."""
    folder = tmp_path / "mlflow-server"
    folder.mkdir()
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_"))}
    proc = subprocess.Popen([str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1",
                             "--port", str(port), "--workers", "1",
                             "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
                             "--artifacts-destination", str(folder / "artifacts")],
                            cwd=folder, env=env, stdout=open(tmp_path / "mlflow-server.log", "w"),  # noqa: SIM115
                            stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 180
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).close()
            break
        except OSError:
            assert proc.poll() is None and time.time() < deadline, (tmp_path / "mlflow-server.log").read_text()
            time.sleep(0.5)
    yield port, folder
    os.killpg(proc.pid, 15)
    proc.wait(timeout=30)


def test_no_planted_secret_is_logged_saved_or_posted(dvc_repo: Path, tmp_path: Path, mlflow_server, webhook) -> None:
    port, server_folder = mlflow_server
    hook_port, received = webhook
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env.update(GAUNTLET_HOME=str(home), HF_TOKEN=HF_TOKEN,
               MLFLOW_TRACKING_URI=f"http://gauntlet:{MLFLOW_PASSWORD}@127.0.0.1:{port}",
               LEAK_TEST_WEBHOOK=f"http://127.0.0.1:{hook_port}/hooks/{WEBHOOK_TOKEN}?token={WEBHOOK_TOKEN}")
    run = subprocess.run(
        [sys.executable, "-m", "gauntlet.cli", "run", str(REPO / "configs" / "demo.yaml"),
         "--set", f"data.repo={dvc_repo}", "--set", "quantize.variants=[]", "--set", "gate.register_variants=[]",
         "--set", "notify.webhooks=[{url_env: LEAK_TEST_WEBHOOK}]"],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=900)
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-4000:]
    places: dict[str, str | bytes] = {"the command's output": output}

    # the notification went out (through the token-carrying URL) and says nothing secret
    assert [path for path, _ in received] == [f"/hooks/{WEBHOOK_TOKEN}?token={WEBHOOK_TOKEN}"]
    body = received[0][1].decode()
    assert f"127.0.0.1:{port}/#/experiments/" in body     # the MLflow link is there, without credentials
    places["the notification"] = body

    from mlflow.tracking import MlflowClient

    c = MlflowClient(tracking_uri=f"http://127.0.0.1:{port}")
    runs = [r for exp in c.search_experiments() for r in c.search_runs([exp.experiment_id])]
    assert len(runs) >= 8
    for r in runs:
        places[f"run {r.info.run_name} params and tags"] = repr(r.data.params) + repr(r.data.tags)
    train = next(r for r in runs if r.data.tags.get("gauntlet.stage") == "train")
    assert len(c.get_metric_history(train.info.run_id, "train_loss")) >= 10   # the trainer reached the server
    assert "train_args.json" in {a.path for a in c.list_artifacts(train.info.run_id)}
    versions = c.search_model_versions("name='gauntlet-demo'")
    assert versions
    places["registered versions"] = repr([(v.source, v.tags, v.description) for v in versions])

    # Prefect's logs (the ephemeral API's database in the state folder)
    with sqlite3.connect(home / "prefect" / "prefect.db") as db:
        logs = [m for (m,) in db.execute("SELECT message FROM log")]
    assert len(logs) > 50 and any("data version" in m for m in logs)
    places["Prefect logs"] = "\n".join(logs)

    # every file: the state folder (stage outputs, Prefect's database and results) and the MLflow server's
    # store and artifacts (train_args.json, reports, the summary, error files)
    files = [p for folder in (home, server_folder) for p in folder.rglob("*") if p.is_file()]
    assert len(files) > 100 and any(p.name == "train_args.json" for p in files)
    for p in files:
        if p.stat().st_size < 200 << 20:
            places[str(p)] = p.read_bytes()

    leaks = [(secret, where) for where, text in places.items() for secret in SECRETS
             if (secret.encode() if isinstance(text, bytes) else secret) in text]
    assert not leaks, json.dumps(leaks[:20], indent=1)
