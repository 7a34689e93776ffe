"""``gauntlet run CONFIG``: the finetune flow for one config (data, model, train, evaluate, gate, promote)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from gauntlet.cli.common import EXIT_FAILED, EXIT_OK, add_config, start_environment
from gauntlet.config.load import load_spec


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("run", help="run the finetune flow for one config",
                       description="Pull data, fetch the model, train, evaluate, gate and promote. Stages whose "
                                   "inputs did not change come from Prefect's cache.")
    add_config(p)
    return p


def run_config(config: Path, overrides: list[str]) -> int:
    """Validate (before any heavy import: bad input costs nothing), then run the finetune flow."""
    config = config.resolve()
    load_spec(config, overrides)
    home = start_environment()
    if home is None:
        return EXIT_FAILED
    from gauntlet.flows.finetune import finetune
    from gauntlet.state import gauntlet_home

    started = time.time()
    try:
        summary = finetune(config=str(config), overrides=overrides)
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
    return run_config(Path(args.config), args.overrides)
