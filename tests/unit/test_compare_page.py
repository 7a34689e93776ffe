"""The per-item page on hand-made reports and samples files: pairing by item, differing items first, the reasons two
reports are not compared, escaping of model output, battles, and which pages a board has. Two real evaluations
and the page in Chromium: tests/integration/test_compare_page.py."""

from __future__ import annotations

import json
import re
from pathlib import Path

from gauntlet.leaderboard.arena import Battle
from gauntlet.leaderboard.board import BoardRow, Leaderboard
from gauntlet.leaderboard.compare_page import compare_links, compare_pairs, item_rows, render_compare_page
from gauntlet.refs import EvalReport, TaskResult, TaskScore

PROTOCOL = {"backend": "hf", "limit": None, "tasks": ["gen"], "task_settings": {"gen": {"limit": None}}}
XSS = "<script>alert('owned')</script>"


def sample(doc_id: int, answer: str, score: float, target: str = "blue") -> dict:
    """One lm-eval sample row of a generation task under the ``first-word`` filter, as scoring writes it."""
    return {"task": "gen", "doc_id": doc_id, "doc": {"q": doc_id}, "target": target,
            "arguments": [[f"Question {doc_id}?\n", {"until": ["\n"]}]], "resps": [[f"{answer} is my answer"]],
            "filtered_resps": [answer], "filter": "first-word", "metrics": ["exact_match"], "exact_match": score}


def report(tmp_path: Path, name: str, answers: dict[int, str], protocol: dict | None = None) -> EvalReport:
    rows = [sample(i, a, float(a == "blue")) for i, a in answers.items()]
    path = tmp_path / f"{name}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    items = {"exact_match,first-word": {f"gen/{r['doc_id']}": r["exact_match"] for r in rows}}
    value = sum(r["exact_match"] for r in rows) / len(rows)
    score = TaskScore(task="gen", metric="exact_match,first-word", value=value, ci_low=0.1, ci_high=0.9, n=len(rows))
    result = TaskResult(task="gen", engine_task="gen", source="local", metric="exact_match,first-word", value=value,
                        scores=[score], versions={"gen": "1.0"}, num_fewshot=0, item_scores=items,
                        results_path="/dev/null", samples_path=str(path))
    return EvalReport(model=name, model_sha=name, scores=[score], task_results=[result],
                      protocol=protocol or PROTOCOL, versions={}, timestamp="2026-01-01T02:00:00+00:00",
                      report_path="/dev/null")


def row(name: str, rank: int, average: float = 50.0) -> BoardRow:
    return BoardRow(candidate=name, variant="bf16", source=f"/m/{name}", status="ranked", rank=rank, average=average,
                    ci_low=average - 10, ci_high=average + 10, normalized={"gen": average},
                    raw={"gen": average / 100}, intervals={"gen": (average - 10, average + 10)})


ANSWERS_A = {0: "blue", 1: "red", 2: "blue", 3: "green", 4: "blue"}
ANSWERS_B = {0: "blue", 1: "blue", 2: "blue", 3: "green", 4: "red"}   # item 1: b right; 4: a right; 3: both wrong


def test_items_pair_by_doc_id_with_the_differing_ones_first(tmp_path: Path) -> None:
    a, b = report(tmp_path, "a", ANSWERS_A), report(tmp_path, "b", ANSWERS_B)
    rows = item_rows(a, b, "gen")
    assert [r.key for r in rows] == ["gen/1", "gen/4", "gen/0", "gen/2", "gen/3"]
    assert [r.differs for r in rows] == [True, True, False, False, False]
    one = rows[0]
    assert (one.answer_a, one.answer_b, one.target, one.score_a, one.score_b) == ("red", "blue", "blue", 0.0, 1.0)
    assert one.prompt == "Question 1?\n" and one.response_a == "red is my answer"
    # a different answer with the same score differs too; it still sorts by doc id among the differing
    c = report(tmp_path, "c", {**ANSWERS_A, 3: "grey"})
    assert [r.key for r in item_rows(a, c, "gen") if r.differs] == ["gen/3"]


def test_multiple_choice_items_show_the_choice_picked(tmp_path: Path) -> None:
    rows = [{"task": "mc", "doc_id": 0, "target": 1, "arguments": [["Colour?\n", "red"], ["Colour?\n", "blue"]],
             "resps": [[[-3.0, False]], [[-1.0, False]]], "filtered_resps": [[-3.0, False], [-1.0, False]],
             "filter": "none", "metrics": ["acc"], "acc": 1.0}]
    path = tmp_path / "mc.jsonl"
    path.write_text(json.dumps(rows[0]) + "\n")
    result = TaskResult(task="mc", engine_task="mc", source="local", metric="acc", value=1.0,
                        scores=[TaskScore(task="mc", metric="acc", value=1.0)], versions={}, num_fewshot=0,
                        item_scores={"acc": {"mc/0": 1.0}}, results_path="/dev/null", samples_path=str(path))
    rep = EvalReport(model="m", model_sha="m", scores=result.scores, task_results=[result], protocol=PROTOCOL,
                     versions={}, timestamp="t", report_path="/dev/null")
    (item,) = item_rows(rep, rep, "mc")
    assert (item.prompt, item.answer_a, item.target, item.differs) == ("Colour?\n", "blue", "blue", False)
    assert item.response_a == "red: -3.00\nblue: -1.00"


