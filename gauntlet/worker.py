"""``gauntlet worker``: this host joins the team's GPU pool as one Prefect worker per GPU (or, with
``--serving``, the serving pool, where the deploy flow runs and the models are served).

A worker owns its GPUs: every flow run it starts sees only them (``CUDA_VISIBLE_DEVICES``), so every GPU stage
(train, quantize, score, probe, perplexity, judge, safety) uses the worker's device, never another worker's. It
listens on the work queues of the GPU classes its GPUs can hold (:mod:`gauntlet.plan.placement`), runs one flow
run at a time, and keeps its own state folder (``$GAUNTLET_HOME``), a cache of what the servers hold.

Before it starts, :func:`refusals` names every piece of host-local state that would make this host's results
invisible to the others (a sqlite MLflow store, an ephemeral Prefect, no object store, a DVC remote that is a
folder on this host), each with its fix. No Prefect import here: the CLI sets the pool up and starts
``prefect worker start`` with :func:`worker_environment`.
"""

from __future__ import annotations

import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from gauntlet.plan.placement import CLASSES, class_named, classes_of_worker
from gauntlet.secrets import redact_uri
from gauntlet.state import shared_tracking

POOL = "gpu"
SERVING_POOL = "serving"  # where the deploy flow runs: the host that serves (its routers and model servers)
SERVING_QUEUE = "default"
HEARTBEAT_S = 30          # flow runs beat this often; one that stops is retried on another worker
QUERY_S = 5               # how often a worker asks for work


@dataclass(frozen=True)
class WorkerSpec:
    pool: str = POOL
    gpus: tuple[str, ...] = ()          # CUDA device indices this worker owns; () with cpu_cores: a CPU worker
    cpu_cores: tuple[int, ...] = ()     # cores the worker's flow runs are held to (a CPU worker, benchmarks)
    gpu_memory_gib: float | None = None # per GPU; measured when None
    queues: tuple[str, ...] = ()        # explicit queues; default: the classes the GPUs hold
    name: str | None = None
    serving: bool = False               # the serving pool (deploy flows) instead of the GPU pool

    @property
    def worker_name(self) -> str:
        what = f"gpu{'+'.join(self.gpus)}" if self.gpus else f"cpu{'+'.join(map(str, self.cpu_cores)) or 'all'}"
        what = f"serving-{what}" if self.serving else what
        return self.name or f"{socket.gethostname()}-{what}"


def dvc_remote_url(project: Path) -> tuple[str | None, str | None]:
    """(name, url) of the project's default DVC remote, as DVC reads it (``.dvc/config`` and ``config.local``)."""
    from dvc.repo import Repo

    with Repo(str(project)) as repo:
        config = repo.config
        name = config.get("core", {}).get("remote")
        return name, (config.get("remote", {}).get(name, {}).get("url") if name else None)


def _host_local(url: str) -> bool:
    scheme = urlparse(url).scheme
    return scheme in ("", "file") or len(scheme) == 1


def refusals(env: dict[str, str], project: Path) -> list[str]:
    """Why this host cannot join the pool as it is set up, each with the fix; [] when it can."""
    problems = []
    tracking = env.get("MLFLOW_TRACKING_URI", "")
    if not tracking or not shared_tracking(tracking):
        problems.append(f"MLFLOW_TRACKING_URI is {redact_uri(tracking) or 'unset (a sqlite store in $GAUNTLET_HOME)'}:"
                        " runs, the registry and stage records would stay on this host. Fix: export "
                        "MLFLOW_TRACKING_URI=http://<the team's MLflow server> (`gauntlet stack env` prints it)")
    if not env.get("PREFECT_API_URL"):
        problems.append("PREFECT_API_URL is unset: an ephemeral Prefect lives in this process only, and no other "
                        "host sees its flow runs, cache keys or locks. Fix: export PREFECT_API_URL=http://<the "
                        "team's Prefect server>/api")
    store = env.get("GAUNTLET_STORE", "")
    if not store or _host_local(store):
        problems.append(f"GAUNTLET_STORE is {store or 'unset'}: Prefect's results would stay on this host. Fix: "
                        "export GAUNTLET_STORE=s3://<bucket> with the object store's credentials "
                        "(AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY)")
    try:
        name, url = dvc_remote_url(project)
    except Exception as e:  # not a DVC repo, a config DVC cannot read
        problems.append(f"the DVC configuration of {project} cannot be read ({type(e).__name__}: {e})")
        name, url = None, None
    if url is None and name is None:
        problems.append(f"{project} has no default DVC remote: data made here would reach no other host. Fix: "
                        "`dvc remote add --local -d team s3://<bucket>/dvc`")
    elif url is not None and _host_local(url):
        problems.append(f"the default DVC remote {name!r} is {url}, a folder only this host sees. Fix: `dvc remote "
                        "add --local -d team s3://<bucket>/dvc` (a remote every host reaches)")
    return problems


