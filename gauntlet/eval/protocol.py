"""The evaluation protocol: everything that must match for two reports to be comparable.

Engine and version, backend, device and dtype, decoding and repeats, few-shot seed, chat template choice,
batch size, every task's settings (few-shot count, limit, generation budget, content hash) and, in the
report, every task's lm-eval version, the settings lm-eval applied to each task (``task_effective``) and
the model-side fingerprint (``model_fingerprint``: the chat template's hash when chat templates are on,
the generation config's hash). :func:`protocol_differences` says where two reports differ; the
leaderboard refuses to rank reports whose protocols differ. Every key takes part in the comparison, so
a leaderboard cannot mix protocols by accident.
"""

from __future__ import annotations

from typing import Any

from gauntlet.config.endpoint import LOGLIKELIHOOD_TYPES, EndpointEvalSpec
from gauntlet.config.eval import EvalSpec
from gauntlet.eval.engine import (
    BOOTSTRAP_ITERS,
    EvalError,
    device_kind,
    dtype_for,
    pkg_version,
)
from gauntlet.eval.suites import EvalTaskPlan, SuiteError, plan_tasks, tasks_dir_of
from gauntlet.eval.task_types import output_types
from gauntlet.refs import EvalReport


def plans_of(spec: EvalSpec) -> list[EvalTaskPlan]:
    """The spec's tasks, planned; EvalError (naming the task and the folder) if one does not resolve."""
    try:
        return plan_tasks(spec)
    except SuiteError as e:
        raise EvalError(str(e)) from None


def task_protocol(plan: EvalTaskPlan) -> dict[str, Any]:
    """What defines one task's measurement (the engine's own tasks are pinned by the engine's version)."""
    return {"engine_task": plan.engine_task, "source": plan.source, "metric": plan.metric,
            "random_baseline": plan.random_baseline, "num_fewshot": plan.num_fewshot, "limit": plan.limit,
            "max_gen_tokens": plan.max_gen_tokens, "content_sha": plan.content_sha}


def engine_protocol(spec: EvalSpec, device: str | None = None) -> dict[str, Any]:
    """The settings every task of an evaluation shares."""
    device = device or device_kind()
    protocol: dict[str, Any] = {
        "engine": "lm-eval",
        "engine_version": pkg_version("lm_eval"),
        "backend": spec.backend,
        "device": device,
        "dtype": dtype_for(device) if spec.backend == "hf" else "auto",
        "decoding": ("each task's own" if spec.temperature is None else "greedy" if spec.temperature == 0
                     else "sampled"),
        "temperature": spec.temperature,
        "repeats": spec.repeats,
        "fewshot_seed": spec.fewshot_seed,
        "apply_chat_template": spec.apply_chat_template,
        "batch_size": spec.batch_size,
        "bootstrap_iters": BOOTSTRAP_ITERS,
    }
    if spec.backend == "vllm":
        protocol["max_model_len"] = spec.max_model_len
    if isinstance(spec, EndpointEvalSpec):   # served: how its server runs the weights is not known here
        ep = spec.endpoint
        generation_only = spec.perplexity is None and not any(
            set(output_types(p, tasks_dir_of(spec))) & set(LOGLIKELIHOOD_TYPES) for p in plans_of(spec))
        protocol.update(backend=ep.api, device="endpoint", dtype="as served", batch_size=1,
                        endpoint={"api": "chat" if ep.chat else "completions", "logprobs": ep.logprobs,
                                  "tokenizer": ep.tokenizer, "generation_only": generation_only})
        protocol.pop("max_model_len", None)
    return protocol


def protocol_of(spec: EvalSpec) -> dict:
    """The evaluation protocol: everything that must match for two reports to be comparable.

    The report adds ``task_versions`` (lm-eval's version of each task and subtask, known after the run).
    """
    plans = plans_of(spec)
    return {
        **engine_protocol(spec),
        "fixtures": spec.fixtures,
        "suite": spec.suite,
        "num_fewshot": spec.num_fewshot,
        "limit": spec.limit,
        "max_gen_tokens": spec.max_gen_tokens,
        "tasks": [p.name for p in plans],
        "task_settings": {p.name: task_protocol(p) for p in plans},
        "speed_probe": spec.speed_probe.model_dump(mode="json"),
        **({"perplexity": spec.perplexity.model_dump(mode="json")} if spec.perplexity else {}),
    }


# What of a model's generation_config.json changes what HF ``generate`` does under lm-eval's explicit settings.
# Under greedy decoding lm-eval passes do_sample=False, so the sampling fields (temperature, top_p, …, which many
# instruct models set) do nothing and are left out, or models of different families could never be ranked
# together; what still acts is below. Sampled protocols (eval.temperature > 0) add the sampling fields.
GREEDY_FIELDS = ("repetition_penalty", "no_repeat_ngram_size", "num_beams", "length_penalty", "diversity_penalty",
                 "encoder_repetition_penalty")
