"""Data drift before training, with its noise floor: a small new sample of the reference's own rows is no drift
however high its raw PSI; responses of another length are, even few of them."""

from __future__ import annotations

import random

from gauntlet.config.data import DataChecksSpec
from gauntlet.data.drift import compare
from gauntlet.demo.data import build


def rows() -> list[dict]:
    return build(48, 7)["train"]


def test_a_small_sample_of_the_reference_rows_is_not_a_shift() -> None:
    reference = rows()
    new = random.Random(5).sample(reference, 12)
    report = compare(reference, new, DataChecksSpec(max_length_psi=0.1), "champion v1")
    assert max(report.psi.values()) > 0.1, report.psi        # raw PSI alone would call it a shift ...
    assert report.passed, report.problems                    # ... which 12 rows reach by chance: none
    assert all(report.psi[f] <= report.noise_floor[f] or report.psi[f] <= 0.1 for f in report.psi)


def test_longer_responses_shift_past_the_floor_and_the_message_says_by_how_much() -> None:
    reference = rows()
    new = [{**r, "output": r["output"] + " because it is the colour of the sea on a clear summer morning"}
           for r in random.Random(5).sample(reference, 12)]
    report = compare(reference, new, DataChecksSpec(max_length_psi=0.1), "champion v1")
    assert not report.passed
    (problem,) = report.problems
    assert problem.startswith("response_chars shifted against champion v1: PSI ")
    assert "12 rows reach PSI" in problem and report.psi["response_chars"] > report.noise_floor["response_chars"]
