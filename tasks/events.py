"""The Prefect event a move of ``@champion`` sends, from wherever it moves: the promote stage (a gated
promotion) and ``gauntlet promote`` / ``gauntlet rollback`` (by hand).

The ``deploy`` deployment's trigger (deployments/prefect.yaml) starts the deploy flow on it with
``models:/NAME/VERSION``. The deploy flow's own rollback does not send it: the version it restores already
serves as stable.
"""

from __future__ import annotations

CHAMPION_MOVED = "gauntlet.champion.moved"


def emit_champion_moved(model_name: str, version: str, previous: str | None, action: str, reason: str = "",
                        wait_s: float | None = None) -> bool:
    """Send the event; True when it was handed to Prefect's events worker. ``wait_s``: wait up to that long
    until it has left this process (a command about to exit); else the worker sends it in the background."""
    from prefect.events import emit_event
    from prefect.events.worker import EventsWorker

    event = emit_event(event=CHAMPION_MOVED,
                       resource={"prefect.resource.id": f"gauntlet.model.{model_name}",
                                 "gauntlet.model.name": model_name},
                       payload={"model": model_name, "version": str(version), "previous": previous,
                                "action": action, "uri": f"models:/{model_name}/{version}", "reason": reason})
    if event is not None and wait_s is not None:
        EventsWorker.drain_all(timeout=wait_s)
    return event is not None