def gpu_memory_gib(index: str) -> float:
    import torch

    return torch.cuda.get_device_properties(int(index)).total_memory / 1024**3


def check_devices(spec: WorkerSpec) -> list[str]:
    if not spec.gpus:
        return [] if spec.cpu_cores or spec.queues or spec.serving else [
            "no --gpu given: name the GPUs this worker owns (--gpu 0), or --cpu-cores for a CPU worker with --queue"]
    import torch

    count = torch.cuda.device_count()
    missing = [g for g in spec.gpus if not g.isdigit() or int(g) >= count]
    return [f"--gpu {','.join(missing)}: this host has {count} CUDA device(s) (0..{count - 1})"] if missing else []


def worker_queues(spec: WorkerSpec) -> list[str]:
    """The work queues the worker listens on: the serving pool's one, or the GPU classes its GPUs hold."""
    if spec.serving:
        return [SERVING_QUEUE]
    if spec.queues:
        return [class_named(q).name for q in spec.queues]
    if not spec.gpus:
        return [CLASSES[0].name]
    memory = spec.gpu_memory_gib or min(gpu_memory_gib(g) for g in spec.gpus)
    return [c.name for c in classes_of_worker(len(spec.gpus), memory)]


def worker_environment(spec: WorkerSpec, env: dict[str, str], project: Path, results_block: str) -> dict[str, str]:
    """The worker's environment, which every flow run it starts inherits."""
    out = dict(env)
    out.update({
        "GAUNTLET_PROJECT_ROOT": str(project),
        "GAUNTLET_WORKER": spec.worker_name,
        "GAUNTLET_GPUS": ",".join(spec.gpus),
        "PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK": results_block,
        "PREFECT_RESULTS_PERSIST_BY_DEFAULT": "true",
        "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(HEARTBEAT_S),
        "PREFECT_WORKER_QUERY_SECONDS": str(QUERY_S),
        "PYTHONUNBUFFERED": "1",
    })
    if spec.gpus:
        out["CUDA_VISIBLE_DEVICES"] = ",".join(spec.gpus)
    else:
        out["CUDA_VISIBLE_DEVICES"] = ""        # a CPU worker: no GPU of this host is its
    if spec.cpu_cores:
        threads = str(len(spec.cpu_cores))
        out.update({"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "GAUNTLET_CPU_CORES":
                    ",".join(map(str, spec.cpu_cores))})
    return out


def worker_command(spec: WorkerSpec, queues: list[str]) -> list[str]:
    cmd = [sys.executable, "-m", "prefect", "worker", "start", "--pool", spec.pool, "--type", "process",
           "--limit", "1", "--name", spec.worker_name]
    for q in queues:
        cmd += ["--work-queue", q]
    return cmd


def hold_to_cores(cores: tuple[int, ...]):
    """A ``preexec_fn`` that holds the worker (and every process it starts) to ``cores``."""
    if not cores:
        return None
    return lambda: os.sched_setaffinity(0, set(cores))
