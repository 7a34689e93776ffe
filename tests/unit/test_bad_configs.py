"""The bad-input corpus (tests/bad_inputs/cases.yaml), config cases: `gauntlet validate` exits 2 with each
case's message and a hint, and the corpus is documented. Runtime cases: tests/integration/test_bad_inputs.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from gauntlet.cli import main as gauntlet
from tests.helpers import REPO

CASES = yaml.safe_load((REPO / "tests" / "bad_inputs" / "cases.yaml").read_text())

DEMO = REPO / "configs" / "demo.yaml"

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def demo_raw() -> dict:
    return yaml.safe_load(DEMO.read_text())

CONFIG_MUTATIONS = {
    "unknown_key": lambda r, t: r["train"].__setitem__("learnig_rate", r["train"].pop("learning_rate")),
    "wrong_type": lambda r, t: r["train"].__setitem__("max_steps", "many"),
    "negative_learning_rate": lambda r, t: r["train"].__setitem__("learning_rate", -0.001),
    "lora_rank_zero": lambda r, t: r["train"]["lora"].__setitem__("r", 0),
    "model_path_missing": lambda r, t: r["model"].__setitem__("source", str(t / "no-such-model")),
    "eval_task_missing": lambda r, t: r["eval"].__setitem__("tasks", ["no_such_task"]),
    "dvc_target_missing": lambda r, t: r["data"].__setitem__("train", "data/demo/nothing.jsonl"),
    "registry_uri_malformed": lambda r, t: r["model"].__setitem__("source", "models:/gauntlet-demo"),
    "data_outside_project": lambda r, t: r["data"].__setitem__("train", "../../../etc/passwd"),
    "data_symlink_outside": lambda r, t: r["data"].update(repo=str(symlinked_repo(t)), train="train.jsonl"),
    "data_repo_not_dvc": lambda r, t: r["data"].update(repo="/etc", train="passwd"),
    "registry_name_sql": lambda r, t: r["registry"].__setitem__("model_name", "x' OR name LIKE '%"),
    "registry_name_markup": lambda r, t: r["registry"].__setitem__("model_name", "<script>x</script>"),
    "registry_uri_bad_name": lambda r, t: r["model"].__setitem__("source", "models:/x'y@champion"),
    "hub_id_traversal": lambda r, t: r["model"].__setitem__("source", "hf://../../x@main"),
    "object_store_traversal": lambda r, t: r["model"].__setitem__("source", "s3://bucket/../../etc"),
    "perplexity_rule_unmeasured": lambda r, t: r["eval"].pop("perplexity"),
    "safety_rule_unmeasured": lambda r, t: r["gate"].__setitem__("max_harmful_rate", 0.05),
    "trust_remote_code": lambda r, t: r["model"].__setitem__("trust_remote_code", True),
    "num_machines_over_one": lambda r, t: r["train"].setdefault("accelerate", {}).__setitem__("num_machines", 2),
    "source_not_allowed": lambda r, t: r.__setitem__("sources", {"allow": ["hf://my-org/*"]}),
    "data_absolute_outside": lambda r, t: r["data"].__setitem__("validation", "/etc/hostname"),
    "set_value_malformed": lambda r, t: None,   # the case's `set:` overrides are the bad input
    "set_value_unreadable": lambda r, t: None,
    "quantize_method_a_list": lambda r, t: r["quantize"]["variants"][0].__setitem__("method", ["gptq"]),
    "path_too_long": lambda r, t: r["data"].__setitem__("train", "x" * 300),
    "number_not_finite": lambda r, t: r["train"].__setitem__("learning_rate", float("nan")),
    "tracking_store_outside": lambda r, t: r["tracking"].__setitem__("tracking_uri", "sqlite:////tmp/x.db"),
    "tracking_store_file_url": lambda r, t: r["tracking"].__setitem__("tracking_uri", "file:///etc/mlflow"),
    "tracking_store_scheme": lambda r, t: r["tracking"].__setitem__("tracking_uri", "s3://bucket/mlruns"),
    "gate_metric_ambiguous": lambda r, t: (r["eval"]["tasks"].append("arith_chat"),
                                           r["gate"].__setitem__("metric", "exact_match")),
    "preference_setting_not_applicable": lambda r, t: r["train"].update(objective="ipo",
                                                                        preference={"loss_type": "sigmoid"}),
}


def symlinked_repo(tmp_path: Path) -> Path:
    """A DVC repository whose train.jsonl is a symlink to a file outside it."""
    repo = tmp_path / "repo"
    (repo / ".dvc").mkdir(parents=True)
    (repo / "train.jsonl").symlink_to("/etc/passwd")
    return repo


def write_bad_config(name: str, tmp_path: Path) -> Path:
    path = tmp_path / f"{name}.yaml"
    if name == "malformed_yaml":
        path.write_text("name: demo\ntrain:\n  max_steps: [10, 20\n")
    elif name == "config_not_utf8":
        path.write_bytes(DEMO.read_bytes().replace(b"name: demo", b"name: d\xe9mo"))
    elif name == "yaml_value_unreadable":
        path.write_bytes(DEMO.read_bytes().replace(b"name: demo", b"name: 2020-99-99"))
    else:
        raw = demo_raw()
        CONFIG_MUTATIONS[name](raw, tmp_path)
        path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize("name", [n for n, c in CASES.items() if c["kind"] == "config"])
def test_config_case(name: str, tmp_path: Path, capsys) -> None:
    sets = [f"--set={s}" for s in CASES[name].get("set", [])]
    code = gauntlet(["validate", str(write_bad_config(name, tmp_path)), *sets])
    err = capsys.readouterr().err
    assert code == 2
    assert CASES[name]["expect"] in err, err
    assert "hint:" in err or "line " in err or "(file)" in err  # every message says where and what to do


def test_corpus_is_documented() -> None:
    """docs/reliability.md lists every case with its message, so the table and the tests agree."""
    doc = (REPO / "docs" / "reliability.md").read_text()
    for name, case in CASES.items():
        assert f"`{name}`" in doc and case["expect"] in doc, name
