"""The leaderboard flow: every candidate × variant through the same resolve → fetch → (quantize) → evaluate
stages as the finetune flow, then ranking and publication (``tasks/leaderboard.py``).

Composition only. Two ways to spread the night:

* **in this process** (default): candidates run concurrently in Prefect's thread pool; GPU work (evaluate,
  quantize) carries the tag ``gpu`` (``concurrency.gpu_tag``), whose tag concurrency limit decides how many run at
  once (`gauntlet serve` sets it; the flow creates it with ``concurrency.gpu_slots`` when it is missing);
* **on a team's pool** (``concurrency.pool``): each candidate × variant is its own flow run of ``leaderboard_job``
  (deployment ``concurrency.job_deployment``) on the queue of the GPU class it needs; this flow waits for them,
  reads their outcomes from the shared result storage, ranks and publishes. Its jobs take no tag slot: each worker
  owns one GPU and runs one job at a time.

A candidate that fails (its source is gone, its weights do not load, its job's host died too often, …) fails its
own row on the board; the others go on. The board's queued submissions (``gauntlet submit``) are taken first and run
as candidates beside the config's; they are settled (ranked or failed, failures notified) once the board is ranked.
"""

from __future__ import annotations

import os
import time

from prefect import flow
from prefect.futures import as_completed
from prefect.runtime import flow_run

from gauntlet.config.leaderboard import LeaderboardSpec
from gauntlet.config.load import load_leaderboard_spec
from gauntlet.hashing import sha256_json
from gauntlet.leaderboard import submissions
from gauntlet.leaderboard.board import Leaderboard
from gauntlet.leaderboard.candidates import (
    CandidateOutcome,
    failed_outcome,
    preload_model_libraries,
    skipped_outcome,
    variant_skip_reason,
    variants_of,
)
from gauntlet.project import in_project, project_root
from gauntlet.tasks._flow import flow_parent_run
from gauntlet.tasks.data import pull_data
from gauntlet.tasks.leaderboard import (
    NightJob,
    eval_data,
    failure_reason,
    gpu_concurrency_limit,
    night_job,
    prepare_candidate,
    publish,
    rank,
    score_variant,
    settle_submissions,
    take_submissions,
)
from gauntlet.tracking import RunContext, client, flatten_params, tracking_uri


def night_data(spec: LeaderboardSpec, run: RunContext):
    return pull_data(spec=spec.data, run=run) if spec.data is not None else eval_data(path=spec.eval_file, run=run)


def night_here(spec: LeaderboardSpec, run: RunContext) -> list[CandidateOutcome]:
    """Every job in this process, in Prefect's thread pool."""
    gpu_concurrency_limit(tag=spec.concurrency.gpu_tag, slots=spec.concurrency.gpu_slots, run=run)
    preload_model_libraries()  # before the thread pool: transformers' lazy imports race in threads
    data = night_data(spec, run)
    outcomes: list[CandidateOutcome] = []
    prepared = {prepare_candidate.submit(name=c.display_name, candidate=c, run=run): c for c in spec.candidates}
    scoring = {}
    for future in as_completed(list(prepared)):
        candidate = prepared[future]
        future.wait()
        if not future.state.is_completed():
            reason = failure_reason(future.state)
            outcomes += [failed_outcome(candidate, v, reason) for v in variants_of(candidate, spec)]
            continue
        for variant in variants_of(candidate, spec):
            if skip := variant_skip_reason(variant, data):
                outcomes.append(skipped_outcome(candidate, variant, skip))
                continue
            scoring[score_variant.submit(name=candidate.display_name, candidate=candidate, variant=variant,
                                         prepared=future.result(), spec=spec, data=data, run=run)] = (candidate,
                                                                                                    variant)
    for future, (candidate, variant) in scoring.items():
        future.wait()
        outcomes.append(future.result() if future.state.is_completed()
                        else failed_outcome(candidate, variant, failure_reason(future.state)))
    return outcomes


