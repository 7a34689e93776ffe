"""Submissions for real: `gauntlet submit` (the command in this process), the submit flow (the UI's form) and
`gauntlet board status`, on the session's sqlite MLflow (the store) and its Prefect test API, and the next night of the
real leaderboard flow on tiny random-init Llamas (a small board: one fixed candidate, bf16 only, 48 eval items).

Alice submits a local folder (pinned by its content sha256) and it is ranked by the next night; Mallory submits a
pinned hub model that the board's sources.allow does not list, refused before anything is fetched; Bob's local folder
changes after he submitted it, so the night fails it and tells him through the board's webhook.
"""

from __future__ import annotations

import json
import os
import shutil
from datetime import timedelta

import pytest
import yaml

from gauntlet.demo import data as demo_data
from tests.helpers import recording_webhook

BOARD = "test-submissions"
HUB = "hf://some-org/some-model@0123abc4567def0123abc4567def0123abc4567"
HOOK_ENV = "GAUNTLET_TEST_SUBMISSIONS_HOOK"


@pytest.fixture(scope="module")
def hook():
    """A webhook for the whole module, recording each request's (path, body)."""
    with recording_webhook() as (port, received):
        os.environ[HOOK_ENV] = f"http://127.0.0.1:{port}/hook"
        yield received
    os.environ.pop(HOOK_ENV, None)


@pytest.fixture(scope="module")
def world(prefect_api, hook):
    from gauntlet.demo.model import build_demo_model
    from tests.helpers import project_workdir

    root = project_workdir("submissions")    # the eval file and the publish folder lie inside the project
    eval_file = root / "eval.jsonl"
    demo_data.write_jsonl(eval_file, demo_data.build(48, 7)["eval"])
    models = {name: build_demo_model("tiny-llama", out=root / "models" / name, seed=seed)
              for name, seed in (("fixed", 2), ("alice-model", 5), ("bob-model", 3))}
    config = {"name": BOARD, "candidates": [{"source": str(models["fixed"]), "name": "fixed"}], "variants": ["bf16"],
              "eval_file": str(eval_file),
              "eval": {"tasks": ["demo_facts"], "batch_size": 16, "speed_probe": {"prompts": 2, "max_new_tokens": 8}},
              "publish": {"dir": str(root / "site")}, "concurrency": {"gpu_slots": 1},
              "sources": {"allow": [str(root / "models" / "*"), "hf://our-org/*"]},
              "notify": {"webhooks": [{"url_env": HOOK_ENV, "events": ["run_failed"]}]}}
    path = root / "leaderboard.yaml"
    path.write_text(yaml.safe_dump(config))
    yield {"root": root, "path": path, "models": models, "hook": hook}
    shutil.rmtree(root, ignore_errors=True)


def store():
    from gauntlet.tracking import client, tracking_uri

    return client(tracking_uri())


def by_name() -> dict:
    from gauntlet.leaderboard.submissions import status

    return {s.name: s for s in status(BOARD, store())}


@pytest.fixture(scope="module")
def submitted(world):
    """Alice's folder through `gauntlet submit`, Mallory's hub model through the submit flow, Bob's folder through
    the library; then Bob's folder changes."""
    from gauntlet.cli import main
    from gauntlet.config.load import load_leaderboard_spec
    from gauntlet.flows.submit import submit as submit_flow
    from gauntlet.leaderboard.submissions import submit

    os.environ["GAUNTLET_USER"] = "alice"
    try:
        code = main(["submit", str(world["models"]["alice-model"]), "--board", str(world["path"])])
    finally:
        os.environ.pop("GAUNTLET_USER")
    hub = submit_flow(source=HUB, config=str(world["path"]), submitter="mallory", return_state=True)
    bob = submit(load_leaderboard_spec(world["path"]), str(world["models"]["bob-model"]), by="bob")
    (world["models"]["bob-model"] / "notes.txt").write_text("changed after it was submitted\n")
    return {"cli": code, "hub": hub, "bob": bob}


@pytest.fixture(scope="module")
def night(world, submitted):
    from gauntlet.flows.leaderboard import leaderboard

    state = leaderboard(config=str(world["path"]), return_state=True)
    assert state.is_completed(), state.message
    return state.result(), str(state.state_details.flow_run_id)


