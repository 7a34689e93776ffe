"""How sure a score is: per-item scores, intervals, and paired comparisons of two models on the same items.

Every evaluation keeps lm-eval's per-sample records; :func:`item_scores` turns them into one score per item
and metric (``{"acc": {"mmlu_anatomy/3": 1.0, …}}``), the unit of every statistic here:

- :func:`interval`: a score's mean, standard error and confidence interval. Items scored 0/1 (accuracy,
  exact match) get the Wilson score interval, which stays inside [0, 1] and is honest at 48 items or at a
  score near 0 or 1; other metrics the normal interval around the mean.
- :func:`paired_difference`: two models compared **over the items both answered**: the difference of
  their means and its interval by the paired bootstrap (items resampled with replacement, both models'
  answers to an item kept together, so the shared difficulty of an item cancels out). A difference is
  significant at ``alpha`` when its ``1 - alpha`` interval leaves out the value tested (0, or a threshold).
  For 0/1 items the discordant counts (items only one model got right) are reported too: they are what
  the difference is made of.

Deterministic: the bootstrap's seed is fixed, so the same records always give the same interval. No Prefect.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from statistics import NormalDist

from gauntlet.refs import Ref

BOOTSTRAP_SAMPLES = 10_000
BOOTSTRAP_SEED = 20260101
CONFIDENCE = 0.95


class Interval(Ref):
    """A score with its uncertainty."""

    value: float
    stderr: float | None
    lo: float
    hi: float
    n: int
    confidence: float = CONFIDENCE
    method: str                      # "wilson" | "normal" | "stderr" (from lm-eval's stderr alone)

    def text(self, scale: float = 1.0, digits: int = 1) -> str:
        f = f".{digits}f"
        return (f"{self.value * scale:{f}} ({self.confidence:.0%} CI {self.lo * scale:{f}}…{self.hi * scale:{f}}, "
                f"n={self.n})")


class Comparison(Ref):
    """``a - b`` over the items both were scored on, with its paired-bootstrap interval."""

    delta: float
    lo: float
    hi: float
    n: int                           # items both answered
    confidence: float
    significant: bool                # the interval leaves out ``tested``
    tested: float = 0.0              # the value the interval was checked against (0, or a gate threshold)
    better: int | None = None        # 0/1 items: a right and b wrong
    worse: int | None = None         # 0/1 items: a wrong and b right
    method: str = "paired bootstrap"

    def text(self, scale: float = 100.0, digits: int = 1) -> str:
        """``Δ +2.1 (95% CI −0.4…+4.6), not significant; 48 paired items, 3 better / 2 worse`` (in points)."""
        f = f"+.{digits}f"
        verdict = "significant" if self.significant else "not significant"
        against = "" if self.tested == 0 else f" against {self.tested * scale:{f}}"
        counts = "" if self.better is None else f", {self.better} better / {self.worse} worse"
        return (f"Δ {self.delta * scale:{f}} ({self.confidence:.0%} CI {self.lo * scale:{f}}…{self.hi * scale:{f}}), "
                f"{verdict}{against}; {self.n} paired items{counts}")


# ---------------------------------------------------------------------------------------------
# per-item scores from lm-eval's samples
# ---------------------------------------------------------------------------------------------


def metric_name(metric: str, filter_name: str | None) -> str:
    """A metric as the report names it: ``exact_match,strict-match``, or ``acc`` under the ``none`` filter."""
    return metric if filter_name in (None, "none") else f"{metric},{filter_name}"


def item_scores(samples: Mapping[str, Iterable[dict]]) -> dict[str, dict[str, float]]:
    """``{metric: {"task/doc_id": score}}`` from lm-eval's per-sample rows (one row per item and filter)."""
    out: dict[str, dict[str, float]] = {}
    for task, rows in samples.items():
        for row in rows:
            for metric in row.get("metrics") or []:
                value = row.get(metric)
                if isinstance(value, (bool, int, float)):
                    out.setdefault(metric_name(metric, row.get("filter")), {})[f"{task}/{row['doc_id']}"] = float(value)
    return out


