"""Arena ratings (gauntlet/leaderboard/arena.py) on known verdicts: no model is loaded. A known-verdict judge
answers from who wrote each answer (the answer text carries the model's name) and runs through the pairwise
judge's own ``judge_pairs``, so every pair is judged in both orders as on a real night."""

from __future__ import annotations

import math
import random
import re
import threading
from collections.abc import Mapping, Sequence

import pytest

from gauntlet.eval.judge import judge_pairs
from gauntlet.leaderboard.arena import (
    ArenaProtocol,
    ArenaRatings,
    Battle,
    BattleCache,
    Contestant,
    battles_from_judged,
    fit_ratings,
    pairing,
    schedule,
)

TEMPLATE = "Q: {instruction}\n<A>{answer_a}</A>\n<B>{answer_b}</B>\n"
ANSWER = re.compile(r"<([AB])>\[(\w+)\](.*?)</\1>", re.DOTALL)


class KnownVerdictJudge:
    """Prefers by fixed strengths (log-odds: P(A wins) = σ(s_A − s_B), a tie 10% of the time) or, with
    ``longer`` set, prefers the longer answer with that probability and flips a coin otherwise; seeded."""

    calibrated = False

    def __init__(self, strength: Mapping[str, float] | None = None, longer: float | None = None, seed: int = 0):
        self.strength, self.longer, self.rng = strength or {}, longer, random.Random(seed)

    def verdict(self, prompt: str) -> str:
        (_, name_a, text_a), (_, name_b, text_b) = ANSWER.findall(prompt)
        if self.longer is not None:
            if self.rng.random() < self.longer and len(text_a) != len(text_b):
                return "A" if len(text_a) > len(text_b) else "B"
            return self.rng.choice("AB")
        if self.rng.random() < 0.1:
            return "tie"
        p_a = 1 / (1 + math.exp(self.strength[name_b] - self.strength[name_a]))
        return "A" if self.rng.random() < p_a else "B"

    def judge(self, prompts: Sequence[str]) -> list[tuple[str | None, float | None, str]]:
        return [(self.verdict(p), None, "known verdict") for p in prompts]


def answers(model: str, lengths: Sequence[int]) -> list[str]:
    return [f"[{model}]" + "x" * n for n in lengths]


def night(judge: KnownVerdictJudge, lengths: Mapping[str, Sequence[int]], per_candidate: int = 3) -> list[Battle]:
    """Every scheduled pair judged in both orders through judge_pairs, as battles."""
    rows = [{"id": f"q{i}", "instruction": f"question {i}"} for i in range(len(next(iter(lengths.values()))))]
    battles: list[Battle] = []
    for a, b in schedule(list(lengths), per_candidate=per_candidate, seed=7):
        items, _ = judge_pairs(judge, TEMPLATE, rows, answers(a, lengths[a]), answers(b, lengths[b]), tie_margin=0)
        battles += battles_from_judged(items, a, b)
    return battles


def show(r: ArenaRatings) -> str:
    rows = [f"{x.model} {x.rating:.0f} [{x.lo:.0f}, {x.hi:.0f}] rank {x.rank_low}-{x.rank_high}" for x in r.ratings]
    return "; ".join(rows) + f"; γ {r.length_coef:+.2f} [{r.length_coef_lo:+.2f}, {r.length_coef_hi:+.2f}]"


# ---------------------------------------------------------------------------------------------
# 1. the order of known verdicts
# ---------------------------------------------------------------------------------------------


