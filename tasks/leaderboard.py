"""The nightly leaderboard: resolve candidates, normalise and rank their evaluation reports, publish.

The flow (flows/leaderboard.py) runs, for every candidate × variant, the same cached fetch →
(quantize) → evaluate tasks as the fine-tune flow. This module holds what is specific to the
leaderboard:

* **Candidates** are model sources like any flow's (``tasks.models.resolve_model``: registry aliases
  resolved each night, unpinned sources re-hashed). A candidate that cannot be resolved fails alone.
* **Ranking**: scores normalised as the Open LLM Leaderboard does (random baseline → 0, perfect → 100,
  below chance → 0), averaged per suite and over all tasks; speed, latency, memory and size in their own
  columns; ranked by the configured key; ties share a rank; a row lacking the key's value is listed
  unranked with what is missing. Only reports with the same protocol (eval settings, task hashes and
  versions, engine version, device and dtype) are ranked together; the others are listed with the
  difference.
* **History**: every night's ``leaderboard.json`` is an artifact of an MLflow run tagged
  ``gauntlet.leaderboard=<name>`` (experiment ``leaderboard``); the next night reads the previous ones
  back from MLflow for deltas and trends, so they survive restarts of everything but the tracking store.
* **Publication**: ``leaderboard.json`` / ``.md`` / ``.html`` (tasks/leaderboard_html.py), a Prefect
  table and markdown artifact, and the files logged to the night's MLflow run.

Normalization, baselines and protocols are the evaluation stage's: ``tasks.suites.normalized_score``
with the baseline each report's task result carries, and ``tasks.evaluate.protocol_differences``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from statistics import mean
from typing import Any, Literal

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, ValidationError

from tasks.evaluate import protocol_differences
from tasks.models import ResolvedModel
from tasks.refs import DatasetRef, EvalReport, ModelRef, Ref
from tasks.suites import normalized_score  # the evaluation stage's normalization
from tasks.spec import (
    LEADERBOARD_VARIANTS,
    PERF_RANK_KEYS,
    CalibrationSpec,
    LeaderboardCandidate,
    LeaderboardSpec,
    ModelSpec,
    QuantizeVariant,
    problems_from,
)
from tasks.state import PROJECT_ROOT, gauntlet_home, sha256_json
from tasks.tracking import RunContext, client, git_commit, stage_run

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1


class CandidateError(RuntimeError):
    """A candidate that cannot be resolved (missing folder, unknown registry alias, …): fails its row only."""


# ---------------------------------------------------------------------------------------------
# what the flow hands around
# ---------------------------------------------------------------------------------------------


class PreparedCandidate(Ref):
    resolved: ResolvedModel
    model: ModelRef


class CandidateOutcome(Ref):
    candidate: str
    variant: str
    source: str
    status: Literal["ok", "failed", "skipped"]
    reason: str | None = None
    note: str | None = None
    model_sha: str | None = None
    report: EvalReport | None = None


def variants_of(candidate: LeaderboardCandidate, spec: LeaderboardSpec) -> list[str]:
    return list(candidate.variants if candidate.variants is not None else spec.variants)


def ok_outcome(candidate: LeaderboardCandidate, variant: str, prepared: PreparedCandidate,
               report: EvalReport) -> CandidateOutcome:
    return CandidateOutcome(candidate=candidate.display_name, variant=variant, source=candidate.source, status="ok",
                            note=prepared.resolved.note, model_sha=report.model_sha, report=report)


def failed_outcome(candidate: LeaderboardCandidate, variant: str, reason: str) -> CandidateOutcome:
    return CandidateOutcome(candidate=candidate.display_name, variant=variant, source=candidate.source,
                            status="failed", reason=reason)


def skipped_outcome(candidate: LeaderboardCandidate, variant: str, reason: str) -> CandidateOutcome:
    return CandidateOutcome(candidate=candidate.display_name, variant=variant, source=candidate.source,
                            status="skipped", reason=reason)


def failure_reason(state: Any) -> str:
    """A failed Prefect state's exception as ``Type: message`` (its state message otherwise)."""
    try:
        exc = state.result(raise_on_failure=False)
    except Exception as e:  # the result itself could not be read back
        exc = e
    if isinstance(exc, BaseException):
        return f"{type(exc).__name__}: {exc}"
    return state.message or f"{state.name}"


