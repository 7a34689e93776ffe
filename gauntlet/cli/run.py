"""``gauntlet run CONFIG``: the finetune flow for one config (data, model, train, evaluate, gate, promote)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from gauntlet.cli.common import EXIT_FAILED, EXIT_INVALID, EXIT_OK, add_config, start_environment
from gauntlet.config.load import load_spec


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("run", help="run the finetune flow for one config",
                       description="Pull data, fetch the model, train, evaluate, gate and promote. Stages whose "
                                   "inputs did not change come from Prefect's cache. With --pool the run is queued on "
                                   "a team's GPU pool instead (docs/scale.md): on the work queue of the smallest GPU "
                                   "class its `gauntlet plan` estimate fits, refused before it queues when none does.")
    add_config(p)
    p.add_argument("--pool", action="store_true",
                   help="queue the run on the team's pool (deployment finetune/pool, $PREFECT_API_URL) and print its "
                        "flow run id, instead of running it here")
    return p


POOL_DEPLOYMENT = "finetune/pool"


def queue_on_pool(config: Path, overrides: list[str]) -> int:
    """Place the run by its plan and queue it on the pool's class queue; every worker reads the config from its own
    checkout, so it is named relative to the project."""
    import os

    from gauntlet.plan.report import plan_for_spec
    from gauntlet.plan.shape import PlanError
    from gauntlet.project import project_root

    spec = load_spec(config, overrides)
    try:
        rel = config.relative_to(project_root())
    except ValueError:
        print(f"run --pool: {config} is outside the project {project_root()}; the pool's workers read configs from "
              "their own checkout: put it under configs/ and commit it", file=sys.stderr)
        return EXIT_INVALID
    if not os.environ.get("PREFECT_API_URL"):
        print("run --pool: PREFECT_API_URL is unset; export the team's Prefect server (`gauntlet stack env` prints "
              "it)", file=sys.stderr)
        return EXIT_INVALID
    try:
        plan, _ = plan_for_spec(spec.model, spec.train)
    except PlanError as e:
        print(f"run --pool: {e}", file=sys.stderr)
        return EXIT_INVALID
    if plan.gpu_class is None:
        print(f"run --pool: not queued: {plan.gpu_class_why}", file=sys.stderr)
        return EXIT_INVALID
    home = start_environment()
    if home is None:
        return EXIT_FAILED
    from prefect.deployments import run_deployment

    flow_run = run_deployment(POOL_DEPLOYMENT, parameters={"config": str(rel), "overrides": overrides},
                              work_queue_name=plan.gpu_class, timeout=0)
    print(f"queued {spec.name} on {plan.gpu_class} (the smallest GPU class its plan fits): flow run {flow_run.id} "
          f"({flow_run.name}) of {POOL_DEPLOYMENT}")
    return EXIT_OK


def run_config(config: Path, overrides: list[str]) -> int:
    """Validate (before any heavy import: bad input costs nothing), then hand the validated spec to the
    finetune flow: the config is parsed once, here."""
    spec = load_spec(config.resolve(), overrides)
    from gauntlet.eval.engine import engine_modules

    home = start_environment(preload=("gauntlet.flows.finetune", *engine_modules(spec.eval)))
    if home is None:
        return EXIT_FAILED
    from gauntlet.flows.finetune import finetune_spec
    from gauntlet.state import gauntlet_home

    started = time.time()
    try:
        summary = finetune_spec(spec=spec)
    except Exception as e:  # the flow run is marked failed by Prefect; say why, briefly
        print(f"\nrun FAILED: {type(e).__name__}: {e}", file=sys.stderr)
        return EXIT_FAILED
    print("\n" + summary.markdown())
    print(f"\nfinished in {time.time() - started:.1f}s")
    print("\nWhere to look:")
    print(f"  MLflow run {summary.mlflow_run_id}: mlflow ui --backend-store-uri {summary.tracking_uri}")
    print(f"  Prefect flow runs: PREFECT_HOME={home / 'prefect'} prefect server start  (then the UI)")
    print(f"  state folder: {gauntlet_home()}")
    return EXIT_OK


def run(args: argparse.Namespace) -> int:
    if args.pool:
        return queue_on_pool(Path(args.config).resolve(), args.overrides)
    return run_config(Path(args.config), args.overrides)
