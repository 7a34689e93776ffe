"""Explicit, content-addressed cache keys for the stages (DESIGN.md, "Refs carry content hashes").

A stage's key = its name + its code version (hash of its modules' source) + what it depends on
(its config section and its inputs' content hashes). Each stage writes its outputs under
``$GAUNTLET_HOME/stages/<stage>/<key>/`` and leaves a receipt listing them; :meth:`Stage.run`
refreshes the Prefect cache when that receipt or a file it names is gone, so a cache hit whose files
were deleted recomputes instead of handing back dangling paths.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from tasks.state import sha256_json, source_version, stage_dir


@dataclass(frozen=True)
class Stage:
    name: str
    modules: tuple[str, ...]
    key_parts: Callable[[dict[str, Any]], Any]   # task parameters -> JSON-able identity

    def key(self, params: dict[str, Any]) -> str:
        return sha256_json([self.name, source_version(*self.modules), self.key_parts(params)])

    def cache_key_fn(self, _context: Any, params: dict[str, Any]) -> str:
        return f"{self.name}-{self.key(params)}"

    def output_dir(self, params: dict[str, Any]) -> Path:
        out = stage_dir(self.name, self.key(params))
        out.mkdir(parents=True, exist_ok=True)
        return out

    def write_receipt(self, params: dict[str, Any], paths: list[str]) -> None:
        receipt = self.output_dir(params) / "receipt.json"
        receipt.write_text(json.dumps({"stage": self.name, "outputs": paths}, indent=2))

    def receipt_ok(self, params: dict[str, Any]) -> bool:
        receipt = stage_dir(self.name, self.key(params)) / "receipt.json"
        if not receipt.exists():
            return False
        return all(Path(p).exists() for p in json.loads(receipt.read_text())["outputs"])

    def run(self, task: Any, **params: Any) -> Any:
        """Call a Prefect task, bypassing a cached result whose output files are gone."""
        if not self.receipt_ok(params):
            task = task.with_options(refresh_cache=True)
        else:  # mark the outputs as used now: `gauntlet gc` keeps recently used ones
            (stage_dir(self.name, self.key(params)) / "receipt.json").touch()
        return task(**params)


def retry_unless(*permanent: type[BaseException]):
    """A Prefect ``retry_condition_fn``: retry flaky failures, not ones that a retry cannot fix."""

    def should_retry(_task: Any, _task_run: Any, state: Any) -> bool:
        try:
            state.result()
        except permanent:
            return False
        except BaseException:
            return True
        return True

    return should_retry
