"""Input drift: served prompts against the training data, by the population stability index (PSI).

Two views of a prompt: its length in words (ten bins cut at the reference's deciles) and its words (the
reference's most common words, each a bin, plus one bin for every other word). PSI = sum over bins of
(served - reference) * ln(served / reference), empty bins smoothed by half a count (gauntlet.data.drift); 0.1 is a small shift,
0.25 a large one. The reported drift is the larger of the two. PSI is biased upward on small samples (32
prompts over 51 word bins reach 0.3 by chance), so each measurement carries its noise floor: the PSI that as
many prompts drawn from the training data itself reach (99th percentile); an alarm needs both.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

from pydantic import BaseModel

from gauntlet.data.drift import bin_counts, psi_counts, quantile_edges, sampled_floor

WORD = re.compile(r"[a-z0-9]+")


class Drift(BaseModel):
    psi: float
    psi_length: float
    psi_vocabulary: float
    served: int                      # prompts compared
    reference: int
    noise_floor: float = 0.0         # PSI that sampling alone reaches (99th percentile) at this many served prompts


def words(text: str) -> list[str]:
    return WORD.findall(text.lower())


def vocab_counts(prompts: list[list[str]], vocabulary: list[str]) -> list[int]:
    known = set(vocabulary)
    counts = Counter(w if w in known else "\0other" for ws in prompts for w in ws)
    return [counts.get(w, 0) for w in vocabulary] + [counts.get("\0other", 0)]


def noise_floor(ref_words: list[list[str]], n: int, edges: list[float], vocabulary: list[str]) -> float:
    """The PSI that ``n`` prompts drawn from the reference itself reach (99th percentile): a small sample of
    served prompts drifts this far by chance alone (about (bins - 1) / words), so an alarm needs more than this."""
    ref_length = bin_counts([len(w) for w in ref_words], edges)
    ref_vocab = vocab_counts(ref_words, vocabulary)
    return sampled_floor(ref_words, n, lambda sample: max(
        psi_counts(ref_length, bin_counts([len(w) for w in sample], edges)),
        psi_counts(ref_vocab, vocab_counts(sample, vocabulary))))


def drift(reference_prompts: list[str], served_prompts: list[str], top_words: int = 50) -> Drift:
    ref_words = [words(p) for p in reference_prompts]
    served_words = [words(p) for p in served_prompts]
    edges = quantile_edges([len(w) for w in ref_words])
    psi_length = psi_counts(bin_counts([len(w) for w in ref_words], edges), bin_counts([len(w) for w in served_words], edges))
    vocabulary = [w for w, _ in Counter(w for ws in ref_words for w in ws).most_common(top_words)]
    psi_vocabulary = psi_counts(vocab_counts(ref_words, vocabulary), vocab_counts(served_words, vocabulary))
    floor = noise_floor(ref_words, len(served_words), edges, vocabulary) if served_words and ref_words else 0.0
    return Drift(psi=round(max(psi_length, psi_vocabulary), 4), psi_length=round(psi_length, 4),
                 psi_vocabulary=round(psi_vocabulary, 4), served=len(served_prompts), reference=len(reference_prompts),
                 noise_floor=round(floor, 4))


def reference_prompts(path: Path, limit: int = 2000) -> list[str]:
    """The prompts of a training file: alpaca ``instruction`` + ``input``, or chat rows' user turns."""
    prompts = []
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            row = json.loads(line)
            if "messages" in row or "conversations" in row:
                turns = row.get("messages") or row.get("conversations")
                prompts += [t.get("content") or t.get("value") or "" for t in turns
                            if t.get("role", t.get("from")) in ("user", "human")]
            else:
                prompts.append(" ".join(x for x in (row.get("instruction", ""), row.get("input", "")) if x))
            if len(prompts) >= limit:
                break
    return prompts


def served_prompts(records: list[dict]) -> list[str]:
    """The user turns of the chat requests in nginx's access-log records (and completions' prompts)."""
    prompts = []
    for r in records:
        try:
            body = json.loads(r.get("body") or "{}")
        except ValueError:
            continue
        if isinstance(body.get("messages"), list):
            prompts += [m.get("content", "") for m in body["messages"]
                        if isinstance(m, dict) and m.get("role") == "user" and isinstance(m.get("content"), str)]
        elif isinstance(body.get("prompt"), str):
            prompts.append(body["prompt"])
    return prompts
