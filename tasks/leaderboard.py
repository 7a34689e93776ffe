"""The leaderboard's stages: each candidate prepared (resolve → fetch), each variant scored (quantize →
evaluate, tagged for the GPU concurrency limit), then the board ranked and published; the board's queued
submissions taken before (``gauntlet submit``) and settled after, their failures notified.

None is cached itself: the fetch, quantize and evaluate stages they call are, so an unchanged model is
not re-evaluated tonight. A candidate or variant that fails fails its own row; the night completes.
"""

from __future__ import annotations

import time
from typing import Any

from prefect.artifacts import create_markdown_artifact, create_table_artifact
from pydantic import BaseModel

from gauntlet.config.endpoint import EndpointEvalSpec
from gauntlet.config.leaderboard import LeaderboardCandidate, LeaderboardSpec
from gauntlet.device import placement
from gauntlet.leaderboard import submissions
from gauntlet.leaderboard.board import Leaderboard, build_leaderboard
from gauntlet.leaderboard.candidates import (
    CandidateOutcome,
    JobRecord,
    PreparedCandidate,
    candidate_model,
    endpoint_key,
    endpoint_prepared,
    eval_file_dataset,
    failed_outcome,
    ok_outcome,
    quantization_of,
)
from gauntlet.leaderboard.history import load_history
from gauntlet.leaderboard.night_plan import candidate_params
from gauntlet.leaderboard.publish import publish_dir, render_markdown, table_rows, write_board
from gauntlet.leaderboard.submissions import Submission
from gauntlet.names import mlflow_name
from gauntlet.notify import send
from gauntlet.plan.placement import PlacementError, class_for_inference
from gauntlet.project import in_project
from gauntlet.refs import DatasetRef
from gauntlet.serve import ensure_tag_concurrency_limit
from gauntlet.tasks._stage import StageRun, stage
from gauntlet.tasks.evaluate import evaluate
from gauntlet.tasks.models import fetch_model, resolve_model
from gauntlet.tasks.notify import read_secret
from gauntlet.tasks.quantize import quantize
from gauntlet.tasks.safety import check_safety


class NightJob(BaseModel):
    """What a pool job needs to rebuild its part of the night: the config it came from, as the parent read it."""

    config: str
    overrides: list[str] = []
    candidate: str

    def parameters(self, variant: str) -> dict[str, Any]:
        return {"config": self.config, "overrides": self.overrides, "candidate": self.candidate, "variant": variant}


def queue_for(candidate: LeaderboardCandidate, spec: LeaderboardSpec) -> str:
    """The work queue of the GPU class the candidate's evaluation needs (its parameters from config.json)."""
    params_b, _ = candidate_params(candidate) if candidate.endpoint is None else (0.0, "served: no weights here")
    return class_for_inference(params_b).name


JOB_ATTEMPTS = 3   # a job's flow run that crashed (its infrastructure, not the job) is submitted again, at most so often


def wait_for_end(flow_run_id: Any, timeout_s: float, every_s: float = 2.0) -> Any:
    """The flow run's final state, or None after ``timeout_s``. The Prefect server may be away for a while (a
    restart): the wait goes on through it."""
    from prefect.client.orchestration import get_client

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with get_client(sync_client=True) as c:
                state = c.read_flow_run(flow_run_id).state
            if state is not None and state.is_final():
                return state
        except Exception as e:   # the server restarting: ask again
            _logger().warning(f"waiting for flow run {flow_run_id}: {type(e).__name__}: {e}")
        time.sleep(every_s)
    return None


def _logger():
    from prefect import get_run_logger

    return get_run_logger()


def failure_reason(state: Any) -> str:
    """A failed Prefect state's exception as ``Type: message`` (its state message otherwise)."""
    try:
        exc = state.result(raise_on_failure=False)
    except Exception as e:  # the result itself could not be read back
        exc = e
    if isinstance(exc, BaseException):
        return f"{type(exc).__name__}: {exc}"
    return state.message or f"{state.name}"


@stage("eval_data", mlflow=False)
def eval_data(path: str | None, stage: StageRun) -> DatasetRef | None:
    """The night's eval items given as a plain JSONL file (hashed); None: each task reads its own data."""
    return None if path is None else eval_file_dataset(in_project(path))


