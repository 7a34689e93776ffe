"""Model sources: a base model from a hub, an object store, a local path, the MLflow Model
Registry, or the demo builder.

``resolve_model`` runs first, uncached: a registry source (``models:/NAME@alias``, ``models:/NAME/VERSION``)
becomes the version's files on local disk (downloaded once per version), and every source is marked
*stable* (the same name always means the same files: demo builds, pinned hub revisions, registry
versions) or not (a local folder, an object-store prefix, a hub branch), in which case the cached fetch
is refreshed and the model re-hashed, so changed weights never hide behind an unchanged name.
``fetch_model`` always returns a :class:`ModelRef` pointing at a local directory with a content hash,
so the rest of the pipeline never cares where a model came from. Hub downloads are pinned to a
revision and resumable (``snapshot_download`` resumes partial files); tokens come from the
environment (``HF_TOKEN``, ``MODELSCOPE_API_TOKEN``) and are never logged.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from gauntlet.config.model import REGISTRY_SCHEME, REGISTRY_URI, ModelSpec
from gauntlet.demo.model import DEMO_MODELS, PACKAGED_MODELS, build_demo_model, packaged_gguf
from gauntlet.files import is_complete, mark_complete, partial_dir, publish_dir
from gauntlet.gguf import GGUFError, dequantized_folder, find_gguf
from gauntlet.hashing import sha256_dir
from gauntlet.names import START_TAG
from gauntlet.project import in_project
from gauntlet.refs import ModelRef, Ref
from gauntlet.secrets import redact_uri
from gauntlet.state import models_cache
from gauntlet.tracking import client

log = logging.getLogger(__name__)

class ModelFetchError(RuntimeError):
    """A model source that a retry cannot fix (not a model directory, unknown demo model, ...)."""


class ModelDownloadError(RuntimeError):
    """A download that failed on the way (network, hub): the task retries it."""


FLOATING_REVISIONS = {None, "main", "master"}


class ResolvedModel(Ref):
    """A model source made fetchable: what ``fetch_model`` receives, and whether its cache may answer."""

    source: str                    # as the config gave it
    name: str | None = None        # a registry version's name in reports: "NAME-vVERSION"
    model: ModelSpec               # what fetch_model receives (a registry source: the version's local folder)
    note: str | None = None        # e.g. "models:/demo@champion → version 3 (run 1a2b…)"
    lineage: dict[str, str] = {}   # a registry version's own lineage (registry_lineage)
    stable: bool                   # the same source always names the same files: the fetch cache may answer


def is_stable_source(spec: ModelSpec) -> bool:
    """True when the source always names the same files (demo builds, pinned hub revisions); a local folder
    or object-store prefix may change under the same name, so it is re-hashed."""
    scheme = spec.source.split("://", 1)[0] if "://" in spec.source else "local"
    if scheme == "demo":
        return True
    if scheme in ("hf", "modelscope"):
        at_rev = spec.source.split("://", 1)[1].partition("@")[2] or None
        return (spec.revision or at_rev) not in FLOATING_REVISIONS
    return False


def registry_version(uri: str, tracking_uri: str) -> tuple[Any, Any]:
    """``models:/NAME@alias`` or ``models:/NAME/VERSION`` → (MLflow client, the model version);
    ModelFetchError naming the registry and the fix when there is no such version."""
    from mlflow.exceptions import MlflowException

    from gauntlet.registry.access import denied, is_denied

    match = REGISTRY_URI.match(uri)
    if not match:
        raise ModelFetchError(f"{uri}: not a registry URI; use models:/NAME@alias or models:/NAME/VERSION")
    name, alias, number = match["name"], match["alias"], match["version"]
    c = client(tracking_uri)
    try:
        return c, c.get_model_version_by_alias(name, alias) if alias else c.get_model_version(name, number)
    except MlflowException as e:
        if is_denied(e):
            raise ModelFetchError(denied(uri, name, redact_uri(tracking_uri))) from None
        what = f"alias @{alias}" if alias else f"version {number}"
        raise ModelFetchError(
            f"{uri}: registered model {name!r} has no {what} in the MLflow registry at {redact_uri(tracking_uri)} "
            f"({e.message.splitlines()[0]}). Register a version first (gauntlet run …) or fix the model source."
        ) from None


def registry_config(uri: str, tracking_uri: str) -> Path:
    """The folder holding a registered version's config.json, without downloading its weights
    (``gauntlet plan`` on a ``models:/`` source)."""
    from mlflow.artifacts import download_artifacts

    c, mv = registry_version(uri, tracking_uri)
    target = models_cache() / "configs" / "registry" / mv.name / str(mv.version)
    if not (target / "config.json").is_file():
        source_uri = c.get_model_version_download_uri(mv.name, mv.version)
        download_artifacts(artifact_uri=f"{source_uri}/config.json", dst_path=str(target), tracking_uri=tracking_uri)
    return target


# a registered version's tags that a model trained from it inherits, under ``start_model.``: what the version
# was itself trained from (lineage_of in gauntlet.registry.candidates writes them), and its own start_model.*
INHERITED_TAGS = ("base_model.source", "base_model.sha", "base_model.revision", "data.md5", "train.objective",
                  "model.sha", "config_hash")


def registry_lineage(mv: Any) -> dict[str, str]:
    """What a registered version was made from, as the lineage of a model trained from it records it."""
    tags = mv.tags or {}
    inherited = {k: v for k, v in tags.items() if k in INHERITED_TAGS or k.startswith(START_TAG)}
    return {"registry.version": f"{mv.name}/{mv.version}", **inherited}


def download_registry_model(uri: str, tracking_uri: str) -> tuple[Path, str, str, dict[str, str]]:
    """``models:/NAME@alias`` or ``models:/NAME/VERSION`` → the version's files on local disk (once per
    version), how it was resolved, its name in reports (``NAME-vVERSION``) and its lineage."""
    from mlflow.artifacts import download_artifacts

    c, mv = registry_version(uri, tracking_uri)
    target = models_cache() / "registry" / mv.name / str(mv.version)
    if not is_complete(target):
        partial = partial_dir(target)   # this process's own: concurrent downloads never share a folder
        try:
            source_uri = c.get_model_version_download_uri(mv.name, mv.version)
            local = Path(download_artifacts(artifact_uri=source_uri, dst_path=str(partial),
                                            tracking_uri=tracking_uri))
            publish_dir(local, target)
        finally:
            shutil.rmtree(partial, ignore_errors=True)
    note = f"{uri} → version {mv.version}" + (f" (run {mv.run_id[:12]})" if mv.run_id else "")
    return target, note, f"{mv.name}-v{mv.version}", registry_lineage(mv)


def resolve_model(spec: ModelSpec, tracking_uri: str) -> ResolvedModel:
    """The ModelSpec that fetch_model gets for ``spec``; ModelFetchError when a registry source has no such version."""
    if not spec.source.startswith(REGISTRY_SCHEME):
        return ResolvedModel(source=spec.source, model=spec, stable=is_stable_source(spec))
    path, note, name, lineage = download_registry_model(spec.source, tracking_uri)
    local = spec.model_copy(update={"source": str(path), "revision": None})
    return ResolvedModel(source=spec.source, name=name, model=local, note=note, lineage=lineage, stable=True)


def split_source(source: str, revision: str | None) -> tuple[str, str, str | None]:
    """``hf://org/name@rev`` → ("hf", "org/name", "rev"); an explicit ``revision`` wins."""
    scheme, _, rest = source.partition("://") if "://" in source else ("local", "", source)
    name, _, at_rev = rest.partition("@") if scheme != "local" else (rest, "", "")
    return scheme, name, revision or at_rev or None


