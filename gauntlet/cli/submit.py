"""``gauntlet submit SOURCE [--board NAME] [--name N]``: queue a model for a board's next leaderboard night.

Checked before it queues (sources.allow, a pinned revision, config.json and tokenizer load, the GPU class), each
refusal naming why and the fix (exit 2); queued or refused, it is recorded in the board's tracking store and the audit
log. ``gauntlet board status`` shows it. The ``submit/manual`` deployment is the same as a form in the Prefect UI.
"""

from __future__ import annotations

import argparse
import sys

from gauntlet.cli.common import EXIT_FAILED, EXIT_INVALID, EXIT_OK


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("submit", help="queue a model for a leaderboard's next night (checked before it queues)",
                       description="Check a model (the board's sources.allow, a pinned revision, that its config.json "
                                   "and tokenizer load, the GPU class its evaluation needs) and queue it for the "
                                   "board's next leaderboard night, which evaluates it beside the config's "
                                   "candidates within 24 hours. A refusal names why and the fix (exit 2); refused "
                                   "or queued, it is recorded: `gauntlet board status` shows it.")
    p.add_argument("source", help="a local folder saved with save_pretrained() (pinned by its content sha256, "
                                  "computed now), hf://org/name@<commit sha>, models:/NAME/VERSION or demo://NAME")
    p.add_argument("--board", default=None, metavar="NAME",
                   help="the board: a leaderboard config's name (found in configs/) or its path "
                        "(default: configs/leaderboard.yaml)")
    p.add_argument("--name", default=None, help="its name on the board (default: from the source)")
    return p


def open_store(spec):
    """An MLflow client on the board's tracking store, after the state folder is set up and servers checked (None,
    having said why, when a configured server does not answer)."""
    from gauntlet.state import ServerUnreachable, check_servers, configure_environment

    configure_environment()
    try:
        check_servers()
    except ServerUnreachable as e:
        print(f"cannot start: {e}", file=sys.stderr)
        return None
    from gauntlet.leaderboard.submissions import store

    return store(spec)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from gauntlet.config.load import load_leaderboard_spec
    from gauntlet.config.problems import printable
    from gauntlet.leaderboard.submissions import board_config, submit

    config = board_config(args.board, Path.cwd())
    spec = load_leaderboard_spec(config)   # an invalid board config costs nothing
    c = open_store(spec)
    if c is None:
        return EXIT_FAILED
    sub = submit(spec, args.source, name=args.name, c=c, config=str(config))
    status = f"`gauntlet board status {spec.name}` shows it"
    if sub.state == "refused":
        print(f"refused: {sub.name} for board {spec.name} ({sub.source}), recorded as refused; {status}",
              file=sys.stderr)
        print("\n".join(str(p) for p in sub.problems), file=sys.stderr)
        return EXIT_INVALID
    pin = f"content sha256 {sub.sha[:12]}" if sub.sha else f"revision {sub.revision}"
    print(printable(f"queued: {sub.name} for board {spec.name} ({sub.source}, pinned by {pin}; evaluated on "
                    f"{sub.gpu_class}), submitted by {sub.submitter} at {sub.submitted_at:%Y-%m-%d %H:%M} UTC"))
    print(f"the board's next night evaluates it; promised by {sub.deadline:%Y-%m-%d %H:%M} UTC; {status}")
    return EXIT_OK
