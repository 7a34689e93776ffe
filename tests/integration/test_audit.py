"""The audit log: a gated promotion, a promotion by hand, a rollback, a deploy event and a gc, each one line
in $GAUNTLET_HOME/audit.jsonl and one run of the MLflow experiment `gauntlet-audit`; `gauntlet audit` filters
them (real sqlite MLflow registry, the real command line)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from gauntlet.config.gate import GateSpec, RegistrySpec
from tests.integration.test_gc import stage
from tests.integration.test_registry import gate_and_promote, mlflow_client, register, unique


@pytest.fixture
def audit_home(tmp_path, monkeypatch) -> Path:
    """A state folder of its own for the audit log (MLflow stays the session's store)."""
    home = tmp_path / "home"
    monkeypatch.setenv("GAUNTLET_HOME", str(home))
    monkeypatch.setenv("PREFECT__FLOW_RUN_ID", "flow-run-under-audit")
    monkeypatch.setenv("GITHUB_RUN_ID", "4242")
    monkeypatch.setenv("GITHUB_REPOSITORY", "acme/models")
    return home


def test_every_change_is_recorded_and_printed(audit_home: Path, tmp_path: Path, capsys) -> None:
    from gauntlet.audit import AUDIT_EXPERIMENT, read
    from gauntlet.cli import main
    from gauntlet.deploy.rollout import DeployState, record_change
    from gauntlet.gc import apply_gc, plan_gc

    c = mlflow_client()
    registry = RegistrySpec(model_name=unique("audited"))
    name = registry.model_name
    gate = GateSpec(min_scores={"facts": 0.4}, max_regression=0.0)
    versions = []
    for score in (0.5, 0.6):
        candidate, report = register(c, registry, tmp_path, {"facts": score})
        assert gate_and_promote(c, registry, gate, candidate, report, by="pipeline test")[1].registered
        versions.append(candidate.version)
    v1, v2 = versions
    assert main(["promote", name, v1, "--reason", "v2 answers in the wrong language"]) == 0
    assert main(["rollback", name, "--reason", "back to the gated one"]) == 0
    record_change(DeployState(model=name, router_port=1), "deploy", "started", slot="stable", version=v2, port=2, pid=3)
    stage(audit_home, "train", "e" * 64, age_days=30)
    apply_gc(plan_gc(keep_days=7, home=audit_home), "gauntlet gc --keep-days 7")

    entries = read()
    assert [(e["action"], e["subject"]) for e in entries] == [
        ("register", f"{name} v{v1}"), ("promote", f"{name} v{v1}"), ("register", f"{name} v{v2}"),
        ("promote", f"{name} v{v2}"), ("manual-promote", f"{name} v{v1}"),
        ("rollback", f"{name} v{v2}"), ("deploy", f"{name} v{v2}"), ("gc", "2 item(s), 0.0 MB")]
    assert entries[0]["details"]["model_sha"] and entries[0]["reason"] == "candidate from flow run flow-run-test"
    entries = [e for e in entries if e["action"] != "register"]
    manual = entries[2]
    assert manual["reason"].startswith("v2 answers in the wrong language") and manual["details"]["previous"] == v2
    assert entries[3]["reason"] == "back to the gated one" and entries[3]["details"]["previous"] == v1
    for e in entries:   # who and where, on every entry
        assert e["user"] and e["host"] and e["flow_run_id"] == "flow-run-under-audit"
        assert e["ci_run"] == "https://github.com/acme/models/actions/runs/4242"
        assert datetime.fromisoformat(e["at"]) > datetime.now(UTC) - timedelta(minutes=10)
    assert entries[0]["by"] == "pipeline test"

    # the same entries in MLflow
    exp = c.get_experiment_by_name(AUDIT_EXPERIMENT)
    runs = c.search_runs([exp.experiment_id], f"tags.`audit.subject` LIKE '{name}%'")
    assert sorted(r.data.tags["audit.action"] for r in runs) == sorted(
        ["register", "register", "promote", "promote", "manual-promote", "rollback", "deploy"])
    rollback_run = next(r for r in runs if r.data.tags["audit.action"] == "rollback")
    assert rollback_run.data.tags["audit.reason"] == "back to the gated one"

    # the command: filters, table and JSON
    capsys.readouterr()
    assert main(["audit", "--model", name, "--action", "rollback", "--json"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [json.loads(line)["subject"] for line in lines] == [f"{name} v{v2}"]
    assert main(["audit", "--model", name]) == 0
    out = capsys.readouterr().out
    assert out.count(f"| {name} v") == 7 and "gauntlet gc" not in out and "back to the gated one" in out
    assert main(["audit", "--since", "1h", "--action", "gc"]) == 0
    assert "gauntlet gc --keep-days 7" in capsys.readouterr().out
    future = (datetime.now(UTC) + timedelta(days=1)).date().isoformat()
    assert main(["audit", "--since", future]) == 0 and "no audit entries match" in capsys.readouterr().out
    assert main(["audit", "--since", "yesterday"]) == 2
