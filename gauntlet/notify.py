"""Notifications: a Slack-compatible (or DingTalk/Feishu) JSON message to each configured webhook.

Sent on a promotion, on a failed gate (``notify_outcome``, after ``promote``), on a failed run (the
flow's ``on_failure``/``on_crashed`` hook, :func:`notify_failed_run`) and on a canary rolled back in serving
(``rolled_back``, the deploy flow's ``roll_back`` stage). The message names the model, the
verdict, the three biggest score deltas and links to the MLflow run and the Prefect flow run.

Webhook URLs are secrets: they come from an environment variable or a Prefect Secret block (read by the
stage, ``tasks/notify.py``, and handed in as ``read_secret``), are never logged (a webhook is named by
where its URL comes from) and never reach MLflow. A webhook that cannot be reached is a warning, never a
failed run. No Prefect here.
"""

from __future__ import annotations

import json
import logging
import os
import urllib.error
import urllib.request
from collections.abc import Callable
from functools import partial
from typing import Literal
from urllib.parse import urlparse

from pydantic import BaseModel

from gauntlet.config.gate import RegistrySpec
from gauntlet.config.notify import NotifySpec, WebhookSpec
from gauntlet.eval.scores import tagged_score
from gauntlet.refs import EvalReport, PromotionResult, TaskScore
from gauntlet.secrets import redact_uri
from gauntlet.tracking import RunContext, client

log = logging.getLogger(__name__)
Event = Literal["promoted", "gate_failed", "run_failed", "rolled_back"]


class ScoreDelta(BaseModel):
    key: str                      # task.metric
    before: float
    after: float

    @property
    def delta(self) -> float:
        return self.after - self.before


class Notice(BaseModel):
    """What a message says, before it is rendered for one webhook format."""

    event: Event
    model_name: str
    version: str | None = None
    verdict: str                  # one line: "promoted: v3 is now @champion (replaced v2)"
    reasons: list[str] = []
    compared_with: str | None = None   # "champion v2", "base model"
    deltas: list[ScoreDelta] = []
    mlflow_run_id: str | None = None
    mlflow_url: str | None = None
    flow_run_id: str | None = None
    prefect_url: str | None = None

    @property
    def title(self) -> str:
        icon = {"promoted": "✅", "gate_failed": "⛔", "run_failed": "❌", "rolled_back": "↩️"}[self.event]
        label = {"promoted": "promoted", "gate_failed": "gate FAILED", "run_failed": "run FAILED",
                 "rolled_back": "canary ROLLED BACK"}[self.event]
        return f"{icon} Gauntlet: {self.model_name}" + (f" v{self.version}" if self.version else "") + f" — {label}"

    def lines(self, link) -> list[str]:
        out = [f"Verdict: {self.verdict}"]
        out += [f"• {r}" for r in self.reasons[:5]]
        if self.deltas:
            out.append(f"Biggest score changes vs {self.compared_with}:")
            out += [f"• {d.key}: {d.before:.4f} → {d.after:.4f} ({d.delta:+.4f})" for d in self.deltas]
        else:
            out.append("Score changes: none to show" + (" (the run failed before evaluation)"
                                                        if self.event == "run_failed" else ""))
        mlflow = link(self.mlflow_url, f"MLflow run {self.mlflow_run_id}") if self.mlflow_run_id else "MLflow run: unknown"
        prefect = link(self.prefect_url, f"Prefect flow run {self.flow_run_id}") if self.flow_run_id else None
        out.append(" | ".join(x for x in (mlflow, prefect) if x))
        return out


def biggest_deltas(report: EvalReport, before: Callable[[TaskScore], float | None], n: int = 3) -> list[ScoreDelta]:
    """The ``n`` scores that moved most (by absolute change) against what ``before`` says each was."""
    deltas = [ScoreDelta(key=f"{s.task}.{s.metric}", before=b, after=s.value)
              for s in report.scores if (b := before(s)) is not None]
    return sorted(deltas, key=lambda d: (-abs(d.delta), d.key))[:n]


def mlflow_run_url(spec: NotifySpec, tracking_uri: str, experiment_id: str | None, run_id: str | None) -> str | None:
    base = spec.mlflow_ui_url or (tracking_uri if urlparse(tracking_uri).scheme in ("http", "https") else None)
    base = redact_uri(base) if base else None   # a posted link never carries the store's credentials
    if not base or not run_id or not experiment_id:
        return None
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


def flow_run_url(spec: NotifySpec, flow_run_id: str | None, prefect_ui_url: str | None = None) -> str | None:
    """The flow run's page: under ``notify.prefect_ui_url``, else under the UI Prefect names (None: no UI)."""
    base = spec.prefect_ui_url or prefect_ui_url
    if not flow_run_id or not base:
        return None
    return f"{base.rstrip('/')}/runs/flow-run/{flow_run_id}"


# ---------------------------------------------------------------------------------------------
# rendering and sending
# ---------------------------------------------------------------------------------------------


def render(notice: Notice, fmt: str) -> dict:
    if fmt == "dingtalk":

        def md(url: str | None, text: str) -> str:
            return f"[{text}]({url})" if url else text

        return {"msgtype": "markdown", "markdown": {"title": notice.title,
                                                    "text": "\n\n".join([f"### {notice.title}", *notice.lines(md)])}}
    if fmt == "feishu":

        def plain(url: str | None, text: str) -> str:
            return f"{text}: {url}" if url else text

        return {"msg_type": "text", "content": {"text": "\n".join([notice.title, *notice.lines(plain)])}}

    def slack(url: str | None, text: str) -> str:
        return f"<{url}|{text}>" if url else text

    body = "\n".join(notice.lines(slack))
    return {"text": f"{notice.title}: {notice.verdict}",
            "blocks": [{"type": "header", "text": {"type": "plain_text", "text": notice.title[:150]}},
                       {"type": "section", "text": {"type": "mrkdwn", "text": body[:2900]}}]}


