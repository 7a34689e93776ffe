"""The nightly leaderboard: three real nights of the flow (the ranking rules alone: tests/unit/test_ranking.py).

The nights run the real flow on the session's Prefect test API with real sqlite MLflow (history and the
registry), real lm-eval on tiny random-init Llamas built with different seeds, and one broken candidate
(a model folder whose weights file is garbage). The registered version carries a train.objective tag (dpo) that
its candidate's config contradicts (sft): the tag is shown. Night 2 changes nothing; night 3 adds a candidate.
The HTML is opened in a real headless Chromium (chromedriver through Selenium).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from datetime import timedelta
from itertools import pairwise
from pathlib import Path

import pytest
import yaml

from gauntlet.demo import data as demo_data
from gauntlet.leaderboard.board import (
    Leaderboard,
)

# Random-init models score near chance; these seeds give two equal scores above it and one at it
# (tables below are computed from the reports, not assumed).
SEEDS = {"alpha": 2, "beta": 5, "registered": 1, "gamma": 3}

REGISTERED = "lb-test-model"


def register_model(folder: Path, name: str, tags: dict[str, str]) -> str:
    """Register ``folder`` as a new version of ``name`` @champion in the session's MLflow registry."""
    from mlflow.tracking import MlflowClient

    from gauntlet.tracking import tracking_uri
    from tests.helpers import register_as_champion

    return register_as_champion(MlflowClient(tracking_uri()), "lb-test-registry", folder, name,
                                {"test": "leaderboard", **tags})


@pytest.fixture(scope="module")
def world(prefect_api):
    from gauntlet.demo.model import build_demo_model
    from tests.helpers import project_workdir

    root = project_workdir("leaderboard")  # its eval file and publish folder must lie inside the project
    yield make_world(root, build_demo_model)
    shutil.rmtree(root, ignore_errors=True)


def make_world(root: Path, build_demo_model) -> dict:
    eval_file = root / "eval.jsonl"
    demo_data.write_jsonl(eval_file, demo_data.build(48, 7)["eval"])
    models = {name: build_demo_model("tiny-llama", out=root / "models" / name, seed=seed)
              for name, seed in SEEDS.items()}
    broken = root / "models" / "broken"
    shutil.copytree(models["alpha"], broken)
    # well-formed safetensors (fetch_model's integrity check passes) holding no Llama weights: the
    # candidate fails in its evaluation, as a model that does not load does
    import torch
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(broken / "model.safetensors"))
    config = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**config, "hidden_size": 7}))  # 7 is no multiple of 4 heads
    register_model(models["registered"], REGISTERED, {"train.objective": "dpo"})   # as lineage_of tags a version
    candidates = [{"source": str(models["alpha"]), "name": "alpha"},
                  {"source": str(models["beta"]), "name": "beta", "objective": "orpo"},
                  {"source": f"models:/{REGISTERED}@champion", "name": "registered", "objective": "sft"},
                  {"source": str(broken), "name": "broken"}]
    config = {"name": "test-nightly", "candidates": candidates, "variants": ["bf16", "gptq-int4"],
              "eval_file": str(eval_file),
              "eval": {"tasks": ["demo_facts"], "batch_size": 16,
                       "speed_probe": {"prompts": 2, "max_new_tokens": 8}},
              "publish": {"dir": str(root / "site")}, "concurrency": {"gpu_slots": 1}}
    path = root / "leaderboard.yaml"
    path.write_text(yaml.safe_dump(config))
    return {"root": root, "config": config, "path": path, "models": models}


def run_night(config_path: Path):
    from gauntlet.flows.leaderboard import leaderboard

    state = leaderboard(config=str(config_path), return_state=True)
    assert state.is_completed(), state.message
    return state.result(), state.state_details.flow_run_id


def task_runs(flow_run_id) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        return client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))


def evaluations(flow_run_id) -> list:
    return [r for r in task_runs(flow_run_id) if r.name.startswith("evaluate-")]


@pytest.fixture(scope="module")
def night1(world):
    return run_night(world["path"])


