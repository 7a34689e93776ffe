"""Submissions: a candidate a team member queues for a board (``gauntlet submit``, the ``submit/manual`` form), checked
before it queues, kept in the shared store, and evaluated by the board's next night beside the config's candidates.

Before it queues, a submission is checked (:func:`check`), each refusal naming why and the fix: its source against
the board's ``sources.allow``; a pinned revision (``hf://`` at a commit, ``models:/NAME/VERSION``, ``demo://``; a
local folder is pinned by its content sha256, computed at submission); that its config.json and tokenizer load
(transformers' AutoConfig/AutoTokenizer; no weights are fetched); and the GPU class its evaluation needs (the
planner's ``class_for_inference``). A refused submission is recorded too, with its reasons.

The store is the board's MLflow tracking store (what decides lives on the servers): one run per submission in the
experiment ``gauntlet-submissions/<board>``, its facts as ``submission.*`` tags (source, name, revision, sha,
submitter, submitted_at, deadline, state, reason, gpu_class, night, settled_at, notified). The state moves queued →
evaluating → ranked | failed, or is refused at once. Each submission is also an audit entry (``submit``).

The board's next night takes the queued ones (:func:`take`: marked evaluating, a local folder hashed again), each as
the :class:`LeaderboardCandidate` a config entry would be, and settles them from their rows (:func:`settle`). One
that fails, or misses its 24-hour promise, is told to the board's ``notify`` webhooks (:func:`notices`). No Prefect.

Long: one submission's life (its checks, its record, the night's part) is read together, in this order.
"""

from __future__ import annotations

import os
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ValidationError

from gauntlet.config.leaderboard import LeaderboardCandidate, LeaderboardSpec
from gauntlet.config.model import REGISTRY_SCHEME, REGISTRY_URI
from gauntlet.config.problems import SpecProblem
from gauntlet.leaderboard.board import Leaderboard
from gauntlet.notify import Notice

PROMISE = timedelta(hours=24)                 # a submission is evaluated within this, or its submitter is told
State = Literal["queued", "evaluating", "ranked", "failed", "refused"]
PENDING = ("queued", "evaluating")
TAG = "submission."
COMMIT = re.compile(r"^[0-9a-f]{7,40}$")
NAME = re.compile(r"^[A-Za-z0-9][\w.@/+-]{0,99}$")
HUB_FILES = ["*.json", "*.model", "*.txt", "*.jinja", "*.tiktoken"]    # config and tokenizer, never weights
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".onnx", ".ckpt")
SOURCES_TAKEN = ("a local folder saved with save_pretrained(), hf://org/name@<commit sha>, models:/NAME/VERSION or "
                 "demo://")


def experiment_name(board: str) -> str:
    """The MLflow experiment holding a board's submissions."""
    return f"gauntlet-submissions/{board}"


def submitter() -> str:
    """Who submits: ``$GAUNTLET_USER``, else the login name."""
    from gauntlet.audit import user

    return os.environ.get("GAUNTLET_USER") or user()


class Submission(BaseModel):
    id: str | None = None                 # its MLflow run
    board: str
    name: str
    source: str
    revision: str | None = None           # what pins it: a hub commit, a registry version, "demo"
    sha: str | None = None                # a local folder's content sha256, at submission
    submitter: str
    submitted_at: datetime
    deadline: datetime
    state: State
    reason: str | None = None
    gpu_class: str | None = None
    night: str | None = None              # the leaderboard flow run that took it
    settled_at: datetime | None = None
    notified: str | None = None           # what its submitter was told: "failed", "late", "failed,late"
    config: str | None = None             # the board's config, as it was named
    problems: list[SpecProblem] = []      # a refusal's checks (not stored: ``reason`` says them)

    @property
    def candidate(self) -> LeaderboardCandidate:
        return LeaderboardCandidate(source=self.source, name=self.name)

    def tags(self) -> dict[str, str]:
        values = self.model_dump(mode="json", exclude={"id", "problems"})
        return {TAG + k: str(v)[:5000] for k, v in values.items() if v is not None}

    @classmethod
    def from_run(cls, run: Any) -> Submission:
        tags = {k.removeprefix(TAG): v for k, v in run.data.tags.items() if k.startswith(TAG)}
        return cls.model_validate({**tags, "id": run.info.run_id})


DEFAULT_BOARD = "configs/leaderboard.yaml"


def board_config(board: str | None, base: Path) -> Path:
    """A board's leaderboard config: a path (from ``base``, or the project root), or the board's name, found among
    the project's ``configs/*.yaml`` leaderboard configs; SpecError naming the fix when neither is there."""
    from gauntlet.config.load import config_kind, read_config
    from gauntlet.config.problems import SpecError
    from gauntlet.project import in_project, project_root

    board = board or DEFAULT_BOARD
    for path in (base / board, in_project(board)):
        if path.is_file():
            return path.resolve()
    configs = sorted(p for p in (project_root() / "configs").glob("*.y*ml") if config_kind(p) == "leaderboard")
    named = [p for p in configs if read_config(p).get("name", "nightly") == board]
    if len(named) == 1:
        return named[0]
    known = ", ".join(f"{read_config(p).get('name', 'nightly')} ({p.name})" for p in configs) or "none"
    raise SpecError(board, [SpecProblem(path="board", message=f"no leaderboard config at {board!r}, and "
                                        f"{len(named) or 'no'} board(s) of that name in configs/",
                                        hint=f"give a config's path, or a board's name: {known}")])


