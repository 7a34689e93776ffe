"""The checks a submission passes before it queues (:func:`check`), each refusal naming why and the fix: the
source's form, the name, the board's ``sources.allow``, a pinned revision, that its config.json and tokenizer load
(no weights fetched), and the GPU class its evaluation needs. :mod:`gauntlet.leaderboard.submissions` records and
queues what passes. No Prefect, no MLflow writes.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from gauntlet.config.leaderboard import LeaderboardCandidate, LeaderboardSpec
from gauntlet.config.model import REGISTRY_SCHEME, REGISTRY_URI
from gauntlet.config.problems import SpecProblem

COMMIT = re.compile(r"^[0-9a-f]{7,40}$")
NAME = re.compile(r"^[A-Za-z0-9][\w.@/+-]{0,99}$")
HUB_FILES = ["*.json", "*.model", "*.txt", "*.jinja", "*.tiktoken"]    # config and tokenizer, never weights
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".onnx", ".ckpt")
SOURCES_TAKEN = ("a local folder saved with save_pretrained(), hf://org/name@<commit sha>, models:/NAME/VERSION or "
                 "demo://")


def local_folder(source: str) -> Path | None:
    """The folder of a local source (a path or file://), else None."""
    if source.startswith("file://"):
        return Path(source.removeprefix("file://"))
    return None if "://" in source or source.startswith(REGISTRY_SCHEME) else Path(source)


def normal_source(source: str) -> str:
    """A local path made absolute (from the working directory); other sources as given."""
    folder = local_folder(source.strip())
    return str(folder.expanduser().resolve()) if folder is not None and source.strip() else source.strip()


def form_problem(source: str) -> SpecProblem | None:
    """A source no candidate could have."""
    if not source:
        return SpecProblem(path="source", message="no source given", hint=f"submit {SOURCES_TAKEN}")
    try:
        LeaderboardCandidate(source=source)
    except ValidationError as e:
        message = "; ".join(str(err["msg"]).removeprefix("Value error, ") for err in e.errors())
        return SpecProblem(path="source", message=message, hint=f"submit {SOURCES_TAKEN}")
    return None


def name_problem(name: str, taken: set[str]) -> SpecProblem | None:
    if not NAME.match(name):
        return SpecProblem(path="name", message=f"{name!r} is not a candidate name (letters, digits and . _ @ / + -, "
                                                "at most 100)", hint="give --name, e.g. my-model-v2")
    if name in taken:
        return SpecProblem(path="name", message=f"{name!r} is already on this board (a config candidate, or a "
                                                "submission still queued or evaluating)", hint="give another --name")
    return None


def allow_problem(spec: LeaderboardSpec, source: str) -> SpecProblem | None:
    why = spec.sources.refusal(source)
    if why is None:
        return None
    return SpecProblem(path="sources.allow", message=f"{why} of board {spec.name}",
                       hint="submit a source one of those patterns matches, or ask the board's owner to add a "
                            "pattern to sources.allow in its config")


def pin_of(source: str) -> tuple[str | None, SpecProblem | None]:
    """(what pins the source, or why it is not pinned). A local folder: None, None (its sha256 pins it)."""
    if source.startswith(REGISTRY_SCHEME):
        match = REGISTRY_URI.match(source)
        if match and match["version"]:
            return match["version"], None
        name = match["name"] if match else "NAME"
        return None, SpecProblem(path="revision", message=f"{source} names an alias, which moves: the night would "
                                 "evaluate whatever it points to then",
                                 hint=f"submit a version: models:/{name}/VERSION")
    if local_folder(source) is not None:
        return None, None
    scheme, _, rest = source.partition("://")
    name, _, revision = rest.partition("@")
    if scheme == "demo":
        return "demo", None                  # built deterministically from the name
    if scheme != "hf":
        return None, SpecProblem(path="source", message=f"{scheme}:// sources are not taken as submissions (nothing "
                                 "here pins them)", hint=f"submit {SOURCES_TAKEN}; or ask the board's owner to make it "
                                                         "a candidate of the config")
    fix = f"pin a commit: hf://{name}@<commit sha> (the repository's 'Files and versions' history lists them)"
    if not revision:
        return None, SpecProblem(path="revision", message=f"hf://{name} has no revision: the hub's main branch moves",
                                 hint=fix)
    if not COMMIT.match(revision):
        return None, SpecProblem(path="revision", message=f"revision {revision!r} of hf://{name} is a branch or a "
                                                          "tag, which can move", hint=fix)
    return revision, None


def model_files(source: str, tracking_uri: str) -> Path:
    """A folder with the source's config.json and tokenizer files (never its weights)."""
    from gauntlet.models import demo_model_folder
    from gauntlet.state import models_cache

    folder = local_folder(source)
    if folder is not None:
        return folder
    if source.startswith(REGISTRY_SCHEME):
        return registry_files(source, tracking_uri)
    scheme, _, rest = source.partition("://")
    name, _, revision = rest.partition("@")
    if scheme == "demo":
        return demo_model_folder(name)
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(repo_id=name, revision=revision, allow_patterns=HUB_FILES,
                                  cache_dir=str(models_cache() / "hf")))


