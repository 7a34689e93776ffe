"""The device this process computes on, and where it runs: one answer for every GPU stage.

A pool worker owns its GPUs and starts every flow run with only them visible (``CUDA_VISIBLE_DEVICES``, set by
``gauntlet worker``), so the first visible device *is* the worker's GPU; every stage takes its device from
:func:`torch_device` instead of naming one. :func:`placement` says for the record (a leaderboard row, a report)
which host, worker and GPU a job ran on.
"""

from __future__ import annotations

import os
import socket


def torch_device() -> str:
    """``cuda:0`` (the first GPU this process may use: the worker's own) or ``cpu``."""
    import torch

    return "cuda:0" if torch.cuda.is_available() else "cpu"


def is_cuda(device: str) -> bool:
    return device.startswith("cuda")


def device_name(device: str | None = None) -> str:
    """The GPU's name with its index on the host (``NVIDIA H100 80GB HBM3 #3``), or the CPU cores a CPU worker
    is held to (``cpu cores 0``)."""
    device = device or torch_device()
    if is_cuda(device):
        import torch

        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
        index = visible.split(",")[0] if visible else "0"
        return f"{torch.cuda.get_device_name(0)} #{index}"
    cores = os.environ.get("GAUNTLET_CPU_CORES") or ",".join(map(str, sorted(os.sched_getaffinity(0))))
    return f"cpu cores {cores}"


def placement() -> dict[str, str]:
    """Where this process runs: host, worker (``gauntlet worker``'s name, or ``local``) and device."""
    return {"host": socket.gethostname(), "worker": os.environ.get("GAUNTLET_WORKER", "local"),
            "gpu": device_name()}