# ---------------------------------------------------------------------------------------------
# the checks before it queues
# ---------------------------------------------------------------------------------------------


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


def submit(spec: LeaderboardSpec, source: str, *, name: str | None = None, by: str | None = None, c: Any = None,
           now: datetime | None = None, config: str | None = None) -> Submission:
    """Check ``source`` and record it for the board: queued, or refused with its problems (``problems``)."""
    from gauntlet.audit import record as audit
    from gauntlet.tracking import tracking_uri

    uri = tracking_uri(spec.tracking.tracking_uri)
    c = c or store(spec)
    now = now or datetime.now(UTC)
    source = normal_source(source)
    name = name or default_name(source)
    taken = {x.display_name for x in spec.candidates} | {s.name for s in status(spec.name, c) if s.state in PENDING}
    facts, problems = check(spec, source, name, taken, uri)
    sub = Submission(board=spec.name, name=name, source=source, submitter=by or submitter(), submitted_at=now,
                     deadline=now + PROMISE, state="refused" if problems else "queued",
                     reason=refusal_text(problems) if problems else None, config=config, **facts)
    sub = record(c, sub).model_copy(update={"problems": problems})
    audit("submit", f"{spec.name}: {name}", sub.reason or "queued for the board's next night", by=sub.submitter,
          client=c, board=spec.name, source=source, state=sub.state, submission=sub.id, gpu_class=sub.gpu_class)
    return sub


# ---------------------------------------------------------------------------------------------
# the store: one MLflow run per submission
# ---------------------------------------------------------------------------------------------


def store(spec: LeaderboardSpec) -> Any:
    """An MLflow client on the board's tracking store."""
    from gauntlet.tracking import client, tracking_uri

    return client(tracking_uri(spec.tracking.tracking_uri))


def record(c: Any, sub: Submission) -> Submission:
    from gauntlet.tracking import experiment_id

    run = c.create_run(experiment_id(c, experiment_name(sub.board)), run_name=sub.name, tags=sub.tags(),
                       start_time=int(sub.submitted_at.timestamp() * 1000))
    c.set_terminated(run.info.run_id, "FINISHED")   # a record, not a process: its state is the tag
    return sub.model_copy(update={"id": run.info.run_id})


def mark(c: Any, sub: Submission, state: State, reason: str | None = None, **facts: Any) -> Submission:
    """``sub`` moved to ``state`` (with its reason and any other facts), in the store too."""
    from mlflow.entities import RunTag

    updated = sub.model_copy(update={"state": state, "reason": reason, **facts})
    new, old = updated.tags(), sub.tags()
    c.log_batch(sub.id, tags=[RunTag(k, v) for k, v in new.items() if old.get(k) != v])
    for k in set(old) - set(new):
        c.delete_tag(sub.id, k)
    return updated


def status(board: str, c: Any = None) -> list[Submission]:
    """Every submission of the board, oldest first."""
    from gauntlet.tracking import client, tracking_uri

    c = c or client(tracking_uri())
    exp = c.get_experiment_by_name(experiment_name(board))
    if exp is None:
        return []
    found, token = [], None
    while True:
        page = c.search_runs([exp.experiment_id], max_results=1000, page_token=token)
        found += [Submission.from_run(r) for r in page if f"{TAG}state" in r.data.tags]
        token = page.token
        if not token:
            return sorted(found, key=lambda s: s.submitted_at)


def queued(board: str, c: Any = None) -> list[Submission]:
    """The board's submissions waiting for a night, oldest first."""
    return [s for s in status(board, c) if s.state == "queued"]


# ---------------------------------------------------------------------------------------------
# the night: take the queue, settle it from the board, tell who must be told
# ---------------------------------------------------------------------------------------------


def changed_since(sub: Submission) -> str | None:
    """Why a local submission can no longer be evaluated as submitted (its folder changed or went), or None."""
    from gauntlet.hashing import sha256_dir

    folder = local_folder(sub.source)
    if sub.sha is None or folder is None:
        return None
    now = sha256_dir(folder) if folder.is_dir() else None
    if now == sub.sha:
        return None
    return (f"the folder {folder} changed since it was submitted (sha256 {sub.sha[:12]} then, "
            f"{now[:12] if now else 'no folder'} now). Fix: submit it again")