def looks_like_model_dir(path: Path) -> bool:
    has_weights = any(path.glob("*.safetensors")) or any(path.glob("*.bin"))
    return ((path / "config.json").exists() and has_weights) or (path / "adapter_config.json").exists()


def fetch_model(spec: ModelSpec) -> ModelRef:
    """Bring the model to local disk and hash it (a registry source is resolved first: ``resolve_model``)."""
    if spec.source.startswith(REGISTRY_SCHEME):
        raise ModelFetchError(f"{spec.source}: resolve registry sources with resolve_model() before fetching "
                              "(the alias may move; the fetch cache must not answer for it)")
    scheme, name, revision = split_source(spec.source, spec.revision)
    if scheme == "demo":
        path = demo_model_folder(name)
    elif scheme == "hf":
        path = _from_hf(name, revision)
    elif scheme == "modelscope":
        path = _from_modelscope(name, revision)
    elif scheme in ("s3", "gs"):
        path = _from_object_store(spec.source)
    else:  # local directory or file://
        path = in_project(name if scheme == "local" else spec.source.removeprefix("file://")).resolve()
        try:
            gguf_file = find_gguf(path)
            if gguf_file is not None:  # a .gguf file (or a folder holding one): a plain folder from here on
                path = dequantized_folder(gguf_file)
        except GGUFError as e:
            raise ModelFetchError(f"{spec.source}: {e}") from None
    if not path.is_dir() or not looks_like_model_dir(path):
        raise ModelFetchError(
            f"{spec.source}: {path} is not a model directory (no config.json with *.safetensors/*.bin); "
            "point model.source at a folder saved with save_pretrained()"
        )
    check_weight_files(path, spec.source)
    sha = sha256_dir(path)
    log.info("model %s at %s (sha %s)", spec.source, path, sha[:12])
    return ModelRef(name=name.replace("/", "--"), path=str(path), source=spec.source, revision=revision, sha=sha)


