"""``gauntlet run`` parses the config once and hands the validated RunSpec to the flow ``finetune_spec``: the flow
runs what it was handed (no file is read again), Prefect records the spec as the run's parameter, and the
failure hook notifies from that record. Real Prefect (the test API) and a real webhook receiver."""

from __future__ import annotations

import pytest

from tests.helpers import REPO

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def test_the_spec_flow_runs_the_spec_it_is_handed_and_its_failure_hook_reads_it(prefect_api, dvc_repo, webhook,
                                                                                monkeypatch, tmp_path) -> None:
    from prefect.client.orchestration import get_client

    from gauntlet.config.load import load_spec
    from gauntlet.flows.finetune import finetune_spec

    port, received = webhook
    monkeypatch.setenv("GAUNTLET_TEST_HOOK", f"http://127.0.0.1:{port}/hook")
    not_a_model = tmp_path / "not-a-model"   # the run fails when it fetches the model
    not_a_model.mkdir()
    (not_a_model / "notes.txt").write_text("no weights here")
    spec = load_spec(REPO / "configs" / "demo.yaml", [
        f"data.repo={dvc_repo}", f"model.source={not_a_model}",
        "notify.webhooks=[{url_env: GAUNTLET_TEST_HOOK, events: [run_failed]}]"])
    # a name no config file holds: what the flow and its hook use can only come from the object handed over
    handed = spec.model_copy(update={"registry": spec.registry.model_copy(update={"model_name": "handed-over"})})
    state = finetune_spec(spec=handed, return_state=True)
    assert state.is_failed() and "not a model directory" in state.message, state.message
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(state.state_details.flow_run_id)
    assert run.parameters["spec"]["registry"]["model_name"] == "handed-over"
    (path, body), = received
    assert path == "/hook" and b"handed-over" in body and b"run FAILED" in body, body