# ---------------------------------------------------------------------------------------------
# resolving candidates
# ---------------------------------------------------------------------------------------------


def candidate_model(candidate: LeaderboardCandidate) -> ModelSpec:
    """The candidate as a model source; CandidateError (its row fails, not the night) when it cannot exist."""
    raw = {"source": candidate.source, "revision": candidate.revision, "trust_remote_code": candidate.trust_remote_code}
    try:
        return ModelSpec.model_validate(raw, context={"root": PROJECT_ROOT})
    except ValidationError as e:
        raise CandidateError(f"candidate {candidate.display_name}: "
                             + "; ".join(f"{p.path}: {p.message}" for p in problems_from(e, ModelSpec))) from None


def preload_model_libraries() -> None:
    """Import transformers' auto classes and lm-eval's hf model once, before candidates run in threads.

    transformers resolves its attributes lazily, and two threads doing that for the first time at once
    can leave ``transformers.AutoConfig`` missing in one of them (seen as
    ``AttributeError: module 'transformers' has no attribute 'AutoConfig'`` when a demo model is being
    built while another candidate starts its evaluation).
    """
    import transformers
    from lm_eval.models import huggingface  # noqa: F401  (registers and imports the hf backend)

    for name in ("AutoConfig", "AutoModelForCausalLM", "AutoTokenizer", "LlamaConfig", "LlamaForCausalLM",
                 "PreTrainedTokenizerFast"):
        getattr(transformers, name)


# ---------------------------------------------------------------------------------------------
# evaluation data given as a plain file
# ---------------------------------------------------------------------------------------------


def eval_file_dataset(path: Path) -> DatasetRef:
    """A DatasetRef carrying only evaluation items from a plain JSONL file (md5 of its bytes as version)."""
    data = path.read_bytes()
    md5 = hashlib.md5(data).hexdigest()
    rows = sum(1 for line in data.splitlines() if line.strip())
    return DatasetRef(repo=str(path.parent), train_path="", validation_path="", eval_path=str(path), md5=md5,
                      file_md5={path.name: md5}, eval_md5=md5, rows={"eval": rows})


def task_data_dataset() -> DatasetRef:
    """No run eval data: each task reads the files its YAML names (the suites' own data)."""
    return DatasetRef(repo="", train_path="", validation_path="", md5="task-yaml-data", file_md5={}, rows={})


# ---------------------------------------------------------------------------------------------
# variants: the quantization stage, when this build has it
# ---------------------------------------------------------------------------------------------


def quantization_of(variant: str) -> QuantizeVariant | None:
    return LEADERBOARD_VARIANTS[variant]


def variant_skip_reason(variant: str, data: DatasetRef | None) -> str | None:
    """Why this variant cannot be produced tonight (None: it can). Never replaced by a made-up score."""
    quant = quantization_of(variant)
    if quant is not None and quant.calibrated and (data is None or not data.train_path):
        return (f"{variant} calibrates on the run's data: give the leaderboard config a data: section whose "
                "train file holds calibration rows; not evaluated")
    return None


def quantize_for_leaderboard(variant: str, calibration: CalibrationSpec, model: ModelRef, data: DatasetRef,
                             run: RunContext, tags: list[str]) -> ModelRef:
    """Produce ``variant`` of ``model`` with the pipeline's own (cached) quantize stage."""
    from tasks.quantize import QUANTIZE, quantize_task

    return QUANTIZE.run(quantize_task.with_options(tags=tags), variant=quantization_of(variant),
                        calibration=calibration, model=model, data=data, run=run)


# ---------------------------------------------------------------------------------------------
# protocol: the evaluation stage's (tasks/evaluate.protocol_of, protocol_differences)
# ---------------------------------------------------------------------------------------------


def protocol_id(report: EvalReport) -> str:
    """A short name of the report's evaluation protocol: equal ids ⇔ ``protocols_match``."""
    return sha256_json(report.protocol)[:12]


