"""Model servers: ``transformers serve`` on the CPU, ``vllm serve`` on a GPU, both OpenAI-compatible.

A server outlives the command that started it (``gauntlet deploy`` returns while the model keeps serving), so
it is started in its own session with its pid recorded, not through :mod:`gauntlet.launch` (which runs a
program to its end). Both slots serve the model under the same name, the registered model's, so a client's
``"model"`` field is right whichever slot nginx picks: ``transformers serve`` is pinned to a path relative to
the slot's folder (a link named after the model), vLLM gets ``--served-model-name``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from pydantic import BaseModel

Slot = Literal["stable", "canary"]


class ServerError(RuntimeError):
    """A server did not start or did not answer its health check."""


class Server(BaseModel):
    slot: Slot
    version: str
    port: int
    pid: int
    model_dir: str
    log: str
    since: str
    backend: str

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def serve_command(backend: str, served_name: str, host: str, port: int, model_dir: Path | None = None) -> list[str]:
    """The command line of one server. ``transformers`` serves ``served_name`` (a link in the working folder);
    ``vllm`` serves ``model_dir`` under ``served_name``."""
    if backend == "transformers":
        cli = Path(sys.executable).with_name("transformers")
        return [str(cli), "serve", served_name, "--host", host, "--port", str(port), "--device", "cpu",
                "--log-level", "info"]
    if backend == "vllm":
        return ["vllm", "serve", str(model_dir or served_name), "--served-model-name", served_name,
                "--host", host, "--port", str(port)]
    raise ValueError(f"unknown backend {backend!r}")


def server_environment(backend: str) -> dict[str, str]:
    """A server's environment. On the CPU, stable and canary share the cores this process may use: each gets half (unless
    OMP_NUM_THREADS is set), since two servers each spinning a thread per core starve the small one behind the
    big one (a 0.5M stable's p95 2.9 s beside an 85M canary on 2 cores, 0.03-0.07 s with a core each)."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    if backend == "transformers":
        env.setdefault("OMP_NUM_THREADS", str(max(1, len(os.sched_getaffinity(0)) // 2)))
    return env


def start_server(backend: str, slot: Slot, served_name: str, version: str, model_dir: Path, host: str, port: int,
                 folder: Path, timeout_s: float) -> Server:
    """Start one server in ``folder`` and wait until ``/health`` answers; ServerError (with the log's tail)
    when it exits or does not answer in ``timeout_s``."""
    if port_answers(port):
        raise ServerError(f"port {port} already answers /health: another server holds it "
                          f"(`gauntlet deploy stop`, or choose deploy.{slot}_port)")
    folder.mkdir(parents=True, exist_ok=True)
    link = folder / served_name
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(Path(model_dir).resolve(), target_is_directory=True)
    log = folder / "server.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen(serve_command(backend, served_name, host, port, model_dir), cwd=folder,
                                stdout=out, stderr=out, start_new_session=True,
                                env=server_environment(backend))
    server = Server(slot=slot, version=str(version), port=port, pid=proc.pid, model_dir=str(model_dir),
                    log=str(log), since=now(), backend=backend)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServerError(f"the {slot} server (v{version}) exited with {proc.returncode}:\n{tail(log)}")
        if port_answers(port):
            return server
        time.sleep(0.5)
    stop_pid(proc.pid)
    raise ServerError(f"the {slot} server (v{version}) did not answer /health on port {port} within "
                      f"{timeout_s:.0f} s (deploy.start_timeout_s):\n{tail(log)}")


def port_answers(port: int, timeout_s: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=timeout_s) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    try:   # a zombie (our own exited child) is not serving
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def stop_pid(pid: int | None, grace_s: float = 10.0) -> None:
    """TERM the server's process group, KILL it after ``grace_s``."""
    if pid is None or not pid_alive(pid):
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            if not pid_alive(pid):
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, os.WNOHANG)
                return
            time.sleep(0.1)


def chat(url: str, served_name: str, prompt: str, max_tokens: int, timeout_s: float = 60.0) -> dict:
    """One chat completion; the response's JSON (``choices``, ``usage``)."""
    body = json.dumps({"model": served_name, "messages": [{"role": "user", "content": prompt}],
                       "max_tokens": max_tokens, "temperature": 0}).encode()
    request = urllib.request.Request(f"{url}/v1/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout_s) as r:
        return json.loads(r.read())
