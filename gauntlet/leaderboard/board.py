"""The board: every candidate × variant's report normalised, grouped by protocol, ranked, and compared
with past nights.

Scores are normalised as the Open LLM Leaderboard does (random baseline → 0, perfect → 100, below chance
→ 0) with the baseline each report's own task result carries, averaged per suite and over all tasks;
speed, latency, memory and size have their own columns; ranked by the configured key; every score has its
95% interval and rows that a paired test cannot tell apart share a rank range (leaderboard/uncertainty.py);
a row lacking the key's value is listed unranked with what is missing. Only reports with the same
protocol (:func:`gauntlet.eval.protocol.protocol_differences`) are ranked together; the others are listed
with the difference. No Prefect and no MLflow here.
"""

from __future__ import annotations

from datetime import UTC, datetime
from statistics import mean
from typing import Any, Literal

from pydantic import BaseModel

from gauntlet.config.eval import task_names
from gauntlet.config.leaderboard import PERF_RANK_KEYS, LeaderboardSpec
from gauntlet.eval.judge import JUDGE_TASK, WIN_RATE
from gauntlet.eval.protocol import protocol_differences, served_alike
from gauntlet.eval.safety import BENIGN_TASK, HARMFUL_RATE, HARMFUL_TASK, OVER_REFUSAL_RATE
from gauntlet.eval.scores import find, read
from gauntlet.hashing import sha256_json
from gauntlet.leaderboard.candidates import CandidateOutcome
from gauntlet.leaderboard.uncertainty import add_uncertainty
from gauntlet.refs import EvalReport, MetricLookupError
from gauntlet.tracking import git_commit

SCHEMA_VERSION = 1


def protocol_id(report: EvalReport) -> str:
    """A short name of the report's evaluation protocol: equal ids ⇔ ``protocols_match``."""
    return sha256_json(report.protocol)[:12]


def protocol_difference(a: EvalReport, b: EvalReport, limit: int = 4) -> str:
    """The first differences between two reports' protocols, for the reason an unranked row shows."""
    diffs = protocol_differences(a, b)
    return "; ".join(diffs[:limit]) + (f" (+{len(diffs) - limit} more)" if len(diffs) > limit else "")


def task_baseline(report: EvalReport, task_name: str) -> tuple[float, str] | None:
    """The random baseline the evaluation used for ``task_name`` and where it came from (None: not evaluated)."""
    result = report.result(task_name)
    return None if result is None else (result.random_baseline, result.random_baseline_source)


# Measured beside the scores when the reports have them (eval.perplexity, eval.safety, eval.judge), each with
# its 95% interval; none enters the average or the rank. name -> (column heading, shown in percent).
MEASURES = {"byte_perplexity": ("held-out ppl ↓", False), HARMFUL_RATE: ("harmful % ↓", True),
            OVER_REFUSAL_RATE: ("over-refusal % ↓", True), WIN_RATE: ("judge win %", True)}


class Measure(BaseModel):
    value: float
    lo: float | None = None
    hi: float | None = None

    def text(self, percent: bool) -> str:
        k = 100.0 if percent else 1.0
        digits = 1 if percent else 2
        return f"{self.value * k:.{digits}f}" + ("" if self.lo is None or self.hi is None else
                                                 f" ({self.lo * k:.{digits}f}–{self.hi * k:.{digits}f})")


def measures_of(report: EvalReport) -> dict[str, Measure]:
    """The report's held-out perplexity, safety rates and judge win rate, where it has them."""
    out = {}
    if report.perplexity is not None:
        p = report.perplexity
        out["byte_perplexity"] = Measure(value=p.byte_perplexity, lo=p.ci_low, hi=p.ci_high)
    for task, metric in ((HARMFUL_TASK, HARMFUL_RATE), (BENIGN_TASK, OVER_REFUSAL_RATE), (JUDGE_TASK, WIN_RATE)):
        s = find(report, task, metric)
        if s is not None:
            out[metric] = Measure(value=s.value, lo=s.ci_low, hi=s.ci_high)
    return out


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
    objective: str | None = None         # training objective (sft, dpo, ...); None: unknown (and on older boards)
    rank: int | None = None
    tie: bool = False                            # indistinguishable from a neighbour: a rank range, not a rank
    rank_low: int | None = None                  # the rank range (leaderboard/uncertainty.py): 2..3
    rank_high: int | None = None
    rank_value: float | None = None
    ci_low: float | None = None                  # 95% interval of rank_value (score keys)
    ci_high: float | None = None
    intervals: dict[str, tuple[float, float] | None] = {}  # task -> 95% interval of its normalised score
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
    measures: dict[str, Measure] = {}            # MEASURES the report has: perplexity, safety rates, win rate
    delta_average: float | None = None           # against the previous night, same protocol
    delta_note: str | None = None
    trend: list[TrendPoint] = []                 # past nights (oldest first) and tonight
    protocol_id: str | None = None
    report_path: str | None = None
    eval_run_id: str | None = None
    host: str | None = None                      # where the job ran (its JobRecord)
    worker: str | None = None
    gpu: str | None = None
    wall_s: float | None = None
    gpu_s: float | None = None
    cost_usd: float | None = None                # an endpoint's evaluation at its configured price
    task_seconds: dict[str, float] = {}          # task -> seconds per item on this row's device (the night plan)

    @property
    def key(self) -> str:
        return f"{self.candidate}|{self.variant}"

    @property
    def rank_text(self) -> str:
        """``3``, or ``2–3`` when the row cannot be told apart from its neighbours, or ``—``."""
        if self.rank is None:
            return "—"
        if self.rank_low is not None and self.rank_high is not None and self.rank_low != self.rank_high:
            return f"{self.rank_low}–{self.rank_high}"
        return f"{self.rank}{'=' if self.tie else ''}"