def night_on_pool(spec: LeaderboardSpec, config: str, overrides: list[str], run: RunContext) -> list[CandidateOutcome]:
    """Every job as its own flow run on the pool, waited for side by side."""
    relative = os.path.relpath(in_project(config), project_root())   # each worker reads it in its own checkout
    jobs = {night_job.submit(name=c.display_name, variant=v, job=NightJob(config=relative, overrides=overrides,
                                                                          candidate=c.display_name),
                             spec=spec, run=run): (c, v)
            for c in spec.candidates for v in variants_of(c, spec)}
    outcomes = []
    for future, (candidate, variant) in jobs.items():
        future.wait()
        outcomes.append(future.result() if future.state.is_completed()
                        else failed_outcome(candidate, variant, failure_reason(future.state)))
    return outcomes


def run_leaderboard(spec: LeaderboardSpec, config: str, overrides: list[str]) -> Leaderboard:
    tags = {"gauntlet.leaderboard": spec.name, "gauntlet.config_hash": sha256_json(spec.model_dump(mode="json"))}
    params = flatten_params("", {"candidates": len(spec.candidates), "variants": spec.variants,
                                 "eval": spec.eval.model_dump(mode="json"), "pool": spec.concurrency.pool,
                                 "ranking": spec.ranking.model_dump(mode="json")})
    with flow_parent_run(tracking_uri(spec.tracking.tracking_uri), spec.tracking.experiment,
                         f"{spec.name}-{flow_run.name}", tags, params) as run:
        started = time.monotonic()
        taken = take_submissions(spec=spec, run=run)
        night = submissions.with_submissions(spec, taken)
        try:
            outcomes = (night_on_pool(night, config, overrides, run) if spec.concurrency.pool
                        else night_here(night, run))
            board = rank(spec=night, outcomes=outcomes, wall_s=time.monotonic() - started, run=run)
        except Exception as e:
            settle_submissions(spec=spec, taken=taken, board=None, error=f"{type(e).__name__}: {e}", run=run)
            raise
        settle_submissions(spec=spec, taken=taken, board=board, error=None, run=run)
        return publish(spec=night, board=board, run=run)


@flow(name="leaderboard", log_prints=True)
def leaderboard(config: str = "configs/leaderboard.yaml", overrides: list[str] | None = None) -> Leaderboard:
    """Evaluate every candidate × variant of a leaderboard config, rank them and publish the board.

    config: path of the leaderboard config (YAML), relative to the project root.
    overrides: dotted-key overrides, e.g. ["eval.limit=32"].
    """
    return run_leaderboard(load_leaderboard_spec(in_project(config), overrides or []), config, overrides or [])


@flow(name="leaderboard-job", log_prints=True)
def leaderboard_job(config: str, candidate: str, variant: str, overrides: list[str] | None = None) -> CandidateOutcome:
    """One candidate × variant of a leaderboard night, on the worker that took it (a team's pool).

    config: the leaderboard config, relative to the project root (each worker reads its own checkout's).
    candidate: the candidate's display name in it.
    variant: the variant to evaluate (bf16, gptq-int4, …).
    overrides: the night's dotted-key overrides.
    """
    spec = load_leaderboard_spec(in_project(config), overrides or [])
    chosen = next((c for c in spec.candidates if c.display_name == candidate), None) or \
        submissions.submitted_candidate(spec, candidate, client(tracking_uri(spec.tracking.tracking_uri)))
    with flow_parent_run(tracking_uri(spec.tracking.tracking_uri), spec.tracking.experiment,
                         f"{spec.name}-{candidate}-{variant}", {"gauntlet.leaderboard": spec.name,
                                                                "gauntlet.leaderboard_job": f"{candidate}:{variant}"},
                         {"candidate": candidate, "variant": variant}) as run:
        started = time.monotonic()
        data = night_data(spec, run)
        if skip := variant_skip_reason(variant, data):
            return skipped_outcome(chosen, variant, skip)
        prepared = prepare_candidate(name=candidate, candidate=chosen, run=run)
        outcome = score_variant(name=candidate, candidate=chosen, variant=variant, prepared=prepared, spec=spec,
                                data=data, run=run)
        return outcome.model_copy(update={"job": outcome.job.model_copy(update={"wall_s": time.monotonic() - started})})
