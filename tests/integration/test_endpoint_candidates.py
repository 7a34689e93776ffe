"""OpenAI-compatible endpoints as leaderboard candidates, against a real server: the demo's tiny Llama under
`transformers serve` on the CPU (started as gauntlet/deploy/servers.py starts a deploy slot), through lm-eval's
local-completions backend.

- The endpoint's generation task scores, item by item, what the same weights score in Gauntlet's local evaluation
  (lm-eval's hf backend), with the same answers: both sides send the same prompt text (plain completions, no chat
  template) with greedy decoding. The eval file's targets are the local model's own first words for half the items
  (the tiny model is random: otherwise every score would be 0 and equal for no reason).
- An endpoint without logprobs makes a log-likelihood task refused at validation, naming the task and the fix.
- A night with a live endpoint, a dead one (nothing listening), one answering HTTP 503, one that lists its model and
  then fails every completion with HTTP 500 (it dies during the evaluation), and the same weights as a local folder:
  the three failing rows fail on their own, naming the error and the status; the live endpoint and the local folder
  are ranked together (generation tasks measured alike), the endpoint with its cost.
"""

from __future__ import annotations

import http.server
import json
import shutil
import socket
import threading
from pathlib import Path

import pytest
import yaml

from gauntlet.demo import data as demo_data

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
SERVED = "tiny-served"
TASK = {"name": "demo_facts_gen", "limit": 12, "max_gen_tokens": 8}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def world():
    """The tiny model as a folder and behind `transformers serve`, an eval file, and a server that answers 503."""
    from gauntlet.demo.model import build_demo_model
    from gauntlet.deploy.servers import start_server, stop_pid
    from tests.helpers import project_workdir

    root = project_workdir("endpoints")
    model = build_demo_model("tiny-llama", out=root / "model", seed=2)
    server = start_server("transformers", "stable", SERVED, "1", model, "127.0.0.1", free_port(), root / "serve",
                          timeout_s=180)

    class Unavailable(http.server.BaseHTTPRequestHandler):
        """503 to everything; or, on the "broken" server, a healthy model list and a 500 to every completion."""

        def answer(self, status: int, body: bytes) -> None:
            self.send_response(status)
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):   # noqa: N802 - http.server's name
            if self.server.server_port == broken.server_port:
                return self.answer(200, json.dumps({"data": [{"id": SERVED}]}).encode())
            self.answer(503, b"overloaded")

        def do_POST(self):   # noqa: N802
            self.answer(500 if self.server.server_port == broken.server_port else 503, b"failed")

        def log_message(self, *args):
            pass

    busy = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Unavailable)
    broken = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Unavailable)
    for fake in (busy, broken):
        threading.Thread(target=fake.serve_forever, daemon=True).start()
    try:
        yield {"root": root, "model": model, "url": f"{server.url}/v1", "busy": f"http://127.0.0.1:{busy.server_port}/v1",
               "broken": f"http://127.0.0.1:{broken.server_port}/v1"}
    finally:
        busy.shutdown()
        broken.shutdown()
        stop_pid(server.pid)
        shutil.rmtree(root, ignore_errors=True)


def eval_spec(**extra):
    from gauntlet.config.eval import EvalSpec

    return EvalSpec.model_validate({"tasks": [TASK], "batch_size": 4, **extra})


def endpoint(world, **extra):
    from gauntlet.config.endpoint import EndpointSpec

    return EndpointSpec(base_url=world["url"], model=SERVED, chat=False, tokenizer=str(world["model"]), **extra)


def score(spec, model_path: str, eval_file: Path, out: Path):
    """One task as the score stage scores it (run_task on the engine), and its samples by doc_id."""
    from gauntlet.eval.engine import engine_for
    from gauntlet.eval.protocol import plans_of
    from gauntlet.eval.scoring import run_task
    from gauntlet.refs import ModelRef

    with engine_for(spec, ModelRef(name="m", path=model_path, source="test", sha=out.name)) as engine:
        result = run_task(spec, plans_of(spec)[0], engine, str(eval_file), out)
    return result, {s["doc_id"]: s for s in map(json.loads, Path(result.samples_path).read_text().splitlines())}


@pytest.fixture(scope="module")
def eval_file(world) -> Path:
    """The demo's eval rows, the even ones' targets replaced by the first word the local model answers."""
    rows = demo_data.build(48, 7)["eval"][:TASK["limit"]]
    first = world["root"] / "first.jsonl"
    demo_data.write_jsonl(first, rows)
    _, samples = score(eval_spec(), str(world["model"]), first, world["root"] / "first")
    for i, row in enumerate(rows):
        word = samples[i]["filtered_resps"][0]
        if i % 2 == 0 and word.isalpha():
            row["output"] = word
    path = world["root"] / "eval.jsonl"
    demo_data.write_jsonl(path, rows)
    return path


