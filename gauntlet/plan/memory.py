"""Memory planning before launching: will a training run fit, and under which launch profile?

From the model's shape (:mod:`gauntlet.plan.shape`: its ``config.json`` alone, no weights) the planner
estimates the peak memory of one training process, term by term, under each launch profile in
``deployments/accelerate/`` and compares it with the visible devices.

The estimate, per process (``n`` processes; ``c`` = compute bytes: 2 for bf16 on a GPU, 4 on the CPU):

=====================  ==========================================================================
weights                qlora: quantized linear weights at NF4 with double quantization
                       (0.5 + 1/64 + 4/16384 bytes each) + every other parameter at 4 bytes
                       (``prepare_model_for_kbit_training`` upcasts them), or at ``c`` under
                       sharding profiles (bf16 storage); lora/full: every parameter at ``c``.
                       ZeRO-3/FSDP: / n. Parameter offload: two decoder layers stay on the GPU.
LoRA adapters          trainable adapter parameters at 4 bytes (PEFT keeps them in fp32; DeepSpeed
                       casts them to bf16: 2); ZeRO-3/FSDP: / n.
gradients              one per trainable parameter, in its dtype; ZeRO-2/3 and FSDP: / n;
                       DDP: x 2 (its reduction buckets hold a copy).
optimizer state        AdamW's two moments in the parameter dtype; DeepSpeed: fp32 master copy +
                       moments = 12 bytes; ZeRO-1+ and FSDP: / n; optimizer offload: on the host.
activations            per token per decoder layer, (6h + 2kv + 4i) values kept for the backward
                       pass (norm inputs/outputs, q/k/v, attention output, the MLP's gate, up,
                       activation and product); with checkpointing only each layer's input (h)
                       plus one layer recomputed at a time. tokens = batch_size x max_seq_len.
                       At ``c`` bytes, except QLoRA with its weights unsharded: there
                       ``prepare_model_for_kbit_training`` upcasts the norms and embeddings to fp32,
                       which makes the residual stream fp32 (4 bytes; measured on an H200: 2x the
                       bf16 figure).
logits                 12 bytes per logit (measured on an H200 with a 128k vocabulary: the logits and
                       their gradient in bf16, and both again in fp32 for the loss) for
                       LOSS_CHUNK_TOKENS tokens at a time: the trainer computes the loss in chunks
                       (gauntlet.programs.trainer.ChunkedLoss); ZeRO-3/FSDP, which cannot, hold every
                       token's logits at once. Plus the final hidden states the chunks read.
runtime overhead       1 GiB: CUDA context, cuBLAS/NCCL workspaces (on the CPU: the interpreter).
allocator slack        10% of the above (fragmentation).
=====================  ==========================================================================

It is an estimate, for deciding between profiles before renting machines: measured peaks are
recorded beside it in ``benchmarks/RESULTS.md`` where a GPU was available.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml

from gauntlet.config.train import TrainSpec
from gauntlet.plan.shape import (
    ModelShape,
    PlanError,
    lora_param_count,
)
from gauntlet.project import project_root

ACCELERATE_DIR = "deployments/accelerate"     # launch profiles, in the project
GIB = 1024**3
# NF4 (4 bits) + double quantization: an 8-bit absmax per 64 weights, an fp32 absmax per 256 blocks
QLORA_BYTES_PER_WEIGHT = 0.5 + 1 / 64 + 4 / (64 * 256)
RUNTIME_OVERHEAD = 1 * GIB
SLACK = 0.10
# the order in which `plan` recommends profiles: least communication first
PREFERENCE = ("single_gpu", "multi_gpu", "deepspeed_zero2", "fsdp", "deepspeed_zero3_offload")
BATCH_CHOICES = (1, 2, 4, 8, 16, 32, 64, 128)   # micro-batches `plan` tries when it proposes one
LOSS_CHUNK_TOKENS = 4096   # tokens whose logits exist at once (passed to the trainer, which computes the loss so)
LOGIT_BYTES = 12           # per logit at the loss's peak; see the module docstring


# ---------------------------------------------------------------------------------------------
# launch profiles
# ---------------------------------------------------------------------------------------------


ProfileKind = Literal["single", "ddp", "deepspeed", "fsdp"]
# accelerate's distributed_type -> the planner's kind
DISTRIBUTED_KINDS: dict[str, ProfileKind] = {"NO": "single", "MULTI_GPU": "ddp", "DEEPSPEED": "deepspeed", "FSDP": "fsdp"}


@dataclass(frozen=True)
class Profile:
    name: str
    kind: ProfileKind
    zero_stage: int = 0
    offload_optimizer: bool = False
    offload_params: bool = False

    @property
    def shards_weights(self) -> bool:
        return self.kind == "fsdp" or (self.kind == "deepspeed" and self.zero_stage == 3)


PLAIN = Profile("(none)", "single")


def read_profile(path: Path) -> Profile:
    raw = yaml.safe_load(path.read_text()) or {}
    kind = DISTRIBUTED_KINDS.get(str(raw.get("distributed_type", "NO")))
    if kind is None:
        raise PlanError(f"{path}: distributed_type {raw.get('distributed_type')!r} is not one the planner knows "
                        "(NO, MULTI_GPU, DEEPSPEED, FSDP)")
    ds = raw.get("deepspeed_config") or {}
    fsdp = raw.get("fsdp_config") or {}
    return Profile(name=path.stem, kind=kind, zero_stage=int(ds.get("zero_stage", 0)),
                   offload_optimizer=ds.get("offload_optimizer_device", "none") not in ("none", None)
                   or bool(fsdp.get("fsdp_offload_params")),
                   offload_params=ds.get("offload_param_device", "none") not in ("none", None)
                   or bool(fsdp.get("fsdp_offload_params")))


def accelerate_configs() -> Path:
    """The folder of accelerate launch profiles (``deployments/accelerate`` in the project)."""
    return project_root() / ACCELERATE_DIR


def launch_profiles() -> dict[str, Profile]:
    found = {p.stem: read_profile(p) for p in sorted(accelerate_configs().glob("*.yaml"))}
    return {**{k: found[k] for k in PREFERENCE if k in found}, **found}


def profile_named(name: str | None) -> Profile:
    if name is None:
        return PLAIN
    profiles = launch_profiles()
    if name not in profiles:
        raise PlanError(f"train.accelerate.profile {name!r}: no {accelerate_configs() / (name + '.yaml')}; "
                        f"profiles: {sorted(profiles)}")
    return profiles[name]


# ---------------------------------------------------------------------------------------------
# the estimate
# ---------------------------------------------------------------------------------------------


@dataclass
class Estimate:
    profile: str
    processes: int
    device: Literal["cuda", "cpu"]
    gradient_checkpointing: bool
    terms: dict[str, float]          # bytes per process, display order
    activations_checkpointed: float
    activations_full: float
    host_offload: float              # bytes per process that offloading keeps in host memory
    trainable_params: int

    @property
    def total(self) -> float:
        return sum(self.terms.values())

    def as_dict(self) -> dict:
        return {"profile": self.profile, "processes": self.processes, "device": self.device,
                "gradient_checkpointing": self.gradient_checkpointing, "trainable_params": self.trainable_params,
                "terms_gib": {k: v / GIB for k, v in self.terms.items()}, "total_gib": self.total / GIB,
                "activations_checkpointed_gib": self.activations_checkpointed / GIB,
                "activations_full_gib": self.activations_full / GIB, "host_offload_gib": self.host_offload / GIB}


def estimate(shape: ModelShape, train: TrainSpec, profile: Profile, processes: int,
             device: Literal["cuda", "cpu"] = "cuda") -> Estimate:
    """Peak memory of one training process (see the module docstring for each term)."""
    n = 1 if profile.kind == "single" else max(processes, 1)
    c = 2 if device == "cuda" else 4
    ds = profile.kind == "deepspeed"
    checkpointing = train.gradient_checkpointing if train.gradient_checkpointing is not None else device == "cuda"
    host = 0.0

    if train.method == "qlora":
        other_bytes = c if profile.shards_weights else 4
        weights = shape.linear_params * QLORA_BYTES_PER_WEIGHT + shape.other_params * other_bytes
    else:
        weights = shape.total_params * c
    if profile.offload_params:
        host += weights / n
        weights = 2 * weights / max(shape.num_layers, 1)   # the gathered working set: ~two decoder layers
    elif profile.shards_weights:
        weights /= n

    lora_params = lora_param_count(shape, train) if train.method != "full" else 0
    trainable = lora_params if train.method != "full" else shape.total_params
    adapter_bytes = 2 if ds and device == "cuda" else 4
    adapters = lora_params * adapter_bytes / (n if profile.shards_weights else 1)
    if profile.offload_params:
        host += adapters
        adapters = 0.0

    grad_bytes = adapter_bytes if train.method != "full" else c
    gradients: float = trainable * grad_bytes
    if profile.kind == "fsdp" or (ds and profile.zero_stage >= 2):
        gradients /= n
    elif profile.kind == "ddp":
        gradients *= 2

    if ds:
        optimizer = trainable * 12 / (n if profile.zero_stage >= 1 else 1)
    else:
        optimizer = trainable * 2 * grad_bytes / (n if profile.kind == "fsdp" else 1)
    if profile.offload_optimizer:
        host += optimizer
        optimizer = 0.0

    tokens = train.batch_size * train.max_seq_len
    a = 4 if train.method == "qlora" and not profile.shards_weights else c   # the residual stream's bytes
    per_layer = tokens * (6 * shape.hidden_size + 2 * shape.kv_size + 4 * shape.intermediate_size) * a
    act_full = shape.num_layers * per_layer
    act_ckpt = shape.num_layers * tokens * shape.hidden_size * a + per_layer
    chunked = not profile.shards_weights
    logits = (min(tokens, LOSS_CHUNK_TOKENS) if chunked else tokens) * shape.vocab_size * LOGIT_BYTES
    if chunked:
        logits += tokens * shape.hidden_size * a    # the final hidden states the chunks read

    terms = {"weights": weights, "LoRA adapters": adapters, "gradients": gradients, "optimizer state": optimizer,
             "activations": act_ckpt if checkpointing else act_full, "logits": logits,
             "runtime overhead": float(RUNTIME_OVERHEAD)}
    terms["allocator slack (10%)"] = SLACK * sum(terms.values())
    return Estimate(profile=profile.name, processes=n, device=device, gradient_checkpointing=checkpointing,
                    terms=terms, activations_checkpointed=act_ckpt, activations_full=act_full, host_offload=host,
                    trainable_params=trainable)


# ---------------------------------------------------------------------------------------------
# devices and verdicts
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Devices:
    kind: Literal["cuda", "cpu"]
    count: int
    memory: float            # bytes per device (the smallest GPU), or host memory available (CPU)
    description: str


def visible_devices() -> Devices:
    import torch

    if torch.cuda.is_available() and torch.cuda.device_count():
        props = [torch.cuda.get_device_properties(i) for i in range(torch.cuda.device_count())]
        smallest = min(p.total_memory for p in props)
        names = sorted({p.name for p in props})
        return Devices("cuda", len(props), float(smallest),
                       f"{len(props)} x {'/'.join(names)} ({smallest / GIB:.1f} GiB each)")
    return host_memory("no CUDA device")


def host_memory(why: str = "CPU run") -> Devices:
    import psutil

    available = psutil.virtual_memory().available
    return Devices("cpu", 1, float(available), f"{why}; host memory available {available / GIB:.1f} GiB")


def declared_devices(gpus: int, gpu_memory_gib: float) -> Devices:
    return Devices("cuda", gpus, gpu_memory_gib * GIB, f"{gpus} x GPU with {gpu_memory_gib:g} GiB (declared)")


def verdict(est: Estimate, devices: Devices, machines: int = 1) -> tuple[bool, str]:
    """(fits, why) for one estimate on the given devices (per machine)."""
    if devices.kind == "cpu":
        need = est.total * est.processes / machines + est.host_offload * est.processes / machines
        ok = need <= devices.memory
        return ok, (f"needs {need / GIB:.1f} GiB of host memory, {devices.memory / GIB:.1f} GiB available"
                    if not ok else "fits in host memory")
    per_machine = math.ceil(est.processes / machines)
    if per_machine > devices.count:
        return False, f"needs {per_machine} GPUs per machine, {devices.count} visible"
    if est.total > devices.memory:
        return False, f"needs {est.total / GIB:.1f} GiB per GPU, has {devices.memory / GIB:.1f} GiB"
    return True, f"fits ({est.total / GIB:.1f} of {devices.memory / GIB:.1f} GiB per GPU)"


def describe(est: Estimate) -> str:
    terms = ", ".join(f"{k} {v / GIB:.2f}" for k, v in est.terms.items() if v)
    host = f"; offloaded to host {est.host_offload / GIB:.2f} GiB" if est.host_offload else ""
    return f"{est.total / GIB:.2f} GiB per process ({terms} GiB{host})"


def check_training_memory(shape: ModelShape, train: TrainSpec, devices: Devices) -> tuple[Estimate, bool, str]:
    """The configured run against the devices it will run on: (estimate, fits, explanation)."""
    acc = train.accelerate
    n = acc.num_processes * acc.num_machines
    est = estimate(shape, train, profile_named(acc.profile), n, devices.kind)
    ok, why = verdict(est, devices, acc.num_machines)
    if ok:
        return est, True, f"memory plan: {describe(est)}; {why}"
    alternatives = []
    if devices.kind == "cuda":
        for p in launch_profiles().values():
            procs = 1 if p.kind == "single" else devices.count * acc.num_machines
            if procs < 2 and p.kind != "single":
                continue
            alt = estimate(shape, train, p, procs, "cuda")
            if verdict(alt, devices, acc.num_machines)[0]:
                alternatives.append(f"train.accelerate.profile={p.name} train.accelerate.num_processes={procs}")
    tips = [f"--set {a}" for a in alternatives[:2]]
    tips += ["lower train.batch_size or train.max_seq_len"]
    if not est.gradient_checkpointing:
        tips.append("set train.gradient_checkpointing=true")
    if train.method != "qlora":
        tips.append("use train.method=qlora")
    return est, False, (
        f"the training run does not fit: {why} under profile {est.profile} x {est.processes} "
        f"({describe(est)}) on {devices.description}.\nFix: " + "; or ".join(tips)
        + ". (train.memory_check=warn launches anyway.)")


def largest_batch(shape: ModelShape, train: TrainSpec, devices: Devices) -> int | None:
    """The largest micro-batch of :data:`BATCH_CHOICES` whose estimate fits the configured profile on
    ``devices`` (the memory grows with the batch, so the first that does not fit ends the search); None
    when not even 1 fits, or there is no GPU to compare with."""
    if devices.kind != "cuda":
        return None
    acc = train.accelerate
    profile = profile_named(acc.profile)
    best = None
    for batch in BATCH_CHOICES:
        est = estimate(shape, train.model_copy(update={"batch_size": batch}), profile,
                       acc.num_processes * acc.num_machines, "cuda")
        if not verdict(est, devices, acc.num_machines)[0]:
            break
        best = batch
    return best
