"""Arena ratings: the board's candidates judged against each other on the judge's instruction set, as
Bradley–Terry ratings with a length-bias control, bootstrap intervals and rank ranges.

- **A battle** is one instruction answered by two candidates and judged in both orders by
  :func:`gauntlet.eval.judge.judge_pairs` (the pairwise judge's own order-swap logic): its outcome is the mean of
  model A's two outcomes (win 1, tie 0.5, loss 0), so a judge that always prefers one position makes every battle
  0.5. It carries both answers' lengths in characters.
- **The fit** is a logistic regression of the outcome (a soft label in [0, 1], log loss) on the two candidates'
  identity difference, ``logit P(A beats B) = θ_A − θ_B + γ·tanh(Δlen / σ)``, with ``Δlen = len_A − len_B`` and σ
  the standard deviation of Δlen over the battles fitted. The **length control** follows AlpacaEval's
  length-controlled win rate (Dubois et al. 2024, "Length-Controlled AlpacaEval: A Simple Way to Debias Automatic
  Evaluators", arXiv:2404.04475; tatsu-lab/alpaca_eval, ``src/alpaca_eval/metrics/glm_winrate.py``): a GLM whose
  features are the model identity and ``tanh`` of the standardised length difference, fitted on the judge's
  preferences as probabilities, and read at ``Δlen = 0`` ("what would the preference be if both answers had the
  same length?"). What we took is that idea, not its code: here the identities are every candidate's (a
  Bradley–Terry model among all of them, not one model against one baseline), there is no instruction-difficulty
  term and no cross-validated L1 penalty; a weak ridge (``RIDGE``) keeps the fit finite when one candidate wins
  every battle. Without the control ``γ = 0``: the plain Bradley–Terry fit. Fitted by Newton's method with a
  backtracking line search (the log loss is convex).
- **Scale**: Elo-like, ``rating = 1000 + 400·log10(e)·(θ − mean θ)``: the candidates' mean is 1000 and 400
  points are 10:1 odds, so ``P(A beats B at equal length) = 1 / (1 + 10^((R_B − R_A)/400))``
  (:meth:`ArenaRatings.preference`).
- **Intervals**: a bootstrap over instructions (each resample draws the set's items with replacement and keeps
  every battle on a drawn item as often as it was drawn: clustered by item), with a fixed seed; a rating's
  interval is the 2.5–97.5% range of its resampled ratings (each resample anchored at mean 1000 again), its
  rank range the 2.5–97.5% range of its resampled rank (1 = best). γ gets an interval the same way.
- **The schedule** (:func:`schedule`) gives every candidate ``per_candidate`` distinct opponents, counting those it
  has already met in cached battles: a new candidate plays a bounded sample (the closest ratings first where
  ratings exist, else an order drawn from the seed and the two ids), so battles grow linearly with the
  candidates, not quadratically; components of the battle graph left apart are joined by one pair each.
- **The cache** (:class:`BattleCache`): one JSON line per pair of models under one protocol, keyed by both
  models' content sha256 and the protocol (the set's md5 and limit, the judge's identity and content hash, the
  prompt's sha256, the decoding): a pair judged on an earlier night is never judged again while nothing in its
  key changed. The file is rewritten whole and atomically (:func:`gauntlet.files.write_text`) under a file lock.

No Prefect and no MLflow here: the stage that judges the pairs and the board that shows the ratings come next.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gauntlet.eval.judge import JudgedItem
from gauntlet.eval.stats import BOOTSTRAP_SEED, CONFIDENCE
from gauntlet.files import write_text
from gauntlet.hashing import sha256_json
from gauntlet.refs import Ref

BASE_RATING = 1000.0
ELO = 400.0 / math.log(10)      # rating points per nat of log-odds
RIDGE = 1e-3                    # Gaussian prior on θ and γ (variance 1000): finite ratings for a candidate that
                                # wins every battle, no visible pull otherwise
BOOTSTRAP = 1000
CACHE_FILE = "battles.jsonl"


class Battle(Ref):
    model_a: str
    model_b: str
    item: str                       # the instruction's id
    outcome: float                  # model A's mean outcome over both orders: 0, 0.25, …, 1
    len_a: int                      # answer lengths in characters
    len_b: int


class Contestant(Ref):
    """A candidate as the arena names it (``id``: the board's name) and as the cache keys it (``sha``)."""

    id: str
    sha: str


class ArenaProtocol(Ref):
    """What a battle's outcome depends on besides the two models: two battles are the same only under one."""

    instructions_md5: str
    limit: int | None = None
    judge: dict[str, Any]           # the judge's identity (model or endpoint), its content hash, the tie margin
    prompt_sha256: str
    decoding: dict[str, Any]        # how the answers were generated (greedy, max_new_tokens)

    @classmethod
    def from_judge(cls, protocol: Mapping[str, Any]) -> ArenaProtocol:
        """From :func:`gauntlet.eval.judge.judge_protocol`'s dict."""
        rest = {"prompt", "prompt_sha256", "instructions", "instructions_md5", "limit", "decoding",
                "max_new_tokens", "orders"}
        return cls(instructions_md5=protocol["instructions_md5"], limit=protocol.get("limit"),
                   judge={k: v for k, v in protocol.items() if k not in rest},
                   prompt_sha256=protocol["prompt_sha256"],
                   decoding={"decoding": protocol.get("decoding"), "max_new_tokens": protocol.get("max_new_tokens")})

    def digest(self) -> str:
        return sha256_json(self.model_dump())


class ArenaRating(Ref):
    model: str
    rating: float
    lo: float
    hi: float
    rank: int                       # 1 = best, by rating
    rank_low: int                   # the best rank within the bootstrap's 95% (a smaller number)
    rank_high: int
    battles: int


class ArenaRatings(Ref):
    ratings: list[ArenaRating]      # best first
    length_control: bool
    length_coef: float              # γ: log-odds per unit of tanh(Δlen / σ) (0 without the control)
    length_coef_lo: float
    length_coef_hi: float
    length_scale: float             # σ, characters
    battles: int
    items: int
    bootstrap: int
    seed: int
    confidence: float = CONFIDENCE

    def of(self, model: str) -> ArenaRating:
        return next(r for r in self.ratings if r.model == model)

    def preference(self, a: str, b: str) -> float:
        """P(a beats b) with answers of equal length (the length-controlled preference)."""
        return 1.0 / (1.0 + 10 ** ((self.of(b).rating - self.of(a).rating) / 400.0))


def battles_from_judged(items: Iterable[JudgedItem], a: str, b: str) -> list[Battle]:
    """The battles of ``judge_pairs``'s items, ``a`` the candidate and ``b`` the opponent there."""
    return [Battle(model_a=a, model_b=b, item=it.id, outcome=it.score, len_a=len(it.candidate_answer),
                   len_b=len(it.opponent_answer)) for it in items]


# ---------------------------------------------------------------------------------------------
# the schedule
# ---------------------------------------------------------------------------------------------


def _draw(seed: int, *ids: str) -> str:
    return hashlib.sha256(json.dumps([seed, *ids]).encode()).hexdigest()


def _opponent_order(c: str, others: Sequence[str], ratings: Mapping[str, float], seed: int) -> list[str]:
    """Closest rating first where both have one, then the rest in an order drawn from the seed and the ids."""
    def key(o: str) -> tuple[float, str]:
        close = abs(ratings[c] - ratings[o]) if c in ratings and o in ratings else math.inf
        return close, _draw(seed, *sorted((c, o)))
    return sorted(others, key=key)


def _components(nodes: Sequence[str], pairs: Iterable[frozenset[str]]) -> list[list[str]]:
    parent = {n: n for n in nodes}

    def root(n: str) -> str:
        while parent[n] != n:
            parent[n] = parent[parent[n]]
            n = parent[n]
        return n
    for pair in pairs:
        x, y = sorted(pair)
        parent[root(x)] = root(y)
    groups: dict[str, list[str]] = {}
    for n in nodes:
        groups.setdefault(root(n), []).append(n)
    return list(groups.values())


def schedule(candidates: Sequence[str], existing_battles: Iterable[Battle] = (), per_candidate: int = 3,
             seed: int = BOOTSTRAP_SEED, ratings: Mapping[str, float] | None = None) -> list[tuple[str, str]]:
    """The pairs to judge tonight: every candidate meets ``per_candidate`` distinct opponents (those of the
    existing battles count), so at most ``len(candidates)·per_candidate`` pairs, none already played; the
    fewest-met candidates choose first. Deterministic for a seed."""
    ratings = ratings or {}
    names = sorted(set(candidates))
    played = {frozenset((b.model_a, b.model_b)) for b in existing_battles if b.model_a != b.model_b}
    met = {c: {o for p in played if c in p for o in p if o != c and o in names} for c in names}
    pairs: list[tuple[str, str]] = []
    for c in sorted(names, key=lambda n: (len(met[n]), _draw(seed, n))):
        others = [o for o in names if o != c and o not in met[c]]
        for o in _opponent_order(c, others, ratings, seed)[:max(0, per_candidate - len(met[c]))]:
            pairs.append((c, o))
            met[c].add(o)
            met[o].add(c)
    groups = _components(names, played | {frozenset(p) for p in pairs})
    if per_candidate > 0 and len(groups) > 1:     # join what the sample left apart: one pair per extra group
        firsts = sorted((min(g, key=lambda n: _draw(seed, n)) for g in groups), key=lambda n: _draw(seed, n))
        pairs += list(zip(firsts[1:], firsts[:-1], strict=True))
    return pairs


# ---------------------------------------------------------------------------------------------
# the fit
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Design:
    models: list[str]
    a: np.ndarray                   # one entry per battle: model A's index, model B's
    b: np.ndarray
    x: np.ndarray                   # tanh(Δlen / σ), zeros without the control
    y: np.ndarray
    cluster: np.ndarray             # the battle's item, as an index
    items: int
    scale: float


def _design(battles: Sequence[Battle], length_control: bool) -> _Design:
    models = sorted({m for b in battles for m in (b.model_a, b.model_b)})
    index = {m: i for i, m in enumerate(models)}
    item_ids = sorted({b.item for b in battles})
    item_index = {it: i for i, it in enumerate(item_ids)}
    delta = np.asarray([b.len_a - b.len_b for b in battles], float)
    scale = float(delta.std()) or 1.0
    x = np.tanh(delta / scale) if length_control else np.zeros(len(battles))
    return _Design(models=models, a=np.asarray([index[b.model_a] for b in battles]),
                   b=np.asarray([index[b.model_b] for b in battles]), x=x,
                   y=np.asarray([b.outcome for b in battles], float),
                   cluster=np.asarray([item_index[b.item] for b in battles]), items=len(item_ids), scale=scale)


def _loss(d: _Design, w: np.ndarray, theta: np.ndarray, gamma: float) -> float:
    z = theta[d.a] - theta[d.b] + gamma * d.x
    nll = w @ (np.logaddexp(0.0, z) - d.y * z)     # −[y log σ(z) + (1 − y) log σ(−z)]
    return float(nll + RIDGE / 2 * (theta @ theta + gamma * gamma))


def _newton_step(d: _Design, w: np.ndarray, theta: np.ndarray, gamma: float) -> np.ndarray:
    """The Newton direction for (θ, γ) of the weighted log loss, from per-battle sums (no dense design)."""
    m = len(d.models)
    p = 1.0 / (1.0 + np.exp(-(theta[d.a] - theta[d.b] + gamma * d.x)))
    r, s = w * (p - d.y), w * p * (1.0 - p)
    grad = np.empty(m + 1)
    grad[:m] = np.bincount(d.a, r, m) - np.bincount(d.b, r, m) + RIDGE * theta
    grad[m] = r @ d.x + RIDGE * gamma
    hess = np.zeros((m + 1, m + 1))
    off = np.bincount(d.a * m + d.b, s, m * m).reshape(m, m)
    hess[:m, :m] = np.diag(np.bincount(d.a, s, m) + np.bincount(d.b, s, m)) - off - off.T
    hess[:m, m] = hess[m, :m] = np.bincount(d.a, s * d.x, m) - np.bincount(d.b, s * d.x, m)
    hess[m, m] = s @ (d.x * d.x)
    hess += RIDGE * np.eye(m + 1)
    return np.linalg.solve(hess, -grad)


def _fit(d: _Design, w: np.ndarray, start: np.ndarray | None = None) -> np.ndarray:
    """(θ…, γ) minimising the weighted log loss; Newton with step halving, from ``start`` or zero."""
    m = len(d.models)
    params = np.zeros(m + 1) if start is None else start.copy()
    loss = _loss(d, w, params[:m], params[m])
    for _ in range(100):
        step, t = _newton_step(d, w, params[:m], params[m]), 1.0
        while t > 1e-6 and _loss(d, w, params[:m] + t * step[:m], params[m] + t * step[m]) > loss:
            t /= 2
        if t <= 1e-6:                            # no descent left: the minimum, to rounding
            break
        params = params + t * step
        loss = _loss(d, w, params[:m], params[m])
        if np.max(np.abs(t * step)) < 1e-6:      # nats: under a thousandth of a rating point
            break
    return params


def _elo(theta: np.ndarray) -> np.ndarray:
    return BASE_RATING + ELO * (theta - theta.mean(axis=-1, keepdims=True))


def _ranks(ratings: np.ndarray) -> np.ndarray:
    """1 = best, along the last axis."""
    return np.argsort(np.argsort(-ratings, axis=-1, kind="stable"), axis=-1) + 1


def _bootstrap(d: _Design, point: np.ndarray, samples: int, seed: int) -> np.ndarray:
    """``samples`` fits on instructions drawn with replacement (every battle of a drawn item, as often as drawn)."""
    rng = np.random.default_rng(seed)
    out = np.empty((samples, len(point)))
    for k in range(samples):
        counts = np.bincount(rng.integers(0, d.items, d.items), minlength=d.items)
        out[k] = _fit(d, counts[d.cluster].astype(float), point)
    return out


def fit_ratings(battles: Sequence[Battle], length_control: bool = True, bootstrap: int = BOOTSTRAP,
                seed: int = BOOTSTRAP_SEED, confidence: float = CONFIDENCE) -> ArenaRatings:
    """Bradley–Terry ratings of the models in ``battles`` (Elo-like scale, mean 1000), length-controlled by
    default, with bootstrap intervals over instructions and rank ranges."""
    if not battles:
        raise ValueError("no battles to rate")
    d = _design(battles, length_control)
    m = len(d.models)
    point = _fit(d, np.ones(len(battles)))
    draws = _bootstrap(d, point, bootstrap, seed) if bootstrap else point[None, :]
    tail = (1.0 - confidence) / 2 * 100
    elo, elo_draws = _elo(point[:m]), _elo(draws[:, :m])
    lo, hi = np.percentile(elo_draws, [tail, 100 - tail], axis=0)
    rank_lo, rank_hi = np.percentile(_ranks(elo_draws), [tail, 100 - tail], axis=0)
    g_lo, g_hi = np.percentile(draws[:, m], [tail, 100 - tail])
    rank = _ranks(elo)
    played = np.bincount(d.a, minlength=m) + np.bincount(d.b, minlength=m)
    rows = [ArenaRating(model=name, rating=float(elo[i]), lo=float(lo[i]), hi=float(hi[i]), rank=int(rank[i]),
                        rank_low=math.floor(rank_lo[i]), rank_high=math.ceil(rank_hi[i]), battles=int(played[i]))
            for i, name in enumerate(d.models)]
    return ArenaRatings(ratings=sorted(rows, key=lambda r: r.rank), length_control=length_control,
                        length_coef=float(point[m]), length_coef_lo=float(g_lo), length_coef_hi=float(g_hi),
                        length_scale=d.scale, battles=len(battles), items=d.items, bootstrap=bootstrap, seed=seed,
                        confidence=confidence)


# ---------------------------------------------------------------------------------------------
# the cache
# ---------------------------------------------------------------------------------------------


class Pairing(Ref):
    """One cache record: every battle of two models under one protocol (model A is the one of ``sha_a``)."""

    key: str
    sha_a: str
    sha_b: str
    protocol: str                   # ArenaProtocol.digest()
    battles: list[Battle]


def battle_key(sha_a: str, sha_b: str, protocol: ArenaProtocol) -> str:
    """The cache key of a pair: both models' content hashes (in either order) and the protocol."""
    return sha256_json({"models": sorted((sha_a, sha_b)), "protocol": protocol.digest()})


def pairing(a: Contestant, b: Contestant, protocol: ArenaProtocol, battles: Sequence[Battle]) -> Pairing:
    return Pairing(key=battle_key(a.sha, b.sha, protocol), sha_a=a.sha, sha_b=b.sha, protocol=protocol.digest(),
                   battles=list(battles))


class BattleCache:
    """Battles judged on earlier nights, one JSON line per :class:`Pairing` in ``folder/battles.jsonl``."""

    def __init__(self, folder: Path | str):
        self.path = Path(folder) / CACHE_FILE

    def read(self) -> dict[str, Pairing]:
        """Every whole record (a line without its newline, or one that does not parse, is not one)."""
        if not self.path.exists():
            return {}
        out = {}
        for line in self.path.read_text().splitlines(keepends=True):
            if not line.endswith("\n"):
                continue
            try:
                record = Pairing.model_validate_json(line)
            except ValueError:
                continue
            out[record.key] = record
        return out

    def get(self, keys: Iterable[str]) -> dict[str, list[Battle]]:
        """The cached battles of those keys that are cached (as they were stored)."""
        records = self.read()
        return {k: records[k].battles for k in keys if k in records}

    def among(self, contestants: Sequence[Contestant], protocol: ArenaProtocol) -> list[Battle]:
        """Every cached battle of two of ``contestants`` under ``protocol``, named by their ids tonight."""
        ids = {c.sha: c.id for c in contestants}
        digest = protocol.digest()
        return [b.model_copy(update={"model_a": ids[r.sha_a], "model_b": ids[r.sha_b]})
                for r in self.read().values()
                if r.protocol == digest and r.sha_a != r.sha_b and r.sha_a in ids and r.sha_b in ids
                for b in r.battles]

    def append(self, pairings: Iterable[Pairing]) -> int:
        """Add ``pairings`` (a key already stored is replaced); the file is re-read and rewritten whole under
        a lock, so a concurrent writer's records stay. Returns the number of records now stored."""
        from filelock import FileLock

        self.path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.path.with_name(self.path.name + ".lock"))):
            records = self.read()
            records.update({p.key: p for p in pairings})
            write_text(self.path, "".join(r.model_dump_json() + "\n" for r in records.values()))
        return len(records)
