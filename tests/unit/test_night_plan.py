"""The night planned on paper (gauntlet/leaderboard/night_plan.py): costs, schedule, window, GPU use."""

from __future__ import annotations

import pytest

from gauntlet.leaderboard.night_plan import (
    LOAD_S,
    PROBE_S,
    QUANTIZE_S_PER_B,
    Job,
    TaskLoad,
    item_seconds,
    plan_night,
    render_night,
)

EN_CORE = {"mmlu": 14042, "arc_challenge": 1172, "hellaswag": 10042, "gsm8k": 1319}   # test-split items


def test_stated_costs_add_up_and_the_longest_job_goes_first() -> None:
    a = Job("a", "bf16", 7.0, (TaskLoad("t", 1000, seconds_per_item=0.1),))
    b = Job("b", "gptq-int4", 2.0, (TaskLoad("t", 500, seconds_per_item=0.2),), quantize=True)
    c = Job("c", "bf16", 7.0, (TaskLoad("t", 1000, seconds_per_item=0.1),))
    night = plan_night([a, b, c], "H100", workers=2, window_h=0.2)
    cost = {j.job.candidate: j for j in night.jobs}
    assert cost["a"].seconds == pytest.approx(LOAD_S + PROBE_S + 100)
    assert cost["b"].seconds == pytest.approx(LOAD_S + PROBE_S + 2 * QUANTIZE_S_PER_B + 100)
    assert cost["a"].sources == {"t": "measured"}
    # b (the longest) alone on one worker; a and c one after the other on the other
    assert cost["b"].start_s == 0 and {cost["a"].worker, cost["c"].worker} == {1 - cost["b"].worker}
    assert night.wall_h == pytest.approx(max(cost["b"].seconds, 2 * cost["a"].seconds) / 3600)
    assert night.gpu_hours == pytest.approx(sum(j.seconds for j in night.jobs) / 3600)
    assert night.busy == pytest.approx(night.gpu_hours / (2 * night.wall_h))
    assert night.fits == (night.wall_h <= 0.2)


def test_twenty_7b_candidates_on_the_core_suite_fit_a_night_on_one_h100() -> None:
    """The internal-leaderboard target on paper: 20 candidates of 7B x en-core within 8 hours on one H100,
    the GPU busy at least 85% of the night; with a GPTQ variant each, one H100 is not enough, two are."""
    tasks = tuple(TaskLoad(t, n) for t, n in EN_CORE.items())
    bf16 = [Job(f"c{i}", "bf16", 7.0, tasks) for i in range(20)]
    night = plan_night(bf16, "H100", workers=1, window_h=8)
    assert night.fits and night.busy >= 0.85, render_night(night)
    assert all(set(j.sources.values()) == {"assumed"} for j in night.jobs)     # no past nights: said so
    per_job = LOAD_S + PROBE_S + sum(item_seconds(t, 7.0, "H100")[0] * n for t, n in EN_CORE.items())
    assert night.gpu_hours == pytest.approx(20 * per_job / 3600)
    both = bf16 + [Job(f"c{i}", "gptq-int4", 7.0, tasks, quantize=True) for i in range(20)]
    assert not plan_night(both, "H100", workers=1, window_h=8).fits
    two = plan_night(both, "H100", workers=2, window_h=8)
    assert two.fits and two.busy >= 0.85


def test_an_unknown_task_and_card_are_said_not_guessed_silently() -> None:
    night = plan_night([Job("x", "bf16", 1.0, (TaskLoad("my_task", 100),))], "H200")
    assert night.jobs[0].sources == {"my_task": "assumed (unknown task)"}
    assert "assumed (unknown task)" in render_night(night)
    with pytest.raises(ValueError, match="unknown card"):
        plan_night([], "TPU")


def test_the_cli_plans_the_repositorys_board_without_running_it(capsys) -> None:
    from gauntlet.cli import main

    code = main(["leaderboard", "--plan", "--gpus", "1", "--window-hours", "8"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "| tiny-llama-base | bf16 |" in out and "| demo-champion | gptq-int4 |" in out
    assert "GPU-hours" in out and "fits" in out


@pytest.mark.parametrize("args, message", [(["--gpus", "0"], "--gpus 0"), (["--card", "tpu"], "--card 'tpu'"),
                                           (["--window-hours", "0"], "--window-hours 0")])
def test_bad_plan_options_exit_2_naming_the_option(args: list[str], message: str, capsys) -> None:
    from gauntlet.cli import main

    assert main(["leaderboard", "--plan", *args]) == 2
    assert message in capsys.readouterr().err


def test_measured_costs_come_from_past_rows_on_the_same_card_newest_night_first() -> None:
    from gauntlet.leaderboard.board import BoardRow, Leaderboard
    from gauntlet.leaderboard.night_plan import measured_costs

    def night(when: str, rows: list[BoardRow]) -> Leaderboard:
        return Leaderboard(name="n", title="n", night=when, rank_key="average", higher_is_better=True, tasks=[],
                           task_metrics={}, suites={}, baselines={}, rows=rows)

    def row(gpu: str, seconds: float) -> BoardRow:
        return BoardRow(candidate="a", variant="bf16", source="x", status="ranked", gpu=gpu,
                        task_seconds={"demo_facts": seconds})

    newest_first = [night("2026-12-02", [row("NVIDIA H100 80GB HBM3 #3", 0.02), row("cpu cores 0", 9.0)]),
                    night("2026-12-01", [row("NVIDIA H100 80GB HBM3 #0", 0.05), row("NVIDIA A100-SXM4-80GB #1", 0.1)])]
    assert measured_costs(newest_first, "H100") == {("a", "bf16", "demo_facts"): 0.02}
    assert measured_costs(newest_first, "A100") == {("a", "bf16", "demo_facts"): 0.1}
    assert measured_costs(newest_first, "H200") == {}    # nothing measured on it: the plan assumes, and says so
