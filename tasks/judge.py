"""Stages ``answer`` and ``judge``: a candidate's answers against its opponent's (the champion, or the base
model), judged pairwise by a configured judge in both orders (gauntlet/eval/judge.py).

- ``answer`` key: the model's content hash, the instruction set's md5, the answers' decoding (max_new_tokens,
  limit). The champion's answers are made once and reused by every later run judged against it.
- ``judge`` key: both models' content hashes, the judge (its content hash for a model judge; base_url and
  endpoint model for an endpoint, never its key), the prompt file's sha256 and the set's md5 (the protocol),
  and the opponent's role. Only what changed runs again.
- ``champion_source``: never cached (the alias can move): the champion as a pinned registry source, if any.

:func:`judge_candidate` composes them for the flows: the opponent and the judge model fetched like any model,
the win rate added to the candidate's report as the task ``judge_win_rate``.
"""

from __future__ import annotations

from pathlib import Path

from gauntlet.config.gate import RegistrySpec
from gauntlet.config.judge import JudgeSpec
from gauntlet.config.model import ModelSpec
from gauntlet.eval.judge import (
    EndpointJudge,
    Judge,
    JudgeError,
    JudgeReport,
    ModelJudge,
    as_task_result,
    file_md5,
    generate_answers,
    judge_pairs,
    judge_protocol,
    load_instructions,
    prompt_template,
    summarize,
    with_results,
    write_items,
)
from gauntlet.files import write_json
from gauntlet.project import in_project
from gauntlet.refs import EvalReport, ModelRef
from gauntlet.registry.store import champion_of
from gauntlet.secrets import api_key
from gauntlet.tasks._stage import StageRun, stage
from gauntlet.tasks.models import fetch_model, resolve_model
from gauntlet.tasks.notify import read_secret
from gauntlet.tracking import RunContext, client


def _set_path(spec: JudgeSpec) -> Path:
    return in_project(spec.instructions)


def read_api_key(spec: JudgeSpec) -> str | None:
    """The endpoint's key from the environment variable or Prefect Secret block the config names; never logged."""
    try:
        return api_key(spec.api_key_env, spec.api_key_secret, "eval.judge", read_secret)
    except LookupError as e:
        raise JudgeError(str(e)) from None


@stage("answer", key=lambda spec, model: [model.sha, file_md5(_set_path(spec)), spec.max_new_tokens, spec.limit],
       outputs=lambda _, st: [st.out / "answers.json"],
       params=lambda spec, model: {"model.sha": model.sha, "max_new_tokens": spec.max_new_tokens},
       run_name="answer-{model.name}")
def answer(spec: JudgeSpec, model: ModelRef, stage: StageRun) -> list[str]:
    rows = load_instructions(_set_path(spec), spec.limit)
    answers = generate_answers(model.path, [r["instruction"] for r in rows], spec.max_new_tokens, spec.batch_size,
                               log=stage.log.info)
    write_json(stage.out / "answers.json", [{"id": r["id"], "answer": a} for r, a in zip(rows, answers, strict=True)])
    stage.artifacts(stage.out / "answers.json")
    return answers


def judge_of(spec: JudgeSpec, judge_model: ModelRef | None) -> Judge:
    """The configured judge: the fetched judge model run with transformers, or the endpoint (its key read now)."""
    if judge_model is not None:
        return ModelJudge(judge_model.path, spec.batch_size)
    return EndpointJudge(spec.base_url, spec.endpoint_model, read_api_key(spec), spec.judge_max_tokens, spec.timeout_s)


def fetch_judge_model(spec: JudgeSpec, run: RunContext) -> ModelRef | None:
    """The judge model fetched like any model (None for an endpoint judge)."""
    if spec.model is None:
        return None
    return fetch_model(resolved=resolve_model(spec=ModelSpec(source=spec.model), run=run), run=run)