def protocol_difference(a: EvalReport, b: EvalReport, limit: int = 4) -> str:
    """The first differences between two reports' protocols, for the reason an unranked row shows."""
    diffs = protocol_differences(a, b)
    return "; ".join(diffs[:limit]) + (f" (+{len(diffs) - limit} more)" if len(diffs) > limit else "")


def task_baseline(report: EvalReport, task_name: str) -> tuple[float, str] | None:
    """The random baseline the evaluation used for ``task_name`` and where it came from (None: not evaluated)."""
    result = next((r for r in report.task_results if r.task == task_name), None)
    return None if result is None else (result.random_baseline, result.random_baseline_source)


# ---------------------------------------------------------------------------------------------
# the leaderboard
# ---------------------------------------------------------------------------------------------


class TrendPoint(BaseModel):
    night: str
    average: float


class BoardRow(BaseModel):
    candidate: str
    variant: str
    source: str
    status: Literal["ranked", "unranked", "failed", "skipped"]
    reason: str | None = None            # why unranked / failed / skipped, or what is missing
    note: str | None = None              # how the source was resolved
    rank: int | None = None
    tie: bool = False
    rank_value: float | None = None
    model_sha: str | None = None
    raw: dict[str, float | None] = {}            # task -> score as lm-eval reports it (0..1)
    normalized: dict[str, float | None] = {}     # task -> 0..100 above the random baseline
    suites: dict[str, float | None] = {}         # suite -> mean of its tasks' normalised scores
    average: float | None = None                 # mean over all tasks (None when one is missing)
    missing: list[str] = []
    tokens_per_s: float | None = None
    first_token_latency_ms: float | None = None
    peak_memory_gb: float | None = None
    size_on_disk_gb: float | None = None
    delta_average: float | None = None           # against the previous night, same protocol
    delta_note: str | None = None
    trend: list[TrendPoint] = []                 # past nights (oldest first) and tonight
    protocol_id: str | None = None
    report_path: str | None = None
    eval_run_id: str | None = None

    @property
    def key(self) -> str:
        return f"{self.candidate}|{self.variant}"


class Leaderboard(BaseModel):
    schema_version: int = SCHEMA_VERSION
    name: str
    title: str
    night: str                                   # UTC timestamp of this run
    rank_key: str
    higher_is_better: bool
    tasks: list[str]
    task_metrics: dict[str, str]
    suites: dict[str, list[str]]
    baselines: dict[str, dict[str, Any]]         # task -> {value, source}
    protocol: dict | None = None                 # the ranked group's protocol
    protocol_id: str | None = None
    versions: dict[str, Any] = {}
    previous_night: str | None = None
    nights: list[str] = []                       # trend axis, oldest first, tonight last
    rows: list[BoardRow]
    flow_run_id: str | None = None
    mlflow_run_id: str | None = None
    files: dict[str, str] = {}

    def ranked(self) -> list[BoardRow]:
        return [r for r in self.rows if r.status == "ranked"]

    def row(self, candidate: str, variant: str) -> BoardRow | None:
        return next((r for r in self.rows if r.candidate == candidate and r.variant == variant), None)


def metric_of(spec: LeaderboardSpec, task_name: str) -> str:
    return spec.ranking.task_metrics.get(task_name, spec.ranking.metric)


def _score_columns(row: BoardRow, report: EvalReport, spec: LeaderboardSpec) -> None:
    """Raw and normalized scores (with the report's own per-task baselines), suite means, speed columns."""
    tasks = list(spec.eval.tasks)
    for t in tasks:
        value = report.score(t, metric_of(spec, t))
        baseline = task_baseline(report, t)
        row.raw[t] = value
        row.normalized[t] = None if value is None or baseline is None else normalized_score(value, baseline[0])
        if row.normalized[t] is None:
            row.missing.append(f"{t}.{metric_of(spec, t)}")
    for suite, members in spec.ranking.suites.items():
        values = [row.normalized[t] for t in members]
        row.suites[suite] = None if any(v is None for v in values) else mean(values)
    values = [row.normalized[t] for t in tasks]
    row.average = None if any(v is None for v in values) else mean(values)
    if report.perf:
        for k in PERF_RANK_KEYS:
            setattr(row, k, getattr(report.perf, k))


