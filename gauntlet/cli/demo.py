"""``gauntlet demo``: configs/demo.yaml end to end on a tiny local model and synthetic DVC data; no servers."""

from __future__ import annotations

import argparse

from gauntlet.cli.common import add_overrides
from gauntlet.cli.run import run_config
from gauntlet.project import project_root


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("demo", help="run configs/demo.yaml: tiny local model, synthetic DVC data, no servers",
                       description="Build the demo's tiny model and data locally and run the whole pipeline.")
    add_overrides(p, "train.max_steps=20")
    return p


def run(args: argparse.Namespace) -> int:
    return run_config(project_root() / "configs" / "demo.yaml", args.overrides)