SAMPLING_FIELDS = ("top_p", "top_k", "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff")


def model_fingerprint(model_path: str, apply_chat_template: bool, sampled: bool = False) -> dict[str, Any]:
    """What of the model itself shapes the measurement: the fields of its generation config that act on this
    decoding and, when prompts go through it, its chat template (hashed)."""
    import json
    from pathlib import Path

    from gauntlet.hashing import sha256_json

    folder = Path(model_path)
    gen_file = folder / "generation_config.json"
    gen = json.loads(gen_file.read_text(encoding="utf-8")) if gen_file.is_file() else {}
    fields = GREEDY_FIELDS + (SAMPLING_FIELDS if sampled else ())
    out: dict[str, Any] = {"generation_config": {k: gen[k] for k in fields if k in gen}}
    if apply_chat_template:
        template = None
        if (folder / "chat_template.jinja").is_file():
            template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
        elif (folder / "tokenizer_config.json").is_file():
            template = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8")).get("chat_template")
        out["chat_template_sha"] = None if template is None else sha256_json(template)[:16]
    return out


def _protocol(obj: EvalReport | dict) -> dict:
    return obj.protocol if isinstance(obj, EvalReport) else obj


def protocol_differences(a: EvalReport | dict, b: EvalReport | dict) -> list[str]:
    """Where two reports' (or protocols') evaluation protocols differ: ``key: a != b`` per difference."""
    pa, pb = _protocol(a), _protocol(b)
    out = []

    def walk(x: Any, y: Any, path: str) -> None:
        if isinstance(x, dict) and isinstance(y, dict):
            for k in sorted(set(x) | set(y), key=str):
                walk(x.get(k, "<absent>"), y.get(k, "<absent>"), f"{path}.{k}" if path else str(k))
        elif x != y:
            out.append(f"{path}: {x!r} != {y!r}")

    walk(pa, pb, "")
    return out


# Settings that say what was asked for, not how one task was measured: they may differ between two reports
# whose shared tasks are still comparable (a suite that gained a task, a new speed probe setting).
NOT_PER_TASK = ("tasks", "suite", "speed_probe", "num_fewshot", "limit", "max_gen_tokens", "task_settings",
                "task_versions", "task_effective")


def task_differences(a: EvalReport | dict, b: EvalReport | dict, task: str) -> list[str]:
    """Where two reports' measurements of ``task`` differ: the shared protocol (engine, backend, dtype,
    decoding, batch size, …), that task's settings, lm-eval version and applied settings, and the model
    fingerprint. Empty: the task's scores may be compared (the gate's paired tests, the leaderboard)."""
    pa, pb = _protocol(a), _protocol(b)

    def view(p: dict) -> dict:
        return {**{k: v for k, v in p.items() if k not in NOT_PER_TASK},
                **{f"{k}[{task}]": (p.get(k) or {}).get(task, "<absent>")
                   for k in ("task_settings", "task_versions", "task_effective")}}

    return protocol_differences(view(pa), view(pb))


# How the model was run rather than what was measured: the engine, its device and dtype, the model's own generation
# defaults. A served endpoint's are its server's, as a quantized variant's are the variant's.
ENGINE_SIDE = ("backend", "device", "dtype", "batch_size", "max_model_len", "endpoint", "model_fingerprint")


def served_alike(a: EvalReport | dict, b: EvalReport | dict) -> bool:
    """True when one of two reports is an endpoint's, every endpoint among them ran generation tasks only, and the
    measurement is otherwise the same: the same prompts, decoding, stop sequences and scoring (tasks, their settings
    and versions, few-shot seed, chat templates). The board then ranks them together. Log-likelihood tasks through an
    API (echoed prompt log-probabilities, the context split by the endpoint's tokenizer) rank only with reports of
    the very same protocol."""
    pa, pb = _protocol(a), _protocol(b)
    served = [p["endpoint"] for p in (pa, pb) if "endpoint" in p]
    if not served or not all(e.get("generation_only") for e in served):
        return False
    return not protocol_differences({k: v for k, v in pa.items() if k not in ENGINE_SIDE},
                                    {k: v for k, v in pb.items() if k not in ENGINE_SIDE})


def protocols_match(a: EvalReport | dict, b: EvalReport | dict) -> bool:
    """True when two reports were measured the same way and may be ranked together."""
    return not protocol_differences(a, b)


def require_same_protocol(reports: list[EvalReport]) -> None:
    """EvalError naming each report and difference when the reports were not all measured the same way."""
    if not reports:
        return
    first = reports[0]
    problems = [f"{r.model} ({r.variant}) vs {first.model} ({first.variant}): " + "; ".join(diff[:5])
                + (f"; … {len(diff) - 5} more" if len(diff) > 5 else "")
                for r in reports[1:] if (diff := protocol_differences(first, r))]
    if problems:
        raise EvalError("reports measured with different protocols cannot be ranked together: " + " | ".join(problems))