def test_reports_measured_differently_are_not_compared_and_the_page_says_why(tmp_path: Path) -> None:
    a = report(tmp_path, "a", ANSWERS_A)
    b = report(tmp_path, "b", ANSWERS_B, {**PROTOCOL, "backend": "vllm"})
    html = render_compare_page(row("a", 1), row("b", 2), {"a|bf16": a, "b|bf16": b})
    assert "Not compared item by item: measured differently: backend: &#x27;hf&#x27; != &#x27;vllm&#x27;" in html
    assert 'class="item' not in html
    missing = render_compare_page(row("a", 1), row("b", 2), {"a|bf16": a})
    assert "the report of b / bf16 is not readable here" in missing
    # an endpoint's generation-only report, ranked beside weights by the board (served_alike), is compared
    served = report(tmp_path, "b", ANSWERS_B, {**PROTOCOL, "backend": "local-completions",
                                               "endpoint": {"generation_only": True}})
    assert len(item_rows(a, served, "gen")) == 5


def test_model_output_is_escaped_everywhere_it_is_shown(tmp_path: Path) -> None:
    a = report(tmp_path, "a", {**ANSWERS_A, 1: XSS})
    b = report(tmp_path, "b", ANSWERS_B)
    html = render_compare_page(row("a", 1), row(XSS, 2), {"a|bf16": a, f"{XSS}|bf16": b})
    scripts = re.findall(r"<script>(.*?)</script>", html, flags=re.S)
    assert len(scripts) == 1 and "alert" not in scripts[0]     # only the page's own sorting script
    assert "&lt;script&gt;alert(&#x27;owned&#x27;)&lt;/script&gt;" in html
    assert "<title>a / bf16 vs &lt;script&gt;" in html


def test_the_header_shows_both_scores_with_intervals_and_the_differing_count(tmp_path: Path) -> None:
    a, b = report(tmp_path, "a", ANSWERS_A), report(tmp_path, "b", ANSWERS_B)
    html = render_compare_page(row("a", 1, 60.0), row("b", 2, 40.0), {"a|bf16": a, "b|bf16": b})
    assert '60.0 <span class="ci">50.0–70.0</span>' in html and '40.0 <span class="ci">30.0–50.0</span>' in html
    assert "exact_match,first-word 0.6000 (0.1000–0.9000)" in html
    assert '<td data-v="2">2 of 5</td>' in html and "a scores higher on 1, b on 1" in html
    assert "Δ +0.0" in html and "5 paired items, 1 better / 1 worse" in html


def test_battles_between_the_two_are_shown_from_the_first_rows_side(tmp_path: Path) -> None:
    a, b = report(tmp_path, "a", ANSWERS_A), report(tmp_path, "b", ANSWERS_B)
    reports = {"a|bf16": a, "b|bf16": b}
    assert "No battles between these two yet." in render_compare_page(row("a", 1), row("b", 2), reports)
    battles = [Battle(model_a="a", model_b="b", item="i1", outcome=1.0, len_a=10, len_b=12),
               Battle(model_a="b", model_b="a", item="i2", outcome=1.0, len_a=30, len_b=5),
               Battle(model_a="b", model_b="c", item="i3", outcome=0.5, len_a=1, len_b=1)]
    html = render_compare_page(row("a", 1), row("b", 2), reports, battles)
    assert "a won 1, lost 1 and tied 0 of 2 battles" in html
    assert '<td class="text" data-v="i2">i2</td><td data-v="0.0">0.00</td><td data-v="5">5</td>' in html
    assert "i3" not in html


def test_each_ranked_row_links_to_a_page_with_its_neighbour_and_pages_grow_linearly() -> None:
    rows = [row(n, i + 1) for i, n in enumerate(["top", "second", "third", "fourth"])]
    rows.append(BoardRow(candidate="gone", variant="bf16", source="x", status="failed"))
    board = Leaderboard(name="b", title="t", night="n", rank_key="average", higher_is_better=True, tasks=["gen"],
                        task_metrics={"gen": "exact_match"}, suites={}, baselines={}, rows=rows)
    pairs = compare_pairs(board)
    assert [(a.candidate, b.candidate, p) for a, b, p in pairs] == [
        ("top", "second", "compare/top-bf16--second-bf16.html"),
        ("second", "third", "compare/second-bf16--third-bf16.html"),
        ("third", "fourth", "compare/third-bf16--fourth-bf16.html")]
    links = compare_links(board)
    assert links["top|bf16"] == ("compare/top-bf16--second-bf16.html", "second / bf16")
    assert links["second|bf16"] == ("compare/top-bf16--second-bf16.html", "top / bf16")   # the one above
    assert links["fourth|bf16"] == ("compare/third-bf16--fourth-bf16.html", "third / bf16")
    assert "gone|bf16" not in links
