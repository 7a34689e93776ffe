"""The per-item page for real: two tiny random-init Llamas (different seeds) evaluated through the evaluate flow
(real lm-eval, samples files and all) on the demo's facts as multiple choice and as generation, ranked by
``build_leaderboard`` and published by ``write_board``; the board and its page opened in headless Chromium (the
board test's chromedriver fixture). The rules on hand-made rows: tests/unit/test_compare_page.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from gauntlet.config.eval import EvalSpec, SpeedProbeSpec
from gauntlet.config.leaderboard import LeaderboardSpec
from gauntlet.demo import data as demo_data
from gauntlet.leaderboard.board import build_leaderboard
from gauntlet.leaderboard.candidates import CandidateOutcome
from gauntlet.leaderboard.compare_page import task_metric
from gauntlet.leaderboard.publish import write_board
from tests.integration import test_leaderboard as board_tests

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

browser = board_tests.browser       # headless Chromium through chromedriver (installed with apt where missing)

SEEDS = {"alpha": 2, "beta": 5}
TASKS = ["demo_facts", "demo_facts_gen"]     # multiple choice (acc) and generation (exact_match,first-word)


@pytest.fixture(scope="module")
def night(prefect_api):
    from gauntlet.demo.model import build_demo_model
    from tests.helpers import evaluate_in_flow, project_workdir

    root = project_workdir("compare-page")
    eval_file = root / "eval.jsonl"
    demo_data.write_jsonl(eval_file, demo_data.build(48, 7)["eval"])
    spec = EvalSpec(tasks=TASKS, limit=12, batch_size=16, speed_probe=SpeedProbeSpec(enabled=False))
    models = {n: build_demo_model("tiny-llama", out=root / "models" / n, seed=s) for n, s in SEEDS.items()}
    reports = {n: evaluate_in_flow(m, spec, eval_file=eval_file, variant="bf16") for n, m in models.items()}
    board_spec = LeaderboardSpec.model_validate({
        "name": "compare-test", "candidates": [{"source": str(m), "name": n} for n, m in models.items()],
        "eval_file": str(eval_file), "eval": spec.model_dump(mode="json"), "publish": {"dir": str(root / "site")},
        "ranking": {"task_metrics": {"demo_facts_gen": "exact_match"}}})
    outcomes = [CandidateOutcome(candidate=n, variant="bf16", source=str(models[n]), status="ok",
                                 model_sha=r.model_sha, report=r) for n, r in reports.items()]
    board = build_leaderboard(board_spec, outcomes, [])
    files = write_board(board, root / "site")
    yield board.model_copy(update={"files": files}), reports
    shutil.rmtree(root, ignore_errors=True)


def filtered_answer(row: dict) -> str:
    """What the model answered, read from lm-eval's sample row itself: a generation's filtered answer, a
    multiple-choice item's choice of highest log-likelihood."""
    if row["filter"] == "none":
        lls = [ll for ll, _ in row["filtered_resps"]]
        return row["arguments"][lls.index(max(lls))][1]
    return row["filtered_resps"][0]


def samples(report, task: str, metric: str) -> dict[str, dict]:
    result = report.result(task)
    filt = metric.partition(",")[2] or "none"
    rows = [json.loads(line) for line in Path(result.samples_path).read_text().splitlines()]
    return {f"{r['task']}/{r['doc_id']}": r for r in rows if r["filter"] == filt}


def doc_order(key: str) -> tuple[str, int]:
    task, _, doc = key.rpartition("/")
    return task, int(doc)


def page_items(browser, task: str) -> list[dict]:
    from selenium.webdriver.common.by import By

    (table,) = browser.find_elements(By.CSS_SELECTOR, f'table.items[data-task="{task}"]')
    out = []
    for tr in table.find_elements(By.CSS_SELECTOR, "tbody tr.item"):
        cell = {c: tr.find_element(By.CSS_SELECTOR, f"td.{c}") for c in ("answer-a", "answer-b")}
        scores = [s.get_attribute("data-v") for s in tr.find_elements(By.CSS_SELECTOR, "td.score")]
        out.append({"key": tr.get_attribute("data-key"), "differs": tr.get_attribute("data-differs") == "1",
                    "a": cell["answer-a"].get_attribute("textContent"),
                    "b": cell["answer-b"].get_attribute("textContent"), "scores": [float(s) for s in scores]})
    return out


def test_the_board_links_each_row_to_a_page_of_both_answers_differing_items_first(night, browser) -> None:
    from selenium.webdriver.common.by import By

    board, reports = night
    (a, b) = board.ranked()
    browser.get(Path(board.files["html"]).as_uri())
    links = {tr.get_attribute("data-key"): tr.find_element(By.CSS_SELECTOR, "a.compare").get_attribute("href")
             for tr in browser.find_elements(By.CSS_SELECTOR, "#board tbody tr")}
    assert set(links) == {a.key, b.key} and len(set(links.values())) == 1   # two rows: one page, both link to it
    page = Path(board.files["html"]).parent / "compare" / f"{a.candidate}-bf16--{b.candidate}-bf16.html"
    assert links[a.key] == page.as_uri() and page.is_file()

    browser.get(links[b.key])
    assert browser.find_element(By.TAG_NAME, "h1").text == f"{a.candidate} / bf16 vs {b.candidate} / bf16"
    differing = 0
    for task in TASKS:
        metric = task_metric(reports[a.candidate], task, board.task_metrics[task])
        items = page_items(browser, task)
        scores = [reports[r.candidate].result(task).item_scores[metric] for r in (a, b)]
        rows = [samples(reports[r.candidate], task, metric) for r in (a, b)]
        assert [i["key"] for i in items] and {i["key"] for i in items} == set(scores[0]) == set(scores[1])
        for i in items:   # both answers as lm-eval filtered them, the scores as the reports hold them
            assert (i["a"], i["b"]) == (filtered_answer(rows[0][i["key"]]), filtered_answer(rows[1][i["key"]]))
            assert i["scores"] == [scores[0][i["key"]], scores[1][i["key"]]]
            assert i["differs"] == (i["a"] != i["b"] or i["scores"][0] != i["scores"][1])
        # the DOM's order: every differing item before every other one, each group by doc id
        assert [i["key"] for i in items] == [i["key"] for i in sorted(items, key=lambda i: (not i["differs"],
                                                                                         doc_order(i["key"])))]
        count = sum(i["differs"] for i in items)
        shown = browser.find_element(By.CSS_SELECTOR, f'#scores tr[data-task="{task}"] td:last-child').text
        assert shown == f"{count} of {len(items)}"
        differing += count
        header = browser.find_elements(By.CSS_SELECTOR, f'#scores tr[data-task="{task}"] td[data-v]')
        assert [float(h.get_attribute("data-v")) for h in header[:2]] == [a.normalized[task], b.normalized[task]]
    assert differing > 0   # two seeds answer some items differently: the ordering above was tested on both kinds
    assert browser.find_element(By.ID, "no-battles").text == "No battles between these two yet."
    png = page.with_suffix(".png")
    browser.save_screenshot(str(png))
    assert png.stat().st_size > 10_000
