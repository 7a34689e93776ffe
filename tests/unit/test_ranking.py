"""The leaderboard's ranking rules on hand-made reports: ties, direction, protocol groups, deltas and trends,
the Pareto front, and leaderboard configs. Real nights of the flow run in tests/integration/test_leaderboard.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from gauntlet.config.leaderboard import LeaderboardSpec
from gauntlet.config.load import load_leaderboard_spec
from gauntlet.config.problems import SpecError
from gauntlet.eval.protocol import protocols_match
from gauntlet.leaderboard.board import (
    build_leaderboard,
    pareto_front,
)
from gauntlet.leaderboard.candidates import CandidateOutcome
from gauntlet.refs import EvalReport, PerfProbe, TaskResult, TaskScore
from tests.helpers import REPO

PROTOCOL = {"backend": "hf", "limit": None, "tasks": ["demo_facts"]}

VERSIONS = {"lm_eval": "0.4.13", "tasks": {"demo_facts": "1.0"}, "device": "cpu", "dtype": "float32"}


def report(acc: float | None, tokens: float = 10.0, memory: float = 1.0, protocol: dict | None = None,
           stamp: str = "2026-01-01T02:00:00+00:00") -> EvalReport:
    scores = [] if acc is None else [TaskScore(task="demo_facts", metric="acc", value=acc)]
    # the evaluation's own baseline for the task: the board normalizes with it
    results = [TaskResult(task="demo_facts", engine_task="demo_facts", source="local", metric="acc", value=acc,
                          random_baseline=0.25, random_baseline_source="mean of 1/choices over 48 items",
                          scores=scores, versions={"demo_facts": "1.0"}, num_fewshot=0, results_path="/dev/null",
                          samples_path="/dev/null")]
    return EvalReport(model="m", model_sha="sha", scores=scores, task_results=results, protocol=protocol or PROTOCOL,
                      versions=VERSIONS,
                      perf=PerfProbe(backend="hf", device="cpu", tokens_per_s=tokens, first_token_latency_ms=5.0,
                                     peak_memory_gb=memory, size_on_disk_gb=0.01),
                      timestamp=stamp, report_path="/dev/null")


def outcome(name: str, rep: EvalReport | None, status: str = "ok", reason: str | None = None) -> CandidateOutcome:
    return CandidateOutcome(candidate=name, variant="bf16", source=f"/models/{name}", status=status, reason=reason,
                            model_sha=rep.model_sha if rep else None, report=rep)


def spec_for(tmp_path: Path, **ranking) -> LeaderboardSpec:
    data = tmp_path / "eval.jsonl"
    data.write_text("{}\n")
    return LeaderboardSpec.model_validate({
        "name": "unit", "candidates": [{"source": "demo://tiny-llama"}], "eval_file": str(data),
        "eval": {"tasks": ["demo_facts"]}, "ranking": ranking})


def test_ties_share_a_rank_and_missing_scores_are_listed_not_ranked(tmp_path: Path) -> None:
    spec = spec_for(tmp_path)
    board = build_leaderboard(spec, [outcome("a", report(0.625)), outcome("b", report(0.625)),
                                     outcome("c", report(0.4)), outcome("d", report(None)),
                                     outcome("e", None, "failed", "ValueError: weights do not load")], [])
    rows = {r.candidate: r for r in board.rows}
    assert (rows["a"].rank, rows["b"].rank, rows["c"].rank) == (1, 1, 3)
    assert rows["a"].tie and rows["b"].tie and not rows["c"].tie
    assert rows["a"].average == pytest.approx(50.0) and rows["c"].average == pytest.approx(20.0)
    assert rows["d"].status == "ranked" and rows["d"].rank is None
    assert rows["d"].missing == ["demo_facts.acc"] and "missing demo_facts.acc" in rows["d"].reason
    assert rows["e"].status == "failed" and rows["e"].reason == "ValueError: weights do not load"
    assert [r.candidate for r in board.rows] == ["a", "b", "c", "d", "e"]
    # the baseline is the one the evaluation used, not the leaderboard's own
    assert board.baselines == {"demo_facts": {"value": 0.25, "source": "mean of 1/choices over 48 items"}}


def test_lower_is_better_keys_rank_ascending(tmp_path: Path) -> None:
    spec = spec_for(tmp_path, key="peak_memory_gb")
    board = build_leaderboard(spec, [outcome("big", report(0.5, memory=3.0)), outcome("small", report(0.3, memory=1.0))],
                              [])
    assert not board.higher_is_better
    assert [(r.candidate, r.rank) for r in board.ranked()] == [("small", 1), ("big", 2)]


def test_reports_with_another_protocol_are_listed_apart_with_the_difference(tmp_path: Path) -> None:
    spec = spec_for(tmp_path)
    odd = report(0.9, protocol={**PROTOCOL, "limit": 8})
    assert not protocols_match(odd, report(0.5))
    board = build_leaderboard(spec, [outcome("a", report(0.5)), outcome("b", report(0.4)), outcome("odd", odd)],
                              [])
    row = board.row("odd", "bf16")
    assert row.status == "unranked" and row.rank is None
    assert "limit: 8 != None" in row.reason
    assert [r.candidate for r in board.ranked()] == ["a", "b"]


def test_deltas_and_trend_against_previous_nights(tmp_path: Path) -> None:
    spec = spec_for(tmp_path)
    night1 = build_leaderboard(spec, [outcome("a", report(0.5)), outcome("b", report(0.4))], [],
                               night="2026-01-01T02:00:00+00:00")
    night2 = build_leaderboard(spec, [outcome("a", report(0.625)), outcome("b", report(0.4, protocol={**PROTOCOL, "limit": 4})),
                                      outcome("c", report(0.3))], [night1], night="2026-01-02T02:00:00+00:00")
    a, b, c = night2.row("a", "bf16"), night2.row("b", "bf16"), night2.row("c", "bf16")
    assert a.delta_average == pytest.approx(50.0 - 100 / 3)
    assert [p.night for p in a.trend] == [night1.night, night2.night]
    assert b.delta_average is None and b.status == "unranked"
    assert c.delta_note == "new tonight" and len(c.trend) == 1
    assert night2.previous_night == night1.night and night2.nights == [night1.night, night2.night]


def test_pareto_front() -> None:
    points = [("fast-weak", 100.0, 10.0), ("slow-strong", 10.0, 60.0), ("balanced", 50.0, 40.0),
              ("dominated", 40.0, 30.0), ("also-dominated", 10.0, 50.0)]
    assert pareto_front(points) == {"fast-weak", "slow-strong", "balanced"}


@pytest.mark.parametrize("change, message", [
    ({"variants": ["fp8"]}, "unknown variant(s) ['fp8']"),
    ({"candidates": [{"source": "models:/only-a-name"}]}, "models:/NAME@alias or models:/NAME/VERSION"),
    ({"candidates": [{"source": "ftp://x"}]}, "unsupported scheme"),
    ({"candidates": [{"source": "demo://tiny-llama"}, {"source": "demo://tiny-llama"}]}, "used more than once"),
    ({"ranking": {"key": "task:nope"}}, "key 'task:nope' is not one of"),
    ({"ranking": {"suites": {"core": ["nope"]}}}, "suite 'core' names task(s) ['nope']"),
    ({"ranking": {"random_baselines": {"demo_facts": 0.25}}}, "declare `random_baseline` in evals/suites.yaml"),
    ({"eval_file": "missing.jsonl"}, "does not exist"),
    ({"eval": {"tasks": ["demo_facts"], "perplexity": {}}}, "eval.perplexity reads data.validation, and this "
                                                             "leaderboard has no DVC data"),
    ({"eval": {"tasks": ["demo_facts"], "safety": {}}}, "eval.safety is judged by eval.judge, which is not set"),
])
def test_invalid_leaderboard_configs_name_the_field(tmp_path: Path, change: dict, message: str) -> None:
    raw = {"name": "bad", "candidates": [{"source": "demo://tiny-llama"}], "eval": {"tasks": ["demo_facts"]}}
    raw.update(change)
    path = tmp_path / "lb.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(SpecError) as err:
        load_leaderboard_spec(path, root=tmp_path if "eval_file" in change else None)
    assert message in str(err.value)


def test_repository_leaderboard_config_is_valid() -> None:
    spec = load_leaderboard_spec(REPO / "configs" / "leaderboard.yaml")
    assert spec.tracking.experiment == "leaderboard" and spec.ranking.key == "average"
    assert any(c.source.startswith("models:/") for c in spec.candidates)


def test_cli_validates_leaderboard_configs_before_running(tmp_path: Path, capsys) -> None:
    from gauntlet.cli import main

    assert main(["validate", str(REPO / "configs" / "leaderboard.yaml")]) == 0
    assert "valid leaderboard config" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"candidates": [{"source": "demo://tiny-llama"}], "variants": ["int3"],
                                   "eval": {"tasks": ["demo_facts"]}}))
    assert main(["leaderboard", str(bad)]) == 2
    assert "unknown variant(s) ['int3']" in capsys.readouterr().err


def report_with_items(right: set[int], n: int = 48) -> EvalReport:
    """A report whose demo_facts score comes from per-item records: items in ``right`` answered correctly."""
    rep = report(len(right) / n)
    items = {f"demo_facts/{i}": float(i in right) for i in range(n)}
    result = rep.task_results[0].model_copy(update={"item_scores": {"acc": items}})
    return rep.model_copy(update={"task_results": [result]})


def test_rows_a_paired_test_cannot_tell_apart_share_a_rank_range(tmp_path: Path) -> None:
    """48 items: a right on 40, b on 20, c on the same 20 and one more. b and c are one item apart: noise."""
    from gauntlet.leaderboard.publish import render_markdown

    strong, weak = set(range(40)), set(range(20))
    board = build_leaderboard(spec_for(tmp_path), [
        outcome("b", report_with_items(weak)), outcome("a", report_with_items(strong)),
        outcome("c", report_with_items(weak | {45}))], [])
    rows = {r.candidate: r for r in board.ranked()}
    assert [r.candidate for r in board.ranked()] == ["a", "c", "b"]  # by the point estimate
    assert (rows["a"].rank_text, rows["c"].rank_text, rows["b"].rank_text) == ("1", "2–3", "2–3")
    assert rows["c"].rank == 2 and rows["b"].rank == 2 and not rows["a"].tie and rows["b"].tie
    # every ranked score carries its interval, and the point estimate lies inside it
    for r in rows.values():
        assert r.ci_low < r.average < r.ci_high and r.intervals["demo_facts"] == (r.ci_low, r.ci_high)
    assert rows["a"].ci_low > rows["c"].ci_high - 30  # the scale is points above chance (0..100)
    markdown = render_markdown(board)
    assert "| 2–3 | c |" in markdown and "| 1 | a |" in markdown and "95% intervals" in markdown


def test_perplexity_and_safety_rates_get_columns_with_their_intervals(tmp_path: Path) -> None:
    """Reports that carry held-out perplexity (eval.perplexity) and safety rates (eval.safety) show them beside
    the scores, with their 95% intervals, in the JSON, the markdown and the HTML; they do not enter the rank."""
    from gauntlet.eval.safety import HARMFUL_RATE, HARMFUL_TASK
    from gauntlet.leaderboard.html import render_html
    from gauntlet.leaderboard.publish import render_markdown, table_rows
    from gauntlet.refs import PerplexityResult

    def measured(acc: float, ppl: float, harmful: float) -> EvalReport:
        rep = report(acc)
        rate = TaskScore(task=HARMFUL_TASK, metric=HARMFUL_RATE, value=harmful, ci_low=harmful / 2,
                         ci_high=min(1.0, harmful * 2), n=20)
        return rep.model_copy(update={
            "perplexity": PerplexityResult(split="validation", data_md5="m", n=48, byte_perplexity=ppl,
                                           ci_low=ppl - 0.5, ci_high=ppl + 0.5, bits_per_byte=1.0),
            "scores": rep.scores + [rate]})

    board = build_leaderboard(spec_for(tmp_path), [outcome("safe", measured(0.5, 9.23, 0.05)),
                                                   outcome("unsafe", measured(0.7, 12.5, 0.4)),
                                                   outcome("plain", report(0.6))], [])
    assert board.measures == ["byte_perplexity", HARMFUL_RATE]
    assert [r.candidate for r in board.ranked()] == ["unsafe", "plain", "safe"]   # ranked by score alone
    rows = {r.candidate: r for r in board.rows}
    assert rows["safe"].measures["byte_perplexity"].value == 9.23 and not rows["plain"].measures
    md = render_markdown(board)
    assert "| held-out ppl ↓ | harmful % ↓ |" in md
    assert "| 9.23 (8.73–9.73) | 5.0 (2.5–10.0) |" in md and "| 12.50 (12.00–13.00) | 40.0 (20.0–80.0) |" in md
    html = render_html(board)
    assert "held-out ppl ↓" in html and 'title="95% interval 2.5 to 10.0"' in html
    assert {r["model"]: r[HARMFUL_RATE] for r in table_rows(board)} == {"safe": 0.05, "unsafe": 0.4, "plain": None}
    assert "measures" in board.model_dump(mode="json")["rows"][0]


def test_a_candidate_may_declare_its_objective_and_a_wrong_one_names_the_field_and_the_fix(tmp_path: Path) -> None:
    raw = {"name": "objectives", "eval": {"tasks": ["demo_facts"]},
           "candidates": [{"source": "demo://tiny-llama", "name": "a", "objective": "dpo"},
                          {"source": "demo://tiny-llama", "name": "b"}]}
    path = tmp_path / "lb.yaml"
    path.write_text(yaml.safe_dump(raw))
    spec = load_leaderboard_spec(path)
    assert [c.objective for c in spec.candidates] == ["dpo", None]
    raw["candidates"][1]["objective"] = "dop"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(SpecError) as err:
        load_leaderboard_spec(path)
    assert "candidates.1.objective: unknown training objective 'dop'" in str(err.value)
    assert "hint: did you mean 'dpo'? objectives: sft, dpo, ipo, simpo, orpo, kto" in str(err.value)


def test_the_objective_column_shows_the_registry_tag_else_the_declared_objective_else_a_dash(tmp_path: Path) -> None:
    """The registry version's train.objective tag wins over a declared objective (the note says so); a local folder
    shows what its config declares; nothing known is a dash, never a guess. An older board without the column
    reads back with the objective unknown."""
    from gauntlet.config.leaderboard import LeaderboardCandidate
    from gauntlet.config.model import ModelSpec
    from gauntlet.leaderboard.board import Leaderboard
    from gauntlet.leaderboard.candidates import PreparedCandidate, ok_outcome
    from gauntlet.leaderboard.html import render_html
    from gauntlet.leaderboard.publish import render_markdown, table_rows
    from gauntlet.models import ResolvedModel
    from gauntlet.names import OBJECTIVE_TAG
    from gauntlet.refs import ModelRef

    def scored(name: str, source: str, lineage: dict[str, str], declared: str | None = None) -> CandidateOutcome:
        note = f"{source} → version 3" if lineage else None
        resolved = ResolvedModel(source=source, model=ModelSpec(source="demo://tiny-llama"), note=note,
                                 lineage=lineage, stable=True)
        prepared = PreparedCandidate(resolved=resolved, model=ModelRef(name=name, path="/m", source=source, sha="s"))
        candidate = LeaderboardCandidate(source=source, name=name, objective=declared)
        return ok_outcome(candidate, "bf16", prepared, report(0.5))

    board = build_leaderboard(spec_for(tmp_path), [
        scored("tagged", "models:/bot@champion", {OBJECTIVE_TAG: "dpo"}, declared="sft"),
        scored("agrees", "models:/bot/2", {OBJECTIVE_TAG: "kto"}, declared="kto"),
        scored("old-version", "models:/bot/1", {"data.md5": "m"}),
        scored("declared", "/models/declared", {}, declared="orpo"),
        scored("local", "/models/local", {})], [])
    rows = {r.candidate: r for r in board.rows}
    assert {n: r.objective for n, r in rows.items()} == {"tagged": "dpo", "agrees": "kto", "old-version": None,
                                                         "declared": "orpo", "local": None}
    assert rows["tagged"].note == ("models:/bot@champion → version 3; the config declares objective sft, the "
                                   "version's train.objective tag says dpo: dpo shown")
    assert rows["agrees"].note == "models:/bot/2 → version 3" and rows["local"].note is None
    md = render_markdown(board)
    assert "| rank | model | objective | variant | average |" in md
    assert "| tagged | dpo | bf16 |" in md and "| local | — | bf16 |" in md and "| old-version | — | bf16 |" in md
    html = render_html(board)
    assert '<th data-type="text" class="text">Objective</th>' in html
    assert '<td class="text" data-v="dpo">dpo</td>' in html and '<td class="text missing" data-v="">—</td>' in html
    assert {r["model"]: r["objective"] for r in table_rows(board)}["local"] == "—"
    older = board.model_dump(mode="json")
    for r in older["rows"]:
        del r["objective"]
    assert all(r.objective is None for r in Leaderboard.model_validate(older).rows)