def rank_value(row: BoardRow, key: str) -> float | None:
    if key == "average":
        return row.average
    if key.startswith("suite:"):
        return row.suites.get(key[len("suite:"):])
    if key.startswith("task:"):
        return row.normalized.get(key[len("task:"):])
    return getattr(row, key)


def higher_is_better(key: str) -> bool:
    return PERF_RANK_KEYS.get(key, True)


def assign_ranks(rows: list[BoardRow], key: str, decimals: int) -> list[BoardRow]:
    """Competition ranking (1, 2, 2, 4) by ``key``; equal at ``decimals`` → the same rank, marked as a tie.
    Rows without a value for the key keep rank None and say what is missing. Returns the rows in order."""
    with_value = [r for r in rows if rank_value(r, key) is not None]
    without = [r for r in rows if rank_value(r, key) is None]
    with_value.sort(key=lambda r: rank_value(r, key), reverse=higher_is_better(key))
    previous: BoardRow | None = None
    for i, r in enumerate(with_value):
        r.rank_value = rank_value(r, key)
        if previous is not None and round(r.rank_value, decimals) == round(previous.rank_value, decimals):
            r.rank, r.tie, previous.tie = previous.rank, True, True
        else:
            r.rank = i + 1
        previous = r
    for r in without:
        lacking = ", ".join(r.missing) if r.missing else f"no {key} measurement"
        r.reason = f"not ranked by {key}: missing {lacking}"
    return with_value + sorted(without, key=lambda r: r.key)


def _history_rows(history: list[Leaderboard]) -> list[dict[str, BoardRow]]:
    return [{r.key: r for r in board.rows} for board in history]


def _deltas_and_trends(rows: list[BoardRow], night: str, history: list[Leaderboard]) -> None:
    """``history``: previous boards, newest first."""
    past = _history_rows(history)
    for row in rows:
        points: list[TrendPoint] = []
        for board, by_key in zip(reversed(history), reversed(past)):
            old = by_key.get(row.key)
            if old is None or old.average is None:
                continue
            if row.protocol_id and old.protocol_id != row.protocol_id:
                continue  # not comparable with tonight's number
            points.append(TrendPoint(night=board.night, average=old.average))
        if row.average is not None:
            points.append(TrendPoint(night=night, average=row.average))
        row.trend = points
        if not history:
            row.delta_note = "first night"
            continue
        previous = past[0].get(row.key)
        if row.average is None:
            row.delta_note = None
        elif previous is None or previous.average is None:
            row.delta_note = ("new tonight" if previous is None
                              else f"was {previous.status} on {short_night(history[0].night)}")
        elif previous.protocol_id != row.protocol_id:
            row.delta_note = f"protocol changed since {short_night(history[0].night)}"
        else:
            row.delta_average = row.average - previous.average
            if previous.model_sha and row.model_sha and previous.model_sha != row.model_sha:
                row.delta_note = "new weights"