@pytest.fixture(scope="module")
def night2(world, night1):
    return run_night(world["path"])


@pytest.fixture(scope="module")
def night3(world, night2):
    config = json.loads(json.dumps(world["config"]))
    config["candidates"].append({"source": str(world["models"]["gamma"]), "name": "gamma"})
    path = world["root"] / "leaderboard-plus-gamma.yaml"
    path.write_text(yaml.safe_dump(config))
    return run_night(path)


def test_first_night_ranks_scored_models_and_keeps_the_broken_one_visible(night1) -> None:
    board, flow_run_id = night1
    ranked = {r.candidate: r for r in board.ranked()}
    assert set(ranked) == {"alpha", "beta", "registered"}
    baseline = board.baselines["demo_facts"]
    assert baseline["value"] == pytest.approx(0.25) and "1/choices over 48 items" in baseline["source"]
    for r in ranked.values():
        assert r.variant == "bf16" and r.raw["demo_facts"] is not None
        assert r.normalized["demo_facts"] == pytest.approx(max(0.0, (r.raw["demo_facts"] - 0.25) / 0.75 * 100))
        assert r.average == pytest.approx(r.normalized["demo_facts"])
        assert r.tokens_per_s > 0 and r.size_on_disk_gb > 0 and r.peak_memory_gb > 0
    # ordered by average; each row's place lies in its rank range (from paired tests over the 48 items),
    # and every average carries its interval
    order = board.ranked()
    assert [r.average for r in order] == sorted((r.average for r in order), reverse=True)
    for place, r in enumerate(order, start=1):
        assert r.rank_low <= place <= r.rank_high and r.rank == r.rank_low, (place, r)
        assert r.tie == (r.rank_low != r.rank_high)
        assert r.ci_low <= r.average <= r.ci_high
    assert any(r.tie for r in order)  # random models score alike on the demo items: ranges, not ranks
    assert ranked["registered"].note.startswith(f"models:/{REGISTERED}@champion → version ")
    # the objective: the version's train.objective tag over the config's contradicting one (the note says so),
    # a local folder's declared one, and unknown for a local folder that declares none
    assert ranked["registered"].objective == "dpo"
    assert "the config declares objective sft, the version's train.objective tag says dpo" in ranked["registered"].note
    assert ranked["beta"].objective == "orpo" and ranked["alpha"].objective is None

    broken = board.row("broken", "bf16")
    assert broken.status == "failed" and broken.average is None
    assert "Error" in broken.reason and "broken" not in {r.candidate for r in order}
    states = {r.state.name for r in evaluations(flow_run_id)}
    assert "Failed" in states  # the broken candidate's evaluation task run itself failed
    for name in ("alpha", "beta", "registered", "broken"):
        # this night has an eval file but no DVC data: GPTQ has nothing to calibrate on, and says so
        row = board.row(name, "gptq-int4")
        assert row.status == "skipped" and "calibrates on the run's data" in row.reason and row.average is None


