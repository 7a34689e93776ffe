"""What a deploy is asked for: the registered version (``NAME``, ``NAME@alias``, ``NAME/VERSION`` or a
``models:/`` URI) and the settings (the ``deploy:``, ``notify:`` and data sections of a run config)."""

from __future__ import annotations

from pydantic import BaseModel

from gauntlet.config.deploy import DeploySpec
from gauntlet.config.notify import NotifySpec

REGISTRY_SCHEME = "models:/"


class DeploySettings(BaseModel):
    model_name: str | None = None          # the model the config deploys (registry.model_name); None: any
    deploy: DeploySpec = DeploySpec()
    notify: NotifySpec = NotifySpec()
    probe_file: str | None = None          # JSONL, DVC-tracked (the run config's data.eval by default)
    reference_file: str | None = None      # the training data, for drift


def release_uri(text: str, default_alias: str = "champion") -> str:
    """``demo`` → ``models:/demo@champion``; ``demo@x`` → ``models:/demo@x``; ``demo/3`` → ``models:/demo/3``."""
    if text.startswith(REGISTRY_SCHEME):
        return text
    if "@" in text or "/" in text:
        return REGISTRY_SCHEME + text
    return f"{REGISTRY_SCHEME}{text}@{default_alias}"


def model_of(uri: str) -> str:
    """The registered model's name in a release URI (``models:/NAME@alias``, ``models:/NAME/VERSION``)."""
    return uri[len(REGISTRY_SCHEME):].split("@", 1)[0].split("/", 1)[0]


def not_deployed_here(got: DeploySettings, uri: str) -> str | None:
    """Why ``uri`` is not deployed with these settings (a config's deploy: section serves its own
    registry.model_name only, not its variants or other models), or None."""
    if got.model_name is None or model_of(uri) == got.model_name:
        return None
    return f"nothing to deploy for {model_of(uri)}: the config's deploy: section serves {got.model_name}"


def settings(config: str | None, overrides: list[str] | None = None) -> DeploySettings:
    """The deploy settings of a run config (validated; SpecError naming the field), or the defaults."""
    if config is None:
        return DeploySettings()
    from gauntlet.config.load import load_spec
    from gauntlet.project import in_project

    spec = load_spec(in_project(config), overrides or [])
    data = in_project(spec.data.repo)

    def data_file(path: str | None) -> str | None:   # relative to the DVC repo, like data.train
        return str(data / path) if path else None

    return DeploySettings(model_name=spec.registry.model_name, deploy=spec.deploy, notify=spec.notify,
                          probe_file=data_file(spec.deploy.probe.file or spec.data.eval),
                          reference_file=data_file(spec.deploy.drift_reference or spec.data.train))
