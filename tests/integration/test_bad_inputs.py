"""The bad-input corpus (tests/bad_inputs/cases.yaml): each case gets its clear message.

Config cases go through `gauntlet validate` (exit 2, nothing started). Runtime cases run the real
finetune flow on a real DVC repo and must fail with the message, leaving the registry unchanged.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from gauntlet.demo import data as demo_data
from tests.helpers import REPO

CASES = yaml.safe_load((REPO / "tests" / "bad_inputs" / "cases.yaml").read_text())

DEMO = REPO / "configs" / "demo.yaml"

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def dvc_add(repo: Path, rel: str, content: bytes) -> str:
    path = repo / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    subprocess.run([sys.executable, "-m", "dvc", "add", "-q", rel], cwd=repo, check=True, capture_output=True)
    return rel


def jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def runtime_overrides(name: str, repo: Path, tmp_path: Path, tiny_model: Path) -> list[str]:
    splits = demo_data.build(48, 7)
    if name == "not_a_model_dir":
        (tmp_path / "empty-model").mkdir()
        (tmp_path / "empty-model" / "notes.txt").write_text("no weights")
        return [f"model.source={tmp_path / 'empty-model'}"]
    if name == "truncated_safetensors":
        model = Path(shutil.copytree(tiny_model, tmp_path / "model"))   # the shared model stays whole
        weights = model / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:-1000])
        return [f"model.source={model}"]
    if name == "registry_alias_unset":
        return ["model.source=models:/no-such-model@champion"]
    no_variants = ["quantize.variants=[]", "gate.register_variants=[]"]   # the subject is the training config
    if name == "lora_target_missing":
        return ["train.lora.target_modules=[q_proj, wq]", *no_variants]
    if name == "max_seq_len_over_model_limit":
        return ["train.max_seq_len=1024", *no_variants]
    splits["train"][3]["output"] = ""   # row_without_response (line 4); the other cases replace the file
    content = {
        "row_without_response": jsonl(splits["train"]),
        "empty_dataset": b"",
        "rows_missing_fields": jsonl([{"instruction": "q", "input": ""}] * 3),
        "data_not_utf8": jsonl(splits["train"][:2]) + b'{"instruction": "caf\xe9", "input": "", "output": "x"}\n',
        "enormous_row": jsonl(splits["train"][:2] + [{"instruction": "x" * (2 << 20), "input": "", "output": "y"}]),
        "chat_turns_broken": jsonl([{"messages": [{"role": "user", "content": "q"},
                                                  {"role": "assistant", "content": "a"}]},
                                    {"messages": [{"role": "user", "content": "q2"}]}]),
        "contaminated_eval": jsonl(splits["train"] + [{"instruction": r["instruction"], "input": "",
                                                       "output": r["output"]} for r in splits["eval"]]),
    }[name]
    # the subject is the data: no quantized variant whose calibration check would speak first
    return [f"data.train={dvc_add(repo, f'data/bad/{name}.jsonl', content)}", "quantize.variants=[]",
            "gate.register_variants=[]"]


def registry_versions() -> int:
    from mlflow.tracking import MlflowClient

    c = MlflowClient()
    return sum(len(c.search_model_versions(f"name='{m.name}'")) for m in c.search_registered_models())


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n, c in CASES.items() if c["kind"] == "runtime"])
def test_runtime_case(name: str, prefect_api, dvc_repo: Path, tmp_path: Path, tiny_model: Path) -> None:
    from gauntlet.flows.finetune import finetune

    before = registry_versions()
    overrides = [f"data.repo={dvc_repo}", *runtime_overrides(name, dvc_repo, tmp_path, tiny_model)]
    state = finetune(config=str(DEMO), overrides=overrides, return_state=True)
    assert state.is_failed()
    assert CASES[name]["expect"] in state.message, state.message
    assert registry_versions() == before