def registry_files(source: str, tracking_uri: str) -> Path:
    """A registered version's files but its weights, downloaded once per version."""
    from mlflow.artifacts import download_artifacts, list_artifacts

    from gauntlet.models import registry_version
    from gauntlet.state import models_cache

    c, mv = registry_version(source, tracking_uri)
    target = models_cache() / "configs" / "registry-files" / mv.name / str(mv.version)
    if not (target / "config.json").is_file():
        uri = c.get_model_version_download_uri(mv.name, mv.version)
        for f in list_artifacts(artifact_uri=uri, tracking_uri=tracking_uri):
            if not f.is_dir and not f.path.endswith(WEIGHT_SUFFIXES):
                download_artifacts(artifact_uri=f"{uri}/{Path(f.path).name}", dst_path=str(target),
                                   tracking_uri=tracking_uri)
    return target


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300] if text else ''}"


def load_problem(source: str, tracking_uri: str) -> tuple[Path | None, SpecProblem | None]:
    """(the folder its config.json and tokenizer loaded from, or why they do not load)."""
    from transformers import AutoConfig, AutoTokenizer

    try:
        folder = model_files(source, tracking_uri)
    except Exception as e:   # network, auth, a missing repo, commit or version
        return None, SpecProblem(path="loads", message=f"{source}: its config.json and tokenizer could not be fetched "
                                 f"({_first_line(e)})", hint="check the repository, the commit or version, HF_TOKEN "
                                                             "and the network")
    if not folder.is_dir():
        return None, SpecProblem(path="source", message=f"{folder} is not a folder",
                                 hint="submit the folder the model was saved to with save_pretrained()")
    if not (folder / "config.json").is_file():
        return None, SpecProblem(path="loads", message=f"no config.json in {folder}",
                                 hint="submit the folder the model was saved to with save_pretrained()")
    for what, load in (("config.json", AutoConfig.from_pretrained), ("tokenizer", AutoTokenizer.from_pretrained)):
        try:
            load(str(folder), trust_remote_code=False)
        except Exception as e:   # a missing or malformed file, an architecture transformers does not ship
            return None, SpecProblem(path="loads", message=f"its {what} does not load with transformers "
                                     f"({_first_line(e)})", hint="submit a model saved with save_pretrained(), "
                                     "tokenizer included, whose architecture transformers ships (no remote code)")
    return folder, None


def gpu_problem(folder: Path, source: str) -> tuple[str | None, SpecProblem | None]:
    """(the GPU class its evaluation needs, or why none holds it), from config.json alone."""
    from gauntlet.plan.placement import PlacementError, class_for_inference
    from gauntlet.plan.shape import model_shape

    try:
        params_b = model_shape(folder, source).total_params / 1e9
    except Exception as e:   # a config transformers reads but cannot build
        return None, SpecProblem(path="gpu_class", message=f"its parameters could not be counted from config.json "
                                 f"({_first_line(e)})", hint="submit a causal language model transformers can build")
    try:
        return class_for_inference(params_b).name, None
    except PlacementError as e:
        message, _, fix = str(e).partition(" Fix: ")
        return None, SpecProblem(path="gpu_class", message=message, hint=fix)


def check(spec: LeaderboardSpec, source: str, name: str, taken: set[str],
          tracking_uri: str) -> tuple[dict[str, Any], list[SpecProblem]]:
    """The submission's facts (revision, sha, gpu_class) and its problems. The cheap checks (form, name, allow,
    pin) come first: a submission refused by them fetches nothing."""
    from gauntlet.hashing import sha256_dir

    if problem := form_problem(source):
        return {}, [problem]
    revision, pinned = pin_of(source)
    problems = [p for p in (name_problem(name, taken), allow_problem(spec, source), pinned) if p]
    if problems:
        return {"revision": revision}, problems
    folder, problem = load_problem(source, tracking_uri)
    if problem:
        return {"revision": revision}, [problem]
    assert folder is not None
    gpu_class, problem = gpu_problem(folder, source)
    sha = sha256_dir(folder) if local_folder(source) is not None else None
    return {"revision": revision, "sha": sha, "gpu_class": gpu_class}, [problem] if problem else []


def default_name(source: str) -> str:
    """The display name a config entry of this source would have (a hub commit shortened to 12 characters)."""
    base, _, revision = source.partition("@") if source.startswith("hf://") else (source, "", "")
    try:
        return LeaderboardCandidate(source=base, revision=revision or None).display_name
    except ValidationError:
        return source[:100]


def refusal_text(problems: list[SpecProblem]) -> str:
    return "; ".join(f"{p.path}: {p.message}" + (f" (fix: {p.hint})" if p.hint else "") for p in problems)
