"""Tool environments: a venv of its own for a stage whose library cannot share the main environment.

llm-compressor pins ``transformers<=5.17`` and ``compressed-tensors==0.19``; the main environment has a
newer transformers, and vLLM pins ``compressed-tensors==0.17``. So the quantize stage runs its program
(``gauntlet/programs/quantizer.py``) with the Python of a venv that is created on first use:

* where: ``$GAUNTLET_HOME/envs/<name>``, or the folder named by the environment's override variable
  (``GAUNTLET_QUANT_VENV``), so CI, tests and the demo can share one;
* what: the pinned ``deployments/<name>/requirements.txt`` plus the main environment's torch version
  (``torch==X.Y.Z``; the ``GAUNTLET_QUANT_TORCH`` variable overrides the requirement, e.g. for a CUDA build);
* once: a marker file records what was installed (a changed requirements file re-installs), and a file
  lock makes parallel tasks or test sessions wait for one creation instead of racing.

``pip install`` of the project itself never sees these requirements, so it always resolves.
No Prefect or MLflow here.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

from gauntlet.hashing import sha256_json
from gauntlet.project import project_root
from gauntlet.state import gauntlet_home

MARKER = "gauntlet-env.json"
INSTALL_LOG = "gauntlet-install.log"


class EnvSetupError(RuntimeError):
    """The tool environment could not be created; the message has pip's last lines and the log path."""


def main_torch_requirement() -> str:
    """``torch==<the main environment's version>`` without a local tag (``2.13.0+cpu`` → ``2.13.0``)."""
    return "torch==" + re.sub(r"\+.*$", "", version("torch"))


@dataclass(frozen=True)
class ToolEnv:
    name: str
    requirements_file: str   # relative to the project root
    venv_var: str        # environment variable naming an existing/shared venv folder
    torch_var: str       # environment variable overriding the torch requirement

    @property
    def requirements(self) -> Path:
        return project_root() / self.requirements_file

    def path(self) -> Path:
        override = os.environ.get(self.venv_var)
        return Path(override).resolve() if override else gauntlet_home() / "envs" / self.name

    def python(self) -> Path:
        return self.path() / "bin" / "python"

    def wanted(self) -> dict:
        reqs = [line.split("#")[0].strip() for line in self.requirements.read_text().splitlines()]
        return {"python": sys.version.split()[0],
                "torch": os.environ.get(self.torch_var) or main_torch_requirement(),
                "requirements": [r for r in reqs if r]}

    def ready(self) -> bool:
        marker = self.path() / MARKER
        if not self.python().exists() or not marker.exists():
            return False
        try:
            return json.loads(marker.read_text()).get("fingerprint") == sha256_json(self.wanted())
        except (OSError, ValueError):
            return False

    def ensure(self, echo: Callable[[str], None] = print) -> Path:
        """The venv's python, creating or updating the venv first if needed (minutes the first time)."""
        if self.ready():
            return self.python()
        root = self.path()
        root.parent.mkdir(parents=True, exist_ok=True)
        with _file_lock(root.with_name(root.name + ".lock")):
            if self.ready():  # another process finished it while we waited
                return self.python()
            self._install(root, echo)
        return self.python()

    def _install(self, root: Path, echo: Callable[[str], None]) -> None:
        wanted = self.wanted()
        started = time.time()
        (root / MARKER).unlink(missing_ok=True)
        if not self.python().exists():
            echo(f"creating the {self.name} environment at {root} (first use: pip installs {wanted['torch']} and "
                 f"{', '.join(wanted['requirements'])}; a few minutes)")
            _run([sys.executable, "-m", "venv", str(root)], root.parent / f"{root.name}-venv.log")
        else:
            echo(f"updating the {self.name} environment at {root} (its requirements changed)")
        cmd = [str(self.python()), "-m", "pip", "install", "--disable-pip-version-check", "--progress-bar", "off",
               wanted["torch"], *wanted["requirements"]]
        _run(cmd, root / INSTALL_LOG)
        seconds = time.time() - started
        (root / MARKER).write_text(json.dumps({"fingerprint": sha256_json(wanted), **wanted,
                                               "install_seconds": round(seconds, 1)}, indent=2))
        echo(f"{self.name} environment ready in {seconds:.0f}s")


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _run(cmd: list[str], log: Path) -> None:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        code = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL).returncode
    if code != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-25:])
        raise EnvSetupError(f"`{' '.join(cmd[:4])} …` failed with exit code {code} (full log: {log}):\n{tail}")


QUANTIZE_ENV = ToolEnv(name="quantize", requirements_file="deployments/quantize/requirements.txt",
                       venv_var="GAUNTLET_QUANT_VENV", torch_var="GAUNTLET_QUANT_TORCH")
