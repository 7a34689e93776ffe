"""``gauntlet history NAME``: who or what held @champion when, and why."""

from __future__ import annotations

import argparse

from gauntlet.cli.common import EXIT_OK, registry_client, registry_errors


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("history", help="who/what held champion when, and why",
                       description="The recorded moves of NAME@champion: gated promotions, promotions by hand "
                                   "and rollbacks, oldest first.")
    p.add_argument("name", help="registered model name")
    p.add_argument("--json", action="store_true", help="print the events as JSON lines")
    return p


def run(args: argparse.Namespace) -> int:
    from gauntlet.config.gate import RegistrySpec
    from gauntlet.registry.store import champion_of, history, history_table

    def act() -> int:
        c = registry_client()
        events = history(c, args.name)
        if args.json:
            for e in events:
                print(e.model_dump_json())
            return EXIT_OK
        current, _ = champion_of(c, RegistrySpec(model_name=args.name))
        print(f"{args.name}: champion now v{current}" if current else f"{args.name}: no champion")
        print(history_table(events))
        return EXIT_OK

    return registry_errors(act)
