"""Watching one canary step: stable against canary, from the router's numbers and the servers' own.

- **Router** (nginx's access log, :mod:`.router`): requests, failures (5xx, refused, timed out) and p50/p95
  request time per upstream, and the canary's observed share of traffic.
- **Servers**: the quality probe, a fixed prompt set sent to each server directly; each answer scored the way
  the gate scores the generative demo task (first word, then lm-eval's exact match ignoring case and
  punctuation), and tokens/s from the server's own ``usage.completion_tokens``.
- **Drift** of the prompts clients sent in the window against the training data (:mod:`.drift`).

The step's numbers are written in Prometheus' text format (``metrics.prom`` in the deployment's folder,
for a node-exporter textfile collector) and logged to MLflow by the stage.
"""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path

from pydantic import BaseModel

from gauntlet.deploy.drift import Drift
from gauntlet.deploy.servers import chat

FIRST_WORD = re.compile(r"([A-Za-z]+)")


class SlotStats(BaseModel):
    requests: int = 0
    errors: int = 0
    error_rate: float = 0.0
    p50_s: float | None = None
    p95_s: float | None = None
    tokens_per_s: float | None = None
    probe_score: float | None = None
    probe_errors: int = 0


class StepReport(BaseModel):
    step: int
    weight: int                       # the canary's configured share, percent
    window_s: float
    canary_share: float               # observed share of answered requests, percent
    stable: SlotStats
    canary: SlotStats
    drift: Drift | None = None


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1))]


def attempts(record: dict) -> list[tuple[str, str]]:
    """Each upstream a request was tried on, with its status: nginx lists them ``a, b`` (tries) and ``a : b``
    (across upstream groups)."""
    addrs = [a.strip() for a in re.split(r"[,:]\s", record.get("upstream", "")) if a.strip()]
    statuses = [s.strip() for s in re.split(r"[,:]\s", record.get("upstream_status", "")) if s.strip()]
    return list(zip(addrs, statuses + ["-"] * (len(addrs) - len(statuses)), strict=False))


def router_stats(records: list[dict], ports: dict[str, int]) -> tuple[dict[str, SlotStats], float]:
    """Per slot: requests tried on it, failures, p50/p95 of answered requests' time; and the canary's share of
    the requests answered by a server (percent)."""
    by_port = {str(p): slot for slot, p in ports.items()}
    times: dict[str, list[float]] = {s: [] for s in ports}
    tried = {s: 0 for s in ports}
    failed = {s: 0 for s in ports}
    answered = {s: 0 for s in ports}
    for r in records:
        tries = attempts(r)
        for i, (addr, status) in enumerate(tries):
            slot = by_port.get(addr.rsplit(":", 1)[-1])
            if slot is None:
                continue
            tried[slot] += 1
            last = i == len(tries) - 1
            if not status.isdigit() or int(status) >= 500:
                failed[slot] += 1
            elif last:
                answered[slot] += 1
                times[slot].append(float(r.get("request_time", 0)))
    stats = {s: SlotStats(requests=tried[s], errors=failed[s], error_rate=failed[s] / tried[s] if tried[s] else 0.0,
                          p50_s=percentile(times[s], 50), p95_s=percentile(times[s], 95)) for s in ports}
    served = sum(answered.values())
    share = 100.0 * answered.get("canary", 0) / served if served else 0.0
    return stats, share


def probe_rows(path: Path, limit: int) -> list[dict]:
    rows = []
    with open(path) as f:
        for line in f:
            if line.strip():
                rows.append(json.loads(line))
            if len(rows) >= limit:
                break
    return rows


def score_answer(answer: str, expected: str) -> float:
    """The gate's scoring of the generative task: the first word, lm-eval's exact match (case and punctuation
    ignored)."""
    from lm_eval.api.metrics import exact_match_hf_evaluate

    found = FIRST_WORD.search(answer or "")
    prediction = found.group(1) if found else ""
    return float(exact_match_hf_evaluate([prediction], [expected], ignore_case=True,
                                         ignore_punctuation=True)["exact_match"])


def probe(url: str, served_name: str, rows: list[dict], max_tokens: int) -> tuple[float | None, float | None, int]:
    """Send every probe row to one server: (mean score, tokens/s, failed requests). The served chat template
    renders the training prompt (gauntlet/registry/mlflow_model.py), so the server sees what the gate scored."""
    scores, tokens, seconds, failed = [], 0, 0.0, 0
    for row in rows:
        started = time.monotonic()
        try:
            answer = chat(url, served_name, " ".join(x for x in (row["instruction"], row.get("input", "")) if x),
                          max_tokens)
        except Exception:
            failed += 1
            continue
        seconds += time.monotonic() - started
        tokens += int((answer.get("usage") or {}).get("completion_tokens") or 0)
        text = (answer.get("choices") or [{}])[0].get("message", {}).get("content") or ""
        scores.append(score_answer(text, str(row.get("output", ""))))
    return (sum(scores) / len(scores) if scores else None, tokens / seconds if seconds else None, failed)


def prometheus_text(model: str, report: StepReport) -> str:
    """The step's numbers as Prometheus gauges, labelled by model, slot and step."""
    lines = []
    metrics = {"requests": "requests tried on the server in the step's window",
               "errors": "failed requests (5xx, refused, timed out)", "error_rate": "errors / requests",
               "p50_s": "median request time at the router, seconds", "p95_s": "95th percentile request time",
               "tokens_per_s": "completion tokens per second (the server's own usage counts)",
               "probe_score": "quality probe: exact match, the gate's scoring"}
    for name, help_text in metrics.items():
        lines += [f"# HELP gauntlet_deploy_{name} {help_text}", f"# TYPE gauntlet_deploy_{name} gauge"]
        for slot in ("stable", "canary"):
            value = getattr(getattr(report, slot), name)
            if value is not None:
                lines.append(f'gauntlet_deploy_{name}{{model="{model}",slot="{slot}",step="{report.step}"}} {value}')
    lines += ["# HELP gauntlet_deploy_canary_share_percent observed share of answered requests",
              "# TYPE gauntlet_deploy_canary_share_percent gauge",
              f'gauntlet_deploy_canary_share_percent{{model="{model}",step="{report.step}"}} {report.canary_share}',
              "# HELP gauntlet_deploy_canary_weight_percent configured share",
              "# TYPE gauntlet_deploy_canary_weight_percent gauge",
              f'gauntlet_deploy_canary_weight_percent{{model="{model}",step="{report.step}"}} {report.weight}']
    if report.drift is not None:
        lines += ["# HELP gauntlet_deploy_drift_psi PSI of served prompts against the training data",
                  "# TYPE gauntlet_deploy_drift_psi gauge",
                  f'gauntlet_deploy_drift_psi{{model="{model}",step="{report.step}"}} {report.drift.psi}']
    return "\n".join(lines) + "\n"


def flat_metrics(report: StepReport) -> dict[str, float]:
    """The step's numbers as MLflow metrics (``canary.p95_s`` …)."""
    out = {"canary_share": report.canary_share, "weight": float(report.weight)}
    for slot in ("stable", "canary"):
        for k, v in getattr(report, slot).model_dump().items():
            if v is not None:
                out[f"{slot}.{k}"] = float(v)
    if report.drift is not None:
        out["drift.psi"] = report.drift.psi
    return out
