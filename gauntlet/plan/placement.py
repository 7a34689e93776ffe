"""Size-matched placement: the GPU class a job needs, and so the work queue it goes to.

A pool's GPU workers listen on the work queues of the classes their GPUs can hold (``gauntlet worker``): a worker
owning one 80 GiB GPU serves ``gpu-80g`` and ``gpu-24g``; one owning eight serves ``gpu-8x80g`` too. A training
job needs the smallest class on which the planner's estimate fits under some launch profile; an evaluation job
the smallest that holds its weights with room for the KV cache and activations. A job that fits no class is
refused before it queues, naming what it needs.
"""

from __future__ import annotations

from dataclasses import dataclass

from gauntlet.plan.memory import GIB, check_training_memory, declared_devices
from gauntlet.plan.shape import ModelShape

INFERENCE_OVERHEAD = 1.3      # weights x this: KV cache, activations and the engine's own memory


@dataclass(frozen=True)
class GpuClass:
    name: str
    gpus: int
    memory_gib: float         # per GPU

    def holds(self, other: GpuClass) -> bool:
        """A worker of this class can run a job of ``other``'s."""
        return self.gpus >= other.gpus and self.memory_gib >= other.memory_gib


CLASSES = (GpuClass("gpu-24g", 1, 24), GpuClass("gpu-80g", 1, 80), GpuClass("gpu-8x80g", 8, 80))


class PlacementError(ValueError):
    """A job no GPU class of the pool can hold: the message says what it needs."""


def class_named(name: str) -> GpuClass:
    for c in CLASSES:
        if c.name == name:
            return c
    raise PlacementError(f"unknown GPU class {name!r}; the pool's classes are {', '.join(c.name for c in CLASSES)}")


def classes_of_worker(gpus: int, memory_gib: float) -> list[GpuClass]:
    """The classes a worker owning ``gpus`` GPUs of ``memory_gib`` each serves (the queues it listens on)."""
    mine = GpuClass("worker", gpus, memory_gib)
    return [c for c in CLASSES if mine.holds(c)]


def class_for_training(shape: ModelShape, train) -> GpuClass:
    """The smallest class on which the training's memory estimate fits (``train``: a TrainSpec)."""
    for c in CLASSES:
        spec = train.model_copy(update={"accelerate": train.accelerate.model_copy(
            update={"num_processes": min(c.gpus, max(1, train.accelerate.num_processes))})})
        _, fits, _ = check_training_memory(shape, spec, declared_devices(c.gpus, c.memory_gib))
        if fits:
            return c
    _, _, why = check_training_memory(shape, train, declared_devices(CLASSES[-1].gpus, CLASSES[-1].memory_gib))
    raise PlacementError(f"no GPU class of the pool holds this training ({why}). Fix: use train.method qlora, "
                         "a smaller batch_size or max_seq_len, or add a larger class to the pool")


def class_for_inference(params_b: float, bytes_per_param: float = 2.0) -> GpuClass:
    """The smallest class holding ``params_b`` billion parameters (bf16 by default) for evaluation."""
    need_gib = params_b * 1e9 * bytes_per_param * INFERENCE_OVERHEAD / GIB
    for c in CLASSES:
        if need_gib <= c.gpus * c.memory_gib:
            return c
    raise PlacementError(f"evaluating {params_b:.1f}B parameters needs about {need_gib:.0f} GiB of GPU memory, more "
                         f"than the largest class ({CLASSES[-1].name}) holds. Fix: quantize it first, or add a class")
