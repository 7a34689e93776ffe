"""Preference objectives in the config: train.objective and train.preference, each setting validated and refused where
it does not apply; preference rows against SFT objectives (and the reverse) refused at validation, naming the fields;
the row checks of the data stage (chosen == rejected); TRL's settings built from the config. No model loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from gauntlet.cli import main as gauntlet
from gauntlet.config.train import LOSS_TYPES, PreferenceSpec, TrainSpec
from gauntlet.data import preference
from gauntlet.data.checks import pair_problems
from gauntlet.data.jsonl import DataError, validate_jsonl
from tests.helpers import REPO

DPO_DEMO = REPO / "configs" / "demo-dpo.yaml"
PAIR = {"prompt": "Which colour?", "chosen": "red", "rejected": "blue"}


def errors(**train) -> str:
    with pytest.raises(ValidationError) as e:
        TrainSpec(**train)
    return str(e.value)


def test_existing_configs_stay_sft_with_no_preference_settings() -> None:
    spec = TrainSpec()
    assert spec.objective == "sft" and spec.preference is None and not spec.is_preference
    demo = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())["train"]
    assert TrainSpec(**demo).objective == "sft"


@pytest.mark.parametrize("objective", ["dpo", "ipo", "simpo", "orpo", "kto"])
def test_every_preference_objective_validates_with_its_defaults(objective: str) -> None:
    spec = TrainSpec(objective=objective)
    assert spec.is_preference
    assert spec.preference_settings().beta == (2.0 if objective == "simpo" else 0.1)
    assert spec.preference_settings().reference == "base"


def test_a_setting_that_does_not_apply_to_the_objective_is_refused_naming_it() -> None:
    assert "train.preference.loss_type does not apply to objective ipo" in errors(
        objective="ipo", preference={"loss_type": "hinge"})
    assert "train.preference.simpo_gamma does not apply to objective dpo (it applies to simpo)" in errors(
        objective="dpo", preference={"simpo_gamma": 0.5})
    assert "train.preference.reference does not apply to objective orpo" in errors(
        objective="orpo", preference={"reference": "models:/bot@champion"})
    assert "train.preference.desirable_weight does not apply to objective dpo" in errors(
        objective="dpo", preference={"desirable_weight": 1.0})
    assert "train.preference.max_completion_length does not apply to objective kto" in errors(
        objective="kto", preference={"max_completion_length": 32})
    assert "train.preference is set, but train.objective is sft" in errors(preference={"beta": 0.1})
    assert "train.packing apply to objective sft only" in errors(objective="dpo", packing=True)
    assert "train.packing, train.data_format apply to objective sft only" in errors(objective="kto", packing=True,
                                                                                   data_format="chat")


def test_loss_types_are_the_objective_s_own_and_settings_are_bounded() -> None:
    assert "'ipo' is not a dpo loss of TRL. Fix: use one of sigmoid, hinge" in errors(
        objective="dpo", preference={"loss_type": "ipo"})
    assert "is not a kto loss of TRL" in errors(objective="kto", preference={"loss_type": "sigmoid"})
    for loss in LOSS_TYPES["dpo"]:
        TrainSpec(objective="dpo", preference={"loss_type": loss})
    assert "Input should be greater than 0" in errors(objective="dpo", preference={"beta": 0})
    assert "Input should be a finite number" in errors(objective="dpo", preference={"beta": float("nan")})
    assert "Input should be greater than or equal to 0" in errors(objective="simpo", preference={"simpo_gamma": -1})
    assert "Input should be 'sft', 'dpo', 'ipo', 'simpo', 'orpo' or 'kto'" in errors(objective="rlhf")
    assert "unsupported scheme" in errors(objective="dpo", preference={"reference": "ftp://x/y"})
    assert PreferenceSpec(reference="models:/bot@champion").given() == ["reference"]


def test_trl_gets_the_settings_the_config_names() -> None:
    from gauntlet.programs.preference_trainer import objective_settings

    assert objective_settings(TrainSpec(objective="dpo", max_seq_len=64)) == {
        "beta": 0.1, "max_length": 64, "loss_type": ["sigmoid"]}
    assert objective_settings(TrainSpec(objective="ipo", preference={"beta": 0.5}))["loss_type"] == ["ipo"]
    simpo = objective_settings(TrainSpec(objective="simpo", preference={"simpo_gamma": 1.0,
                                                                        "max_completion_length": 16}))
    assert simpo == {"beta": 2.0, "max_length": 256, "loss_type": "simpo", "cpo_alpha": 0.0, "simpo_gamma": 1.0,
                     "max_completion_length": 16}
    kto = objective_settings(TrainSpec(objective="kto", preference={"loss_type": "apo_zero_unpaired",
                                                                    "desirable_weight": 2.0}))
    assert kto == {"beta": 0.1, "max_length": 256, "loss_type": "apo_zero_unpaired", "desirable_weight": 2.0}


def test_the_training_program_follows_the_objective() -> None:
    from gauntlet.training import launch_command, program_for

    assert program_for(TrainSpec()) == "gauntlet.programs.trainer"
    assert program_for(TrainSpec(objective="kto")) == "gauntlet.programs.preference_trainer"
    cmd = launch_command(TrainSpec(objective="dpo").accelerate, Path("a.json"), True, program_for(
        TrainSpec(objective="dpo")))
    assert cmd[-4:] == ["-m", "gauntlet.programs.preference_trainer", "--args", "a.json"]
    assert "accelerate.commands.launch" in cmd


# ---------------------------------------------------------------------------------------------
# rows
# ---------------------------------------------------------------------------------------------


def test_pair_rows_text_and_chat_and_kto_rows_are_read_in_trl_s_formats() -> None:
    chat = {"prompt": [{"role": "user", "content": "Which colour?"}],
            "chosen": [{"role": "assistant", "content": "red"}], "rejected": [{"role": "assistant", "content": "b"}]}
    kto = {"prompt": "Which colour?", "completion": "red", "label": True}
    assert preference.detect_layout(PAIR) == preference.detect_layout(chat) == "pairs"
    assert preference.detect_layout(kto) == "kto"
    assert preference.detect_layout({"instruction": "x", "output": "y"}) == "alpaca"
    assert preference.row_problem(PAIR, "pairs") is None and preference.row_problem(chat, "pairs") is None
    assert preference.row_problem(kto, "kto") is None
    assert preference.question(chat) == "Which colour?"
    assert preference.question({"prompt": "### Instruction:\nWho?\n\n### Response:\n"}) == "Who? "
    assert "'label' must be true" in preference.row_problem({**kto, "label": "yes"}, "kto")
    assert "mix plain text and chat turns" in preference.row_problem({**chat, "prompt": "Which?"}, "pairs")
    assert preference.row_problem({"prompt": "p", "chosen": "a"}, "pairs") == "no 'rejected'"


def test_chosen_equal_to_rejected_is_refused_by_the_data_checks(tmp_path: Path) -> None:
    f = tmp_path / "train.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in [PAIR, {**PAIR, "rejected": "red"}]) + "\n")
    with pytest.raises(DataError, match=r"train.jsonl:2: chosen == rejected: the pair prefers nothing"):
        validate_jsonl(f, None)
    rate, problems = pair_problems([PAIR, PAIR, {**PAIR, "chosen": "Blue!"}])
    assert rate == pytest.approx(1 / 3)
    assert problems == ["1 pair(s) with chosen == rejected (rows [3]): fix or drop them"]   # once normalized


def dvc_repo(tmp_path: Path, rows: list[dict]) -> Path:
    repo = tmp_path / "repo"
    (repo / ".dvc").mkdir(parents=True)
    for split in ("train", "validation"):
        (repo / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return repo


def validate(tmp_path: Path, train: dict, rows: list[dict], capsys) -> tuple[int, str]:
    raw = yaml.safe_load(DPO_DEMO.read_text())
    raw["train"] = train
    raw["data"].update(repo=str(dvc_repo(tmp_path, rows)), train="train.jsonl", validation="validation.jsonl")
    raw["data"].pop("eval")
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(raw))
    code = gauntlet(["validate", str(config)])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_a_preference_objective_with_sft_rows_is_refused_at_validation_naming_the_fields(tmp_path, capsys) -> None:
    code, out = validate(tmp_path, {"objective": "dpo"}, [{"instruction": "q", "input": "", "output": "a"}], capsys)
    assert code == 2, out
    assert ("data.train: data.train has alpaca rows {instruction, input, output}, but train.objective dpo trains "
            "on rows {prompt, chosen, rejected}") in out
    assert "hint: point data.train/data.validation at dpo data, or set train.objective to sft" in out


def test_sft_with_preference_rows_is_refused_at_validation_naming_the_fields(tmp_path, capsys) -> None:
    code, out = validate(tmp_path, {"objective": "sft"}, [PAIR], capsys)
    assert code == 2, out
    assert "data.train has pairs rows {prompt, chosen, rejected}, but train.objective sft trains on rows" in out
    code, out = validate(tmp_path / "kto", {"objective": "dpo"}, [{"prompt": "p", "completion": "c",
                                                                  "label": False}], capsys)
    assert code == 2 and "kto rows {prompt, completion, label}, but train.objective dpo" in out
    assert "set train.objective to kto" in out


def test_the_dpo_demo_config_validates(capsys) -> None:
    assert gauntlet(["validate", str(DPO_DEMO)]) == 0, capsys.readouterr()


def test_drift_reads_a_pair_s_prompt_and_chosen_completion() -> None:
    from gauntlet.data.drift import lengths

    chat = {"prompt": [{"role": "user", "content": "Which colour?"}],
            "chosen": [{"role": "assistant", "content": "red!"}], "rejected": [{"role": "assistant", "content": "b"}]}
    assert lengths([PAIR, chat]) == {"prompt_chars": [13, 13], "response_chars": [3, 4]}