def demo_model_folder(name: str) -> Path:
    """``demo://<name>``'s folder: the demo's tiny model built locally, or a model that ships in a Python package
    as a GGUF file (SmolLM2) made a transformers folder."""
    if name not in DEMO_MODELS:
        raise ModelFetchError(f"demo://{name}: unknown demo model; available: {sorted(DEMO_MODELS)}")
    if name not in PACKAGED_MODELS:
        return build_demo_model(name)
    try:
        return dequantized_folder(packaged_gguf(name))
    except (FileNotFoundError, GGUFError) as e:
        raise ModelFetchError(f"demo://{name}: {e}") from None


def check_weight_files(path: Path, source: str) -> None:
    """Refuse truncated or corrupt safetensors files now, not deep inside training."""
    import struct

    for f in sorted(path.glob("*.safetensors")):
        size = f.stat().st_size
        with open(f, "rb") as fh:
            head = fh.read(8)
            header_len = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            try:
                if not 0 < header_len <= size - 8:
                    raise ValueError("bad header length")
                header = json.loads(fh.read(header_len))
                end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
            except (ValueError, KeyError, TypeError) as e:
                raise ModelFetchError(f"{source}: {f.name} is not a valid safetensors file ({e}); "
                                      "re-download or re-save the model") from None
        if size < 8 + header_len + end:
            raise ModelFetchError(f"{source}: {f.name} is truncated ({size} bytes, header says "
                                  f"{8 + header_len + end}); delete it and fetch the model again")


def _from_hf(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download

    if revision is None:
        log.warning("hf://%s has no pinned revision: results are not reproducible; pin one with @<sha>", repo_id)
    try:
        # snapshot_download resumes partial files and skips complete ones; the token is read from HF_TOKEN.
        path = Path(snapshot_download(repo_id=repo_id, revision=revision,
                                      cache_dir=str(models_cache() / "hf"),
                                      allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.py"]))
        expected = hub_file_hashes(repo_id, revision)
    except Exception as e:  # network, auth or missing repo: say which and what to check
        raise ModelDownloadError(
            f"could not download hf://{repo_id}@{revision or 'main'}: {type(e).__name__}: {e}. "
            "Check the repo id and revision, network access to the Hub, and HF_TOKEN for gated models."
        ) from e
    wrong = hash_mismatches(path, expected)
    if wrong:
        raise ModelFetchError(
            f"hf://{repo_id}@{revision or 'main'}: {wrong} do not match the sha256 the Hub publishes for them; the "
            f"files on disk are corrupt or were changed. Delete {path} and fetch again; if it persists, do not use "
            "this copy")
    log.info("hf://%s: %d weight file(s) match the Hub's published sha256", repo_id, len(expected))
    return path


def hub_file_hashes(repo_id: str, revision: str | None) -> dict[str, str]:
    """The sha256 the Hub publishes for each large (LFS) file of the repo at ``revision``: weights, mostly."""
    from huggingface_hub import HfApi

    info = HfApi().model_info(repo_id, revision=revision, files_metadata=True)
    return {s.rfilename: s.lfs.sha256 for s in info.siblings or [] if getattr(s, "lfs", None) is not None}


def hash_mismatches(folder: Path, expected: dict[str, str]) -> list[str]:
    """The files under ``folder`` whose sha256 differs from ``expected`` (files not downloaded are skipped)."""
    import hashlib

    wrong = []
    for name, sha in sorted(expected.items()):
        f = Path(folder) / name
        if not f.is_file():
            continue  # outside allow_patterns: never used
        h = hashlib.sha256()
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        if h.hexdigest() != sha:
            wrong.append(name)
    return wrong


def _from_modelscope(model_id: str, revision: str | None) -> Path:
    try:
        from modelscope import snapshot_download  # optional dependency
    except ImportError as e:
        raise ModelFetchError("modelscope:// sources need `pip install modelscope`") from e
    return Path(snapshot_download(model_id, revision=revision or "master", cache_dir=str(models_cache() / "ms")))


def _from_object_store(uri: str) -> Path:
    import fsspec

    target = models_cache() / "objects" / uri.replace("://", "/").rstrip("/")
    if is_complete(target):
        return target
    fs, _, (root,) = fsspec.get_fs_token_paths(uri)
    target.mkdir(parents=True, exist_ok=True)
    for remote in fs.find(root):
        local = target / os.path.relpath(remote, root)
        local.parent.mkdir(parents=True, exist_ok=True)
        if not local.exists() or local.stat().st_size != fs.size(remote):
            fs.get(remote, str(local))  # per-file: an interrupted copy resumes at the next file
    mark_complete(target)
    return target