@stage("gpu_concurrency_limit", mlflow=False)
def gpu_concurrency_limit(tag: str, slots: int, stage: StageRun) -> int:
    limit = ensure_tag_concurrency_limit(tag, slots)
    stage.log.info(f"tasks tagged {tag!r} run at most {limit} at a time (Prefect tag concurrency limit)")
    return limit


@stage("prepare_candidate", run_name="candidate-{name}", mlflow=False)
def prepare_candidate(name: str, candidate: LeaderboardCandidate, stage: StageRun) -> PreparedCandidate:
    # The same resolve → fetch as every flow: a registry alias is looked up again each night, and an
    # unpinned source (local folder, object store, hub main) is re-fetched and re-hashed. An endpoint is asked.
    if candidate.endpoint is not None:
        return endpoint_prepared(candidate, endpoint_key(candidate, read_secret), str(stage.flow.flow_run_id))
    resolved = resolve_model(spec=candidate_model(candidate), run=stage.flow)
    return PreparedCandidate(resolved=resolved, model=fetch_model(resolved=resolved, run=stage.flow))


@stage("score_variant", run_name="score-{name}-{variant}", mlflow=False)
def score_variant(name: str, candidate: LeaderboardCandidate, variant: str, prepared: PreparedCandidate,
                  spec: LeaderboardSpec, data: DatasetRef | None, stage: StageRun) -> CandidateOutcome:
    # On a pool each worker owns one GPU and takes one job at a time (`gauntlet worker` starts it with --limit 1):
    # the tag limit would only throttle the whole pool, and its slot leases fail through a Prefect server restart.
    gpu = [] if spec.concurrency.pool or candidate.endpoint else [spec.concurrency.gpu_tag]
    started = time.monotonic()
    model = prepared.model
    if (how := quantization_of(variant)) is not None:
        model = quantize.with_options(tags=gpu)(variant=how, calibration=spec.calibration, model=model, data=data,
                                                run=stage.flow)
    ev = spec.eval if candidate.endpoint is None else \
        EndpointEvalSpec.of(spec.eval, candidate.endpoint, endpoint_key(candidate, read_secret))
    report = evaluate.with_options(tags=gpu)(spec=ev, model=model, data=data, variant=variant, run=stage.flow)
    if spec.eval.safety is not None:   # every candidate judged with the one judge and rubric: comparable rates
        report = check_safety(spec=spec.eval.safety, judge=spec.eval.judge, candidate=model, report=report,
                              run=stage.flow)
    elapsed = time.monotonic() - started   # the job flow (a pool) replaces wall_s with its whole time
    return ok_outcome(candidate, variant, prepared, report, JobRecord(**placement(), wall_s=elapsed, gpu_s=elapsed))


@stage("night_job", run_name="job-{name}-{variant}", mlflow=False)
def night_job(name: str, variant: str, job: NightJob, spec: LeaderboardSpec, stage: StageRun) -> CandidateOutcome:
    """One candidate x variant as its own flow run on the pool (``concurrency.job_deployment``), on the queue of the
    GPU class it needs; waits for its end (a job whose host died is retried by Prefect meanwhile: AwaitingRetry is
    not an end) and reads its outcome from the shared result storage. A job whose flow run crashed (its process
    failed, not the job) is submitted again, up to ``JOB_ATTEMPTS``. A job that fails fails its own row."""
    from prefect.deployments import run_deployment

    candidate = next(c for c in spec.candidates if c.display_name == name)
    try:
        queue = queue_for(candidate, spec)
    except PlacementError as e:   # refused before it queues
        return failed_outcome(candidate, variant, f"PlacementError: {e}")
    for attempt in range(1, JOB_ATTEMPTS + 1):
        flow_run = run_deployment(spec.concurrency.job_deployment, parameters=job.parameters(variant), timeout=0,
                                  work_queue_name=queue, tags=["gauntlet", "leaderboard-job"],
                                  idempotency_key=f"{stage.flow.flow_run_id}:{name}:{variant}:{attempt}")
        stage.log.info(f"{name} x {variant}: flow run {flow_run.name} on queue {queue} (attempt {attempt})")
        state = wait_for_end(flow_run.id, spec.concurrency.job_timeout_minutes * 60)
        if state is None:
            return failed_outcome(candidate, variant, f"not done after concurrency.job_timeout_minutes="
                                  f"{spec.concurrency.job_timeout_minutes:g} (flow run {flow_run.name})")
        # Crashed: its process, not the job, failed (e.g. it started while the Prefect server was away and could
        # not load its flow run); the job is submitted again, to any worker of the queue.
        if not state.is_crashed() or attempt == JOB_ATTEMPTS:
            break
        stage.log.warning(f"{name} x {variant}: flow run {flow_run.name} crashed ({state.message}); submitted again")
    if not state.is_completed():
        return failed_outcome(candidate, variant, failure_reason(state))
    return CandidateOutcome.model_validate(state.result())


