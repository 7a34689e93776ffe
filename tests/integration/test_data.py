"""gauntlet.data.dvc.pull_data against real DVC repositories built in tmp_path (nothing mocked).

Each test builds a git + DVC repo with a local remote folder and a copy of the demo stage: its
command runs this interpreter on ``gauntlet.demo.data`` (the installed package).
"""

from __future__ import annotations

import contextlib
import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from gauntlet.config.base import dvc_produces
from gauntlet.config.data import DataSpec
from gauntlet.config.load import load_spec
from gauntlet.data.dvc import pull_data
from gauntlet.data.jsonl import DataError
from tests.helpers import REPO

# dvc's use of pygtrie emits hundreds of these per test.
pytestmark = pytest.mark.filterwarnings("ignore:_NoneStep.value:DeprecationWarning")

N_ENTITIES = 6  # demo_data writes 3 train rows and 1 validation / eval row per entity
SPLITS = ("train", "validation", "eval")


# ---------------------------------------------------------------------------------------------
# fixtures and helpers
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "home"
    monkeypatch.setenv("GAUNTLET_HOME", str(home))
    monkeypatch.delenv("DVC_SITE_CACHE_DIR", raising=False)
    return home


@pytest.fixture
def repo(tmp_path, home) -> Path:
    """A git + DVC repo with the demo stage (not yet run) and a local remote at tmp_path/remote."""
    root = tmp_path / "repo"
    root.mkdir()
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    (root / ".dvc").mkdir()
    # The same shape as the project's .dvc/config: a default local remote, relative to .dvc/.
    (root / ".dvc" / "config").write_text("[core]\n    remote = local\n['remote \"local\"']\n"
                                          "    url = ../../remote\n")
    (root / ".dvc" / ".gitignore").write_text("/config.local\n/tmp\n/cache\n")
    (root / ".dvcignore").write_text("")
    (root / "params.yaml").write_text(yaml.safe_dump({"demo_data": {"n_entities": N_ENTITIES, "seed": 3}}))
    cmd = f"{shlex.quote(sys.executable)} -m gauntlet.demo.data --params params.yaml --out data/demo"
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"prepare-demo": {
        "cmd": cmd,
        "params": ["demo_data"],
        "outs": [f"data/demo/{s}.jsonl" for s in SPLITS],
    }}}, sort_keys=False))
    return root


@contextlib.contextmanager
def dvc_repo(root: Path, home: Path):
    """The DVC Python API on ``root``, used the way `dvc` on the command line would be (cwd = root)."""
    from dvc.repo import Repo

    with contextlib.chdir(root), Repo(str(root), config={"core": {"site_cache_dir": str(home / "site")}}) as r:
        yield r


def produce(root: Path, home: Path, push: bool) -> None:
    with dvc_repo(root, home) as r:
        r.reproduce(targets=["prepare-demo"])
        if push:
            r.push()


def forget_local_data(root: Path) -> None:
    """What a fresh clone lacks: the outputs and the DVC cache."""
    shutil.rmtree(root / "data" / "demo", ignore_errors=True)
    shutil.rmtree(root / ".dvc" / "cache", ignore_errors=True)


def spec_for(root: Path, **overrides) -> DataSpec:
    raw = {"train": "data/demo/train.jsonl", "validation": "data/demo/validation.jsonl",
           "eval": "data/demo/eval.jsonl"} | overrides
    return DataSpec.model_validate(raw, context={"root": root})


def lock_md5s(root: Path) -> dict[str, str]:
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    return {o["path"]: o["md5"] for o in lock["stages"]["prepare-demo"]["outs"]}


def remote_objects(tmp_path: Path) -> list[Path]:
    remote = tmp_path / "remote"
    return [p for p in remote.rglob("*") if p.is_file()] if remote.exists() else []


def track(root: Path, home: Path, rel: str, text: str) -> None:
    """Write a file and `dvc add` it (a .dvc-tracked data source)."""
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    with dvc_repo(root, home) as r:
        r.add(str(path))


# ---------------------------------------------------------------------------------------------
# pull, reproduce, push
# ---------------------------------------------------------------------------------------------


