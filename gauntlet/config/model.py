"""The ``model:`` section: where a model comes from."""

from __future__ import annotations

import re

from pydantic import Field, ValidationInfo, field_validator

from gauntlet.config.base import Strict, resolve

SOURCE_SCHEMES = ("demo://", "hf://", "modelscope://", "file://", "s3://", "gs://")
REGISTRY_SCHEME = "models:/"
REGISTRY_URI = re.compile(r"^models:/(?P<name>[^/@\s]+)(?:@(?P<alias>[\w.-]+)|/(?P<version>\d+))$")


def check_source_scheme(v: str) -> None:
    """ValueError naming the accepted forms when ``v`` is neither a known scheme, a registry URI nor a path."""
    if v.startswith(REGISTRY_SCHEME):
        if not REGISTRY_URI.match(v):
            raise ValueError(f"registry source {v!r} must look like models:/NAME@alias or models:/NAME/VERSION")
    elif "://" in v and not v.startswith(SOURCE_SCHEMES):
        raise ValueError(f"unsupported scheme in {v!r}; use one of {', '.join(SOURCE_SCHEMES)}, "
                         f"{REGISTRY_SCHEME}NAME@alias or a local path")


class ModelSpec(Strict):
    """A model: ``demo://tiny-llama`` (built locally), ``hf://org/name@revision``,
    ``modelscope://org/name@revision``, ``s3://…``/``gs://…``, ``models:/NAME@alias`` or
    ``models:/NAME/VERSION`` (the MLflow Model Registry), or a local directory."""

    source: str
    revision: str | None = Field(None, description="hub revision (commit sha or tag); '@rev' in source also works")
    trust_remote_code: bool = False

    @field_validator("source")
    @classmethod
    def _known_scheme(cls, v: str, info: ValidationInfo) -> str:
        check_source_scheme(v)
        if "://" not in v and not v.startswith(REGISTRY_SCHEME):
            path = resolve(v, info)
            if not path.exists():
                raise ValueError(f"local model directory {str(path)!r} does not exist")
        return v

