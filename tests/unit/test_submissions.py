"""Submissions' checks and their messages, each refusal naming why and the fix; the 24-hour promise as
`gauntlet board status` says it; who is told what; a board found by its name. No servers: config.json files only
(tests/integration/test_submissions.py submits, ranks and reports for real)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml

from gauntlet.config.leaderboard import LeaderboardSpec
from gauntlet.config.problems import SpecError
from gauntlet.leaderboard.board import BoardRow, Leaderboard
from gauntlet.leaderboard.submission_checks import (
    check,
    default_name,
    form_problem,
    gpu_problem,
    load_problem,
    name_problem,
    pin_of,
)
from gauntlet.leaderboard.submissions import PROMISE, Submission, board_config, notices, promise, verdict
from gauntlet.notify import render
from tests.helpers import REPO

COMMIT = "0123abc4567def0123abc4567def0123abc4567"
SMALL_LLAMA = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64,
               "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 100}
NOW = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)


def board(allow: list[str] | None = None) -> LeaderboardSpec:
    """A board with one candidate, demo://tiny-llama (named base), and ``sources.allow`` as given."""
    return LeaderboardSpec.model_validate({"name": "team", "candidates": [{"source": "demo://tiny-llama",
                                                                           "name": "base"}],
                                           "eval": {"tasks": ["demo_facts"]}, "sources": {"allow": allow or []}},
                                          context={"root": REPO})


def submission(**changes) -> Submission:
    at = changes.pop("submitted_at", NOW - timedelta(hours=3))
    return Submission(**{"id": "r1", "board": "team", "name": "alice-model", "source": "/models/alice",
                         "submitter": "alice", "submitted_at": at, "deadline": at + PROMISE, "state": "queued",
                         **changes})


def test_a_source_outside_sources_allow_is_refused_naming_the_patterns_and_the_fix() -> None:
    spec = board(["hf://our-org/*", "/models/*", "demo://*"])
    facts, problems = check(spec, f"hf://some-org/model@{COMMIT}", "theirs", set(), "sqlite:///unused.db")
    (problem,) = problems   # pinned and well formed: only the allow check refuses it, and nothing was fetched
    assert problem.path == "sources.allow" and facts == {"revision": COMMIT}
    assert problem.message == (f"model source 'hf://some-org/model@{COMMIT}' is not in sources.allow "
                               "['hf://our-org/*', '/models/*', 'demo://*'] of board team")
    assert problem.hint == ("submit a source one of those patterns matches, or ask the board's owner to add a "
                            "pattern to sources.allow in its config")


def test_every_cheap_refusal_is_reported_at_once() -> None:
    spec = board(["hf://our-org/*", "demo://*"])
    _, problems = check(spec, "hf://some-org/model@main", "base", set(), "sqlite:///unused.db")
    assert [p.path for p in problems] == ["sources.allow", "revision"]
    _, problems = check(board(), "hf://our-org/model", "base", {"base"}, "sqlite:///unused.db")
    assert [p.path for p in problems] == ["name", "revision"]
    assert problems[0].message.startswith("'base' is already on this board") and problems[0].hint == \
        "give another --name"


@pytest.mark.parametrize("source, message, hint", [
    ("hf://org/model", "hf://org/model has no revision: the hub's main branch moves",
     "pin a commit: hf://org/model@<commit sha>"),
    ("hf://org/model@main", "revision 'main' of hf://org/model is a branch or a tag, which can move",
     "pin a commit: hf://org/model@<commit sha>"),
    ("hf://org/model@v1.0", "revision 'v1.0' of hf://org/model is a branch or a tag, which can move",
     "pin a commit: hf://org/model@<commit sha>"),
    ("models:/support-bot@champion", "models:/support-bot@champion names an alias, which moves",
     "submit a version: models:/support-bot/VERSION"),
    ("s3://bucket/models/m", "s3:// sources are not taken as submissions", "submit a local folder saved with"),
    ("modelscope://org/model@v1", "modelscope:// sources are not taken as submissions", "or ask the board's owner"),
])
def test_an_unpinned_source_is_refused_with_the_fix(source: str, message: str, hint: str) -> None:
    revision, problem = pin_of(source)
    assert revision is None and problem is not None
    assert problem.message.startswith(message) and hint in problem.hint


