"""``gauntlet leaderboard [CONFIG]``: rank every candidate × variant once; publish leaderboard.{json,md,html}."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gauntlet.cli.common import EXIT_FAILED, EXIT_INVALID, EXIT_OK, add_overrides, start_environment
from gauntlet.config.load import load_leaderboard_spec

DEFAULT_CONFIG = "configs/leaderboard.yaml"


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("leaderboard", help="run the leaderboard flow once (configs/leaderboard.yaml by default)",
                       description="Evaluate every candidate x variant of a leaderboard config with the cached "
                                   "fetch/quantize/evaluate stages, rank them and publish "
                                   "leaderboard.json/.md/.html.")
    p.add_argument("config", nargs="?", default=None,
                   help=f"path of the leaderboard config (YAML; default: the project's {DEFAULT_CONFIG})")
    add_overrides(p, "eval.limit=32")
    night = p.add_argument_group("planning the night (nothing runs)")
    night.add_argument("--plan", action="store_true",
                       help="estimate the night instead of running it: minutes per candidate x variant, GPU-hours, "
                            "wall time with --gpus workers, whether --window-hours holds it (exit 1 if not)")
    night.add_argument("--gpus", type=int, default=None,
                       help="GPU workers (default: with concurrency.pool, the pool's online workers; else 1)")
    night.add_argument("--window-hours", type=float, default=8.0, help="the night's window (default 8)")
    night.add_argument("--card", default="H100", help="the GPU the costs assume: H100, H200, A100, L40S (default H100)")
    return p


def run(args: argparse.Namespace) -> int:
    from gauntlet.project import project_root

    config = Path(args.config).resolve() if args.config else project_root() / DEFAULT_CONFIG
    spec = load_leaderboard_spec(config, args.overrides)  # before any heavy import: bad input costs nothing
    if args.plan:
        return plan(spec, args)
    if start_environment(preload=("gauntlet.flows.leaderboard",)) is None:
        return EXIT_FAILED
    from gauntlet.flows.leaderboard import leaderboard
    from gauntlet.leaderboard.publish import render_markdown

    try:
        board = leaderboard(config=str(config), overrides=args.overrides)
    except Exception as e:
        print(f"\nleaderboard FAILED: {type(e).__name__}: {e}", file=sys.stderr)
        return EXIT_FAILED
    print("\n" + render_markdown(board))
    print("Published:\n" + "\n".join(f"  {path}" for path in board.files.values()))
    print(f"  MLflow run {board.mlflow_run_id} (experiment of the config's tracking section)")
    failed = [r for r in board.rows if r.status == "failed"]
    if failed:
        print(f"\n{len(failed)} candidate variant(s) failed; their reasons are on the board.", file=sys.stderr)
    return EXIT_OK


def pool_workers(spec) -> tuple[int, str]:
    """K for the plan: the online workers of the config's pool (``concurrency.pool``, on $PREFECT_API_URL), else 1."""
    import os

    pool = spec.concurrency.pool
    if not pool or not os.environ.get("PREFECT_API_URL"):
        return 1, "default; set concurrency.pool and PREFECT_API_URL to count a pool's workers"
    from gauntlet.serve import online_workers

    try:
        names = online_workers(pool)
    except Exception as e:   # the server does not answer: say so, plan for one
        return 1, f"pool {pool} not readable: {type(e).__name__}"
    return len(names), f"online in pool {pool}: {', '.join(names) or 'none'}"


def plan(spec, args: argparse.Namespace) -> int:
    """``--plan``: the night estimated from the config, with the costs past nights measured on this card kind."""
    from gauntlet.leaderboard.night_plan import CARDS, measured_costs, night_jobs, plan_night, render_night

    card = args.card.upper()
    workers, source = (args.gpus, "--gpus") if args.gpus is not None else pool_workers(spec)
    problems = ([f"--card {args.card!r}: unknown; one of {', '.join(CARDS)}"] if card not in CARDS else []) + \
        ([f"--gpus {workers}: at least 1 worker"] if workers < 1 and args.gpus is not None else []) + \
        ([f"--window-hours {args.window_hours:g}: must be above 0"] if args.window_hours <= 0 else [])
    if problems:
        print("\n".join(problems), file=sys.stderr)
        return EXIT_INVALID
    if workers < 1:
        print(f"no worker of pool {spec.concurrency.pool} is online: planning for 1", file=sys.stderr)
        workers = 1
    print(f"workers: {workers} ({source})")
    measured = {}
    try:   # earlier nights' rows, from the tracking store (a team's MLflow: the same costs on every host)
        from gauntlet.leaderboard.history import load_history
        from gauntlet.state import configure_environment
        from gauntlet.tracking import tracking_uri

        configure_environment()
        boards = load_history(tracking_uri(spec.tracking.tracking_uri), spec.tracking.experiment, spec.name,
                              spec.publish.history_nights)
        measured = measured_costs(boards, card)
    except Exception as e:  # no store, no history: every cost is assumed, and the rows say so
        print(f"(no measured costs: {type(e).__name__}: {e})", file=sys.stderr)
    night = plan_night(night_jobs(spec, measured), card, workers, args.window_hours)
    print(render_night(night))
    return EXIT_OK if night.fits else EXIT_FAILED
