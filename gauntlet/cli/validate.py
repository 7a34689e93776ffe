"""``gauntlet validate CONFIG``: check a run or leaderboard config; every problem with its YAML path."""

from __future__ import annotations

import argparse
from pathlib import Path

from gauntlet.cli.common import EXIT_OK, add_config
from gauntlet.config.load import config_kind, load_leaderboard_spec, load_spec


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("validate", help="check a config and print every problem with its YAML path",
                       description="Validate a run config (or a leaderboard config) without running anything. "
                                   "Exit 2 if invalid.")
    add_config(p, "run or leaderboard config")
    return p


def run(args: argparse.Namespace) -> int:
    path = Path(args.config).resolve()
    if config_kind(path) == "leaderboard":
        board = load_leaderboard_spec(path, args.overrides)
        print(f"{args.config}: valid leaderboard config ({len(board.candidates)} candidates)")
        return EXIT_OK
    spec = load_spec(path, args.overrides)
    print(f"{args.config}: valid (config hash {spec.config_hash()[:12]})")
    return EXIT_OK
