"""``gauntlet gc``: free stage outputs, Prefect results and cached models nobody needs."""

from __future__ import annotations

import argparse

from gauntlet.cli.common import EXIT_OK


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("gc", help="free stage outputs, Prefect results and cached models nobody needs",
                       description="Remove what no registered version and no run within --keep-days needs. "
                                   "Removing is safe: a later run recomputes what it misses.")
    p.add_argument("--dry-run", action="store_true", help="list what would be removed and how much it frees")
    p.add_argument("--keep-days", type=float, default=7.0, help="keep outputs used within this many days (7)")
    return p


def run(args: argparse.Namespace) -> int:
    from gauntlet.gc import apply_gc, plan_gc
    from gauntlet.state import configure_environment

    configure_environment()
    plan = plan_gc(keep_days=args.keep_days)
    for item in plan.remove:
        print(f"{'would remove' if args.dry_run else 'removing'}  {item.bytes / 1e6:10.1f} MB  {item.path}  "
              f"({item.reason})")
    for item in plan.keep:
        print(f"keeping         {item.bytes / 1e6:10.1f} MB  {item.path}  ({item.reason})")
    freed = plan.freed_bytes if args.dry_run else apply_gc(plan, f"gauntlet gc --keep-days {args.keep_days:g}")
    print(f"{'would free' if args.dry_run else 'freed'} {freed / 1e6:.1f} MB in {len(plan.remove)} item(s)")
    return EXIT_OK