class WorkerLoad(BaseModel):
    worker: str
    gpu: str
    jobs: int
    gpu_s: float                                 # seconds its jobs spent on the device
    busy: float | None = None                    # gpu_s over the night's wall time (0..1)


def worker_loads(rows: list[BoardRow], wall_s: float | None) -> list[WorkerLoad]:
    """Each worker's jobs and device time, and its share of the night's wall time."""
    loads: dict[tuple[str, str], list[BoardRow]] = {}
    for r in rows:
        if r.worker and r.gpu_s is not None:
            loads.setdefault((r.worker, r.gpu or "?"), []).append(r)
    return [WorkerLoad(worker=w, gpu=g, jobs=len(rs), gpu_s=round(sum(r.gpu_s or 0 for r in rs), 2),
                       busy=round(sum(r.gpu_s or 0 for r in rs) / wall_s, 3) if wall_s else None)
            for (w, g), rs in sorted(loads.items())]


def _job_columns(row: BoardRow, outcome: CandidateOutcome) -> None:
    if outcome.job is not None:
        row.host, row.worker, row.gpu = outcome.job.host, outcome.job.worker, outcome.job.gpu
        row.wall_s, row.gpu_s = round(outcome.job.wall_s, 2), round(outcome.job.gpu_s, 2)
    if outcome.report is not None:
        row.task_seconds = {r.task: round(r.seconds / items, 6) for r in outcome.report.task_results
                            if (items := sum(r.n_samples.values())) and r.seconds}


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
    measures: list[str] = []                     # MEASURES some ranked row has (their columns)
    rows: list[BoardRow]
    workers: list[WorkerLoad] = []               # how busy each GPU worker was tonight
    wall_s: float | None = None                  # the night, from its first job's start to its last one's end
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
    """Raw and normalized scores (with the report's own per-task baselines), suite means, speed columns.
    A metric name fitting several filtered scores of a task leaves it missing, naming them."""
    tasks = task_names(spec.eval.tasks)   # a task listed with its own settings is named by its name
    for t in tasks:
        metric, why = metric_of(spec, t), ""
        try:
            score = read(report, t, metric)
        except MetricLookupError as e:
            score, why = None, f" ({e.explain(f'ranking.task_metrics.{t}')})" if e.ambiguous else ""
        row.raw[t] = None if score is None else score.value
        row.normalized[t] = None if score is None else score.normalized   # None: no baseline (not evaluated)
        if row.normalized[t] is None:
            row.missing.append(f"{t}.{metric}{why}")
    for suite, members in spec.ranking.suites.items():
        row.suites[suite] = _mean_of_all([row.normalized[t] for t in members])
    row.average = _mean_of_all([row.normalized[t] for t in tasks])
    if report.perf:
        for k in PERF_RANK_KEYS:
            setattr(row, k, getattr(report.perf, k))
    row.measures = measures_of(report)


def _mean_of_all(values: list[float | None]) -> float | None:
    """The mean, or None when any value is missing."""
    known = [v for v in values if v is not None]
    return mean(known) if len(known) == len(values) else None


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


def _ranked_value(row: BoardRow, key: str) -> float:
    value = rank_value(row, key)
    assert value is not None   # only rows with a value for the key are ranked
    return value


def assign_ranks(rows: list[BoardRow], key: str, decimals: int) -> list[BoardRow]:
    """Competition ranking (1, 2, 2, 4) by ``key``; equal at ``decimals`` → the same rank, marked as a tie.
    Rows without a value for the key keep rank None and say what is missing. Returns the rows in order."""
    with_value = [r for r in rows if rank_value(r, key) is not None]
    without = [r for r in rows if rank_value(r, key) is None]
    with_value.sort(key=lambda r: _ranked_value(r, key), reverse=higher_is_better(key))
    previous: BoardRow | None = None
    previous_value = 0.0
    for i, r in enumerate(with_value):
        r.rank_value = value = _ranked_value(r, key)
        if previous is not None and round(value, decimals) == round(previous_value, decimals):
            r.rank, r.tie, previous.tie = previous.rank, True, True
        else:
            r.rank = i + 1
        previous, previous_value = r, value
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
        for board, by_key in zip(reversed(history), reversed(past), strict=True):
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


