"""Quantization configs refused before any work: methods and bits, too small calibration sets, unknown
registered variants, variant names. Real quantization runs in tests/integration/test_quantize.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from gauntlet.config.load import load_spec
from gauntlet.config.problems import SpecError
from gauntlet.config.quantize import QuantizeVariant
from gauntlet.demo import data as demo_data

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _config(tmp_path: Path, mutate) -> Path:
    from tests.helpers import write_demo_config

    return write_demo_config(tmp_path, mutate)


@pytest.mark.parametrize("variant, message", [
    ({"method": "awq", "bits": 8}, "awq does not support 8-bit weights; supported: 4-bit"),
    ({"method": "gptq", "bits": 3}, "gptq does not support 3-bit weights; supported: 4-bit, 8-bit"),
    ({"method": "bnb-int8", "bits": 4}, "bnb-int8 does not support 4-bit weights; supported: 8-bit"),
    ({"method": "bnb-nf4", "group_size": 64}, "bnb-nf4 has no group size"),
    ({"method": "gptq", "group_size": 48}, "group_size 48 is not a power of two"),
    ({"method": "hqq"}, "Input should be 'gptq', 'awq', 'bnb-nf4' or 'bnb-int8'"),
])
def test_unsupported_method_and_bits_fail_validation(tmp_path: Path, variant: dict, message: str) -> None:
    def mutate(raw: dict) -> None:
        raw["quantize"]["variants"] = [variant]
        raw["gate"]["register_variants"] = []

    with pytest.raises(SpecError) as err:
        load_spec(_config(tmp_path, mutate))
    (problem,) = err.value.problems
    assert problem.path.startswith("quantize.variants.0") and message in problem.message, problem


def test_too_small_calibration_set_and_unknown_registered_variant_fail_validation(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    (repo / ".dvc").mkdir(parents=True)   # a DVC repository (data.repo outside the project must be one)
    demo_data.write_jsonl(repo / "train.jsonl", demo_data.build(48, 7)["train"][:20])
    demo_data.write_jsonl(repo / "validation.jsonl", demo_data.build(48, 7)["validation"])

    def mutate(raw: dict) -> None:
        raw["data"].update(repo=str(repo), train="train.jsonl", validation="validation.jsonl", eval=None)
        raw["quantize"]["calibration"]["samples"] = 21
        raw["gate"]["register_variants"] = ["gptq-w4g64", "awq-w4g128"]

    with pytest.raises(SpecError) as err:
        load_spec(_config(tmp_path, mutate))
    by_path = {p.path: p for p in err.value.problems}
    assert set(by_path) == {"quantize.calibration.samples", "gate.register_variants"}
    assert "21 calibration samples" in by_path["quantize.calibration.samples"].message
    assert "has 20 rows" in by_path["quantize.calibration.samples"].message
    assert "at most 20" in by_path["quantize.calibration.samples"].hint
    assert "awq-w4g128" in by_path["gate.register_variants"].message
    # 20 rows are enough for 20 samples; a calibration-free variant needs none
    def fixed(raw: dict) -> None:
        mutate(raw)
        raw["quantize"]["calibration"]["samples"] = 20
        raw["gate"]["register_variants"] = ["gptq-w4g64"]

    spec = load_spec(_config(tmp_path, fixed))
    assert spec.quantize.variants[0].name == "gptq-w4g64"


def test_variant_names_default_from_method_and_must_be_unique() -> None:
    assert QuantizeVariant(method="gptq").name == "gptq-w4g128"
    assert QuantizeVariant(method="awq", group_size=32).name == "awq-w4g32"
    assert QuantizeVariant(method="bnb-int8").model_dump() == {"method": "bnb-int8", "bits": 8, "group_size": None,
                                                               "name": "bnb-int8"}
    from pydantic import ValidationError

    from gauntlet.config.quantize import QuantizeSpec

    with pytest.raises(ValidationError, match="used more than once"):
        QuantizeSpec(variants=[{"method": "gptq"}, {"method": "gptq", "group_size": 128}])
