"""Held-out perplexity with a real model (SmolLM2-135M-Instruct): lm-eval's own number, and a gate that tells a
damaged model from noise.

- on the whole text, the byte perplexity Gauntlet reports is the one lm-eval's ``loglikelihood_rolling`` task
  computes on the same texts (its ``byte_perplexity`` aggregate); the response given its prompt (the default)
  is lower (the answers follow from the questions);
- a copy of the model with noise in its weights models the text clearly worse: ``max_perplexity_increase``
  fails it, with the paired interval wholly above the limit; the model against itself passes (Δ 0).
The stage in a flow, base against fine-tuned, runs in the demo (tests/integration/test_pipeline.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gauntlet.config.gate import GateSpec
from gauntlet.refs import ModelRef
from tests.helpers import make_report
from tests.integration.test_real_model import smollm2  # noqa: F401  (the module-scoped fixture)

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning")]

ROWS = 16


def heldout_rows(path: Path) -> Path:
    """Alpaca rows of plain English sums, as a run's data.validation file would hold them."""
    with open(path, "w") as f:
        for i in range(ROWS):
            a, b = 3 + i, 11 + 2 * i
            f.write(json.dumps({"instruction": f"What is {a} plus {b}?", "input": "",
                                "output": f"{a} plus {b} is {a + b}."}) + "\n")
    return path


def measured(model: ModelRef, texts: dict[str, tuple[str, str]], text: str = "response"):
    from gauntlet.config.eval import EvalSpec
    from gauntlet.eval.engine import engine_for
    from gauntlet.eval.perplexity import measure_perplexity

    with engine_for(EvalSpec(tasks=["demo_facts"], batch_size=8), model) as engine:
        return measure_perplexity(engine.lm, texts, "validation", "md5-of-the-file", text), engine.lm


def damaged(model: ModelRef, scale: float):
    """The model with Gaussian noise of ``scale`` × each weight matrix's own std added, as an lm-eval model
    (kept in memory: lm-eval's hf backend takes a loaded model)."""
    import torch
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    m = AutoModelForCausalLM.from_pretrained(model.path, dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 2:
                p.add_(torch.randn(p.shape, generator=g) * p.std() * scale)
    return HFLM(pretrained=m, tokenizer=AutoTokenizer.from_pretrained(model.path), batch_size=8)


def test_held_out_perplexity_is_lm_evals_and_the_gate_fails_a_damaged_model(smollm2: ModelRef,  # noqa: F811
                                                                           tmp_path: Path) -> None:
    import lm_eval

    from gauntlet.eval.perplexity import heldout_texts
    from gauntlet.gate import decide

    texts = heldout_texts(heldout_rows(tmp_path / "validation.jsonl"))
    assert len(texts) == ROWS and texts["1"] == ("### Instruction:\nWhat is 3 plus 11?\n\n### Response:\n",
                                                 "3 plus 11 is 14.")
    full, lm = measured(smollm2, texts, "full")
    assert full.ci_low < full.byte_perplexity < full.ci_high and full.n == ROWS and full.text == "full"
    assert 1 < full.byte_perplexity < 5, full   # a real model (~1.7 bits/byte here); uniform over its vocabulary: ~15

    # the whole text: lm-eval's own loglikelihood_rolling task on the same texts gives the same number
    (tmp_path / "texts.jsonl").write_text("".join(json.dumps({"text": p + r}) + "\n" for p, r in texts.values()))
    task = {"task": "ppl_parity", "dataset_path": "json", "test_split": "test",
            "dataset_kwargs": {"data_files": {"test": str(tmp_path / "texts.jsonl")},
                               "cache_dir": str(tmp_path / "hf-datasets")},
            "output_type": "loglikelihood_rolling", "doc_to_text": "", "doc_to_target": "{{text}}",
            "metric_list": [{"metric": "byte_perplexity"}, {"metric": "bits_per_byte"}]}
    theirs = lm_eval.simple_evaluate(model=lm, tasks=[task], bootstrap_iters=0)["results"]["ppl_parity"]
    assert theirs["byte_perplexity,none"] == pytest.approx(full.byte_perplexity, rel=1e-6)
    assert theirs["bits_per_byte,none"] == pytest.approx(full.bits_per_byte, rel=1e-6)

    # the response given its prompt (the default): what fine-tuning learns; the answers are easy to predict
    base, _ = measured(smollm2, texts)
    assert base.text == "response" and base.ci_low < base.byte_perplexity < base.ci_high
    assert 1 < base.byte_perplexity < full.byte_perplexity, (base.byte_perplexity, full.byte_perplexity)

    from gauntlet.eval.perplexity import measure_perplexity

    worse = measure_perplexity(damaged(smollm2, scale=0.3), texts, "validation", "md5-of-the-file")
    print(f"\nbyte perplexity: model {base.byte_perplexity:.4f} ({base.ci_low:.4f}…{base.ci_high:.4f}), "
          f"damaged {worse.byte_perplexity:.4f} ({worse.ci_low:.4f}…{worse.ci_high:.4f})")
    spec = GateSpec(max_perplexity_increase=0.05)

    def rule(candidate, against):
        report = make_report({"demo_facts": 0.5}).model_copy(update={"perplexity": candidate})
        base_report = make_report({"demo_facts": 0.5}).model_copy(update={"perplexity": against})
        (r,) = [r for r in decide(spec, report, base_report, None, {}).rules if r.rule == "max_perplexity_increase"]
        return r

    failed = rule(worse, base)
    assert not failed.passed and failed.measured > 0.05, failed
    assert "significant" in failed.detail and "not significant" not in failed.detail, failed.detail
    same = rule(base, base)
    assert same.passed and same.measured == 0, same
    # the fine-tune of the other direction: the damaged model as the base, the real one the candidate
    better = rule(base, worse)
    assert better.passed and better.measured < 0, better
    # measured on other data, or another text: refused, not compared
    other = rule(base, base.model_copy(update={"data_md5": "another-version"}))
    assert not other.passed and other.detail.startswith("refused: measured on different data"), other.detail
    assert rule(base, full).detail.startswith("refused: measured on different text")