def ranked_group(rows: list[BoardRow], reports: dict[str, EvalReport]) -> EvalReport | None:
    """The ranked group's reference report: the protocol most reports share (ties: the newest report's); rows of
    another protocol become unranked, saying how theirs differs."""
    scored = [r for r in rows if r.status == "ranked"]
    if not scored:
        return None
    counts: dict[str | None, int] = {}
    for r in scored:
        counts[r.protocol_id] = counts.get(r.protocol_id, 0) + 1
    best = max(counts.values())
    reference = max((reports[r.key] for r in scored if counts[r.protocol_id] == best), key=lambda rep: rep.timestamp)
    for r in scored:
        if r.protocol_id != protocol_id(reference) and not served_alike(reports[r.key], reference):
            r.status = "unranked"
            r.reason = "different protocol, not ranked with the others: " + protocol_difference(reports[r.key],
                                                                                                  reference)
    return reference


def build_leaderboard(spec: LeaderboardSpec, outcomes: list[CandidateOutcome], history: list[Leaderboard],
                      night: str | None = None, wall_s: float | None = None) -> Leaderboard:
    """Normalise, group by protocol, rank, and compare with past nights (``history`` newest first).

    Every score is normalised with the random baseline its own evaluation used (declared in the task
    catalogue, or measured from the items); reports in the ranked group share one protocol, hence one
    baseline per task, which the board lists."""
    night = night or datetime.now(UTC).isoformat(timespec="seconds")
    rows: list[BoardRow] = []
    reports: dict[str, EvalReport] = {}
    for o in outcomes:
        row = BoardRow(candidate=o.candidate, variant=o.variant, source=o.source, note=o.note, cost_usd=o.cost_usd,
                       objective=o.objective, model_sha=o.model_sha, status="failed" if o.status == "failed" else
                       "skipped" if o.status == "skipped" else "ranked", reason=o.reason)
        if o.report is not None:
            _score_columns(row, o.report, spec)
            row.protocol_id = protocol_id(o.report)
            row.report_path, row.eval_run_id = o.report.report_path, o.report.mlflow_run_id
            reports[row.key] = o.report
        _job_columns(row, o)
        rows.append(row)

    reference = ranked_group(rows, reports)

    key = spec.ranking.key
    ranked = assign_ranks([r for r in rows if r.status == "ranked"], key, spec.ranking.tie_decimals)
    tasks = task_names(spec.eval.tasks)
    add_uncertainty(ranked, reports, key, tasks, dict(spec.ranking.suites),
                    lambda t: metric_of(spec, t))
    order = {"unranked": 1, "failed": 2, "skipped": 3}
    rest = sorted((r for r in rows if r.status != "ranked"), key=lambda r: (order[r.status], r.key))
    rows = ranked + rest
    _deltas_and_trends(rows, night, history)
    nights = [b.night for b in reversed(history)] + [night]
    return Leaderboard(
        name=spec.name, title=spec.publish.title or f"Gauntlet leaderboard — {spec.name}", night=night,
        rank_key=key, higher_is_better=higher_is_better(key), tasks=tasks,
        task_metrics={t: metric_of(spec, t) for t in tasks}, suites=dict(spec.ranking.suites),
        baselines={t: {"value": b[0], "source": b[1]} for t in tasks
                   if reference and (b := task_baseline(reference, t)) is not None},
        protocol=reference.protocol if reference else None,
        protocol_id=protocol_id(reference) if reference else None,
        versions={"gauntlet_commit": git_commit(), **({k: v for k, v in reference.versions.items() if k != "tasks"}
                                                      if reference else {})},
        previous_night=history[0].night if history else None, nights=nights, rows=rows,
        workers=worker_loads(rows, wall_s), wall_s=round(wall_s, 2) if wall_s else None,
        measures=[m for m in MEASURES if any(m in r.measures for r in ranked)])


def pareto_front(points: list[tuple[str, float, float]]) -> set[str]:
    """Keys of the points (key, throughput, score) that no other point beats on both axes (higher is better)."""
    front: set[str] = set()
    best_score = float("-inf")
    for key, _x, y in sorted(points, key=lambda p: (-p[1], -p[2])):
        if y > best_score:
            front.add(key)
            best_score = y
    return front


def short_night(night: str) -> str:
    """``2026-11-25T02:00:03+00:00`` → ``2026-11-25 02:00`` for tables and axes."""
    return night[:16].replace("T", " ")
