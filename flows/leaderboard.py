"""The leaderboard flow: every candidate × variant through the same resolve → fetch → (quantize) →
evaluate stages as the finetune flow, then ranking and publication (``tasks/leaderboard.py``).

Composition only. Candidates run concurrently (Prefect's thread pool); GPU work (evaluate, quantize)
carries the tag ``gpu`` (``concurrency.gpu_tag``), whose Prefect tag concurrency limit decides how many
run at once: `gauntlet serve` sets it, and the flow creates it with ``concurrency.gpu_slots`` when it is
missing. A candidate that fails (its source is gone, its weights do not load, …) fails its own task runs
and its row on the board; the others go on.
"""

from __future__ import annotations

from prefect import flow
from prefect.futures import as_completed
from prefect.runtime import flow_run

from gauntlet.config.leaderboard import LeaderboardSpec
from gauntlet.config.load import load_leaderboard_spec
from gauntlet.hashing import sha256_json
from gauntlet.leaderboard.board import Leaderboard
from gauntlet.leaderboard.candidates import (
    CandidateOutcome,
    failed_outcome,
    preload_model_libraries,
    skipped_outcome,
    variant_skip_reason,
    variants_of,
)
from gauntlet.project import in_project
from gauntlet.tracking import flatten_params, parent_run, tracking_uri
from gauntlet.tasks.data import pull_data
from gauntlet.tasks.leaderboard import (
    eval_data,
    failure_reason,
    gpu_concurrency_limit,
    prepare_candidate,
    publish,
    rank,
    score_variant,
)


def run_leaderboard(spec: LeaderboardSpec) -> Leaderboard:
    tags = {"prefect.flow_run_id": str(flow_run.id), "gauntlet.leaderboard": spec.name,
            "gauntlet.config_hash": sha256_json(spec.model_dump(mode="json"))}
    with parent_run(tracking_uri(spec.tracking.tracking_uri), spec.tracking.experiment, f"{spec.name}-{flow_run.name}",
                    tags, flatten_params("", {"candidates": len(spec.candidates), "variants": spec.variants,
                                              "eval": spec.eval.model_dump(mode="json"),
                                              "ranking": spec.ranking.model_dump(mode="json")})) as run:
        gpu_concurrency_limit(tag=spec.concurrency.gpu_tag, slots=spec.concurrency.gpu_slots, run=run)
        preload_model_libraries()  # before the thread pool: transformers' lazy imports race in threads
        data = (pull_data(spec=spec.data, run=run) if spec.data is not None
                else eval_data(path=spec.eval_file, run=run))

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
                skip = variant_skip_reason(variant, data)
                if skip:
                    outcomes.append(skipped_outcome(candidate, variant, skip))
                    continue
                scoring[score_variant.submit(name=candidate.display_name, candidate=candidate, variant=variant,
                                             prepared=future.result(), spec=spec, data=data, run=run)] = (candidate,
                                                                                                        variant)
        for future, (candidate, variant) in scoring.items():
            future.wait()
            outcomes.append(future.result() if future.state.is_completed()
                            else failed_outcome(candidate, variant, failure_reason(future.state)))

        board = rank(spec=spec, outcomes=outcomes, run=run)
        return publish(spec=spec, board=board, run=run)


@flow(name="leaderboard", log_prints=True)
def leaderboard(config: str = "configs/leaderboard.yaml", overrides: list[str] | None = None) -> Leaderboard:
    """Evaluate every candidate × variant of a leaderboard config, rank them and publish the board.

    config: path of the leaderboard config (YAML), relative to the project root.
    overrides: dotted-key overrides, e.g. ["eval.limit=32"].
    """
    return run_leaderboard(load_leaderboard_spec(in_project(config), overrides or []))
