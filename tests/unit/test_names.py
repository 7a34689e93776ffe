"""One sanitiser for MLflow names: what the evaluation writes, the gate and the registry find again."""

from __future__ import annotations

from gauntlet.names import MAX_LENGTH, metric_key, mlflow_name


def test_filtered_metrics_lose_their_comma_and_keep_their_filter() -> None:
    assert metric_key("gsm8k", "exact_match,strict-match") == "gsm8k.exact_match/strict-match"
    assert metric_key("arith_chat_gen", "exact_match,last-number") == "arith_chat_gen.exact_match/last-number"
    assert metric_key("demo_facts", "acc") == "demo_facts.acc"


def test_characters_mlflow_refuses_are_replaced_and_long_names_cut() -> None:
    assert mlflow_name("gate", "min_score[facts]") == "gate.min_score_facts_"
    assert mlflow_name("average", "model:v1", "gptq-int4") == "average.model_v1.gptq-int4"
    assert len(mlflow_name("x" * 400)) == MAX_LENGTH


def test_every_writer_uses_the_one_sanitiser() -> None:
    """The gate decision, the registry, the evaluation report and the leaderboard name metrics through gauntlet.names
    (the copies that drifted apart are gone)."""
    import ast

    from tests.helpers import REPO

    writers = ["gauntlet/refs.py", "gauntlet/registry/candidates.py", "tasks/evaluate.py", "tasks/score.py",
               "tasks/leaderboard.py", "tasks/summarize.py"]
    for rel in writers:
        tree = ast.parse((REPO / rel).read_text())
        imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module == "gauntlet.names"
                    for a in n.names}
        assert imported & {"metric_key", "mlflow_name", "task_result_metrics"}, rel
