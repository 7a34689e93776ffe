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
reference model        dpo, ipo, kto only (simpo and orpo are reference-free), and only when the
                       reference is a second model: ``train.preference.reference`` another source
                       (the program loads it as ``load_base`` loads the base: 4-bit under qlora, at
                       ``c`` otherwise), or ``base`` under full (TRL's frozen copy, at ``c``). Under
                       lora/qlora the reference ``base`` is the base with the adapter disabled: no
                       term. Counted as the weights term (a reference of another source is assumed
                       of the base's shape: its config.json is not read), sharded and offloaded
                       like it (TRL prepares it with ZeRO-3/FSDP, whole under ZeRO-2 and DDP).
LoRA adapters          trainable adapter parameters at 4 bytes (PEFT keeps them in fp32; DeepSpeed
                       casts them to bf16: 2); ZeRO-3/FSDP: / n.
gradients              one per trainable parameter, in its dtype; ZeRO-2/3 and FSDP: / n;
                       DDP: x 2 (its reduction buckets hold a copy).
optimizer state        AdamW's two moments in the parameter dtype; DeepSpeed: fp32 master copy +
                       moments = 12 bytes; ZeRO-1+ and FSDP: / n; optimizer offload: on the host.
activations            per token per decoder layer, (6h + 2kv + 4i) values kept for the backward
                       pass (norm inputs/outputs, q/k/v, attention output, the MLP's gate, up,
                       activation and product); with checkpointing only each layer's input (h)
                       plus one layer recomputed at a time. tokens = batch_size x max_seq_len x the
                       sequences per row: 2 for dpo, ipo, simpo, orpo (TRL concatenates chosen and
                       rejected into one forward pass), 1 for sft and kto. The reference's pass
                       (no_grad, after the policy's forward) keeps nothing: one layer's values at a
                       time, less than the recomputed layer with checkpointing, one more layer
                       without. KTO's mismatched KL batch (loss kto, not apo_zero_unpaired) is no_grad
                       too: through the policy before its forward, through the reference after it.
                       At ``c`` bytes, except QLoRA with its weights unsharded: there
                       ``prepare_model_for_kbit_training`` upcasts the norms and embeddings to fp32,
                       which makes the residual stream fp32 (``a`` = 4 bytes; measured on an H200: 2x
                       the bf16 figure).
logits                 sft: 12 bytes per logit (measured on an H200 with a 128k vocabulary: the logits
                       and their gradient in bf16, and both again in fp32 for the loss) for
                       LOSS_CHUNK_TOKENS tokens at a time: the trainer computes the loss in chunks
                       (gauntlet.programs.trainer.ChunkedLoss); ZeRO-3/FSDP, which cannot, hold every
                       token's logits at once. Plus the final hidden states the chunks read.
                       dpo, ipo, kto: TRL's fused LM head (``add_fused_lm_head``) never holds the
                       logits: one [4096 tokens x 32768] tile buffer at ``c`` (allocated whole, however
                       small the vocabulary), forward or backward; on the CPU (no Triton) 8 fp32
                       temporaries of a tile's size (measured: 7.2); under QLoRA unsharded a ``c`` copy
                       of a 32768-row slice of its fp32 head; the final hidden states and the kernel's
                       copy of them (2a per token and h) with, the larger of, their fp32 gradient (4;
                       + a, its cast back, when a is 2) or the reference pass's own two (2a); under
                       full, the head's gradient accumulated in fp32 (4 per head weight). The
                       reference's tiles come after the policy's forward tile is freed: they never
                       coexist.
                       simpo, orpo: TRL's CPO/ORPO trainers take the model's full logits (``c`` bytes,
                       2 x batch_size x max_seq_len x vocab) and ``selective_log_softmax``: at the
                       loss's backward 3 (simpo) and 3.5 (orpo, its chosen half's cross-entropy) times
                       the logits' size, measured on the CPU (fp32; torch's memory timeline, TRL 1.16's
                       own ``get_batch_logps``); the GPU's Triton kernel should hold less (by its code:
                       about 2 and 3), counted at the CPU's figures until measured. Plus the final
                       hidden states the head reads. No chunking under any profile.
