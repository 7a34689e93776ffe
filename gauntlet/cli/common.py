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
    prepare_prefect_database()
    return home


def prepare_prefect_database() -> None:
    """Migrate Prefect's local database once, under an inter-process lock, before any flow starts.

    Without a server (``PREFECT_API_URL`` unset) every command starts its own ephemeral API on the same
    sqlite file in ``$GAUNTLET_HOME/prefect``, and each would run the migrations at once; one process migrates
    here, the others wait and find it done (a stamp per Prefect version skips the lock afterwards)."""
    import os

    if os.environ.get("PREFECT_API_URL"):
        return
    import asyncio

    import prefect
    from filelock import FileLock

    folder = Path(os.environ["PREFECT_HOME"])
    stamp = folder / f".gauntlet-migrated-{prefect.__version__}"
    if stamp.exists() and (folder / "prefect.db").exists():
        return
    folder.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder / ".setup.lock"), timeout=600):
        if stamp.exists() and (folder / "prefect.db").exists():
            return
        from prefect.server.database import provide_database_interface

        from gauntlet.files import write_text

        asyncio.run(provide_database_interface().create_db())
        write_text(stamp, "migrated\n")


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


def announce_champion_moved(model_name: str, event) -> None:
    """``@champion`` moved by hand (``event``, the registry's ChampionEvent): the ``gauntlet.champion.moved``
    Prefect event a gated promotion sends too, so the ``deploy`` deployment's trigger serves the new champion.
    Only to a Prefect server (``PREFECT_API_URL``): without one, Prefect would start a local API just to drop it."""
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        print(f"no Prefect server (PREFECT_API_URL unset), so no deploy was triggered; "
              f"`gauntlet deploy {model_name}` serves the champion by hand")
        return
    from gauntlet.secrets import redact_uri
    from gauntlet.tasks.events import SEND_TIMEOUT_S, emit_champion_moved

    sent = emit_champion_moved(model_name, event.version, event.previous, event.action, event.reason, wait=True)
    print("sent gauntlet.champion.moved: the deploy deployment's trigger serves it" if sent
          else f"gauntlet.champion.moved not sent: the Prefect server at {redact_uri(PREFECT_API_URL.value())} did not "
               f"take it within {SEND_TIMEOUT_S:.0f} s; `gauntlet deploy {model_name}` serves the champion by hand")
