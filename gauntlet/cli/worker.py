"""``gauntlet worker``: this host joins the team's GPU pool, one worker per GPU."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

from gauntlet.cli.common import EXIT_FAILED, EXIT_INVALID


def add_parser(sub) -> argparse.ArgumentParser:
    from gauntlet.worker import POOL, SERVING_POOL

    p = sub.add_parser("worker", help="join the team's GPU pool: one Prefect worker owning the GPUs given",
                       description="Start a Prefect worker of the pool that owns the GPUs given: every flow run it "
                                   "starts sees only them. It listens on the work queues of the GPU classes its GPUs "
                                   "hold (gpu-24g, gpu-80g, gpu-8x80g), runs one flow run at a time and keeps this "
                                   "host's copies in $GAUNTLET_HOME. It needs the servers' addresses and the object "
                                   "store's credentials in the environment (`gauntlet stack env` prints them) and "
                                   "refuses to start, naming the fix, with any host-local state: a sqlite MLflow, "
                                   "an ephemeral Prefect, no object store, or a DVC remote only this host sees. "
                                   "With --serving it joins the serving pool instead: the deploy flow runs here, "
                                   "and the routers and model servers it starts serve from this host.")
    p.add_argument("--pool", default=None, help=f"the work pool (default {POOL}; {SERVING_POOL} with --serving)")
    p.add_argument("--gpu", default="", help="CUDA device indices this worker owns, e.g. 0 or 0,1,2,3,4,5,6,7")
    p.add_argument("--cpu-cores", default="", help="cores its flow runs are held to, e.g. 0 (a CPU worker: tests, "
                                                   "benchmarks); with no --gpu, give --queue too")
    p.add_argument("--gpu-memory", type=float, default=None, help="GiB per GPU (default: measured)")
    p.add_argument("--queue", action="append", default=[], help="listen on this queue only (repeatable; default: "
                                                                "every class the GPUs hold)")
    p.add_argument("--name", help="the worker's name (default HOST-gpuN)")
    p.add_argument("--serving", action="store_true", help="join the serving pool instead: this host runs the deploy "
                                                          "flow and serves the models (routers, model servers); "
                                                          "with --gpu for vllm")
    return p


def run(args: argparse.Namespace) -> int:
    from gauntlet.project import project_root
    from gauntlet.state import configure_environment
    from gauntlet.worker import (
        POOL,
        SERVING_POOL,
        WorkerSpec,
        check_devices,
        hold_to_cores,
        refusals,
        worker_command,
        worker_environment,
        worker_queues,
    )

    spec = WorkerSpec(pool=args.pool or (SERVING_POOL if args.serving else POOL),
                      gpus=tuple(g for g in args.gpu.split(",") if g),
                      cpu_cores=tuple(int(c) for c in args.cpu_cores.split(",") if c),
                      gpu_memory_gib=args.gpu_memory, queues=tuple(args.queue), name=args.name, serving=args.serving)
    if args.serving and args.queue:
        print("gauntlet worker: --queue does not apply with --serving (the serving pool has one queue); drop it",
              file=sys.stderr)
        return EXIT_INVALID
    configure_environment()
    project = project_root()
    problems = refusals(dict(os.environ), project) + check_devices(spec)
    if problems:
        print("gauntlet worker: this host cannot join the pool:\n- " + "\n- ".join(problems), file=sys.stderr)
        return EXIT_INVALID
    from gauntlet.serve import prepare_pool

    queues = worker_queues(spec)
    block = prepare_pool(spec.pool, queues, os.environ["GAUNTLET_STORE"])
    env = worker_environment(spec, dict(os.environ), project, block)
    print(f"gauntlet worker {spec.worker_name}: pool {spec.pool}, queues {', '.join(queues)}, "
          f"GPUs {','.join(spec.gpus) or 'none'}, state {os.environ['GAUNTLET_HOME']}", flush=True)
    worker = subprocess.Popen(worker_command(spec, queues), env=env, cwd=os.environ["GAUNTLET_HOME"],
                              preexec_fn=hold_to_cores(spec.cpu_cores))
    try:
        return worker.wait()
    except KeyboardInterrupt:
        worker.terminate()
        worker.wait(30)
        return EXIT_FAILED
