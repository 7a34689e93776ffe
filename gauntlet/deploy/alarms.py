"""Alarms on what serves: Prometheus alert rules, the Alertmanager routes, and the receiver that rolls back.

:func:`write_rules` renders the ``deploy.alerts`` settings into ``alerts.yml`` beside the scrape fragment
(``prometheus.yml``), for the version stable serves: ``GauntletErrorRate`` (stable's failed / all attempts
over ``window_s`` above ``error_rate``) and ``GauntletP95Latency`` (stable's p95 over ``window_s`` above
``p95_factor`` times its baseline: the p95 its canary steps measured before it was promoted, kept in the
deploy state; a version that never was a canary has ``thresholds.max_p95_latency_s`` instead). Each rule
holds ``for_s`` and carries the labels ``severity`` (``rollback``, or ``warn`` for a rule in ``warn_only``),
``deployment`` and ``version``, and annotations naming the version. :func:`write_alertmanager_config`
renders ``alertmanager.yml``: every alert goes to the receiver, ``severity=rollback`` on ``/rollback``, the
rest on ``/notify``.

The receiver is a stdlib :mod:`http.server` of its own (``python -m gauntlet.deploy.alarms --config RUN.yaml``),
not the exporter: there is one exporter per deployment and it lives and dies with its router, while
Alertmanager needs one address that answers for every deployment on the host, also when a router is gone
(that is when an alarm matters). On a firing ``rollback`` alert whose version still is ``@champion`` it
runs the registry's recorded rollback, the one ``gauntlet rollback`` and the canary use
(:func:`gauntlet.registry.promotion.rollback`: the history and the audit log name the alert), then
announces the move (``gauntlet.champion.moved``: with a Prefect server the ``deploy`` deployment's trigger
serves the restored version). Every alert, warn or rollback, is told to the ``notify:`` webhooks with
notify.py's senders. An alert for a version that is no longer the champion changes nothing (repeats too).
"""

from __future__ import annotations

import argparse
import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from gauntlet.config.deploy import AlertSpec
from gauntlet.config.notify import NotifySpec

log = logging.getLogger(__name__)
RULES = {"error_rate": "GauntletErrorRate", "p95_latency": "GauntletP95Latency"}


def rule_groups(model: str, version: str, alerts: AlertSpec, baseline_p95_s: float | None,
                fallback_p95_s: float) -> dict:
    """The rules file's content for ``model`` with ``version`` stable."""
    where = f'model="{model}",slot="stable",version="{version}"'
    window = f"[{alerts.window_s}s]"
    limit = round(baseline_p95_s * alerts.p95_factor, 6) if baseline_p95_s else fallback_p95_s
    baseline = f"{alerts.p95_factor} x its canary p95 of {baseline_p95_s:.3f} s" if baseline_p95_s else \
        "thresholds.max_p95_latency_s (no canary p95 recorded)"
    exprs = {
        "error_rate": (f"sum(rate(gauntlet_router_errors_total{{{where}}}{window})) / "
                       f"sum(rate(gauntlet_router_requests_total{{{where}}}{window})) > {alerts.error_rate}",
                       f"error rate above {alerts.error_rate} over {alerts.window_s}s"),
        "p95_latency": (f"histogram_quantile(0.95, sum by (le) (rate(gauntlet_router_request_duration_seconds_bucket"
                        f"{{{where}}}{window}))) > {limit}",
                        f"p95 latency above {limit} s ({baseline}) over {alerts.window_s}s"),
    }
    rules = [{"alert": RULES[key], "expr": expr, "for": f"{alerts.for_s}s",
              "labels": {"severity": "warn" if key in alerts.warn_only else "rollback", "deployment": model,
                         "version": version},
              "annotations": {"summary": f"{model} v{version} (stable): {what}",
                              "value": "{{ $value }}"}}
             for key, (expr, what) in exprs.items()]
    return {"groups": [{"name": f"gauntlet-deploy-{model}", "rules": rules}]}


def write_rules(folder: Path, model: str, version: str, alerts: AlertSpec, baseline_p95_s: float | None,
                fallback_p95_s: float) -> Path:
    import yaml

    from gauntlet.files import write_text

    path = folder / "alerts.yml"
    write_text(path, "# Written by gauntlet deploy (gauntlet/deploy/alarms.py): list it in prometheus.yml's "
                     "rule_files.\n" + yaml.safe_dump(rule_groups(model, version, alerts, baseline_p95_s,
                                                                  fallback_p95_s), sort_keys=False))
    return path


def alertmanager_config(alerts: AlertSpec, group_wait: str = "10s") -> dict:
    """Every alert to the receiver: ``severity=rollback`` on ``/rollback``, the rest on ``/notify``."""
    base = alerts.receiver_url.rstrip("/")
    return {"route": {"receiver": "gauntlet-notify", "group_by": ["alertname", "deployment", "version"],
                      "group_wait": group_wait, "group_interval": "1m", "repeat_interval": "1h",
                      "routes": [{"receiver": "gauntlet-rollback", "matchers": ['severity="rollback"']}]},
            "receivers": [{"name": "gauntlet-notify", "webhook_configs": [{"url": f"{base}/notify"}]},
                          {"name": "gauntlet-rollback", "webhook_configs": [{"url": f"{base}/rollback"}]}]}


