"""The gate and the registry: rules, lineage and model card, compare-and-set promotion under a real race,
manual promotion / rollback / history, and webhook notifications.

Real sqlite MLflow (the session's store in $GAUNTLET_HOME), real processes racing, a real HTTP server on
127.0.0.1, real Prefect (the session's test API) where tasks and the flow run. The model folders in the
protocol tests are small fake folders: what is under test there is the registry protocol, not the model.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import threading
import time
import traceback
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from itertools import pairwise
from pathlib import Path

import pytest

from gauntlet.config.gate import GateSpec, RegistrySpec
from gauntlet.config.notify import NotifySpec
from tests.helpers import make_report

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

EXPERIMENT = "registry-tests"

# The race: the champion scores 0.50; challengers 0.70 and 0.60 both pass against it, but 0.60 does not pass
# against 0.70 (a drop of 0.10 > 0.05). So the only champion that beat its predecessor at the end is 0.70.
RACE_GATE = GateSpec(metric="acc", required_tasks=["facts"], min_scores={"facts": 0.4}, max_regression=0.05)


def fake_model_dir(root: Path, label: str) -> Path:
    """A small folder with distinct content (so a distinct model.sha)."""
    folder = root / f"model-{label}-{uuid.uuid4().hex[:8]}"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"label": label}))
    (folder / "weights.bin").write_bytes(os.urandom(256))
    return folder


def lineage_for(folder: Path, flow_run_id: str = "flow-run-test") -> dict[str, str]:
    from gauntlet.hashing import sha256_dir

    return {"base_model.source": "demo://tiny-llama", "base_model.revision": "r1", "base_model.sha": "b" * 64,
            "data.md5": "d41d8cd98f00b204e9800998ecf8427e", "config_hash": "c" * 64, "git_commit": "abc123",
            "model.sha": sha256_dir(folder), "prefect.flow_run_id": flow_run_id, "mlflow.parent_run_id": "parent"}


def mlflow_client():
    from gauntlet.tracking import client, tracking_uri

    return client(tracking_uri())


def experiment(c) -> str:
    from gauntlet.tracking import experiment_id

    return experiment_id(c, EXPERIMENT)


def register(c, registry: RegistrySpec, root: Path, scores: dict[str, float], perf: dict | None = None):
    from gauntlet.registry.candidates import register_candidate

    folder = fake_model_dir(root, registry.model_name)
    run = c.create_run(experiment(c), run_name="register")
    report = make_report(scores, perf)
    return register_candidate(c, registry, run.info.run_id, folder, lineage_for(folder), report), report


def gate_and_promote(c, registry: RegistrySpec, gate: GateSpec, candidate, report, by: str = "test"):
    from gauntlet.gate import decide
    from gauntlet.registry.promotion import promote_if_passing
    from gauntlet.registry.store import champion_of

    current, scores = champion_of(c, registry)
    decision = decide(gate, report, None, current, scores)
    return decision, promote_if_passing(c, registry, gate, decision, candidate, report, None, by=by)


def unique(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:6]}"


def test_gate_task_logs_decision_to_mlflow_and_prefect(prefect_api) -> None:
    """The real `gate` task: the decision lands in MLflow (json, md, metrics) and as a Prefect artifact."""
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from gauntlet.tasks.gate import gate
    from gauntlet.tracking import RunContext

    c = mlflow_client()
    parent = c.create_run(experiment(c), run_name="gate-parent")
    ctx = RunContext(tracking_uri=c.tracking_uri, experiment_id=experiment(c), parent_run_id=parent.info.run_id,
                     flow_run_id=None)
    spec = GateSpec(required_tasks=["facts", "reasoning"], min_scores={"facts": 0.5})

    @flow(name="gate-only")
    def gate_only() -> object:
        return gate(spec=spec, registry=RegistrySpec(model_name=unique("gate-task")),
                    report=make_report({"facts": 0.9}), base=None, run=ctx)

    decision = gate_only()
    assert not decision.passed
    (stage,) = c.search_runs([experiment(c)], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert stage.data.tags["gate.verdict"] == "failed" and stage.data.metrics["gate_passed"] == 0.0
    local = Path(c.download_artifacts(stage.info.run_id, "gate_decision.json"))
    logged = json.loads(local.read_text())
    assert logged["verdict"] == "failed"
    assert logged["reasons"] == ["required[reasoning]: task 'reasoning' is not in the report (its tasks: ['facts']); "
                                 "add it to eval.tasks or fix the task name"]
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["gate-decision"])))
    assert any("| required[reasoning] | — | — | **FAIL** |" in (a.data or "") for a in artifacts)


def test_registered_version_has_lineage_card_and_loads_with_mlflow_and_transformers(tmp_path, tiny_model) -> None:
    from mlflow.artifacts import download_artifacts
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gauntlet.registry.candidates import register_candidate

    c = mlflow_client()
    registry = RegistrySpec(model_name=unique("lineage"))
    folder = tiny_model
    lineage = lineage_for(folder)
    report = make_report({"facts": 0.71, "reasoning": 0.33},
                         {"backend": "hf", "device": "cpu", "tokens_per_s": 50.0, "first_token_latency_ms": 12.0,
                          "peak_memory_gb": 0.1, "size_on_disk_gb": 0.01})
    run = c.create_run(experiment(c), run_name="register")
    candidate = register_candidate(c, registry, run.info.run_id, folder, lineage, report)
    assert candidate.created and candidate.version == "1"
    mv = c.get_model_version(registry.model_name, "1")
    for key, value in lineage.items():
        assert mv.tags[key] == value, key
    assert float(mv.tags["score.facts.acc"]) == 0.71 and float(mv.tags["score.reasoning.acc"]) == 0.33
    assert mv.tags["perf.first_token_latency_ms"] == "12.0"
    assert mv.tags["gate.verdict"] == "pending"
    assert str(c.get_model_version_by_alias(registry.model_name, "challenger").version) == "1"
    assert mv.source.startswith(run.info.artifact_uri)   # registered from the durable run artifact

    decision, result = gate_and_promote(c, registry, GateSpec(min_scores={"facts": 0.5}), candidate, report)
    assert result.registered, result.message
    mv = c.get_model_version(registry.model_name, "1")
    assert mv.tags["gate.verdict"] == "passed" and mv.tags["gate.compared_to"] == "None"
    assert "challenger" not in c.get_registered_model(registry.model_name).aliases

    local = Path(download_artifacts(f"models:/{registry.model_name}@champion", dst_path=str(tmp_path / "dl")))
    card = (local / "README.md").read_text()
    for needle in (lineage["data.md5"], lineage["config_hash"], "demo://tiny-llama", "| facts | acc | 0.7100 |"):
        assert needle in card, needle
    model, tok = AutoModelForCausalLM.from_pretrained(local), AutoTokenizer.from_pretrained(local)
    assert model.config.hidden_size == 128 and tok.eos_token == "</s>"

    # the same files again: found, not registered twice
    run2 = c.create_run(experiment(c), run_name="register-again")
    again = register_candidate(c, registry, run2.info.run_id, folder, lineage, report)
    assert (again.version, again.created) == ("1", False)
    assert len(c.search_model_versions(f"name='{registry.model_name}'")) == 1


def race_worker(inbox, outbox, barrier) -> None:
    """One 'pipeline': register its candidate, gate it against the champion, promote. Runs in its own process;
    the barrier lines the two processes up at each step, so both gate against the same champion."""
    from gauntlet.gate import decide
    from gauntlet.registry.candidates import register_candidate
    from gauntlet.registry.promotion import promote_if_passing
    from gauntlet.registry.store import champion_of

    c = mlflow_client()
    outbox.put(("ready", os.getpid()))
    while (job := inbox.get()) is not None:
        lock, name, score, folder = job
        os.environ["GAUNTLET_REGISTRY_LOCK"] = lock
        registry, report = RegistrySpec(model_name=name), make_report({"facts": score})
        try:
            barrier.wait(timeout=60)
            run = c.create_run(experiment(c), run_name=f"race-{score}")
            candidate = register_candidate(c, registry, run.info.run_id, Path(folder), lineage_for(Path(folder)),
                                           report)
            barrier.wait(timeout=60)
            current, scores = champion_of(c, registry)
            decision = decide(RACE_GATE, report, None, current, scores)
            barrier.wait(timeout=60)
            result = promote_if_passing(c, registry, RACE_GATE, decision, candidate, report, None,
                                        by=f"race worker {os.getpid()}")
            outbox.put(("done", {"score": score, "version": candidate.version, "compared_to": decision.compared_to,
                                 "passed": decision.passed, "promoted": result.registered,
                                 "message": result.message}))
        except Exception:
            outbox.put(("error", traceback.format_exc()))


@pytest.fixture(scope="module")
def race_workers():
    """Two long-lived worker processes (spawned: nothing inherited but the environment), shared by the races."""
    experiment(mlflow_client())   # create the experiment (and the store's schema) before the workers start
    ctx = multiprocessing.get_context("spawn")
    barrier, outbox = ctx.Barrier(2), ctx.Queue()
    inboxes = [ctx.Queue(), ctx.Queue()]
    workers = [ctx.Process(target=race_worker, args=(inbox, outbox, barrier), daemon=True) for inbox in inboxes]
    for w in workers:
        w.start()
    try:
        assert [outbox.get(timeout=180)[0] for _ in workers] == ["ready", "ready"]
        yield inboxes, outbox
    finally:
        for inbox in inboxes:
            inbox.put(None)
        for w in workers:
            w.join(timeout=30)
            if w.is_alive():
                w.kill()


def check_race_round(c, registry: RegistrySpec, first: str, results: list[dict]) -> str:
    """Exactly one champion, and every champion on record passed against the one it replaced."""
    from gauntlet.gate import decide
    from gauntlet.registry.store import history, scores_of

    name = registry.model_name
    assert all(r["compared_to"] == first and r["passed"] for r in results), results   # a real race
    every = [c.get_model_version(name, v.version) for v in c.search_model_versions(f"name='{name}'")]
    holders = [v for v in every if "champion" in v.aliases]
    assert len(holders) == 1, [v.version for v in holders]
    champion = str(holders[0].version)
    events = history(c, name)
    assert events[0].version == first and events[-1].version == champion
    for before, after in pairwise(events):
        assert after.previous == before.version and after.compared_to == before.version, events
        # judged again here, from the recorded scores: the new champion passes against the one it replaced
        new_scores, old_scores = (scores_of(c.get_model_version(name, v).tags) for v in (after.version, before.version))
        report = make_report({k.split(".")[0]: v for k, v in new_scores.items()})
        assert decide(RACE_GATE, report, None, before.version, old_scores).passed, (before, after)
    best = next(r for r in results if r["score"] == 0.7)
    assert champion == best["version"], (events, results)      # 0.60 cannot end up champion over 0.70
    second = next(r for r in results if r["score"] == 0.6)
    verdict = c.get_model_version(name, second["version"]).tags["gate.verdict"]
    assert (verdict == "passed") == any(e.version == second["version"] for e in events), (verdict, events)
    assert "challenger" not in c.get_registered_model(name).aliases
    return "0.6 first" if len(events) == 3 else "0.7 first"


@pytest.mark.slow
@pytest.mark.parametrize("lock", ["file", "registry"])
def test_two_processes_racing_leave_one_champion_that_beat_its_predecessor(lock, race_workers, tmp_path,
                                                                           monkeypatch) -> None:
    inboxes, outbox = race_workers
    monkeypatch.setenv("GAUNTLET_REGISTRY_LOCK", lock)
    c = mlflow_client()
    orders: dict[str, int] = {}
    started = time.time()
    for round_no in range(20):
        registry = RegistrySpec(model_name=unique(f"race-{lock}-{round_no}"))
        champion, report = register(c, registry, tmp_path, {"facts": 0.5})
        _, first = gate_and_promote(c, registry, RACE_GATE, champion, report)
        assert first.registered
        scores = (0.7, 0.6) if round_no % 2 == 0 else (0.6, 0.7)
        for inbox, score in zip(inboxes, scores, strict=True):
            inbox.put((lock, registry.model_name, score, str(fake_model_dir(tmp_path, f"{round_no}-{score}"))))
        results = []
        for _ in inboxes:
            kind, payload = outbox.get(timeout=120)
            assert kind == "done", payload
            results.append(payload)
        order = check_race_round(c, registry, champion.version, results)
        orders[order] = orders.get(order, 0) + 1
    print(f"\n{lock} lock: 20 races in {time.time() - started:.1f}s; who promoted first: {orders}")


def test_registry_lock_times_out_and_breaks_stale_locks(monkeypatch) -> None:
    from gauntlet.registry.lock import LOCK_MODEL_PREFIX, RegistryError, registry_lock

    c = mlflow_client()
    name = unique("locked")
    for mode in ("file", "registry"):
        monkeypatch.setenv("GAUNTLET_REGISTRY_LOCK", mode)
        with registry_lock(c, name):
            started = time.monotonic()
            with pytest.raises(RegistryError, match="timed out"), registry_lock(c, name, timeout_s=0.5):
                pass
            assert time.monotonic() - started >= 0.5
        with registry_lock(c, name, timeout_s=2):   # released: free again
            pass
    # a lock left by a holder that died (lease expired) is broken; a live one is not
    c.create_registered_model(LOCK_MODEL_PREFIX + name, tags={"token": "dead", "expires_at": str(time.time() - 1)})
    with registry_lock(c, name, timeout_s=5) as lease:
        lease.verify()
        assert c.get_registered_model(LOCK_MODEL_PREFIX + name).tags["token"] == lease.token
    assert not c.search_registered_models(f"name = '{LOCK_MODEL_PREFIX + name}'")


def test_promote_three_then_roll_back_twice(tmp_path, capsys) -> None:
    from gauntlet.cli import main
    from gauntlet.registry.store import champion_of, history

    c = mlflow_client()
    registry = RegistrySpec(model_name=unique("rollback"))
    gate = GateSpec(min_scores={"facts": 0.4}, max_regression=0.0)
    versions = []
    for step, score in enumerate((0.5, 0.6, 0.7), start=1):
        candidate, report = register(c, registry, tmp_path, {"facts": score})
        _, result = gate_and_promote(c, registry, gate, candidate, report, by="pipeline test")
        assert result.registered, result.message
        versions.append(candidate.version)
        assert champion_of(c, registry)[0] == candidate.version
        events = history(c, registry.model_name)
        assert [e.version for e in events] == versions
        assert events[-1].action == "promote" and events[-1].previous == (versions[-2] if step > 1 else None)
    v1, v2, v3 = versions

    assert main(["rollback", registry.model_name, "--reason", "v3 misbehaves in production"]) == 0
    assert champion_of(c, registry)[0] == v2
    last = history(c, registry.model_name)[-1]
    assert (last.action, last.version, last.previous, last.reason) == ("rollback", v2, v3,
                                                                       "v3 misbehaves in production")
    assert c.get_model_version(registry.model_name, v3).tags["champion.rolled_back_at"] == last.at

    assert main(["rollback", registry.model_name]) == 0
    assert champion_of(c, registry)[0] == v1
    events = history(c, registry.model_name)
    assert [(e.action, e.version, e.previous) for e in events] == [
        ("promote", v1, None), ("promote", v2, v1), ("promote", v3, v2), ("rollback", v2, v3), ("rollback", v1, v2)]
    assert [e.seq for e in events] == [1, 2, 3, 4, 5]

    capsys.readouterr()
    assert main(["rollback", registry.model_name]) == 1      # nothing before v1
    assert "no previous champion" in capsys.readouterr().err
    assert champion_of(c, registry)[0] == v1

    assert main(["history", registry.model_name]) == 0
    out = capsys.readouterr().out
    assert f"champion now v{v1}" in out and "| 5 |" in out and "rollback" in out and "pipeline test" in out

    # by hand, with a reason; then a rollback undoes exactly that
    assert main(["promote", registry.model_name, v3, "--reason", "hotfix verified by hand"]) == 0
    assert champion_of(c, registry)[0] == v3
    last = history(c, registry.model_name)[-1]
    assert last.action == "manual-promote" and last.reason.startswith("hotfix verified by hand") and "@" in last.by
    assert main(["rollback", registry.model_name]) == 0 and champion_of(c, registry)[0] == v1

    assert main(["promote", registry.model_name, "99", "--reason", "x"]) == 2     # no such version
    assert main(["history", unique("no-such-model")]) == 2


@pytest.fixture
def webhook_server():
    """A real HTTP server on 127.0.0.1 that records every JSON body posted to it, by path."""
    received: list[tuple[str, dict]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append((self.path, json.loads(body)))
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", received
    server.shutdown()
    server.server_close()


def test_notifications_on_promotion_and_failed_gate(webhook_server, tmp_path, monkeypatch, caplog) -> None:
    import logging

    from gauntlet.notify import outcome_notice, send
    from gauntlet.tracking import RunContext

    base_url, received = webhook_server
    secret = f"{base_url}/slack/T000/B000/secret-token"
    monkeypatch.setenv("GAUNTLET_TEST_SLACK", secret)
    monkeypatch.setenv("GAUNTLET_TEST_DINGTALK", f"{base_url}/dingtalk")
    monkeypatch.setenv("GAUNTLET_TEST_FEISHU", f"{base_url}/feishu")
    spec = NotifySpec.model_validate({
        "webhooks": [{"url_env": "GAUNTLET_TEST_SLACK"},
                     {"url_env": "GAUNTLET_TEST_DINGTALK", "format": "dingtalk", "events": ["promoted"]},
                     {"url_env": "GAUNTLET_TEST_FEISHU", "format": "feishu"},
                     {"url_env": "GAUNTLET_TEST_UNSET"}],
        "mlflow_ui_url": "http://mlflow.example:5000", "prefect_ui_url": "http://prefect.example:4200"})
    c = mlflow_client()
    registry = RegistrySpec(model_name=unique("notify"))
    gate = GateSpec(min_scores={"facts": 0.4}, max_regression=0.05)
    v1, r1 = register(c, registry, tmp_path, {"facts": 0.50, "math": 0.30, "code": 0.20, "safety": 0.90})
    gate_and_promote(c, registry, gate, v1, r1)
    parent = c.create_run(experiment(c), run_name="notify-parent")
    run = RunContext(tracking_uri=c.tracking_uri, experiment_id=experiment(c), parent_run_id=parent.info.run_id,
                     flow_run_id="0b4c1b6e-0000-4000-8000-000000000001")
    caplog.set_level(logging.DEBUG)

    v2, r2 = register(c, registry, tmp_path, {"facts": 0.80, "math": 0.29, "code": 0.35, "safety": 0.88})
    decision, promotion = gate_and_promote(c, registry, gate, v2, r2)
    assert promotion.registered
    assert send(spec, outcome_notice(spec, registry, promotion, r2, None, run)) == 3
    by_path = dict(received)
    slack = by_path["/slack/T000/B000/secret-token"]
    body = slack["blocks"][1]["text"]["text"]
    assert registry.model_name in slack["text"] and "promoted" in slack["text"] and f"v{v2.version}" in slack["text"]
    # the three biggest moves, largest first; the smallest (math -0.01) is left out
    assert body.index("facts.acc: 0.5000 → 0.8000 (+0.3000)") < body.index("code.acc: 0.2000 → 0.3500 (+0.1500)") \
        < body.index("safety.acc: 0.9000 → 0.8800 (-0.0200)")
    assert "math.acc" not in body and f"vs champion v{v1.version}" in body
    assert f"<http://mlflow.example:5000/#/experiments/{run.experiment_id}/runs/{run.parent_run_id}|" in body
    assert f"<http://prefect.example:4200/runs/flow-run/{run.flow_run_id}|" in body
    assert by_path["/dingtalk"]["msgtype"] == "markdown" and "facts.acc" in by_path["/dingtalk"]["markdown"]["text"]
    assert by_path["/feishu"]["msg_type"] == "text" and registry.model_name in by_path["/feishu"]["content"]["text"]

    received.clear()
    v3, r3 = register(c, registry, tmp_path, {"facts": 0.60, "math": 0.30, "code": 0.35, "safety": 0.88})
    decision, promotion = gate_and_promote(c, registry, gate, v3, r3)
    assert not promotion.registered
    assert send(spec, outcome_notice(spec, registry, promotion, r3, None, run)) == 2   # dingtalk: promotions only
    slack = dict(received)["/slack/T000/B000/secret-token"]
    body = slack["blocks"][1]["text"]["text"]
    assert "gate FAILED" in slack["text"] and f"v{v3.version}" in slack["text"]
    assert "no_regression[facts]" in body and "facts.acc: 0.8000 → 0.6000 (-0.2000)" in body
    assert "$GAUNTLET_TEST_UNSET is not set" in caplog.text
    assert "secret-token" not in caplog.text and base_url not in caplog.text      # URLs are never logged


def test_failed_run_notifies_through_the_flow_hook(prefect_api, webhook_server, monkeypatch) -> None:
    """The real finetune flow fails (its tracking server does not answer); its on_failure hook posts the message."""
    from gauntlet.flows.finetune import finetune
    from tests.helpers import REPO

    base_url, received = webhook_server
    monkeypatch.setenv("GAUNTLET_TEST_HOOK", f"{base_url}/hook")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")   # nothing listens on port 9: fail at once
    overrides = ["tracking.tracking_uri=http://127.0.0.1:9",
                 "notify.webhooks=[{url_env: GAUNTLET_TEST_HOOK, events: [run_failed]}]",
                 "notify.prefect_ui_url=http://prefect.example:4200"]
    state = finetune(config=str(REPO / "configs" / "demo.yaml"), overrides=overrides, return_state=True)
    assert state.is_failed()
    assert len(received) == 1, received
    path, payload = received[0]
    assert path == "/hook"
    assert "gauntlet-demo" in payload["text"] and "run FAILED" in payload["text"]
    body = payload["blocks"][1]["text"]["text"]
    assert "127.0.0.1:9" in body   # the error
    assert f"/runs/flow-run/{state.state_details.flow_run_id}|" in body