def build_leaderboard(spec: LeaderboardSpec, outcomes: list[CandidateOutcome], history: list[Leaderboard],
                      night: str | None = None) -> Leaderboard:
    """Normalise, group by protocol, rank, and compare with past nights (``history`` newest first).

    Every score is normalised with the random baseline its own evaluation used (declared in the task
    catalogue, or measured from the items); reports in the ranked group share one protocol, hence one
    baseline per task, which the board lists."""
    night = night or datetime.now(timezone.utc).isoformat(timespec="seconds")
    rows: list[BoardRow] = []
    reports: dict[str, EvalReport] = {}
    for o in outcomes:
        row = BoardRow(candidate=o.candidate, variant=o.variant, source=o.source, note=o.note,
                       model_sha=o.model_sha, status="failed" if o.status == "failed" else
                       "skipped" if o.status == "skipped" else "ranked", reason=o.reason)
        if o.report is not None:
            _score_columns(row, o.report, spec)
            row.protocol_id = protocol_id(o.report)
            row.report_path, row.eval_run_id = o.report.report_path, o.report.mlflow_run_id
            reports[row.key] = o.report
        rows.append(row)

    # The ranked group: the protocol most reports share (ties: the newest report's).
    scored = [r for r in rows if r.status == "ranked"]
    reference: EvalReport | None = None
    if scored:
        counts: dict[str, int] = {}
        for r in scored:
            counts[r.protocol_id] = counts.get(r.protocol_id, 0) + 1
        best = max(counts.values())
        candidates = [reports[r.key] for r in scored if counts[r.protocol_id] == best]
        reference = max(candidates, key=lambda rep: rep.timestamp)
        for r in scored:
            if r.protocol_id != protocol_id(reference):
                r.status = "unranked"
                r.reason = ("different protocol, not ranked with the others: "
                            + protocol_difference(reports[r.key], reference))

    key = spec.ranking.key
    ranked = assign_ranks([r for r in rows if r.status == "ranked"], key, spec.ranking.tie_decimals)
    order = {"unranked": 1, "failed": 2, "skipped": 3}
    rest = sorted((r for r in rows if r.status != "ranked"), key=lambda r: (order[r.status], r.key))
    rows = ranked + rest
    _deltas_and_trends(rows, night, history)
    nights = [b.night for b in reversed(history)] + [night]
    return Leaderboard(
        name=spec.name, title=spec.publish.title or f"Gauntlet leaderboard — {spec.name}", night=night,
        rank_key=key, higher_is_better=higher_is_better(key), tasks=list(spec.eval.tasks),
        task_metrics={t: metric_of(spec, t) for t in spec.eval.tasks}, suites=dict(spec.ranking.suites),
        baselines={t: {"value": b[0], "source": b[1]} for t in spec.eval.tasks
                   if reference and (b := task_baseline(reference, t)) is not None},
        protocol=reference.protocol if reference else None,
        protocol_id=protocol_id(reference) if reference else None,
        versions={"gauntlet_commit": git_commit(), **({k: v for k, v in reference.versions.items() if k != "tasks"}
                                                      if reference else {})},
        previous_night=history[0].night if history else None, nights=nights, rows=rows)


def pareto_front(points: list[tuple[str, float, float]]) -> set[str]:
    """Keys of the points (key, throughput, score) that no other point beats on both axes (higher is better)."""
    front: set[str] = set()
    best_score = float("-inf")
    for key, _x, y in sorted(points, key=lambda p: (-p[1], -p[2])):
        if y > best_score:
            front.add(key)
            best_score = y
    return front


# ---------------------------------------------------------------------------------------------
# history in MLflow
# ---------------------------------------------------------------------------------------------

BOARD_TAG = "gauntlet.leaderboard"


def load_history(tracking_uri: str, experiment: str, name: str, limit: int,
                 exclude_run_id: str | None = None) -> list[Leaderboard]:
    """Previous nights' boards, newest first, from the leaderboard.json of FINISHED runs tagged with ``name``."""
    from mlflow.artifacts import download_artifacts

    c = client(tracking_uri)
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        return []
    runs = c.search_runs([exp.experiment_id],
                         filter_string=f"tags.`{BOARD_TAG}` = '{name}' and attributes.status = 'FINISHED'",
                         order_by=["attributes.start_time DESC"], max_results=limit + 1)
    boards: list[Leaderboard] = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in runs:
            if r.info.run_id == exclude_run_id:
                continue
            try:
                path = download_artifacts(run_id=r.info.run_id, artifact_path="leaderboard.json",
                                          dst_path=str(Path(tmp) / r.info.run_id), tracking_uri=tracking_uri)
                boards.append(Leaderboard.model_validate_json(Path(path).read_text()))
            except Exception as e:  # a night without a readable board is skipped, loudly
                log.warning("leaderboard history: run %s has no readable leaderboard.json (%s)", r.info.run_id, e)
    boards.sort(key=lambda b: b.night, reverse=True)
    return boards[:limit]


# ---------------------------------------------------------------------------------------------
# publication
# ---------------------------------------------------------------------------------------------


