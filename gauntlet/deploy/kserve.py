"""The same rollout for Kubernetes: a KServe ``InferenceService`` per canary step, from the ``deploy:`` section.

KServe splits traffic itself: applying the service with a new ``storageUri`` and ``canaryTrafficPercent: N``
sends N% to the new revision and the rest to the last ready one; the steps below are applied in order
(``kubectl apply``), and ``canaryTrafficPercent`` is dropped at 100 (promotion). Each document is checked
against ``deployments/kserve/inferenceservice.schema.json``, a subset of KServe's CRD schema. Not run here
(no cluster): the manifests are rendered and validated.
"""

from __future__ import annotations

import json
import re

import yaml

from gauntlet.config.deploy import DeploySpec
from gauntlet.project import project_root

SCHEMA = "deployments/kserve/inferenceservice.schema.json"


def service_name(model: str) -> str:
    """A DNS-1035 name from a registered model's name."""
    return re.sub(r"[^a-z0-9-]+", "-", model.lower()).strip("-")[:63] or "model"


def inference_services(model: str, version: str, spec: DeploySpec) -> list[dict]:
    """One InferenceService per canary step of ``spec`` for ``model`` version ``version``."""
    k = spec.kserve
    docs = []
    for i, step in enumerate(spec.steps, 1):
        predictor: dict = {"minReplicas": 1, "model": {
            "modelFormat": {"name": "huggingface"}, "runtime": k.runtime,
            "storageUri": k.storage_uri.format(name=model, version=version),
            "args": [f"--model_name={model}"] + (["--backend=vllm"] if spec.backend == "vllm" else
                                                 ["--backend=huggingface", "--device=cpu"]),
            "resources": {"limits": {"nvidia.com/gpu": str(k.gpus)}} if spec.backend == "vllm" and k.gpus else
            {"requests": {"cpu": "1", "memory": "4Gi"}}}}
        if step.weight < 100:
            predictor["canaryTrafficPercent"] = step.weight
        docs.append({"apiVersion": "serving.kserve.io/v1beta1", "kind": "InferenceService",
                     "metadata": {"name": service_name(model), "namespace": k.namespace,
                                  "labels": {"gauntlet/model": service_name(model), "gauntlet/version": str(version)},
                                  "annotations": {"gauntlet/step": f"{i}/{len(spec.steps)}",
                                                  "gauntlet/watch-seconds": str(step.watch_s)}},
                     "spec": {"predictor": predictor}})
    return docs


def validate(doc: dict) -> None:
    """jsonschema.ValidationError naming the field when ``doc`` does not fit the schema subset."""
    import jsonschema

    jsonschema.validate(doc, json.loads((project_root() / SCHEMA).read_text()))


def render(model: str, version: str, spec: DeploySpec) -> str:
    docs = inference_services(model, version, spec)
    for doc in docs:
        validate(doc)
    return "".join(f"# step {d['metadata']['annotations']['gauntlet/step']}: kubectl apply -f -\n---\n"
                   + yaml.safe_dump(d, sort_keys=False) for d in docs)


def render_for(name: str, spec: DeploySpec) -> str:
    """``gauntlet deploy kserve NAME[@alias]``: the version the alias names now (``NAME/VERSION`` as given)."""
    from gauntlet.deploy.release import release_uri
    from gauntlet.models import registry_version
    from gauntlet.state import configure_environment
    from gauntlet.tracking import tracking_uri

    configure_environment()
    _, mv = registry_version(release_uri(name), tracking_uri())
    return render(mv.name, str(mv.version), spec)
