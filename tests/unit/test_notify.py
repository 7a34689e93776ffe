"""Notifications without a webhook server: webhook URLs kept out of configs, and what a message says (the
score changes against the champion's score tags). Delivery to real webhooks runs in
tests/integration/test_registry.py."""

from __future__ import annotations

import pytest

from tests.helpers import REPO


def test_webhook_urls_cannot_be_written_into_the_config() -> None:
    from gauntlet.config.load import load_spec
    from gauntlet.config.problems import SpecError

    demo = REPO / "configs" / "demo.yaml"
    with pytest.raises(SpecError) as err:
        load_spec(demo, ["notify.webhooks=[{url: 'https://hooks.slack.com/x'}, {format: slack}]"])
    by_path = {p.path: p for p in err.value.problems}
    assert "notify.webhooks.0.url" in by_path and "valid keys here" in by_path["notify.webhooks.0.url"].hint
    assert "exactly one of url_env" in by_path["notify.webhooks.1"].message
    spec = load_spec(demo, ["notify.webhooks=[{secret_block: team-slack}]"])
    assert spec.notify.webhooks[0].events == ["promoted", "gate_failed", "run_failed", "rolled_back"]


def test_a_failed_gate_notice_shows_filtered_scores_against_the_champions_tags() -> None:
    """The champion's scores come from its registry tags (``gsm8k.exact_match/strict-match``: MLflow allows no
    comma); the message finds them under lm-eval's names, as the gate does."""
    from gauntlet.config.gate import GateSpec, RegistrySpec
    from gauntlet.config.notify import NotifySpec
    from gauntlet.gate import decide
    from gauntlet.names import metric_key
    from gauntlet.notify import outcome_notice
    from gauntlet.refs import PromotionResult, TaskScore
    from gauntlet.tracking import RunContext
    from tests.helpers import make_report

    report = make_report({"facts": 0.8})
    report = report.model_copy(update={"scores": report.scores + [
        TaskScore(task="gsm8k", metric="exact_match,strict-match", value=0.25)]})
    tags = {metric_key("gsm8k", "exact_match,strict-match"): 0.5, metric_key("facts", "acc"): 0.7}
    decision = decide(GateSpec(metric="exact_match", max_regression=0.05), report, None, "2", tags)
    assert [r.rule for r in decision.rules if not r.passed] == ["no_regression[gsm8k]"]
    notice = outcome_notice(NotifySpec(), RegistrySpec(model_name="m"),
                            PromotionResult(registered=False, model_name="m", version="3", message="not promoted",
                                            decision=decision), report, None,
                            RunContext(tracking_uri="sqlite:///x.db", experiment_id="1", parent_run_id="r"))
    assert notice.event == "gate_failed" and notice.compared_with == "champion v2"
    assert [(d.key, d.before, d.after) for d in notice.deltas] == [
        ("gsm8k.exact_match,strict-match", 0.5, 0.25), ("facts.acc", 0.7, 0.8)]
