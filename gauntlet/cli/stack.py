"""``gauntlet stack``: the team's servers (PostgreSQL, Redis, an S3 object store, Prefect, MLflow) on this machine."""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path

from gauntlet.cli.common import EXIT_FAILED, EXIT_OK


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("stack", help="the team's servers on this machine (PostgreSQL, Redis, S3, Prefect, MLflow)",
                       description="Start the servers a team's Gauntlet shares, with their data in DIR: PostgreSQL "
                                   "(Prefect's and MLflow's databases), Redis (Prefect's concurrency leases), an "
                                   "S3-compatible object store (rclone serve s3: MLflow artifacts, the DVC remote, "
                                   "Prefect results), the Prefect server and the MLflow server. `env` prints what a "
                                   "host exports to join (then `gauntlet worker`). For trials and tests; production "
                                   "points the same variables at managed services (docs/scale.md).")
    p.add_argument("action", choices=("start", "env"), help="start: run the servers until Ctrl-C; env: print the "
                                                             "exports a host needs")
    p.add_argument("dir", type=Path, help="the stack's folder (databases, objects, logs, credentials.json)")
    p.add_argument("--bind", default="127.0.0.1", help="address the servers listen on (0.0.0.0: all; default "
                                                       "127.0.0.1)")
    p.add_argument("--advertise", help="address hosts reach the servers at (default: --bind)")
    for name, default in (("postgres", 15432), ("redis", 16379), ("s3", 19000), ("prefect", 14200),
                          ("mlflow", 15000)):
        p.add_argument(f"--{name}-port", type=int, default=default, help=f"{name} port (default {default})")
    return p


def spec_of(args: argparse.Namespace):
    from gauntlet.stack import StackPorts, StackSpec

    ports = StackPorts(postgres=args.postgres_port, redis=args.redis_port, s3=args.s3_port,
                       prefect=args.prefect_port, mlflow=args.mlflow_port)
    return StackSpec(root=args.dir.resolve(), bind=args.bind, advertise=args.advertise, ports=ports)


def run(args: argparse.Namespace) -> int:
    from gauntlet.serve import ServeError
    from gauntlet.stack import environment_lines, start_stack

    spec = spec_of(args)
    if args.action == "env":
        print("\n".join(environment_lines(spec)))
        print("# and once per project checkout: dvc remote add --local -d team s3://gauntlet/dvc")
        return EXIT_OK
    try:
        stack = start_stack(spec)
    except ServeError as e:
        print(f"gauntlet stack: {e}", file=sys.stderr)
        return EXIT_FAILED
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    print("\nThe team stack is up (Ctrl-C stops it). A host joins with:\n  " +
          "\n  ".join(environment_lines(spec)) +
          "\n  dvc remote add --local -d team s3://gauntlet/dvc   # once per project checkout"
          "\n  gauntlet worker --gpu 0\nREADY", flush=True)
    try:
        while all(s.process.poll() is None for s in stack.services.values()):
            time.sleep(1)
        gone = [s for s in stack.services.values() if s.process.poll() is not None]
        print(f"{gone[0].name} exited; stopping the others. Last lines of {gone[0].log_path}:\n{gone[0].log_tail()}",
              file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return EXIT_OK
    finally:
        stack.stop()
