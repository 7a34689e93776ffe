"""The ``model:`` section: where a model comes from."""

from __future__ import annotations

import fnmatch
import re

from pydantic import Field, ValidationInfo, field_validator

from gauntlet.config.base import Strict, check_model_name, resolve

SOURCE_SCHEMES = ("demo://", "hf://", "modelscope://", "file://", "s3://", "gs://")
REGISTRY_SCHEME = "models:/"
REGISTRY_URI = re.compile(r"^models:/(?P<name>[^/@\s]+)(?:@(?P<alias>[\w.-]+)|/(?P<version>\d+))$")


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?(@[\w./-]+)?$")   # org/name@revision
TRUST_REMOTE_CODE_REFUSED = (
    "trust_remote_code: true is refused: it runs Python shipped with the model, and Gauntlet runs configs "
    "from pull requests. Fix: use a model whose architecture transformers ships (or convert it), and set "
    "trust_remote_code: false")


def refuse_remote_code(v: bool) -> bool:
    """``trust_remote_code`` as every section takes it: false, or ValueError with the reason and the fix."""
    if v:
        raise ValueError(TRUST_REMOTE_CODE_REFUSED)
    return v


def check_source_scheme(v: str) -> None:
    """ValueError naming the accepted forms when ``v`` is neither a known scheme, a registry URI nor a path;
    hub ids and object-store URIs with ``..`` segments (path traversal) are refused."""
    if v.startswith(REGISTRY_SCHEME):
        match = REGISTRY_URI.match(v)
        if not match:
            raise ValueError(f"registry source {v!r} must look like models:/NAME@alias or models:/NAME/VERSION")
        check_model_name(match["name"])
    elif "://" in v and not v.startswith(SOURCE_SCHEMES):
        raise ValueError(f"unsupported scheme in {v!r}; use one of {', '.join(SOURCE_SCHEMES)}, "
                         f"{REGISTRY_SCHEME}NAME@alias or a local path")
    scheme, _, rest = v.partition("://")
    if scheme in ("hf", "modelscope", "demo") and (not HUB_ID.match(rest) or ".." in rest.split("@")[0]):
        raise ValueError(f"{v!r} is not a hub model id. Fix: write {scheme}://org/name@revision (letters, digits, "
                         "'.', '_', '-'; no '..' segments)")
    if scheme in ("s3", "gs", "file") and any(part in ("..", ".") for part in rest.split("/")):
        raise ValueError(f"{v!r} has '.' or '..' segments (path traversal). Fix: give the object's full path, "
                         "e.g. s3://bucket/models/name")


class SourcesSpec(Strict):
    """Which model sources this deployment may fetch: an allowlist (fnmatch patterns) for sensitive setups."""

    allow: list[str] = Field(default_factory=list, description="patterns of model.source, e.g. 'hf://my-org/*', "
                                                                "'models:/*'; empty: every source")

    def refusal(self, source: str | None) -> str | None:
        """Why ``source`` may not be fetched, or None (None too for no source: an endpoint candidate)."""
        if source is None or not self.allow or any(fnmatch.fnmatchcase(source, p) for p in self.allow):
            return None
        return f"model source {source!r} is not in sources.allow {self.allow}"


class ModelSpec(Strict):
    """A model: ``demo://tiny-llama`` (built locally), ``hf://org/name@revision``,
    ``modelscope://org/name@revision``, ``s3://…``/``gs://…``, ``models:/NAME@alias`` or
    ``models:/NAME/VERSION`` (the MLflow Model Registry), or a local directory."""

    source: str
    revision: str | None = Field(None, description="hub revision (commit sha or tag); '@rev' in source also works")
    trust_remote_code: bool = False

    @field_validator("trust_remote_code")
    @classmethod
    def _no_remote_code(cls, v: bool) -> bool:
        return refuse_remote_code(v)

    @field_validator("source")
    @classmethod
    def _known_scheme(cls, v: str, info: ValidationInfo) -> str:
        check_source_scheme(v)
        if "://" not in v and not v.startswith(REGISTRY_SCHEME):
            path = resolve(v, info, inside=False)   # a model folder may live anywhere (sources.allow limits it)
            if not path.exists():
                raise ValueError(f"local model directory {str(path)!r} does not exist")
        return v

