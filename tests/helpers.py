"""Helpers the tests share (fixtures are in conftest.py): the repository, demo DVC repos, registered champions."""

from __future__ import annotations

import contextlib
import http.server
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import yaml

from gauntlet.refs import DatasetRef, EvalReport, PerfProbe, TaskScore

REPO = Path(__file__).resolve().parent.parent


def make_demo_dvc_repo(repo: Path) -> Path:
    """A fresh git+DVC repo holding the demo's data stage, with an empty local remote. The stage's code is
    copied too (dvc.lock records its md5); DVC's `python -m gauntlet.demo.data` runs that same file."""
    for rel in ("dvc.yaml", "dvc.lock", "params.yaml", ".dvcignore", ".dvc/config", ".dvc/.gitignore",
                "gauntlet/demo/data.py"):
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / rel, repo / rel)
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    return repo


def register_as_champion(c, experiment: str, folder: Path, name: str, tags: dict[str, str]) -> str:
    """Register ``folder`` as a new version of ``name`` @champion, the way MLflow users do: the folder
    as a run's artifact, then a version from it (tests that need a champion without a training run)."""
    from gauntlet.tracking import experiment_id

    run = c.create_run(experiment_id(c, experiment), run_name="register")
    c.log_artifacts(run.info.run_id, str(folder), "model")
    if not c.search_registered_models(f"name='{name}'"):
        c.create_registered_model(name)
    version = str(c.create_model_version(name, source=f"{run.info.artifact_uri}/model", run_id=run.info.run_id,
                                         tags=tags).version)
    c.set_terminated(run.info.run_id, "FINISHED")
    c.set_registered_model_alias(name, "champion", version)
    return version


def project_workdir(name: str) -> Path:
    """A new folder inside the project (under the git-ignored .gauntlet/): what a config names must lie inside
    its project (configs are untrusted input), so tests whose configs name data or output folders work here.
    The caller removes it (``shutil.rmtree``)."""
    import uuid

    folder = REPO / ".gauntlet" / "test-work" / f"{name}-{uuid.uuid4().hex[:8]}"
    folder.mkdir(parents=True)
    return folder


def write_demo_config(tmp_path: Path, mutate, name: str = "config.yaml") -> Path:
    """configs/demo.yaml changed by ``mutate(raw_dict)``, written to ``tmp_path/name``."""
    raw = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    mutate(raw)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return path


def make_report(scores: dict[str, float], perf: dict | None = None, model: str = "candidate") -> EvalReport:
    """A hand-made report: one acc score per task (the gate's and the registry's tests)."""
    return EvalReport(model=model, model_sha="0" * 64, variant="finetuned",
                      scores=[TaskScore(task=t, metric="acc", value=v, stderr=0.01) for t, v in scores.items()],
                      perf=PerfProbe(**perf) if perf else None, protocol={"num_fewshot": 0, "seed": 1234},
                      versions={"lm_eval": "test"}, timestamp="2025-01-01T00:00:00Z", report_path="/nonexistent")


def prefect_yaml() -> dict:
    """deployments/prefect.yaml, parsed."""
    return yaml.safe_load((REPO / "deployments" / "prefect.yaml").read_text())


def load_collector():
    """deployments/ci/collect_results.py as a module (CI runs it as a script)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("collect_results", REPO / "deployments" / "ci" /
                                                  "collect_results.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def evaluate_in_flow(model: str | Path, spec, eval_file: str | Path | None = None, variant: str = "base"):
    """A model's evaluation as production makes it: the evaluate flow (resolve → fetch → the evaluate stage, each
    task a cached ``score`` stage; ``eval_file``: the items of tasks that read the run's eval data). Needs the
    ``prefect_api`` fixture. Returns the report."""
    from gauntlet.config.model import ModelSpec
    from gauntlet.flows.evaluate import evaluate_flow

    return evaluate_flow(model=ModelSpec(source=str(model)), spec=spec, variant=variant,
                         experiment="gauntlet-eval-tests", eval_file=None if eval_file is None else str(eval_file))


def write_train_files(folder: Path, splits: dict[str, list[dict]], mutate=None) -> DatasetRef:
    """Training rows as the data stage leaves them (train.jsonl, validation.jsonl in a folder), after
    ``mutate(splits)`` edits them if given, and the DatasetRef a pull would return for them."""
    from gauntlet.demo.data import write_jsonl

    if mutate:
        mutate(splits)
    folder.mkdir(parents=True, exist_ok=True)
    for split in ("train", "validation"):
        write_jsonl(folder / f"{split}.jsonl", splits[split])
    return DatasetRef(repo=str(folder), train_path=str(folder / "train.jsonl"),
                      validation_path=str(folder / "validation.jsonl"), md5=f"test-{folder.name}", file_md5={},
                      rows={k: len(v) for k, v in splits.items()})


@contextlib.contextmanager
def recording_webhook() -> Iterator[tuple[int, list[tuple[str, bytes]]]]:
    """A local webhook on a free loopback port recording every POST's path and body: (port, received)."""
    received: list[tuple[str, bytes]] = []

    class Hook(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            received.append((self.path, self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_address[1], received
    finally:
        server.shutdown()
