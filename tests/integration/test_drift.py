"""Data drift against the champion's training data: a real DVC repo (the demo's data stage, reproduced and
pushed to its local remote), a real MLflow registry whose champion names that data version, the reference
file found by md5 where DVC stored it, and a new data version whose responses are four times longer."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from dvc.repo import Repo as DvcRepo

from gauntlet.config.data import DataChecksSpec, DataSpec
from gauntlet.config.gate import RegistrySpec
from gauntlet.data.drift import NotMeasured, champion_training_file, compare, read_rows
from tests.helpers import make_demo_dvc_repo, register_as_champion

NAME = "gauntlet-drift-test"


def test_response_length_shift_against_the_champion_data_fails_naming_the_shift(tmp_path) -> None:
    from gauntlet.data.dvc import pull_data
    from gauntlet.tracking import client, experiment_id, tracking_uri

    repo = make_demo_dvc_repo(tmp_path / "repo")
    spec = DataSpec(repo=str(repo), train="data/demo/train.jsonl", validation="data/demo/validation.jsonl")
    old = pull_data(spec)                      # reproduced and pushed: DVC holds this version by md5
    c = client(tracking_uri())
    pulled = c.create_run(experiment_id(c, "gauntlet-drift"), run_name="pull_data", tags={"data.md5": old.md5})
    c.log_dict(pulled.info.run_id, old.model_dump(mode="json"), "dataset_ref.json")   # as the pull_data stage does
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    register_as_champion(c, "gauntlet-drift", model, NAME, {"data.md5": old.md5})

    # The new version: same prompts, responses four times longer (a changed labelling guideline, say).
    new_train = tmp_path / "new" / "train.jsonl"
    new_train.parent.mkdir()
    rows = [{**r, "output": " ".join([r["output"]] * 4)} for r in read_rows(Path(old.train_path))]
    new_train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    new = old.model_copy(update={"md5": "f" * 32, "train_path": str(new_train)})

    found = champion_training_file(c, RegistrySpec(model_name=NAME), new, tmp_path / "copies")
    assert not isinstance(found, NotMeasured), found
    reference_path, label = found
    assert read_rows(reference_path) == read_rows(Path(old.train_path)) and "champion v1" in label
    shutil.rmtree(repo / ".dvc" / "cache")     # a fresh host: the DVC remote alone has it, fetched through DVC
    reference_path = champion_training_file(c, RegistrySpec(model_name=NAME), new, tmp_path / "copies")[0]
    assert reference_path.is_relative_to(tmp_path / "copies")
    assert read_rows(reference_path) == read_rows(Path(old.train_path))
    with DvcRepo(str(repo)) as dvc:
        remote = Path(dvc.config["remote"]["local"]["url"])
    remote = remote if remote.is_absolute() else (repo / ".dvc" / remote).resolve()
    shutil.rmtree(remote)                      # the reference gone everywhere: not measured, and a warning
    missing = champion_training_file(c, RegistrySpec(model_name=NAME), new, tmp_path / "copies2")
    assert isinstance(missing, NotMeasured) and missing.warning, missing
    assert "is in neither this host's DVC cache nor the DVC remote" in missing.reason, missing.reason

    report = compare(read_rows(reference_path), rows, DataChecksSpec(max_length_psi=0.25), label)
    assert not report.passed and len(report.problems) == 1, report.problems
    assert report.problems[0].startswith("response_chars shifted against champion v1")
    assert "max_length_psi 0.25" in report.problems[0] and report.psi["response_chars"] > 1
    assert report.psi["prompt_chars"] < 0.01 and report.overlap == 1.0 and report.row_change == 0
    # The same data (or a resample of it) passes, and with no threshold the drift is measured only.
    assert compare(read_rows(reference_path), read_rows(reference_path)[::-1], DataChecksSpec(max_length_psi=0.25),
                   label).passed
    assert compare(read_rows(reference_path), rows, DataChecksSpec(), label).passed
    # The champion's own data version is not compared with itself.
    same = champion_training_file(c, RegistrySpec(model_name=NAME), old, tmp_path / "copies")
    assert isinstance(same, NotMeasured) and "champion's own version" in same.reason and not same.warning