@stage("rank", params=lambda spec, **_: {"ranking.key": spec.ranking.key, "ranking.metric": spec.ranking.metric})
def rank(spec: LeaderboardSpec, outcomes: list[CandidateOutcome], wall_s: float | None, stage: StageRun) -> Leaderboard:
    flow = stage.flow
    history = load_history(flow.tracking_uri, spec.tracking.experiment, spec.name, spec.publish.history_nights,
                           exclude_run_id=flow.parent_run_id)
    board = build_leaderboard(spec, outcomes, history, wall_s=wall_s)
    for w in board.workers:
        stage.log.info(f"worker {w.worker} ({w.gpu}): {w.jobs} job(s), {w.gpu_s:.0f} s on the device"
                       + (f", busy {w.busy:.0%} of the night" if w.busy is not None else ""))
    stage.metrics({t: b["value"] for t, b in board.baselines.items()}, prefix="baseline.")
    stage.metric("previous_nights", len(history))
    stage.log.info(f"{len(board.ranked())} ranked, {len(history)} previous night(s) read from MLflow")
    return board.model_copy(update={"flow_run_id": flow.flow_run_id, "mlflow_run_id": flow.parent_run_id})


@stage("publish", mlflow=False)
def publish(spec: LeaderboardSpec, board: Leaderboard, stage: StageRun) -> Leaderboard:
    files = write_board(board, publish_dir(spec))
    board = board.model_copy(update={"files": files})
    c, rid = stage.client, stage.flow.parent_run_id
    for path in files.values():
        c.log_artifact(rid, path)
    pages = publish_dir(spec) / "compare"   # the per-item pages, beside the board in the run
    if pages.is_dir() and any(pages.iterdir()):
        c.log_artifacts(rid, str(pages), "compare")
    for r in board.rows:
        if r.average is not None:
            c.log_metric(rid, mlflow_name("average", r.candidate, r.variant), r.average)
    c.log_metric(rid, "ranked", float(len(board.ranked())))
    c.log_metric(rid, "failed", float(sum(r.status == "failed" for r in board.rows)))
    create_table_artifact(table_rows(board), key=f"leaderboard-{spec.name}", description=f"{board.title}, {board.night}")
    create_markdown_artifact(render_markdown(board), key=f"leaderboard-{spec.name}-summary",
                             description=f"{board.title}, {board.night}")
    stage.log.info(f"leaderboard published: {files['html']}")
    return board


@stage("take_submissions", mlflow=False)
def take_submissions(spec: LeaderboardSpec, stage: StageRun) -> list[Submission]:
    """The board's queued submissions, marked evaluating: tonight's candidates beside the config's."""
    taken = submissions.take(spec, stage.client, str(stage.flow.flow_run_id))
    for s in taken:
        stage.log.info(f"submission {s.name} by {s.submitter} ({s.source}): {s.state}"
                       + (f", {s.reason}" if s.reason else ""))
    return taken


@stage("settle_submissions", mlflow=False)
def settle_submissions(spec: LeaderboardSpec, taken: list[Submission], board: Leaderboard | None, error: str | None,
                       stage: StageRun) -> list[Submission]:
    """Tonight's submissions ranked or failed from their rows; each submitter whose submission failed or missed its
    24-hour promise told through the board's notify webhooks (once)."""
    settled = submissions.settle(taken, board, error, stage.client)
    for s in settled:
        stage.log.info(f"submission {s.name} by {s.submitter}: {s.state}, {s.reason}")
    for s, told, notice in submissions.notices(submissions.status(spec.name, stage.client)):
        if spec.notify.webhooks and send(spec.notify, notice, stage.log, read_secret):
            submissions.mark_notified(stage.client, s, told)
    return settled