def test_known_verdicts_recover_the_order_with_intervals_and_rank_ranges() -> None:
    strength = {"A": 1.2, "B": 0.3, "C": 0.22, "D": -0.8}        # B and C close
    rng = random.Random(1)
    lengths = {m: [rng.randint(50, 400) for _ in range(150)] for m in strength}   # length says nothing here
    battles = night(KnownVerdictJudge(strength, seed=2), lengths)
    assert len(battles) == 6 * 150                               # 4 candidates, 3 opponents each: every pair
    ratings = fit_ratings(battles, bootstrap=300, seed=3)
    print(show(ratings))
    assert [r.model for r in ratings.ratings] in (["A", "B", "C", "D"], ["A", "C", "B", "D"])
    for r in ratings.ratings:
        assert r.lo <= r.rating <= r.hi and r.rank_low <= r.rank <= r.rank_high
    a, b, c, d = (ratings.of(m) for m in "ABCD")
    assert a.rank_low == 1 and d.rank_high == 4
    assert b.rank_high >= 3 and c.rank_low <= 2                  # close neighbours share a rank range
    assert math.isclose(sum(r.rating for r in ratings.ratings) / 4, 1000, abs_tol=1e-6)
    win = 0.05 + 0.9 / (1 + math.exp(strength["D"] - strength["A"]))   # a tie (10%) counts half
    true_gap = 400 / math.log(10) * math.log(win / (1 - win))            # A over D on the rating scale: 291
    assert a.lo > d.hi and abs((a.rating - d.rating) - true_gap) < 0.1 * true_gap
    assert ratings.length_coef_lo < 0 < ratings.length_coef_hi   # no length effect to find
    assert 0.5 < ratings.preference("A", "D") < 1 and math.isclose(
        ratings.preference("A", "D") + ratings.preference("D", "A"), 1)


# ---------------------------------------------------------------------------------------------
# 2. the length control
# ---------------------------------------------------------------------------------------------


def test_length_control_removes_a_gain_that_only_length_bought() -> None:
    """V is no better than the others, only longer; the judge prefers the longer answer 60% of the time and
    flips a coin otherwise. Without the control V gains; with it, V's interval holds the reference's rating."""
    rng = random.Random(4)
    base = [rng.randint(80, 400) for _ in range(200)]
    factor = {"R": 1.0, "S": 1.0, "T": 1.0, "V": 1.8}
    lengths = {m: [round(n * f * rng.lognormvariate(0, 0.35)) for n in base] for m, f in factor.items()}
    battles = night(KnownVerdictJudge(longer=0.6, seed=5), lengths)
    plain = fit_ratings(battles, length_control=False, bootstrap=300, seed=6)
    controlled = fit_ratings(battles, length_control=True, bootstrap=300, seed=6)
    print("plain:", show(plain))
    print("length-controlled:", show(controlled))
    assert plain.of("V").lo > plain.of("R").hi                   # the judge's taste for length made a winner
    v, ref = controlled.of("V"), controlled.of("R")
    assert v.lo <= ref.rating <= v.hi and v.lo <= 1000 <= v.hi
    assert controlled.length_coef_lo > 0                         # and the fit says where it came from


# ---------------------------------------------------------------------------------------------
# 3. the schedule
# ---------------------------------------------------------------------------------------------


def played(pairs: Sequence[tuple[str, str]]) -> list[Battle]:
    return [Battle(model_a=a, model_b=b, item="q0", outcome=0.5, len_a=1, len_b=1) for a, b in pairs]


@pytest.mark.parametrize(("n", "k"), [(2, 3), (5, 1), (12, 3), (40, 3), (40, 5)])
def test_schedule_is_linear_covers_everyone_and_is_deterministic(n: int, k: int) -> None:
    names = [f"m{i:02d}" for i in range(n)]
    pairs = schedule(names, per_candidate=k, seed=11)
    assert len(pairs) <= n * k and len(pairs) == len({frozenset(p) for p in pairs})
    assert all(a != b for a, b in pairs)
    assert {m for p in pairs for m in p} == set(names)           # everyone plays
    assert schedule(list(reversed(names)), per_candidate=k, seed=11) == pairs
    assert schedule(names, played(pairs), per_candidate=k, seed=11) == []   # cached pairs are not judged again


def test_schedule_gives_a_new_candidate_a_bounded_sample_of_close_opponents() -> None:
    names = [f"m{i:02d}" for i in range(20)]
    before = schedule(names, per_candidate=3, seed=11)
    assert len(before) < 20 * 3 and schedule(names, per_candidate=3, seed=12) != before
    ratings = {m: 1000.0 + 10 * i for i, m in enumerate(names)} | {"new": 1101.0}
    tonight = schedule([*names, "new"], played(before), per_candidate=3, seed=11, ratings=ratings)
    assert {frozenset(p) for p in tonight} == {frozenset(("new", m)) for m in ("m10", "m11", "m09")}
    unrated = schedule([*names, "new"], played(before), per_candidate=3, seed=11)
    assert len(unrated) == 3 and all("new" in p for p in unrated)


