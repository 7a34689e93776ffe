"""Data checks before training: duplicates, length distribution against the limits, contamination.

Contamination: an evaluation item whose normalized prompt (lower case, punctuation and whitespace
collapsed) is also a training prompt makes the evaluation measure memory of that line, not the
skill. The rate is reported always and fails the run above ``data.checks.max_contamination_rate``.

Preference rows (:mod:`gauntlet.data.preference`) are checked alike: a row's length is its prompt and its longer
completion, its question is its prompt; pairs that repeat (prompt, chosen and rejected the same once normalized)
count as duplicates, and a pair whose chosen equals its rejected fails the check.
"""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path

from pydantic import BaseModel

from gauntlet.config.data import DataChecksSpec
from gauntlet.data import preference
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


def texts(row: dict) -> tuple[str, str]:
    """(prompt, response) of any training row; a preference row's response is its longest completion."""
    if preference.detect_layout(row) in ("pairs", "kto"):
        prompt, responses = preference.prompt_and_responses(row)
        return prompt, max(responses, key=len)
    return prompt_and_response(row)


def asks(row: dict) -> str:
    return preference.question(row) if preference.detect_layout(row) in ("pairs", "kto") else question(row)


def pair_problems(rows: list[dict]) -> tuple[float, list[str]]:
    """Preference pairs: the rate of repeated pairs (normalized) and the rows whose chosen equals rejected."""
    pairs = [r for r in rows if preference.detect_layout(r) == "pairs"]
    if not pairs:
        return 0.0, []
    keys = [tuple(normalize(t) for t in (preference.question(r), *preference.prompt_and_responses(r)[1]))
            for r in pairs]
    same = [i + 1 for i, k in enumerate(keys) if k[1] == k[2]]
    problems = [f"{len(same)} pair(s) with chosen == rejected (rows {same[:5]}): fix or drop them"] if same else []
    return 1 - len(set(keys)) / len(keys), problems


def check_data(checks: DataChecksSpec, max_seq_len: int, data: DatasetRef, model: ModelRef,
               out: Path | None = None) -> DataReport:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model.path)
    train = _rows(data.train_path)
    evaluation = _rows(data.eval_path)
    texts_ = [texts(r) for r in train]   # alpaca, chat or preference rows
    prompt_lens = [len(tokenizer(prompt, add_special_tokens=False)["input_ids"]) for prompt, _ in texts_]
    total_lens = [n + len(tokenizer(response, add_special_tokens=False)["input_ids"]) + 1
                  for n, (_, response) in zip(prompt_lens, texts_, strict=True)]
    ordered = sorted(prompt_lens)
    p95 = ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]
    lengths = {"p50": float(statistics.median(ordered)), "p95": float(p95), "max": float(ordered[-1])}
    truncated = sum(n > max_seq_len for n in total_lens) / len(total_lens)

    seen = {normalize(asks(r)) for r in train}
    hits = [r["instruction"] for r in evaluation if normalize(r["instruction"] + " " + r.get("input", "")) in seen]
    contamination = len(hits) / len(evaluation) if evaluation else 0.0

    pair_duplicates, problems = pair_problems(train)
    if pair_duplicates > checks.max_duplicate_rate:
        problems.append(f"duplicate pair rate {pair_duplicates:.3f} > data.checks.max_duplicate_rate "
                        f"{checks.max_duplicate_rate}: deduplicate the preference pairs")
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
