"""The pairwise judge with a real instruct model (SmolLM2-135M-Instruct) as candidate, champion and judge.

- a candidate identical to the champion: a win rate whose 95% interval contains 0.5, order-swap consistency
  and the first-position rate measured and reported;
- a degenerate candidate (empty answers) loses and fails gate.min_win_rate;
- a judge endpoint that does not answer fails the finetune run naming the endpoint, never its key, and nothing
  is registered.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from gauntlet.config.gate import GateSpec
from gauntlet.config.judge import JudgeSpec
from gauntlet.eval.judge import (
    JUDGE_TASK,
    ModelJudge,
    as_task_result,
    generate_answers,
    judge_pairs,
    load_instructions,
    prompt_template,
    summarize,
    with_results,
    write_items,
)
from gauntlet.gate import decide
from gauntlet.refs import ModelRef
from tests.helpers import REPO, make_report
from tests.integration.test_real_model import smollm2  # noqa: F401  (the module-scoped fixture)

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning")]

ITEMS = 8


@pytest.fixture(scope="module")
def answered(smollm2: ModelRef):  # noqa: F811
    rows = load_instructions(REPO / "evals" / "judge" / "instructions.jsonl", ITEMS)
    return rows, generate_answers(smollm2.path, [r["instruction"] for r in rows], max_new_tokens=24, batch_size=8)


def judged(smollm2: ModelRef, rows, candidate, opponent, out: Path):  # noqa: F811
    template = prompt_template(REPO / "evals" / "judge" / "pairwise.md")
    items, prior = judge_pairs(ModelJudge(smollm2.path), template, rows, candidate, opponent, tie_margin=0.05)
    return summarize(items, prior, candidate="candidate", candidate_sha="c" * 64, opponent="champion",
                     opponent_sha="o" * 64, opponent_role="champion v1", protocol={"prompt_sha256": "p" * 64},
                     items_path=str(write_items(items, out / "verdicts.jsonl")))


def test_identical_candidate_wins_half_and_the_order_swap_is_reported(smollm2, answered, tmp_path) -> None:  # noqa: F811
    rows, answers = answered
    assert all(a.strip() for a in answers), answers   # a real model answered every instruction
    report = judged(smollm2, rows, answers, answers, tmp_path)
    assert report.n == ITEMS and report.ci_low <= 0.5 <= report.ci_high, report.text()
    assert 0.0 <= report.consistency <= 1.0 and 0.0 <= report.first_position_rate <= 1.0
    assert "order-swap consistency" in report.text() and "first answer preferred" in report.text()
    verdicts = [json.loads(line) for line in Path(report.items_path).read_text().splitlines()]
    assert len(verdicts) == ITEMS and all(len(v["judgments"]) == 2 for v in verdicts)
    assert {j["order"] for v in verdicts for j in v["judgments"]} == {"candidate_first", "opponent_first"}
    assert all("log P(A) - log P(B)" in j["reason"] for v in verdicts for j in v["judgments"])


def test_degenerate_candidate_loses_and_fails_min_win_rate(smollm2, answered, tmp_path) -> None:  # noqa: F811
    rows, answers = answered
    report = judged(smollm2, rows, [""] * len(rows), answers, tmp_path)
    assert report.win_rate < 0.5 and report.losses > report.wins, report.text()
    candidate = with_results(make_report({"demo_facts": 0.9}), [as_task_result(report)])
    assert candidate.score(JUDGE_TASK, "win_rate") == report.win_rate
    decision = decide(GateSpec(min_win_rate=0.5), candidate, None, None, {})
    (rule,) = [r for r in decision.rules if r.rule == "min_win_rate"]
    assert not decision.passed and not rule.passed and rule.measured == report.win_rate, rule


def test_min_win_rate_without_a_judge_fails_naming_the_section() -> None:
    decision = decide(GateSpec(min_win_rate=0.5), make_report({"demo_facts": 0.9}), None, None, {})
    assert not decision.passed and "eval.judge" in decision.reasons[0]


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


KEY = "sk-GauntletJudgeKeyLeakCheck0123456789"


def test_judge_endpoint_that_does_not_answer_fails_the_run_and_registers_nothing(prefect_api, dvc_repo,
                                                                                monkeypatch) -> None:
    from mlflow.tracking import MlflowClient

    from gauntlet.flows.finetune import finetune

    monkeypatch.setenv("GAUNTLET_TEST_JUDGE_KEY", KEY)
    url = f"http://127.0.0.1:{closed_port()}/v1"
    c = MlflowClient()
    before = len(c.search_model_versions("name='gauntlet-judge-test'"))
    state = finetune(config=str(REPO / "configs" / "demo.yaml"), return_state=True, overrides=[
        f"data.repo={dvc_repo}", "quantize.variants=[]", "gate.register_variants=[]",
        "registry.model_name=gauntlet-judge-test", "train.max_steps=20",
        f"eval.judge={{base_url: '{url}', api_key_env: GAUNTLET_TEST_JUDGE_KEY, limit: 2, max_new_tokens: 8}}"])
    assert state.is_failed()
    assert f"{url}/chat/completions" in state.message and "did not answer" in state.message, state.message
    assert KEY not in state.message
    assert len(c.search_model_versions("name='gauntlet-judge-test'")) == before == 0
    for run in c.search_runs([e.experiment_id for e in c.search_experiments()]):
        assert KEY not in repr(run.data.params) + repr(run.data.tags)


def test_judge_config_names_the_field_and_the_fix() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="exactly one of eval.judge.model"):
        JudgeSpec()
    with pytest.raises(ValidationError, match="credentials in base_url"):
        JudgeSpec(base_url="http://user:secret@host/v1")


def test_opponent_base_judges_against_the_starting_model_even_with_a_champion(
        prefect_api, smollm2, tiny_model_ref, tmp_path) -> None:  # noqa: F811
    """eval.judge.opponent: base (preference tuning from an SFT model: the win rate over that model) never asks
    the registry, though the registered model has a champion."""
    from prefect import flow

    from gauntlet.config.gate import RegistrySpec
    from gauntlet.tasks.judge import judge_candidate
    from gauntlet.tracking import client, parent_run, tracking_uri
    from tests.integration.test_registry import gate_and_promote, register, unique

    c = client(tracking_uri())
    registry = RegistrySpec(model_name=unique("judge-opponent"))
    candidate, report = register(c, registry, tmp_path, {"facts": 0.5})
    _, promotion = gate_and_promote(c, registry, GateSpec(), candidate, report)
    assert promotion.registered   # the registered model has a champion (fake files: never fetched here)
    spec = JudgeSpec(model=smollm2.path, limit=2, max_new_tokens=8, opponent="base")

    @flow(name="judge-against-base")
    def against_base():
        with parent_run(tracking_uri(), "judge", "opponent", {}, {}) as run:
            return judge_candidate(spec=spec, registry=registry, candidate=tiny_model_ref, base=smollm2,
                                   report=make_report({"facts": 0.5}), run=run)

    state = against_base(return_state=True)
    assert state.is_completed(), state.message
    result = state.result().result(JUDGE_TASK)
    assert result.effective[JUDGE_TASK]["opponent"] == "base" and result.n_samples[JUDGE_TASK] == 2
    with pytest.raises(Exception, match="validation error"):
        JudgeSpec(model=smollm2.path, opponent="sft")   # champion | base only


def test_gauntlet_eval_adds_the_judge_and_the_safety_rates_as_the_flows_do(
        prefect_api, smollm2, tiny_model) -> None:  # noqa: F811
    """`gauntlet eval MODEL --set judge=… --set safety=… --opponent SOURCE`: the report carries the win rate
    against the opponent and both safety rates, each with its interval, beside the task scores."""
    from gauntlet.config.load import load_eval_request
    from gauntlet.eval.safety import BENIGN_TASK, HARMFUL_TASK
    from gauntlet.flows.evaluate import evaluate_flow

    model, spec, opponent = load_eval_request(
        str(tiny_model), None, ["fixture_arc_challenge"], True,
        ["limit=4", "num_fewshot=0", "speed_probe.enabled=false",
         f"judge={{model: '{smollm2.path}', limit: 2, max_new_tokens: 8}}", "safety={limit: 2, max_new_tokens: 8}"],
        opponent=smollm2.path)
    report = evaluate_flow(model=model, spec=spec, opponent=opponent)
    assert report.score("fixture_arc_challenge", "acc") is not None
    judged = report.result(JUDGE_TASK)
    assert judged is not None and judged.n_samples[JUDGE_TASK] == 2 and judged.scores[0].ci_low is not None
    assert judged.effective[JUDGE_TASK]["opponent"] == "base"
    for task in (HARMFUL_TASK, BENIGN_TASK):
        result = report.result(task)
        assert result is not None and result.scores[0].ci_high is not None, task
