"""The audit log: every promotion, rollback, deploy, gc and registry change, with who, when, what and why.

:func:`record` appends one JSON line to ``$GAUNTLET_HOME/audit.jsonl`` (under a file lock, so concurrent
writers never interleave a line) and logs the same entry as a run of the MLflow experiment ``gauntlet-audit``
(tags ``audit.*``), so a team sharing an MLflow server sees every machine's changes in one place. Who: the
user and host, the CI run (GitHub Actions, GitLab, Jenkins) and the Prefect flow run when there is one.
Recording never stops the change it records: an MLflow that cannot be written is a warning (the JSONL line
is already there). ``gauntlet audit`` prints the log (:func:`read`). With a shared MLflow (a team's pool) the log
*is* the MLflow experiment, so every host shows the same entries; this host's JSONL is its copy, and an entry that
never reached MLflow is shown from it, marked ``local only``. On one machine (a sqlite store) the JSONL is read.
No Prefect here.
"""

from __future__ import annotations

import getpass
import json
import logging
import os
import socket
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from gauntlet.secrets import redact
from gauntlet.state import gauntlet_home

log = logging.getLogger(__name__)
AUDIT_FILE = "audit.jsonl"
AUDIT_EXPERIMENT = "gauntlet-audit"
ACTIONS = ("register", "promote", "manual-promote", "rollback", "deploy", "deploy-promote", "deploy-stop", "gc",
           "submit")
LOCK_TIMEOUT_S = 60.0


def audit_path(home: Path | None = None) -> Path:
    return (home or gauntlet_home()) / AUDIT_FILE


def user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no login name in some containers
        return str(os.getuid()) if hasattr(os, "getuid") else "unknown"


def ci_run() -> str | None:
    """The CI run this process belongs to, as a link where the CI gives one."""
    env = os.environ
    if env.get("GITHUB_RUN_ID"):
        return (f"{env.get('GITHUB_SERVER_URL', 'https://github.com')}/{env.get('GITHUB_REPOSITORY', '?')}"
                f"/actions/runs/{env['GITHUB_RUN_ID']}")
    return env.get("CI_PIPELINE_URL") or env.get("BUILD_URL") or env.get("CI_JOB_ID") or None


def record(action: str, subject: str, reason: str, *, by: str | None = None, flow_run_id: str | None = None,
           client: Any = None, **details: Any) -> dict:
    """Append one entry (``action`` on ``subject`` because ``reason``) to the audit log and to MLflow.

    ``subject`` names what changed (``gauntlet-demo v3``, a folder); ``details`` are any JSON values
    (versions, bytes freed, ports). ``by``: the acting party as the caller names it (``user@host``, ``pipeline
    (Prefect flow run …)``), besides the user and host found here. ``client``: an MLflow client to log with (default: the configured store).
    Returns the entry."""
    entry = {
        "id": uuid.uuid4().hex,
        "at": datetime.now(UTC).isoformat(timespec="milliseconds"),
        "action": action, "subject": subject, "reason": redact(reason),
        "by": by, "user": user(), "host": socket.gethostname(), "pid": os.getpid(), "ci_run": ci_run(),
        "flow_run_id": flow_run_id or os.environ.get("PREFECT__FLOW_RUN_ID") or None,
        "details": json.loads(redact(json.dumps(details, default=str))),
    }
    _append(audit_path(), entry)
    _to_mlflow(entry, client)
    return entry


def _append(path: Path, entry: dict) -> None:
    from filelock import FileLock

    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(entry, sort_keys=True) + "\n"
    with FileLock(str(path) + ".lock", timeout=LOCK_TIMEOUT_S), open(path, "a", encoding="utf-8") as fh:
        fh.write(line)
        fh.flush()
        os.fsync(fh.fileno())


def _to_mlflow(entry: dict, c: Any) -> None:
    from gauntlet.tracking import client, experiment_id, tracking_uri

    try:
        c = c or client(tracking_uri())
        tags = {f"audit.{k}": (v if isinstance(v, str) else json.dumps(v, sort_keys=True))[:5000]
                for k, v in entry.items() if v is not None}
        run = c.create_run(experiment_id(c, AUDIT_EXPERIMENT), run_name=f"{entry['action']}: {entry['subject']}"[:250],
                           tags=tags)
        c.set_terminated(run.info.run_id, "FINISHED")
    except Exception as e:  # the JSONL line stands; the change it records must not fail for this
        log.warning("audit entry %s %s not written to MLflow (%s); it is in %s", entry["action"], entry["subject"],
                    type(e).__name__, audit_path())


def read(home: Path | None = None, model: str | None = None, since: datetime | None = None,
         action: str | None = None, client: Any = None) -> list[dict]:
    """The entries, oldest first: those whose subject names ``model``, from ``since`` on, of ``action``. From the
    shared MLflow when there is one (every host's), else from this host's JSONL."""
    from gauntlet.state import shared_tracking
    from gauntlet.tracking import tracking_uri

    local = _read_jsonl(audit_path(home))
    if client is None and not shared_tracking(tracking_uri()):
        entries = local
    else:
        entries = _read_mlflow(client)
        known = {e.get("id") for e in entries}
        entries += [{**e, "local_only": True} for e in local if e.get("id") and e["id"] not in known]
    wanted = [e for e in entries if _matches(e, model, since, action)]
    return sorted(wanted, key=lambda e: e["at"])


def _matches(entry: dict, model: str | None, since: datetime | None, action: str | None) -> bool:
    if model and entry.get("subject", "").split(" ")[0] != model and entry.get("details", {}).get("model") != model:
        return False
    if action and entry.get("action") != action:
        return False
    return not (since and datetime.fromisoformat(entry["at"]) < since)


def _read_jsonl(path: Path) -> list[dict]:
    """This host's copy; a line that does not parse (a disk that filled mid-line) is skipped with a warning."""
    if not path.is_file():
        return []
    entries = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            log.warning("%s:%d is not a JSON line: skipped", path, number)
    return entries


def _read_mlflow(c: Any = None) -> list[dict]:
    """Every entry of the MLflow experiment, back from its ``audit.*`` tags."""
    from gauntlet.tracking import client, tracking_uri

    c = c or client(tracking_uri())
    exp = c.get_experiment_by_name(AUDIT_EXPERIMENT)
    if exp is None:
        return []
    entries, token = [], None
    while True:
        page = c.search_runs([exp.experiment_id], max_results=1000, page_token=token)
        for run in page:
            tags = {k.removeprefix("audit."): v for k, v in run.data.tags.items() if k.startswith("audit.")}
            for k in ("details", "pid"):
                if k in tags:
                    tags[k] = json.loads(tags[k])
            entries.append(tags)
        token = page.token
        if not token:
            return entries


def table(entries: list[dict]) -> str:
    """The entries as a markdown table (what ``gauntlet audit`` prints)."""
    rows = ["| when (UTC) | action | subject | why | who | flow run / CI run |", "|---|---|---|---|---|---|"]
    for e in entries:
        where = " ".join(x for x in (e.get("flow_run_id"), e.get("ci_run")) if x) or e.get("by") or "-"
        rows.append(f"| {e['at'][:19].replace('T', ' ')} | {e['action']} | {e['subject']} | "
                    f"{e['reason'].replace('|', '/')} | {e['user']}@{e['host']} | {where}"
                    f"{' (local only: not in MLflow)' if e.get('local_only') else ''} |")
    return "\n".join(rows)