def publish_dir(spec: LeaderboardSpec) -> Path:
    if spec.publish.dir:
        p = Path(spec.publish.dir)
        return p if p.is_absolute() else PROJECT_ROOT / p
    return gauntlet_home() / "leaderboard" / spec.name


def _fmt(x: float | None, digits: int = 1, signed: bool = False) -> str:
    if x is None:
        return "—"
    return f"{x:+.{digits}f}" if signed else f"{x:.{digits}f}"


def one_line(text: str | None) -> str:
    """A reason on one line (tables cannot hold a traceback's line breaks)."""
    return " ".join((text or "").split()).replace("|", "/")


def short_night(night: str) -> str:
    """``2026-11-25T02:00:03+00:00`` → ``2026-11-25 02:00`` for tables and axes."""
    return night[:16].replace("T", " ")


def render_markdown(board: Leaderboard) -> str:
    suites = list(board.suites)
    head = (["rank", "model", "variant", "average"] + [f"suite {s}" for s in suites] + board.tasks
            + ["Δ avg", "tokens/s", "TTFT ms", "peak GB", "size GB"])
    lines = [f"# {board.title}", "",
             f"- night: {short_night(board.night)} UTC"
             + (f" (previous: {short_night(board.previous_night)})" if board.previous_night else ""),
             f"- ranked by **{board.rank_key}** ({'higher' if board.higher_is_better else 'lower'} is better); "
             "scores normalised: random baseline = 0, perfect = 100",
             f"- protocol `{board.protocol_id}`" if board.protocol_id else "- no model was scored",
             "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in board.rows:
        if r.status != "ranked":
            continue
        rank = "—" if r.rank is None else f"{r.rank}{'=' if r.tie else ''}"
        delta = _fmt(r.delta_average, signed=True) if r.delta_average is not None else (r.delta_note or "—")
        cells = ([rank, r.candidate, r.variant, _fmt(r.average)] + [_fmt(r.suites.get(s)) for s in suites]
                 + [_fmt(r.normalized.get(t)) for t in board.tasks]
                 + [delta, _fmt(r.tokens_per_s), _fmt(r.first_token_latency_ms), _fmt(r.peak_memory_gb, 3),
                    _fmt(r.size_on_disk_gb, 4)])
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    if any(r.tie for r in board.rows):
        lines += ["", "`=`: tied at the displayed precision."]
    unscored = [r for r in board.ranked() if r.rank is None]
    lines += [f"- {r.candidate} / {r.variant}: {one_line(r.reason)}" for r in unscored]
    others = [r for r in board.rows if r.status != "ranked"]
    if others:
        lines += ["", "## Not ranked", "", "| model | variant | status | reason |", "|---|---|---|---|"]
        lines += [f"| {r.candidate} | {r.variant} | {r.status} | {one_line(r.reason)} |" for r in others]
    lines += ["", "## Random baselines", ""]
    lines += [f"- {t} ({board.task_metrics[t]}): {b['value']:.4f} — {b['source']}" for t, b in board.baselines.items()]
    return "\n".join(lines) + "\n"


def write_board(board: Leaderboard, out_dir: Path) -> dict[str, str]:
    """Write leaderboard.json, leaderboard.md and the self-contained leaderboard.html; returns their paths."""
    from tasks.leaderboard_html import render_html

    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"json": out_dir / "leaderboard.json", "md": out_dir / "leaderboard.md",
             "html": out_dir / "leaderboard.html"}
    board = board.model_copy(update={"files": {k: str(v) for k, v in files.items()}})
    files["md"].write_text(render_markdown(board), encoding="utf-8")
    files["html"].write_text(render_html(board), encoding="utf-8")
    files["json"].write_text(json.dumps(board.model_dump(mode="json"), indent=2), encoding="utf-8")
    return board.files