def test_the_endpoint_scores_each_generation_item_as_the_same_weights_do_locally(world, eval_file) -> None:
    from gauntlet.config.endpoint import EndpointEvalSpec
    from gauntlet.eval.protocol import protocol_of, served_alike

    ev = eval_spec()
    served = EndpointEvalSpec.of(ev, endpoint(world), None)
    local, local_items = score(ev, str(world["model"]), eval_file, world["root"] / "local")
    remote, remote_items = score(served, world["url"], eval_file, world["root"] / "remote")
    assert 0 < local.value < 1                              # the targets make some items right and some wrong
    assert remote.item_scores == local.item_scores and remote.value == local.value
    assert sorted(remote_items) == sorted(local_items) == list(range(TASK["limit"]))
    for doc, row in local_items.items():                    # the same answer, word for word, on every item
        assert remote_items[doc]["resps"] == row["resps"] and remote_items[doc]["arguments"] == row["arguments"]
    assert remote.usage is not None and remote.usage.how == "reported by the endpoint"
    assert remote.usage.requests == TASK["limit"] and remote.usage.input_tokens > 0 < remote.usage.output_tokens
    assert served_alike(protocol_of(served), protocol_of(ev))       # ranked beside local weights


def test_an_endpoint_without_logprobs_refuses_a_loglikelihood_task_at_validation(world) -> None:
    from gauntlet.config.load import load_leaderboard_spec
    from gauntlet.config.problems import SpecError

    config = {"name": "ep-refused", "candidates": [{"endpoint": {"base_url": world["url"], "model": SERVED,
                                                                 "chat": False}, "name": "served"}],
              "eval": {"tasks": ["demo_facts_gen", "demo_facts"]}}
    path = world["root"] / "refused.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(SpecError) as caught:
        load_leaderboard_spec(path)
    text = str(caught.value)
    assert "task demo_facts is multiple_choice" in text and "candidates[0].endpoint (served)" in text
    assert "logprobs: true" in text and "demo_facts_gen" not in text.replace("drop the task", "")


def test_a_dying_endpoint_fails_its_own_row_while_the_others_are_ranked(world, eval_file, prefect_api) -> None:
    from gauntlet.flows.leaderboard import leaderboard

    price = {"input": 0.5, "output": 1.5}
    candidates = [{"source": str(world["model"]), "name": "local"},
                  {"endpoint": {"base_url": world["url"], "model": SERVED, "chat": False, "price_per_million": price,
                                "max_retries": 2}, "name": "served"},
                  {"endpoint": {"base_url": f"http://127.0.0.1:{free_port()}/v1", "model": SERVED, "chat": False,
                                "max_retries": 2}, "name": "dead"},
                  {"endpoint": {"base_url": world["busy"], "model": SERVED, "chat": False, "max_retries": 2},
                   "name": "busy"},
                  {"endpoint": {"base_url": world["broken"], "model": SERVED, "chat": False, "max_retries": 2},
                   "name": "broken"}]
    config = {"name": "ep-night", "candidates": candidates, "eval_file": str(eval_file),
              "eval": {"tasks": [TASK], "batch_size": 4, "speed_probe": {"prompts": 2, "max_new_tokens": 4}},
              "ranking": {"metric": "exact_match"}, "publish": {"dir": str(world["root"] / "site")}}
    path = world["root"] / "night.yaml"
    path.write_text(yaml.safe_dump(config))
    state = leaderboard(config=str(path), return_state=True)
    assert state.is_completed(), state.message
    board = state.result()
    rows = {r.candidate: r for r in board.rows}
    assert rows["dead"].status == rows["busy"].status == rows["broken"].status == "failed"
    assert "ConnectError" in rows["dead"].reason and "after 2 attempts" in rows["dead"].reason
    assert "HTTP 503 Service Unavailable" in rows["busy"].reason
    assert "demo_facts_gen" in rows["broken"].reason and "500 Server Error" in rows["broken"].reason   # mid-evaluation
    assert {r.candidate for r in board.ranked()} == {"local", "served"}
    assert rows["served"].variant == "served" and rows["served"].raw == rows["local"].raw
    assert rows["served"].rank_low == rows["local"].rank_low == 1   # the same answers: indistinguishable
    assert rows["served"].tokens_per_s > 0 and rows["served"].peak_memory_gb is None
    assert rows["served"].cost_usd is not None and rows["served"].cost_usd > 0 and rows["local"].cost_usd is None
    markdown = (world["root"] / "site" / "leaderboard.md").read_text()
    assert "cost $" in markdown and "HTTP 503" in markdown
