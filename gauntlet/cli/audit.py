"""``gauntlet audit``: who promoted, rolled back, deployed or collected what, when, and why."""

from __future__ import annotations

import argparse
import json
from datetime import UTC, datetime, timedelta

from gauntlet.cli.common import EXIT_INVALID, EXIT_OK


def add_parser(sub) -> argparse.ArgumentParser:
    from gauntlet.audit import ACTIONS

    p = sub.add_parser("audit", help="who changed the registry, deployments or state, when and why",
                       description="Print the audit log, oldest first: every promotion, promotion by hand, "
                                   "rollback, deploy and gc, with the user, host, CI run or Prefect flow run, and the "
                                   "reason. Each entry is a run of the MLflow experiment 'gauntlet-audit' and a line of "
                                   "$GAUNTLET_HOME/audit.jsonl; with a shared MLflow server the experiment is read, so "
                                   "every host of a team shows the same entries, else this machine's file.")
    p.add_argument("--model", help="only entries about this registered model")
    p.add_argument("--since", metavar="WHEN",
                   help="only entries from then on: an ISO date/time (2025-01-31, 2025-01-31T09:00) or an age "
                        "(30m, 12h, 7d)")
    p.add_argument("--action", choices=ACTIONS, help="only this kind of change")
    p.add_argument("--json", action="store_true", help="print the entries as JSON lines")
    return p


def parse_since(text: str, now: datetime | None = None) -> datetime:
    """``7d``/``12h``/``30m`` ago, or an ISO date/time (UTC unless it names a zone); ValueError otherwise."""
    now = now or datetime.now(UTC)
    units = {"m": "minutes", "h": "hours", "d": "days"}
    if text[-1:] in units and text[:-1].replace(".", "", 1).isdigit():
        return now - timedelta(**{units[text[-1]]: float(text[:-1])})
    when = datetime.fromisoformat(text)
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def run(args: argparse.Namespace) -> int:
    import sys

    from gauntlet.audit import audit_path, read, table
    from gauntlet.state import configure_environment

    try:
        since = parse_since(args.since) if args.since else None
    except ValueError:
        print(f"error: --since {args.since!r} is neither an ISO date/time (2025-01-31T09:00) nor an age "
              "(30m, 12h, 7d)", file=sys.stderr)
        return EXIT_INVALID
    configure_environment()
    entries = read(model=args.model, since=since, action=args.action)
    if args.json:
        for e in entries:
            print(json.dumps(e, sort_keys=True))
        return EXIT_OK
    if not entries:
        from gauntlet.state import shared_tracking
        from gauntlet.tracking import tracking_uri

        where = "the MLflow experiment gauntlet-audit" if shared_tracking(tracking_uri()) else str(audit_path())
        print(f"no audit entries{' match' if args.model or since or args.action else ''} in {where}")
        return EXIT_OK
    print(table(entries))
    return EXIT_OK
