"""Data checks before training: duplicates, length distribution against the limits, contamination.

Contamination: an evaluation item whose normalized prompt (lower case, punctuation and whitespace
collapsed) is also a training prompt makes the evaluation measure memory of that line, not the
skill. The rate is reported always and fails the run above ``data.checks.max_contamination_rate``.
"""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path

from pydantic import BaseModel

from gauntlet.config.data import DataChecksSpec
from gauntlet.data.sft import prompt_and_response, question
from gauntlet.refs import DatasetRef, ModelRef


class DataCheckError(ValueError):
    pass


class DataReport(BaseModel):
    rows: dict[str, int]
    duplicate_rate: float
    prompt_tokens: dict[str, float]          # p50, p95, max
    truncated_rate: float                    # rows longer than train.max_seq_len
    contamination_rate: float
    contaminated_examples: list[str]
    passed: bool
    problems: list[str]


def normalize(text: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"[^\w\s]", " ", text.lower())).strip()


def _rows(path: str | None) -> list[dict]:
    if not path:
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def check_data(checks: DataChecksSpec, max_seq_len: int, data: DatasetRef, model: ModelRef,
               out: Path | None = None) -> DataReport:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model.path)
    train = _rows(data.train_path)
    evaluation = _rows(data.eval_path)
    texts = [prompt_and_response(r) for r in train]   # alpaca or chat rows
    prompt_lens = [len(tokenizer(prompt, add_special_tokens=False)["input_ids"]) for prompt, _ in texts]
    total_lens = [n + len(tokenizer(response, add_special_tokens=False)["input_ids"]) + 1
                  for n, (_, response) in zip(prompt_lens, texts, strict=True)]
    ordered = sorted(prompt_lens)
    p95 = ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]
    lengths = {"p50": float(statistics.median(ordered)), "p95": float(p95), "max": float(ordered[-1])}
    truncated = sum(n > max_seq_len for n in total_lens) / len(total_lens)

    seen = {normalize(question(r)) for r in train}
    hits = [r["instruction"] for r in evaluation if normalize(r["instruction"] + " " + r.get("input", "")) in seen]
    contamination = len(hits) / len(evaluation) if evaluation else 0.0

    problems = []
    if data.duplicate_rate > checks.max_duplicate_rate:
        problems.append(f"duplicate rate {data.duplicate_rate:.3f} > data.checks.max_duplicate_rate "
                        f"{checks.max_duplicate_rate}: deduplicate the training data")
    limit = checks.max_prompt_tokens_p95 or max_seq_len
    if p95 > limit:
        problems.append(f"95th percentile prompt length {p95} tokens > {limit}: most responses would be cut; "
                        "raise train.max_seq_len or shorten the prompts")
    if contamination > checks.max_contamination_rate:
        problems.append(f"{len(hits)} of {len(evaluation)} eval items ({contamination:.1%}) appear in the training "
                        f"data (> data.checks.max_contamination_rate {checks.max_contamination_rate}); e.g. "
                        f"{hits[:3]}: remove them from the training data")
    if out is not None:
        plot_lengths(total_lens, max_seq_len, out / "length_histogram.png")
    return DataReport(rows=data.rows, duplicate_rate=data.duplicate_rate, prompt_tokens=lengths,
                      truncated_rate=truncated, contamination_rate=contamination,
                      contaminated_examples=hits[:10], passed=not problems, problems=problems)


def plot_lengths(lengths: list[int], limit: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(lengths, bins=30)
    ax.axvline(limit, color="red", linestyle="--", label=f"max_seq_len={limit}")
    ax.set_xlabel("tokens per training row (prompt + response)")
    ax.set_ylabel("rows")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