def test_first_night_publishes_files_artifacts_and_an_mlflow_run(night1) -> None:
    from mlflow.tracking import MlflowClient
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    board, flow_run_id = night1
    files = {k: Path(v) for k, v in board.files.items()}
    assert set(files) == {"json", "md", "html"} and all(p.exists() for p in files.values())
    written = Leaderboard.model_validate_json(files["json"].read_text())
    assert written.night == board.night
    md = files["md"].read_text()
    assert "| rank | model | objective | variant | average |" in md and "## Not ranked" in md
    assert all(f"| {name} | {objective} | bf16 |" in md
               for name, objective in (("alpha", "—"), ("beta", "orpo"), ("registered", "dpo")))
    html = files["html"].read_text()
    assert '<th data-type="text" class="text">Objective</th>' in html
    assert '<td class="text" data-v="dpo">dpo</td>' in html and '<td class="text missing" data-v="">—</td>' in html
    assert written.row("registered", "bf16").objective == "dpo"   # in the JSON too
    assert html.count('<tr data-key="') == 3 and '<svg id="scatter"' in html and "<script>" in html
    assert "src=" not in html and "<link" not in html  # self-contained: no external scripts or styles

    c = MlflowClient()
    run = c.get_run(board.mlflow_run_id)
    assert run.data.tags["gauntlet.leaderboard"] == "test-nightly" and run.info.status == "FINISHED"
    assert {a.path for a in c.list_artifacts(run.info.run_id)} >= {"leaderboard.json", "leaderboard.md",
                                                                  "leaderboard.html"}
    assert c.get_experiment(run.info.experiment_id).name == "leaderboard"

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    by_key = {a.key: a for a in artifacts}
    assert by_key["leaderboard-test-nightly"].type == "table"
    assert by_key["leaderboard-test-nightly-summary"].type == "markdown"
    table = by_key["leaderboard-test-nightly"].data
    rows = json.loads(table) if isinstance(table, str) else table
    assert {r["model"] for r in rows} == {"alpha", "beta", "registered", "broken"}
    assert {r["model"]: r["objective"] for r in rows if r["variant"] == "bf16"} == {
        "alpha": "—", "beta": "orpo", "registered": "dpo", "broken": "—"}
    assert "| alpha | — | bf16 |" in by_key["leaderboard-test-nightly-summary"].data


def test_gpu_evaluations_respect_the_tag_concurrency_limit(night1) -> None:
    from prefect.client.orchestration import get_client

    _, flow_run_id = night1
    with get_client(sync_client=True) as client:
        assert client.read_concurrency_limit_by_tag("gpu").concurrency_limit == 1
    runs = [r for r in evaluations(flow_run_id) if r.start_time and r.end_time]
    assert len(runs) == 4 and all("gpu" in r.tags for r in runs)
    spans = sorted((r.start_time, r.end_time) for r in runs)
    for (_, end), (start, _) in pairwise(spans):
        assert start >= end - timedelta(milliseconds=50), "two evaluations held the gpu slot at once"


def test_second_night_evaluates_nothing_again_and_shows_zero_deltas(night1, night2) -> None:
    board1, _ = night1
    board2, flow_run_id = night2
    states = [r.state.name for r in evaluations(flow_run_id)]
    # the three good models come from the cache; only the broken one is tried (and fails) again
    assert sorted(states) == ["Cached", "Cached", "Cached", "Failed"], states
    assert board2.previous_night == board1.night
    for r in board2.ranked():
        assert r.delta_average == 0.0, (r.candidate, r.delta_note)
        assert [p.night for p in r.trend] == [board1.night, board2.night]
        assert r.eval_run_id == board1.row(r.candidate, r.variant).eval_run_id  # the same evaluation
    assert "+0.0" in Path(board2.files["html"]).read_text()


def test_a_new_candidate_is_the_only_one_evaluated(night2, night3) -> None:
    board2, _ = night2
    board3, flow_run_id = night3
    states = sorted(r.state.name for r in evaluations(flow_run_id))
    assert states == ["Cached", "Cached", "Cached", "Completed", "Failed"], states
    gamma = board3.row("gamma", "bf16")
    assert gamma.status == "ranked" and gamma.delta_note == "new tonight" and len(gamma.trend) == 1
    assert gamma.eval_run_id not in {r.eval_run_id for r in board2.rows}
    assert all(r.delta_average == 0.0 for r in board3.ranked() if r.candidate != "gamma")
    assert len(board3.nights) == 3


def _which(*names: str) -> str | None:
    for n in names:
        if found := shutil.which(n):
            return found
    return None


