"""What the commands share: exit codes, the ``--set`` option, starting the state folder and servers check."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

EXIT_OK, EXIT_FAILED, EXIT_INVALID = 0, 1, 2


def add_config(p: argparse.ArgumentParser, what: str = "run config", example: str = "train.learning_rate=1e-4") -> None:
    """The CONFIG argument and its ``--set`` overrides (validate, run, plan)."""
    p.add_argument("config", help=f"path of the {what} (YAML)")
    add_overrides(p, example)


def add_overrides(p: argparse.ArgumentParser, example: str = "train.learning_rate=1e-4") -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help=f"override a value by dotted key, e.g. {example} (repeatable)")


def start_environment(preload: Sequence[str] | None = None) -> Path | None:
    """Point Prefect and MLflow at $GAUNTLET_HOME and check configured servers answer; the home, or None
    (after saying why) when a server does not answer.

    ``preload``: the modules the command's flow will import (its flow module, the engine). Given, and with no
    Prefect server configured, the command's temporary Prefect API (a subprocess, ~5 s to start) starts now in a
    thread while this thread imports them and sets up the MLflow store: work the command does anyway, done while
    the API boots on the other core instead of after it. None: the API starts at the first flow, as Prefect does."""
    from gauntlet.state import ServerUnreachable, check_servers, configure_environment

    home = configure_environment()
    try:
        check_servers()
    except ServerUnreachable as e:
        print(f"cannot start: {e}", file=sys.stderr)
        return None
    if preload is None or os.environ.get("PREFECT_API_URL"):
        prepare_prefect_database()
        for module in preload or ():
            importlib.import_module(module)
        return home
    starter = _Started(start_local_api)
    for module in preload:
        importlib.import_module(module)
    from gauntlet.tracking import prepare_store, tracking_uri

    prepare_store(tracking_uri())
    try:
        starter.result()
    except Exception as e:
        print(f"cannot start: the local Prefect API did not start: {type(e).__name__}: {e}", file=sys.stderr)
        return None
    return home


class _Started(threading.Thread):
    """``fn()`` running in a thread from construction; ``result()`` waits and re-raises what it raised."""

    def __init__(self, fn: Callable[[], None]):
        super().__init__(name=f"gauntlet-{fn.__name__}", daemon=True)
        self.fn = fn
        self.error: BaseException | None = None
        self.start()

    def run(self) -> None:
        try:
            self.fn()
        except BaseException as e:  # handed to the waiting thread
            self.error = e

    def result(self) -> None:
        self.join()
        if self.error is not None:
            raise self.error


def _migrated(folder: Path) -> bool:
    import prefect

    return (folder / f".gauntlet-migrated-{prefect.__version__}").exists() and (folder / "prefect.db").exists()


def _stamp_migrated(folder: Path) -> None:
    import prefect

    from gauntlet.files import write_text

    write_text(folder / f".gauntlet-migrated-{prefect.__version__}", "migrated\n")


def prepare_prefect_database() -> None:
    """Migrate Prefect's local database once, under an inter-process lock, before any flow starts.

    Without a server (``PREFECT_API_URL`` unset) every command starts its own ephemeral API on the same
    sqlite file in ``$GAUNTLET_HOME/prefect``, and each would run the migrations at once; one process migrates
    here, the others wait and find it done (a stamp per Prefect version skips the lock afterwards)."""
    if os.environ.get("PREFECT_API_URL"):
        return
    folder = Path(os.environ["PREFECT_HOME"])
    if _migrated(folder):
        return
    import asyncio

    from filelock import FileLock

    folder.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder / ".setup.lock"), timeout=600):
        if _migrated(folder):
            return
        from prefect.server.database import provide_database_interface

        asyncio.run(provide_database_interface().create_db())
        _stamp_migrated(folder)


def start_local_api() -> None:
    """Start the temporary Prefect API that Prefect itself would start at the first flow (the same instance:
    Prefect's client finds it running). A database no command migrated yet is migrated by the API process as it
    starts (its own start-up step), under the same lock and stamp as :func:`prepare_prefect_database`: the
    migrations then run in that process, beside this one's work, not in it."""
    from filelock import FileLock
    from prefect.server.api.server import SubprocessASGIServer

    folder = Path(os.environ["PREFECT_HOME"])
    if _migrated(folder):
        SubprocessASGIServer().start()
        return
    folder.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder / ".setup.lock"), timeout=600):
        SubprocessASGIServer().start()   # healthy only once its start-up (migrations included) finished
        _stamp_migrated(folder)


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
