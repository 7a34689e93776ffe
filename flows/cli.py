"""``gauntlet``: the command line (DESIGN.md, "The command line").

Exit codes: 0 success, 1 a run failed (reason printed), 2 invalid input. A config is validated before
Prefect, MLflow or torch are imported, so a bad file fails in well under a second and creates no run.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from tasks.spec import RunSpec, SpecError, load_leaderboard_spec, load_spec
from tasks.state import PROJECT_ROOT, ServerUnreachable, check_servers, configure_environment, gauntlet_home

EXIT_OK, EXIT_FAILED, EXIT_INVALID = 0, 1, 2
DEMO_CONFIG = PROJECT_ROOT / "configs" / "demo.yaml"
LEADERBOARD_CONFIG = PROJECT_ROOT / "configs" / "leaderboard.yaml"


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

    p = sub.add_parser("eval", help="evaluate one model on a suite (cached per task)",
                       description="Evaluate a model folder, hub model (hf://org/name@revision) or registered "
                                   "model (models:/NAME@alias, models:/NAME/VERSION) with lm-eval on a "
                                   "suite of evals/suites.yaml and/or listed tasks; print and save the report. "
                                   "Tasks evaluated before on the same model with the same protocol come from the cache.")
    p.add_argument("model", help="model folder (save_pretrained layout), hf://org/name@revision, or "
                                 "models:/NAME@alias (the MLflow Model Registry, e.g. models:/gauntlet-demo@champion)")
    p.add_argument("--suite", help="suite name: en-core, zh-core, reasoning, demo (see evals/suites.yaml)")
    p.add_argument("--task", dest="tasks", action="append", default=[], metavar="NAME",
                   help="a task to evaluate (with or instead of a suite; repeatable)")
    p.add_argument("--fixtures", action="store_true",
                   help="use each task's small offline fixture instead of the real dataset (no network)")
    p.add_argument("--variant", default="base", help="label of this model in the report (default: base)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="an eval setting by key, e.g. limit=20, backend=vllm, num_fewshot=0 (repeatable)")
    p.add_argument("--output", metavar="FILE", help="also write the report JSON here")

    p = sub.add_parser("leaderboard", help="run the leaderboard flow once (configs/leaderboard.yaml by default)",
                       description="Evaluate every candidate x variant of a leaderboard config with the cached "
                                   "fetch/quantize/evaluate tasks, rank them and publish leaderboard.json/.md/.html.")
    p.add_argument("config", nargs="?", default=str(LEADERBOARD_CONFIG), help="path of the leaderboard config (YAML)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a value by dotted key, e.g. eval.limit=32 (repeatable)")

    p = sub.add_parser("serve", help="Prefect server + MLflow server + worker on 127.0.0.1, deployments applied",
                       description="Start MLflow and Prefect servers, create the work pool and the gpu concurrency "
                                   "limit, apply deployments/prefect.yaml and start a process worker. Ctrl-C or "
                                   "SIGTERM stops them all.")
    p.add_argument("--host", default="127.0.0.1", help="address the servers listen on (default 127.0.0.1)")
    p.add_argument("--prefect-port", type=int, default=4200, help="Prefect server/UI port (default 4200)")
    p.add_argument("--mlflow-port", type=int, default=5000, help="MLflow server/UI port (default 5000)")
    p.add_argument("--pool", default="process", help="process work pool to create and serve (default process)")
    p.add_argument("--gpu-slots", type=int, default=1, help="tasks tagged gpu that may run at once (default 1)")
    p.add_argument("--timezone", default=None, help="timezone of the nightly 02:00 schedule, e.g. Europe/Berlin "
                                                    "(default: $GAUNTLET_TIMEZONE or UTC)")
    p.add_argument("--no-worker", action="store_true", help="do not start a worker")
    p.add_argument("--no-deploy", action="store_true", help="do not apply deployments/prefect.yaml")

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
    try:
        check_servers()
    except ServerUnreachable as e:
        print(f"cannot start: {e}", file=sys.stderr)
        return EXIT_FAILED
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


def _eval_spec(args: argparse.Namespace) -> tuple[object, object]:
    """(ModelSpec, EvalSpec) from the command line; SpecError (exit 2) lists every problem."""
    from pydantic import ValidationError

    from tasks.spec import EvalSpec, ModelSpec, apply_overrides, problems_from

    raw: dict = {"tasks": list(args.tasks), "fixtures": bool(args.fixtures)}
    if args.suite:
        raw["suite"] = args.suite
    raw = apply_overrides(raw, [o.removeprefix("eval.") for o in args.overrides])
    problems = []
    specs = []
    is_path = "://" not in args.model and not args.model.startswith("models:/")
    source = str(Path(args.model).resolve()) if is_path else args.model  # a folder: from here
    for section, model, data in (("model", ModelSpec, {"source": source}), ("eval", EvalSpec, raw)):
        try:
            specs.append(model.model_validate(data, context={"root": Path.cwd()}))
        except ValidationError as e:
            problems += [p.model_copy(update={"path": f"{section}.{p.path}"}) for p in problems_from(e)]
    if problems:
        raise SpecError("gauntlet eval", problems)
    return specs[0], specs[1]


def _eval(args: argparse.Namespace) -> int:
    model, spec = _eval_spec(args)  # before any heavy import: bad input costs nothing
    configure_environment()
    from flows.evaluate import evaluate_flow
    from tasks.evaluate import report_markdown

    try:
        report = evaluate_flow(model=model, spec=spec, variant=args.variant)
    except Exception as e:
        print(f"\nevaluation FAILED: {type(e).__name__}: {e}", file=sys.stderr)
        return EXIT_FAILED
    print("\n" + report_markdown(report))
    print(f"\nreport: {report.report_path}  (MLflow run {report.mlflow_run_id})")
    if args.output:
        Path(args.output).write_text(Path(report.report_path).read_text(encoding="utf-8"), encoding="utf-8")
        print(f"copied to {args.output}")
    return EXIT_OK


def _is_leaderboard_config(config: str) -> bool:
    """A leaderboard config lists candidates; a run config has a model."""
    import yaml

    try:
        raw = yaml.safe_load(Path(config).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return False  # load_spec reports it
    return isinstance(raw, dict) and "candidates" in raw and "model" not in raw


def _leaderboard(config: Path, overrides: list[str]) -> int:
    load_leaderboard_spec(config.resolve(), overrides)  # before any heavy import: bad input costs nothing
    configure_environment()
    from flows.leaderboard import leaderboard

    try:
        board = leaderboard(config=str(config.resolve()), overrides=overrides)
    except Exception as e:
        print(f"\nleaderboard FAILED: {type(e).__name__}: {e}", file=sys.stderr)
        return EXIT_FAILED
    from tasks.leaderboard import render_markdown

    print("\n" + render_markdown(board))
    print("Published:\n" + "\n".join(f"  {path}" for path in board.files.values()))
    print(f"  MLflow run {board.mlflow_run_id} (experiment of the config's tracking section)")
    failed = [r for r in board.rows if r.status == "failed"]
    if failed:
        print(f"\n{len(failed)} candidate variant(s) failed; their reasons are on the board.", file=sys.stderr)
    return EXIT_OK


def _serve(args: argparse.Namespace) -> int:
    from flows.serve import ServeConfig, serve

    timezone = args.timezone or os.environ.get("GAUNTLET_TIMEZONE")
    if timezone:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(timezone)
        except (ZoneInfoNotFoundError, ValueError):
            print(f"--timezone {timezone!r}: unknown timezone; use an IANA name such as Europe/Berlin",
                  file=sys.stderr)
            return EXIT_INVALID
    return serve(ServeConfig(host=args.host, prefect_port=args.prefect_port, mlflow_port=args.mlflow_port,
                             pool=args.pool, gpu_slots=args.gpu_slots, timezone=timezone,
                             worker=not args.no_worker, deploy=not args.no_deploy))


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "validate" and _is_leaderboard_config(args.config):
            board_spec = load_leaderboard_spec(Path(args.config).resolve(), args.overrides)
            print(f"{args.config}: valid leaderboard config ({len(board_spec.candidates)} candidates)")
            return EXIT_OK
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
        if args.command == "eval":
            return _eval(args)
        if args.command in ("promote", "rollback", "history"):
            return _registry_command(args)
        if args.command == "leaderboard":
            return _leaderboard(Path(args.config), args.overrides)
        if args.command == "serve":
            return _serve(args)
        if args.command == "plan":
            return _plan(args)
    except SpecError as e:
        print(str(e), file=sys.stderr)
        return EXIT_INVALID
    return EXIT_INVALID


if __name__ == "__main__":
    sys.exit(main())
