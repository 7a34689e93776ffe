"""``gauntlet``: the command line (DESIGN.md, "The command line").

Exit codes: 0 success, 1 a run failed (reason printed), 2 invalid input. A config is validated before
Prefect, MLflow or torch are imported, so a bad file fails in well under a second and creates no run.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from tasks.spec import RunSpec, SpecError, load_spec
from tasks.state import PROJECT_ROOT, configure_environment, gauntlet_home

EXIT_OK, EXIT_FAILED, EXIT_INVALID = 0, 1, 2
DEMO_CONFIG = PROJECT_ROOT / "configs" / "demo.yaml"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gauntlet",
        description="Gauntlet: a committed YAML config in; a trained, evaluated, gated and promoted model out.",
        epilog="State lives in $GAUNTLET_HOME (default ./.gauntlet). MLFLOW_TRACKING_URI and PREFECT_API_URL "
               "point at servers when set. Exit codes: 0 ok, 1 run failed, 2 invalid input.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("validate", help="check a config and print every problem with its YAML path",
                       description="Validate a run config without running anything. Exit 2 if invalid.")
    p.add_argument("config", help="path of the run config (YAML)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a value by dotted key, e.g. train.learning_rate=1e-4 (repeatable)")

    p = sub.add_parser("run", help="run the finetune flow for one config",
                       description="Pull data, fetch the model, train, evaluate, gate and promote. Stages whose "
                                   "inputs did not change come from Prefect's cache.")
    p.add_argument("config", help="path of the run config (YAML)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a value by dotted key, e.g. train.learning_rate=1e-4 (repeatable)")

    p = sub.add_parser("demo", help="run configs/demo.yaml: tiny local model, synthetic DVC data, no servers",
                       description="Build the demo's tiny model and data locally and run the whole pipeline.")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a value of the demo config by dotted key (repeatable)")

    p = sub.add_parser("promote", help="make VERSION the champion by hand (recorded with the reason)",
                       description="Move NAME@champion to VERSION without the gate, e.g. to pick a model the gate "
                                   "cannot judge. The reason, who and when go into the champion history.")
    p.add_argument("name", help="registered model name")
    p.add_argument("version", help="model version number")
    p.add_argument("--reason", required=True, help="why (recorded)")

    p = sub.add_parser("rollback", help="give champion back to the previous champion (recorded)",
                       description="Restore the version that was champion before the current one, following the "
                                   "recorded history (rolling back twice goes back two champions).")
    p.add_argument("name", help="registered model name")
    p.add_argument("--reason", default="", help="why (recorded)")

    p = sub.add_parser("history", help="who/what held champion when, and why",
                       description="The recorded moves of NAME@champion: gated promotions, promotions by hand "
                                   "and rollbacks, oldest first.")
    p.add_argument("name", help="registered model name")
    p.add_argument("--json", action="store_true", help="print the events as JSON lines")
    return parser


def _registry_command(args: argparse.Namespace) -> int:
    """promote / rollback / history: parse here, act in tasks/registry.py."""
    configure_environment()
    from tasks import registry
    from tasks.spec import RegistrySpec
    from tasks.tracking import client, tracking_uri

    c = client(tracking_uri())
    spec = RegistrySpec(model_name=args.name)
    try:
        if args.command == "promote":
            event = registry.promote_manually(c, spec, args.version, args.reason)
            print(f"{args.name} v{args.version} already is @{spec.champion_alias}; nothing changed" if event is None
                  else f"{args.name} v{event.version} is now @{spec.champion_alias} (was v{event.previous}); "
                       "recorded in the history")
        elif args.command == "rollback":
            event = registry.rollback(c, spec, args.reason)
            print(f"{args.name}@{spec.champion_alias} rolled back from v{event.previous} to v{event.version}; "
                  "recorded in the history")
        else:
            events = registry.history(c, args.name)
            current, _ = registry.champion_of(c, spec)
            if args.json:
                for e in events:
                    print(e.model_dump_json())
                return EXIT_OK
            print(f"{args.name}: champion now v{current}" if current else f"{args.name}: no champion")
            print(registry.history_table(events))
    except registry.UnknownModelError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_INVALID
    except registry.RegistryError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def _validate(config: str, overrides: list[str]) -> RunSpec:
    return load_spec(Path(config).resolve(), overrides)


def _run(config: Path, overrides: list[str]) -> int:
    spec = _validate(str(config), overrides)  # before any heavy import: bad input costs nothing
    home = configure_environment()
    from flows.finetune import finetune

    started = time.time()
    try:
        summary = finetune(config=str(config.resolve()), overrides=overrides)
    except Exception as e:  # the flow run is marked failed by Prefect; say why, briefly
        print(f"\nrun FAILED: {type(e).__name__}: {e}", file=sys.stderr)
        return EXIT_FAILED
    elapsed = time.time() - started
    print("\n" + summary.markdown())
    print(f"\nfinished in {elapsed:.1f}s")
    print("\nWhere to look:")
    print(f"  MLflow run {summary.mlflow_run_id}: mlflow ui --backend-store-uri {summary.tracking_uri}")
    print(f"  Prefect flow runs: PREFECT_HOME={home / 'prefect'} prefect server start  (then the UI)")
    print(f"  state folder: {gauntlet_home()}")
    return EXIT_OK if summary.gate_passed or spec.name else EXIT_OK


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "validate":
            spec = _validate(args.config, args.overrides)
            print(f"{args.config}: valid (config hash {spec.config_hash()[:12]})")
            return EXIT_OK
        if args.command == "run":
            return _run(Path(args.config), args.overrides)
        if args.command == "demo":
            return _run(DEMO_CONFIG, args.overrides)
        if args.command in ("promote", "rollback", "history"):
            return _registry_command(args)
    except SpecError as e:
        print(str(e), file=sys.stderr)
        return EXIT_INVALID
    return EXIT_INVALID


if __name__ == "__main__":
    sys.exit(main())