def write_alertmanager_config(folder: Path, alerts: AlertSpec) -> Path:
    import yaml

    from gauntlet.files import write_text

    path = folder / "alertmanager.yml"
    write_text(path, "# Written by gauntlet deploy (gauntlet/deploy/alarms.py): Alertmanager's routes to the "
                     "alarm receiver.\n" + yaml.safe_dump(alertmanager_config(alerts), sort_keys=False))
    return path


# ---------------------------------------------------------------------------------------------
# the receiver
# ---------------------------------------------------------------------------------------------


def roll_back(c, alert: dict) -> str:
    """The registry's recorded rollback when the alert's version still is @champion; what happened."""
    from gauntlet.config.gate import RegistrySpec
    from gauntlet.registry.lock import RegistryError
    from gauntlet.registry.promotion import rollback
    from gauntlet.registry.store import champion_of

    labels = alert.get("labels", {})
    name, version, alertname = labels.get("deployment"), labels.get("version"), labels.get("alertname")
    registry = RegistrySpec(model_name=name)
    champion, _ = champion_of(c, registry)
    if champion != version:
        return f"@champion is v{champion}, not v{version}: left alone"
    reason = f"alarm {alertname} fired: {alert.get('annotations', {}).get('summary', '')}"[:4000]
    try:
        event = rollback(c, registry, reason=reason, by=f"alarm receiver (Alertmanager alert {alertname})")
    except RegistryError as e:
        return f"@champion left at v{champion}: {e}"
    from gauntlet.cli.common import announce_champion_moved

    announce_champion_moved(name, event)
    return f"@champion back to v{event.version} (recorded: {reason})"


def tell(notify: NotifySpec, alert: dict, outcome: str) -> int:
    """One message per alert to every ``notify:`` webhook (notify.py's senders); how many took it."""
    from gauntlet.notify import describe, post_json, webhook_url

    labels, sent = alert.get("labels", {}), 0
    title = f"🚨 Gauntlet: {labels.get('deployment')} v{labels.get('version')} — alarm {labels.get('alertname')} " \
            f"({labels.get('severity')})"
    text = f"{alert.get('annotations', {}).get('summary', '')}; {outcome}"
    payload = {"text": f"{title}: {text}", "blocks": [
        {"type": "header", "text": {"type": "plain_text", "text": title[:150]}},
        {"type": "section", "text": {"type": "mrkdwn", "text": text[:2900]}}]}
    for hook in notify.webhooks:
        try:
            if url := webhook_url(hook, None):
                post_json(url, payload, notify.timeout_s)
                sent += 1
        except Exception as e:  # a URL may be in the message: name only the kind of error
            log.warning(f"alarm not told to {describe(hook)}: {type(e).__name__}")
    return sent


def handle(path: str, payload: dict, notify: NotifySpec, client_factory) -> list[str]:
    """Alertmanager's webhook body on ``/rollback`` or ``/notify``: what was done for each firing alert."""
    done = []
    for alert in payload.get("alerts", []):
        if alert.get("status") != "firing":
            continue
        rollback = path.rstrip("/").endswith("/rollback") and alert.get("labels", {}).get("severity") == "rollback"
        outcome = roll_back(client_factory(), alert) if rollback else "warn only: nothing changed"
        log.warning(f"alarm {alert.get('labels', {}).get('alertname')}: {outcome}")
        tell(notify, alert, outcome)
        done.append(outcome)
    return done


def make_server(host: str, port: int, notify: NotifySpec, client_factory=None) -> ThreadingHTTPServer:
    """The receiver, not yet serving (``serve_forever``); ``client_factory``: an MLflow client maker."""
    if client_factory is None:
        from gauntlet.tracking import client, tracking_uri

        def client_factory():
            return client(tracking_uri())
    lock = threading.Lock()    # one alarm at a time: the registry's lock also guards, this keeps logs in order

    class Receiver(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's name)
            try:
                payload = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                with lock:
                    done = handle(self.path, payload, notify, client_factory)
                body, code = json.dumps({"done": done}).encode(), 200
            except Exception as e:   # Alertmanager retries on a 5xx
                log.exception("alarm not handled")
                body, code = json.dumps({"error": type(e).__name__}).encode(), 500
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format, *args) -> None:  # noqa: A002 (http.server's signature)
            log.info(format % args)

    return ThreadingHTTPServer((host, port), Receiver)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m gauntlet.deploy.alarms", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="a run config: its notify: section's webhooks are told every alarm")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8799)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    from gauntlet.deploy.release import settings

    make_server(args.host, args.port, settings(args.config).notify).serve_forever()


if __name__ == "__main__":
    main()