def test_pull_restores_files_from_remote(repo, home, tmp_path):
    produce(repo, home, push=True)
    expected = lock_md5s(repo)
    forget_local_data(repo)

    ref = pull_data(spec_for(repo), root=repo)

    for split in SPLITS:
        assert (repo / "data" / "demo" / f"{split}.jsonl").is_file()
    assert ref.file_md5 == expected
    assert ref.repo == str(repo.resolve())
    assert ref.train_path == str(repo / "data/demo/train.jsonl") and Path(ref.train_path).is_absolute()
    assert ref.eval_path == str(repo / "data/demo/eval.jsonl")
    assert ref.rows == {"train": 3 * N_ENTITIES, "validation": N_ENTITIES, "eval": N_ENTITIES}
    assert ref.duplicate_rate == 0.0
    assert len(ref.md5) == 32
    # DVC's per-repo state went under $GAUNTLET_HOME, not /var/tmp/dvc.
    assert any((home / "dvc-site-cache").iterdir())

    # Same data version, same hash; pulling again is a no-op.
    again = pull_data(spec_for(repo), root=repo)
    assert again.md5 == ref.md5


@pytest.mark.parametrize("has_lock", [True, False], ids=["fresh-clone", "never-run"])
def test_empty_remote_reproducible_reproduces_and_pushes(repo, home, tmp_path, has_lock):
    if has_lock:  # produced and recorded in dvc.lock, but never pushed; this clone has no data
        produce(repo, home, push=False)
        expected = lock_md5s(repo)
        forget_local_data(repo)
    assert remote_objects(tmp_path) == []

    ref = pull_data(spec_for(repo, reproducible=True), root=repo)

    assert ref.file_md5 == lock_md5s(repo)
    if has_lock:
        assert ref.file_md5 == expected  # the stage is deterministic: same version reproduced
    assert len(remote_objects(tmp_path)) == 3
    # The next clone can pull what was pushed.
    forget_local_data(repo)
    assert pull_data(spec_for(repo, reproducible=False), root=repo).md5 == ref.md5


def test_cleared_cache_with_intact_files_is_not_an_error(repo, home, tmp_path):
    """The working files match dvc.lock but neither the cache nor the remote holds them: DVC's pull
    only warns (nothing to check out), so the files are used as they are."""
    produce(repo, home, push=False)
    shutil.rmtree(repo / ".dvc" / "cache")

    ref = pull_data(spec_for(repo, reproducible=False), root=repo)

    assert ref.file_md5 == lock_md5s(repo)
    assert remote_objects(tmp_path) == []


def test_empty_remote_not_reproducible_names_remote_and_fix(repo, home):
    produce(repo, home, push=False)
    forget_local_data(repo)

    with pytest.raises(DataError) as err:
        pull_data(spec_for(repo, reproducible=False), root=repo)
    msg = str(err.value)
    assert "'local'" in msg and str(repo.parent / "remote") in msg
    assert "data/demo/train.jsonl" in msg
    assert "dvc push" in msg and "reproducible" in msg


def test_untracked_target_is_an_error(repo, home):
    produce(repo, home, push=True)
    (repo / "data" / "loose.jsonl").write_text('{"instruction": "a", "input": "", "output": "b"}\n')

    with pytest.raises(DataError, match=r"data/loose\.jsonl.*neither an output.*dvc add"):
        pull_data(spec_for(repo, train="data/loose.jsonl"), root=repo)


def test_unknown_remote_is_an_error(repo, home):
    with pytest.raises(DataError, match=r"'nowhere'.*configured: local"):
        pull_data(spec_for(repo, remote="nowhere"), root=repo)


def test_modified_working_file_suggests_checkout(repo, home):
    produce(repo, home, push=True)
    with open(repo / "data" / "demo" / "train.jsonl", "a") as f:
        f.write('{"instruction": "x", "input": "", "output": "y"}\n')

    with pytest.raises(DataError, match=r"dvc checkout"):
        pull_data(spec_for(repo), root=repo)