@pytest.fixture(scope="session")
def browser():
    """Headless Chromium (or Chrome) driven by chromedriver. On Debian as root, installs chromium and
    chromium-driver with apt when they are missing (the CI image's test set-up)."""
    binary = _which("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
    driver = _which("chromedriver") or _which(str(Path(os.environ.get("CHROMEWEBDRIVER", "/nonexistent")) /
                                                   "chromedriver"))  # GitHub's Ubuntu runners
    if (binary is None or driver is None) and shutil.which("apt-get") and os.geteuid() == 0:
        subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", "chromium", "chromium-driver"],
                       check=False, capture_output=True, timeout=600,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
        binary, driver = _which("chromium"), _which("chromedriver")
    if binary is None or driver is None:
        pytest.skip("needs chromium (or chrome) and chromedriver: apt-get install chromium chromium-driver")
    pytest.importorskip("selenium", reason="pip install selenium (the dev extra)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1400,1600"):
        options.add_argument(arg)
    drv = webdriver.Chrome(service=Service(driver), options=options)
    yield drv
    drv.quit()


def test_html_leaderboard_sorts_and_draws_in_chromium(night3, browser) -> None:
    from selenium.webdriver.common.by import By

    board, _ = night3  # the published file is the latest night's
    browser.get(Path(board.files["html"]).as_uri())
    rows = browser.find_elements(By.CSS_SELECTOR, "#board tbody tr")
    assert [r.get_attribute("data-key") for r in rows] == [r.key for r in board.ranked()]

    headers = {h.text.strip(): h for h in browser.find_elements(By.CSS_SELECTOR, "#board thead th")}
    column = list(headers).index("tokens/s")

    def tokens_column() -> list[float]:
        return [float(r.find_elements(By.TAG_NAME, "td")[column].get_attribute("data-v"))
                for r in browser.find_elements(By.CSS_SELECTOR, "#board tbody tr")]

    headers["tokens/s"].click()
    ascending = tokens_column()
    assert ascending == sorted(ascending) and headers["tokens/s"].get_attribute("aria-sort") == "ascending"
    headers["tokens/s"].click()
    assert tokens_column() == sorted(ascending, reverse=True)
    headers["Model"].click()
    names = [r.find_elements(By.TAG_NAME, "td")[1].text for r in browser.find_elements(By.CSS_SELECTOR, "#board tbody tr")]
    assert names == sorted(names)

    points = browser.find_elements(By.CSS_SELECTOR, "#scatter circle.pt")
    assert len(points) == len(board.ranked())
    assert all(float(p.get_attribute("cx")) > 0 and float(p.get_attribute("cy")) > 0 for p in points)
    assert browser.find_elements(By.CSS_SELECTOR, "#scatter circle.pt.pareto")  # the front is marked
    scatter = browser.find_element(By.ID, "scatter")
    assert scatter.size["width"] > 300 and scatter.size["height"] > 200  # laid out, not collapsed
    # every label inside the plot, as Chromium lays the text out (its own bounding boxes)
    boxes = browser.execute_script("""
        const svg = document.getElementById('scatter'), box = svg.viewBox.baseVal;
        return [...svg.querySelectorAll('g.point text')].map(t => {
            const b = t.getBBox(); return [t.textContent, b.x, b.y, b.x + b.width, b.y + b.height, box.width, box.height];
        });""")
    assert len(boxes) == len(points)
    outside = [b for b in boxes if not (b[1] >= 0 and b[3] <= b[5] and b[2] >= 0 and b[4] <= b[6])]
    assert not outside, outside
    # intervals: one bar per point in the plot, and under every ranked average in the table
    assert len(browser.find_elements(By.CSS_SELECTOR, "#scatter line.ci-bar")) == len(points)
    assert len(browser.find_elements(By.CSS_SELECTOR, "#board tbody tr td .ci")) >= len(board.ranked())
    ranges = [r for r in board.ranked() if r.rank_low != r.rank_high]
    shown = [c.text for c in browser.find_elements(By.CSS_SELECTOR, "#board tbody td.tie")]
    assert shown == [r.rank_text for r in ranges if r.tie]
    with_history = [r for r in board.rows if len(r.trend) > 1]
    assert with_history and len(browser.find_elements(By.CSS_SELECTOR, "#trend polyline.trend")) == len(with_history)
    png = Path(board.files["html"]).with_suffix(".png")
    browser.save_screenshot(str(png))
    assert png.stat().st_size > 10_000
