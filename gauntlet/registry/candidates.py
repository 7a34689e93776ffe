"""Registering a candidate: the evaluated model's files as a version, with its lineage, scores and model card.

A model whose files are already registered is found again, never duplicated (``model.sha`` tags). The
version gets the ``challenger`` alias while the gate judges it.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

from gauntlet.audit import record
from gauntlet.config.gate import RegistrySpec
from gauntlet.names import OBJECTIVE_TAG, START_TAG, metric_key
from gauntlet.refs import DatasetRef, EvalReport, ModelRef, QuantizedModel, RegisteredVersion, TrainedModel
from gauntlet.registry.lock import registry_lock
from gauntlet.registry.mlflow_model import log_model_version
from gauntlet.registry.reports import log_version_report
from gauntlet.registry.store import PERF_TAG, SCORE_TAG, champion_of, version_with_sha
from gauntlet.tracking import RunContext, git_commit


def model_card(model_name: str, lineage: dict[str, str], report: EvalReport) -> str:
    """README.md for the registered folder: what this model is made of and how it scored."""
    rows = [f"| {s.task} | {s.metric} | {s.value:.4f} | {'—' if s.stderr is None else f'{s.stderr:.4f}'} |"
            for s in report.scores]
    perf = ([f"- {k}: {v}" for k, v in report.perf.model_dump().items()] if report.perf
            else ["- not measured"])
    return "\n".join([
        f"# {model_name}", "",
        "Fine-tuned and evaluated by Gauntlet. The gate verdict and the champion history are in the registry "
        "(tags `gate.verdict`, `gate.compared_to`; `gauntlet history " + model_name + "`).", "",
        "## Lineage", "",
        f"- base model: `{lineage.get('base_model.source')}` revision `{lineage.get('base_model.revision')}` "
        f"(content sha256 `{lineage.get('base_model.sha')}`)",
        *([f"- started from: `{lineage[START_TAG + 'registry.version']}`, itself trained from "
           f"`{lineage.get(START_TAG + 'base_model.source', 'unrecorded')}` on data md5 "
           f"`{lineage.get(START_TAG + 'data.md5', 'unrecorded')}` "
           f"(objective {lineage.get(START_TAG + OBJECTIVE_TAG, 'unrecorded')})"]
          if START_TAG + "registry.version" in lineage else []),
        f"- data version (DVC md5): `{lineage.get('data.md5')}`",
        f"- training objective: {lineage.get(OBJECTIVE_TAG, 'unrecorded')}",
        f"- config hash: `{lineage.get('config_hash')}`",
        f"- git commit: `{lineage.get('git_commit')}`",
        f"- Prefect flow run: `{lineage.get('prefect.flow_run_id')}`; MLflow run: `{lineage.get('mlflow.parent_run_id')}`",
        f"- model files sha256: `{lineage.get('model.sha')}`",
        *([f"- quantized: {lineage['quantization.variant']} ({lineage['quantization.method']}, "
           f"{lineage['quantization.bits']} bits, group size {lineage['quantization.group_size']}) from "
           f"`{lineage['quantization.from_sha']}`, calibration md5 `{lineage['quantization.calibration_md5']}`, "
           f"{lineage['quantization.size_ratio']}x the size"] if "quantization.variant" in lineage else []), "",
        "## Scores", "", "| task | metric | value | stderr |", "|---|---|---|---|", *rows, "",
        "## Speed", "", *perf, "",
        "## Evaluation protocol", "", "```json", json.dumps(report.protocol, indent=2, sort_keys=True, default=str),
        "```", "",
        "## Loading", "", "```python",
        "from mlflow.artifacts import download_artifacts",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        f'path = download_artifacts("models:/{model_name}@champion")   # or models:/{model_name}/<version>',
        "model, tokenizer = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)",
        "```", ""])


def candidate_tags(lineage: dict[str, str], report: EvalReport) -> dict[str, str]:
    tags = {**lineage, "gate.verdict": "pending"}
    # full precision; tag keys allow no commas (lm-eval's "exact_match,strict-match")
    tags.update({SCORE_TAG + metric_key(s.task, s.metric): repr(s.value) for s in report.scores})
    if report.perf:
        tags.update({f"{PERF_TAG}{k}": str(v) for k, v in report.perf.model_dump().items()})
    return tags


def register_candidate(c, registry: RegistrySpec, run_id: str, model_dir: Path, lineage: dict[str, str],
                       report: EvalReport) -> RegisteredVersion:
    """Register ``model_dir`` (uploaded as ``run_id``'s ``model`` artifact, with a model card) as a new
    version and point ``challenger`` at it; or find the version that already holds these exact files."""
    from mlflow.exceptions import MlflowException

    sha = lineage["model.sha"]
    name = registry.model_name

    def upload() -> str:   # an MLflow Model (transformers flavor) around the files as they are
        return log_model_version(c, run_id, model_dir, model_card(name, lineage, report))

    # The upload is slow for big models: do it outside the lock; only find-or-create is inside it.
    source = upload() if version_with_sha(c, registry, sha) is None else None
    with registry_lock(c, name, registry.lock_timeout_s):
        with contextlib.suppress(MlflowException):  # already exists
            c.create_registered_model(name, description="Registered by Gauntlet: candidates with their lineage; "
                                                        "`champion` is the promoted one.")
        version = version_with_sha(c, registry, sha)
        if version is None:
            source = source or upload()  # it was registered, then deleted by hand meanwhile
            mv = c.create_model_version(name, source=source, run_id=run_id, tags=candidate_tags(lineage, report),
                                        description=f"candidate from flow run {lineage.get('prefect.flow_run_id')}")
            version, created = str(mv.version), True
            record("register", f"{name} v{version}", f"candidate from flow run {lineage.get('prefect.flow_run_id')}",
                   client=c, flow_run_id=lineage.get("prefect.flow_run_id"), model=name, version=version,
                   model_sha=sha, data_md5=lineage.get("data.md5"))
        else:
            created = False
            for k, v in candidate_tags(lineage, report).items():
                if k.startswith((SCORE_TAG, PERF_TAG)):  # a re-evaluation may differ (e.g. a new eval suite)
                    c.set_model_version_tag(name, version, k, v)
        champion, _ = champion_of(c, registry)
        if version != champion:
            c.set_registered_model_alias(name, registry.challenger_alias, version)
            if not created:
                c.set_model_version_tag(name, version, "gate.verdict", "pending")
        mv = c.get_model_version(name, version)
        log_version_report(c, mv.run_id or run_id, report)  # per-item records: the gate's paired tests
    return RegisteredVersion(model_name=name, version=version, source=mv.source, model_sha=sha, created=created,
                             mlflow_run_id=mv.run_id)


def lineage_of(trained: TrainedModel, data: DatasetRef, config_hash: str, run: RunContext) -> dict[str, str]:
    lineage = {"base_model.source": trained.base.source, "base_model.sha": trained.base.sha,
               "base_model.revision": trained.base.revision or "unversioned (see base_model.sha)",
               "data.md5": data.md5, "config_hash": config_hash, "git_commit": git_commit(),
               "model.sha": trained.merged.sha, "model.path": trained.output_dir,
               "prefect.flow_run_id": str(run.flow_run_id), "mlflow.parent_run_id": run.parent_run_id}
    if trained.objective:
        lineage[OBJECTIVE_TAG] = trained.objective
    # a model trained from a registered one (DPO from the SFT champion): that one's lineage too, so the
    # registry names both generations (its base, its data, its objective)
    lineage.update({f"{START_TAG}{k}": v for k, v in trained.base.lineage.items()})
    return {**lineage, **quantization_tags(trained.merged)}


def quantization_tags(model: ModelRef) -> dict[str, str]:
    """How a quantized variant was made (method, bits, group size, what it was quantized from and
    calibrated on); nothing for an unquantized model."""
    if not isinstance(model, QuantizedModel):
        return {}
    return {"quantization.variant": model.variant, "quantization.method": model.method,
            "quantization.bits": str(model.bits),
            "quantization.group_size": "none" if model.group_size is None else str(model.group_size),
            "quantization.from_sha": model.base_sha,
            "quantization.calibration_md5": model.calibration_md5 or "none (calibration-free)",
            "quantization.size_ratio": f"{model.size_ratio:.3f}"}
