"""``gauntlet promote NAME VERSION --reason R``: move @champion by hand (recorded in the history)."""

from __future__ import annotations

import argparse

from gauntlet.cli.common import EXIT_OK, announce_champion_moved, registry_client, registry_errors


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("promote", help="make VERSION the champion by hand (recorded with the reason)",
                       description="Move NAME@champion to VERSION without the gate, e.g. to pick a model the gate "
                                   "cannot judge. The reason, who and when go into the champion history; with a "
                                   "Prefect server (PREFECT_API_URL) the gauntlet.champion.moved event starts the "
                                   "deploy deployment.")
    p.add_argument("name", help="registered model name")
    p.add_argument("version", help="model version number")
    p.add_argument("--reason", required=True, help="why (recorded)")
    return p


def run(args: argparse.Namespace) -> int:
    from gauntlet.config.gate import RegistrySpec
    from gauntlet.registry.promotion import promote_manually

    spec = RegistrySpec(model_name=args.name)

    def act() -> int:
        event = promote_manually(registry_client(), spec, args.version, args.reason)
        print(f"{args.name} v{args.version} already is @{spec.champion_alias}; nothing changed" if event is None
              else f"{args.name} v{event.version} is now @{spec.champion_alias} (was v{event.previous}); "
                   "recorded in the history")
        if event is not None:
            announce_champion_moved(args.name, event)
        return EXIT_OK

    return registry_errors(act)