def describe(hook: WebhookSpec) -> str:
    """How a webhook is named in logs: by where its URL comes from, never by the URL."""
    return f"webhook from ${hook.url_env}" if hook.url_env else f"webhook from Secret block {hook.secret_block!r}"


def webhook_url(hook: WebhookSpec, read_secret: Callable[[str], str] | None) -> str | None:
    if hook.url_env:
        return os.environ.get(hook.url_env) or None
    if read_secret is None:
        raise LookupError(f"no reader for Secret block {hook.secret_block!r}")
    assert hook.secret_block is not None   # WebhookSpec: exactly one of url_env, secret_block
    return read_secret(hook.secret_block)

def post_json(url: str, payload: dict, timeout_s: float) -> int:
    request = urllib.request.Request(url, data=json.dumps(payload).encode(), method="POST",
                                     headers={"Content-Type": "application/json", "User-Agent": "gauntlet"})
    with urllib.request.urlopen(request, timeout=timeout_s) as response:  # noqa: S310 (the user's own webhook)
        return response.status


def send(spec: NotifySpec, notice: Notice, logger: logging.Logger | logging.LoggerAdapter = log,
         read_secret: Callable[[str], str] | None = None) -> int:
    """Post ``notice`` to every webhook subscribed to its event; returns how many accepted it.
    ``read_secret(block name)`` reads a Prefect Secret block's value (for ``secret_block`` webhooks)."""
    delivered = 0
    for hook in spec.webhooks:
        if notice.event not in hook.events:
            continue
        name = describe(hook)
        try:
            url = webhook_url(hook, read_secret)
            if not url:
                logger.warning(f"notification not sent: ${hook.url_env} is not set ({name})")
                continue
            post_json(url, render(notice, hook.format), spec.timeout_s)
            delivered += 1
            logger.info(f"notified {name} ({hook.format}): {notice.event}")
        except urllib.error.HTTPError as e:
            logger.warning(f"notification to {name} was refused: HTTP {e.code}")
        except Exception as e:  # the message of a URLError may quote the host: name only the kind of error
            logger.warning(f"notification to {name} failed: {type(e).__name__}")
    return delivered


# ---------------------------------------------------------------------------------------------
# the two places that notify
# ---------------------------------------------------------------------------------------------


def _no_score(_: TaskScore) -> float | None:   # no earlier score to compare with
    return None


def outcome_notice(spec: NotifySpec, registry: RegistrySpec, promotion: PromotionResult, report: EvalReport,
                   base: EvalReport | None, run: RunContext, prefect_ui_url: str | None = None) -> Notice | None:
    """The message for a run that finished: promoted, or gate failed; None when nothing changed."""
    decision = promotion.decision
    if decision is None or (decision.passed and not promotion.registered):
        return None  # e.g. the model already is the champion: nothing to tell
    before: Callable[[TaskScore], float | None] = _no_score
    compared_with = None
    if decision.compared_to is not None:   # the champion's score tags, as the gate compared with them
        before, compared_with = partial(tagged_score, decision.champion_scores), f"champion v{decision.compared_to}"
    elif base is not None:
        before, compared_with = (lambda s: base.score(s.task, s.metric)), "the base model"
    if promotion.registered:
        event, verdict = "promoted", promotion.message
    else:
        event, verdict = "gate_failed", f"not promoted; {len(decision.reasons)} gate rule(s) failed"
    return Notice(event=event, model_name=registry.model_name, version=promotion.version, verdict=verdict,
                  reasons=decision.reasons if not promotion.registered else [  # what the promotion rests on
                      f"{r.rule}: {r.detail}" for r in decision.rules if r.against is not None],
                  compared_with=compared_with,
                  deltas=biggest_deltas(report, before), mlflow_run_id=run.parent_run_id,
                  mlflow_url=mlflow_run_url(spec, run.tracking_uri, run.experiment_id, run.parent_run_id),
                  flow_run_id=run.flow_run_id,
                  prefect_url=flow_run_url(spec, run.flow_run_id, prefect_ui_url))


def failed_run_notice(spec_notify: NotifySpec, model_name: str, error: str, flow_run_id: str,
                      tracking_uri: str, experiment: str, prefect_ui_url: str | None = None) -> Notice:
    """The message for a failed run; links to its MLflow parent run when one was created."""
    experiment_id = run_id = None
    try:
        c = client(tracking_uri)
        exp = c.get_experiment_by_name(experiment)
        if exp is not None:
            experiment_id = exp.experiment_id
            runs = c.search_runs([experiment_id], f"tags.`prefect.flow_run_id` = '{flow_run_id}'", max_results=50)
            parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
            run_id = parents[0].info.run_id if parents else None
    except Exception as e:  # the tracking store may be what failed
        log.warning("no MLflow run to link for the failed run: %s", type(e).__name__)
    return Notice(event="run_failed", model_name=model_name, verdict=f"run failed: {error}"[:1000],
                  mlflow_run_id=run_id, mlflow_url=mlflow_run_url(spec_notify, tracking_uri, experiment_id, run_id),
                  flow_run_id=flow_run_id, prefect_url=flow_run_url(spec_notify, flow_run_id, prefect_ui_url))
