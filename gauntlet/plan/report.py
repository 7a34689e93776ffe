"""``gauntlet plan``: the memory estimate under every launch profile, the verdict, and a proposed micro-batch,
for a config's training, from the model's config.json alone (:mod:`gauntlet.plan.shape`,
:mod:`gauntlet.plan.memory`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from gauntlet.config.model import ModelSpec
from gauntlet.config.train import TrainSpec
from gauntlet.plan.memory import (
    GIB,
    Devices,
    Estimate,
    Passes,
    estimate,
    largest_batch,
    launch_profiles,
    profile_named,
    verdict,
    visible_devices,
)
from gauntlet.plan.placement import PlacementError, class_for_training
from gauntlet.plan.shape import ModelShape, check_model_fit, fetch_model_config, model_shape


@dataclass
class Plan:
    shape: ModelShape
    train: TrainSpec
    devices: Devices
    configured: Estimate
    configured_fits: bool
    configured_why: str
    by_profile: dict[str, Estimate]
    verdicts: dict[str, tuple[bool, str]]
    cpu_run: Estimate | None = None          # the run this machine would do (no CUDA: on the CPU)
    largest_batch: int | None = None         # the largest micro-batch that fits the configured profile
    gpu_class: str | None = None             # the smallest GPU class of a team's pool it fits (its work queue)
    gpu_class_why: str = ""                  # why none fits, when none does

    @property
    def recommended(self) -> str | None:
        return next((name for name, (ok, _) in self.verdicts.items() if ok), None)

    def as_dict(self) -> dict:
        s = self.shape
        return {"model": {"source": s.source, "architecture": s.architecture, "total_params": s.total_params,
                          "linear_params": s.linear_params, "num_layers": s.num_layers, "hidden_size": s.hidden_size,
                          "vocab_size": s.vocab_size, "max_positions": s.max_positions},
                "method": self.train.method, "objective": self.train.objective,
                "passes": self.configured.passes.as_dict(), "devices": self.devices.description,
                "configured": {**self.configured.as_dict(), "fits": self.configured_fits, "why": self.configured_why},
                "profiles": {k: {**e.as_dict(), "fits": self.verdicts[k][0], "why": self.verdicts[k][1]}
                             for k, e in self.by_profile.items()},
                "recommended": self.recommended, "largest_batch": self.largest_batch,
                "gpu_class": self.gpu_class, "gpu_class_why": self.gpu_class_why,
                "cpu_run": self.cpu_run.as_dict() if self.cpu_run else None}


def make_plan(shape: ModelShape, train: TrainSpec, devices: Devices | None = None, gpus: int | None = None) -> Plan:
    """Estimates for the configured profile and every profile in deployments/accelerate/.

    Multi-process profiles use ``gpus`` processes (default: the visible GPUs when there are several,
    else the configured process count, at least 2).
    """
    devices = devices or visible_devices()
    acc = train.accelerate
    configured_n = acc.num_processes * acc.num_machines
    target = devices if devices.kind == "cuda" else None
    n_multi = gpus or (devices.count * acc.num_machines if target and devices.count > 1 else max(configured_n, 2))
    by_profile, verdicts = {}, {}
    for name, p in launch_profiles().items():
        est = estimate(shape, train, p, 1 if p.kind == "single" else n_multi, "cuda")
        by_profile[name] = est
        verdicts[name] = verdict(est, target, acc.num_machines) if target else (False, "no GPU to compare with")
    configured = estimate(shape, train, profile_named(acc.profile), configured_n, "cuda")
    if target:
        ok, why = verdict(configured, target, acc.num_machines)
    else:
        ok, why = True, "no GPU visible to compare with (pass --gpus and --gpu-memory to plan for one)"
    cpu_run = estimate(shape, train, profile_named(acc.profile), configured_n, "cpu") if not target else None
    batch = largest_batch(shape, train, target) if target else None
    try:
        gpu_class, gpu_class_why = class_for_training(shape, train).name, ""
    except PlacementError as e:
        gpu_class, gpu_class_why = None, str(e)
    return Plan(shape, train, devices, configured, ok, why, by_profile, verdicts, cpu_run, batch, gpu_class,
                gpu_class_why)


def render(plan: Plan) -> str:
    s, t = plan.shape, plan.train
    lora = (f", LoRA r={t.lora.r} on {t.lora.target_modules} ({plan.configured.trainable_params / 1e6:,.1f}M "
            "trainable)" if t.method != "full" else "")
    lines = [
        f"model     {s.source}: {s.architecture}, {s.total_params / 1e9:.2f}B parameters "
        f"({s.linear_params / 1e9:.2f}B in linear layers), {s.num_layers} layers, hidden {s.hidden_size}, "
        f"vocab {s.vocab_size}, max positions {s.max_positions}",
        f"training  {t.method}{lora}; micro-batch {t.batch_size} x {t.max_seq_len} tokens; bf16 compute; "
        f"gradient checkpointing {'on' if plan.configured.gradient_checkpointing else 'off'}",
        describe_passes(plan.configured.passes, t.method),
        f"devices   {plan.devices.description}",
        "",
    ]
    short = {"weights": "weights", "reference model": "ref", "LoRA adapters": "LoRA", "gradients": "grads",
             "optimizer state": "optim", "activations": "activ", "logits": "logits", "runtime overhead": "runtime",
             "allocator slack (10%)": "slack"}
    names = list(plan.by_profile)
    first = max(len("GiB per GPU"), *(len(n) for n in names)) + 2
    heads = ["procs", *(short[k] for k in plan.configured.terms), "total", "host", "fits"]
    lines.append("GiB per GPU".ljust(first) + "".join(h.rjust(9) for h in heads))
    for name in names:
        est = plan.by_profile[name]
        ok, why = plan.verdicts[name]
        cells = [str(est.processes), *(f"{v / GIB:.2f}" for v in est.terms.values()), f"{est.total / GIB:.2f}",
                 f"{est.host_offload / GIB:.2f}", "yes" if ok else ("-" if "no GPU" in why else "no")]
        lines.append(name.ljust(first) + "".join(c.rjust(9) for c in cells))
    c = plan.configured
    lines.append(f"activations per GPU: {c.activations_checkpointed / GIB:.2f} GiB with gradient checkpointing, "
                 f"{c.activations_full / GIB:.2f} GiB without (counted: "
                 f"{'with' if c.gradient_checkpointing else 'without'}); host = memory offloaded per GPU process")
    lines.append("")
    acc = t.accelerate
    lines.append(f"configured: profile {acc.profile or '(none)'} x {acc.num_processes * acc.num_machines}: "
                 f"{plan.configured.total / GIB:.2f} GiB per GPU; {plan.configured_why}")
    if plan.cpu_run:
        ok, why = verdict(plan.cpu_run, plan.devices, acc.num_machines)
        lines.append(f"on this machine (CPU, fp32): {plan.cpu_run.total / GIB:.2f} GiB per process; {why}")
    for n in names:
        if not plan.verdicts[n][0] and "no GPU" not in plan.verdicts[n][1]:
            lines.append(f"  {n}: {plan.verdicts[n][1]}")
    if plan.largest_batch:
        tokens = plan.largest_batch * t.gradient_accumulation_steps * acc.num_processes * acc.num_machines
        lines.append(f"proposed micro-batch: {plan.largest_batch} (the largest that fits the configured profile; "
                     f"{tokens * t.max_seq_len:,} tokens per optimizer step with gradient accumulation "
                     f"{t.gradient_accumulation_steps})")
    if plan.recommended:
        lines.append(f"recommended: {plan.recommended} (the first profile that fits, least communication first)")
    elif plan.devices.kind == "cuda":
        lines.append("no profile fits these devices: lower batch_size/max_seq_len, use qlora, or add GPUs")
    lines.append(f"pool class: {plan.gpu_class} (the smallest GPU class of a team's pool it fits: `gauntlet run "
                 "--pool` queues it there)" if plan.gpu_class else f"pool class: none: {plan.gpu_class_why}")
    return "\n".join(lines)


def describe_passes(run: Passes, method: str) -> str:
    """The objective's line: the sequences of a micro-batch's row, the reference pass, how the log-probs are taken."""
    if run.sequences == 2:
        rows = "2 sequences per pair (chosen+rejected in one pass)"
    else:
        rows = "1 sequence per row" + (", plus a mismatched KL batch (no_grad, through the policy and the reference)"
                                       if run.kl_pass else "")
    reference = {
        "none": "no reference" if run.objective == "sft" else "no reference (reference-free)",
        "adapter": "reference = base with the adapter disabled (no_grad pass, no second copy)",
        "copy": f"reference = TRL's frozen copy of the base (method {method}; its weights counted; no_grad pass)",
        "model": f"reference = {run.reference_source}, a second model (its weights counted, at the base's precision "
                 "and assumed of the base's shape; no_grad pass)",
    }[run.reference]
    loss = {"chunked": "the loss's logits in chunks (whole under ZeRO-3/FSDP)",
            "fused": "log-probs through TRL's fused LM head, tile by tile",
            "full": "every logit materialised (TRL's selective_log_softmax)"}[run.loss]
    return f"objective {run.objective}: {rows}, {reference}; {loss}"


def plan_for_spec(model: ModelSpec, train: TrainSpec, devices: Devices | None = None,
                  gpus: int | None = None) -> tuple[Plan, list[str]]:
    """Plan a config's training from the model's config.json; returns (plan, config problems)."""
    shape = model_shape(fetch_model_config(model), model.source, model.trust_remote_code)
    return make_plan(shape, train, devices, gpus), check_model_fit(shape, train)


def to_json(plan: Plan, problems: list[str]) -> str:
    return json.dumps({**plan.as_dict(), "problems": problems}, indent=2)
