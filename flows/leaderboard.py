"""The leaderboard flow: every candidate × variant through the same fetch → (quantize) → evaluate tasks
as the fine-tune flow, then ranking and publication (tasks/leaderboard.py).

Composition only. Candidates run concurrently (Prefect's thread pool); GPU work (evaluate, quantize)
carries the tag ``gpu`` (``concurrency.gpu_tag``), whose Prefect tag concurrency limit decides how many
run at once: `gauntlet serve` sets it, and the flow creates it with ``concurrency.gpu_slots`` when it is
missing. A candidate that fails (its source is gone, its weights do not load, …) fails its own task runs
and its row on the board; the others go on.
"""

from __future__ import annotations

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed
from prefect.runtime import flow_run

from tasks.data import DATA, pull_data_task
from tasks.evaluate import evaluate_stage
from tasks.leaderboard import (
    CandidateOutcome,
    Leaderboard,
    PreparedCandidate,
    candidate_model,
    ensure_gpu_limit_task,
    eval_file_task,
    failed_outcome,
    failure_reason,
    ok_outcome,
    preload_model_libraries,
    publish_task,
    quantization_of,
    quantize_for_leaderboard,
    rank_task,
    skipped_outcome,
    variant_skip_reason,
    variants_of,
)
from tasks.models import fetch_resolved_model, resolve_model_task
from tasks.refs import DatasetRef
from tasks.spec import LeaderboardCandidate, LeaderboardSpec, load_leaderboard_spec
from tasks.state import sha256_json
from tasks.tracking import RunContext, flatten_params, parent_run, tracking_uri


@task(name="prepare_candidate", task_run_name="candidate-{name}", cache_policy=NO_CACHE)
def prepare_candidate(name: str, candidate: LeaderboardCandidate, run: RunContext) -> PreparedCandidate:
    # The same resolve → fetch as every flow: a registry alias is looked up again each night, and an
    # unpinned source (local folder, object store, hub main) is re-fetched and re-hashed.
    resolved = resolve_model_task(candidate_model(candidate), run)
    return PreparedCandidate(resolved=resolved, model=fetch_resolved_model(resolved, run))


@task(name="score_variant", task_run_name="score-{name}-{variant}", cache_policy=NO_CACHE)
def score_variant(name: str, candidate: LeaderboardCandidate, variant: str, prepared: PreparedCandidate,
                  spec: LeaderboardSpec, data: DatasetRef, run: RunContext) -> CandidateOutcome:
    gpu = [spec.concurrency.gpu_tag]
    model = prepared.model
    if quantization_of(variant) is not None:
        model = quantize_for_leaderboard(variant, spec.calibration, model, data, run, tags=gpu)
    report = evaluate_stage(spec.eval, model, data, variant, run, tags=gpu)
    return ok_outcome(candidate, variant, prepared, report)


def run_leaderboard(spec: LeaderboardSpec) -> Leaderboard:
    uri = tracking_uri(spec.tracking.tracking_uri)
    tags = {"prefect.flow_run_id": str(flow_run.id), "gauntlet.leaderboard": spec.name,
            "gauntlet.config_hash": sha256_json(spec.model_dump(mode="json"))}
    with parent_run(uri, spec.tracking.experiment, f"{spec.name}-{flow_run.name}", tags,
                    flatten_params("", {"candidates": len(spec.candidates), "variants": spec.variants,
                                        "eval": spec.eval.model_dump(mode="json"),
                                        "ranking": spec.ranking.model_dump(mode="json")})) as run:
        ensure_gpu_limit_task(spec.concurrency.gpu_tag, spec.concurrency.gpu_slots)
        preload_model_libraries()  # before the thread pool: transformers' lazy imports race in threads
        data = (DATA.run(pull_data_task, spec=spec.data, run=run) if spec.data is not None
                else eval_file_task(spec.eval_file))

        outcomes: list[CandidateOutcome] = []
        prepared = {prepare_candidate.submit(c.display_name, c, run): c for c in spec.candidates}
        scoring = {}
        for future in as_completed(list(prepared)):
            candidate = prepared[future]
            future.wait()
            if not future.state.is_completed():
                reason = failure_reason(future.state)
                outcomes += [failed_outcome(candidate, v, reason) for v in variants_of(candidate, spec)]
                continue
            for variant in variants_of(candidate, spec):
                skip = variant_skip_reason(variant, data)
                if skip:
                    outcomes.append(skipped_outcome(candidate, variant, skip))
                    continue
                scoring[score_variant.submit(candidate.display_name, candidate, variant, future.result(), spec,
                                             data, run)] = (candidate, variant)
        for future, (candidate, variant) in scoring.items():
            future.wait()
            outcomes.append(future.result() if future.state.is_completed()
                            else failed_outcome(candidate, variant, failure_reason(future.state)))

        board = rank_task(spec, outcomes, run)
        return publish_task(spec, board, run)


@flow(name="leaderboard", log_prints=True)
def leaderboard(config: str = "configs/leaderboard.yaml", overrides: list[str] | None = None) -> Leaderboard:
    """Evaluate every candidate × variant of a leaderboard config, rank them and publish the board.

    config: path of the leaderboard config (YAML), relative to the project root.
    overrides: dotted-key overrides, e.g. ["eval.limit=32"].
    """
    return run_leaderboard(load_leaderboard_spec(config, overrides or []))
