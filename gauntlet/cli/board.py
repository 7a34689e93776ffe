"""``gauntlet board status [NAME]``: a board's submissions: the queue, each one's state, submitter, submitted time and
the time left on its 24-hour promise (or how late it is), read from the board's tracking store."""

from __future__ import annotations

import argparse
import json
from datetime import UTC, datetime

from gauntlet.cli.common import EXIT_FAILED, EXIT_OK


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("board", help="a leaderboard's submissions: `gauntlet board status [NAME]`",
                       description="What `gauntlet submit` queued for a board and what became of it.")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    status = actions.add_parser("status", help="the queue and every submission's state and promise",
                                description="Every submission of the board, oldest first: its state (queued, "
                                            "evaluating, ranked, failed, refused), submitter, submitted time, the "
                                            "time left on its 24-hour promise (or how late it is) and its reason.")
    status.add_argument("board", nargs="?", default=None, metavar="NAME",
                        help="a leaderboard config's name (found in configs/) or its path "
                             "(default: configs/leaderboard.yaml)")
    status.add_argument("--json", action="store_true", help="print the submissions as JSON lines")
    return p


def table(subs: list, now: datetime) -> str:
    from gauntlet.config.problems import printable
    from gauntlet.leaderboard.submissions import promise

    queue = [s.id for s in subs if s.state == "queued"]
    rows = ["| queue | name | state | submitter | submitted (UTC) | promise | source | gpu | reason |",
            "|---|---|---|---|---|---|---|---|---|"]
    for s in subs:
        cells = [str(queue.index(s.id) + 1) if s.id in queue else "", s.name, s.state, s.submitter,
                 f"{s.submitted_at:%Y-%m-%d %H:%M}", promise(s, now), s.source, s.gpu_class or "—", s.reason or ""]
        rows.append("| " + " | ".join(printable(c).replace("|", "/") for c in cells) + " |")
    return "\n".join(rows)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from gauntlet.cli.submit import open_store
    from gauntlet.config.load import load_leaderboard_spec
    from gauntlet.leaderboard.submissions import board_config, status

    config = board_config(args.board, Path.cwd())
    spec = load_leaderboard_spec(config)
    c = open_store(spec)
    if c is None:
        return EXIT_FAILED
    subs, now = status(spec.name, c), datetime.now(UTC)
    if args.json:
        for s in subs:
            print(json.dumps(s.model_dump(mode="json", exclude={"problems"}), sort_keys=True))
        return EXIT_OK
    counts = {state: sum(s.state == state for s in subs) for state in ("queued", "evaluating")}
    print(f"board {spec.name} ({config}): {len(subs)} submission(s); {counts['queued']} queued for the next night, "
          f"{counts['evaluating']} evaluating (times in UTC, now {now:%Y-%m-%d %H:%M})")
    if subs:
        print(table(subs, now))
    return EXIT_OK