def _judge_key(spec: JudgeSpec, candidate: ModelRef, opponent: ModelRef, opponent_role: str,
               judge_model: ModelRef | None) -> list:
    protocol = judge_protocol(spec, in_project(spec.prompt), _set_path(spec), judge_model.sha if judge_model else None)
    return [candidate.sha, opponent.sha, opponent_role, protocol, spec.batch_size]


@stage("judge", key=_judge_key, outputs=lambda report, _: [report.items_path],
       params=lambda spec, candidate, opponent, opponent_role, **_: {
           **{f"judge.{k}": v for k, v in spec.judge_identity().items()}, "judge.prompt": spec.prompt,
           "candidate.sha": candidate.sha, "opponent.sha": opponent.sha, "opponent": opponent_role},
       retries=1, retry_delay_seconds=5, run_name="judge-vs-{opponent_role}")
def judge(spec: JudgeSpec, candidate: ModelRef, opponent: ModelRef, opponent_role: str, judge_model: ModelRef | None,
          stage: StageRun) -> JudgeReport:
    nested = stage.nested()
    mine = answer(spec=spec, model=candidate, run=nested)
    theirs = mine if opponent.sha == candidate.sha else answer(spec=spec, model=opponent, run=nested)
    rows = load_instructions(_set_path(spec), spec.limit)
    judge_impl = judge_of(spec, judge_model)
    stage.log.info(f"judging {len(rows)} pairs in both orders with {spec.model or spec.base_url}")
    items, prior = judge_pairs(judge_impl, prompt_template(in_project(spec.prompt)), rows, mine, theirs,
                               spec.tie_margin)
    protocol = judge_protocol(spec, in_project(spec.prompt), _set_path(spec), judge_model.sha if judge_model else None)
    report = summarize(items, prior, candidate=candidate.name, candidate_sha=candidate.sha, opponent=opponent.name,
                       opponent_sha=opponent.sha, opponent_role=opponent_role, protocol=protocol,
                       items_path=str(write_items(items, stage.out / "verdicts.jsonl")))
    write_json(stage.out / "judge_report.json", report.model_dump(mode="json"))
    stage.artifacts(stage.out / "verdicts.jsonl", stage.out / "judge_report.json")
    stage.metrics({"win_rate": report.win_rate, "win_rate_ci_low": report.ci_low, "win_rate_ci_high": report.ci_high,
                   "order_swap_consistency": report.consistency, "first_position_rate": report.first_position_rate})
    stage.log.info(report.text())
    return report


@stage("champion_source", mlflow=False)
def champion_source(registry: RegistrySpec, stage: StageRun) -> tuple[str, str] | None:
    """(``models:/NAME/VERSION``, ``champion vVERSION``) of the current champion, or None when there is none."""
    version, _ = champion_of(client(stage.flow.tracking_uri), registry)
    if version is None:
        stage.log.info(f"no {registry.model_name}@{registry.champion_alias}: the candidate is judged against its base")
        return None
    return f"models:/{registry.model_name}/{version}", f"champion v{version}"


def judge_candidate(spec: JudgeSpec, registry: RegistrySpec | None, candidate: ModelRef, base: ModelRef,
                    report: EvalReport, run: RunContext) -> EvalReport:
    """``report`` with the candidate's win rate against the champion (or ``base`` when there is none, no
    registry, or ``spec.opponent`` is base) added as the task ``judge_win_rate``."""
    by_champion = registry is not None and spec.opponent == "champion"
    found = champion_source(registry=registry, run=run) if by_champion else None
    if found is None:
        opponent, role = base, "base"
    else:
        opponent = fetch_model(resolved=resolve_model(spec=ModelSpec(source=found[0]), run=run), run=run)
        role = found[1]
    judge_model = fetch_judge_model(spec, run)
    judged = judge(spec=spec, candidate=candidate, opponent=opponent, opponent_role=role, judge_model=judge_model,
                   run=run)
    return with_results(report, [as_task_result(judged)])