def take(spec: LeaderboardSpec, c: Any, night: str, now: datetime | None = None) -> list[Submission]:
    """Tonight's submissions: each queued one, and each this night took on an earlier attempt, marked evaluating; one
    whose folder changed since, or whose name a config candidate now has, failed instead."""
    names, taken = {x.display_name for x in spec.candidates}, []
    for s in status(spec.name, c):
        if not (s.state == "queued" or (s.state == "evaluating" and s.night == night)):
            continue
        why = changed_since(s) or (f"{s.name!r} is now a candidate of the config (or taken twice). Fix: submit it "
                                   "again with another --name" if s.name in names else None)
        taken.append(mark(c, s, "failed", why, night=night, settled_at=now or datetime.now(UTC)) if why
                     else mark(c, s, "evaluating", night=night))
        names.add(s.name)
    return taken


def with_submissions(spec: LeaderboardSpec, taken: list[Submission]) -> LeaderboardSpec:
    """The night's spec: the config's candidates and the submissions being evaluated."""
    extra = [s.candidate for s in taken if s.state == "evaluating"]
    return spec.model_copy(update={"candidates": [*spec.candidates, *extra]}) if extra else spec


def submitted_candidate(spec: LeaderboardSpec, name: str, c: Any) -> LeaderboardCandidate:
    """The candidate of the board's submission ``name`` now being evaluated (a pool job's, read from the store)."""
    for s in status(spec.name, c):
        if s.name == name and s.state == "evaluating":
            return s.candidate
    raise LookupError(f"no candidate {name!r} in the config, and no submission of that name being evaluated")


def verdict(board: Leaderboard, name: str) -> tuple[State, str]:
    rows = [r for r in board.rows if r.candidate == name]
    ranked = sorted((r for r in rows if r.status == "ranked"), key=lambda r: r.rank or 0)
    if ranked:
        best = ranked[0]
        score = f", average {best.average:.1f}" if best.average is not None else ""
        return "ranked", f"rank {best.rank_text} of {len(board.ranked())} on {board.night} ({best.variant}{score})"
    if not rows:
        return "failed", f"no row on the board of {board.night}"
    return "failed", "; ".join(f"{r.variant} {r.status}: {r.reason or 'no reason given'}" for r in rows)


def settle(taken: list[Submission], board: Leaderboard | None, error: str | None, c: Any,
           now: datetime | None = None) -> list[Submission]:
    """Tonight's submissions ranked or failed from their rows (``board`` None: the night failed with ``error``)."""
    now = now or datetime.now(UTC)
    settled = []
    for s in taken:
        if s.state != "evaluating":
            settled.append(s)
            continue
        state, why = (verdict(board, s.name) if board is not None
                      else ("failed", f"the night failed before ranking ({error}). Fix: submit it again"))
        settled.append(mark(c, s, state, why, settled_at=now))
    return settled


def duration(td: timedelta) -> str:
    minutes = int(abs(td).total_seconds() // 60)
    days, hours, mins = minutes // 1440, minutes // 60 % 24, minutes % 60
    return f"{days} d {hours} h" if days >= 2 else f"{days * 24 + hours} h {mins:02d} m"


def promise(sub: Submission, now: datetime | None = None) -> str:
    """The 24-hour promise: time left, how late, or how it was kept."""
    now = now or datetime.now(UTC)
    if sub.state == "refused":
        return "refused at submission"
    if sub.state in PENDING:
        left = sub.deadline - now
        return f"{duration(left)} left" if left >= timedelta(0) else f"late by {duration(left)}"
    done = sub.settled_at or now
    took = f"{sub.state} {duration(done - sub.submitted_at)} after submission"
    return f"{took}, late by {duration(done - sub.deadline)}" if done > sub.deadline else f"{took}, in time"


def notices(subs: list[Submission], now: datetime | None = None) -> list[tuple[Submission, str, Notice]]:
    """What to tell each submitter once: a failed submission, and one that missed its promise (still pending past
    its deadline, or settled after it). Sent as the ``run_failed`` event (``notify.webhooks[].events``)."""
    now = now or datetime.now(UTC)
    out = []
    for s in subs:
        told = set((s.notified or "").split(",")) - {""}
        due = ({"failed"} if s.state == "failed" else set()) | (
            {"late"} if s.state != "refused" and (s.settled_at or now) > s.deadline else set())
        if not due - told:
            continue
        verdict_line = (f"submission {s.name} by {s.submitter} failed on board {s.board}: {s.reason}"
                        if "failed" in due - told else
                        f"submission {s.name} by {s.submitter} missed its 24-hour promise on board {s.board}")
        reasons = [f"submitted by {s.submitter} at {s.submitted_at:%Y-%m-%d %H:%M} UTC: {s.source}",
                   f"promise: {promise(s, now)}", f"state: {s.state}"]
        out.append((s, ",".join(sorted(due | told)), Notice(event="run_failed", model_name=s.name,
                                                             verdict=verdict_line[:1000], reasons=reasons,
                                                             mlflow_run_id=s.id)))
    return out


def mark_notified(c: Any, sub: Submission, told: str) -> Submission:
    c.set_tag(sub.id, f"{TAG}notified", told)
    return sub.model_copy(update={"notified": told})
