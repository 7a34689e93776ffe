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

The checks themselves are :mod:`gauntlet.leaderboard.submission_checks`.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel

from gauntlet.config.leaderboard import LeaderboardCandidate, LeaderboardSpec
from gauntlet.config.problems import SpecProblem
from gauntlet.leaderboard.board import Leaderboard
from gauntlet.leaderboard.submission_checks import check, default_name, local_folder, normal_source, refusal_text
from gauntlet.notify import Notice

PROMISE = timedelta(hours=24)                 # a submission is evaluated within this, or its submitter is told
State = Literal["queued", "evaluating", "ranked", "failed", "refused"]
PENDING = ("queued", "evaluating")
TAG = "submission."


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
