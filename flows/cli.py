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
    p = sub.add_parser("gc", help="free stage outputs, Prefect results and cached models nobody needs",
                       description="Remove what no registered version and no run within --keep-days needs. "
                                   "Removing is safe: a later run recomputes what it misses.")
    p.add_argument("--dry-run", action="store_true", help="list what would be removed and how much it frees")
    p.add_argument("--keep-days", type=float, default=7.0, help="keep outputs used within this many days (7)")

    p = sub.add_parser("plan", help="estimate training memory per launch profile, without downloading weights",
                       description="Estimate the peak memory of the config's training (weights, LoRA, gradients, "
                                   "optimizer state, activations) under each profile in deployments/accelerate/, "
                                   "from the model's config.json alone, and compare it with the visible GPUs (or "
                                   "the ones declared with --gpus/--gpu-memory). Exit 1 if the configured "
                                   "profile does not fit them.")
    p.add_argument("config", help="path of the run config (YAML)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a value by dotted key, e.g. train.batch_size=4 (repeatable)")
    p.add_argument("--gpus", type=int, default=None, help="plan for this many GPUs instead of the visible ones")
    p.add_argument("--gpu-memory", type=float, default=None, metavar="GIB",
                   help="memory per GPU in GiB, with --gpus (default 80)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    return parser


def _gc(dry_run: bool, keep_days: float) -> int:
    configure_environment()
    from tasks.gc import apply_gc, plan_gc

    plan = plan_gc(keep_days=keep_days)
    for item in plan.remove:
        print(f"{'would remove' if dry_run else 'removing'}  {item.bytes / 1e6:10.1f} MB  {item.path}  ({item.reason})")
    for item in plan.keep:
        print(f"keeping         {item.bytes / 1e6:10.1f} MB  {item.path}  ({item.reason})")
    freed = plan.freed_bytes if dry_run else apply_gc(plan)
    print(f"{'would free' if dry_run else 'freed'} {freed / 1e6:.1f} MB in {len(plan.remove)} item(s)")
    return EXIT_OK


def _plan(args: argparse.Namespace) -> int:
    spec = _validate(args.config, args.overrides)
    from tasks.plan import PlanError, declared_devices, plan_for_spec, render, to_json

    devices = declared_devices(args.gpus, args.gpu_memory or 80.0) if args.gpus else None
    try:
        plan, problems = plan_for_spec(spec.model, spec.train, devices, args.gpus)
    except PlanError as e:
        print(f"plan: {e}", file=sys.stderr)
        return EXIT_INVALID
    print(to_json(plan, problems) if args.json else render(plan))
    if problems:
        print("\nconfig problems:\n  " + "\n  ".join(problems), file=sys.stderr)
        return EXIT_INVALID
    return EXIT_OK if plan.configured_fits else EXIT_FAILED


def _validate(config: str, overrides: list[str]) -> RunSpec:
    return load_spec(Path(config).resolve(), overrides)


def _run(config: Path, overrides: list[str]) -> int:
    _validate(str(config), overrides)  # before any heavy import: bad input costs nothing
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
    return EXIT_OK


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
        if args.command == "gc":
            return _gc(args.dry_run, args.keep_days)
        if args.command == "plan":
            return _plan(args)
    except SpecError as e:
        print(str(e), file=sys.stderr)
        return EXIT_INVALID
    return EXIT_INVALID


if __name__ == "__main__":
    sys.exit(main())