runtime overhead       1 GiB: CUDA context, cuBLAS/NCCL workspaces (on the CPU: the interpreter).
allocator slack        10% of the above (fragmentation).
=====================  ==========================================================================

The preference terms follow TRL 1.16's code (``DPOTrainer``, ``KTOTrainer``, ``experimental.cpo`` and
``experimental.orpo``) and are not yet checked against a measured GPU run.

It is an estimate, for deciding between profiles before renting machines: measured peaks are
recorded beside it in ``benchmarks/RESULTS.md`` where a GPU was available.

Long: this table is the estimate's specification, and the terms' code stays in the one module beside it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml

from gauntlet.config.train import REFERENCE_FREE, TrainSpec
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


# The objective's passes, as TRL 1.16's trainers run them (``gauntlet/programs/preference_trainer.py``)
PAIRED = ("dpo", "ipo", "simpo", "orpo")     # chosen and rejected concatenated into one forward pass
FUSED_HEAD = ("dpo", "ipo", "kto")           # DPOTrainer/KTOTrainer: log-probs through TRL's fused LM head
FUSED_TILE_TOKENS = 4096                     # trl/kernels/chunked_logprob.py TOKEN_CHUNK_SIZE
FUSED_TILE_VOCAB = 32768                     # trl/trainer/utils.py _CHUNKED_LOGPROB_CHUNK_SIZE
FUSED_TILE_TEMPORARIES = 8                   # fp32 tile-sized temporaries of its torch fallback (CPU; measured 7.2)
FULL_LOGIT_VALUES = {"simpo": 3.0, "orpo": 3.5}   # logits' sizes at the loss's peak (measured on the CPU)


@dataclass(frozen=True)
class Passes:
    """What one micro-batch runs under ``train.objective``. ``reference``: none (sft, simpo, orpo), adapter (the
    base with the adapter disabled), copy (TRL's frozen copy of the base, under full) or model (the source
    ``train.preference.reference`` names, loaded beside the base)."""
    objective: str
    sequences: int                       # per row, in the pass that keeps activations (2: chosen + rejected)
    reference: Literal["none", "adapter", "copy", "model"]
    reference_source: str | None         # the model source, for "model"
    kl_pass: bool                        # KTO's mismatched batch: no_grad, through the policy and the reference
    loss: Literal["chunked", "fused", "full"]   # Gauntlet's chunked loss (sft), TRL's fused head, full logits

    def as_dict(self) -> dict:
        return {"sequences_per_row": self.sequences, "reference": self.reference,
                "reference_source": self.reference_source, "kl_pass": self.kl_pass, "loss": self.loss}


def passes(train: TrainSpec) -> Passes:
    """The passes of ``train.objective``: sequences per row, the reference, KTO's KL batch, how the loss is taken."""
    objective = train.objective
    if objective == "sft":
        return Passes("sft", 1, "none", None, False, "chunked")
    pref = train.preference_settings()
    reference: Literal["none", "adapter", "copy", "model"] = (
        "none" if objective in REFERENCE_FREE else "model" if pref.reference != "base"
        else "copy" if train.method == "full" else "adapter")
    return Passes(objective, 2 if objective in PAIRED else 1, reference,
                  pref.reference if reference == "model" else None,
                  objective == "kto" and (pref.loss_type or "kto") != "apo_zero_unpaired",   # TRL's calculate_KL
                  "fused" if objective in FUSED_HEAD else "full")


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
    passes: Passes

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
    checkpointing = train.gradient_checkpointing if train.gradient_checkpointing is not None else device == "cuda"
    run = passes(train)
    weights, weights_host = weight_bytes(shape, train, profile, n, c)
    lora_params = lora_param_count(shape, train) if train.method != "full" else 0
    trainable = lora_params if train.method != "full" else shape.total_params
    state, state_host = training_state(train, profile, n, c, device, lora_params, trainable)

    a = 4 if train.method == "qlora" and not profile.shards_weights else c   # the residual stream's bytes
    act_ckpt, act_full = activation_bytes(shape, train, run, a)
    terms = {"weights": weights}
    copies = 2 if run.reference in ("copy", "model") else 1
    if copies == 2:   # a second model at the base's precision, placed (sharded, offloaded) like the base
        terms["reference model"] = weights
    terms.update({**state, "activations": act_ckpt if checkpointing else act_full,
                  "logits": logit_bytes(shape, train, run, profile, c, a), "runtime overhead": float(RUNTIME_OVERHEAD)})
    terms["allocator slack (10%)"] = SLACK * sum(terms.values())
    return Estimate(profile=profile.name, processes=n, device=device, gradient_checkpointing=checkpointing,
                    terms=terms, activations_checkpointed=act_ckpt, activations_full=act_full,
                    host_offload=copies * weights_host + state_host, trainable_params=trainable, passes=run)


