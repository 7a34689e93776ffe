"""``gauntlet``: the command line. One module per command, each with ``add_parser(sub)`` and ``run(args)``.

Exit codes: 0 success, 1 a run failed (reason printed), 2 invalid input. A config is validated before
Prefect, MLflow or torch are imported, so a bad file fails in well under a second and creates no run.
"""

from __future__ import annotations

import argparse
import sys

from gauntlet.cli import (
    audit,
    board,
    demo,
    deploy,
    eval,
    gc,
    history,
    leaderboard,
    plan,
    promote,
    rollback,
    run,
    serve,
    stack,
    submit,
    validate,
    worker,
)
from gauntlet.cli.common import EXIT_FAILED, EXIT_INVALID
from gauntlet.config.problems import SpecError
from gauntlet.project import ProjectError
from gauntlet.state import StateError

COMMANDS = (validate, run, demo, plan, eval, leaderboard, serve, stack, worker, promote, rollback, history, deploy, gc,
            audit, submit, board)


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="gauntlet",
        description="Gauntlet: a committed YAML config in; a trained, evaluated, gated and promoted model out.",
        epilog="Commands work on the project the working directory is in (the nearest folder with dvc.yaml and "
               "configs/). State lives in $GAUNTLET_HOME (default ./.gauntlet). MLFLOW_TRACKING_URI and "
               "PREFECT_API_URL point at servers when set. Exit codes: 0 ok, 1 run failed, 2 invalid input.")
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(sub).set_defaults(handler=command.run)
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.handler(args)
    except SpecError as e:
        print(str(e), file=sys.stderr)
        return EXIT_INVALID
    except ProjectError as e:   # no project here, or this gauntlet belongs to another checkout
        print(f"gauntlet: {e}", file=sys.stderr)
        return EXIT_INVALID
    except StateError as e:    # a store in the state folder that cannot be used or repaired: the fix is named
        print(f"gauntlet: {e}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
