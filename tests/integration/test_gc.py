"""`gauntlet gc`: frees what nobody needs, keeps what the registry and recent runs need."""

from __future__ import annotations

import os
import time
from pathlib import Path

from gauntlet.gc import apply_gc, plan_gc


def stage(home: Path, name: str, key: str, age_days: float) -> Path:
    d = home / "stages" / name / key[:16]
    d.mkdir(parents=True)
    (d / "weights.bin").write_bytes(b"\0" * 1000)
    (d / "receipt.json").write_text("{}")
    (home / "prefect" / "results").mkdir(parents=True, exist_ok=True)
    (home / "prefect" / "results" / f"{name}-{key}").write_bytes(b"record")
    old = time.time() - age_days * 86400
    for p in (d / "receipt.json", d):
        os.utime(p, (old, old))
    return d


def test_gc_keeps_registered_and_recent_and_removes_the_rest(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    home = tmp_path / "home"
    recent = stage(home, "train", "a" * 64, age_days=1)
    stale = stage(home, "train", "b" * 64, age_days=30)
    registered = stage(home, "train", "c" * 64, age_days=30)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = MlflowClient(tracking_uri=uri)
    c.create_registered_model("m")
    c.create_model_version("m", source=str(registered), tags={"model.path": str(registered)})

    plan = plan_gc(keep_days=7, tracking_uri=uri, home=home)
    removed = {Path(i.path) for i in plan.remove}
    assert removed == {stale, home / "prefect" / "results" / f"train-{'b' * 64}"}
    assert {Path(i.path) for i in plan.keep} == {recent, registered}
    assert plan.freed_bytes == 1000 + 2 + len(b"record")

    assert stale.exists()                       # planning (--dry-run) removes nothing
    apply_gc(plan)
    assert not stale.exists() and recent.exists() and registered.exists()
    assert not (home / "prefect" / "results" / f"train-{'b' * 64}").exists()
    assert (home / "prefect" / "results" / f"train-{'a' * 64}").exists()
