"""Input drift with its noise floor: a small sample of the training prompts themselves is no drift, however
high its raw PSI; prompts of another kind are drift, even few of them."""

from __future__ import annotations

import random

from gauntlet.demo.data import build
from gauntlet.deploy.drift import drift


def prompts() -> list[str]:
    return [row["instruction"] for row in build(48, 7)["train"]]


def test_a_small_sample_of_the_training_prompts_stays_under_its_noise_floor() -> None:
    reference = prompts()
    served = random.Random(3).sample(reference, 32)
    d = drift(reference, served)
    assert d.psi > 0.1            # raw PSI alone would cry drift on 32 prompts over 51 word bins ...
    assert d.psi <= d.noise_floor  # ... which sampling alone reaches: no alarm


def test_prompts_of_another_kind_drift_past_the_floor() -> None:
    reference = prompts()
    served = [f"Summarise the quarterly revenue report for region {i} in three bullet points, citing the totals."
              for i in range(32)]
    d = drift(reference, served)
    assert d.psi > max(0.25, d.noise_floor) and d.served == 32
