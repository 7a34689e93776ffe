"""Endpoint candidates without a server: what their config refuses (field + fix), when an endpoint's report ranks
beside local weights, and how its tokens are counted (the server itself: tests/integration/test_endpoint_candidates.py).
"""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from gauntlet.config.endpoint import EndpointSpec
from gauntlet.config.leaderboard import LeaderboardCandidate, LeaderboardSpec
from gauntlet.eval.endpoint import Meter
from gauntlet.eval.protocol import served_alike

URL = "http://127.0.0.1:8000/v1"


def board(endpoint: dict, tasks: list[str], **eval_extra) -> LeaderboardSpec:
    return LeaderboardSpec.model_validate({"candidates": [{"endpoint": {"base_url": URL, "model": "m", **endpoint}}],
                                           "eval": {"tasks": tasks, **eval_extra}})


@pytest.mark.parametrize(("endpoint", "eval_extra", "says"), [
    ({"chat": False}, {}, "task demo_facts is multiple_choice"),
    ({"chat": True}, {}, "eval.apply_chat_template: true"),
    ({"chat": True, "logprobs": True}, {}, "chat completions return no prompt log-probabilities"),
    ({"chat": False, "logprobs": True}, {}, "logprobs: true needs endpoint.tokenizer"),
    ({"chat": False, "base_url": "http://k:s3cret@host/v1"}, {}, "credentials in base_url"),
    ({"chat": False, "api_key_env": "A_KEY", "api_key_secret": "b"}, {}, "at most one of endpoint.api_key_env"),
])
def test_an_endpoint_config_is_refused_with_the_field_and_the_fix(endpoint, eval_extra, says) -> None:
    tasks = ["demo_facts"] if says.startswith("task") else ["demo_facts_gen"]
    with pytest.raises(ValidationError, match=says.replace("(", r"\(").replace(")", r"\)")):
        board(endpoint, tasks, **eval_extra)


def test_generation_tasks_run_on_an_endpoint_and_logprobs_let_multiple_choice_run() -> None:
    assert board({"chat": False}, ["demo_facts_gen"]).candidates[0].display_name == "m"
    assert board({"chat": True}, ["demo_facts_gen"], apply_chat_template=True)
    assert board({"chat": False, "logprobs": True, "tokenizer": "org/tok"}, ["demo_facts"])


def test_a_candidate_is_a_source_or_an_endpoint_and_an_endpoint_has_no_variants() -> None:
    with pytest.raises(ValidationError, match="exactly one of source"):
        LeaderboardCandidate(source="demo://tiny-llama", endpoint=EndpointSpec(base_url=URL, model="m"))
    with pytest.raises(ValidationError, match="revision and variants belong to weights"):
        LeaderboardCandidate(endpoint=EndpointSpec(base_url=URL, model="m"), variants=["bf16"])
    assert LeaderboardCandidate(endpoint=EndpointSpec(base_url=URL + "/", model="m")).origin == f"{URL} (m)"


LOCAL = {"backend": "hf", "device": "cpu", "dtype": "float32", "batch_size": 16, "decoding": "greedy",
         "tasks": ["t"], "task_settings": {"t": {"limit": 8}}, "model_fingerprint": {"generation_config": {}}}


def served(generation_only: bool = True, **changed) -> dict:
    return {**LOCAL, "backend": "local-completions", "device": "endpoint", "dtype": "as served", "batch_size": 1,
            "endpoint": {"api": "completions", "logprobs": False, "generation_only": generation_only},
            "model_fingerprint": {"served": "…"}, **changed}


def test_an_endpoint_ranks_beside_local_weights_only_on_the_same_measurement_of_generation_tasks() -> None:
    assert served_alike(served(), LOCAL) and served_alike(LOCAL, served())
    assert not served_alike(served(generation_only=False), LOCAL)              # log-likelihoods through an API
    assert not served_alike(served(decoding="sampled"), LOCAL)                 # a different measurement
    assert not served_alike(served(task_settings={"t": {"limit": 9}}), LOCAL)
    assert not served_alike(LOCAL, {**LOCAL, "device": "cuda"})                # local weights: exact protocols only


def test_tokens_are_counted_as_reported_else_estimated_with_the_tokenizer_and_said_so() -> None:
    class Tok:
        def __call__(self, text, add_special_tokens=False):
            return type("Enc", (), {"input_ids": text.split()})()

    meter = Meter()
    mark = meter.mark()
    meter.sent("a b c")
    meter.received({"usage": {"prompt_tokens": 3, "completion_tokens": 2}}, ["x y"])
    usage = meter.since(mark, None)
    assert (usage.input_tokens, usage.output_tokens, usage.how) == (3, 2, "reported by the endpoint")
    meter.received({"choices": []}, ["x"])
    assert meter.since(mark, None) is None                                     # nothing to count with
    counted = Meter(Tok())
    counted.sent("a b c d")
    counted.received({"choices": []}, ["x y z"])
    usage = counted.since({}, "org/tok")
    assert (usage.input_tokens, usage.output_tokens) == (4, 3)
    assert "estimated with the tokenizer org/tok" in usage.how and "0 of 1 responses" in usage.how