def test_dvc_added_source_missing_from_remote_cannot_be_reproduced(repo, home):
    produce(repo, home, push=True)
    track(repo, home, "data/extra/train.jsonl", '{"instruction": "a", "input": "", "output": "b"}\n')
    (repo / "data" / "extra" / "train.jsonl").unlink()
    shutil.rmtree(repo / ".dvc" / "cache")

    with pytest.raises(DataError, match=r"lacks the data.*data/extra/train\.jsonl.*dvc push.*data source"):
        pull_data(spec_for(repo, train="data/extra/train.jsonl", reproducible=True), root=repo)


# ---------------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------------


def test_missing_required_field_names_file_and_line(repo, home):
    produce(repo, home, push=True)
    rows = [{"instruction": "q1", "input": "", "output": "a1"},
            {"instruction": "q2", "input": ""},
            {"instruction": "q3", "input": "", "output": "a3"}]
    track(repo, home, "data/bad/train.jsonl", "".join(json.dumps(r) + "\n" for r in rows))

    with pytest.raises(DataError) as err:
        pull_data(spec_for(repo, train="data/bad/train.jsonl"), root=repo)
    msg = str(err.value)
    assert "data/bad/train.jsonl:2:" in msg and "output" in msg and "required_fields" in msg
    assert ":1:" not in msg and ":3:" not in msg


def test_chat_rows_pass_as_they_are_and_broken_turns_name_file_and_line(repo, home):
    produce(repo, home, push=True)
    turn = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    good = [{"messages": turn}, {"conversations": [{"from": "human", "value": "q2"}, {"from": "gpt", "value": "a2"}]}]
    track(repo, home, "data/chat/train.jsonl", "".join(json.dumps(r) + "\n" for r in good))
    ref = pull_data(spec_for(repo, train="data/chat/train.jsonl"), root=repo)  # no data.required_fields needed
    assert ref.rows["train"] == 2

    bad = good + [{"messages": [{"role": "user", "content": "q3"}]}, {"messages": [{"role": "robot", "content": "x"}]}]
    track(repo, home, "data/chat2/train.jsonl", "".join(json.dumps(r) + "\n" for r in bad))
    with pytest.raises(DataError) as err:
        pull_data(spec_for(repo, train="data/chat2/train.jsonl"), root=repo)
    msg = str(err.value)
    assert "data/chat2/train.jsonl:3: no response: no assistant turn" in msg
    assert "data/chat2/train.jsonl:4: turn 0: unknown role 'robot'" in msg and ":1:" not in msg


def test_invalid_json_and_empty_files_are_errors(repo, home):
    produce(repo, home, push=True)
    track(repo, home, "data/bad/empty.jsonl", "")
    track(repo, home, "data/bad/broken.jsonl", '{"instruction": "q", "input": "", "output": "a"}\n{oops\n[1]\n')

    with pytest.raises(DataError, match=r"empty\.jsonl: file is empty"):
        pull_data(spec_for(repo, validation="data/bad/empty.jsonl"), root=repo)
    with pytest.raises(DataError) as err:
        pull_data(spec_for(repo, validation="data/bad/broken.jsonl"), root=repo)
    assert "broken.jsonl:2: invalid JSON" in str(err.value)
    assert "broken.jsonl:3: a JSON list, not an object" in str(err.value)


def test_duplicate_rate_is_reported(repo, home):
    produce(repo, home, push=True)
    row = json.dumps({"instruction": "q", "input": "", "output": "a"}) + "\n"
    other = json.dumps({"instruction": "r", "input": "", "output": "b"}) + "\n"
    track(repo, home, "data/dup/train.jsonl", row * 3 + other)

    ref = pull_data(spec_for(repo, train="data/dup/train.jsonl"), root=repo)
    assert ref.rows["train"] == 4
    assert ref.duplicate_rate == pytest.approx(0.5)


# ---------------------------------------------------------------------------------------------
# the project's own configuration
# ---------------------------------------------------------------------------------------------


def test_demo_config_data_are_dvc_stage_outputs():
    spec = load_spec(REPO / "configs" / "demo.yaml")
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    outs = stages["prepare-demo"]["outs"]
    for path in (spec.data.train, spec.data.validation, spec.data.eval):
        assert path in outs
        assert dvc_produces(REPO / spec.data.repo, path)
    config = (REPO / ".dvc" / "config").read_text()
    assert "remote = local" in config and "../.gauntlet/dvc-remote" in config