def weight_bytes(shape: ModelShape, train: TrainSpec, profile: Profile, n: int, c: int) -> tuple[float, float]:
    """(on the device, offloaded to the host) bytes of the base's weights per process."""
    if train.method == "qlora":
        other_bytes = c if profile.shards_weights else 4
        weights = shape.linear_params * QLORA_BYTES_PER_WEIGHT + shape.other_params * other_bytes
    else:
        weights = shape.total_params * c
    if profile.offload_params:
        return 2 * weights / max(shape.num_layers, 1), weights / n   # the gathered working set: ~two decoder layers
    return (weights / n if profile.shards_weights else weights), 0.0


def training_state(train: TrainSpec, profile: Profile, n: int, c: int, device: str, lora_params: int,
                   trainable: int) -> tuple[dict[str, float], float]:
    """The adapters, gradients and optimizer state per process (by term), and the bytes offloaded to the host."""
    ds = profile.kind == "deepspeed"
    host = 0.0
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
    return {"LoRA adapters": adapters, "gradients": gradients, "optimizer state": optimizer}, host


def activation_bytes(shape: ModelShape, train: TrainSpec, run: Passes, a: int) -> tuple[float, float]:
    """(with checkpointing, without) bytes of the activations kept for the backward pass."""
    tokens = train.batch_size * train.max_seq_len * run.sequences
    per_layer = tokens * (6 * shape.hidden_size + 2 * shape.kv_size + 4 * shape.intermediate_size) * a
    act_full = shape.num_layers * per_layer
    act_ckpt = shape.num_layers * tokens * shape.hidden_size * a + per_layer
    if run.reference != "none":
        # the reference's no_grad pass runs after the policy's forward, one layer's values at a time: under
        # checkpointing less than the backward's recomputed layer, without it one layer on top of the kept ones
        act_full += per_layer
    return act_ckpt, act_full


def logit_bytes(shape: ModelShape, train: TrainSpec, run: Passes, profile: Profile, c: int, a: int) -> float:
    """Bytes of the loss's logits at their peak, with the final hidden states they are computed from."""
    tokens = train.batch_size * train.max_seq_len * run.sequences
    hidden, vocab = shape.hidden_size, shape.vocab_size
    if run.loss == "fused":
        rows, cols = min(tokens, FUSED_TILE_TOKENS), min(vocab, FUSED_TILE_VOCAB)
        head = rows * FUSED_TILE_VOCAB * c                       # the tile buffer, allocated whole
        if c == 4:                                               # the CPU: no Triton, torch folds each tile
            head += FUSED_TILE_TEMPORARIES * rows * cols * 4
        if a > c:                                                # QLoRA's fp32 head: each slice cast to bf16
            head += cols * hidden * c
        gradient = 4 + (a if a < 4 else 0)                      # fp32, then cast to the hidden states' dtype
        head += tokens * hidden * (2 * a + max(gradient, 2 * a))
        return head + (vocab * hidden * 4 if train.method == "full" else 0)
    if run.loss == "full":
        return tokens * vocab * FULL_LOGIT_VALUES[run.objective] * c + tokens * hidden * a
    chunked = not profile.shards_weights
    logits = (min(tokens, LOSS_CHUNK_TOKENS) if chunked else tokens) * vocab * LOGIT_BYTES
    return logits + (tokens * hidden * a if chunked else 0)   # the final hidden states the chunks read


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