# ---------------------------------------------------------------------------------------------
# 4. the cache
# ---------------------------------------------------------------------------------------------

PROTOCOL = ArenaProtocol.from_judge({
    "model": "judge-model", "judge_sha": "j" * 64, "prompt": "evals/judge/pairwise.md", "prompt_sha256": "p" * 64,
    "instructions": "evals/judge/instructions.jsonl", "instructions_md5": "i" * 32, "limit": None,
    "decoding": "greedy", "max_new_tokens": 256, "tie_margin": 0.0, "orders": ["candidate_first", "opponent_first"]})


def some_battles(a: str, b: str, n: int = 3) -> list[Battle]:
    return [Battle(model_a=a, model_b=b, item=f"q{i}", outcome=i / 4, len_a=10 + i, len_b=20) for i in range(n)]


def test_cache_round_trip_keys_on_content_and_protocol(tmp_path) -> None:
    x, y, z = Contestant(id="x", sha="1" * 64), Contestant(id="y", sha="2" * 64), Contestant(id="z", sha="3" * 64)
    cache = BattleCache(tmp_path)
    record = pairing(x, y, PROTOCOL, some_battles("x", "y"))
    assert cache.append([record, pairing(y, z, PROTOCOL, some_battles("y", "z"))]) == 2
    again = BattleCache(tmp_path)
    assert again.get([record.key, "missing"]) == {record.key: some_battles("x", "y")}
    assert pairing(y, x, PROTOCOL, []).key == record.key         # either order, one pair
    renamed = again.among([Contestant(id="x-v2", sha=x.sha), y], PROTOCOL)   # same weights, a new name
    assert renamed == [b.model_copy(update={"model_a": "x-v2"}) for b in some_battles("x", "y")]
    other_judge = PROTOCOL.model_copy(update={"judge": {**PROTOCOL.judge, "judge_sha": "k" * 64}})
    assert again.among([x, y, z], other_judge) == []              # another judge: nothing cached
    assert again.among([Contestant(id="x", sha="9" * 64), y], PROTOCOL) == []   # new weights: nothing cached
    assert schedule(["x", "y", "z"], again.among([x, y, z], PROTOCOL), per_candidate=1) == []


def test_cache_keeps_a_second_writers_records_and_never_reads_a_torn_line(tmp_path, monkeypatch) -> None:
    writers = [BattleCache(tmp_path) for _ in range(4)]

    def write(w: int) -> None:
        for i in range(10):
            a, b = Contestant(id=f"w{w}", sha=f"{w}" * 64), Contestant(id=f"o{i}", sha=f"{i:064d}")
            writers[w].append([pairing(a, b, PROTOCOL, some_battles(a.id, b.id, 2))])

    threads = [threading.Thread(target=write, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(BattleCache(tmp_path).read()) == 40                # no writer's append lost

    cache = BattleCache(tmp_path)
    with cache.path.open("a") as fh:                              # a writer killed mid-line (not ours)
        fh.write('{"key": "torn", "sha_a": "')
    assert len(cache.read()) == 40 and "torn" not in cache.read()
    e, f = Contestant(id="e", sha="e" * 64), Contestant(id="f", sha="f" * 64)
    cache.append([pairing(e, f, PROTOCOL, some_battles("e", "f"))])
    assert len(cache.read()) == 41 and cache.path.read_text().endswith("}\n")

    def crash(_fd: int) -> None:
        raise OSError("disk gone")

    monkeypatch.setattr("gauntlet.files.os.fsync", crash)         # our own write, killed before it lands
    with pytest.raises(OSError):
        cache.append([pairing(Contestant(id="g", sha="g" * 64), Contestant(id="h", sha="h" * 64), PROTOCOL, [])])
    assert len(cache.read()) == 41 and not list(tmp_path.glob(".battles.jsonl.tmp-*"))
