"""Config validation: every problem with its YAML path and a hint; exit 2; nothing started."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from gauntlet.config.load import load_spec
from gauntlet.config.problems import SpecError
from tests.helpers import REPO

DEMO = REPO / "configs" / "demo.yaml"


def write_config(tmp_path: Path, mutate) -> Path:
    from tests.helpers import write_demo_config

    return write_demo_config(tmp_path, mutate, "bad.yaml")


def three_mistakes(raw: dict) -> None:
    raw["train"]["learnig_rate"] = raw["train"].pop("learning_rate")   # a typo'd key
    raw["train"]["max_steps"] = "many"                                 # a wrong type
    raw["data"]["train"] = "data/demo/missing.jsonl"                   # a dataset path nothing produces


def test_demo_config_is_valid() -> None:
    spec = load_spec(DEMO)
    assert spec.model.source == "demo://tiny-llama"
    assert spec.train.method == "qlora"


def test_all_problems_reported_with_paths_and_hints(tmp_path: Path) -> None:
    with pytest.raises(SpecError) as err:
        load_spec(write_config(tmp_path, three_mistakes))
    by_path = {p.path: p for p in err.value.problems}
    assert set(by_path) == {"train.learnig_rate", "train.max_steps", "data.train"}, by_path
    assert "did you mean 'learning_rate'" in by_path["train.learnig_rate"].hint
    assert "integer" in by_path["train.max_steps"].message
    assert "missing.jsonl" in by_path["data.train"].message
    assert "dvc" in by_path["data.train"].message.lower()


def test_overrides_are_typed_and_validated(tmp_path: Path) -> None:
    spec = load_spec(DEMO, ["train.learning_rate=1e-3", "train.lora.r=4"])
    assert spec.train.learning_rate == pytest.approx(1e-3) and spec.train.lora.r == 4
    with pytest.raises(SpecError) as err:
        load_spec(DEMO, ["train.learning_rate=-1", "train.lora.r=0"])
    assert {p.path for p in err.value.problems} == {"train.learning_rate", "train.lora.r"}


def test_max_grad_norm_is_positive_and_finite_or_null() -> None:
    assert load_spec(DEMO).train.max_grad_norm == 1.0
    assert load_spec(DEMO, ["train.max_grad_norm=null"]).train.max_grad_norm is None
    assert load_spec(DEMO, ["train.max_grad_norm=0.5"]).train.max_grad_norm == 0.5
    for bad, says in (("0", "greater than 0"), ("-1", "greater than 0"), (".inf", "finite"), (".nan", "finite")):
        with pytest.raises(SpecError) as err:
            load_spec(DEMO, [f"train.max_grad_norm={bad}"])
        (problem,) = err.value.problems
        assert problem.path == "train.max_grad_norm" and says in problem.message, (bad, problem)


def test_malformed_yaml_names_the_line(tmp_path: Path) -> None:
    bad = tmp_path / "broken.yaml"
    bad.write_text("name: x\ntrain:\n  max_steps: [1, 2\n")
    with pytest.raises(SpecError) as err:
        load_spec(bad)
    assert err.value.problems[0].path.startswith("line ")


def test_unknown_eval_task_and_missing_model_dir(tmp_path: Path) -> None:
    def mutate(raw: dict) -> None:
        raw["eval"]["tasks"] = ["no_such_task"]
        raw["model"]["source"] = str(tmp_path / "no-model")

    with pytest.raises(SpecError) as err:
        load_spec(write_config(tmp_path, mutate))
    paths = {p.path for p in err.value.problems}
    assert paths == {"eval.tasks", "model.source"}


def test_validate_cli_exits_2_and_starts_nothing(tmp_path: Path) -> None:
    """`gauntlet validate` prints all three problems, exits 2, and creates no MLflow or Prefect state."""
    home = tmp_path / "home"
    config = write_config(tmp_path, three_mistakes)
    # the child's own state: none of the test session's MLflow or Prefect settings, so that a store it
    # started would appear under `home`
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env["GAUNTLET_HOME"] = str(home)
    for command in ("validate", "run"):
        proc = subprocess.run([sys.executable, "-m", "gauntlet.cli", command, str(config)], env=env,
                              capture_output=True, text=True, cwd=REPO, timeout=120)
        assert proc.returncode == 2, proc.stderr
        for path in ("train.learnig_rate", "train.max_steps", "data.train"):
            assert path in proc.stderr
    # no MLflow store, no Prefect database: nothing was started for an invalid config
    assert not home.exists()
    assert not (REPO / "mlruns").exists()
    ok = subprocess.run([sys.executable, "-m", "gauntlet.cli", "validate", str(DEMO)], env=env,
                        capture_output=True, text=True, cwd=REPO, timeout=120)
    assert ok.returncode == 0 and "valid" in ok.stdout


def test_unreachable_servers_fail_fast_naming_the_variable(tmp_path: Path) -> None:
    """A configured MLflow/Prefect server that does not answer stops `gauntlet run` at once (exit 1),
    before any flow run, naming the variable to fix."""
    import socket

    with socket.socket() as s:  # a free port on 127.0.0.1 that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    home = tmp_path / "home"
    for var in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL"):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
        env.update({"GAUNTLET_HOME": str(home), var: f"http://127.0.0.1:{port}/api"})
        proc = subprocess.run([sys.executable, "-m", "gauntlet.cli", "run", str(DEMO)], env=env, capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 1, proc.stderr
        assert var in proc.stderr and "does not answer" in proc.stderr
    assert not (home / "mlflow.db").exists() and not (home / "stages").exists()
