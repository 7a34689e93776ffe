"""``gauntlet leaderboard [CONFIG]``: rank every candidate × variant once; publish leaderboard.{json,md,html}."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gauntlet.cli.common import EXIT_FAILED, EXIT_OK, add_overrides, start_environment
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
    return p


def run(args: argparse.Namespace) -> int:
    from gauntlet.project import project_root

    config = Path(args.config).resolve() if args.config else project_root() / DEFAULT_CONFIG
    load_leaderboard_spec(config, args.overrides)  # before any heavy import: bad input costs nothing
    if start_environment() is None:
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
