"""What every flow does first: its MLflow parent run, tied to the Prefect flow run it belongs to.

:func:`flow_parent_run` is :func:`gauntlet.tracking.parent_run` with the flow run's id, its attempt (Prefect's run
count: a flow run retried after its host died runs again, on any host, as a later attempt) and the Prefect server's
view of other flow runs, so a run whose host died is marked FAILED by whichever host notices first.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.runtime import flow_run

from gauntlet.tracking import RunContext, parent_run

MAX_ATTEMPTS = 3      # a flow run that lost its host this many times fails instead of going round again


def flow_run_states(ids: list[str]) -> dict[str, tuple[str, int]]:
    """(state type, run count) of each flow run the Prefect server knows among ``ids``."""
    from uuid import UUID

    with get_client(sync_client=True) as c:
        runs = c.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[UUID(i) for i in ids])),
                                limit=len(ids))
    return {str(r.id): (r.state_type.value if r.state_type else "UNKNOWN", r.run_count) for r in runs}


@contextmanager
def flow_parent_run(uri: str, experiment: str, run_name: str, tags: dict[str, str],
                    params: dict[str, str]) -> Iterator[RunContext]:
    """The current flow run's MLflow parent run (continued on a later attempt of the same flow run)."""
    tags = {**tags, "prefect.flow_run_id": str(flow_run.id)}
    # the server's count: the flow run read into this process's context can predate its move to RUNNING
    _, attempt = flow_run_states([str(flow_run.id)]).get(str(flow_run.id), ("RUNNING", 1))
    if attempt > MAX_ATTEMPTS:
        raise RuntimeError(f"flow run {flow_run.name} lost its host {attempt - 1} times (attempt {attempt} of at most "
                           f"{MAX_ATTEMPTS}): not trying again. See the earlier attempts' logs in the Prefect UI")
    with parent_run(uri, experiment, run_name, tags, params, flow_attempt=max(1, attempt),
                    flow_run_states=flow_run_states) as run:
        yield run