def test_a_hub_source_outside_sources_allow_is_refused_before_it_queues(world, submitted) -> None:
    from gauntlet.audit import read
    from gauntlet.leaderboard.submissions import queued
    from gauntlet.state import models_cache

    state = submitted["hub"]
    assert state.is_failed()   # the form's run fails, saying why and the fix
    assert "sources.allow" in state.message and "some-org/some-model" in state.message
    assert "ask the board's owner to add a pattern to sources.allow" in state.message
    refused = by_name()["some-org/some-model@0123abc4567d"]
    assert refused.state == "refused" and refused.submitter == "mallory"
    assert refused.reason.startswith(f"sources.allow: model source '{HUB}' is not in sources.allow")
    assert "loads" not in refused.reason and refused.gpu_class is None   # nothing was fetched to check it
    assert not list((models_cache() / "hf").glob("*some-org*"))
    assert refused.name not in {s.name for s in queued(BOARD, store())}
    entries = [e for e in read(client=store(), action="submit") if e["details"]["board"] == BOARD]
    assert {(e["details"]["state"], e["by"]) for e in entries} == {("queued", "alice"), ("refused", "mallory"),
                                                                   ("queued", "bob")}


def test_a_local_folder_is_queued_pinned_by_its_content_hash(world, submitted, capsys) -> None:
    from gauntlet.cli import main
    from gauntlet.hashing import sha256_dir

    assert submitted["cli"] == 0
    alice = by_name()["alice-model"]
    assert alice.state == "queued" and alice.submitter == "alice" and alice.gpu_class == "gpu-24g"
    assert alice.source == str(world["models"]["alice-model"].resolve())
    assert alice.sha == sha256_dir(world["models"]["alice-model"]) and alice.revision is None
    assert alice.deadline - alice.submitted_at == timedelta(hours=24)
    assert main(["board", "status", str(world["path"])]) == 0
    out = capsys.readouterr().out
    assert f"board {BOARD}" in out and "2 queued for the next night" in out
    line = next(x for x in out.splitlines() if "| alice-model |" in x)
    assert "| 1 | alice-model | queued | alice |" in line and f"{alice.submitted_at:%Y-%m-%d %H:%M}" in line
    assert "23 h" in line and " left |" in line


def test_the_next_night_ranks_the_queued_submission_beside_the_config_candidate(world, night) -> None:
    board, flow_run_id = night
    ranked = {r.candidate: r for r in board.ranked()}
    assert set(ranked) == {"fixed", "alice-model"}
    row = ranked["alice-model"]
    assert row.source == str(world["models"]["alice-model"].resolve()) and row.average is not None
    alice = by_name()["alice-model"]
    assert alice.state == "ranked" and alice.night == flow_run_id and alice.settled_at is not None
    assert alice.reason.startswith(f"rank {row.rank_text} of 2 on {board.night} (bf16, average ")
    assert alice.notified is None   # ranked in time: nothing to tell


def test_a_submission_that_fails_is_told_to_its_submitter(world, night) -> None:
    board, _ = night
    bob = by_name()["bob-model"]
    assert bob.state == "failed" and "changed since it was submitted" in bob.reason and "submit it again" in bob.reason
    assert board.row("bob-model", "bf16") is None   # failed before it was evaluated
    assert bob.notified == "failed"
    (message,) = [json.loads(body) for _, body in world["hook"]]
    text = json.dumps(message)
    assert "bob-model" in message["text"] and "by bob failed on board test-submissions" in text
    assert "changed since it was submitted" in text


def test_board_status_shows_every_submission_with_its_times(world, night, capsys) -> None:
    from gauntlet.cli import main

    assert main(["board", "status", str(world["path"])]) == 0
    out = capsys.readouterr().out
    assert "3 submission(s); 0 queued for the next night, 0 evaluating" in out
    subs = by_name()
    lines = {name: next(x for x in out.splitlines() if f"| {name} |" in x) for name in subs}
    hub = "some-org/some-model@0123abc4567d"
    for name, state, who, promise in (("alice-model", "ranked", "alice", "in time"),
                                      ("bob-model", "failed", "bob", "in time"),
                                      (hub, "refused", "mallory", "refused at submission")):
        assert f"| {name} | {state} | {who} | {subs[name].submitted_at:%Y-%m-%d %H:%M} |" in lines[name]
        assert promise in lines[name]
    assert "ranked 0 h" in lines["alice-model"] and "rank " in lines["alice-model"]
    assert main(["board", "status", str(world["path"]), "--json"]) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert {r["name"]: r["state"] for r in rows} == {"alice-model": "ranked", "bob-model": "failed",
                                                     "some-org/some-model@0123abc4567d": "refused"}
