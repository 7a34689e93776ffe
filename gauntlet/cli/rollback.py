"""``gauntlet rollback NAME``: give @champion back to the previous champion (recorded in the history)."""

from __future__ import annotations

import argparse

from gauntlet.cli.common import EXIT_OK, announce_champion_moved, registry_client, registry_errors


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("rollback", help="give champion back to the previous champion (recorded)",
                       description="Restore the version that was champion before the current one, following the "
                                   "recorded history (rolling back twice goes back two champions). With a Prefect server "
                                   "(PREFECT_API_URL) the gauntlet.champion.moved event starts the deploy "
                                   "deployment, which serves the restored version.")
    p.add_argument("name", help="registered model name")
    p.add_argument("--reason", default="", help="why (recorded)")
    return p


def run(args: argparse.Namespace) -> int:
    from gauntlet.config.gate import RegistrySpec
    from gauntlet.registry.promotion import rollback

    spec = RegistrySpec(model_name=args.name)

    def act() -> int:
        event = rollback(registry_client(), spec, args.reason)
        print(f"{args.name}@{spec.champion_alias} rolled back from v{event.previous} to v{event.version}; "
              "recorded in the history")
        announce_champion_moved(args.name, event)
        return EXIT_OK

    return registry_errors(act)
