"""What the commands share: exit codes, the ``--set`` option, starting the state folder and servers check."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

EXIT_OK, EXIT_FAILED, EXIT_INVALID = 0, 1, 2


def add_config(p: argparse.ArgumentParser, what: str = "run config", example: str = "train.learning_rate=1e-4") -> None:
    """The CONFIG argument and its ``--set`` overrides (validate, run, plan)."""
    p.add_argument("config", help=f"path of the {what} (YAML)")
    add_overrides(p, example)


def add_overrides(p: argparse.ArgumentParser, example: str = "train.learning_rate=1e-4") -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help=f"override a value by dotted key, e.g. {example} (repeatable)")


def start_environment() -> Path | None:
    """Point Prefect and MLflow at $GAUNTLET_HOME and check configured servers answer; the home, or None
    (after saying why) when a server does not answer."""
    from gauntlet.state import ServerUnreachable, check_servers, configure_environment

    home = configure_environment()
    try:
        check_servers()
    except ServerUnreachable as e:
        print(f"cannot start: {e}", file=sys.stderr)
        return None
    return home


def registry_client():
    """An MLflow client on the tracking store the environment names (for promote, rollback, history)."""
    from gauntlet.state import configure_environment
    from gauntlet.tracking import client, tracking_uri

    configure_environment()
    return client(tracking_uri())


def registry_errors(action):
    """Run ``action()``; an unknown model or version exits 2, any other registry refusal exits 1."""
    from gauntlet.registry.lock import RegistryError
    from gauntlet.registry.store import UnknownModelError

    try:
        return action()
    except UnknownModelError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_INVALID
    except RegistryError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILED
