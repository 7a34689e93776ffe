"""The alert rules and Alertmanager routes `gauntlet deploy` renders (gauntlet/deploy/alarms.py), checked by
Debian's promtool and amtool where they are installed; the deploy.alerts settings refused with the fix."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import yaml
from pydantic import ValidationError

from gauntlet.config.deploy import AlertSpec, DeploySpec
from gauntlet.deploy.alarms import alertmanager_config, handle, rule_groups, write_alertmanager_config, write_rules


def test_rules_name_the_version_and_the_severity() -> None:
    groups = rule_groups("demo", "3", AlertSpec(warn_only=["p95_latency"], for_s=5), 0.25, 10.0)
    rules = {r["alert"]: r for r in groups["groups"][0]["rules"]}
    assert set(rules) == {"GauntletErrorRate", "GauntletP95Latency"}
    assert rules["GauntletErrorRate"]["labels"] == {"severity": "rollback", "deployment": "demo", "version": "3"}
    assert rules["GauntletP95Latency"]["labels"]["severity"] == "warn"
    assert rules["GauntletP95Latency"]["expr"].endswith("> 0.5")                # 2 x the canary's 0.25 s
    assert 'slot="stable",version="3"' in rules["GauntletErrorRate"]["expr"] and "> 0.05" in rules[
        "GauntletErrorRate"]["expr"]
    assert all("v3" in r["annotations"]["summary"] and r["for"] == "5s" for r in rules.values())


def test_without_a_baseline_the_p95_rule_uses_the_absolute_threshold() -> None:
    rules = rule_groups("demo", "1", AlertSpec(), None, 7.5)["groups"][0]["rules"]
    assert rules[1]["expr"].endswith("> 7.5") and "max_p95_latency_s" in rules[1]["annotations"]["summary"]


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed (apt-get install prometheus)")
def test_promtool_accepts_the_rules_file(tmp_path) -> None:
    path = write_rules(tmp_path, "demo", "2", AlertSpec(warn_only=["error_rate"]), 0.1, 10.0)
    out = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, text=True)
    assert out.returncode == 0 and "SUCCESS: 2 rules found" in out.stdout, out.stdout + out.stderr


@pytest.mark.skipif(shutil.which("amtool") is None, reason="amtool is not installed (apt-get install "
                                                            "prometheus-alertmanager)")
def test_amtool_accepts_the_routes(tmp_path) -> None:
    path = write_alertmanager_config(tmp_path, AlertSpec(receiver_url="http://127.0.0.1:9999"))
    out = subprocess.run(["amtool", "check-config", str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    route = yaml.safe_load(path.read_text())["route"]
    assert route["routes"][0] == {"receiver": "gauntlet-rollback", "matchers": ['severity="rollback"']}


def test_unknown_warn_only_names_the_alerts() -> None:
    with pytest.raises(ValidationError, match=r"(?s)alerts.warn_only.*unknown alert \['latency'\].*p95_latency"):
        DeploySpec(alerts={"warn_only": ["latency"]})
    with pytest.raises(ValidationError, match="error_rate"):
        AlertSpec(error_rate=1.5)


def test_a_warn_alert_or_a_resolved_one_changes_nothing() -> None:
    def no_registry():
        raise AssertionError("a warn alert must not touch the registry")
    alert = {"status": "firing", "labels": {"alertname": "GauntletP95Latency", "severity": "warn",
                                            "deployment": "demo", "version": "2"}, "annotations": {"summary": "s"}}
    assert handle("/notify", {"alerts": [alert]}, _notify(), no_registry) == \
        ["warn only: nothing changed"]
    assert handle("/rollback", {"alerts": [{**alert, "status": "resolved"}]}, _notify(), no_registry) == []
    assert alertmanager_config(AlertSpec())["receivers"][0]["webhook_configs"][0]["url"].endswith("/notify")


def _notify():
    from gauntlet.config.notify import NotifySpec

    return NotifySpec()