def is_binary(values: Iterable[float]) -> bool:
    return all(v in (0.0, 1.0) for v in values)


# ---------------------------------------------------------------------------------------------
# one score
# ---------------------------------------------------------------------------------------------


def _z(confidence: float) -> float:
    return NormalDist().inv_cdf(0.5 + confidence / 2)


def interval(values: Iterable[float], confidence: float = CONFIDENCE) -> Interval:
    """Mean, standard error (sample sd / √n, as lm-eval reports it) and interval of per-item scores."""
    xs = list(values)
    n = len(xs)
    if n == 0:
        raise ValueError("no items to estimate from")
    mean = math.fsum(xs) / n
    sd = math.sqrt(math.fsum((x - mean) ** 2 for x in xs) / (n - 1)) if n > 1 else 0.0
    stderr = sd / math.sqrt(n)
    z = _z(confidence)
    if is_binary(xs):  # Wilson score interval
        centre = (mean + z * z / (2 * n)) / (1 + z * z / n)
        half = z / (1 + z * z / n) * math.sqrt(mean * (1 - mean) / n + z * z / (4 * n * n))
        lo, hi, method = max(0.0, centre - half), min(1.0, centre + half), "wilson"
    else:
        lo, hi, method = mean - z * stderr, mean + z * stderr, "normal"
    return Interval(value=mean, stderr=stderr, lo=lo, hi=hi, n=n, confidence=confidence, method=method)


def interval_from_stderr(value: float, stderr: float | None, n: int, confidence: float = CONFIDENCE) -> Interval:
    """The normal interval from a reported standard error (reports without per-item records)."""
    half = 0.0 if stderr is None else _z(confidence) * stderr
    return Interval(value=value, stderr=stderr, lo=value - half, hi=value + half, n=n, confidence=confidence,
                    method="stderr")


# ---------------------------------------------------------------------------------------------
# two models on the same items
# ---------------------------------------------------------------------------------------------


def paired_items(a: Mapping[str, float], b: Mapping[str, float]) -> tuple[list[str], list[float], list[float]]:
    keys = sorted(set(a) & set(b))
    return keys, [a[k] for k in keys], [b[k] for k in keys]


def bootstrap_indices(n: int, samples: int = BOOTSTRAP_SAMPLES, seed: int = BOOTSTRAP_SEED):
    """``samples`` × ``n`` item indices drawn with replacement (numpy), the same for the same n and seed."""
    import numpy as np

    return np.random.default_rng(seed).integers(0, n, size=(samples, n))


def paired_difference(a: Mapping[str, float], b: Mapping[str, float], alpha: float = 1 - CONFIDENCE,
                      tested: float = 0.0, samples: int = BOOTSTRAP_SAMPLES) -> Comparison:
    """``mean(a) - mean(b)`` over their common items, its ``1 - alpha`` paired-bootstrap interval, and
    whether that interval leaves out ``tested``. ValueError when they share no item."""
    import numpy as np

    keys, xa, xb = paired_items(a, b)
    if not keys:
        raise ValueError("the two evaluations share no item: they cannot be compared item by item")
    diffs = np.asarray(xa) - np.asarray(xb)
    delta = float(diffs.mean())
    means = diffs[bootstrap_indices(len(keys), samples)].mean(axis=1)
    lo, hi = (float(q) for q in np.quantile(means, [alpha / 2, 1 - alpha / 2]))
    lo, hi = min(lo, delta), max(hi, delta)  # a degenerate resample set must still contain the estimate
    binary = is_binary(xa) and is_binary(xb)
    return Comparison(
        delta=delta, lo=lo, hi=hi, n=len(keys), confidence=1 - alpha, tested=tested,
        significant=not (lo <= tested <= hi),
        better=int(((diffs > 0)).sum()) if binary else None, worse=int((diffs < 0).sum()) if binary else None)
