"""The Prefect event a move of ``@champion`` sends, from wherever it moves: the promote stage (a gated
promotion) and ``gauntlet promote`` / ``gauntlet rollback`` (by hand).

The ``deploy`` deployment's trigger (deployments/prefect.yaml) starts the deploy flow on it with
``models:/NAME/VERSION``. The deploy flow's own rollback does not send it: the version it restores already
serves as stable.
"""

from __future__ import annotations

import asyncio

CHAMPION_MOVED = "gauntlet.champion.moved"
SEND_TIMEOUT_S = 5.0     # the longest a command waits for the event to reach the Prefect server


def emit_champion_moved(model_name: str, version: str, previous: str | None, action: str, reason: str = "",
                        wait: bool = False) -> bool:
    """Send the event; True when it was handed to Prefect. In a flow it goes through Prefect's events worker,
    in the background. ``wait`` (a command about to exit): send it from here and wait until the server has
    it, at most ``SEND_TIMEOUT_S``; False when it did not get there in time. (The events worker's own drain
    retries a server that does not answer for ten seconds and more, at exit too.)"""
    fields = {"event": CHAMPION_MOVED,
              "resource": {"prefect.resource.id": f"gauntlet.model.{model_name}", "gauntlet.model.name": model_name},
              "payload": {"model": model_name, "version": str(version), "previous": previous, "action": action,
                          "uri": f"models:/{model_name}/{version}", "reason": reason}}
    if not wait:
        from prefect.events import emit_event

        return emit_event(**fields) is not None
    from prefect.events import Event
    from prefect.events.clients import get_events_client

    async def send() -> None:
        async with get_events_client(reconnection_attempts=1) as client:
            await client.emit(Event(**fields))

    try:
        asyncio.run(asyncio.wait_for(send(), timeout=SEND_TIMEOUT_S))
    except Exception:    # no server, refused, or out of time: the caller says the event was not sent
        return False
    return True
