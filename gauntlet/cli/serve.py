"""``gauntlet serve``: MLflow and Prefect servers, work pool, deployments and a worker on 127.0.0.1."""

from __future__ import annotations

import argparse
import os

from gauntlet.config.load import check_timezone


def add_parser(sub) -> argparse.ArgumentParser:
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
    return p


def run(args: argparse.Namespace) -> int:
    from gauntlet.serve import ServeConfig, serve

    timezone = args.timezone or os.environ.get("GAUNTLET_TIMEZONE")
    if timezone:
        check_timezone(timezone)
    return serve(ServeConfig(host=args.host, prefect_port=args.prefect_port, mlflow_port=args.mlflow_port,
                             pool=args.pool, gpu_slots=args.gpu_slots, timezone=timezone,
                             worker=not args.no_worker, deploy=not args.no_deploy))