def test_what_pins_a_pinned_source() -> None:
    assert pin_of(f"hf://org/model@{COMMIT}") == (COMMIT, None)
    assert pin_of(f"hf://org/model@{COMMIT[:7]}") == (COMMIT[:7], None)
    assert pin_of("models:/support-bot/7") == ("7", None)
    assert pin_of("demo://tiny-llama") == ("demo", None)
    assert pin_of("/models/alice") == (None, None)   # its content sha256, computed when it is submitted


def test_a_source_or_name_no_candidate_could_have() -> None:
    assert form_problem("").message == "no source given"
    problem = form_problem("ftp://host/model")
    assert problem.path == "source" and "unsupported scheme" in problem.message and "hf://org/name@<commit sha>" in \
        problem.hint
    problem = name_problem("my model", set())
    assert problem.path == "name" and "is not a candidate name" in problem.message and "--name" in problem.hint
    assert default_name(f"hf://org/model@{COMMIT}") == f"org/model@{COMMIT[:12]}"
    assert default_name("/models/alice-v2") == "alice-v2"


def write_config(folder: Path, config: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_a_model_whose_config_or_tokenizer_does_not_load_is_refused(tmp_path: Path) -> None:
    _, problem = load_problem(str(tmp_path / "gone"), "sqlite:///unused.db")
    assert problem.path == "source" and problem.message.endswith("gone is not a folder")
    (tmp_path / "empty").mkdir()
    _, problem = load_problem(str(tmp_path / "empty"), "sqlite:///unused.db")
    assert problem.path == "loads" and problem.message.startswith("no config.json in ")
    _, problem = load_problem(str(write_config(tmp_path / "odd", {"model_type": "nosuchmodel"})), "sqlite:///unused.db")
    assert problem.message.startswith("its config.json does not load with transformers (ValueError: ")
    assert "nosuchmodel" in problem.message and "whose architecture transformers ships" in problem.hint
    _, problem = load_problem(str(write_config(tmp_path / "no-tokenizer", SMALL_LLAMA)), "sqlite:///unused.db")
    assert problem.message.startswith("its tokenizer does not load with transformers (")
    assert "tokenizer included" in problem.hint


def test_the_gpu_class_comes_from_config_json_and_a_model_no_class_holds_is_refused(tmp_path: Path) -> None:
    assert gpu_problem(write_config(tmp_path / "small", SMALL_LLAMA), "small") == ("gpu-24g", None)
    llama70b = json.loads((REPO / "tests/fixtures/model-configs/llama-2-70b/config.json").read_text())
    assert gpu_problem(write_config(tmp_path / "70b", llama70b), "70b") == ("gpu-8x80g", None)
    huge = write_config(tmp_path / "huge", {**llama70b, "num_hidden_layers": 4 * llama70b["num_hidden_layers"]})
    gpu, problem = gpu_problem(huge, "huge")
    assert gpu is None and problem.path == "gpu_class"
    assert problem.message == ("evaluating 274.3B parameters needs about 664 GiB of GPU memory, more than the largest "
                               "class (gpu-8x80g) holds.")
    assert problem.hint == "quantize it first, or add a class"


def test_the_promise_as_board_status_says_it() -> None:
    assert promise(submission(), NOW) == "21 h 00 m left"
    assert promise(submission(submitted_at=NOW - timedelta(hours=26, minutes=5)), NOW) == "late by 2 h 05 m"
    assert promise(submission(submitted_at=NOW - timedelta(days=5)), NOW) == "late by 4 d 0 h"
    assert promise(submission(state="ranked", settled_at=NOW), NOW) == "ranked 3 h 00 m after submission, in time"
    late = submission(state="failed", submitted_at=NOW - timedelta(hours=30), settled_at=NOW)
    assert promise(late, NOW) == "failed 30 h 00 m after submission, late by 6 h 00 m"
    assert promise(submission(state="refused"), NOW) == "refused at submission"


def test_a_failed_or_late_submission_is_told_once_naming_its_submitter_and_reason() -> None:
    failed = submission(state="failed", reason="bf16 failed: OSError: no weights", settled_at=NOW)
    ((sub, told, notice),) = notices([failed, submission(), submission(state="refused", reason="x"),
                                      submission(state="ranked", settled_at=NOW)], NOW)
    assert sub is failed and told == "failed" and notice.event == "run_failed"
    assert notice.verdict == "submission alice-model by alice failed on board team: bf16 failed: OSError: no weights"
    text = render(notice, "slack")["text"]
    assert "alice-model" in text and "by alice failed" in text
    assert notices([failed.model_copy(update={"notified": "failed"})], NOW) == []
    pending = submission(submitted_at=NOW - timedelta(hours=25))
    ((_, told, notice),) = notices([pending], NOW)
    assert told == "late"
    assert notice.verdict == "submission alice-model by alice missed its 24-hour promise on board team"
    assert "promise: late by 1 h 00 m" in notice.reasons


def row(name: str, status: str, **more) -> BoardRow:
    return BoardRow(candidate=name, variant="bf16", source=f"/models/{name}", status=status, **more)


def test_the_verdict_of_a_night_from_the_submissions_rows() -> None:
    night = Leaderboard(name="team", title="t", night="2025-03-01T02:00Z", rank_key="average", higher_is_better=True,
                        tasks=["demo_facts"], task_metrics={}, suites={}, baselines={},
                        rows=[row("base", "ranked", rank=1, average=40.0), row("alice-model", "ranked", rank=2,
                                                                                average=12.5),
                              row("bob-model", "failed", reason="OSError: no weights")])
    assert verdict(night, "alice-model") == ("ranked", "rank 2 of 2 on 2025-03-01T02:00Z (bf16, average 12.5)")
    assert verdict(night, "bob-model") == ("failed", "bf16 failed: OSError: no weights")
    assert verdict(night, "carol") == ("failed", "no row on the board of 2025-03-01T02:00Z")


def test_a_board_is_found_by_its_config_path_or_its_name(tmp_path: Path, monkeypatch) -> None:
    project = tmp_path / "project"
    (project / "configs").mkdir(parents=True)
    (project / "dvc.yaml").write_text("stages: {}\n")
    raw = {"name": "team", "candidates": [{"source": "demo://tiny-llama"}], "eval": {"tasks": ["demo_facts"]}}
    (project / "configs" / "team-board.yaml").write_text(yaml.safe_dump(raw))
    (project / "configs" / "run.yaml").write_text(yaml.safe_dump({"name": "team", "model": {"source": "x"}}))
    monkeypatch.setenv("GAUNTLET_PROJECT_ROOT", str(project))
    wanted = (project / "configs" / "team-board.yaml").resolve()
    assert board_config("team", tmp_path) == wanted
    assert board_config("configs/team-board.yaml", tmp_path) == wanted   # from the project root
    assert board_config(str(wanted), tmp_path) == wanted
    with pytest.raises(SpecError) as e:
        board_config("nightly", tmp_path)
    assert "no leaderboard config at 'nightly', and no board(s) of that name in configs/" in str(e.value)
    assert "give a config's path, or a board's name: team (team-board.yaml)" in str(e.value)


def test_a_board_whose_own_candidates_are_outside_sources_allow_is_refused() -> None:
    with pytest.raises(Exception) as e:
        board(["hf://our-org/*"])
    assert "model source 'demo://tiny-llama' is not in sources.allow ['hf://our-org/*']" in str(e.value)
    assert "Fix: add a pattern to sources.allow, or drop the candidate" in str(e.value)
