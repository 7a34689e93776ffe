"""Perplexity on the run's held-out rows: does the fine-tune still model text like the data it was tuned on?

- **Text**: each held-out row (``data.validation`` by default, never trained on) as training saw it: an alpaca
  row's rendered prompt and its output (:func:`gauntlet.data.sft.prompt_and_response`); a chat row's turns
  joined by newlines, so that models with different chat templates are scored on the same text.
- **What is scored** (``eval.perplexity.text``): ``response`` (the default) is the response given its prompt,
  lm-eval's ``loglikelihood`` request of (prompt, response): what supervised fine-tuning learns, since its
  loss masks the prompt. ``full`` is the whole text, lm-eval's ``loglikelihood_rolling`` (rolling windows of
  the model's context, as its wikitext task computes it): how well the model still models the text itself.
  The demo shows why the default matters: its fine-tune lowers the response perplexity several-fold while
  the full text's rises (the prompts were never trained on).
- **The number**: byte perplexity, ``exp(−Σ loglik / Σ bytes)`` over the rows: per byte, not per token, so
  models with different tokenizers compare. Bits per byte and word perplexity are reported alongside.
- **How sure**: a ratio of sums has no closed-form interval: its 95% interval comes from the bootstrap over
  rows, and two models are compared by the **paired** bootstrap over the rows both scored (the relative
  change ``ppl_a / ppl_b − 1``): a row's own difficulty cancels out, as in :mod:`gauntlet.eval.stats`.

No Prefect here: the stage is ``tasks/perplexity.py``.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

from gauntlet.eval.stats import BOOTSTRAP_SAMPLES, CONFIDENCE, Comparison, bootstrap_indices
from gauntlet.eval.taskconfig import EvalError
from gauntlet.refs import PerplexityResult

log = logging.getLogger(__name__)


def heldout_texts(path: str | Path, limit: int | None = None) -> dict[str, tuple[str, str]]:
    """``{row id: (prompt, response)}`` of the first ``limit`` rows of a JSONL file (the id: its line number)."""
    from gauntlet.data.sft import prompt_and_response

    texts: dict[str, tuple[str, str]] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            if limit is not None and len(texts) >= limit:
                break
            try:
                prompt, response = prompt_and_response(json.loads(line))
            except (ValueError, KeyError, TypeError) as e:
                raise EvalError(f"eval.perplexity: {path}:{lineno} is not a training row ({type(e).__name__}: "
                                f"{e}); the held-out file must have the training data's layout") from None
            texts[str(lineno)] = (prompt, response)
    if not texts:
        raise EvalError(f"eval.perplexity: {path} has no rows to score")
    return texts


def _ratio(ll, units):
    """exp(−Σ loglik / Σ units) for arrays, row-wise for 2-D ones."""
    import numpy as np

    return np.exp(-np.asarray(ll).sum(axis=-1) / np.asarray(units).sum(axis=-1))


def byte_perplexity_interval(items: dict[str, list[float]], confidence: float = CONFIDENCE,
                             samples: int = BOOTSTRAP_SAMPLES) -> tuple[float, float]:
    """The bootstrap percentile interval of the byte perplexity over rows (``items``: id → [loglik, bytes, words])."""
    import numpy as np

    rows = np.asarray([items[k] for k in sorted(items)], dtype=float)
    idx = bootstrap_indices(len(rows), samples)
    values = _ratio(rows[:, 0][idx], rows[:, 1][idx])
    alpha = 1 - confidence
    lo, hi = (float(q) for q in np.quantile(values, [alpha / 2, 1 - alpha / 2]))
    point = float(_ratio(rows[:, 0], rows[:, 1]))
    return min(lo, point), max(hi, point)


def summarize(items: dict[str, list[float]], split: str, data_md5: str | None, seconds: float,
              text: str = "response") -> PerplexityResult:
    ll = math.fsum(v[0] for v in items.values())
    n_bytes = sum(v[1] for v in items.values())
    n_words = sum(v[2] for v in items.values())
    lo, hi = byte_perplexity_interval(items)
    return PerplexityResult(
        split=split, text=text, data_md5=data_md5, n=len(items), byte_perplexity=math.exp(-ll / n_bytes),
        ci_low=lo, ci_high=hi, bits_per_byte=-ll / n_bytes / math.log(2),
        word_perplexity=math.exp(-ll / n_words) if n_words else None, seconds=seconds, items=items)


def measure_perplexity(lm: Any, texts: dict[str, tuple[str, str]], split: str, data_md5: str | None,
                       text: str = "response") -> PerplexityResult:
    """Score ``texts`` with an lm-eval model (``Engine.lm``): per row the log-likelihood of the scored text
    (``response``: the response given its prompt; ``full``: prompt and response), its bytes and words."""
    from lm_eval.api.instance import Instance

    ids = list(texts)
    scored = {k: texts[k][1] if text == "response" else texts[k][0] + texts[k][1] for k in ids}
    t0 = time.perf_counter()
    if text == "response":
        requests = [Instance(request_type="loglikelihood", doc={}, arguments=texts[k], idx=0,
                             metadata=("heldout_perplexity", i, 1)) for i, k in enumerate(ids)]
        lls = [ll for ll, _greedy in lm.loglikelihood(requests, disable_tqdm=True)]
    else:
        requests = [Instance(request_type="loglikelihood_rolling", doc={}, arguments=(scored[k],), idx=0,
                             metadata=("heldout_perplexity", i, 1)) for i, k in enumerate(ids)]
        lls = lm.loglikelihood_rolling(requests, disable_tqdm=True)
    seconds = time.perf_counter() - t0
    items = {k: [float(ll), float(len(scored[k].encode("utf-8"))), float(len(scored[k].split()))]
             for k, ll in zip(ids, lls, strict=True)}
    if any(v[1] == 0 for v in items.values()):
        empty = [k for k, v in items.items() if v[1] == 0][:5]
        raise EvalError(f"eval.perplexity: rows {empty} have an empty {text}; nothing to score")
    result = summarize(items, split, data_md5, seconds, text)
    log.info("perplexity (%s) on %d %s rows: byte perplexity %.4f (95%% CI %.4f…%.4f), %.4f bits/byte, in %.1fs",
             text, result.n, split, result.byte_perplexity, result.ci_low, result.ci_high, result.bits_per_byte,
             seconds)
    return result


def perplexity_change(a: PerplexityResult, b: PerplexityResult, alpha: float = 1 - CONFIDENCE,
                      tested: float = 0.0, samples: int = BOOTSTRAP_SAMPLES) -> Comparison:
    """``a``'s byte perplexity relative to ``b``'s (``ppl_a / ppl_b − 1``, 0.05 = 5% higher) over the rows both
    scored, with its paired-bootstrap ``1 − alpha`` interval and whether it leaves out ``tested``.
    ValueError when they were measured on different data or share no row."""
    import numpy as np

    if a.data_md5 != b.data_md5 or a.split != b.split:
        raise ValueError(f"measured on different data ({a.split} md5 {a.data_md5} against {b.split} md5 "
                         f"{b.data_md5})")
    if a.text != b.text:
        raise ValueError(f"measured on different text (the {a.text} against the {b.text})")
    keys = sorted(set(a.items) & set(b.items))
    if not keys:
        raise ValueError("the two measurements share no row")
    ra = np.asarray([a.items[k] for k in keys], dtype=float)
    rb = np.asarray([b.items[k] for k in keys], dtype=float)
    delta = float(_ratio(ra[:, 0], ra[:, 1]) / _ratio(rb[:, 0], rb[:, 1]) - 1)
    idx = bootstrap_indices(len(keys), samples)
    changes = _ratio(ra[:, 0][idx], ra[:, 1][idx]) / _ratio(rb[:, 0][idx], rb[:, 1][idx]) - 1
    lo, hi = (float(q) for q in np.quantile(changes, [alpha / 2, 1 - alpha / 2]))
    lo, hi = min(lo, delta), max(hi, delta)
    return Comparison(delta=delta, lo=lo, hi=hi, n=len(keys), confidence=1 - alpha, tested=tested,
                      significant=not (lo <= tested <= hi), method="paired bootstrap (ratio of sums)")
