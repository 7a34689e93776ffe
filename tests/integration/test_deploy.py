"""Continuous deployment for real: registered versions as MLflow Models, `transformers serve` processes,
Debian nginx in front, a bounded load through it, the deploy flow in a real Prefect, rollback in the real
registry. Everything on 127.0.0.1; skipped, saying why, where nginx is not installed (.ci/run installs it).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
import uuid
from pathlib import Path

import pytest

from gauntlet.config.deploy import CanaryStep, DeploySpec, Thresholds
from gauntlet.deploy.router import nginx_binary

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.skipif(nginx_binary() is None, reason="nginx is not installed (apt-get install nginx; "
                                                                 ".ci/run installs it where it runs as root)")]
REPO = Path(__file__).parents[2]
# The demo's data as its DVC stage writes it (byte for byte), where a fresh clone has none yet: the deploy
# config's probe file and drift reference (data.train) are the project's own data/demo files.
if not (REPO / "data" / "demo" / "train.jsonl").is_file():
    from gauntlet.demo.data import main as write_demo_data

    write_demo_data(["--params", str(REPO / "params.yaml"), "--out", str(REPO / "data" / "demo")])
# clients ask what the model was trained on (no drift): the demo's training instructions
TRAIN_ROWS = (REPO / "data" / "demo" / "train.jsonl").read_text().splitlines()
PROMPTS = [json.loads(line)["instruction"] for line in TRAIN_ROWS[::max(1, len(TRAIN_ROWS) // 80)]]


def mlflow_client():
    from gauntlet.tracking import client, tracking_uri

    return client(tracking_uri())


def register(c, name: str, folder: Path) -> str:
    """``folder`` as a new version of ``name`` (an MLflow Model), then @champion by a recorded promotion."""
    from gauntlet.config.gate import RegistrySpec
    from gauntlet.registry.mlflow_model import log_model_version
    from gauntlet.registry.promotion import promote_manually
    from gauntlet.tracking import experiment_id

    run = c.create_run(experiment_id(c, "deploy-tests"), run_name="register")
    source = log_model_version(c, run.info.run_id, folder, f"# {name}\n")
    c.set_terminated(run.info.run_id, "FINISHED")
    if not c.search_registered_models(f"name='{name}'"):
        c.create_registered_model(name)
    version = str(c.create_model_version(name, source=source, run_id=run.info.run_id).version)
    promote_manually(c, RegistrySpec(model_name=name), version, reason="test")
    return version


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """Two healthy tiny models and a broken one (its chat template raises: every chat request is a 500)."""
    from gauntlet.demo.model import build_demo_model

    root = tmp_path_factory.mktemp("deploy-models")
    good = build_demo_model("tiny-llama", out=root / "v-a", seed=0)
    other = build_demo_model("tiny-llama", out=root / "v-b", seed=1)
    broken = root / "v-broken"
    shutil.copytree(other, broken)
    (broken / "chat_template.jinja").write_text("{{ raise_exception('this canary is broken') }}")
    return {"a": good, "b": other, "broken": broken}


@pytest.fixture(scope="module")
def slow_model(models, tmp_path_factory) -> Path:
    """The tiny model's tokenizer on a much wider and deeper Llama (768 wide, 12 layers, about 85M parameters
    against 0.5M) that never ends an answer early (its end-of-sequence token suppressed in its generation
    config): every answer runs to max_tokens, each token tens of times slower on the CPU."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("deploy-models") / "v-slow"
    shutil.copytree(models["a"], out)
    for weights in out.glob("*.safetensors"):
        weights.unlink()
    config = LlamaConfig.from_pretrained(models["a"])
    config.update({"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                   "num_attention_heads": 12, "num_key_value_heads": 12})
    torch.manual_seed(2)
    LlamaForCausalLM(config).save_pretrained(out)
    generation = GenerationConfig.from_pretrained(models["a"])
    generation.suppress_tokens = [config.eos_token_id]
    generation.save_pretrained(out)
    return out


def spec(**steps) -> DeploySpec:
    base = 8700 + uuid.uuid4().int % 200 * 3
    return DeploySpec(router_port=base, stable_port=base + 1, canary_port=base + 2, start_timeout_s=120,
                      steps=[CanaryStep(weight=w, watch_s=s) for w, s in steps.get("steps", [(10, 6), (50, 6),
                                                                                              (100, 6)])],
                      thresholds=Thresholds(**{"min_requests": 3, "max_p95_ratio": None,
                                               "min_tokens_per_s_ratio": None, **steps.get("thresholds", {})}))


def run_flow(name: str, deploy_spec: DeploySpec, tmp_path: Path, webhook_env: str | None = None,
             config_model: str | None = None):
    """The deploy flow on ``name``'s champion (``name`` may be a models:/ URI), with ``deploy_spec`` as the
    deploy: section of a demo config for ``config_model`` (registry.model_name; default: ``name``) and a
    webhook, its URL in ``$webhook_env``, subscribed to the default events."""
    from gauntlet.flows.deploy import deploy
    from tests.helpers import write_demo_config

    def mutate(raw):
        raw["registry"]["model_name"] = config_model or name
        raw["deploy"] = deploy_spec.model_dump(mode="json", exclude={"kserve"})
        raw["deploy"]["probe"] = {"file": str(REPO / "data" / "demo" / "eval.jsonl"),
                                  "limit": 3, "max_tokens": 4}
        if webhook_env:
            raw["notify"] = {"webhooks": [{"url_env": webhook_env}]}
    return deploy(model=name, config=str(write_demo_config(tmp_path, mutate)))


def step_reports(c, name_prefix: str = "step-") -> list[dict]:
    """The step reports the newest deploy run logged to MLflow, in order."""
    from gauntlet.tracking import experiment_id

    exp = experiment_id(c, "gauntlet-deploy")
    parent = c.search_runs([exp], "tags.`gauntlet.flow` = 'deploy'", order_by=["attributes.start_time DESC"],
                           max_results=1)[0]
    children = c.search_runs([exp], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    out = []
    for run in children:
        for a in c.list_artifacts(run.info.run_id):
            if a.path.startswith(name_prefix) and a.path.endswith(".json"):
                out.append(json.loads(Path(c.download_artifacts(run.info.run_id, a.path)).read_text()))
    return sorted(out, key=lambda r: r["step"])


@pytest.fixture()
def load():
    """A load generator through the router, in a thread, until the test stops it."""
    started = []

    def start(port: int, name: str, max_tokens: int = 4):
        from gauntlet.deploy.load import generate

        stop, box = threading.Event(), {}
        thread = threading.Thread(target=lambda: box.update(result=generate(
            f"http://127.0.0.1:{port}", name, PROMPTS, concurrency=2, max_requests=5000, stop=stop,
            max_tokens=max_tokens)), daemon=True)
        thread.start()
        started.append(stop)

        def finish():
            stop.set()
            thread.join(120)
            return box["result"]
        return finish
    yield start
    for stop in started:
        stop.set()


def test_registered_version_is_an_mlflow_chat_model(models) -> None:
    """Priority 0: MLmodel with the transformers flavor, the chat task and signature, pip requirements, the
    card at the root; MLflow's own loader answers a chat request."""
    import mlflow

    c = mlflow_client()
    name = f"deploy-model-{uuid.uuid4().hex[:6]}"
    version = register(c, name, models["a"])
    info = mlflow.models.get_model_info(f"models:/{name}/{version}")
    assert info.flavors["transformers"]["inference_task"] == "llm/v1/chat"
    assert "messages" in info.signature.inputs.input_names()
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{name}/{version}"))
    assert any(line.startswith("transformers==") for line in (local / "requirements.txt").read_text().splitlines())
    assert (local / "README.md").read_text() == f"# {name}\n" and (local / "config.json").is_file()
    answer = mlflow.pyfunc.load_model(f"models:/{name}/{version}").predict(
        {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
    assert answer[0]["object"] == "chat.completion"


def test_healthy_canary_goes_10_50_100_without_a_failed_request(models, prefect_api, load, tmp_path) -> None:
    from gauntlet.deploy.rollout import load_state, stop_all

    c = mlflow_client()
    name = f"deploy-ok-{uuid.uuid4().hex[:6]}"
    s = spec()
    try:
        register(c, name, models["a"])
        assert "serves" in run_flow(name, s, tmp_path)          # first deploy: v1 is stable, nothing to canary
        v2 = register(c, name, models["b"])
        finish = load(s.router_port, name)
        message = run_flow(name, s, tmp_path)                    # v2 canaried 10 → 50 → 100 under load
        result = finish()
        assert f"v{v2} is stable" in message, message
        assert result.failed == 0 and result.ok > 30, (result.failed, result.failures[:3])
        reports = step_reports(c)
        assert [r["weight"] for r in reports] == [10, 50, 100]
        for r in reports:
            assert abs(r["canary_share"] - r["weight"]) <= 5, r
        state = load_state(name)
        assert state.stable.version == v2 and state.canary is None
    finally:
        stop_all(name)


def test_broken_canary_is_rolled_back_and_champion_restored(models, prefect_api, load, webhook, monkeypatch,
                                                            tmp_path) -> None:
    from gauntlet.deploy.rollout import load_state, stop_all
    from gauntlet.registry.store import history

    c = mlflow_client()
    name = f"deploy-bad-{uuid.uuid4().hex[:6]}"
    s = spec()
    hook_port, received = webhook
    monkeypatch.setenv("GAUNTLET_TEST_DEPLOY_HOOK", f"http://127.0.0.1:{hook_port}/deploy")
    try:
        v1 = register(c, name, models["a"])
        run_flow(name, s, tmp_path, "GAUNTLET_TEST_DEPLOY_HOOK")
        v2 = register(c, name, models["broken"])
        finish = load(s.router_port, name)
        message = run_flow(name, s, tmp_path, "GAUNTLET_TEST_DEPLOY_HOOK")
        result = finish()
        assert message.startswith("rolled back"), message
        assert str(c.get_model_version_by_alias(name, "champion").version) == v1
        last = history(c, name)[-1]
        assert last.action == "rollback" and f"canary v{v2}" in last.reason and "error rate" in last.reason
        assert str(c.get_model_version(name, v2).version) == v2           # still registered
        state = load_state(name)
        assert state.stable.version == v1 and state.canary is None and state.weights.canary == 0
        # the clients saw the canary's own 500s during its one step at 10%, and nothing else: no request failed
        # because of the rollback (a 502, a refused or reset connection while the canary stopped)
        assert result.ok > 0 and result.failed <= result.sent * 0.3, (result.ok, result.failed)
        assert [f for f in result.failures if not f.startswith("HTTPError: HTTP Error 500")] == [], \
            result.failures
        # the webhook (default events) got one message: the rollback, naming the versions and the breach
        (path, body), = received
        text = json.loads(body)["text"]
        assert path == "/deploy" and "canary ROLLED BACK" in text and f"v{v2} → v{v1}" in text, text
        assert "error rate" in json.dumps(json.loads(body)["blocks"]), body
    finally:
        stop_all(name)


def test_slow_canary_is_rolled_back_on_its_p95(models, slow_model, prefect_api, load, tmp_path, monkeypatch) -> None:
    """A canary that answers, right-shaped and without errors, but many times slower per token than stable:
    with answers of 24 tokens (generation, not the request's overhead, decides the time) its p95 at the router
    breaches max_p95_ratio (2x stable's in the same window) and it is rolled back. (A 25M-parameter canary
    with 4-token answers came out only 1.6x stable's p95 on a quiet 2-core machine: the servers share it.)"""
    from gauntlet.deploy.rollout import load_state, stop_all
    from gauntlet.registry.store import history

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)   # each server gets half the cores (servers.py)
    c = mlflow_client()
    name = f"deploy-slow-{uuid.uuid4().hex[:6]}"
    s = spec(steps=[(50, 16), (100, 6)], thresholds={"max_p95_ratio": 2.0})
    try:
        v1 = register(c, name, models["a"])
        run_flow(name, s, tmp_path)
        v2 = register(c, name, slow_model)
        finish = load(s.router_port, name, max_tokens=24)
        message = run_flow(name, s, tmp_path)
        result = finish()
        assert message.startswith("rolled back"), message
        (report,) = step_reports(c)                      # judged, and rolled back, at its first step
        canary, stable = report["canary"], report["stable"]
        print(f"p95 canary {canary['p95_s']} s ({canary['requests']} requests), stable {stable['p95_s']} s "
              f"({stable['requests']})")
        assert canary["requests"] >= 3 and canary["errors"] == 0, canary
        assert canary["p95_s"] > 2.0 * stable["p95_s"], (canary, stable)
        last = history(c, name)[-1]
        assert last.action == "rollback" and f"canary v{v2}" in last.reason and "p95 latency" in last.reason, \
            last.reason
        assert str(c.get_model_version_by_alias(name, "champion").version) == v1
        assert str(c.get_model_version(name, v2).version) == v2           # still registered
        state = load_state(name)
        assert state.stable.version == v1 and state.canary is None and state.weights.canary == 0
        assert result.failed == 0, result.failures[:3]      # slow, never failed; the rollback lost no request
    finally:
        stop_all(name)


def test_a_canary_whose_server_dies_is_rolled_back_and_clients_barely_notice(models, prefect_api, load,
                                                                            tmp_path) -> None:
    """The canary's server is killed during its first step: the window ends early, the rollout rolls back on
    its own (the probe gets no answer), and nginx sends the clients' requests on to stable."""
    from gauntlet.deploy.rollout import load_state, stop_all
    from gauntlet.deploy.servers import pid_alive

    c = mlflow_client()
    name = f"deploy-killed-{uuid.uuid4().hex[:6]}"
    s = spec(steps=[(50, 20), (100, 6)])
    killed: list[int] = []

    def kill_the_canary() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not killed:
            state = load_state(name)
            if state.canary is not None and pid_alive(state.canary.pid) and state.weights.canary > 0:
                time.sleep(3)                     # let it take traffic first
                os.kill(state.canary.pid, signal.SIGKILL)
                killed.append(state.canary.pid)
            time.sleep(0.5)

    try:
        v1 = register(c, name, models["a"])
        run_flow(name, s, tmp_path)
        v2 = register(c, name, models["b"])
        finish = load(s.router_port, name)
        killer = threading.Thread(target=kill_the_canary, daemon=True)
        killer.start()
        started = time.monotonic()
        message = run_flow(name, s, tmp_path)
        result = finish()
        assert killed, "the canary never served"
        assert message.startswith("rolled back"), message
        from gauntlet.registry.store import history

        reason = history(c, name)[-1].reason
        assert "no answer from the canary" in reason, reason   # judged on the dead server, not by luck
        assert time.monotonic() - started < 20 + 60   # the 20 s window ended early, not at its end
        assert str(c.get_model_version_by_alias(name, "champion").version) == v1
        assert str(c.get_model_version(name, v2).version) == v2   # still registered
        state = load_state(name)
        assert state.stable.version == v1 and state.canary is None
        # requests that hit the dead canary were passed on to stable (proxy_next_upstream): few or none lost
        assert result.ok > 10 and result.failed <= max(2, result.sent * 0.05), (result.ok, result.failed,
                                                                               result.failures[:3])
    finally:
        stop_all(name)


def test_two_models_on_one_host_get_ports_of_their_own_and_both_answer(models, prefect_api, tmp_path) -> None:
    """Two models deployed with the same deploy: settings: the first takes the configured ports, the second
    the next free ones (a router port of its own too), and each router answers for its own model."""
    from gauntlet.deploy.rollout import load_state, stop_all
    from gauntlet.deploy.servers import chat

    c = mlflow_client()
    first, second = (f"deploy-ports-{uuid.uuid4().hex[:6]}" for _ in range(2))
    s = spec()
    try:
        for name, folder in ((first, models["a"]), (second, models["b"])):
            register(c, name, folder)
            assert "serves" in run_flow(name, s, tmp_path)
        a, b = load_state(first), load_state(second)
        assert (a.router_port, a.stable.port) == (s.router_port, s.stable_port)
        ports = [a.router_port, a.stable.port, b.router_port, b.stable.port]
        assert len(set(ports)) == 4, ports
        for state in (a, b):
            answer = chat(f"http://127.0.0.1:{state.router_port}", state.model, "What colour is the sky?", 3)
            assert answer["choices"][0]["message"]["role"] == "assistant", answer
    finally:
        stop_all(first)
        stop_all(second)


def test_a_promotion_of_a_model_and_its_variant_leaves_no_failed_deploy_run(models, prefect_api, tmp_path) -> None:
    """The run's promotions move @champion of the model and of its variant (gate.register_variants): each
    sends gauntlet.champion.moved, and the deploy deployment's trigger runs the deploy flow on each with the
    deployment's config. The model is deployed; the variant, which the config's deploy: section does not
    serve, completes with "nothing to deploy". No deploy flow run is FAILED (read from the Prefect API)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    from gauntlet.deploy.rollout import load_state, stop_all

    c = mlflow_client()
    name = f"deploy-variant-{uuid.uuid4().hex[:6]}"
    variant = f"{name}-gptq-w4g64"
    s = spec()
    try:
        uris = [f"models:/{name}/{register(c, name, models['a'])}",
                f"models:/{variant}/{register(c, variant, models['b'])}"]
        messages = [run_flow(uri, s, tmp_path, config_model=name) for uri in uris]   # as the trigger starts them
        assert "serves" in messages[0], messages
        assert messages[1] == f"nothing to deploy for {variant}: the config's deploy: section serves {name}"
        assert load_state(name).stable is not None and load_state(variant) is None
        with get_client(sync_client=True) as client:
            runs = [r for r in client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["deploy"])))
                    if r.parameters.get("model") in uris]
        assert sorted(r.parameters["model"] for r in runs) == sorted(uris)
        assert [r.state.type.value for r in runs] == ["COMPLETED", "COMPLETED"], [r.state for r in runs]
    finally:
        stop_all(name)