def table_rows(board: Leaderboard) -> list[dict[str, Any]]:
    """One flat dict per row, for the Prefect table artifact."""
    out = []
    for r in board.rows:
        row: dict[str, Any] = {"rank": r.rank if r.rank is not None else "", "model": r.candidate,
                               "variant": r.variant, "status": r.status,
                               "average": None if r.average is None else round(r.average, 2)}
        row.update({t: None if r.normalized.get(t) is None else round(r.normalized[t], 2) for t in board.tasks})
        row.update({"delta": None if r.delta_average is None else round(r.delta_average, 2),
                    "tokens_per_s": r.tokens_per_s, "peak_memory_gb": r.peak_memory_gb,
                    "size_on_disk_gb": r.size_on_disk_gb, "reason": r.reason or r.delta_note or ""})
        out.append(row)
    return out


def _metric_name(*parts: str) -> str:
    safe = "".join(ch if ch.isalnum() or ch in "_-. /" else "_" for ch in ".".join(parts))
    return safe[:250]


# ---------------------------------------------------------------------------------------------
# the Prefect tasks
# ---------------------------------------------------------------------------------------------


@task(name="eval_data", cache_policy=NO_CACHE)
def eval_file_task(path: str | None) -> DatasetRef:
    if path is None:
        return task_data_dataset()
    p = Path(path)
    return eval_file_dataset(p if p.is_absolute() else PROJECT_ROOT / p)


def ensure_tag_concurrency_limit(tag: str, slots: int, overwrite: bool = False) -> int:
    """Create Prefect's tag concurrency limit ``tag`` with ``slots`` unless one exists (or ``overwrite``).
    Returns the limit in force."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as c:
        if not overwrite:
            try:
                return c.read_concurrency_limit_by_tag(tag).concurrency_limit
            except ObjectNotFound:
                pass
        c.create_concurrency_limit(tag=tag, concurrency_limit=slots)
    return slots


@task(name="gpu_concurrency_limit", cache_policy=NO_CACHE)
def ensure_gpu_limit_task(tag: str, slots: int) -> int:
    limit = ensure_tag_concurrency_limit(tag, slots)
    get_run_logger().info(f"tasks tagged {tag!r} run at most {limit} at a time (Prefect tag concurrency limit)")
    return limit


@task(name="rank", cache_policy=NO_CACHE)
def rank_task(spec: LeaderboardSpec, outcomes: list[CandidateOutcome], run: RunContext) -> Leaderboard:
    logger = get_run_logger()
    with stage_run(run, "rank", {"ranking.key": spec.ranking.key, "ranking.metric": spec.ranking.metric}) as (c, rid):
        history = load_history(run.tracking_uri, spec.tracking.experiment, spec.name, spec.publish.history_nights,
                               exclude_run_id=run.parent_run_id)
        board = build_leaderboard(spec, outcomes, history)
        for t, b in board.baselines.items():
            c.log_metric(rid, f"baseline.{t}", b["value"])
        c.log_metric(rid, "previous_nights", float(len(history)))
    logger.info(f"{len(board.ranked())} ranked, {len(history)} previous night(s) read from MLflow")
    return board.model_copy(update={"flow_run_id": run.flow_run_id, "mlflow_run_id": run.parent_run_id})


@task(name="publish", cache_policy=NO_CACHE)
def publish_task(spec: LeaderboardSpec, board: Leaderboard, run: RunContext) -> Leaderboard:
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    logger = get_run_logger()
    files = write_board(board, publish_dir(spec))
    board = board.model_copy(update={"files": files})
    c = client(run.tracking_uri)
    for path in files.values():
        c.log_artifact(run.parent_run_id, path)
    for r in board.rows:
        if r.average is not None:
            c.log_metric(run.parent_run_id, _metric_name("average", r.candidate, r.variant), r.average)
    c.log_metric(run.parent_run_id, "ranked", float(len(board.ranked())))
    c.log_metric(run.parent_run_id, "failed", float(sum(r.status == "failed" for r in board.rows)))
    markdown = render_markdown(board)
    create_table_artifact(table_rows(board), key=f"leaderboard-{spec.name}",
                          description=f"{board.title}, {board.night}")
    create_markdown_artifact(markdown, key=f"leaderboard-{spec.name}-summary",
                             description=f"{board.title}, {board.night}")
    logger.info(f"leaderboard published: {files['html']}")
    return board
